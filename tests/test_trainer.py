"""DistillationTrainer end to end on tiny models: what it trains, logs, saves, and refuses."""

import math

import pytest
import torch
from safetensors.torch import load_file

from kd_llm import DistillationTrainer
from kd_llm.models.vocab import VocabularyMismatchError
from tests.conftest import tiny_distillation_config as make_config, tiny_llama
from tests.helpers.training import max_difference, params




def train(tmp_path, tokenizer, dataset, *, teacher=None, student=None, **overrides):
    teacher = teacher if teacher is not None else tiny_llama(len(tokenizer), hidden=48, seed=1)
    student = student if student is not None else tiny_llama(len(tokenizer), seed=2)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=make_config(tmp_path, **overrides),
                                  train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    return trainer


def test_trains_student_logs_components_and_leaves_teacher_untouched(tmp_path, char_tokenizer, date_dataset):
    teacher = tiny_llama(len(char_tokenizer), hidden=48, seed=1)
    student = tiny_llama(len(char_tokenizer), seed=2)
    teacher_before, student_before = params(teacher), params(student)
    trainer = train(tmp_path, char_tokenizer, date_dataset, teacher=teacher, student=student)

    assert max_difference(params(student), student_before) > 1e-4
    assert max_difference(params(teacher), teacher_before) == 0.0
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert not teacher.training
    logged = [entry for entry in trainer.state.log_history if "ce_loss" in entry]
    assert len(logged) == 3
    for entry in logged:
        assert entry["kd_loss"] > 0 and entry["ce_loss"] > 0 and entry["temperature"] == 2.0
        # total = alpha * ce + (1 - alpha) * kd, and it is what Trainer reports as `loss`.
        assert entry["total_loss"] == pytest.approx(0.5 * entry["ce_loss"] + 0.5 * entry["kd_loss"], rel=1e-4)
        assert entry["loss"] == pytest.approx(entry["total_loss"], rel=1e-4)


def test_checkpoint_holds_the_student_alone(tmp_path, char_tokenizer, date_dataset):
    teacher = tiny_llama(len(char_tokenizer), hidden=48, layers=3, seed=1)
    student = tiny_llama(len(char_tokenizer), seed=2)
    train(tmp_path, char_tokenizer, date_dataset, teacher=teacher, student=student, save_strategy="steps",
          save_steps=3)
    saved = load_file(str(tmp_path / "run" / "checkpoint-3" / "model.safetensors"))
    assert set(saved) <= set(student.state_dict())
    assert sum(t.numel() for t in saved.values()) <= sum(p.numel() for p in student.parameters())
    # The teacher's 48-wide tensors would be unmistakable.
    assert all(48 not in tensor.shape for tensor in saved.values())
    for name, tensor in saved.items():
        torch.testing.assert_close(tensor, student.state_dict()[name])


def test_gradient_accumulation_does_not_change_the_result(tmp_path, char_tokenizer, date_dataset):
    # Sequences of very different lengths: a per-micro-batch mean would weight them differently.
    one_batch = train(tmp_path / "a", char_tokenizer, date_dataset, per_device_train_batch_size=8,
                      gradient_accumulation_steps=1, l2_weight=1e-3)
    accumulated = train(tmp_path / "b", char_tokenizer, date_dataset, per_device_train_batch_size=2,
                        gradient_accumulation_steps=4, l2_weight=1e-3)
    assert max_difference(params(one_batch.model), params(accumulated.model)) < 1e-5
    losses = lambda t: [e["total_loss"] for e in t.state.log_history if "total_loss" in e]  # noqa: E731
    assert losses(one_batch) == pytest.approx(losses(accumulated), rel=1e-5)


def test_resume_matches_an_uninterrupted_run(tmp_path, char_tokenizer, date_dataset):
    schedule = dict(max_steps=6, temperature=4.0, final_temperature=1.0, temperature_schedule="linear",
                    per_device_train_batch_size=4)
    full = train(tmp_path / "full", char_tokenizer, date_dataset, **schedule)
    train(tmp_path / "stopped", char_tokenizer, date_dataset, save_strategy="steps", save_steps=3, **schedule)
    resumed = DistillationTrainer(
        model=tiny_llama(len(char_tokenizer), seed=2), teacher_model=tiny_llama(len(char_tokenizer), hidden=48, seed=1),
        args=make_config(tmp_path / "resumed", **schedule), train_dataset=date_dataset,
        processing_class=char_tokenizer,
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "stopped" / "run" / "checkpoint-3"))
    assert max_difference(params(full.model), params(resumed.model)) < 1e-6
    temperatures = lambda t: [e["temperature"] for e in t.state.log_history if "temperature" in e]  # noqa: E731
    # The resumed history (restored from the checkpoint, then continued) follows the same schedule.
    assert temperatures(resumed) == pytest.approx(temperatures(full))
    assert temperatures(full)[0] == pytest.approx(4.0) and temperatures(full)[-1] == pytest.approx(1.0)


def test_precomputed_teacher_logits_train_like_the_live_teacher(tmp_path, char_tokenizer, date_dataset):
    # Both on the dense loss path, so only the source of the teacher's logits differs (the fused path, which the
    # live teacher takes by default, is pinned to the dense one in tests/test_fused_trainer.py).
    live = train(tmp_path / "live", char_tokenizer, date_dataset, fused_loss="false")
    cached = train(tmp_path / "cached", char_tokenizer, date_dataset, precompute_teacher_logits=True,
                   fused_loss="false")
    assert cached.teacher_logits is not None
    assert max_difference(params(live.model), params(cached.model)) < 1e-5


