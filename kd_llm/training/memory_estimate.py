"""How much memory one training process will need, estimated before launch, and a warning when the device is short.

The estimate counts, per process:

- weights: every student and teacher parameter at its dtype (Accelerate's mixed precision keeps float32 master
  weights and casts in the forward pass, so a float32 student stays 4 bytes a parameter under bf16);
- gradients and AdamW states: one gradient and two moments (``exp_avg``, ``exp_avg_sq``) per trainable student
  parameter, at its dtype;
- student activations kept for the backward pass, for a Llama-style decoder layer per token
  (``ACTIVATION_VALUES_PER_TOKEN``): ``6 h + 2 kv + 4 i`` values (h the width, kv the key/value width, i the MLP
  width), in the compute dtype (2 bytes under bf16/fp16 autocast). With gradient checkpointing: each layer's input,
  plus one layer recomputed. SDPA / flash attention keep no ``T x T`` score matrix;
- teacher activations: run under ``no_grad``, so one layer's working set at a time;
- logits, the dominant term at large vocabularies. Dense path: ``[B, T, V]`` float32 buffers (Accelerate returns
  the models' outputs in float32 and the loss works in float32): ``DENSE_STUDENT_BUFFERS`` for the student and
  ``DENSE_TEACHER_BUFFERS`` for the teacher when a distillation term is on. Fused, chunked path
  (``fused_loss``, kd_llm.losses.fused): the same buffers for ``loss_chunk_size`` rows only, plus both models' final
  hidden states, the student's hidden-state gradient and a float32 lm_head weight gradient.

Under FSDP or DeepSpeed ZeRO-3 the weights, gradients and optimizer states (and the teacher's weights) are divided
by the number of processes; ZeRO-1 divides optimizer states, ZeRO-2 gradients as well.

It is an estimate: allocator fragmentation, temporary buffers of individual kernels and the CUDA context (~0.5 GiB)
are not counted, and every sequence is taken at the longest length, every position as supervised.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from kd_llm.data.formatting import supervised_token_count
from kd_llm.losses.fused import default_chunk_rows
from kd_llm.training.rules import RunShape, loss_path

GIB = 1024**3
# Values per token kept for backward by one decoder layer, as multiples of (hidden, kv width, intermediate):
# attention: norm input and output, q and k after RoPE, v, attention output  -> 4 h + 2 kv
# MLP: norm input and output, gate and up projections, SiLU(gate), their product  -> 2 h + 4 i
ACTIVATION_VALUES_PER_TOKEN = (6, 2, 4)
# Float32 [rows, V] buffers alive at the loss's peak. Student: its logits, the gradient of the logits, the
# supervised rows gathered, log-probs at T (distillation) and at T=1 (cross-entropy). Teacher: its logits, the
# supervised rows gathered, log-probs and probabilities at T.
DENSE_STUDENT_BUFFERS = {"base": 3, "ce": 1, "kd": 1}
DENSE_TEACHER_BUFFERS = 4
# The fused path never gathers: per chunk the student has its logits and their gradient (+ log-probs per term),
# the teacher its logits, log-probs and probabilities.
FUSED_STUDENT_BUFFERS = {"base": 2, "ce": 1, "kd": 1}
FUSED_TEACHER_BUFFERS = 3


class MemoryEstimateWarning(UserWarning):
    """The estimated memory of a training process exceeds what its device has."""


class UnknownShapeError(ValueError):
    """A config without a width the estimate needs: the estimate is reported as unknown and training goes on."""


def _config_value(config, name: str, required: bool = False):
    value = getattr(config, name, None)  # PretrainedConfig.__getattribute__ applies attribute_map
    if required and not isinstance(value, int):
        raise UnknownShapeError(f"{type(config).__name__} has no {name}")
    return value


def _intermediate_size(config, hidden: int) -> int:
    """The MLP width under the names transformers' configs use; GPT-2-style configs mean 4 x hidden by n_inner
    None."""
    for name in ("intermediate_size", "n_inner", "ffn_dim", "d_ff", "ffn_hidden_size"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    if hasattr(config, "n_inner"):  # GPT-2, GPT-J, ...: None stands for 4 x n_embd
        return 4 * hidden
    raise UnknownShapeError(f"{type(config).__name__} names no MLP width (intermediate_size)")


@dataclass(frozen=True)
class ModelShape:
    parameters: int
    trainable_parameters: int
    parameter_bytes: int  # all parameters at their dtypes
    trainable_bytes: int  # trainable parameters at their dtypes
    hidden_size: int
    kv_size: int
    intermediate_size: int
    num_layers: int
    vocab_size: int

    @classmethod
    def of(cls, model: nn.Module) -> ModelShape:
        """Counts from the parameters themselves (works on the meta device); widths from the (text) config."""
        config = model.config
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        # Standard names resolve through each config's attribute_map (GPT-2: n_embd, n_head, n_layer).
        hidden, heads, layers, vocab = (_config_value(text, name, required=True) for name in (
            "hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size"))
        head_dim = _config_value(text, "head_dim") or hidden // heads
        kv_heads = _config_value(text, "num_key_value_heads") or heads
        intermediate = _intermediate_size(text, hidden)
        unique = {id(p): p for p in model.parameters()}.values()  # tied weights once
        trainable = [p for p in unique if p.requires_grad]
        return cls(
            parameters=sum(p.numel() for p in unique),
            trainable_parameters=sum(p.numel() for p in trainable),
            parameter_bytes=sum(p.numel() * p.element_size() for p in unique),
            trainable_bytes=sum(p.numel() * p.element_size() for p in trainable),
            hidden_size=hidden, kv_size=kv_heads * head_dim, intermediate_size=intermediate,
            num_layers=layers, vocab_size=vocab,
        )

    def layer_values_per_token(self) -> int:
        a, b, c = ACTIVATION_VALUES_PER_TOKEN
        return a * self.hidden_size + b * self.kv_size + c * self.intermediate_size


@dataclass
class MemoryEstimate:
    """Bytes per training process, by item. ``total`` is their sum."""

    items: dict[str, int]
    loss_path: str
    precision: str
    tokens: int  # batch x sequence length of one micro-batch
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.items.values())

    def format(self) -> str:
        width = max(len(name) for name in self.items)
        precision = "float32" if self.precision == "no" else f"{self.precision} autocast"
        lines = [f"Memory estimate per process ({precision}, {self.loss_path} loss, {self.tokens:,} tokens "
                 "per micro-batch):"]
        lines += [f"  {name.ljust(width)}  {value / GIB:9.3f} GiB" for name, value in self.items.items()]
        lines.append(f"  {'total'.ljust(width)}  {self.total / GIB:9.3f} GiB")
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


def estimate_memory(student: nn.Module, teacher: nn.Module | None, *, batch_size: int, sequence_length: int,
                    precision: str = "no", alpha: float = 0.5, loss_path: str = "dense", chunk_rows: int = 0,
                    gradient_checkpointing: bool = False, shard_degree: int = 1, zero_stage: int | None = None,
                    cached_teacher_tokens: int = 0, teacher_cache: bool = False) -> MemoryEstimate:
    """Estimate one training process's memory. ``shard_degree``: processes that FSDP or DeepSpeed shard over (1: no
    sharding); ``zero_stage``: DeepSpeed's ZeRO stage (None: FSDP when ``shard_degree > 1``, which shards all);
    ``cached_teacher_tokens``: supervised tokens whose float32 teacher logits ``precompute_teacher_logits`` keeps;
    ``teacher_cache``: the KD term reads stored top-k targets (pass ``teacher=None`` when no teacher is loaded)."""
    if precision not in ("no", "bf16", "fp16"):
        raise ValueError(f"precision must be 'no', 'bf16' or 'fp16', got {precision!r}.")
    if loss_path not in ("dense", "fused"):
        raise ValueError(f"loss_path must be 'dense' or 'fused', got {loss_path!r}.")
    if batch_size < 1 or sequence_length < 1 or shard_degree < 1:
        raise ValueError("batch_size, sequence_length and shard_degree must be at least 1.")
    s = ModelShape.of(student)
    t = ModelShape.of(teacher) if teacher is not None else None
    has_kd = alpha < 1 and (t is not None or teacher_cache)
    uses_teacher = t is not None and alpha < 1 and not teacher_cache  # live teacher logits
    tokens = batch_size * sequence_length
    stage = 3 if zero_stage is None else zero_stage
    shard = lambda stages: shard_degree if stage in stages else 1  # noqa: E731

    def compute_bytes(shape: ModelShape) -> int:  # autocast computes in 16 bits, else at the weights' dtype
        return 2 if precision != "no" else max(1, shape.parameter_bytes // max(shape.parameters, 1))

    items = {
        "student weights": s.parameter_bytes // shard((3,)),
        "student gradients": s.trainable_bytes // shard((2, 3)),
        "AdamW states": 2 * s.trainable_bytes // shard((1, 2, 3)),
    }
    layer = s.layer_values_per_token()
    kept_layers = (s.num_layers * s.hidden_size + layer) if gradient_checkpointing else s.num_layers * layer
    items["student activations"] = tokens * (kept_layers + 2 * s.hidden_size) * compute_bytes(s)

    terms = ["base"] + (["ce"] if alpha > 0 else []) + (["kd"] if has_kd else [])
    if loss_path == "dense":
        items["student logits"] = tokens * s.vocab_size * 4 * sum(DENSE_STUDENT_BUFFERS[k] for k in terms)
        items["teacher logits"] = tokens * t.vocab_size * 4 * DENSE_TEACHER_BUFFERS if uses_teacher else 0
    else:
        rows = min(tokens, chunk_rows or default_chunk_rows(s.vocab_size))  # the fused loss's own default
        # Final hidden states (float32 from Accelerate) and their gradient, plus the lm_head weight gradient.
        items["student logits"] = (rows * s.vocab_size * 4 * sum(FUSED_STUDENT_BUFFERS[k] for k in terms)
                                   + 2 * tokens * s.hidden_size * 4 + s.vocab_size * s.hidden_size * 4)
        items["teacher logits"] = (rows * t.vocab_size * 4 * FUSED_TEACHER_BUFFERS + tokens * t.hidden_size * 4
                                   if uses_teacher else 0)
    if t is not None:
        items["teacher weights"] = t.parameter_bytes // shard((3,))
        items["teacher activations"] = tokens * (t.layer_values_per_token() + 2 * t.hidden_size) * compute_bytes(t)
        if cached_teacher_tokens:
            items["teacher logit cache"] = cached_teacher_tokens * t.vocab_size * 4
    notes = []
    if shard_degree > 1:
        notes.append(f"{'FSDP' if zero_stage is None else f'ZeRO-{stage}'} over {shard_degree} processes")
    if gradient_checkpointing:
        notes.append("gradient checkpointing: one layer's activations recomputed at a time")
    return MemoryEstimate(items=items, loss_path=loss_path, precision=precision, tokens=tokens, notes=notes)


# ---------------------------------------------------------------------------------------- device and launch setup


def device_capacity(use_cpu: bool) -> tuple[int, str]:
    """Bytes this process may use, and what they are: the GPU's total memory, or the RAM available now."""
    if not use_cpu and torch.cuda.is_available():
        index = int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count()
        properties = torch.cuda.get_device_properties(index)
        return properties.total_memory, f"GPU {index} ({properties.name})"
    import psutil  # a dependency of accelerate

    return psutil.virtual_memory().available, "available RAM"


