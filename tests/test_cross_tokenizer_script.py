"""configs/gemma3_to_smollm2_cross_tokenizer.yaml through scripts/distill_llm.py, on CPU, with both real tokenizers
and tiny models built from configs with the real vocabulary sizes (262,144 and 49,152)."""

import json

import pytest
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

from tests.conftest import tiny_llama
from tests.helpers.scripts import ROOT, distill_llm
from tests.helpers.tokenizers import needs_gemma, needs_smollm2, packaged_tokenizer

pytestmark = [needs_gemma, needs_smollm2]
CONFIG = ROOT / "configs" / "gemma3_to_smollm2_cross_tokenizer.yaml"
TINY = ["--train_size", "8", "--eval_size", "4", "--max_new_tokens", "8", "--max_steps", "2",
        "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", "--logging_steps", "1",
        "--student_num_layers", "1", "--bpb_max_bytes", "300", "--generation_batch_size", "4",
        "--calibration_size", "2", "--disable_tqdm", "true"]


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """A tiny Gemma-3 teacher with Gemma's tokenizer and a tiny 2-layer Llama with SmolLM2's, saved as folders."""
    folders = {}
    teacher_tokenizer, student_tokenizer = packaged_tokenizer("gemma3-270m"), packaged_tokenizer("smollm2-135m-instruct")
    torch.manual_seed(1)
    teacher = Gemma3ForCausalLM(Gemma3TextConfig(
        vocab_size=len(teacher_tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=512, sliding_window=64,
        pad_token_id=teacher_tokenizer.pad_token_id, bos_token_id=teacher_tokenizer.bos_token_id,
        eos_token_id=teacher_tokenizer.eos_token_id))
    student = tiny_llama(len(student_tokenizer), hidden=16, heads=2, kv_heads=1, seed=2)
    for name, model, tokenizer in (("teacher", teacher, teacher_tokenizer), ("student", student, student_tokenizer)):
        folders[name] = tmp_path_factory.mktemp(name)
        model.save_pretrained(folders[name])
        tokenizer.save_pretrained(folders[name])
    return folders


@pytest.mark.parametrize("loss", ["hybrid", pytest.param("span", marks=pytest.mark.slow)])
def test_yaml_config_distils_across_tokenizers_through_distill_llm(tiny_pair, tmp_path, loss):
    out = tmp_path / "out"
    results = distill_llm.main(["--config", str(CONFIG), "--teacher", str(tiny_pair["teacher"]),
                                "--student_model", str(tiny_pair["student"]), "--output_dir", str(out),
                                "--cross_tokenizer_loss", loss, *TINY])
    assert results["steps"] == 2 and results["cross_tokenizer"]["loss"] == loss
    coverage = results["cross_tokenizer"]
    assert 0 < coverage["spans_per_student_token"] <= 1 and 0 < coverage["spans_per_teacher_token"] <= 1
    logged = [e for e in results["kd_log_history"] if "kd_loss" in e]
    assert logged and all(e["kd_loss"] > 0 for e in logged)
    rows = {row["model"]: row for row in results["models"]}
    # Bits per byte for the teacher (its own tokenizer) and every student (theirs), on the same bytes.
    measured = [rows[name]["bits_per_byte"] for name in ("teacher", "student, before training",
                                                           "student, hard labels only", "student, distilled (KD)")]
    assert len({m["bytes"] for m in measured}) == 1 and all(m["bits_per_byte"] > 0 for m in measured)
    assert measured[0]["tokens"] != measured[1]["tokens"]  # two tokenizers, the same text
    assert rows["student, distilled (KD)"]["parameters"] < rows["teacher"]["parameters"]
    # The distilled student is saved with the student's tokenizer, not the teacher's.
    saved = json.loads((out / "tokenizer_config.json").read_text())
    assert saved.get("eos_token") == "<|im_end|>"


def test_cross_tokenizer_settings_that_cannot_work_fail_before_any_work(tiny_pair, tmp_path):
    out = tmp_path / "o"
    base = ["--config", str(CONFIG), "--teacher", str(tiny_pair["teacher"]), "--student_model",
            str(tiny_pair["student"]), "--output_dir", str(out), *TINY]
    with pytest.raises(ValueError, match="transfer_size .* not supported .*; write_report .* pass --write_report false"):
        distill_llm.main([*base, "--write_report", "true", "--transfer_size", "4"])  # every problem in one message
    with pytest.raises(ValueError, match="hidden_weight is not supported"):
        distill_llm.main([*base, "--hidden_weight", "1.0"])
    assert not out.exists()
