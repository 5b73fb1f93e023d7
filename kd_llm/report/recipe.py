"""The distillation recipe of a run, in words, and the papers behind the methods it used.

``run`` is the run summary that :func:`kd_llm.experiment.run_distillation` writes to ``results.json`` (without the
per-model rows): teacher, student initialisation, every distillation setting of the config, the training settings,
steps and tokens. Distillation settings this module does not know by name (hidden-state or attention terms, layer
maps, added later) are still listed when they differ from their defaults, so the recipe never hides a term.
"""

from __future__ import annotations

import dataclasses

# Settings described in their own words below; any other distillation setting is listed generically.
DESCRIBED = {"alpha", "temperature", "final_temperature", "temperature_schedule", "distillation_loss", "beta", "skew",
             "l2_weight", "precompute_teacher_logits", "lmbda", "seq_kd", "seq_kd_decoding",
             "generation_max_new_tokens", "generation_temperature", "remove_unused_columns",
             "packing", "packing_max_length", "packing_overlong", "length_grouping", "generation_buffer",
             "teacher_cache", "teacher_cache_format", "teacher_cache_tail_mode"}
LAYER_TERMS = ("hidden", "attention", "attn", "feature", "layer_map")

CITATIONS = {
    "hinton2015distilling": """@article{hinton2015distilling,
  title   = {Distilling the Knowledge in a Neural Network},
  author  = {Hinton, Geoffrey and Vinyals, Oriol and Dean, Jeff},
  journal = {arXiv preprint arXiv:1503.02531},
  year    = {2015}
}""",
    "kim2016sequence": """@inproceedings{kim2016sequence,
  title     = {Sequence-Level Knowledge Distillation},
  author    = {Kim, Yoon and Rush, Alexander M.},
  booktitle = {Proceedings of the 2016 Conference on Empirical Methods in Natural Language Processing},
  year      = {2016}
}""",
    "gu2024minillm": """@inproceedings{gu2024minillm,
  title     = {MiniLLM: Knowledge Distillation of Large Language Models},
  author    = {Gu, Yuxian and Dong, Li and Wei, Furu and Huang, Minlie},
  booktitle = {The Twelfth International Conference on Learning Representations},
  year      = {2024}
}""",
    "agarwal2024onpolicy": """@inproceedings{agarwal2024onpolicy,
  title     = {On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes},
  author    = {Agarwal, Rishabh and Vieillard, Nino and Zhou, Yongchao and Stanczyk, Piotr and Garea, Sabela Ramos
               and Geist, Matthieu and Bachem, Olivier},
  booktitle = {The Twelfth International Conference on Learning Representations},
  year      = {2024}
}""",
    "ko2024distillm": """@inproceedings{ko2024distillm,
  title     = {DistiLLM: Towards Streamlined Distillation for Large Language Models},
  author    = {Ko, Jongwoo and Kim, Sungnyun and Chen, Tianyi and Yun, Se-Young},
  booktitle = {Proceedings of the 41st International Conference on Machine Learning},
  year      = {2024}
}""",
    "wen2023fdivergence": """@inproceedings{wen2023fdivergence,
  title     = {f-Divergence Minimization for Sequence-Level Knowledge Distillation},
  author    = {Wen, Yuqiao and Li, Zichao and Du, Wenyu and Mou, Lili},
  booktitle = {Proceedings of the 61st Annual Meeting of the Association for Computational Linguistics},
  year      = {2023}
}""",
    "ba2014deep": """@inproceedings{ba2014deep,
  title     = {Do Deep Nets Really Need to be Deep?},
  author    = {Ba, Jimmy and Caruana, Rich},
  booktitle = {Advances in Neural Information Processing Systems},
  year      = {2014}
}""",
    "romero2015fitnets": """@inproceedings{romero2015fitnets,
  title     = {FitNets: Hints for Thin Deep Nets},
  author    = {Romero, Adriana and Ballas, Nicolas and Kahou, Samira Ebrahimi and Chassang, Antoine and Gatta, Carlo
               and Bengio, Yoshua},
  booktitle = {International Conference on Learning Representations},
  year      = {2015}
}""",
    "jiao2020tinybert": """@inproceedings{jiao2020tinybert,
  title     = {TinyBERT: Distilling BERT for Natural Language Understanding},
  author    = {Jiao, Xiaoqi and Yin, Yichun and Shang, Lifeng and Jiang, Xin and Chen, Xiao and Li, Linlin and
               Wang, Fang and Liu, Qun},
  booktitle = {Findings of the Association for Computational Linguistics: EMNLP 2020},
  year      = {2020}
}""",
    "muralidharan2024compact": """@article{muralidharan2024compact,
  title   = {Compact Language Models via Pruning and Knowledge Distillation},
  author  = {Muralidharan, Saurav and Sreenivas, Sharath Turuvekere and Joshi, Raviraj and Chochowski, Marcin and
             Patwary, Mostofa and Shoeybi, Mohammad and Catanzaro, Bryan and Kautz, Jan and Molchanov, Pavlo},
  journal = {arXiv preprint arXiv:2407.14679},
  year    = {2024}
}""",
}
DIVERGENCE_CITATION = {"reverse_kl": "gu2024minillm", "jsd": "agarwal2024onpolicy", "skew_forward_kl": "ko2024distillm",
                       "skew_reverse_kl": "ko2024distillm", "tvd": "wen2023fdivergence", "mse": "ba2014deep"}