def launch_sharding() -> tuple[int, int | None]:
    """(shard degree, ZeRO stage) of the current ``accelerate launch``, from the environment it sets."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return world, int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", 2))
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return world, None
    return 1, None


def launch_precision(config) -> str:
    """bf16/fp16 from the training arguments, else what ``accelerate launch`` was given."""
    if config.bf16:
        return "bf16"
    if config.fp16:
        return "fp16"
    return os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower().replace("fp32", "no")


def estimate_for_run(student: nn.Module, teacher: nn.Module | None, config, *, sequence_length: int,
                     cached_teacher_tokens: int = 0, shape: RunShape | None = None) -> MemoryEstimate:
    """The estimate for a DistillationConfig as it will be launched (precision, sharding, loss path). ``shape``:
    the run's mode and teacher source (kd_llm.training.rules); its sharding is taken from the launch."""
    shard_degree, zero_stage = launch_sharding()
    shape = dataclasses.replace(shape or RunShape(), sharded=shard_degree > 1)
    path = loss_path(config, shape)  # the rule book the trainer's target chooser asks too
    packing = getattr(config, "packing", False)
    if packing:  # at most one row per example, each at most packing_max_length (0: the longest example) long
        sequence_length = max(sequence_length, getattr(config, "packing_max_length", 0) or 0)
    estimate = estimate_memory(
        student, teacher, batch_size=config.per_device_train_batch_size, sequence_length=sequence_length,
        precision=launch_precision(config), alpha=config.alpha, loss_path=path.path,
        chunk_rows=getattr(config, "loss_chunk_size", 0) or 0, gradient_checkpointing=config.gradient_checkpointing,
        shard_degree=shard_degree, zero_stage=zero_stage, cached_teacher_tokens=cached_teacher_tokens,
        teacher_cache=bool(getattr(config, "teacher_cache", None)),
    )
    if path.note:
        estimate.notes.append(path.note)
    if packing:
        estimate.notes.append(f"packing: bounded by {config.per_device_train_batch_size} rows of {sequence_length} "
                              "tokens; packed micro-batches usually hold fewer rows")
    if getattr(config, "teacher_cache", None):
        stored = ("stored teacher hidden states and the teacher's lm_head (V x d, not counted here)"
                  if getattr(config, "teacher_cache_format", "top_k") == "hidden_states" else "stored top-k targets")
        estimate.notes.append(f"teacher_cache: the KD term reads {stored}"
                              + ("" if teacher is not None else "; no teacher in memory"))
    return estimate


