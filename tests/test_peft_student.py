"""A LoRA student: settings validation, the merge (same logits within 1e-4), training only the adapters, and the
adapter checkpoint round trip."""

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from kd_llm import DistillationTrainer
from kd_llm.models.peft_student import apply_lora, is_peft_model, parse_lora_settings, save_student
from tests.conftest import tiny_llama
from tests.conftest import tiny_distillation_config as make_config
from tests.helpers.training import max_difference, params

LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]}


def lora_student(tokenizer, seed=2):
    student = apply_lora(tiny_llama(len(tokenizer), seed=seed), LORA)
    with torch.no_grad():  # LoRA B starts at zero: make the adapters change the model, as after training
        generator = torch.Generator().manual_seed(0)
        for name, parameter in student.named_parameters():
            if "lora_B" in name:
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
    return student


def test_merged_student_gives_the_same_logits(tmp_path, char_tokenizer):
    student = lora_student(char_tokenizer)
    plain = tiny_llama(len(char_tokenizer), seed=2)
    ids = torch.randint(4, len(char_tokenizer), (2, 12), generator=torch.Generator().manual_seed(1))
    student.eval()
    with torch.no_grad():
        before = student(input_ids=ids).logits
        assert (before - plain(input_ids=ids).logits).abs().max() > 1e-3  # the adapters do change the model
    merged = save_student(student, tmp_path / "merged", merge=True, tokenizer=char_tokenizer)
    assert not is_peft_model(merged)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in name for name in load_file(str(tmp_path / "merged" / "model.safetensors")))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, before, atol=1e-4, rtol=0)
        torch.testing.assert_close(reloaded(input_ids=ids).logits, before, atol=1e-4, rtol=0)
    assert (tmp_path / "merged" / "tokenizer.json").exists()


def test_unmerged_save_writes_the_adapter_only(tmp_path, char_tokenizer):
    save_student(lora_student(char_tokenizer), tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    assert not (tmp_path / "adapter" / "model.safetensors").exists()
    assert all("lora" in name for name in load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")))


def test_distilling_into_a_lora_student_trains_the_adapters_only(tmp_path, char_tokenizer, date_dataset):
    teacher = tiny_llama(len(char_tokenizer), hidden=48, seed=1)
    student = apply_lora(tiny_llama(len(char_tokenizer), seed=2), LORA)
    teacher_before, student_before = params(teacher), params(student)
    trainer = DistillationTrainer(model=student, teacher_model=teacher,
                                  args=make_config(tmp_path, save_strategy="steps", save_steps=3),
                                  train_dataset=date_dataset, processing_class=char_tokenizer)
    trainer.train()
    after = params(student)
    changed = {name for name in after if (after[name] - student_before[name]).abs().max() > 0}
    assert changed and all("lora_" in name for name in changed)
    assert any("lora_A" in name for name in changed) and any("lora_B" in name for name in changed)
    assert max_difference(params(teacher), teacher_before) == 0.0
    logged = [e for e in trainer.state.log_history if "kd_loss" in e]
    assert len(logged) == 3 and all(e["kd_loss"] > 0 for e in logged)
    checkpoint = tmp_path / "run" / "checkpoint-3"
    adapter = load_file(str(checkpoint / "adapter_model.safetensors"))
    assert adapter and all("lora" in name for name in adapter)
    assert not (checkpoint / "model.safetensors").exists()


def test_lora_student_resumes_from_its_adapter_checkpoint(tmp_path, char_tokenizer, date_dataset):
    def run(folder, **overrides):
        trainer = DistillationTrainer(model=apply_lora(tiny_llama(len(char_tokenizer), seed=2), LORA),
                                      teacher_model=tiny_llama(len(char_tokenizer), hidden=48, seed=1),
                                      args=make_config(folder, max_steps=6, per_device_train_batch_size=4,
                                                       **overrides),
                                      train_dataset=date_dataset, processing_class=char_tokenizer)
        return trainer

    full = run(tmp_path / "full")
    full.train()
    run(tmp_path / "stopped", save_strategy="steps", save_steps=3).train()
    resumed = run(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "stopped" / "run" / "checkpoint-3"))
    assert max_difference(params(full.model), params(resumed.model)) < 1e-6
    assert max_difference(params(full.model), params(run(tmp_path / "fresh").model)) > 1e-4


def test_same_seed_gives_the_same_adapters(char_tokenizer):
    a = apply_lora(tiny_llama(len(char_tokenizer), seed=2), LORA, seed=3)
    b = apply_lora(tiny_llama(len(char_tokenizer), seed=2), LORA, seed=3)
    assert max_difference(params(a), params(b)) == 0.0


def test_settings_defaults_and_json():
    assert parse_lora_settings(None) is None
    assert parse_lora_settings({"r": 4}) == {"r": 4, "lora_alpha": 8, "target_modules": "all-linear",
                                             "lora_dropout": 0.0}
    assert parse_lora_settings('{"r": 2, "target_modules": ["q_proj"]}')["target_modules"] == ["q_proj"]


@pytest.mark.parametrize("settings, message", [
    ({"rank": 4}, r"unknown key\(s\) \['rank'\]"), ({"r": 0}, "r must be a positive integer"),
    ({"r": 2.5}, "r must be a positive integer"), ({"lora_alpha": -1}, "lora_alpha must be > 0"),
    ({"target_modules": []}, "target_modules must be"), ({"lora_dropout": 1.0}, r"lora_dropout must be in \[0, 1\)"),
    ("{r: 4", "JSON object"), ([4], "mapping"),
])
def test_bad_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        parse_lora_settings(settings)


def test_target_modules_the_model_lacks_are_refused(char_tokenizer):
    with pytest.raises(ValueError, match="does not fit"):
        apply_lora(tiny_llama(len(char_tokenizer)), {"target_modules": ["no_such_proj"]})
