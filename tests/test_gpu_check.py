"""benchmarks/gpu_check.sh --dry-run: every GPU check runs on CPU at toy sizes, without `datasets` or `evaluate`
(the GPU machine has neither), so the script is ready the day a GPU is lent."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_gpu_check_dry_run_runs_every_section_without_datasets(tmp_path):
    blocker = tmp_path / "block"
    blocker.mkdir()
    # Importing either one fails in the checked process, as it would on the GPU machine.
    (blocker / "sitecustomize.py").write_text('import sys\nsys.modules["datasets"] = None\n'
                                              'sys.modules["evaluate"] = None\n')
    output = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHONPATH": str(blocker), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run", "--output", str(output)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(output.read_text())
    assert report["dry_run"] and report["ok"]
    sections = report["sections"]
    assert set(sections) == {"trainer", "loss_memory", "kd_step", "fsdp"}
    runs = sections["trainer"]["runs"]
    assert {(r["fused_loss"], r["packing"]) for r in runs} == {("false", False), ("false", True), ("true", False),
                                                                ("true", True)}
    assert all(r["checks"]["teacher_unchanged"] and r["loss_dtypes"] == ["torch.float32"] for r in runs)
    assert sections["trainer"]["packed_logits"]["max_abs_diff"] < 1e-5
    assert all(sections["loss_memory"]["dense_equals_fused"].values())
    assert {"dense_kd", "fused_kd", "hidden_cache_kd", "ce_step"} <= set(sections["kd_step"]["steps"])
    assert sections["fsdp"]["global_step"] == 3


def test_gpu_check_refuses_to_pretend_without_a_gpu(tmp_path):
    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the real check runs instead")
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--output",
                             str(tmp_path / "x.json")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "no CUDA device here" in result.stderr
    assert not (tmp_path / "x.json").exists()
