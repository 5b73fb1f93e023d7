"""run_distillation (through scripts/distill_llm.py) on what used to break it: a resumed run with the hard-label
baseline, and a GPT-2-family teacher (memory estimate, attention-map refusal before any work)."""

import json

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, PretrainedConfig

from kd_llm.features import UnsupportedAttentionError
from kd_llm.training.memory_estimate import ModelShape, report_memory_estimate
from tests.conftest import tiny_distillation_config
from tests.helpers.scripts import distill_llm

QUICK = ["--student_num_layers", "1", "--transfer_size", "0", "--train_size", "16", "--evaluate_skills", "false",
         "--write_report", "false", "--disable_tqdm", "true", "--logging_steps", "1"]


def test_resumed_run_resumes_each_trainer_from_its_own_checkpoints(tiny_teacher_dir, tmp_path, capsys):
    out = tmp_path / "out"
    common = ["--teacher", str(tiny_teacher_dir), "--output_dir", str(out), *QUICK, "--save_strategy", "steps",
              "--save_steps", "2"]
    distill_llm.main([*common, "--max_steps", "2"])
    capsys.readouterr()
    results = distill_llm.main([*common, "--max_steps", "4", "--resume_from_checkpoint", str(out / "checkpoint-2")])
    printed = capsys.readouterr().out
    baseline_dir = out / "hard_label_baseline"
    assert f"the hard-label baseline resumes from its own checkpoint {baseline_dir / 'checkpoint-2'}" in printed
    # The baseline's history is its own (hard labels: kd_loss 0 at every step), not the distilled student's.
    baseline = [e for e in results["baseline_log_history"] if "kd_loss" in e]
    assert [e["step"] for e in baseline] == [1, 2, 3, 4] and all(e["kd_loss"] == 0 for e in baseline)
    kd = [e for e in results["kd_log_history"] if "kd_loss" in e]
    assert [e["step"] for e in kd] == [1, 2, 3, 4] and all(e["kd_loss"] > 0 for e in kd)
    assert json.loads((baseline_dir / "checkpoint-4" / "trainer_state.json").read_text())["global_step"] == 4


@pytest.fixture(scope="module")
def gpt2_teacher_dir(tmp_path_factory, char_tokenizer):
    folder = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(char_tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=256,
                               pad_token_id=0, bos_token_id=1, eos_token_id=2)).save_pretrained(folder)
    char_tokenizer.save_pretrained(folder)
    return folder


def test_memory_estimate_reads_gpt2_through_its_attribute_map(gpt2_teacher_dir):
    shape = ModelShape.of(GPT2LMHeadModel.from_pretrained(gpt2_teacher_dir))
    assert (shape.hidden_size, shape.num_layers, shape.intermediate_size, shape.kv_size) == (32, 2, 128, 32)


def test_memory_estimate_of_an_unknown_layout_says_unknown_and_goes_on(tmp_path, date_dataset):
    class BareConfig(PretrainedConfig):  # names its widths, but no MLP width under any name transformers uses
        model_type = "bare"

    model = GPT2LMHeadModel(GPT2Config(vocab_size=89, n_embd=16, n_layer=1, n_head=2))
    model.config = BareConfig(hidden_size=16, num_attention_heads=2, num_hidden_layers=1, vocab_size=89)
    lines = []
    assert report_memory_estimate(model, None, tiny_distillation_config(tmp_path), date_dataset,
                                  print_fn=lines.append) is None
    assert lines == ["Memory estimate per process: unknown (BareConfig names no MLP width (intermediate_size))."]


def test_gpt2_teacher_distils_through_the_script(gpt2_teacher_dir, tmp_path):
    results = distill_llm.main(["--teacher", str(gpt2_teacher_dir), "--output_dir", str(tmp_path / "o"), *QUICK,
                                "--max_steps", "2", "--compare_hard_labels", "false"])
    assert results["steps"] == 2 and (tmp_path / "o" / "model.safetensors").exists()


def test_gpt2_attention_maps_are_refused_through_the_script_before_any_work(gpt2_teacher_dir, tmp_path):
    with pytest.raises(UnsupportedAttentionError, match="GPT2Block.*Use hidden-state distillation"):
        distill_llm.main(["--teacher", str(gpt2_teacher_dir), "--output_dir", str(tmp_path / "o"), *QUICK,
                          "--max_steps", "2", "--attention_weight", "1", "--precompute_teacher_logits", "false"])
    assert not (tmp_path / "o").exists()  # not even the baseline trained


def test_a_jsonl_run_scores_its_eval_dataset_not_its_training_file(tiny_teacher_dir, tmp_path):
    def write(name, count, offset):
        path = tmp_path / name
        path.write_text("\n".join(json.dumps({"prompt": f"{i}+{i}=", "completion": str(2 * i), "answer": str(2 * i)})
                                  for i in range(offset, offset + count)))
        return str(path)

    train, held_out = write("train.jsonl", 6, 0), write("eval.jsonl", 3, 100)
    results = distill_llm.main(["--teacher", str(tiny_teacher_dir), "--output_dir", str(tmp_path / "o"), *QUICK,
                                "--dataset", train, "--eval_dataset", held_out, "--evaluate_skills", "true",
                                "--eval_size", "10", "--max_new_tokens", "4", "--max_steps", "1", "--force", "true",
                                "--compare_hard_labels", "false"])
    teacher = results["models"][0]
    assert teacher["model"] == "teacher" and teacher["count"] == 3  # the 3 held-out records, not the 6
