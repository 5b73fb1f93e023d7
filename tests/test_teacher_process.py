"""The teacher in a side process (kd_llm.training.teacher_process): its logits, its errors and lifetime, on-policy
training from a teacher cache with it, and distill_llm.py choosing it for teacher_cache + lmbda > 0."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from accelerate import Accelerator

from kd_llm import DistillationTrainer
from kd_llm.data.collator import CausalLMCollator
from kd_llm.models.loading import load_model
from kd_llm.teacher_cache import TeacherCacheError, state_dict_sha256
from kd_llm.training.teacher_process import TeacherProcess, TeacherProcessError
from tests.conftest import teacher_watching_trainer, tiny_distillation_config, tiny_llama
from tests.helpers.cache import build as build_cache

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


@pytest.fixture(scope="module")
def proxy(tiny_teacher_dir):
    with TeacherProcess(tiny_teacher_dir, num_threads=1) as teacher:
        yield teacher


@pytest.fixture(scope="module")
def teacher(tiny_teacher_dir):
    return load_model(tiny_teacher_dir).eval()


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, teacher, date_dataset, char_tokenizer):
    path = tmp_path_factory.mktemp("cache")
    build_cache(path, teacher, date_dataset, char_tokenizer, k=16, temperature=2.0)
    return path


def params(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def max_difference(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


def spawned_children() -> set[int]:
    """Pids of this process's multiprocessing "spawn" children, and of any zombie child."""
    pids = set()
    for child in psutil.Process().children():
        try:
            if child.status() == psutil.STATUS_ZOMBIE or "spawn_main" in " ".join(child.cmdline()):
                pids.add(child.pid)
        except psutil.NoSuchProcess:
            pass
    return pids


def test_proxy_logits_equal_the_in_process_teachers_on_a_padded_batch(proxy, teacher, date_dataset,
                                                                       char_tokenizer):
    batch = CausalLMCollator(char_tokenizer.pad_token_id)([date_dataset[i] for i in range(6)])
    assert (batch["attention_mask"] == 0).any()  # rows of different lengths: padding is exercised
    got = proxy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    with torch.no_grad():
        expected = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert got.dtype == torch.float32 and got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    # What the trainer checks it by, as the child reported it.
    assert proxy.weights_hash == state_dict_sha256(teacher)
    assert proxy.reported_embedding_rows == {"input": 89, "output": 89}
    assert proxy.config.hidden_size == 48
    with pytest.raises(TypeError, match="returns logits only"):
        proxy(input_ids=batch["input_ids"], output_hidden_states=True)


def test_child_errors_surface_in_the_parent_and_close_leaves_no_process(tmp_path, tiny_teacher_dir):
    before, started = spawned_children(), time.monotonic()
    with pytest.raises(TeacherProcessError, match=r"failed while loading .*FileNotFoundError: model path .*missing"):
        TeacherProcess(tmp_path / "missing")
    assert time.monotonic() - started < 60  # the child's start-up (imports) and its error, not a timeout
    assert spawned_children() <= before  # the failed child was joined

    teacher = TeacherProcess(tiny_teacher_dir, num_threads=1)
    pid = teacher.pid
    with pytest.raises(TeacherProcessError, match="failed while scoring a batch: IndexError"):
        teacher(input_ids=torch.tensor([[1000]]))  # an id past the embedding: the child's forward raises
    assert teacher(input_ids=torch.tensor([[5, 6]])).logits.shape == (1, 2, 89)  # and keeps serving
    teacher.close()
    assert not teacher.is_alive() and not psutil.pid_exists(pid)  # joined: no zombie either
    with pytest.raises(TeacherProcessError, match="closed"):
        teacher(input_ids=torch.tensor([[5, 6]]))
    teacher.close()  # idempotent

    killed = TeacherProcess(tiny_teacher_dir, num_threads=1)
    os.kill(killed.pid, signal.SIGKILL)  # dies without a word (as when out of memory)
    started = time.monotonic()
    with pytest.raises(TeacherProcessError, match="exited with code -9 while scoring a batch"):
        killed(input_ids=torch.tensor([[5, 6]]))
    assert time.monotonic() - started < 5 and not psutil.pid_exists(killed.pid)


