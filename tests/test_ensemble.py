"""Ensemble of teachers: the mixture target against a hand-computed float64 reference, its validity checks, and the
ensemble trainer end to end (live and precomputed, teachers loaded one after another)."""

import pytest
import torch
from safetensors.torch import load_file

from kd_llm import DistillationTrainer
from kd_llm.losses import kd_loss
from kd_llm.models.vocab import VocabularyMismatchError
from kd_llm.training.ensemble import EnsembleDistillationTrainer
from kd_llm.training.teachers import TeacherEnsemble, ensemble_target_logits, mix_log_probs
from tests.conftest import tiny_llama
from tests.conftest import tiny_distillation_config as make_config
from tests.helpers.training import max_difference, params

V = 11


def reference_probs(logits, weights, temperature, mixture):
    """Naive float64: softmax each teacher, then the weighted arithmetic or (renormalised) geometric mean."""
    probs = [torch.softmax(z[..., :V].double() / temperature, dim=-1) for z in logits]
    if mixture == "probs":
        return sum(w * p for w, p in zip(weights, probs))
    unnormalised = torch.ones_like(probs[0])
    for w, p in zip(weights, probs):
        unnormalised = unnormalised * p**w
    return unnormalised / unnormalised.sum(-1, keepdim=True)


@pytest.mark.parametrize("mixture", ["probs", "log_probs"])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_ensemble_target_is_the_weighted_mean(mixture, temperature):
    torch.manual_seed(0)
    # Members padded to different widths, as real checkpoints are; only the first V columns are tokens.
    logits = [3 * torch.randn(2, 5, V), 3 * torch.randn(2, 5, V + 5), 3 * torch.randn(2, 5, V + 1)]
    weights = [0.5, 0.3, 0.2]
    target = ensemble_target_logits(logits, weights, temperature=temperature, mixture=mixture, vocab_size=V)
    assert target.shape == (2, 5, V) and target.dtype == torch.float32
    expected = reference_probs(logits, weights, temperature, mixture)
    # What kd_loss will read: softmax(z / T).
    torch.testing.assert_close(torch.softmax(target.double() / temperature, -1), expected, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(expected, reference_probs(logits[:1], [1.0], temperature, mixture))


def test_kd_loss_towards_the_ensemble_is_the_kl_to_the_mixture():
    torch.manual_seed(1)
    teachers = [torch.randn(4, V), torch.randn(4, V)]
    student = torch.randn(4, V)
    labels = torch.tensor([1, 2, -100, 3])
    temperature = 2.0
    target = ensemble_target_logits(teachers, [0.25, 0.75], temperature=temperature)
    p = reference_probs(teachers, [0.25, 0.75], temperature, "probs")
    log_q = torch.log_softmax(student.double() / temperature, -1)
    per_token = (p * (p.log() - log_q)).sum(-1) * temperature**2
    expected = per_token[labels != -100].mean()
    assert kd_loss(student, target, labels, temperature=temperature).item() == pytest.approx(expected.item(),
                                                                                             rel=1e-5)


def test_one_teacher_mixture_is_that_teacher():
    torch.manual_seed(2)
    z = torch.randn(3, V)
    for mixture in ("probs", "log_probs"):
        torch.testing.assert_close(mix_log_probs([z], temperature=2.0, mixture=mixture),
                                   torch.log_softmax(z / 2.0, -1))


@pytest.mark.parametrize("weights, message", [
    ([0.5, -0.5], "positive"), ([0.0, 1.0], "positive"), ([float("nan"), 1.0], "positive"),
    ([1.0, 1.0], r"sum to 1.*\[0.5, 0.5\]"), ([1.0], "one weight per teacher"),
])
def test_bad_weights_are_refused(weights, message):
    with pytest.raises(ValueError, match=message):
        TeacherEnsemble([torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)], weights)


def test_unknown_mixture_is_refused():
    with pytest.raises(ValueError, match="unknown ensemble mixture"):
        TeacherEnsemble([torch.nn.Linear(1, 1)], mixture="median")


def teachers(tokenizer):
    # The second teacher's embedding is padded (96 rows for 89 tokens), like Qwen's 151936 vs 152064.
    return [tiny_llama(len(tokenizer), hidden=48, seed=1), tiny_llama(96, hidden=32, layers=3, seed=3)]


