"""Train a specialist teacher (SFT, optionally LoRA) on one skill, then score it on the held-out split.

    python scripts/train_specialist.py --config configs/specialist_date_teacher.yaml

Checkpoints go to --output_dir; running the same command again resumes from the newest one, so a long CPU training
can be spread across sessions. The finished model, tokenizer and scores go to --final_dir.
"""

from __future__ import annotations

import json
import time

from transformers import TrainingArguments

from kd_llm.boundary import run_script
from kd_llm.cli import parse_with_config
from kd_llm.data.collator import CausalLMCollator
from kd_llm.training.argument_checks import check_training_arguments
from kd_llm.training.checkpoints import last_complete_checkpoint
from kd_llm.specialist import (
    SpecialistArguments,
    SpecialistTrainer,
    build_model,
    build_tokenizer,
    build_train_dataset,
    write_run_record,
)


def main(argv=None):
    args, training_args = parse_with_config((SpecialistArguments, TrainingArguments), argv)
    check_training_arguments(training_args)  # a negative rate, batch 0, no steps: refused before any work
    tokenizer = build_tokenizer(args)
    model = build_model(args, tokenizer)
    print(f"specialist: {sum(p.numel() for p in model.parameters()):,} parameters")
    train_dataset = build_train_dataset(args, tokenizer, training_args.output_dir)
    trainer = SpecialistTrainer(
        model=model,
        step_shuffled_batches=args.step_shuffled_batches,
        args=training_args,
        train_dataset=train_dataset,
        data_collator=CausalLMCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
    )
    # Rerunning resumes from the newest complete checkpoint (incomplete ones are named and skipped).
    checkpoint = True if training_args.resume_from_checkpoint is None and \
        last_complete_checkpoint(training_args.output_dir) else training_args.resume_from_checkpoint
    started = time.time()
    trainer.train(resume_from_checkpoint=checkpoint)
    elapsed = time.time() - started

    model = trainer.model
    if args.use_lora:
        model = model.merge_and_unload()
    model.save_pretrained(args.final_dir)
    tokenizer.save_pretrained(args.final_dir)

    from kd_llm.evaluation.skills import evaluate_skill

    scores = evaluate_skill(model, tokenizer, task=args.task, size=args.eval_size, seed=args.problem_seed)
    write_run_record(args.final_dir, args, {
        "train_seconds_this_run": round(elapsed, 1),
        "global_step": trainer.state.global_step,
        "log_history": trainer.state.log_history,
        "scores": scores,
    })
    print(json.dumps(scores, indent=2))


if __name__ == "__main__":
    run_script(main, "train_specialist")
