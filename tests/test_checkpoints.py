"""kd_llm.training.checkpoints: atomic checkpoint folders, resumes that take the newest complete checkpoint and name
what they skip, refusals of missing, partial, corrupt or optimizer-less checkpoints, and a full disk mid-save."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kd_llm import DistillationTrainer
from kd_llm.errors import CheckpointError, KdLlmError, OutputError
from kd_llm.training.checkpoints import STAGING_PREFIX, checkpoint_problem, last_complete_checkpoint
from tests.conftest import tiny_distillation_config as make_config, tiny_llama

REPO = Path(__file__).resolve().parent.parent


def trainer_for(folder, tokenizer, dataset, **overrides):
    values = dict(max_steps=6, per_device_train_batch_size=4, save_strategy="steps", save_steps=2)
    values.update(overrides)
    return DistillationTrainer(model=tiny_llama(len(tokenizer), seed=2),
                               teacher_model=tiny_llama(len(tokenizer), hidden=48, seed=1),
                               args=make_config(folder, **values), train_dataset=dataset, processing_class=tokenizer)


def weights(model) -> dict:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, char_tokenizer, date_dataset):
    """6 steps, a checkpoint every 2: the reference every resume must match."""
    folder = tmp_path_factory.mktemp("full")
    trainer = trainer_for(folder, char_tokenizer, date_dataset)
    trainer.train()
    return folder / "run", weights(trainer.model)


def copy_run(full_run, tmp_path, keep_steps):
    run_dir, _ = full_run
    target = tmp_path / "run"
    target.mkdir()
    for step in keep_steps:
        shutil.copytree(run_dir / f"checkpoint-{step}", target / f"checkpoint-{step}")
    return target


def test_a_save_interrupted_midway_leaves_no_checkpoint_folder_and_the_older_ones_intact(
        tmp_path, char_tokenizer, date_dataset, monkeypatch):
    trainer = trainer_for(tmp_path, char_tokenizer, date_dataset, max_steps=4)
    calls = {"n": 0}
    original = DistillationTrainer._save_rng_state

    def crash_at_second_save(self, output_dir):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # as a kill between the optimizer and the trainer state would
        return original(self, output_dir)

    monkeypatch.setattr(DistillationTrainer, "_save_rng_state", crash_at_second_save)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    run_dir = tmp_path / "run"
    names = sorted(p.name for p in run_dir.iterdir())
    assert "checkpoint-4" not in names and f"{STAGING_PREFIX}checkpoint-4" in names
    assert checkpoint_problem(run_dir / "checkpoint-2") is None  # whole: weights, optimizer, RNG, state
    # Before kd_llm wrote checkpoints atomically, checkpoint-4 held weights without a trainer state here.
    assert (run_dir / f"{STAGING_PREFIX}checkpoint-4" / "checkpoint-4" / "model.safetensors").exists()


def test_resume_true_skips_an_interrupted_save_with_one_line_and_matches_the_uninterrupted_run(
        full_run, tmp_path, char_tokenizer, date_dataset, capsys):
    run_dir = copy_run(full_run, tmp_path, [2, 4])
    # A newest checkpoint as a kill during a non-atomic save left it: weights, no trainer state; and a staging
    # folder of an interrupted atomic save.
    partial = run_dir / "checkpoint-5"
    partial.mkdir()
    shutil.copy(run_dir / "checkpoint-4" / "model.safetensors", partial / "model.safetensors")
    (run_dir / f"{STAGING_PREFIX}checkpoint-6").mkdir()
    trainer = trainer_for(tmp_path, char_tokenizer, date_dataset)
    trainer.train(resume_from_checkpoint="true")  # as --resume_from_checkpoint true arrives from the command line
    out = capsys.readouterr().out
    assert f"skipping {run_dir / (STAGING_PREFIX + 'checkpoint-6')}" in out
    assert f"skipping the incomplete checkpoint {partial}: it has no trainer_state.json" in out
    assert same(weights(trainer.model), full_run[1])


@pytest.mark.parametrize("damage, words", [
    (lambda c: (c / "trainer_state.json").unlink(), "has no trainer_state.json"),
    (lambda c: (c / "trainer_state.json").write_text("{\"global_step\": "), "has a broken trainer_state.json"),
    (lambda c: (c / "optimizer.pt").unlink(), "has no optimizer.pt"),
    (lambda c: (c / "model.safetensors").write_bytes((c / "model.safetensors").read_bytes()[:-100]),
     "has a damaged model.safetensors"),
    (lambda c: (c / "model.safetensors").unlink(), "has no model weights"),
    (lambda c: shutil.rmtree(c), "does not exist"),
])
def test_a_named_checkpoint_that_cannot_be_resumed_is_refused_in_one_line(full_run, tmp_path, char_tokenizer,
                                                                          date_dataset, damage, words):
    run_dir = copy_run(full_run, tmp_path, [2])
    damage(run_dir / "checkpoint-2")
    trainer = trainer_for(tmp_path / "other", char_tokenizer, date_dataset)
    with pytest.raises(CheckpointError, match=words) as caught:
        trainer.train(resume_from_checkpoint=str(run_dir / "checkpoint-2"))
    assert "\n" not in str(caught.value) and isinstance(caught.value, KdLlmError)
    assert trainer.state.global_step == 0


def test_resume_true_without_any_complete_checkpoint_is_refused(tmp_path, char_tokenizer, date_dataset):
    (tmp_path / "run" / "checkpoint-2").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="holds no complete checkpoint-N folder"):
        trainer_for(tmp_path, char_tokenizer, date_dataset).train(resume_from_checkpoint=True)
    assert last_complete_checkpoint(tmp_path / "nowhere") is None


def test_a_full_disk_while_saving_names_the_file_and_keeps_the_older_checkpoints(
        tmp_path, char_tokenizer, date_dataset, monkeypatch):
    trainer = trainer_for(tmp_path, char_tokenizer, date_dataset, max_steps=4)
    original = torch.save

    def fill_the_disk(obj, path, *args, **kwargs):
        if "checkpoint-4" in str(path) and str(path).endswith("optimizer.pt"):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return original(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", fill_the_disk)
    with pytest.raises(OutputError, match="The disk is full: saving .*checkpoint-4 failed while writing "
                                          ".*optimizer.pt.*older checkpoints in .* are intact") as caught:
        trainer.train()
    assert "\n" not in str(caught.value)
    run_dir = tmp_path / "run"
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint-2"]  # no staging folder left behind
    assert checkpoint_problem(run_dir / "checkpoint-2") is None


def test_checkpoints_keep_their_rotation_and_best_model_path(tmp_path, char_tokenizer, date_dataset):
    trainer = trainer_for(tmp_path, char_tokenizer, date_dataset, save_total_limit=2)
    trainer.train()
    run_dir = tmp_path / "run"
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint-4", "checkpoint-6"]
    state = json.loads((run_dir / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6 and STAGING_PREFIX not in json.dumps(state)


def test_killed_during_a_checkpoint_save_resumes_from_the_last_complete_one(full_run, tmp_path, char_tokenizer,
                                                                           date_dataset, capsys):
    """kill -9 while checkpoint-4 is half on disk; resume_from_checkpoint true then takes checkpoint-2 (naming the
    interrupted save) and ends with the weights of the uninterrupted run."""
    marker = tmp_path / "saving"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    child = subprocess.Popen([sys.executable, "-m", "tests.support.save_kill_run", str(tmp_path), str(marker)],
                             cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert child.poll() is None, child.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the child never reached the checkpoint-4 save"
            time.sleep(0.2)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
        child.stderr.close()
    run_dir = tmp_path / "run"
    assert sorted(p.name for p in run_dir.iterdir()) == [f"{STAGING_PREFIX}checkpoint-4", "checkpoint-2"]
    trainer = trainer_for(tmp_path, char_tokenizer, date_dataset)
    trainer.train(resume_from_checkpoint=True)
    assert f"skipping {run_dir / (STAGING_PREFIX + 'checkpoint-4')}" in capsys.readouterr().out
    assert same(weights(trainer.model), full_run[1])
