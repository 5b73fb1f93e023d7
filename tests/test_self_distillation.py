"""Self-distillation: the EMA teacher against a hand-computed average, its checkpoint and resume; born-again
students of the teacher's architecture."""

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from kd_llm import DistillationTrainer
from kd_llm.training.self_distillation import (
    EMA_TEACHER_FILE,
    EMADistillationTrainer,
    born_again_student,
    check_same_architecture,
)
from tests.conftest import tiny_llama
from tests.conftest import tiny_distillation_config as make_config
from tests.helpers.training import max_difference, params


class RecordStudent(TrainerCallback):
    """The student's weights after every optimizer step (runs after the EMA update: added later)."""

    def __init__(self, student):
        self.student, self.after_step = student, []

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.after_step.append(params(self.student))


def ema_trainer(tmp_path, tokenizer, dataset, *, decay=0.6, student=None, **overrides):
    student = student if student is not None else tiny_llama(len(tokenizer), seed=2)
    return EMADistillationTrainer(model=student, args=make_config(tmp_path, **overrides), ema_decay=decay,
                                  train_dataset=dataset, processing_class=tokenizer)


def test_ema_teacher_follows_the_hand_computed_average(tmp_path, char_tokenizer, date_dataset):
    student = tiny_llama(len(char_tokenizer), seed=2)
    initial = params(student)
    trainer = ema_trainer(tmp_path, char_tokenizer, date_dataset, student=student, max_steps=4)
    recorder = RecordStudent(student)
    trainer.add_callback(recorder)
    trainer.train()

    expected = dict(initial)
    for after in recorder.after_step:
        expected = {name: 0.6 * expected[name] + 0.4 * after[name] for name in expected}
    assert len(recorder.after_step) == 4
    assert max_difference(params(trainer.ema.model), expected) < 1e-6
    # The teacher moved, but never through gradients; the student moved away from its start.
    assert max_difference(params(trainer.ema.model), initial) > 1e-4
    assert max_difference(params(student), initial) > 1e-4
    assert all(not p.requires_grad and p.grad is None for p in trainer.ema.model.parameters())
    assert not trainer.ema.model.training
    logged = [e for e in trainer.state.log_history if "kd_loss" in e]
    assert len(logged) == 4
    # Step 1: teacher == student, so the term is exactly 0; then the average lags and the term is positive.
    assert logged[0]["kd_loss"] == pytest.approx(0.0, abs=1e-7)
    assert all(e["kd_loss"] > 0 for e in logged[1:])


def test_checkpoint_holds_the_student_and_the_teacher_separately(tmp_path, char_tokenizer, date_dataset):
    trainer = ema_trainer(tmp_path, char_tokenizer, date_dataset, max_steps=3, save_strategy="steps", save_steps=3)
    trainer.train()
    checkpoint = tmp_path / "run" / "checkpoint-3"
    student_weights = load_file(str(checkpoint / "model.safetensors"))
    for name, tensor in student_weights.items():
        torch.testing.assert_close(tensor, trainer.model.state_dict()[name])
    teacher_weights = load_file(str(checkpoint / EMA_TEACHER_FILE))
    assert set(teacher_weights) == set(student_weights)
    for name, tensor in teacher_weights.items():
        torch.testing.assert_close(tensor, trainer.ema.model.state_dict()[name])
    assert max(((teacher_weights[k] - student_weights[k]).abs().max().item() for k in teacher_weights)) > 1e-5


def test_resume_restores_the_ema_teacher(tmp_path, char_tokenizer, date_dataset):
    schedule = dict(max_steps=6, per_device_train_batch_size=4)
    full = ema_trainer(tmp_path / "full", char_tokenizer, date_dataset, **schedule)
    full.train()
    ema_trainer(tmp_path / "stopped", char_tokenizer, date_dataset, save_strategy="steps", save_steps=3,
                **schedule).train()
    resumed = ema_trainer(tmp_path / "resumed", char_tokenizer, date_dataset, **schedule)
    resumed.train(resume_from_checkpoint=str(tmp_path / "stopped" / "run" / "checkpoint-3"))
    assert max_difference(params(full.model), params(resumed.model)) < 1e-6
    assert max_difference(params(full.ema.model), params(resumed.ema.model)) < 1e-6


def test_resume_from_a_checkpoint_without_ema_teacher_is_refused(tmp_path, char_tokenizer, date_dataset):
    plain = DistillationTrainer(model=tiny_llama(len(char_tokenizer), seed=2),
                                teacher_model=tiny_llama(len(char_tokenizer), seed=1),
                                args=make_config(tmp_path / "plain", save_strategy="steps", save_steps=3),
                                train_dataset=date_dataset, processing_class=char_tokenizer)
    plain.train()
    trainer = ema_trainer(tmp_path / "ema", char_tokenizer, date_dataset, max_steps=6)
    with pytest.raises(FileNotFoundError, match=EMA_TEACHER_FILE):
        trainer.train(resume_from_checkpoint=str(tmp_path / "plain" / "run" / "checkpoint-3"))


@pytest.mark.parametrize("decay", [1.0, -0.1, 1.5])
def test_out_of_range_decay_is_refused(tmp_path, char_tokenizer, date_dataset, decay):
    with pytest.raises(ValueError, match=r"ema_decay must be in \[0, 1\)"):
        ema_trainer(tmp_path, char_tokenizer, date_dataset, decay=decay)


@pytest.mark.parametrize("overrides, message", [
    (dict(precompute_teacher_logits=True), "precompute_teacher_logits"), (dict(alpha=1.0), "alpha=1"),
])
def test_settings_that_cannot_work_with_an_ema_teacher_are_refused(tmp_path, char_tokenizer, date_dataset,
                                                                   overrides, message):
    with pytest.raises(ValueError, match=message):
        ema_trainer(tmp_path, char_tokenizer, date_dataset, **overrides)


def test_born_again_student_has_the_teachers_architecture_and_fresh_weights(char_tokenizer):
    teacher = tiny_llama(len(char_tokenizer), hidden=48, seed=1)
    student = born_again_student(teacher, seed=5)
    check_same_architecture(teacher, student)
    shape = lambda model: {k: v for k, v in model.config.to_dict().items() if k != "dtype"}  # noqa: E731
    assert shape(student) == shape(teacher)
    assert max_difference(params(student), params(teacher)) > 1e-2
    # Same seed, same student (the hard-label baseline and the KD run start from the same weights).
    assert max_difference(params(student), params(born_again_student(teacher, seed=5))) == 0.0
    assert all(p.requires_grad for p in student.parameters()) and student.training


def test_teacher_of_another_architecture_is_named(char_tokenizer):
    with pytest.raises(ValueError, match="hidden_size: teacher 48 vs student 32"):
        check_same_architecture(tiny_llama(len(char_tokenizer), hidden=48), tiny_llama(len(char_tokenizer)))
