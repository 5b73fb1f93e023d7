"""scripts/train_specialist.py: a from-scratch and a LoRA specialist train, save, score, and resume."""

import json
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.conftest import tiny_llama

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import train_specialist  # noqa: E402

TINY = ["--train_size", "32", "--eval_size", "5", "--hidden_size", "32", "--num_hidden_layers", "1",
        "--num_attention_heads", "2", "--num_key_value_heads", "1", "--intermediate_size", "64",
        "--per_device_train_batch_size", "8", "--report_to", "none", "--use_cpu", "true", "--disable_tqdm", "true",
        "--save_strategy", "steps", "--save_steps", "2", "--logging_steps", "1"]


def test_from_scratch_trains_saves_scores_and_resumes(tmp_path):
    run = ["--output_dir", str(tmp_path / "ckpt"), "--final_dir", str(tmp_path / "final"), *TINY]
    train_specialist.main([*run, "--max_steps", "2"])
    record = json.loads((tmp_path / "final" / "specialist_run.json").read_text())
    assert record["global_step"] == 2
    assert set(record["scores"]["per_category"]) == {"add", "sub", "diff", "weekday", "iso"}
    assert (tmp_path / "final" / "tokenizer.json").exists()
    first = load_file(str(tmp_path / "final" / "model.safetensors"))
    # Same command, more steps: resumes from checkpoint-2 instead of starting over.
    train_specialist.main([*run, "--max_steps", "4"])
    record = json.loads((tmp_path / "final" / "specialist_run.json").read_text())
    assert record["global_step"] == 4
    assert [e["step"] for e in record["log_history"] if "loss" in e] == [1, 2, 3, 4]  # history carried over
    assert any((first[k] - v).abs().max() > 0 for k, v in load_file(str(tmp_path / "final" /
                                                                         "model.safetensors")).items())


def test_lora_specialist_is_merged_into_a_plain_model(tmp_path, char_tokenizer):
    base = tmp_path / "base"
    tiny_llama(len(char_tokenizer), seed=3).save_pretrained(base)
    char_tokenizer.save_pretrained(base)
    train_specialist.main(["--base_model", str(base), "--use_lora", "true", "--lora_r", "4", "--max_steps", "2",
                           "--learning_rate", "0.01", "--output_dir", str(tmp_path / "ckpt"),
                           "--final_dir", str(tmp_path / "final"), *TINY])
    merged = load_file(str(tmp_path / "final" / "model.safetensors"))
    assert not any("lora" in name for name in merged)
    original = load_file(str(base / "model.safetensors"))
    assert any((merged[k] - original[k]).abs().max() > 0 for k in original)


def test_lora_without_base_model_is_refused(tmp_path):
    with pytest.raises(ValueError, match="use_lora needs base_model"):
        train_specialist.main(["--use_lora", "true", "--output_dir", str(tmp_path)])
