"""Which student layer learns from which teacher layer.

A layer map is a list of ``(student_layer, teacher_layer)`` pairs of decoder-layer indices (0-based; the output of
decoder layer ``i``, or for attention, the attention inside it). It is written as one string, so that it fits a YAML
file and a command-line flag:

- ``uniform``: every student layer ``i`` pairs with teacher layer ``round((i + 1) * L_t / L_s) - 1`` (rounded half up),
  so the last student layer always meets the last teacher layer and depth is spread evenly (TinyBERT's mapping);
- ``last``: the last student layer with the last teacher layer only;
- ``teacher_layers``: for a student pruned from the teacher, student layer ``i`` pairs with the teacher layer it was
  copied from (``config.kd_llm_teacher_layers``, recorded by :func:`kd_llm.models.students.prune_layers`);
- explicit pairs ``"0:1,1:3"`` (student:teacher; negative indices count from the end, as in Python).
"""

from __future__ import annotations

import math
import re

from kd_llm.errors import KdLlmError

LAYER_MAP_KEYWORDS = ("uniform", "last", "teacher_layers")
_PAIR = re.compile(r"^\s*(-?\d+)\s*:\s*(-?\d+)\s*$")


class LayerMapError(KdLlmError, ValueError):
    """A layer map that cannot be used; the message says what is wrong and how to write it."""


def check_layer_map_syntax(spec: str, name: str = "layer map") -> None:
    """Fail fast on a map string that can never be valid (used by the config before any model is loaded)."""
    if not isinstance(spec, str) or not spec.strip():
        raise LayerMapError(f"{name} must be one of {', '.join(LAYER_MAP_KEYWORDS)} or pairs like '0:1,1:3', "
                            f"got {spec!r}.")
    if spec.strip() in LAYER_MAP_KEYWORDS:
        return
    for part in spec.split(","):
        if not _PAIR.match(part):
            raise LayerMapError(
                f"{name} {spec!r}: {part.strip()!r} is not a 'student:teacher' pair of integers. Write the map as "
                f"one of {', '.join(LAYER_MAP_KEYWORDS)}, or as comma-separated pairs such as '0:1,1:3'."
            )


def uniform_layer_map(num_student_layers: int, num_teacher_layers: int) -> list[tuple[int, int]]:
    """Student layer ``i`` -> teacher layer ``round((i + 1) * L_t / L_s) - 1``, rounded half up."""
    return [(i, int(math.floor((i + 1) * num_teacher_layers / num_student_layers + 0.5)) - 1)
            for i in range(num_student_layers)]


def resolve_layer_map(spec: str, num_student_layers: int, num_teacher_layers: int, *,
                      student_teacher_layers: list[int] | None = None, name: str = "layer map") -> list[tuple[int, int]]:
    """Turn ``spec`` into validated ``(student, teacher)`` pairs for these depths.

    Args:
        spec: a keyword or explicit pairs (see the module docstring).
        num_student_layers / num_teacher_layers: decoder depths of the two models.
        student_teacher_layers: the student's ``config.kd_llm_teacher_layers`` (needed by ``teacher_layers``).
        name: the config field, named in errors.
    Raises:
        LayerMapError: unknown syntax, an index out of range, a repeated pair, or ``teacher_layers`` for a student
            that was not pruned from this teacher.
    """
    check_layer_map_syntax(spec, name)
    spec = spec.strip()
    if num_student_layers < 1 or num_teacher_layers < 1:
        raise LayerMapError(f"{name}: both models need decoder layers (student {num_student_layers}, teacher "
                            f"{num_teacher_layers}).")
    if spec == "uniform":
        return uniform_layer_map(num_student_layers, num_teacher_layers)
    if spec == "last":
        return [(num_student_layers - 1, num_teacher_layers - 1)]
    if spec == "teacher_layers":
        if student_teacher_layers is None:
            raise LayerMapError(
                f"{name}=teacher_layers needs a student pruned from the teacher (its config records "
                "kd_llm_teacher_layers); this student has no such record. Use uniform, last or explicit pairs."
            )
        if len(student_teacher_layers) != num_student_layers:
            raise LayerMapError(
                f"{name}=teacher_layers: the student's config.kd_llm_teacher_layers lists "
                f"{len(student_teacher_layers)} layers but the student has {num_student_layers}."
            )
        pairs = list(enumerate(int(t) for t in student_teacher_layers))
    else:
        pairs = [tuple(int(x) for x in _PAIR.match(part).groups()) for part in spec.split(",")]

    resolved = []
    for student, teacher in pairs:
        s = student + num_student_layers if student < 0 else student
        t = teacher + num_teacher_layers if teacher < 0 else teacher
        problems = []
        if not 0 <= s < num_student_layers:
            problems.append(f"student layer {student} is out of range (the student has layers "
                            f"0..{num_student_layers - 1})")
        if not 0 <= t < num_teacher_layers:
            problems.append(f"teacher layer {teacher} is out of range (the teacher has layers "
                            f"0..{num_teacher_layers - 1})")
        if problems:
            hint = (" The student's recorded teacher layers do not fit this teacher: was it pruned from another "
                    "model?") if spec == "teacher_layers" else ""
            raise LayerMapError(f"{name} {spec!r}: " + "; ".join(problems) + "." + hint)
        resolved.append((s, t))
    repeated = sorted({pair for pair in resolved if resolved.count(pair) > 1})
    if repeated:
        raise LayerMapError(f"{name} {spec!r} names the pair(s) {repeated} more than once.")
    return resolved