def distillation_settings(config) -> dict:
    """Every setting that ``config`` (a :class:`kd_llm.training.DistillationConfig`) adds to ``TrainingArguments``."""
    from transformers import TrainingArguments

    base = {f.name for f in dataclasses.fields(TrainingArguments)}
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name not in base}


def training_settings(config) -> dict:
    keys = ("max_steps", "num_train_epochs", "per_device_train_batch_size", "gradient_accumulation_steps",
            "learning_rate", "lr_scheduler_type", "warmup_steps", "weight_decay", "seed", "bf16", "fp16")
    # Enums (lr_scheduler_type) as their plain values, so that results.json reads "cosine".
    settings = {key: getattr(getattr(config, key, None), "value", getattr(config, key, None)) for key in keys}
    settings["world_size"] = getattr(config, "world_size", 1)
    return settings


def _defaults() -> dict:
    from kd_llm.training import DistillationConfig

    return {f.name: f.default for f in dataclasses.fields(DistillationConfig)
            if f.default is not dataclasses.MISSING}


def extra_terms(distillation: dict) -> dict:
    """Distillation settings not described by name (hidden/attention terms, layer maps...) that are not at their
    default value, i.e. that changed the objective."""
    defaults = _defaults()
    return {k: v for k, v in distillation.items()
            if k not in DESCRIBED and v not in (None, False) and (k not in defaults or v != defaults[k])}


def settings_of(run: dict) -> dict:
    """Every distillation setting of the run (``distillation_settings``), or the older subset (``distillation``)."""
    return run.get("distillation_settings") or run.get("distillation") or {}


def _temperature(d: dict) -> str:
    start, end, schedule = d.get("temperature"), d.get("final_temperature"), d.get("temperature_schedule", "constant")
    if schedule == "constant" or end in (None, start):
        return f"T = {start:g}, constant"
    return f"T from {start:g} to {end:g}, {schedule} schedule over the training steps"


def _divergence(d: dict) -> str:
    name = d.get("distillation_loss", "forward_kl")
    detail = {"jsd": f" (β = {d.get('beta')})", "skew_forward_kl": f" (s = {d.get('skew')})",
              "skew_reverse_kl": f" (s = {d.get('skew')})"}.get(name, "")
    return f"`{name}`{detail}"


