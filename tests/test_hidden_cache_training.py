"""Training from the hidden-state teacher cache (kd_llm.training.targets.hidden_cache) and from a side process that
ships hidden states (targets.side_process_hidden): the run lands on the live-teacher run's parameters (float32 states:
1e-5), with the teacher's lm_head alone in memory; every divergence and a moving temperature are allowed; wrong
teachers, another vocabulary and a missing head are refused before any step."""

from __future__ import annotations

import pytest

from kd_llm import DistillationTrainer
from kd_llm.models.lm_head import head_of_model, load_teacher_head
from kd_llm.models.loading import load_model
from kd_llm.teacher_cache import TeacherCacheError
from kd_llm.training.targets import HiddenCache, HiddenCacheFused, Routed, SideProcessHidden
from kd_llm.training.teacher_process import TeacherProcess
from tests.conftest import tiny_distillation_config as train_config, tiny_llama
from tests.helpers.cache import build_hidden

HIDDEN = dict(teacher_cache_format="hidden_states")


@pytest.fixture(scope="module")
def teacher(tiny_teacher_dir):
    return load_model(tiny_teacher_dir).eval()


@pytest.fixture(scope="module")
def hidden_dir(tmp_path_factory, teacher, date_dataset, char_tokenizer):
    path = tmp_path_factory.mktemp("hidden_training")
    build_hidden(path, teacher, date_dataset, char_tokenizer, dtype="float32")
    return path