def test_hard_labels_only_needs_no_teacher(tmp_path, char_tokenizer, date_dataset):
    student = tiny_llama(len(char_tokenizer), seed=2)
    trainer = DistillationTrainer(model=student, args=make_config(tmp_path, alpha=1.0), train_dataset=date_dataset,
                                  processing_class=char_tokenizer)
    trainer.train()
    logged = [e for e in trainer.state.log_history if "kd_loss" in e]
    assert logged and all(e["kd_loss"] == 0 and e["ce_loss"] > 0 for e in logged)


def test_teacher_with_padded_embedding_is_compared_over_the_shared_vocabulary(tmp_path, char_tokenizer,
                                                                              date_dataset):
    # Like Qwen's 151936 vs 152064: same tokenizer, the teacher's embedding padded to a multiple of 32.
    padded_teacher = tiny_llama(96, hidden=48, seed=1)
    trainer = train(tmp_path, char_tokenizer, date_dataset, teacher=padded_teacher)
    assert trainer.kd_vocab_size == len(char_tokenizer)
    assert all(math.isfinite(e["kd_loss"]) and e["kd_loss"] > 0 for e in trainer.state.log_history
               if "kd_loss" in e)


def test_mismatched_tokenizers_are_refused_before_training(tmp_path, char_tokenizer, date_dataset):
    from kd_llm.models.char_tokenizer import build_char_tokenizer

    other = build_char_tokenizer("0123456789abcdefghij-:,")
    with pytest.raises(VocabularyMismatchError, match="tokenizers differ"):
        DistillationTrainer(model=tiny_llama(len(char_tokenizer)), teacher_model=tiny_llama(len(other)),
                            args=make_config(tmp_path), train_dataset=date_dataset, processing_class=char_tokenizer,
                            teacher_tokenizer=other)


def test_teacher_embedding_smaller_than_tokenizer_is_refused(tmp_path, char_tokenizer, date_dataset):
    with pytest.raises(VocabularyMismatchError, match="rows"):
        DistillationTrainer(model=tiny_llama(len(char_tokenizer)), teacher_model=tiny_llama(50),
                            args=make_config(tmp_path), train_dataset=date_dataset, processing_class=char_tokenizer)


def test_distillation_without_teacher_is_refused(tmp_path, char_tokenizer, date_dataset):
    with pytest.raises(ValueError, match="teacher_model is required"):
        DistillationTrainer(model=tiny_llama(len(char_tokenizer)), args=make_config(tmp_path, alpha=0.5),
                            train_dataset=date_dataset, processing_class=char_tokenizer)


def test_plain_training_arguments_are_refused(tmp_path, char_tokenizer):
    from transformers import TrainingArguments

    with pytest.raises(TypeError, match="DistillationConfig"):
        DistillationTrainer(model=tiny_llama(len(char_tokenizer)), teacher_model=tiny_llama(len(char_tokenizer)),
                            args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True),
                            processing_class=char_tokenizer)


@pytest.mark.parametrize("field, value, message", [
    ("temperature", 0.0, "temperature must be > 0"),
    ("temperature", -1.0, "temperature must be > 0"),
    ("final_temperature", 0.0, "final_temperature must be > 0"),
    ("alpha", 1.5, r"alpha must be in \[0, 1\]"),
    ("alpha", -0.1, r"alpha must be in \[0, 1\]"),
    ("distillation_loss", "kl_magic", "distillation_loss must be one of"),
    ("beta", 0.0, r"beta must be in \(0, 1\)"),
    ("beta", 1.0, r"beta must be in \(0, 1\)"),
    ("skew", 1.2, r"skew must be in \(0, 1\)"),
    ("temperature_schedule", "step", "temperature_schedule must be one of"),
    ("l2_weight", -1.0, "l2_weight must be >= 0"),
])
def test_out_of_range_settings_are_refused(tmp_path, field, value, message):
    with pytest.raises(ValueError, match=message):
        make_config(tmp_path, **{field: value})


def test_all_masked_batch_gives_zero_loss_not_nan(tmp_path, char_tokenizer, date_dataset):
    trainer = DistillationTrainer(model=tiny_llama(len(char_tokenizer), seed=2),
                                  teacher_model=tiny_llama(len(char_tokenizer), hidden=48, seed=1),
                                  args=make_config(tmp_path), train_dataset=date_dataset,
                                  processing_class=char_tokenizer)
    batch = trainer.data_collator([date_dataset[i] for i in range(4)])
    batch["labels"][:] = -100
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch, num_items_in_batch=None)
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in trainer.model.parameters())


def test_evaluate_reports_the_loss_components(tmp_path, char_tokenizer, date_dataset):
    trainer = DistillationTrainer(model=tiny_llama(len(char_tokenizer), seed=2),
                                  teacher_model=tiny_llama(len(char_tokenizer), hidden=48, seed=1),
                                  args=make_config(tmp_path, per_device_eval_batch_size=16, alpha=0.25),
                                  eval_dataset=date_dataset, processing_class=char_tokenizer)
    metrics = trainer.evaluate()
    assert metrics["eval_kd_loss"] > 0 and metrics["eval_ce_loss"] > 0
    assert metrics["eval_total_loss"] == pytest.approx(0.25 * metrics["eval_ce_loss"] + 0.75 * metrics["eval_kd_loss"],
                                                       rel=1e-4)
