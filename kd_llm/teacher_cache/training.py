"""What ``DistillationTrainer`` needs to train from a teacher cache (``teacher_cache: <folder>`` in the config).

The trainer keeps the hooks small: :func:`teacher_cache_config_problems` validates the config fields,
:func:`open_trainer_cache` opens and checks the cache against the run before training, and
:func:`sparse_cache_terms` computes a training batch's objective from the stored targets.

With a cache the trainer needs no teacher for training batches. A teacher may still be passed: it is then checked
against the cache (weights hash) and serves what the cache cannot (evaluation batches, on-policy generated batches);
a teacher in a side process (``kd_llm.training.teacher_process.TeacherProcess``) is checked by the hash it reports.
"""

from __future__ import annotations

from kd_llm.losses import LossComponents
from kd_llm.losses.sparse import (
    SPARSE_DIVERGENCES,
    TAIL_MODES,
    check_sparse_setup,
    same_temperature,
    sparse_distillation_objective,
)
from kd_llm.models.vocab import tokenizer_vocab_size
from kd_llm.teacher_cache.metadata import TeacherCacheError
from kd_llm.teacher_cache.reader import TeacherCache


def teacher_cache_config_problems(config) -> list[str]:
    """Problems of the ``teacher_cache*`` fields of a :class:`~kd_llm.training.DistillationConfig` (empty if none)."""
    problems = []
    tail_mode = config.teacher_cache_tail_mode
    if tail_mode not in TAIL_MODES:
        problems.append(f"teacher_cache_tail_mode must be one of {', '.join(TAIL_MODES)}, got {tail_mode!r}")
        return problems
    if not config.teacher_cache:
        return problems
    if config.distillation_loss not in SPARSE_DIVERGENCES[tail_mode]:
        problems.append(
            f"distillation_loss={config.distillation_loss!r} cannot be computed from a teacher cache with "
            f"teacher_cache_tail_mode={tail_mode!r} (the tail's individual probabilities are not stored); use one of "
            f"{', '.join(SPARSE_DIVERGENCES[tail_mode])}"
        )
    if config.precompute_teacher_logits:
        problems.append("teacher_cache and precompute_teacher_logits both serve stored teacher outputs: set "
                        "precompute_teacher_logits=False")
    if config.seq_kd or config.lmbda >= 1.0:
        problems.append("teacher_cache holds the teacher on the dataset's completions, which seq_kd / lmbda=1 "
                        "replace in every batch, so it would never be read: remove teacher_cache")
    if tail_mode == "tail_bucket" and not same_temperature(config.temperature, config.final_temperature):
        problems.append(
            f"the temperature moves from {config.temperature} to {config.final_temperature}, but with "
            "teacher_cache_tail_mode=tail_bucket the cached values hold at the one temperature they were taken at: "
            "use a constant temperature, or teacher_cache_tail_mode=renormalise (which re-tempers exactly)"
        )
    return problems


def open_trainer_cache(trainer, *, teacher_model, teacher_tokenizer, student_tokenizer) -> TeacherCache | None:
    """Open ``trainer.args.teacher_cache`` and check it against this run, before any training step."""
    args = trainer.args
    if not args.teacher_cache or args.alpha >= 1:
        return None  # alpha = 1 (e.g. the experiment's hard-label baseline) never reads a teacher
    if student_tokenizer is None:
        raise ValueError("Pass processing_class=<the student's tokenizer>: the teacher cache is checked against it.")
    if trainer.train_dataset is None:
        raise ValueError("teacher_cache is set but there is no train_dataset: the cache serves training batches.")
    if teacher_model is None and trainer.eval_dataset is not None:
        raise ValueError("Evaluating the distillation term needs the teacher on the evaluation data, which the cache "
                         "(training data only) does not hold: pass teacher_model=<the teacher> as well, or no "
                         "eval_dataset.")
    # A side-process teacher's weights are in the other process: it reported their hash at start-up.
    reported_hash = getattr(teacher_model, "weights_hash", None)
    cache = TeacherCache.open(
        args.teacher_cache, tokenizer=teacher_tokenizer if teacher_tokenizer is not None else student_tokenizer,
        dataset=trainer.train_dataset, teacher=None if reported_hash else teacher_model, teacher_hash=reported_hash,
    )
    if tokenizer_vocab_size(student_tokenizer) != cache.vocab_size:
        raise TeacherCacheError(f"The teacher cache covers {cache.vocab_size} tokens but the student's tokenizer "
                                f"{tokenizer_vocab_size(student_tokenizer)}.")
    student = trainer.accelerator.unwrap_model(trainer.model)
    output = student.get_output_embeddings() if hasattr(student, "get_output_embeddings") else None
    rows = getattr(getattr(output, "weight", None), "shape", [None])[0]
    if rows is not None and rows < cache.vocab_size:
        raise TeacherCacheError(f"The student has {rows} output logits but the teacher cache covers "
                                f"{cache.vocab_size} tokens: resize its embeddings to the tokenizer's length.")
    for name in ("temperature", "final_temperature"):
        check_sparse_setup(args.distillation_loss, args.teacher_cache_tail_mode, temperature=getattr(args, name),
                           cache_temperature=cache.temperature)
    return cache


def sparse_cache_terms(trainer, student_logits, cache_index, shifted_labels, *, alpha: float, temperature: float,
                       num_items_in_batch) -> LossComponents:
    """The objective of one training batch, its distillation term from the cached top-k targets."""
    args = trainer.args
    targets = None
    if alpha < 1:
        targets = trainer.teacher_cache.gather(cache_index, shifted_labels, device=student_logits.device)
    return sparse_distillation_objective(
        student_logits, targets, shifted_labels, alpha=alpha, loss=args.distillation_loss, temperature=temperature,
        tail_mode=args.teacher_cache_tail_mode, beta=args.beta, skew=args.skew,
        num_items_in_batch=num_items_in_batch, kd_vocab_size=trainer.teacher_cache.vocab_size,
    )


def cache_summary(config) -> dict | None:
    """What a run's results record about its teacher cache (None without one)."""
    if not getattr(config, "teacher_cache", None):
        return None
    from kd_llm.teacher_cache.metadata import read_metadata

    metadata = read_metadata(config.teacher_cache)
    return {"path": str(config.teacher_cache), "tail_mode": config.teacher_cache_tail_mode,
            "teacher": metadata.teacher, "teacher_hash": metadata.teacher_hash, "k": metadata.k,
            "temperature": metadata.temperature, "value_codec": metadata.value_codec,
            "supervised_tokens": metadata.supervised_tokens,
            "bytes_per_supervised_token": round(metadata.total_bytes / max(metadata.supervised_tokens, 1), 2)}
