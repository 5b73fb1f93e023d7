"""A side-process teacher that ships final hidden states (``TeacherProcess(..., hidden_states=True)``) as a target:
``d`` numbers per position cross the process boundary instead of ``V`` logits, and the training process applies the
lm_head the child sent at start-up in the fused, chunked loss, for dataset and on-policy batches alike. Its dense
twin (evaluation with ``compute_metrics``) asks the same process for logits."""

from __future__ import annotations

from torch import nn

from kd_llm.training.targets.live import LiveHead
from kd_llm.training.targets.side_process import SideProcess


class SideProcessHidden(LiveHead):
    """:class:`~kd_llm.training.targets.live.LiveHead` on the proxy: its forward with the fused arguments returns
    the hidden states, its ``get_output_embeddings()`` / ``config`` the head and soft cap it reported."""

    writes_completions = False  # the proxy scores sequences; it cannot generate (seq_kd)

    def __init__(self, student: nn.Module, teacher):
        super().__init__(student, teacher, teacher)
        self.name = "side-process teacher hidden states (fused)"
        self.writes_completions = False
        self.logits_twin = SideProcess(teacher)
