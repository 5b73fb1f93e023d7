"""``DistillationConfig``: ``TrainingArguments`` plus the distillation settings, validated in ``__post_init__``."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from kd_llm.data.packing import OVERLONG_CHOICES
from kd_llm.errors import ConfigError
from kd_llm.features.settings import feature_config_problems
from kd_llm.losses import DIVERGENCES
from kd_llm.serving.settings import served_teacher_config_problems
from kd_llm.training.argument_checks import training_arguments_problems
from kd_llm.training.rules import config_problems
from kd_llm.training.schedules import TEMPERATURE_SCHEDULES


@dataclass
class DistillationConfig(TrainingArguments):
    """Training arguments for :class:`kd_llm.DistillationTrainer`.

    The objective is ``alpha * CE(student, labels) + (1 - alpha) * T^2 * D(teacher_T || student_T)`` plus
    ``l2_weight * ||student weights||^2``, every term summed over supervised tokens and divided by the number of
    supervised tokens in the whole accumulated batch, so gradient accumulation does not change the result.
    """

    alpha: float = field(
        default=0.5,
        metadata={"help": "Weight of the hard-label cross-entropy; the distillation term gets 1 - alpha. In [0, 1]."},
    )
    temperature: float = field(
        default=2.0, metadata={"help": "Softmax temperature T of teacher and student in the distillation term (> 0)."}
    )
    final_temperature: float | None = field(
        default=None,
        metadata={"help": "Temperature at the last step for the linear/cosine schedules. Defaults to `temperature`."},
    )
    temperature_schedule: str = field(
        default="constant",
        metadata={"help": f"How T moves over training: one of {', '.join(TEMPERATURE_SCHEDULES)}."},
    )
    distillation_loss: str = field(
        default="forward_kl",
        metadata={"help": f"Per-token divergence between teacher and student: one of {', '.join(DIVERGENCES)}."},
    )
    beta: float = field(
        default=0.5, metadata={"help": "Interpolation weight of the generalised JSD (`jsd` loss), in (0, 1)."}
    )
    skew: float = field(
        default=0.1, metadata={"help": "Skew s of `skew_forward_kl` / `skew_reverse_kl`, in (0, 1)."}
    )
    l2_weight: float = field(
        default=0.0, metadata={"help": "Weight of an L2 penalty on the student's trainable weights (>= 0)."}
    )
    precompute_teacher_logits: bool = field(
        default=False,
        metadata={
            "help": "Run the teacher once over the training set before training and keep its logits in memory, "
            "so each step costs no teacher forward. Pays when the data is small and is seen for several epochs."
        },
    )
    teacher_cache: str | None = field(
        default=None,
        metadata={"help": "Folder of an offline teacher cache (built by scripts/cache_teacher.py: top-k "
                          "log-probabilities and tail mass per supervised token). Training batches then need no "
                          "teacher in memory; the cache is checked against the tokenizer and training data first."},
    )
    teacher_cache_format: str = field(
        default="top_k",
        metadata={"help": "What the teacher_cache holds (scripts/cache_teacher.py writes this format): top_k (the k "
                          "most likely tokens and a tail mass per supervised token: smallest, lossy in the tail) or "
                          "hidden_states (the teacher's final hidden state: exact with its lm_head, at any "
                          "temperature and divergence; 2 * hidden_size bytes per token in float16)."},
    )
    teacher_cache_tail_mode: str = field(
        default="tail_bucket",
        metadata={"help": "How the distillation term treats the teacher mass outside the cached top-k: tail_bucket "
                          "(one extra outcome; training temperature must equal the cache's) or renormalise (both "
                          "renormalised over the top-k ids; any temperature). See kd_llm.losses.sparse."},
    )
    # A served teacher (kd_llm.serving): its top-k reaches the sparse loss over HTTP; checked in serving.settings.
    teacher_url: str | None = field(
        default=None,
        metadata={"help": "A served teacher: URL of scripts/serve_teacher.py or of a vLLM server (http://host:port); "
                          "comma-separated URLs are replicas of one teacher. Its top-k log-probabilities serve the "
                          "sparse loss (tail per teacher_cache_tail_mode). Token: env KD_LLM_TEACHER_TOKEN."},
    )
    teacher_routes: dict | str | None = field(
        default=None,
        metadata={"help": "Several served teachers, one per example: a mapping teacher_id -> URL(s) (JSON on the "
                          "command line); each example's teacher_route_column names its teacher."},
    )
    teacher_route_column: str = field(default="teacher_id",
                                      metadata={"help": "With teacher_routes: the column naming each example's "
                                                        "teacher."})
    teacher_top_k: int = field(default=64, metadata={"help": "Served teacher: top-k log-probabilities per position "
                                                             "(vLLM needs --max-logprobs >= k)."})
    teacher_protocol: str = field(default="auto", metadata={"help": "Served teacher: auto, kd_llm or vllm."})
    teacher_timeout: float = field(default=60.0, metadata={"help": "Served teacher: seconds per request."})
    teacher_retries: int = field(default=5, metadata={"help": "Served teacher: transient failures tolerated per "
                                                              "request (backoff doubles) before the run stops with "
                                                              "a checkpoint."})
    teacher_retry_backoff: float = field(default=0.5, metadata={"help": "Served teacher: first backoff, seconds."})
    teacher_parity_reference: str | None = field(
        default=None,
        metadata={"help": "Served teacher: a local copy (model spec or teacher-cache folder) whose signal on a probe "
                          "batch is compared with the served one before training (default: the teacher_model passed "
                          "to the trainer, if any)."},
    )
    teacher_parity_examples: int = field(default=4, metadata={"help": "Served teacher: probe batch size of the "
                                                                      "parity check (0: no check)."})
    teacher_parity_max_tvd: float = field(
        default=0.02,
        metadata={"help": "Served teacher: refuse to train when the mean total-variation distance per position "
                          "between the served and the reference top-k exceeds this."},
    )
    lmbda: float = field(
        default=0.0,
        metadata={
            "help": "On-policy distillation (GKD): the fraction of micro-batches whose completions the student "
            "samples itself, scored by the live teacher (no cross-entropy on the student's own tokens; the "
            "distillation term keeps its 1 - alpha weight). Which micro-batches is a seeded draw from (seed, step, micro-batch), so resume "
            "reproduces it. In [0, 1]; 0 is off."
        },
    )
    seq_kd: bool = field(
        default=False,
        metadata={
            "help": "Sequence-level KD (Kim & Rush 2016): the teacher writes the completion of every micro-batch that "
            "is not on-policy, and the student trains on it (cross-entropy and token-level KD as usual)."
        },
    )
    seq_kd_decoding: str = field(
        default="greedy",
        metadata={"help": "How the teacher writes seq_kd targets: greedy (each prompt generated once, then reused) "
                          "or sample (at generation_temperature, fresh every time)."},
    )
    generation_max_new_tokens: int = field(
        default=128,
        metadata={"help": "Longest completion the student (lmbda) or teacher (seq_kd) generates during training; "
                          "one that reaches it is kept without an EOS. >= 1."},
    )
    generation_buffer: int = field(
        default=0,
        metadata={"help": "On-policy / seq_kd generation buffer: micro-batches whose completions one generate call "
                          "writes. 0: all of the optimizer step's (one call per model and step); 1: one call per "
                          "micro-batch; n: n at a time, to bound generation memory. Each micro-batch still samples "
                          "from its own seed, so the samples do not depend on it. >= 0."},
    )
    generation_temperature: float = field(
        default=1.0,
        metadata={"help": "Sampling temperature of on-policy (and seq_kd=sample) generation, separate from the loss "
                          "temperature; sampling is otherwise untruncated (no top-k/top-p). > 0."},
    )
    # Feature-level distillation (kd_llm.features): hidden states and attention maps of mapped layers.
    hidden_weight: float = field(
        default=0.0,
        metadata={"help": "Weight of the hidden-state term (student layer outputs matched to mapped teacher layers, "
                          "over valid tokens). >= 0; 0 is off. Needs a live teacher (no precompute_teacher_logits)."},
    )
    hidden_loss: str = field(
        default="mse",
        metadata={"help": "Per-token hidden-state loss: mse (mean squared error over features), cosine "
                          "(1 - cosine similarity) or normalized_mse (||s - t||^2 / ||t||^2)."},
    )
    hidden_layer_map: str = field(
        default="uniform",
        metadata={"help": "Which student layer learns from which teacher layer: uniform (student i <-> teacher "
                          "round((i+1) L_t / L_s) - 1), last, teacher_layers (the layers a pruned student was copied "
                          "from) or explicit student:teacher pairs such as '0:1,1:3'."},
    )
    hidden_projection: str = field(
        default="auto",
        metadata={"help": "Learned student-to-teacher width projection per layer pair: auto (only where widths "
                          "differ) or always. Trained with the student, saved beside it in "
                          "distillation_projections.safetensors, never inside its model files."},
    )
    hidden_projection_init: str = field(
        default="xavier",
        metadata={"help": "Initial projection: xavier, identity (equal widths only) or zero."},
    )
    attention_weight: float = field(
        default=0.0,
        metadata={"help": "Weight of the attention-map term (KL between teacher and student attention of mapped "
                          "layers, over valid query tokens). >= 0; 0 is off. Needs a live teacher."},
    )
    attention_loss: str = field(
        default="head_mean",
        metadata={"help": "head_mean (KL of the head-averaged causal attention maps) or relation (MiniLMv2 Q-Q, "
                          "K-K, V-V self-relations in relation_heads slices; any head counts and widths)."},
    )
    attention_layer_map: str = field(
        default="last",
        metadata={"help": "Layer pairs for the attention term; same syntax as hidden_layer_map."},
    )
    relation_heads: int = field(
        default=0,
        metadata={"help": "With attention_loss=relation: relation heads each Q/K/V projection is split into; must "
                          "divide every projection width of both models. 0: the largest count up to the smaller "
                          "query-head count that does."},
    )
    attention_query_chunk: int = field(
        default=256,
        metadata={"help": "Query rows per block when building attention maps (each block is recomputed in the "
                          "backward pass), which bounds memory on long sequences. >= 1."},
    )
    fused_loss: str = field(
        default="auto",
        metadata={"help": "Compute the loss from the final hidden states and lm_head weights, a chunk of tokens at a "
                          "time, never building [batch, length, vocab] logits (kd_llm.losses.fused): much less "
                          "memory at large vocabularies, same result. auto: when both models allow it (a plain "
                          "lm_head, no precomputed teacher logits, no feature terms), else the dense loss, logged; "
                          "true: always, an error if impossible; false: the dense loss."},
    )
    loss_chunk_size: int = field(
        default=0,
        metadata={"help": "Tokens per chunk of the fused loss (>= 0). 0: about 2^22 logits per chunk, at least 64 "
                          "tokens (85 at a 49,152 vocabulary, 64 at 262,144). Memory grows with it; results do not."},
    )
    packing: bool = field(
        default=False,
        metadata={"help": "Padding-free batches (kd_llm.data.packing): each micro-batch's examples are packed "
                          "best-fit into rows of up to packing_max_length tokens, position_ids restart at every "
                          "example and no token attends across examples; the loss and gradients equal the padded "
                          "batch's. Saves the padding compute of student and teacher on mixed lengths. Needs sdpa, "
                          "eager or flex attention."},
    )
    packing_max_length: int = field(
        default=0,
        metadata={"help": "Longest packed row in tokens (>= 0). 0: the micro-batch's longest example (never more "
                          "tokens than padding); larger rows hold more examples each, fewer rows."},
    )
    length_grouping: str = field(
        default="off",
        metadata={"help": "Length-aware batches without packing: off, or step (kd_llm.data.sampling: each optimizer "
                          "step draws its examples at random, then sorts them by length into its micro-batches, so "
                          "micro-batches pad tightly and steps stay i.i.d.). Trainer's train_sampling_strategy="
                          "group_by_length pads less still but gives each step examples of one length."},
    )
    packing_overlong: str = field(
        default="error",
        metadata={"help": "An example longer than packing_max_length: error (stop, naming it) or truncate (cut to "
                          "packing_max_length tokens; refused with precompute_teacher_logits or a teacher_cache, "
                          "whose stored targets cover whole examples). Never split across rows (packing_max_length=0 "
                          "never cuts one)."},
    )
    cross_tokenizer_loss: str | None = field(
        default=None,
        metadata={"help": "A teacher with another tokenizer than the student's (teacher_tokenizer): the loss over "
                          "aligned spans (kd_llm.cross_tokenizer). hybrid: distillation_loss over the tokens both "
                          "vocabularies share plus a tail, ULD on the rest (equals plain KD for equal tokenizers); "
                          "uld: sorted-probability L1 (Boizard et al. 2024); span: chain-rule span likelihoods "
                          "(Minixhofer et al. 2025). Unset: different tokenizers are refused."},
    )
    uld_weight: float = field(
        default=1.0, metadata={"help": "With cross_tokenizer_loss=hybrid: weight of ULD on the unshared tokens (>= 0)."}
    )
    # Extra columns (the cache index) must reach the collator; kd_llm's collator ignores the rest.
    remove_unused_columns: bool = field(
        default=False,
        metadata={"help": "Drop dataset columns the model's forward does not take. Off: kd_llm needs extra columns."},
    )

    def __post_init__(self):
        super().__post_init__()
        if self.final_temperature is None:
            self.final_temperature = self.temperature
        problems = []
        if not self.temperature > 0:
            problems.append(f"temperature must be > 0, got {self.temperature}")
        if not self.final_temperature > 0:
            problems.append(f"final_temperature must be > 0, got {self.final_temperature}")
        if not 0.0 <= self.alpha <= 1.0:
            problems.append(f"alpha must be in [0, 1], got {self.alpha}")
        if self.distillation_loss not in DIVERGENCES:
            problems.append(f"distillation_loss must be one of {sorted(DIVERGENCES)}, got {self.distillation_loss!r}")
        if not 0.0 < self.beta < 1.0:
            problems.append(f"beta must be in (0, 1), got {self.beta}")
        if not 0.0 < self.skew < 1.0:
            problems.append(f"skew must be in (0, 1), got {self.skew}")
        if self.temperature_schedule not in TEMPERATURE_SCHEDULES:
            problems.append(
                f"temperature_schedule must be one of {TEMPERATURE_SCHEDULES}, got {self.temperature_schedule!r}"
            )
        if self.l2_weight < 0:
            problems.append(f"l2_weight must be >= 0, got {self.l2_weight}")
        if not 0.0 <= self.lmbda <= 1.0:
            problems.append(f"lmbda must be in [0, 1], got {self.lmbda}")
        if not isinstance(self.generation_buffer, int) or self.generation_buffer < 0:
            problems.append(f"generation_buffer must be an integer >= 0 (0: the whole step), got "
                            f"{self.generation_buffer!r}")
        if self.generation_max_new_tokens < 1:
            problems.append(f"generation_max_new_tokens must be >= 1, got {self.generation_max_new_tokens}")
        if not self.generation_temperature > 0:
            problems.append(f"generation_temperature must be > 0, got {self.generation_temperature}")
        if self.seq_kd_decoding not in ("greedy", "sample"):
            problems.append(f"seq_kd_decoding must be greedy or sample, got {self.seq_kd_decoding!r}")
        if isinstance(self.fused_loss, bool):  # YAML reads `fused_loss: true` as a boolean
            self.fused_loss = str(self.fused_loss).lower()
        if not isinstance(self.loss_chunk_size, int) or self.loss_chunk_size < 0:
            problems.append(f"loss_chunk_size must be an integer >= 0 (0: automatic), got {self.loss_chunk_size!r}")
        problems.extend(packing_config_problems(self))
        problems.extend(feature_config_problems(self))
        problems.extend(config_problems(self))  # settings that do not combine: kd_llm.training.rules
        problems.extend(served_teacher_config_problems(self))
        problems.extend(training_arguments_problems(self))
        if problems:
            raise ConfigError("Invalid DistillationConfig: " + "; ".join(problems) + ".")


def packing_config_problems(config) -> list[str]:
    """The packing settings' own values (what packing cannot combine with: kd_llm.training.rules)."""
    problems = []
    if not isinstance(config.packing_max_length, int) or config.packing_max_length < 0:
        problems.append(f"packing_max_length must be an integer >= 0 (0: the longest example of the micro-batch), "
                        f"got {config.packing_max_length!r}")
    if config.length_grouping not in ("off", "step"):
        problems.append(f"length_grouping must be off or step, got {config.length_grouping!r}")
    if config.length_grouping != "off" and config.train_sampling_strategy not in ("random", None):
        problems.append(f"length_grouping={config.length_grouping} is a training sampler, and so is "
                        f"train_sampling_strategy={config.train_sampling_strategy}: choose one")
    if config.packing_overlong not in OVERLONG_CHOICES:
        problems.append(f"packing_overlong must be one of {', '.join(OVERLONG_CHOICES)}, got "
                        f"{config.packing_overlong!r}")
    return problems
