"""Online (mutual) distillation: both models train, each exactly as offline distillation from the other's current
state would train it; both are saved and both resume."""

import pytest
import torch
from safetensors.torch import load_file

from kd_llm import DistillationTrainer
from kd_llm.training.online import MUTUAL_TEACHER_FOLDER, MutualDistillationTrainer
from tests.conftest import tiny_llama
from tests.conftest import tiny_distillation_config as make_config
from tests.helpers.training import max_difference, params


def pair(tokenizer):
    return tiny_llama(len(tokenizer), seed=2), tiny_llama(len(tokenizer), hidden=48, seed=1)


def mutual(tmp_path, tokenizer, dataset, student, teacher, teacher_learning_rate=3e-3, **overrides):
    return MutualDistillationTrainer(model=student, teacher_model=teacher, args=make_config(tmp_path, **overrides),
                                     teacher_learning_rate=teacher_learning_rate, train_dataset=dataset,
                                     processing_class=tokenizer)


def test_both_models_train_and_log_their_terms(tmp_path, char_tokenizer, date_dataset):
    student, teacher = pair(char_tokenizer)
    student_before, teacher_before = params(student), params(teacher)
    trainer = mutual(tmp_path, char_tokenizer, date_dataset, student, teacher)
    trainer.train()
    assert max_difference(params(student), student_before) > 1e-4
    assert max_difference(params(teacher), teacher_before) > 1e-4  # the teacher is not frozen here
    logged = [e for e in trainer.state.log_history if "teacher_kd_loss" in e]
    assert len(logged) == 3
    for entry in logged:
        assert entry["kd_loss"] > 0 and entry["teacher_kd_loss"] > 0 and entry["teacher_ce_loss"] > 0
        assert entry["teacher_total_loss"] == pytest.approx(
            0.5 * entry["teacher_ce_loss"] + 0.5 * entry["teacher_kd_loss"], rel=1e-4)
        assert entry["loss"] == pytest.approx(entry["total_loss"] + entry["teacher_total_loss"], rel=1e-4)
    # Its own learning rate and schedule: linear decay from 3e-3 over 3 steps, against the student's 1e-2.
    rates = [e["teacher_learning_rate"] for e in logged]
    assert rates == pytest.approx([3e-3 * 2 / 3, 3e-3 / 3, 0.0])
    assert [e["learning_rate"] for e in logged] == pytest.approx([1e-2, 1e-2 * 2 / 3, 1e-2 / 3])


def test_one_step_equals_offline_distillation_in_each_direction(tmp_path, char_tokenizer, date_dataset):
    """Step 1 of mutual learning updates each model as an offline run with the other one frozen at its start would,
    each with its own learning rate: the objective and the two optimizers are independent."""
    student, teacher = pair(char_tokenizer)
    frozen_student, frozen_teacher = pair(char_tokenizer)
    one_step = dict(max_steps=1, lr_scheduler_type="constant")
    mutual(tmp_path / "mutual", char_tokenizer, date_dataset, student, teacher, **one_step).train()

    # fused_loss="false": the mutual trainer computes the dense loss; compare like with like (Adam's first step
    # amplifies float rounding on near-zero gradients past 1e-6).
    one_step["fused_loss"] = "false"
    offline_student = DistillationTrainer(model=pair(char_tokenizer)[0], teacher_model=frozen_teacher,
                                          args=make_config(tmp_path / "s", **one_step), train_dataset=date_dataset,
                                          processing_class=char_tokenizer)
    offline_student.train()
    offline_teacher = DistillationTrainer(model=pair(char_tokenizer)[1], teacher_model=frozen_student,
                                          args=make_config(tmp_path / "t", learning_rate=3e-3, **one_step),
                                          train_dataset=date_dataset, processing_class=char_tokenizer)
    offline_teacher.train()
    assert max_difference(params(student), params(offline_student.model)) < 1e-6
    assert max_difference(params(teacher), params(offline_teacher.model)) < 1e-6


def test_both_are_saved_in_checkpoints_and_the_final_output(tmp_path, char_tokenizer, date_dataset):
    student, teacher = pair(char_tokenizer)
    trainer = mutual(tmp_path, char_tokenizer, date_dataset, student, teacher, save_strategy="steps", save_steps=3)
    trainer.train()
    checkpoint = tmp_path / "run" / "checkpoint-3"
    student_weights = load_file(str(checkpoint / "model.safetensors"))
    assert all(48 not in t.shape for t in student_weights.values())  # no teacher tensor in the student's file
    teacher_weights = load_file(str(checkpoint / MUTUAL_TEACHER_FOLDER / "model.safetensors"))
    for name, tensor in teacher_weights.items():
        torch.testing.assert_close(tensor, teacher.state_dict()[name])
    assert (checkpoint / MUTUAL_TEACHER_FOLDER / "optimizer.pt").is_file()
    trainer.save_model(str(tmp_path / "final"))
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final" / MUTUAL_TEACHER_FOLDER)
    assert max_difference(params(reloaded), params(teacher)) == 0.0