def warn_if_too_large(estimate: MemoryEstimate, capacity: int, device: str, *, processes_sharing: int = 1) -> bool:
    """Warn (MemoryEstimateWarning) when ``processes_sharing`` processes of this estimate exceed ``capacity``."""
    needed = estimate.total * processes_sharing
    if needed <= capacity:
        return False
    sharing = f" for {processes_sharing} processes" if processes_sharing > 1 else ""
    warnings.warn(
        f"The estimated training memory{sharing} ({needed / GIB:.2f} GiB) exceeds the {device}'s "
        f"{capacity / GIB:.2f} GiB. Lower per_device_train_batch_size or max_length, use fused_loss, "
        "gradient_checkpointing or bf16, or shard with configs/accelerate/fsdp.yaml.",
        MemoryEstimateWarning, stacklevel=2,
    )
    return True


def longest_sequence(dataset) -> int:
    """Tokens in the longest example of a tokenized dataset (its ``length`` column when it has one)."""
    lengths = dataset["length"] if "length" in dataset.column_names else [len(x) for x in dataset["input_ids"]]
    return max(lengths)


def report_memory_estimate(student: nn.Module, teacher: nn.Module | None, config, train_dataset, *,
                           max_length: int | None = None, print_fn=print,
                           shape: RunShape | None = None) -> MemoryEstimate | None:
    """Print the estimate for training on ``train_dataset`` (main process only) and warn when it exceeds the
    device. Sequences are taken at the dataset's longest, or at ``max_length`` when given (data not built yet).
    ``shape``: the run's mode and teacher source, for the loss path (kd_llm.training.rules)."""
    cached = supervised_token_count(train_dataset) if config.precompute_teacher_logits and teacher is not None else 0
    try:
        estimate = estimate_for_run(student, teacher, config,
                                    sequence_length=max_length or longest_sequence(train_dataset),
                                    cached_teacher_tokens=cached, shape=shape)
    except UnknownShapeError as error:  # an estimate is advice: say so, and train anyway
        if config.process_index == 0:
            print_fn(f"Memory estimate per process: unknown ({error}).")
        return None
    if config.process_index == 0:
        capacity, device = device_capacity(config.use_cpu)
        print_fn(estimate.format() + f"\n  device: {device}, {capacity / GIB:.2f} GiB")
        on_cpu = config.use_cpu or not torch.cuda.is_available()
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", 1)) if on_cpu else 1  # CPU processes share RAM
        warn_if_too_large(estimate, capacity, device, processes_sharing=local_processes)
    return estimate