def test_on_policy_from_a_cache_with_the_side_process_teacher_trains_like_the_in_process_teacher(
        tmp_path, proxy, teacher, cache_dir, date_dataset, char_tokenizer):
    # seed 2, lmbda 0.5: steps 0 and 3 are on-policy, 1 and 2 come from the cache.
    settings = dict(lmbda=0.5, max_steps=4, seed=2, optim="sgd", learning_rate=0.5, teacher_cache=str(cache_dir),
                    generation_max_new_tokens=12)

    def run(name, teacher_model):
        trainer = DistillationTrainer(model=tiny_llama(89, seed=2), teacher_model=teacher_model,
                                      args=tiny_distillation_config(tmp_path / name, **settings),
                                      train_dataset=date_dataset, processing_class=char_tokenizer)
        trainer.train()
        return trainer

    live = run("live", teacher)
    served_before = proxy.requests
    side = run("side", proxy)
    assert side.teacher is proxy and side.teacher_cache is not None and side.fused_loss  # cached batches: fused
    on_policy = side.completion_generator.run_totals()["on_policy_batches"]
    assert on_policy == 2 and proxy.requests - served_before == on_policy  # each sampled batch scored once, there
    start = params(tiny_llama(89, seed=2))
    assert max_difference(params(live.model), start) > 1e-2
    assert max_difference(params(side.model), params(live.model)) < 1e-5
    kd = lambda t: [e["kd_loss"] for e in t.state.log_history if "kd_loss" in e]  # noqa: E731
    assert kd(side) == pytest.approx(kd(live), rel=1e-5, abs=1e-6)  # logs are rounded to 6 decimals


def test_the_side_process_teacher_is_refused_where_it_cannot_serve(tmp_path, proxy, cache_dir, date_dataset,
                                                                     char_tokenizer, monkeypatch):
    other = tmp_path / "other_cache"
    build_cache(other, tiny_llama(89, hidden=48, seed=3), date_dataset, char_tokenizer, k=16, temperature=2.0)

    def trainer(**overrides):
        return DistillationTrainer(model=tiny_llama(89, seed=2), teacher_model=proxy,
                                   args=tiny_distillation_config(tmp_path / "run", **overrides),
                                   train_dataset=date_dataset, processing_class=char_tokenizer)

    with pytest.raises(TeacherCacheError, match="made by another teacher"):
        trainer(lmbda=0.5, teacher_cache=str(other))
    with pytest.raises(ValueError, match="seq_kd has the teacher write completions"):
        trainer(seq_kd=True)
    with pytest.raises(ValueError, match="hidden_weight / attention_weight read the teacher's hidden states"):
        trainer(hidden_weight=1.0)
    with pytest.raises(ValueError, match="use teacher_cache .* not precompute_teacher_logits"):
        trainer(precompute_teacher_logits=True)
    monkeypatch.setattr(Accelerator, "num_processes", property(lambda self: 2))
    with pytest.raises(ValueError, match="each rank would need its own side process"):
        trainer(lmbda=0.5)
    monkeypatch.undo()
    # Without a teacher, the on-policy error points at the side-process teacher.
    with pytest.raises(ValueError, match=r"only a live teacher can score or write.*teacher_model=TeacherProcess"):
        DistillationTrainer(model=tiny_llama(89, seed=2),
                            args=tiny_distillation_config(tmp_path, lmbda=0.5, teacher_cache=str(cache_dir)),
                            train_dataset=date_dataset, processing_class=char_tokenizer)


def test_distill_script_scores_on_policy_samples_in_a_side_process(tmp_path, char_tokenizer, monkeypatch):
    """configs/date_on_policy_cached.yaml's two commands on a tiny teacher: the KD trainer gets a TeacherProcess,
    the training process holds no teacher, and the side process is gone when the script returns."""
    import kd_llm.distillation_modes

    seen = {}

    monkeypatch.setattr(kd_llm.distillation_modes, "DistillationTrainer", teacher_watching_trainer(seen, 40))
    sys.path.insert(0, str(SCRIPTS))
    import cache_teacher
    import distill_llm

    teacher_dir = tmp_path / "teacher"  # 40 wide: the only model of that width
    tiny_llama(len(char_tokenizer), hidden=40, seed=1).save_pretrained(teacher_dir)
    char_tokenizer.save_pretrained(teacher_dir)
    common = ["--config", str(CONFIGS / "date_on_policy_cached.yaml"), "--teacher", str(teacher_dir),
              "--teacher_cache", str(tmp_path / "cache"), "--output_dir", str(tmp_path / "out"), "--train_size", "12",
              "--disable_tqdm", "true", "--use_cpu", "true"]
    cache_teacher.main([*common, "--cache_k", "8"])
    # seed 2: step 0 is on-policy, step 1 comes from the cache.
    results = distill_llm.main([*common, "--max_steps", "2", "--per_device_train_batch_size", "4", "--seed", "2",
                                "--generation_max_new_tokens", "12", "--compare_hard_labels", "false",
                                "--evaluate_skills", "false", "--write_report", "false", "--force", "true",
                                "--logging_steps", "1"])
    assert results["steps"] == 2
    proxy = seen["teacher_model"]
    assert isinstance(proxy, TeacherProcess) and seen["teachers alive"] == 0
    assert proxy.requests == results["training_generation"]["on_policy_batches"] == 1
    assert not proxy.is_alive() and not psutil.pid_exists(proxy.pid)  # stopped when training ended
    logged = [entry["kd_loss"] for entry in results["kd_log_history"] if "kd_loss" in entry]
    assert len(logged) == 2 and all(value > 0 for value in logged)