def test_resume_continues_both_models_exactly(tmp_path, char_tokenizer, date_dataset):
    schedule = dict(max_steps=6, per_device_train_batch_size=4)
    full = mutual(tmp_path / "full", char_tokenizer, date_dataset, *pair(char_tokenizer), **schedule)
    full.train()
    mutual(tmp_path / "stopped", char_tokenizer, date_dataset, *pair(char_tokenizer), save_strategy="steps",
           save_steps=3, **schedule).train()
    resumed = mutual(tmp_path / "resumed", char_tokenizer, date_dataset, *pair(char_tokenizer), **schedule)
    resumed.train(resume_from_checkpoint=str(tmp_path / "stopped" / "run" / "checkpoint-3"))
    assert max_difference(params(full.model), params(resumed.model)) < 1e-6
    assert max_difference(params(full.teacher), params(resumed.teacher)) < 1e-6
    # The teacher's Adam moments came back too, not only its weights.
    full_state = full.teacher_optimizer.state_dict()["state"]
    resumed_state = resumed.teacher_optimizer.state_dict()["state"]
    assert full_state.keys() == resumed_state.keys()
    for key in full_state:
        torch.testing.assert_close(full_state[key]["exp_avg"], resumed_state[key]["exp_avg"], atol=1e-7, rtol=1e-5)


def test_evaluate_reports_both_models(tmp_path, char_tokenizer, date_dataset):
    student, teacher = pair(char_tokenizer)
    trainer = mutual(tmp_path, char_tokenizer, date_dataset, student, teacher, per_device_eval_batch_size=16)
    metrics = trainer.evaluate(date_dataset)
    assert metrics["eval_kd_loss"] > 0 and metrics["eval_teacher_kd_loss"] > 0
    assert not teacher.training


@pytest.mark.parametrize("overrides, message", [
    (dict(alpha=1.0), "alpha=1"), (dict(precompute_teacher_logits=True), "precompute_teacher_logits"),
])
def test_settings_that_cannot_work_online_are_refused(tmp_path, char_tokenizer, date_dataset, overrides, message):
    with pytest.raises(ValueError, match=message):
        mutual(tmp_path, char_tokenizer, date_dataset, *pair(char_tokenizer), **overrides)


def test_a_frozen_teacher_cannot_train_online(tmp_path, char_tokenizer, date_dataset):
    from kd_llm.models.loading import freeze_teacher

    student, teacher = pair(char_tokenizer)
    with pytest.raises(ValueError, match="no parameter that requires a gradient"):
        mutual(tmp_path, char_tokenizer, date_dataset, student, freeze_teacher(teacher))
    with pytest.raises(ValueError, match="teacher_learning_rate must be > 0"):
        mutual(tmp_path, char_tokenizer, date_dataset, *pair(char_tokenizer), teacher_learning_rate=0.0)


@pytest.mark.slow
def test_two_processes_train_both_models_like_one_process(tmp_path):
    """DDP on 2 CPU processes x batch 4 gives the student *and the teacher* of 1 process x batch 8: the teacher's
    gradients are averaged across processes too."""
    from tests.conftest import CHAR_VOCAB
    from tests.helpers.launch import SUPPORT, accelerate_launch
    from tests.support.online_ddp_run import run

    models = tmp_path / "models"
    tiny_llama(CHAR_VOCAB, hidden=48, seed=1).save_pretrained(models / "teacher")
    tiny_llama(CHAR_VOCAB, seed=2).save_pretrained(models / "student")
    accelerate_launch("--config_file", "configs/accelerate/multi_gpu.yaml", str(SUPPORT / "online_ddp_run.py"),
                      "--models", str(models), "--output", str(tmp_path / "ddp"), "--per_device_train_batch_size",
                      "4")
    run(models, tmp_path / "single", per_device_train_batch_size=8)
    run(models, tmp_path / "half", per_device_train_batch_size=4)  # what a missing gradient average would give
    info = __import__("json").loads((tmp_path / "ddp" / "run.json").read_text())
    assert info["num_processes"] == 2 and info["teacher_wrapper"] == "DistributedDataParallel"
    for name in ("student", "teacher"):
        ddp, single, half = (load_file(str(tmp_path / run_name / f"{name}.safetensors"))
                             for run_name in ("ddp", "single", "half"))
        assert max((ddp[k] - single[k]).abs().max().item() for k in ddp) < 1e-5, name
        assert max((half[k] - single[k]).abs().max().item() for k in half) > 1e-4, name