def params(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def largest_difference(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("fused_loss", ["auto", "false"])
def test_training_from_float32_states_lands_on_the_live_teacher_run(tmp_path, teacher, hidden_dir, tiny_teacher_dir,
                                                                    date_dataset, char_tokenizer, fused_loss):
    options = dict(fused_loss=fused_loss, distillation_loss="reverse_kl", max_steps=3)
    live = DistillationTrainer(model=tiny_llama(89, seed=2), teacher_model=teacher,
                               args=train_config(tmp_path / "a", **options), train_dataset=date_dataset,
                               processing_class=char_tokenizer)
    live.train()
    head = load_teacher_head(tiny_teacher_dir)  # the teacher's lm_head alone, from its safetensors
    cached = DistillationTrainer(model=tiny_llama(89, seed=2), teacher_model=head,
                                 args=train_config(tmp_path / "b", teacher_cache=str(hidden_dir), **HIDDEN, **options),
                                 train_dataset=date_dataset, processing_class=char_tokenizer)
    assert cached.teacher is None
    assert type(cached.target) is (HiddenCacheFused if fused_loss == "auto" else HiddenCache)
    cached.train()
    start = params(tiny_llama(89, seed=2))
    assert largest_difference(params(live.model), start) > 1e-3  # training moved the student
    assert largest_difference(params(live.model), params(cached.model)) < 1e-5
    kd = lambda t: [e["kd_loss"] for e in t.state.log_history if "kd_loss" in e]  # noqa: E731
    assert kd(cached) == pytest.approx(kd(live), rel=1e-5, abs=1e-6)  # logs are rounded to 6 decimals


def test_states_serve_any_divergence_and_a_moving_temperature(tmp_path, teacher, hidden_dir, date_dataset,
                                                              char_tokenizer):
    """What the top-k cache refuses (mse needs every probability; tail_bucket holds at one temperature only)."""
    args = train_config(tmp_path, teacher_cache=str(hidden_dir), **HIDDEN, distillation_loss="mse",
                        temperature=2.0, final_temperature=1.0, temperature_schedule="linear", max_steps=2)
    trainer = DistillationTrainer(model=tiny_llama(89, seed=2), teacher_model=head_of_model(teacher), args=args,
                                  train_dataset=date_dataset, processing_class=char_tokenizer)
    trainer.train()
    assert all(e["kd_loss"] > 0 for e in trainer.state.log_history if "kd_loss" in e)


def test_refuses_what_the_cache_cannot_serve(tmp_path, teacher, hidden_dir, date_dataset, char_tokenizer):
    config = train_config(tmp_path, teacher_cache=str(hidden_dir), **HIDDEN)
    student = tiny_llama(89, seed=2)
    common = dict(model=student, args=config, train_dataset=date_dataset, processing_class=char_tokenizer)
    with pytest.raises(ValueError, match="needs the teacher's lm_head: pass teacher_model=load_teacher_head"):
        DistillationTrainer(**common)
    with pytest.raises(TeacherCacheError, match="another teacher lm_head"):
        DistillationTrainer(teacher_model=head_of_model(tiny_llama(89, hidden=48, seed=3)), **common)
    with pytest.raises(TeacherCacheError, match="made by another teacher"):  # a whole model: its weights are checked
        other = tiny_llama(89, hidden=48, seed=1)
        other.model.norm.weight.data += 0.5  # same head, another body: other hidden states
        DistillationTrainer(teacher_model=other, **common)
    with pytest.raises(TeacherCacheError, match="covers other data"):
        DistillationTrainer(**{**common, "train_dataset": date_dataset.select(range(40))},
                            teacher_model=head_of_model(teacher))
    with pytest.raises(TeacherCacheError, match="holds top_k rows|holds hidden_states rows, not top_k"):
        DistillationTrainer(**{**common, "args": train_config(tmp_path, teacher_cache=str(hidden_dir))},
                            teacher_model=head_of_model(teacher))


def test_refuses_a_student_with_another_vocabulary(tmp_path, teacher, hidden_dir, date_dataset, char_tokenizer):
    from transformers import AutoTokenizer

    config = train_config(tmp_path, teacher_cache=str(hidden_dir), **HIDDEN)
    with pytest.raises(TeacherCacheError, match="output logits but the teacher cache covers"):
        DistillationTrainer(model=tiny_llama(60, seed=2), teacher_model=head_of_model(teacher), args=config,
                            train_dataset=date_dataset, processing_class=char_tokenizer)
    other = AutoTokenizer.from_pretrained(str(_tokenizer_copy(tmp_path, char_tokenizer)))
    with pytest.raises(TeacherCacheError, match="another tokenizer"):
        DistillationTrainer(model=tiny_llama(89, seed=2), teacher_model=head_of_model(teacher), args=config,
                            train_dataset=date_dataset, processing_class=other)


def _tokenizer_copy(tmp_path, tokenizer):
    """The char tokenizer with one more token: another vocabulary."""
    folder = tmp_path / "other_tokenizer"
    tokenizer.save_pretrained(folder)
    from transformers import AutoTokenizer

    changed = AutoTokenizer.from_pretrained(str(folder))
    changed.add_tokens(["<extra>"])
    changed.save_pretrained(folder)
    return folder


def test_on_policy_from_states_with_a_side_process_shipping_hidden_states(tmp_path, teacher, hidden_dir,
                                                                          tiny_teacher_dir, date_dataset,
                                                                          char_tokenizer):
    """Dataset batches from the cache, the student's samples scored by the side process: both on the fused loss,
    and the run lands where the in-process teacher's does."""
    # seed 2, lmbda 0.5: steps 0 and 3 are on-policy, 1 and 2 come from the cache.
    options = dict(lmbda=0.5, max_steps=4, seed=2, generation_max_new_tokens=6, distillation_loss="jsd")
    live = DistillationTrainer(model=tiny_llama(89, seed=2), teacher_model=teacher,
                               args=train_config(tmp_path / "a", teacher_cache=str(hidden_dir), **HIDDEN, **options),
                               train_dataset=date_dataset, processing_class=char_tokenizer)
    live.train()
    with TeacherProcess(tiny_teacher_dir, num_threads=1, hidden_states=True) as proxy:
        side = DistillationTrainer(model=tiny_llama(89, seed=2), teacher_model=proxy,
                                   args=train_config(tmp_path / "b", teacher_cache=str(hidden_dir), **HIDDEN,
                                                     **options),
                                   train_dataset=date_dataset, processing_class=char_tokenizer)
        assert isinstance(side.target, Routed) and isinstance(side.target.fallback, SideProcessHidden)
        assert isinstance(side.target.primary, HiddenCacheFused) and side.fused_loss
        side.train()
        # Only hidden states came back: [B, T, 48] float32 per request, never [B, T, 89] logits.
        assert proxy.requests >= 2 and proxy.bytes_received % (48 * 4) == 0
        assert proxy.bytes_received % (89 * 4) != 0
    fractions = [e["on_policy_fraction"] for e in side.state.log_history if "on_policy_fraction" in e]
    assert 0 < sum(fractions) < len(fractions)  # both kinds of batches ran
    assert largest_difference(params(live.model), params(side.model)) < 1e-5


def test_cache_script_then_distill_script_train_from_hidden_states(tmp_path, char_tokenizer, monkeypatch):
    """configs/date_hidden_cache.yaml's two commands on a tiny teacher: cache_teacher.py writes the hidden states,
    distill_llm.py trains from them, on packed batches, with only the teacher's lm_head in the training process."""
    import sys
    from pathlib import Path

    import kd_llm.distillation_modes
    from tests.conftest import teacher_watching_trainer

    seen = {}
    monkeypatch.setattr(kd_llm.distillation_modes, "DistillationTrainer", teacher_watching_trainer(seen, 40))
    scripts = Path(__file__).resolve().parent.parent / "scripts"
    sys.path.insert(0, str(scripts))
    import cache_teacher
    import distill_llm

    teacher_dir = tmp_path / "teacher"
    tiny_llama(len(char_tokenizer), hidden=40, seed=1).save_pretrained(teacher_dir)
    char_tokenizer.save_pretrained(teacher_dir)
    common = ["--config", str(scripts.parent / "configs" / "date_hidden_cache.yaml"), "--teacher", str(teacher_dir),
              "--teacher_cache", str(tmp_path / "cache"), "--output_dir", str(tmp_path / "out"), "--train_size", "12",
              "--transfer_size", "0", "--disable_tqdm", "true", "--use_cpu", "true"]
    metadata = cache_teacher.main([*common, "--cache_shard_size", "5"])
    assert metadata.payload == "hidden_states" and metadata.hidden_dtype == "float16" and metadata.complete
    results = distill_llm.main([*common, "--max_steps", "2", "--per_device_train_batch_size", "4",
                                "--compare_hard_labels", "false", "--evaluate_skills", "false",
                                "--write_report", "false", "--force", "true", "--logging_steps", "1"])
    assert results["steps"] == 2
    # The teacher's body is gone; its lm_head (40 wide) is a tensor, not a module: no 40-wide module is alive.
    assert type(seen["teacher_model"]).__name__ == "TeacherHead" and seen["teachers alive"] == 0
    assert seen["packed batches"]  # the config packs: the cached states are laid into packed rows
    assert results["teacher_cache"]["format"] == "hidden_states" and results["teacher_cache"]["hidden_size"] == 40
    logged = [entry["kd_loss"] for entry in results["kd_log_history"] if "kd_loss" in entry]
    assert len(logged) == 2 and all(value > 0 for value in logged)
