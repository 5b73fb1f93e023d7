"""``accelerate launch scripts/distill_llm.py --teacher http://127.0.0.1:PORT`` against scripts/serve_teacher.py:
two training processes, each asking the server for its own batches."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("aiohttp")
pytest.importorskip("httpx")

from tests.conftest import tiny_llama  # noqa: E402
from tests.helpers.launch import free_port  # noqa: E402
from tests.helpers.scripts import ROOT, distill_llm  # noqa: E402

ARGS = ["--student_init", "checkpoint", "--write_report", "false", "--precompute_teacher_logits", "false",
        "--evaluate_skills", "false", "--compare_hard_labels", "false",
        "--transfer_size", "0", "--max_steps", "3", "--train_size", "16", "--eval_size", "6", "--max_new_tokens",
        "12", "--logging_steps", "1", "--disable_tqdm", "true", "--per_device_train_batch_size", "4",
        "--teacher_top_k", "16", "--teacher_parity_examples", "0", "--teacher_retry_backoff", "0.05"]


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory, char_tokenizer):
    folder = tmp_path_factory.mktemp("student")
    tiny_llama(len(char_tokenizer), seed=3).save_pretrained(folder)
    char_tokenizer.save_pretrained(folder)
    return folder


def test_accelerate_launch_distill_llm_trains_against_the_served_teacher(served_teacher, student_dir, tmp_path):
    import httpx

    before = httpx.get(served_teacher.url + "/kd/v1/stats", timeout=20).json()["requests"]
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--main_process_port", str(free_port()), "--mixed_precision", "no", "--dynamo_backend", "no",
               str(ROOT / "scripts" / "distill_llm.py"), "--teacher", served_teacher.url,
               "--student_checkpoint", str(student_dir), "--output_dir", str(out), "--use_cpu", "true", *ARGS]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=420)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    results = json.loads((out / "results.json").read_text())
    assert [row["model"] for row in results["models"]] == ["student, before training", "student, distilled (KD)"]
    assert not results["teacher_check"]["ran"] and "served" in results["teacher_check"]["reason"]
    logged = [e for e in results["kd_log_history"] if "kd_loss" in e]
    assert len(logged) == 3 and all(e["kd_loss"] > 0 for e in logged)
    after = httpx.get(served_teacher.url + "/kd/v1/stats", timeout=20).json()["requests"]
    assert after - before >= 6  # 3 steps x 2 processes, each rank asking for its own batches
    assert (out / "model.safetensors").exists()


def test_a_served_teacher_refuses_what_needs_its_weights_before_any_work(tmp_path):
    with pytest.raises(ValueError, match=r"served teacher, so: student_init=scaled builds the student"):
        distill_llm.main(["--teacher", "http://127.0.0.1:9", "--output_dir", str(tmp_path / "o"),
                          "--student_init", "scaled", "--write_report", "false"])
    assert not (tmp_path / "o").exists()


def test_serve_teacher_refuses_a_missing_teacher_in_one_line(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "serve_teacher.py"), "--teacher",
                             str(tmp_path / "no_teacher"), "--port", "0"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("serve_teacher: ") and "does not exist" in last and "Traceback" not in result.stderr
