"""Hidden-state distillation: per-token losses between student and teacher layer outputs, and the learned
projections that bring the student's width to the teacher's.

The projections belong to the distillation, not to the student: they are trained with it (the trainer puts them in the
optimizer) but are never part of the student's model files. The trainer keeps them beside each checkpoint in
``distillation_projections.safetensors`` (:data:`PROJECTIONS_FILE`), so a resumed run continues with them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

HIDDEN_LOSSES = ("mse", "cosine", "normalized_mse")
PROJECTION_MODES = ("auto", "always")
PROJECTION_INITS = ("xavier", "identity", "zero")
PROJECTIONS_FILE = "distillation_projections.safetensors"


def hidden_state_loss(student: Tensor, teacher: Tensor, loss: str = "mse", eps: float = 1e-6) -> Tensor:
    """Per-token loss ``[N]`` between ``student`` and ``teacher`` ``[N, D]`` (already at the same width), float32.

    - ``mse``: mean over the D features of the squared difference;
    - ``cosine``: ``1 - cos(student, teacher)`` (direction only);
    - ``normalized_mse``: ``||student - teacher||^2 / ||teacher||^2``, the squared error relative to the teacher
      token's own norm. LLM residual streams grow with depth and carry a few huge outlier tokens (the first token's
      "massive activations"), which dominate plain MSE; relative to each token's norm every token counts alike.
    """
    if loss not in HIDDEN_LOSSES:
        raise ValueError(f"hidden_loss must be one of {HIDDEN_LOSSES}, got {loss!r}.")
    if student.shape != teacher.shape:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} states differ in shape; "
                         "project the student first.")
    student, teacher = student.float(), teacher.float()
    if loss == "mse":
        return (student - teacher).square().mean(-1)
    if loss == "cosine":
        return 1 - torch.nn.functional.cosine_similarity(student, teacher, dim=-1, eps=eps)
    return (student - teacher).square().sum(-1) / teacher.square().sum(-1).clamp_min(eps)


def _key(student_layer: int, teacher_layer: int) -> str:
    return f"student{student_layer}_teacher{teacher_layer}"


class HiddenStateProjections(nn.Module):
    """One ``Linear(student_width, teacher_width, bias=False)`` per mapped layer pair, or none where the widths are
    equal and ``mode="auto"`` (the states are then compared directly).

    Args:
        pairs: ``(student_layer, teacher_layer)`` pairs.
        student_width / teacher_width: hidden sizes.
        mode: ``auto`` (project only when widths differ) or ``always``.
        init: ``xavier`` (uniform Glorot), ``identity`` (only for equal widths: start from "student state = teacher
            state") or ``zero`` (start from no prediction at all; the student gets gradients once the projection has
            moved).
    """

    def __init__(self, pairs, student_width: int, teacher_width: int, *, mode: str = "auto", init: str = "xavier"):
        super().__init__()
        if mode not in PROJECTION_MODES:
            raise ValueError(f"hidden_projection must be one of {PROJECTION_MODES}, got {mode!r}.")
        if init not in PROJECTION_INITS:
            raise ValueError(f"hidden_projection_init must be one of {PROJECTION_INITS}, got {init!r}.")
        self.student_width, self.teacher_width = student_width, teacher_width
        project = mode == "always" or student_width != teacher_width
        if project and init == "identity" and student_width != teacher_width:
            raise ValueError(
                f"hidden_projection_init=identity needs equal widths, but the student is {student_width} wide and the "
                f"teacher {teacher_width}. Use xavier or zero."
            )
        self.layers = nn.ModuleDict()
        if project:
            for student_layer, teacher_layer in pairs:
                linear = nn.Linear(student_width, teacher_width, bias=False)
                with torch.no_grad():
                    if init == "xavier":
                        nn.init.xavier_uniform_(linear.weight)
                    elif init == "identity":
                        nn.init.eye_(linear.weight)
                    else:
                        nn.init.zeros_(linear.weight)
                self.layers[_key(student_layer, teacher_layer)] = linear

    def forward(self, states: Tensor, student_layer: int, teacher_layer: int) -> Tensor:
        key = _key(student_layer, teacher_layer)
        if key not in self.layers:
            return states
        linear = self.layers[key]
        return linear(states.to(linear.weight.dtype))

    # ---- kept beside checkpoints, never inside the student's files ----

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / PROJECTIONS_FILE
        tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in self.state_dict().items()}
        metadata = {"format": "pt", "kd_llm": json.dumps({"student_width": self.student_width,
                                                          "teacher_width": self.teacher_width})}
        save_file(tensors, str(path), metadata=metadata)
        return path

    def load(self, folder: str | Path) -> None:
        """Restore the weights saved by :meth:`save` in ``folder``; a missing file or a different layout is an error
        (resuming with fresh projections would silently restart part of the objective)."""
        path = Path(folder) / PROJECTIONS_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing: this run trains hidden-state projections, but the checkpoint has none. Resume "
                "from a checkpoint written with the same hidden-state settings, or start a new run."
            )
        saved = load_file(str(path))
        expected = {name: tuple(t.shape) for name, t in self.state_dict().items()}
        found = {name: tuple(t.shape) for name, t in saved.items()}
        if expected != found:
            raise ValueError(f"{path} holds projections {found}, but this run uses {expected}: the checkpoint was "
                             "written with another layer map, projection setting or model width.")
        with torch.no_grad():
            for name, tensor in self.state_dict().items():
                tensor.copy_(saved[name].to(tensor.device, tensor.dtype))
