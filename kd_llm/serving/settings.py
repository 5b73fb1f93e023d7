"""The served-teacher settings of a :class:`~kd_llm.training.DistillationConfig`, checked without any HTTP package.

``teacher_url`` (one URL, or comma-separated replica URLs of one teacher) or ``teacher_routes`` (several teachers,
chosen per example by the ``teacher_route_column`` column) select a served teacher; the other ``teacher_*`` fields
tune it. Its signal is top-k log-probabilities, so it follows the sparse loss's rules, as a teacher cache does.
"""

from __future__ import annotations

import json

from kd_llm.losses.sparse import SPARSE_DIVERGENCES, TAIL_MODES, same_temperature

PROTOCOLS = ("auto", "kd_llm", "vllm")


def split_urls(value) -> list[str]:
    """``"http://a:1, http://b:2"`` or a list -> ``["http://a:1", "http://b:2"]``."""
    if value is None:
        return []
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    return [item.strip() for item in items if str(item).strip()]


def is_teacher_url(spec) -> bool:
    return isinstance(spec, str) and spec.strip().lower().startswith(("http://", "https://"))


def teacher_routes(config) -> dict[str, list[str]]:
    """``teacher_routes`` as ``{teacher_id: [replica URLs]}`` (a dict, or its JSON text from the command line)."""
    routes = config.teacher_routes
    if not routes:
        return {}
    if isinstance(routes, str):
        try:
            routes = json.loads(routes)
        except json.JSONDecodeError as error:
            raise ValueError(f"teacher_routes must be a mapping teacher_id -> URL(s) (JSON on the command line, e.g. "
                             f"'{{\"math\": \"http://a:8000\"}}'), got {routes!r}: {error.msg}") from error
    if not isinstance(routes, dict) or not routes:
        raise ValueError(f"teacher_routes must be a non-empty mapping teacher_id -> URL(s), got {routes!r}")
    return {str(name): split_urls(urls) for name, urls in routes.items()}


def served_signal_temperature(config) -> float:
    """The temperature the served top-k is asked at: the training temperature when it is constant (so that
    ``tail_bucket`` is exact), else 1 (``renormalise`` re-tempers exactly); a vLLM teacher always gives 1."""
    if config.teacher_protocol != "vllm" and same_temperature(config.temperature, config.final_temperature):
        return float(config.temperature)
    return 1.0


def served_teacher_config_problems(config) -> list[str]:
    """Problems of the ``teacher_url`` / ``teacher_routes`` / ``teacher_*`` fields (empty if none)."""
    problems = []
    urls = split_urls(config.teacher_url)
    try:
        routes = teacher_routes(config)
    except ValueError as error:
        return [str(error)]
    if config.teacher_protocol not in PROTOCOLS:
        problems.append(f"teacher_protocol must be one of {', '.join(PROTOCOLS)}, got {config.teacher_protocol!r}")
    for name, value in (("teacher_top_k", config.teacher_top_k), ("teacher_retries", config.teacher_retries),
                        ("teacher_parity_examples", config.teacher_parity_examples)):
        if not isinstance(value, int) or value < (1 if name == "teacher_top_k" else 0):
            problems.append(f"{name} must be an integer >= {1 if name == 'teacher_top_k' else 0}, got {value!r}")
    if not config.teacher_timeout > 0:
        problems.append(f"teacher_timeout must be > 0 seconds, got {config.teacher_timeout}")
    if not config.teacher_parity_max_tvd >= 0:
        problems.append(f"teacher_parity_max_tvd must be >= 0, got {config.teacher_parity_max_tvd}")
    if not urls and not routes:
        return problems
    bad = [u for u in urls + [u for r in routes.values() for u in r] if not is_teacher_url(u)]
    if bad:
        problems.append(f"teacher URLs must start with http:// or https://, got {bad[0]!r}")
    if urls and routes:
        problems.append("set teacher_url (one served teacher) or teacher_routes (several, chosen per example by "
                        f"the {config.teacher_route_column!r} column), not both")
    if any(not r for r in routes.values()):
        problems.append("every teacher in teacher_routes needs at least one URL")
    tail_mode = config.teacher_cache_tail_mode
    if tail_mode in TAIL_MODES and config.distillation_loss not in SPARSE_DIVERGENCES[tail_mode]:
        problems.append(
            f"distillation_loss={config.distillation_loss!r} cannot be computed from a served teacher's top-k with "
            f"teacher_cache_tail_mode={tail_mode!r} (the tail's individual probabilities are not sent); use one of "
            f"{', '.join(SPARSE_DIVERGENCES[tail_mode])}")
    if tail_mode == "tail_bucket" and not same_temperature(served_signal_temperature(config), config.temperature):
        problems.append(
            f"a served teacher's top-k comes at temperature {served_signal_temperature(config):g} (vLLM: always 1; "
            "kd_llm's server: the training temperature when it is constant), but training asks for "
            f"{config.temperature:g}: with teacher_cache_tail_mode=tail_bucket the tail mass at another temperature "
            "is unknown. Set teacher_cache_tail_mode=renormalise (re-tempers exactly), or train at that temperature")
    if tail_mode == "tail_bucket" and not same_temperature(config.temperature, config.final_temperature):
        problems.append("the temperature moves during training, which teacher_cache_tail_mode=tail_bucket cannot "
                        "follow on a served top-k: use teacher_cache_tail_mode=renormalise or a constant temperature")
    if config.precompute_teacher_logits:
        problems.append("a served teacher and precompute_teacher_logits both replace the local teacher: set "
                        "precompute_teacher_logits=False")
    if config.seq_kd:
        problems.append("seq_kd has the teacher write completions, which a served scorer does not do: use a local "
                        "teacher for seq_kd")
    if config.hidden_weight > 0 or config.attention_weight > 0:
        problems.append("hidden_weight / attention_weight match the teacher's intermediate features, which a served "
                        "teacher does not send: set them to 0")
    if routes and config.dataloader_num_workers > 0:
        problems.append("teacher_routes reads the route column in the collator of the training process: set "
                        "dataloader_num_workers=0 (the served teacher's requests run on threads anyway)")
    return problems


def served_script_problems(args) -> list[str]:
    """What scripts/distill_llm.py cannot do with ``teacher: http://...`` (the teacher's weights are elsewhere)."""
    problems = []
    if args.student_init != "checkpoint":
        problems.append(f"student_init={args.student_init} builds the student from the teacher's weights, which stay "
                        "on the server: use student_init=checkpoint with student_checkpoint=<a student folder whose "
                        "tokenizer is the teacher's>")
    if getattr(args, "distillation_mode", "offline") != "offline" or getattr(args, "extra_teachers", None):
        problems.append("a served teacher distils offline from one teacher (several: teacher_routes): set "
                        "distillation_mode=offline and no extra_teachers")
    if getattr(args, "teacher_adapter", None):
        problems.append("teacher_adapter merges into a local teacher: serve the merged teacher instead "
                        "(scripts/serve_teacher.py --teacher-adapter)")
    if args.transfer_size:
        problems.append("transfer_size has the teacher write completions, which a served scorer does not do")
    if args.write_report:
        problems.append("write_report measures the teacher's skill, speed and memory here, where it is not: set "
                        "write_report=false (the results table and results.json are still written)")
    return problems
