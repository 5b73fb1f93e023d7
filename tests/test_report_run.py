"""The report at the end of scripts/distill_llm.py, the teacher check that stops a run, and scripts/report.py."""

import json
import sys
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from kd_llm.experiment import recovered_fraction as experiment_recovered_fraction
from kd_llm.report import artifacts
from kd_llm.report.checks import TeacherCheckError

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import distill_llm  # noqa: E402
import report as report_script  # noqa: E402

FAST = ["--student_num_layers", "1", "--transfer_size", "0",  # the demo's pruned student, sized for the tiny teacher
        "--max_steps", "4", "--train_size", "16", "--eval_size", "10", "--max_new_tokens", "24",
        "--logging_steps", "2", "--disable_tqdm", "true", "--benchmark_batch_size", "4", "--benchmark_new_tokens", "8"]




@pytest.fixture(scope="module")
def forced_run(tiny_teacher_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    results = distill_llm.main(["--teacher", str(tiny_teacher_dir), "--output_dir", str(out), "--force", "true",
                                *FAST])
    return out, results


def test_tiny_teacher_dir_stops_the_run_before_training(tiny_teacher_dir, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(TeacherCheckError, match=r"no better than the untrained student.*--force"):
        distill_llm.main(["--teacher", str(tiny_teacher_dir), "--output_dir", str(out), *FAST])
    assert not (out / "model.safetensors").exists() and not (out / artifacts.RESULTS_JSON).exists()
    assert not (out / artifacts.BASELINE_DIR).exists()  # the baseline never trained


def test_run_writes_report_plots_and_card(forced_run):
    out, results = forced_run
    report = json.loads((out / artifacts.REPORT_JSON).read_text())
    roles = [m["role"] for m in report["models"]]
    assert roles == ["teacher", "untrained", "baseline", "student"]
    measured = [m for m in report["models"] if m["role"] != "untrained"]
    for model in measured:
        assert model["speed"]["batch_1"]["tokens_per_second"] > 0 and model["speed"]["batch_4"]["batch_size"] == 4
        assert model["memory"]["peak_bytes"] >= model["memory"]["weights_bytes"] > 0
        assert model["size_on_disk"]["how"] == "weight files of its folder"
        assert model["skill"]["count"] == 10
    # The student and the baseline share an architecture: same parameters, same bytes on disk.
    baseline, student = measured[1], measured[2]
    assert baseline["parameters"] == student["parameters"] == results["models"][3]["parameters"]
    assert baseline["size_on_disk"]["bytes"] == student["size_on_disk"]["bytes"]
    assert (out / artifacts.BASELINE_DIR / "model.safetensors").exists()
    # The forced check is on record, and both recovered-fraction computations agree.
    check = report["teacher_check"]
    assert check["ran"] and check["forced"] and not check["passed"]
    comparison = report["comparisons"][0]
    assert comparison["recovered_fraction"] == experiment_recovered_fraction(results["models"])
    assert comparison["negative_transfer"]["gap"] == pytest.approx(
        results["models"][3]["mean_category_exact_match"] - results["models"][2]["mean_category_exact_match"])
    for plot in artifacts.PLOTS:
        assert (out / plot).read_bytes()[:4] == b"\x89PNG"
    markdown = (out / artifacts.REPORT_MARKDOWN).read_text()
    assert "training went ahead because --force was given" in markdown and "## Distillation recipe" in markdown
    card = ModelCard.load(out / artifacts.MODEL_CARD, ignore_metadata_errors=False)
    assert {"distillation", "kd_llm"} <= set(card.data.tags) and card.data.eval_results
    assert "teacher/student size ratio" in card.text and "hf_" not in card.text
    assert sorted(Path(f).name for f in results["report"]["files"]) == sorted(
        Path(f).name for f in [artifacts.REPORT_JSON, artifacts.REPORT_MARKDOWN, *artifacts.PLOTS,
                               artifacts.MODEL_CARD])


def test_report_script_on_checkpoints_uses_the_runs_settings(forced_run, tiny_teacher_dir, tmp_path):
    out, results = forced_run
    outcome = report_script.main([
        "--teacher", str(tiny_teacher_dir), "--student", str(out), "--baseline", str(out / artifacts.BASELINE_DIR),
        "--output_dir", str(tmp_path / "again"), "--no_memory", "--benchmark_batch_size", "2",
        "--benchmark_new_tokens", "4", "--repeats", "1", "--model_id", "someone/tiny-student"])
    report = outcome["report"]
    assert report["eval"]["count"] == 10  # eval_size from the run's results.json
    scores = {m["role"]: m["skill"]["mean_category_exact_match"] for m in report["models"]}
    # Same problems, same greedy decoding: the same scores as at the end of the run.
    assert scores["student"] == results["models"][3]["mean_category_exact_match"]
    assert scores["baseline"] == results["models"][2]["mean_category_exact_match"]
    assert report["run"]["steps"] == 4 and report["teacher_check"]["forced"]
    card = ModelCard.load(tmp_path / "again" / artifacts.MODEL_CARD)
    assert 'model_id = "someone/tiny-student"' in card.text and "4 optimizer steps" in card.text
    assert (tmp_path / "again" / artifacts.LOSS_PLOT).exists()  # curves from the run's log history
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        report_script.main(["--teacher", str(tiny_teacher_dir), "--student", str(tmp_path / "missing")])