def train_ensemble(tmp_path, tokenizer, dataset, members, weights=(0.6, 0.4), student=None, **overrides):
    student = student if student is not None else tiny_llama(len(tokenizer), seed=2)
    trainer = EnsembleDistillationTrainer(
        model=student, teacher_model=TeacherEnsemble(members, list(weights), mixture=overrides.pop("mixture", "probs")),
        args=make_config(tmp_path, **overrides), train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    return trainer


def test_ensemble_trains_the_student_and_leaves_the_teachers_untouched(tmp_path, char_tokenizer, date_dataset):
    members = teachers(char_tokenizer)
    before = [params(m) for m in members]
    student = tiny_llama(len(char_tokenizer), seed=2)
    student_before = params(student)
    trainer = train_ensemble(tmp_path, char_tokenizer, date_dataset, members, student=student, save_strategy="steps",
                             save_steps=3)
    assert trainer.kd_vocab_size == len(char_tokenizer)
    assert max_difference(params(student), student_before) > 1e-4
    for member, original in zip(members, before):
        assert max_difference(params(member), original) == 0.0
        assert not member.training and all(not p.requires_grad and p.grad is None for p in member.parameters())
    logged = [e for e in trainer.state.log_history if "kd_loss" in e]
    assert len(logged) == 3 and all(e["kd_loss"] > 0 and e["ce_loss"] > 0 for e in logged)
    # The checkpoint holds the student alone and loads back into it.
    saved = load_file(str(tmp_path / "run" / "checkpoint-3" / "model.safetensors"))
    assert set(saved) <= set(student.state_dict()) and all(48 not in t.shape for t in saved.values())
    for name, tensor in saved.items():
        torch.testing.assert_close(tensor, student.state_dict()[name])


def test_one_teacher_ensemble_trains_like_the_plain_trainer(tmp_path, char_tokenizer, date_dataset):
    teacher = tiny_llama(len(char_tokenizer), hidden=48, seed=1)
    plain = DistillationTrainer(model=tiny_llama(len(char_tokenizer), seed=2), teacher_model=teacher,
                                # The dense loss path, as the ensemble's, so both compute the same float ops.
                                args=make_config(tmp_path / "plain", fused_loss="false"), train_dataset=date_dataset,
                                processing_class=char_tokenizer)
    plain.train()
    ensemble = train_ensemble(tmp_path / "ensemble", char_tokenizer, date_dataset, [teacher], weights=[1.0])
    assert max_difference(params(plain.model), params(ensemble.model)) < 1e-5


@pytest.mark.parametrize("mixture", ["probs", "log_probs"])
def test_precomputed_ensemble_loads_teachers_one_after_another(tmp_path, char_tokenizer, date_dataset, mixture):
    live = train_ensemble(tmp_path / "live", char_tokenizer, date_dataset, teachers(char_tokenizer),
                          mixture=mixture)
    models = teachers(char_tokenizer)
    loaded_when_called = []

    def loader(index):
        def load():
            loaded_when_called.append(sum(m is not None for m in ensemble.models))
            return models[index]
        return load

    ensemble = TeacherEnsemble([loader(0), loader(1)], [0.6, 0.4], mixture=mixture)
    cached = EnsembleDistillationTrainer(
        model=tiny_llama(len(char_tokenizer), seed=2), teacher_model=ensemble,
        args=make_config(tmp_path / "cached", precompute_teacher_logits=True), train_dataset=date_dataset,
        processing_class=char_tokenizer)
    assert loaded_when_called == [0, 0]  # each loader ran while no other teacher was held
    assert ensemble.models == [None, None]
    cached.train()
    assert max_difference(params(live.model), params(cached.model)) < 1e-5


def test_a_teacher_on_another_tokenizer_is_named_and_refused(tmp_path, char_tokenizer, date_dataset):
    from kd_llm.models.char_tokenizer import build_char_tokenizer

    other = build_char_tokenizer("0123456789abcdefghij-:,")
    ensemble = TeacherEnsemble([tiny_llama(len(char_tokenizer)), tiny_llama(len(other))],
                               tokenizers=[None, other], names=["math teacher", "other teacher"])
    with pytest.raises(VocabularyMismatchError, match="other teacher of the ensemble: teacher and student tok"):
        EnsembleDistillationTrainer(model=tiny_llama(len(char_tokenizer)), teacher_model=ensemble,
                                    args=make_config(tmp_path), train_dataset=date_dataset,
                                    processing_class=char_tokenizer)


def test_a_teacher_with_too_few_embedding_rows_is_refused(tmp_path, char_tokenizer, date_dataset):
    ensemble = TeacherEnsemble([tiny_llama(len(char_tokenizer)), tiny_llama(50)])
    with pytest.raises(VocabularyMismatchError, match="teacher 1 of the ensemble.*rows"):
        EnsembleDistillationTrainer(model=tiny_llama(len(char_tokenizer)), teacher_model=ensemble,
                                    args=make_config(tmp_path), train_dataset=date_dataset,
                                    processing_class=char_tokenizer)


def test_precomputed_mixture_needs_a_constant_temperature(tmp_path, char_tokenizer, date_dataset):
    with pytest.raises(ValueError, match="constant temperature"):
        EnsembleDistillationTrainer(
            model=tiny_llama(len(char_tokenizer)), teacher_model=TeacherEnsemble(teachers(char_tokenizer)),
            args=make_config(tmp_path, precompute_teacher_logits=True, temperature=4.0, final_temperature=1.0,
                             temperature_schedule="linear"),
            train_dataset=date_dataset, processing_class=char_tokenizer)


@pytest.mark.parametrize("mixture", ["probs", "log_probs"])
def test_packed_batch_gives_the_ensembles_padded_loss_and_gradients(tmp_path, char_tokenizer, date_dataset, mixture):
    """packing=True: every member runs on the packed rows with their position_ids; the mixture's loss and gradients
    are the padded batch's (1e-5), a member with a padded embedding included."""
    from kd_llm.data.packing import PackingCollator
    from tests.test_packed_generation import assert_same_loss_and_gradients

    features = [date_dataset[i] for i in range(8)]
    trainers = {packing: EnsembleDistillationTrainer(
        model=tiny_llama(len(char_tokenizer), seed=2), processing_class=char_tokenizer, train_dataset=date_dataset,
        teacher_model=TeacherEnsemble(teachers(char_tokenizer), [0.6, 0.4], mixture=mixture),
        args=make_config(tmp_path / str(packing), packing=packing)) for packing in (False, True)}
    packed = trainers[True]
    assert isinstance(packed.data_collator, PackingCollator)
    packed_batch = packed.data_collator(features)
    assert packed_batch["input_ids"].shape[0] < len(features)
    assert_same_loss_and_gradients(trainers[False], packed, trainers[False].data_collator(features), packed_batch)