def recipe_lines(run: dict) -> list[str]:
    """Markdown bullets: teacher, student, objective, temperature, alpha, extra terms, data, steps and tokens."""
    d = settings_of(run)
    t = run.get("training") or {}
    alpha = d.get("alpha")
    lines = [f"- Teacher: `{run.get('teacher')}` (frozen, eval mode, no gradients)."]
    student = f"- Student initialisation: `{run.get('student_init')}`"
    if run.get("student_teacher_layers"):
        student += f", keeping teacher layers {run['student_teacher_layers']}"
    lines.append(student + ".")
    if alpha is not None:
        lines.append("- Objective: α·CE(student, labels) + (1 − α)·T²·D(teacher_T ‖ student_T), "
                     f"α = {alpha:g}, "
                     f"D = {_divergence(d)}; every term summed over supervised tokens and divided by their count in "
                     "the accumulated batch.")
        lines.append(f"- Temperature: {_temperature(d)}.")
    if d.get("l2_weight"):
        lines.append(f"- L2 penalty on the student's weights: {d['l2_weight']:g}.")
    if d.get("lmbda"):
        lines.append(f"- On-policy fraction λ = {d['lmbda']:g}: that share of batches has its completions written by "
                     "the student itself (GKD).")
    if d.get("seq_kd"):
        lines.append(f"- Sequence-level KD: completions regenerated by the teacher ({d.get('seq_kd_decoding')}).")
    extra = extra_terms(d)
    if extra:
        lines.append("- Further distillation terms: " + ", ".join(f"`{k}` = {v}" for k, v in sorted(extra.items()))
                     + ".")
    if d.get("precompute_teacher_logits"):
        lines.append("- The teacher's logits were computed once before training and kept in memory.")
    if d.get("teacher_cache"):
        stored = ("final hidden states (its exact distribution through its lm_head)"
                  if d.get("teacher_cache_format") == "hidden_states"
                  else f"top-k distribution (tail: `{d.get('teacher_cache_tail_mode', 'tail_bucket')}`)")
        lines.append("- Teacher targets from a cache built before training (scripts/cache_teacher.py): the "
                     f"teacher's {stored} at every supervised token, read by the training batches.")
    if d.get("packing"):
        rows = (f"rows of up to {d['packing_max_length']} tokens" if d.get("packing_max_length")
                else "rows as long as the micro-batch's longest example")
        stored = (", the stored teacher targets laid into the rows example by example"
                  if d.get("teacher_cache") or d.get("precompute_teacher_logits") else "")
        lines.append(f"- Batches packed without padding ({rows}; position ids restart per example, no attention "
                     f"across examples{stored}: the same loss as padded batches).")
    data = f"- Data: {run.get('train_examples')} labelled training examples"
    if run.get("transfer_examples"):
        data += f" plus {run['transfer_examples']} teacher-written completions (transfer set, KD student only)"
    if run.get("supervised_tokens") is not None:
        data += f"; {run['supervised_tokens']:,} supervised tokens in the labelled set"
    lines.append(data + ".")
    if run.get("steps") is not None:
        batch = (t.get("per_device_train_batch_size") or 0) * (t.get("gradient_accumulation_steps") or 1) * (
            t.get("world_size") or 1)
        steps = f"- Steps: {run['steps']:,} optimizer steps"
        if batch and run.get("train_examples"):
            seen = run["steps"] * batch
            examples = run["train_examples"] + (run.get("transfer_examples") or 0)
            steps += f" of {batch} examples ({seen:,} examples seen, about {seen / examples:.1f} epochs"
            if run.get("supervised_tokens") and not run.get("transfer_examples"):
                steps += f", about {seen / examples * run['supervised_tokens']:,.0f} supervised tokens"
            steps += ")"
        lines.append(steps + ".")
    if t.get("learning_rate") is not None:
        lines.append(f"- Optimiser: AdamW, learning rate {t['learning_rate']:g} ({t.get('lr_scheduler_type')}, "
                     f"{t.get('warmup_steps')} warm-up steps), weight decay {t.get('weight_decay')}, seed "
                     f"{t.get('seed')}.")
    if run.get("baseline"):
        lines.append(f"- Hard-label baseline: {run['baseline']}")
    return lines


def citation_keys(run: dict | None) -> list[str]:
    """Hinton et al. (2015) always, then the papers of the methods this run used."""
    keys = ["hinton2015distilling"]
    d = settings_of(run or {})

    def add(key):
        if key not in keys:
            keys.append(key)
    if d.get("distillation_loss") in DIVERGENCE_CITATION:
        add(DIVERGENCE_CITATION[d["distillation_loss"]])
    if d.get("lmbda"):
        add("agarwal2024onpolicy")
    if d.get("seq_kd") or (run or {}).get("transfer_examples"):
        add("kim2016sequence")
    if (run or {}).get("student_init") == "pruned":
        add("muralidharan2024compact")
    extra = extra_terms(d)
    if any("hidden" in k or "feature" in k for k in extra):
        add("romero2015fitnets")
        add("jiao2020tinybert")
    if any("attention" in k or "attn" in k for k in extra):
        add("jiao2020tinybert")
    return keys
