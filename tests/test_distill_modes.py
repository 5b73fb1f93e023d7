"""scripts/distill_llm.py in every distillation mode (ensemble, born-again, EMA, online, LoRA student, LoRA teacher),
on tiny models: what each run logs, trains and saves; and the mode arguments' validation."""

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from kd_llm.distillation_modes import DistillationModeArguments
from kd_llm.experiment import DistillationScriptArguments
from tests.conftest import tiny_llama

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import distill_llm  # noqa: E402

QUICK = ["--max_steps", "3", "--train_size", "12", "--logging_steps", "1", "--disable_tqdm", "true",
         "--evaluate_skills", "false", "--compare_hard_labels", "false", "--per_device_train_batch_size", "4",
         "--write_report", "false", "--warmup_steps", "0", "--learning_rate", "0.01",
         "--transfer_size", "0",
         "--student_num_layers", "1", "--student_init", "scaled", "--student_hidden_size", "32", "--student_num_attention_heads", "4",
         "--student_num_key_value_heads", "2", "--student_intermediate_size", "64"]
WITHOUT_SIZES = QUICK[:QUICK.index("--student_num_layers")]
BORN_AGAIN = ["--config", str(ROOT / "configs" / "date_born_again.yaml"), *WITHOUT_SIZES]


def save_teacher(folder, tokenizer, **sizes):
    model = tiny_llama(len(tokenizer), **sizes)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def teacher_dirs(tmp_path_factory, char_tokenizer):
    root = tmp_path_factory.mktemp("teachers")
    return (save_teacher(root / "a", char_tokenizer, hidden=48, seed=1),
            save_teacher(root / "b", char_tokenizer, hidden=32, layers=3, seed=3))


def kd_entries(results):
    return [e for e in results["kd_log_history"] if "kd_loss" in e]


def weights_of(folder):
    return load_file(str(Path(folder) / "model.safetensors"))


def test_ensemble_run(teacher_dirs, tmp_path):
    results = distill_llm.main(["--teacher", str(teacher_dirs[0]), "--extra_teachers", str(teacher_dirs[1]),
                                "--teacher_weights", "0.7", "0.3", "--ensemble_mixture", "log_probs",
                                "--precompute_teacher_logits", "true", "--output_dir", str(tmp_path), *QUICK])
    mode = results["distillation_mode"]
    assert mode["mode"] == "offline" and mode["teacher_weights"] == [0.7, 0.3]
    assert mode["ensemble_mixture"] == "log_probs"
    assert len(kd_entries(results)) == 3 and all(e["kd_loss"] > 0 for e in kd_entries(results))
    # Teachers untouched on disk; the student saved alone.
    assert all(48 not in t.shape for t in weights_of(tmp_path).values())


def test_born_again_run_trains_a_fresh_student_of_the_teachers_architecture(teacher_dirs, tmp_path):
    results = distill_llm.main(["--teacher", str(teacher_dirs[0]), "--output_dir", str(tmp_path), *BORN_AGAIN])
    assert results["distillation_mode"]["mode"] == "born_again"
    teacher, before, student = results["models"]
    assert teacher["parameters"] == before["parameters"] == student["parameters"]
    saved, original = weights_of(tmp_path), weights_of(teacher_dirs[0])
    assert saved.keys() == original.keys()
    assert all(saved[k].shape == original[k].shape for k in saved)
    assert max((saved[k] - original[k]).abs().max().item() for k in saved) > 1e-2  # a new generation, not a copy
    assert all(e["kd_loss"] > 0 for e in kd_entries(results))


def test_ema_run_saves_the_average_teacher(teacher_dirs, tmp_path):
    results = distill_llm.main(["--teacher", str(teacher_dirs[0]), "--distillation_mode", "ema",
                                "--ema_decay", "0.5", "--precompute_teacher_logits", "false",
                                "--output_dir", str(tmp_path), *QUICK])
    assert [row["model"] for row in results["models"]][-1] == "EMA teacher (self-distillation)"
    entries = kd_entries(results)
    assert entries[0]["kd_loss"] == pytest.approx(0.0, abs=1e-7) and entries[-1]["kd_loss"] > 0
    ema = AutoModelForCausalLM.from_pretrained(tmp_path / "ema_teacher")
    student = weights_of(tmp_path)
    assert ema.config.hidden_size == 32  # the student's architecture, not the 48-wide teacher's
    assert any((ema.state_dict()[k] - student[k]).abs().max() > 1e-6 for k in student)


