"""No Hub token reaches a file: kd_llm.secret_filter on its own, then every file that distill_llm.py (checkpoints,
results, report, card, baseline), sweep.py (best_config.yaml, sweep.json) and the trainer's checkpoints write, with a
token given both ways (HF_TOKEN and --hub_token)."""

from pathlib import Path

import yaml

from kd_llm import DistillationTrainer
from kd_llm.secret_filter import REDACTED, redact_secrets, register_secret
from tests.conftest import tiny_distillation_config, tiny_llama
from tests.helpers.scripts import ROOT, distill_llm
import sweep as sweep_script  # noqa: E402  (scripts/ is on sys.path: tests.helpers.scripts)

ENV_TOKEN = "hf_" + "E" * 34
FLAG_TOKEN = "hf_" + "F" * 34
SMALL = ["--student_num_layers", "1", "--transfer_size", "0", "--train_size", "16", "--eval_size", "6",
         "--max_new_tokens", "8", "--disable_tqdm", "true", "--force", "true", "--measure_memory", "false"]


def files_holding(folder: Path, *secrets: str) -> list[str]:
    """Every file under ``folder`` (binary ones too: training_args.bin is a pickle) that holds a secret."""
    found = []
    for path in folder.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            if any(secret.encode() in data for secret in secrets):
                found.append(str(path.relative_to(folder)))
    return found


def test_redact_secrets_by_key_by_known_value_and_by_pattern(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "plain-secret-from-env")
    register_secret("registered-secret-value")
    settings = {"hub_token": "anything", "pad_token": "<pad>", "nested": [{"api_key": "k"}, "x plain-secret-from-env"],
                "note": f"pushed with {FLAG_TOKEN}", "other": "registered-secret-value", "empty_token": None,
                "steps": 3}
    assert redact_secrets(settings) == {
        "hub_token": REDACTED, "pad_token": "<pad>", "nested": [{"api_key": REDACTED}, f"x {REDACTED}"],
        "note": f"pushed with {REDACTED}", "other": REDACTED, "empty_token": None, "steps": 3}


def test_no_file_of_distill_llm_or_sweep_holds_a_token(tiny_teacher_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", ENV_TOKEN)
    out = tmp_path / "distill"
    distill_llm.main(["--teacher", str(tiny_teacher_dir), "--output_dir", str(out), *SMALL, "--max_steps", "2",
                      "--save_strategy", "steps", "--save_steps", "1", "--logging_steps", "1",
                      "--hub_token", FLAG_TOKEN])
    assert (out / "checkpoint-2" / "training_args.bin").exists() and (out / "README.md").exists()
    assert (out / "hard_label_baseline" / "checkpoint-2").exists()
    sweep_dir = tmp_path / "sweep"
    sweep_script.main(["--config", str(ROOT / "configs" / "sweep_date.yaml"), "--teacher", str(tiny_teacher_dir),
                       "--output_dir", str(tmp_path / "sweep_out"), "--sweep_dir", str(sweep_dir), *SMALL,
                       "--temperatures", "2", "--alphas", "0.5", "--losses", "forward_kl", "--trial_max_steps", "1",
                       "--write_report", "false", "--hub_token", FLAG_TOKEN])
    best = yaml.safe_load((sweep_dir / "best_config.yaml").read_text())
    assert "hub_token" not in best and best["temperature"] == 2
    assert files_holding(tmp_path, ENV_TOKEN, FLAG_TOKEN) == []


def test_trainer_checkpoints_pickle_no_hub_token(tmp_path, char_tokenizer, date_dataset):
    config = tiny_distillation_config(tmp_path, max_steps=2, per_device_train_batch_size=4, save_strategy="steps",
                                      save_steps=2, hub_token=FLAG_TOKEN)
    trainer = DistillationTrainer(model=tiny_llama(len(char_tokenizer), seed=2),
                                  teacher_model=tiny_llama(len(char_tokenizer), hidden=48, seed=1), args=config,
                                  train_dataset=date_dataset, processing_class=char_tokenizer)
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    assert (tmp_path / "run" / "checkpoint-2" / "training_args.bin").exists()
    assert files_holding(tmp_path, FLAG_TOKEN) == []
    assert trainer.args.hub_token == FLAG_TOKEN  # the run itself still has its token, for pushing
