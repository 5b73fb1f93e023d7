"""The target protocol: what one batch is (:class:`KDBatch`), what the loss is asked for (:class:`LossRequest`), and
:class:`TeacherTarget`, one way the teacher's signal reaches the loss, with its capabilities declared."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from kd_llm.data.packing import PACKED_EXAMPLE_KEY
from kd_llm.losses import LossComponents
# Set on a micro-batch whose completions were generated (by the student: on-policy; by the teacher: seq_kd).
from kd_llm.training.on_policy import COMPLETION_SOURCE_KEY

# The row index of each training example, added to the dataset by the trainer when stored targets (precomputed
# logits or an on-disk teacher cache) are looked up by example; passed through by the collator.
EXAMPLE_INDEX_COLUMN = "kd_example_index"
# Columns a target reads besides the models' inputs start with this (kd_llm.cross_tokenizer.data's kd_teacher_*).
SIDE_INPUT_PREFIX = "kd_"


@dataclass
class KDBatch:
    """One micro-batch, split once from Trainer's inputs: what the models take, and what the targets read."""

    inputs: dict  # input_ids, attention_mask, ... (what the models' forward takes)
    shifted_labels: Tensor  # labels[:, 1:]: the token each position predicts, -100 where unsupervised
    # Rows of the training set (stored targets), one per example in the collator's order (packed batches: the
    # entry packed_example_ids points at); None on other data.
    example_index: Tensor | None = None
    completion_source: str | None = None  # None: the dataset's completion; "student" (on-policy) or "teacher" (seq_kd)
    teacher_outputs: object = None  # the live teacher's outputs, when the feature terms already ran it on the batch
    packed_example_ids: Tensor | None = None  # packed batches (kd_llm.data.packing): each token's example, or -1
    side_inputs: dict = field(default_factory=dict)  # other kd_* columns, for a target (e.g. the teacher's own ids)

    @classmethod
    def pop_from(cls, inputs: dict) -> KDBatch:
        """Pop the labels and kd_llm's bookkeeping keys out of ``inputs``; what stays is the models' input. Every
        other ``kd_*`` key (a target's side inputs) is popped too, so the student's forward never sees it."""
        example_index = inputs.pop(EXAMPLE_INDEX_COLUMN, None)
        completion_source = inputs.pop(COMPLETION_SOURCE_KEY, None)
        packed_example_ids = inputs.pop(PACKED_EXAMPLE_KEY, None)  # never a model input
        labels = inputs.pop("labels")
        side_inputs = {key: inputs.pop(key) for key in [k for k in inputs if k.startswith(SIDE_INPUT_PREFIX)]}
        return cls(inputs, labels[:, 1:], example_index, completion_source, packed_example_ids=packed_example_ids,
                   side_inputs=side_inputs)

    @property
    def generated(self) -> bool:
        return self.completion_source is not None


@dataclass(frozen=True)
class LossRequest:
    """Everything a target needs for the loss besides the batch (the settings of this step)."""

    alpha: float  # cross-entropy weight of this batch (0 on the student's own samples)
    temperature: float  # this step's temperature (schedules move it)
    num_items_in_batch: object  # supervised tokens of the whole accumulated batch, or None
    loss: str = "forward_kl"
    beta: float = 0.5
    skew: float = 0.1
    kd_vocab_size: int | None = None  # shared vocabulary of teacher and student (padded embeddings cut off)
    chunk_size: int | None = None  # tokens per chunk of the fused losses (None: their default)

    @property
    def objective_kwargs(self) -> dict:
        return dict(alpha=self.alpha, loss=self.loss, temperature=self.temperature, beta=self.beta, skew=self.skew,
                    num_items_in_batch=self.num_items_in_batch)


class TargetCannotServe(RuntimeError):
    """A batch reached a target that declared it cannot serve that kind of batch."""


class TeacherTarget:
    """One way the distillation target reaches the loss. Chosen once, when the trainer is built
    (:func:`kd_llm.training.targets.choose.choose_target`); never re-derived per batch.

    Capabilities are declared as class (or instance) attributes, never inferred from which methods a trainer
    overrides:

    - ``fused``: the loss reads final hidden states and lm_head weights (no ``[B, T, V]`` student logits);
    - ``student_forward_kwargs``: the extra keyword arguments of the student's forward for this target;
    - ``serves_dataset`` / ``serves_evaluation`` / ``scores_generated``: which batches it can serve (training
      batches of the dataset's completions, evaluation batches, and batches whose completions were generated);
    - ``writes_completions``: a teacher that can generate seq_kd completions stands behind it;
    - ``logits_twin``: for a fused target, the dense target to use when the caller needs the student's logits
      (evaluation with ``compute_metrics``).
    """

    name: str = "teacher target"
    fused: bool = False
    student_forward_kwargs: dict = {}
    serves_dataset: bool = True
    serves_evaluation: bool = True
    scores_generated: bool = True
    writes_completions: bool = False
    logits_twin: TeacherTarget | None = None

    def serves(self, batch: KDBatch, *, training: bool) -> bool:
        if batch.generated:
            return self.scores_generated
        return self.serves_dataset if training else self.serves_evaluation

    def for_batch(self, batch: KDBatch, *, training: bool, needs_logits: bool = False) -> TeacherTarget:
        """The target that serves ``batch`` (itself, unless it routes or must hand over to its logits twin)."""
        if not self.serves(batch, training=training):
            kind = ("generated" if batch.generated else "training") if training or batch.generated else "evaluation"
            raise TargetCannotServe(f"{self.name} cannot serve {kind} batches, and no other teacher target was "
                                    "given for them (pass a teacher_model).")
        if needs_logits and self.fused:
            if self.logits_twin is None:
                raise TargetCannotServe(f"{self.name} computes the loss without the student's logits, which this "
                                        "batch needs (compute_metrics): set fused_loss=false.")
            return self.logits_twin.for_batch(batch, training=training, needs_logits=True)
        return self

    def terms(self, student_outputs, batch: KDBatch, request: LossRequest) -> LossComponents:
        """The loss components of ``batch`` from the student's forward outputs (run with
        ``student_forward_kwargs``); positions aligned with ``batch.shifted_labels``."""
        raise NotImplementedError

    def describe(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"<{type(self).__name__}: {self.describe()}>"


def student_logits(student_outputs) -> Tensor:
    """The student's logits aligned with the shifted labels (``[B, T-1, V]``)."""
    return student_outputs.logits[:, :-1]