def test_online_run_trains_and_saves_both(teacher_dirs, tmp_path):
    results = distill_llm.main(["--teacher", str(teacher_dirs[0]), "--distillation_mode", "online",
                                "--teacher_learning_rate", "0.001", "--precompute_teacher_logits", "false",
                                "--output_dir", str(tmp_path), *QUICK])
    assert results["distillation_mode"]["teacher_learning_rate"] == 0.001
    assert all("teacher_kd_loss" in e for e in kd_entries(results))
    trained, original = weights_of(tmp_path / "mutual_teacher"), weights_of(teacher_dirs[0])
    assert max((trained[k] - original[k]).abs().max().item() for k in original) > 1e-5
    assert "teacher, after mutual training" in [row["model"] for row in results["models"]]


def test_lora_student_run_merges_on_save(teacher_dirs, tmp_path):
    results = distill_llm.main(["--teacher", str(teacher_dirs[0]), "--peft_config",
                                '{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}',
                                "--merge_peft_on_save", "true", "--output_dir", str(tmp_path), *QUICK])
    assert results["distillation_mode"]["peft_config"]["r"] == 4
    assert all(e["kd_loss"] > 0 for e in kd_entries(results))
    saved = weights_of(tmp_path)
    assert not any("lora" in name for name in saved) and not (tmp_path / "adapter_config.json").exists()
    assert AutoModelForCausalLM.from_pretrained(tmp_path).config.hidden_size == 32


def test_lora_teacher_from_base_and_adapter(teacher_dirs, tmp_path, char_tokenizer):
    from peft import LoraConfig, get_peft_model

    adapted = get_peft_model(AutoModelForCausalLM.from_pretrained(teacher_dirs[0]),
                             LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, parameter in adapted.named_parameters():
            if "lora_B" in name:
                parameter.fill_(0.05)
    adapted.save_pretrained(tmp_path / "adapter")
    plain = distill_llm.main(["--teacher", str(teacher_dirs[0]), "--output_dir", str(tmp_path / "plain"), *QUICK])
    merged = distill_llm.main(["--teacher", str(teacher_dirs[0]), "--teacher_adapter", str(tmp_path / "adapter"),
                               "--output_dir", str(tmp_path / "merged"), *QUICK])
    assert merged["distillation_mode"]["teacher_adapter"] == str(tmp_path / "adapter")
    # Same student start, same data: only the teacher (base + adapter) differs, so the KD term differs.
    assert kd_entries(merged)[0]["kd_loss"] != pytest.approx(kd_entries(plain)[0]["kd_loss"], rel=1e-4)
    assert kd_entries(merged)[0]["ce_loss"] == pytest.approx(kd_entries(plain)[0]["ce_loss"], rel=1e-5)


@pytest.mark.parametrize("values, message", [
    (dict(distillation_mode="mutual"), "distillation_mode must be one of"),
    (dict(teacher_weights=[0.5, 0.5]), "teacher_weights needs extra_teachers"),
    (dict(extra_teachers=["x"], teacher_weights=[0.5, 0.6]), "sum to 1"),
    (dict(extra_teachers=["x"], distillation_mode="online"), "needs distillation_mode offline"),
    (dict(ensemble_mixture="max"), "ensemble_mixture must be one of"),
    (dict(ema_decay=1.0), r"ema_decay must be in \[0, 1\)"),
    (dict(teacher_learning_rate=1e-3), "only applies to distillation_mode online"),
    (dict(distillation_mode="online", teacher_learning_rate=-1.0), "teacher_learning_rate must be > 0"),
    (dict(peft_config={"r": 0}), "r must be a positive integer"),
    (dict(merge_peft_on_save=True), "merge_peft_on_save needs peft_config"),
    (dict(teacher_adapter="/no/such/adapter"), "not a PEFT adapter folder"),
])
def test_bad_mode_arguments_are_refused(values, message):
    with pytest.raises(ValueError, match=message):
        DistillationModeArguments(**values)


def test_born_again_refuses_a_resized_student():
    with pytest.raises(ValueError, match="born_again.*remove student_num_layers"):
        DistillationScriptArguments(distillation_mode="born_again", student_num_layers=1)


def test_born_again_refuses_a_checkpoint_of_another_architecture(teacher_dirs, tmp_path):
    with pytest.raises(ValueError, match="hidden_size: teacher 48 vs student 32"):
        distill_llm.main(["--teacher", str(teacher_dirs[0]), "--student_init", "checkpoint",
                          "--student_checkpoint", str(teacher_dirs[1]), "--output_dir", str(tmp_path), *BORN_AGAIN])


def test_mode_settings_fail_before_any_work(teacher_dirs, tmp_path):
    with pytest.raises(ValueError, match="cannot serve an EMA teacher"):
        distill_llm.main(["--teacher", str(teacher_dirs[0]), "--distillation_mode", "ema",
                          "--precompute_teacher_logits", "true", "--output_dir", str(tmp_path / "o"), *QUICK])
    assert not (tmp_path / "o").exists()
