"""scripts/sweep.py: the trial grid, the choice of the best trial, and a tiny sweep end to end."""

import json
import sys
from pathlib import Path

import pytest
import yaml

from kd_llm.cli import parse_with_config
from kd_llm.experiment import DistillationScriptArguments
from kd_llm.sweep import SWEEP_FILES, SweepArguments, best_trial, trial_settings
from kd_llm.training import DistillationConfig

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import sweep as sweep_script  # noqa: E402


def test_grid_covers_every_combination_once_and_hard_labels_once():
    sweep = SweepArguments(temperatures=[1.0, 2.0], alphas=[0.5, 1.0], losses=["forward_kl", "jsd"])
    trials = trial_settings(sweep)
    soft = [t for t in trials if t["alpha"] < 1]
    assert len(soft) == 4 and len({tuple(t.values()) for t in soft}) == 4
    # alpha = 1 ignores T and the loss, so it is trained once, not four times.
    assert [t for t in trials if t["alpha"] == 1] == [{"temperature": 1.0, "alpha": 1.0,
                                                       "distillation_loss": "forward_kl"}]


def test_random_search_draws_distinct_trials_reproducibly():
    sweep = SweepArguments(temperatures=[1.0, 2.0, 4.0], alphas=[0.2, 0.5], losses=["forward_kl", "jsd"],
                           search="random", num_trials=5, sweep_seed=3)
    first, second = trial_settings(sweep), trial_settings(sweep)
    assert first == second and len(first) == 5
    assert len({tuple(t.values()) for t in first}) == 5
    other = trial_settings(SweepArguments(temperatures=[1.0, 2.0, 4.0], alphas=[0.2, 0.5],
                                          losses=["forward_kl", "jsd"], search="random", num_trials=5, sweep_seed=4))
    assert other != first


def test_best_trial_is_the_highest_and_ties_go_to_the_first():
    trials = [{"index": 0, "mean_category_exact_match": 0.4}, {"index": 1, "mean_category_exact_match": 0.6},
              {"index": 2, "mean_category_exact_match": 0.6}]
    assert best_trial(trials)["index"] == 1


@pytest.mark.parametrize("kwargs, message", [
    ({"temperatures": [0.0]}, "temperature must be > 0"),
    ({"alphas": [1.5]}, "alpha must be in"),
    ({"losses": ["kl"]}, "Unknown loss"),
    ({"alphas": []}, "alphas is empty"),
    ({"search": "bayes"}, "grid' or 'random"),
    ({"search": "random"}, "needs num_trials"),
    ({"trial_max_steps": 0}, "trial_max_steps"),
])
def test_bad_sweep_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SweepArguments(**kwargs)




def test_tiny_sweep_writes_table_plot_and_a_launchable_best_config(tiny_teacher_dir, tmp_path):
    out = tmp_path / "sweep"
    result = sweep_script.main([
        "--teacher", str(tiny_teacher_dir), "--output_dir", str(tmp_path / "best_run"), "--sweep_dir", str(out),
        "--temperatures", "1", "2", "--alphas", "0.5", "1", "--losses", "forward_kl", "--trial_max_steps", "2",
        "--train_size", "8", "--eval_size", "6", "--max_new_tokens", "8", "--per_device_train_batch_size", "4",
        "--learning_rate", "0.01", "--disable_tqdm", "true", "--report_to", "none",
    ])
    assert len(result["trials"]) == 3  # T in {1, 2} at alpha 0.5, and one hard-label trial
    assert result["transfer_examples"] == 0
    for name in SWEEP_FILES.values():
        assert (out / name).stat().st_size > 0
    saved = json.loads((out / SWEEP_FILES["json"]).read_text())
    assert saved["best"] == best_trial(saved["trials"])
    table = (out / SWEEP_FILES["table"]).read_text()
    assert table.count("\n| ") == 1 + 3 and "(hard labels)" in table
    # The best config parses for scripts/distill_llm.py and carries the run's own settings plus the winner's.
    best_path = out / SWEEP_FILES["best"]
    assert f"--config {best_path}" in best_path.read_text().splitlines()[1]
    script_args, config = parse_with_config((DistillationScriptArguments, DistillationConfig),
                                            ["--config", str(best_path)])
    assert script_args.teacher == str(tiny_teacher_dir) and script_args.train_size == 8
    assert config.learning_rate == 0.01 and config.output_dir == str(tmp_path / "best_run")
    best = saved["best"]
    assert (config.temperature, config.alpha, config.distillation_loss) == (
        best["temperature"], best["alpha"], best["distillation_loss"])
    assert yaml.safe_load(best_path.read_text())["temperature_schedule"] == "constant"


def test_sweep_uses_the_transfer_set_and_refuses_modes_it_does_not_sweep(tiny_teacher_dir, tmp_path):
    common = ["--teacher", str(tiny_teacher_dir), "--output_dir", str(tmp_path / "best_run"),
              "--sweep_dir", str(tmp_path / "sweep"), "--temperatures", "1", "--alphas", "0.5", "--losses",
              "forward_kl", "--trial_max_steps", "1", "--train_size", "8", "--eval_size", "4", "--max_new_tokens",
              "8", "--per_device_train_batch_size", "4", "--disable_tqdm", "true", "--report_to", "none"]
    result = sweep_script.main([*common, "--transfer_size", "3"])
    assert 0 < result["transfer_examples"] <= 3  # teacher-written completions, as distill_llm.py trains on
    with pytest.raises(ValueError, match="not swept"):
        sweep_script.main([*common, "--distillation_mode", "ema"])