def test_hidden_state_proxy_ships_final_states_and_its_head(tiny_teacher_dir, teacher, date_dataset, char_tokenizer):
    """hidden_states=True: d numbers per position cross the process boundary instead of V, the head comes once at
    start-up, and the fused loss on them is the dense loss on the in-process teacher's logits (float32: 1e-5)."""
    from kd_llm.losses import distillation_objective
    from kd_llm.losses.fused import fused_distillation_objective
    from kd_llm.models.lm_head import HIDDEN_STATE_FORWARD_KWARGS, final_hidden_states, head_of_model

    batch = CausalLMCollator(char_tokenizer.pad_token_id)([date_dataset[i] for i in range(5)])
    ids, mask, shifted = batch["input_ids"], batch["attention_mask"], batch["labels"][:, 1:]
    student = tiny_llama(89, seed=4)
    with TeacherProcess(tiny_teacher_dir, num_threads=1, hidden_states=True) as hidden_proxy:
        assert hidden_proxy.head.sha256 == head_of_model(teacher).sha256
        assert type(hidden_proxy.get_output_embeddings()) is torch.nn.Linear
        outputs = hidden_proxy(input_ids=ids, attention_mask=mask, use_cache=False, **HIDDEN_STATE_FORWARD_KWARGS)
        states = outputs.hidden_states[-1]
        torch.testing.assert_close(states, final_hidden_states(teacher, ids, mask), rtol=0, atol=1e-6)
        assert outputs.logits.shape == (5, 1, 89)
        assert hidden_proxy.bytes_received == ids.numel() * 48 * 4  # float32 [B, T, d], not [B, T, V]
        hidden_proxy(input_ids=ids, attention_mask=mask)  # the logits path still works
        assert hidden_proxy.bytes_received == ids.numel() * (48 + 89) * 4
    student_out = student(input_ids=ids, attention_mask=mask, **HIDDEN_STATE_FORWARD_KWARGS)
    options = dict(alpha=0.5, loss="reverse_kl", temperature=2.0)
    fused = fused_distillation_objective(student_out.hidden_states[-1][:, :-1], student.lm_head.weight, shifted,
                                         states[:, :-1], hidden_proxy.head.weight, **options)
    with torch.no_grad():
        teacher_logits = teacher(input_ids=ids, attention_mask=mask).logits[:, :-1]
    dense = distillation_objective(student(input_ids=ids, attention_mask=mask).logits[:, :-1], teacher_logits,
                                   shifted, **options)
    for name in ("total", "ce", "kd"):
        torch.testing.assert_close(getattr(fused, name), getattr(dense, name).detach(), rtol=1e-5, atol=1e-5)


def test_hidden_state_proxy_refuses_a_teacher_whose_logits_are_not_its_heads(tmp_path, char_tokenizer):
    from transformers import CohereConfig, CohereForCausalLM

    CohereForCausalLM(CohereConfig(vocab_size=89, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, logit_scale=0.25)).save_pretrained(
        tmp_path)
    with pytest.raises(TeacherProcessError, match="logit_scale"):
        TeacherProcess(tmp_path, num_threads=1, hidden_states=True)


