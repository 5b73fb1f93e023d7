"""Building a specialist teacher: a small model trained (SFT) on one skill, from scratch or as a LoRA on a base model.

``scripts/train_specialist.py`` is the entry point; this module holds its arguments and the pieces it assembles, so
that tests can build the same things on a smaller scale.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import datasets
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer

from kd_llm.data.sampling import StepShuffledLengthSampler
from kd_llm.data.sources import build_dataset, load_records
from kd_llm.models.char_tokenizer import build_char_tokenizer
from kd_llm.models.loading import load_model, load_tokenizer
from kd_llm.secret_filter import redact_secrets
from kd_llm.training.checkpoints import AtomicCheckpointMixin


@dataclass
class SpecialistArguments:
    task: str = field(default="date_arithmetic", metadata={"help": "Built-in task or JSONL/dataset source to learn."})
    train_size: int = field(default=200_000, metadata={"help": "Number of training problems to generate or read."})
    eval_size: int = field(default=500, metadata={"help": "Number of held-out problems scored at the end."})
    problem_seed: int = field(default=0, metadata={"help": "Seed of the problem generator."})
    with_scratchpad: bool = field(default=True, metadata={"help": "Train the model to write its scratchpad first."})
    base_model: str | None = field(
        default=None,
        metadata={"help": "Fine-tune this model (any kd_llm spec: folder, packaged:<name>, embedded:date-teacher to "
                          "continue the shipped teacher) instead of training a char-level model from scratch."},
    )
    use_lora: bool = field(default=False, metadata={"help": "With base_model: train a LoRA adapter and merge it."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    hidden_size: int = field(default=192, metadata={"help": "From scratch: width of the Llama-architecture model."})
    num_hidden_layers: int = field(default=4, metadata={"help": "From scratch: number of decoder layers."})
    num_attention_heads: int = field(default=6, metadata={"help": "From scratch: query heads."})
    num_key_value_heads: int = field(default=2, metadata={"help": "From scratch: key/value heads (grouped-query)."})
    intermediate_size: int = field(default=512, metadata={"help": "From scratch: MLP width."})
    step_shuffled_batches: bool = field(
        default=True,
        metadata={"help": "Shuffle, then sort by length only within each optimizer step's examples: tight padding "
                          "and still a random mix of categories per step (see kd_llm.data.sampling)."},
    )
    max_length: int = field(default=192, metadata={"help": "Longest tokenized example; longer ones are cut."})
    final_dir: str = field(
        default="outputs/specialist/final", metadata={"help": "Where the finished model, tokenizer and scores go."}
    )

    def __post_init__(self):
        for name in ("train_size", "eval_size", "hidden_size", "num_hidden_layers", "max_length", "lora_r"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads.")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads.")
        if self.use_lora and not self.base_model:
            raise ValueError("use_lora needs base_model: LoRA adapts an existing model.")


class SpecialistTrainer(AtomicCheckpointMixin, Trainer):
    """Trainer with :class:`StepShuffledLengthSampler` batches when ``step_shuffled_batches`` is on."""

    def __init__(self, *args, step_shuffled_batches: bool = False, **kwargs):
        self.step_shuffled_batches = step_shuffled_batches
        super().__init__(*args, **kwargs)

    def _get_train_sampler(self, train_dataset=None):
        if not self.step_shuffled_batches:
            return super()._get_train_sampler(train_dataset)
        # self.train_dataset still has the `length` column that Trainer strips from the copy it passes in.
        step_size = self.args.train_batch_size * self.args.gradient_accumulation_steps
        return StepShuffledLengthSampler(self.train_dataset["length"], step_size, seed=self.args.seed)


def build_tokenizer(args: SpecialistArguments):
    if args.base_model:
        return load_tokenizer(args.base_model)
    return build_char_tokenizer()


def build_model(args: SpecialistArguments, tokenizer):
    if args.base_model:
        model = load_model(args.base_model, dtype=torch.float32)
        if args.use_lora:
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r,
                                                     target_modules="all-linear", task_type="CAUSAL_LM"))
        return model
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden_size,
        num_hidden_layers=args.num_hidden_layers,
        num_attention_heads=args.num_attention_heads,
        num_key_value_heads=args.num_key_value_heads,
        intermediate_size=args.intermediate_size,
        max_position_embeddings=max(256, args.max_length),
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def _data_fingerprint(args: SpecialistArguments, tokenizer) -> str:
    key = json.dumps({"format_version": 2, "task": args.task, "size": args.train_size, "seed": args.problem_seed,
                      "scratchpad": args.with_scratchpad, "max_length": args.max_length,
                      "vocab": tokenizer.get_vocab(), "template": tokenizer.chat_template}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def build_train_dataset(args: SpecialistArguments, tokenizer, cache_root: str | Path) -> datasets.Dataset:
    """The tokenized training set, cached on disk under a fingerprint of everything that shapes it, so a resumed
    run reuses it instead of generating and tokenizing again."""
    cache = Path(cache_root) / f"train-data-{_data_fingerprint(args, tokenizer)}"
    if cache.is_dir():
        return datasets.load_from_disk(str(cache))
    records = load_records(args.task, split="train", size=args.train_size, seed=args.problem_seed)
    if not args.with_scratchpad:
        for record in records:
            record["completion"] = record["answer"]
    dataset = build_dataset(records, tokenizer, max_length=args.max_length, source_name=args.task)
    dataset.save_to_disk(str(cache))
    return dataset


def write_run_record(final_dir: str | Path, args: SpecialistArguments, extra: dict) -> None:
    path = Path(final_dir) / "specialist_run.json"
    path.write_text(json.dumps(redact_secrets({"arguments": asdict(args), **extra}), indent=2))
