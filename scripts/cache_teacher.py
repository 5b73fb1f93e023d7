"""Run a distillation config's teacher once over its training set and store, for every supervised token, its top-k
distribution (``teacher_cache_format: top_k``, the default: smallest) or its final hidden state
(``teacher_cache_format: hidden_states``: exact with the teacher's lm_head) in ``teacher_cache`` (an offline
teacher: distill_llm.py then trains with no teacher in memory).

    python scripts/cache_teacher.py --config configs/date_cached_teacher.yaml            # build, or resume
    python scripts/cache_teacher.py --config configs/date_cached_teacher.yaml --cache_k 32 --teacher_cache out/c32
    python scripts/cache_teacher.py --config configs/date_hidden_cache.yaml               # hidden states (float16)

Takes the same YAML as scripts/distill_llm.py (teacher, data and temperature come from it) plus the cache_* options
of kd_llm.teacher_cache.build.TeacherCacheArguments. Rerunning an interrupted build resumes it.
"""

from __future__ import annotations

from kd_llm.boundary import run_script
from kd_llm.cli import parse_with_config
from kd_llm.experiment import DistillationScriptArguments
from kd_llm.teacher_cache.build import TeacherCacheArguments, build_teacher_cache
from kd_llm.training import DistillationConfig


def main(argv: list[str] | None = None):
    script_args, config, cache_args = parse_with_config(
        (DistillationScriptArguments, DistillationConfig, TeacherCacheArguments), argv)
    metadata = build_teacher_cache(script_args, config, cache_args)
    what = (f"hidden states (d={metadata.hidden_size}, {metadata.hidden_dtype})" if metadata.payload == "hidden_states"
            else f"k={metadata.k}, T={metadata.temperature:g}, {metadata.value_codec}")
    print(f"Teacher cache {config.teacher_cache}: {metadata.num_examples} examples, {metadata.supervised_tokens:,} "
          f"supervised tokens, {what}, {metadata.total_bytes / max(metadata.supervised_tokens, 1):.1f} bytes per "
          "supervised token.")
    return metadata


if __name__ == "__main__":
    run_script(main, "cache_teacher")