def test_packed_rows_reach_the_child_with_their_positions_and_score_each_example_alone(proxy, teacher, date_dataset,
                                                                                       char_tokenizer):
    """packing=True: the proxy sends position_ids and no mask, so the child isolates the examples (per-example
    logits of the padded batch, 1e-5); the in-process teacher on the same packed rows gives the same logits."""
    from kd_llm.data.packing import PACKED_EXAMPLE_KEY, PackingCollator, unpack

    features = [date_dataset[i] for i in range(6)]
    padded = CausalLMCollator(char_tokenizer.pad_token_id)(features)
    packed = PackingCollator(char_tokenizer.pad_token_id, max_length=160)(features)
    assert packed["input_ids"].shape[0] < len(features)
    got = proxy(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits
    with torch.no_grad():
        # use_cache=False, as every kd_llm forward: with a KV cache transformers does not detect packed rows.
        in_process = teacher(input_ids=packed["input_ids"], position_ids=packed["position_ids"],
                             use_cache=False).logits
        reference = teacher(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
    torch.testing.assert_close(got, in_process, rtol=0, atol=1e-6)
    for example, logits in enumerate(unpack(got, packed[PACKED_EXAMPLE_KEY])):
        n = int(padded["attention_mask"][example].sum())
        torch.testing.assert_close(logits, reference[example, :n], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fused", [False, True])
def test_side_process_teacher_with_packing_gives_the_padded_loss_and_gradients(tmp_path, proxy, tiny_teacher_dir,
                                                                               date_dataset, char_tokenizer, fused):
    """Dataset batches and the student's on-policy samples (lmbda=1), scored in the side process, packed vs
    padded: loss and gradients within 1e-5; dense (logits over the Pipe) and fused (hidden states over the Pipe)."""
    from tests.test_packed_generation import assert_same_loss_and_gradients, micro_batches

    settings = dict(lmbda=1.0, generation_max_new_tokens=12, fused_loss="true" if fused else "false")
    import contextlib

    # The module's proxy must stay open for the other tests: only the hidden-state one is closed here.
    opened = TeacherProcess(tiny_teacher_dir, num_threads=1, hidden_states=True) if fused else None
    with opened if fused else contextlib.nullcontext(proxy) as side:
        trainers = {}
        for packing in (False, True):
            trainers[packing] = DistillationTrainer(
                model=tiny_llama(89, seed=2), teacher_model=side, train_dataset=date_dataset,
                processing_class=char_tokenizer,
                args=tiny_distillation_config(tmp_path / str(packing), packing=packing, packing_max_length=160,
                                              **settings))
        padded, packed = trainers[False], trainers[True]
        assert packed.teacher is side and packed.fused_loss == padded.fused_loss == fused
        padded_in, packed_in = micro_batches(padded, date_dataset), micro_batches(packed, date_dataset)
        assert all(b["input_ids"].shape[0] < 4 for b in packed_in)
        for padded_batch, packed_batch in zip(padded_in, packed_in):  # the dataset's completions
            assert_same_loss_and_gradients(padded, packed, padded_batch, packed_batch)
        requests = side.requests
        generated = [t.completion_generator.replace(b, step=0, student=t.model, teacher=t.teacher)
                     for t, b in ((padded, padded_in), (packed, packed_in))]
        for padded_batch, packed_batch in zip(*generated):  # the student's samples
            assert packed_batch["input_ids"].shape[0] < padded_batch["input_ids"].shape[0]
            assert_same_loss_and_gradients(padded, packed, padded_batch, packed_batch)
        assert side.requests - requests == 4  # each generated batch scored once per trainer, in the child


def test_on_policy_from_a_cache_with_the_side_process_teacher_and_packing_trains_the_padded_runs_student(
        tmp_path, proxy, cache_dir, date_dataset, char_tokenizer):
    """What the side process is for, packed: the cache serves the packed dataset batches, the child scores the
    student's packed samples (seed 2, lmbda 0.5: steps 0 and 3 on-policy)."""
    settings = dict(lmbda=0.5, max_steps=4, seed=2, optim="sgd", learning_rate=0.5, teacher_cache=str(cache_dir),
                    generation_max_new_tokens=12)
    runs = {}
    for packing in (False, True):
        runs[packing] = DistillationTrainer(
            model=tiny_llama(89, seed=2), teacher_model=proxy, train_dataset=date_dataset,
            processing_class=char_tokenizer,
            args=tiny_distillation_config(tmp_path / str(packing), packing=packing, **settings))
        before = proxy.requests
        runs[packing].train()
        assert proxy.requests - before == 2  # each sampled batch scored once, in the child
    padded, packed = runs[False], runs[True]
    assert packed.completion_generator.run_totals()["on_policy_batches"] == 2
    assert max_difference(params(padded.model), params(tiny_llama(89, seed=2))) > 1e-2
    assert max_difference(params(packed.model), params(padded.model)) < 1e-5
