"""Build the teacher cache of a distillation run: the same teacher(s) and the same training set as
``scripts/distill_llm.py`` would use with that config, written to the config's ``teacher_cache`` folder.

``scripts/cache_teacher.py`` parses the run's YAML and calls :func:`build_teacher_cache`. The values are taken at
``cache_temperature`` (default: the run's ``temperature``), so with ``teacher_cache_tail_mode: tail_bucket`` the
training temperature matches by construction. With ``teacher_cache_format: hidden_states`` the teacher's final
hidden states are stored instead (``cache_hidden_dtype``), which hold at every temperature.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field

import datasets
import torch

from kd_llm.data.collator import CausalLMCollator
from kd_llm.data.sources import build_dataset, load_records
from kd_llm.models.loading import freeze_teacher, load_model, load_peft_teacher, load_tokenizer
from kd_llm.models.vocab import reconcile_vocabularies, tokenizer_vocab_size
from kd_llm.teacher_cache.codec import VALUE_CODECS
from kd_llm.teacher_cache.hidden_cache import module_hidden_fn, write_hidden_state_cache
from kd_llm.teacher_cache.hidden_codec import DEFAULT_HIDDEN_DTYPE, OFFERED_HIDDEN_DTYPES
from kd_llm.teacher_cache.metadata import CacheMetadata, state_dict_sha256, tokenizer_sha256
from kd_llm.teacher_cache.writer import TeacherFn, module_teacher_fn, write_teacher_cache
from kd_llm.training.teacher_head import checked_teacher_head
from kd_llm.training.teachers import TeacherEnsemble

logger = logging.getLogger(__name__)


@dataclass
class TeacherCacheArguments:
    cache_hidden_dtype: str = field(
        default=DEFAULT_HIDDEN_DTYPE,
        metadata={"help": "Teacher cache (hidden_states): storage of each value, one of "
                          f"{', '.join(OFFERED_HIDDEN_DTYPES)} (kd_llm.teacher_cache.hidden_codec; errors measured in "
                          "benchmarks/README.md: int8 misses the 0.1% bar and is not offered)."},
    )
    cache_k: int = field(default=64, metadata={"help": "Teacher cache: most likely tokens stored per supervised "
                                                         "position (the rest is one tail mass). >= 1."})
    cache_value_codec: str = field(
        default="sqrt_uint8",
        metadata={"help": f"Teacher cache: how probabilities are stored, one of {', '.join(VALUE_CODECS)} "
                          "(kd_llm.teacher_cache.codec)."},
    )
    cache_temperature: float | None = field(
        default=None, metadata={"help": "Teacher cache: temperature the values are taken at (default: temperature)."}
    )
    cache_shard_size: int = field(
        default=1024, metadata={"help": "Teacher cache: examples per shard, the unit of atomic writing and resume."}
    )
    cache_batch_size: int = field(default=16, metadata={"help": "Teacher cache: examples per teacher forward."})

    def __post_init__(self):
        problems = []
        if self.cache_hidden_dtype not in OFFERED_HIDDEN_DTYPES:
            problems.append(f"cache_hidden_dtype must be one of {', '.join(OFFERED_HIDDEN_DTYPES)}, got "
                            f"{self.cache_hidden_dtype!r}" + (" (int8 loses up to 0.6% of the loss on SmolLM2-135M, "
                                                              "see benchmarks/README.md)" if
                                                              self.cache_hidden_dtype == "int8" else ""))
        if self.cache_k < 1:
            problems.append(f"cache_k must be >= 1, got {self.cache_k}")
        if self.cache_value_codec not in VALUE_CODECS:
            problems.append(f"cache_value_codec must be one of {', '.join(VALUE_CODECS)}, got "
                            f"{self.cache_value_codec!r}")
        if self.cache_temperature is not None and not self.cache_temperature > 0:
            problems.append(f"cache_temperature must be > 0, got {self.cache_temperature}")
        if self.cache_shard_size < 1 or self.cache_batch_size < 1:
            problems.append("cache_shard_size and cache_batch_size must be >= 1")
        if problems:
            raise ValueError("Invalid teacher cache arguments: " + "; ".join(problems) + ".")


def teacher_fingerprint(teacher) -> str:
    """sha256 of a teacher's weights; for a :class:`TeacherEnsemble`, of its members' hashes, weights and mixture
    (members are loaded one at a time and released again)."""
    if not isinstance(teacher, TeacherEnsemble):
        return state_dict_sha256(teacher)
    members = []
    for index in range(len(teacher)):
        members.append(state_dict_sha256(teacher.load(index)))
        teacher.release(index)
    payload = {"members": members, "weights": teacher.weights, "mixture": teacher.mixture}
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()


def teacher_function(teacher, *, temperature: float, vocab_size: int) -> TeacherFn:
    """A :data:`TeacherFn` for one model or a :class:`TeacherEnsemble` (whose target ``T * log p_mix`` gives back
    ``p_mix`` after the writer's ``log_softmax(. / T)``)."""
    if isinstance(teacher, TeacherEnsemble):
        return lambda input_ids, attention_mask: teacher.target_logits(
            input_ids, attention_mask, temperature=temperature, vocab_size=vocab_size)
    return module_teacher_fn(teacher)


def load_run_teacher(script_args):
    """The run's teacher as ``distill_llm.py`` loads it: one model (merged with ``teacher_adapter``), or an
    ensemble with ``extra_teachers``; and its tokenizer."""
    mode = getattr(script_args, "distillation_mode", "offline")
    if mode != "offline":
        raise ValueError(f"distillation_mode={mode!r}: its teacher changes during training (or is the student), so "
                         "it cannot be cached. A teacher cache serves offline distillation only.")
    trust = getattr(script_args, "trust_remote_code", False)
    adapter = getattr(script_args, "teacher_adapter", None)
    teacher = (load_peft_teacher(script_args.teacher, adapter, trust_remote_code=trust) if adapter is not None
               else load_model(script_args.teacher, trust_remote_code=trust))
    tokenizer = load_tokenizer(script_args.teacher, trust_remote_code=trust)
    extra = getattr(script_args, "extra_teachers", None) or []
    if extra:
        loaders = [lambda spec=spec: load_model(spec, trust_remote_code=trust) for spec in extra]
        teacher = TeacherEnsemble([teacher, *loaders], getattr(script_args, "teacher_weights", None),
                                  mixture=getattr(script_args, "ensemble_mixture", "probs"),
                                  tokenizers=[None, *(load_tokenizer(s, trust_remote_code=trust) for s in extra)],
                                  names=[script_args.teacher, *extra])
    return teacher, tokenizer


def run_training_dataset(script_args, teacher, tokenizer):
    """The dataset ``run_distillation`` trains the distilled student on: the labelled training set, plus the
    teacher-written transfer set when ``transfer_size > 0``. (The cache's fingerprint check catches any drift.)"""
    from kd_llm.experiment import teacher_transfer_set  # the experiment imports the trainer: import late

    task_options = {"prompt_style": script_args.prompt_style} if script_args.dataset == "date_arithmetic" else {}
    records = load_records(script_args.dataset, split="train", size=script_args.train_size,
                           seed=script_args.problem_seed, **task_options)
    dataset = build_dataset(records, tokenizer, max_length=script_args.max_length,
                            use_chat_template=script_args.use_chat_template, source_name=script_args.dataset)
    if script_args.transfer_size:
        writer_model = teacher.load(0) if isinstance(teacher, TeacherEnsemble) else teacher
        transfer = teacher_transfer_set(writer_model, tokenizer, script_args, task_options)
        dataset = datasets.concatenate_datasets([dataset, transfer.cast(dataset.features)])
    return dataset


def build_teacher_cache(script_args, config, cache_args: TeacherCacheArguments) -> CacheMetadata:
    """Write (or resume) the teacher cache of the run described by ``script_args`` and ``config`` (a
    :class:`~kd_llm.training.DistillationConfig`) in ``config.teacher_cache``."""
    if not config.teacher_cache:
        raise ValueError("Set teacher_cache: <folder> in the config (or --teacher_cache): where to write the cache, "
                         "and where distill_llm.py will read it.")
    temperature = cache_args.cache_temperature or config.temperature
    hidden = config.teacher_cache_format == "hidden_states"  # the run's format, which its trainer reads back
    if hidden and getattr(script_args, "extra_teachers", None):
        raise ValueError("teacher_cache_format=hidden_states stores one teacher's hidden state, and an ensemble's "
                         "target is a mixture of several teachers' distributions: use teacher_cache_format=top_k for "
                         "an ensemble.")
    teacher, tokenizer = load_run_teacher(script_args)
    vocab_size = tokenizer_vocab_size(tokenizer)
    teacher_hash = teacher_fingerprint(teacher)  # before placing: it loads and releases ensemble members
    device = torch.device("cpu") if config.use_cpu or not torch.cuda.is_available() else torch.device("cuda")

    def prepare(model):
        return freeze_teacher(model).to(device)

    if isinstance(teacher, TeacherEnsemble):
        for index in range(len(teacher)):
            if teacher.models[index] is not None:
                teacher.models[index] = prepare(teacher.models[index])
            member = teacher.load(index, prepare)
            reconcile_vocabularies(teacher.tokenizers[index] or tokenizer, tokenizer, member, member)
    else:
        teacher = prepare(teacher)
    dataset = run_training_dataset(script_args, teacher, tokenizer)
    main_model = teacher.models[0] if isinstance(teacher, TeacherEnsemble) else teacher
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    identity = script_args.teacher + "".join(f" + {spec}" for spec in getattr(script_args, "extra_teachers", None)
                                             or [])
    common = dict(collator=CausalLMCollator(pad_id), teacher=identity, teacher_hash=teacher_hash,
                  tokenizer_hash=tokenizer_sha256(tokenizer), shard_size=cache_args.cache_shard_size,
                  batch_size=cache_args.cache_batch_size, device=device, progress=not config.disable_tqdm,
                  teacher_dtype=str(next(main_model.parameters()).dtype))
    if hidden:
        head = checked_teacher_head(main_model, vocab_size)
        logger.info("Caching %s's final hidden states (d=%d, %s) over %d examples into %s", identity,
                    head.hidden_size, cache_args.cache_hidden_dtype, len(dataset), config.teacher_cache)
        return write_hidden_state_cache(module_hidden_fn(main_model), dataset, config.teacher_cache, head=head,
                                        hidden_dtype=cache_args.cache_hidden_dtype, **common)
    logger.info("Caching %s (k=%d, T=%g, %s) over %d examples into %s", identity, cache_args.cache_k, temperature,
                cache_args.cache_value_codec, len(dataset), config.teacher_cache)
    return write_teacher_cache(
        teacher_function(teacher, temperature=temperature, vocab_size=vocab_size), dataset, config.teacher_cache,
        vocab_size=vocab_size, k=cache_args.cache_k, temperature=temperature,
        value_codec=cache_args.cache_value_codec, **common)

