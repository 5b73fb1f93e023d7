"""The teacher-target contract, run over every target: the same batch gives the dense reference's loss components and
student gradients (1e-5 where the target is exact; the top-k cache, lossy by design, within its codec's error and
equal on its dense and fused forms). Also: declared capabilities route batches, and a subclass that overrides
compute_loss keeps the fused loss."""

import logging

import pytest
import torch
import torch.nn.functional as F
from transformers.modeling_outputs import CausalLMOutput

from kd_llm import DistillationTrainer
from kd_llm.data.collator import CausalLMCollator
from kd_llm.losses.sparse import SparseTargets
from kd_llm.serving.protocol import topk_with_tail
from kd_llm.teacher_cache import TeacherCache
from kd_llm.training.targets import (
    EXAMPLE_INDEX_COLUMN,
    EnsembleMixture,
    KDBatch,
    LiveHead,
    LiveLogits,
    LossRequest,
    PrecomputedLogits,
    PrecomputedTeacherLogits,
    Routed,
    ServedTeacher,
    SideProcess,
    TargetCannotServe,
    TopKCache,
    TopKCacheFused,
)
from kd_llm.training.teachers import TeacherEnsemble
from tests.conftest import CHAR_VOCAB, tiny_distillation_config, tiny_llama
from tests.helpers.cache import build

ALPHA, TEMPERATURE = 0.3, 2.0
EXACT = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def models():
    return tiny_llama(CHAR_VOCAB, seed=2), tiny_llama(CHAR_VOCAB, hidden=48, seed=1).eval()


@pytest.fixture(scope="module")
def indexed(date_dataset):
    return date_dataset.add_column(EXAMPLE_INDEX_COLUMN, list(range(len(date_dataset))))


@pytest.fixture(scope="module")
def collator(char_tokenizer):
    return CausalLMCollator(char_tokenizer.pad_token_id, passthrough_keys=(EXAMPLE_INDEX_COLUMN,))


def batch_of(indexed, collator, rows=(3, 0, 7, 5)) -> KDBatch:
    return KDBatch.pop_from(collator([indexed[i] for i in rows]))


def reference(student, teacher, batch: KDBatch):
    """Naive float64 alpha * CE + (1 - alpha) * T^2 * KL(teacher_T || student_T), summed over supervised tokens
    and divided by their count; its gradients on the student's parameters."""
    student.zero_grad()
    logits = student(**batch.inputs).logits[:, :-1].double()
    with torch.no_grad():
        teacher_logits = teacher(**batch.inputs).logits[:, :-1].double()
    mask = batch.shifted_labels != -100
    s, t, y = logits[mask], teacher_logits[mask], batch.shifted_labels[mask]
    count = mask.sum()
    ce = -(F.log_softmax(s, -1).gather(-1, y[:, None])).sum() / count
    log_pt, log_ps = F.log_softmax(t / TEMPERATURE, -1), F.log_softmax(s / TEMPERATURE, -1)
    kd = TEMPERATURE**2 * (log_pt.exp() * (log_pt - log_ps)).sum() / count
    total = ALPHA * ce + (1 - ALPHA) * kd
    total.backward()
    grads = {name: p.grad.clone() for name, p in student.named_parameters()}
    student.zero_grad()
    return {"total": total.item(), "ce": ce.item(), "kd": kd.item()}, grads


def run_target(target, student, batch: KDBatch):
    student.zero_grad()
    outputs = student(**batch.inputs, use_cache=False, **target.student_forward_kwargs)
    count = int((batch.shifted_labels != -100).sum())
    request = LossRequest(alpha=ALPHA, temperature=TEMPERATURE, num_items_in_batch=count, kd_vocab_size=CHAR_VOCAB)
    terms = target.terms(outputs, batch, request)
    terms.total.backward()
    grads = {name: p.grad.clone() for name, p in student.named_parameters()}
    student.zero_grad()
    return {"total": terms.total.item(), "ce": terms.ce.item(), "kd": terms.kd.item()}, grads


def side_process_stand_in(teacher):
    """Called like a TeacherProcess (input_ids, attention_mask, use_cache) and answering like one: float32 logits."""
    def score(input_ids, attention_mask=None, use_cache=None):
        with torch.no_grad():
            return CausalLMOutput(logits=teacher(input_ids=input_ids, attention_mask=attention_mask).logits.float())
    return score


class FullTopKSignal:
    """Answers like kd_llm.serving.training.ServedTopK, from the local teacher at k = V: the whole distribution."""

    def __init__(self, teacher):
        self.teacher = teacher

    def targets(self, input_ids, attention_mask, shifted_labels, *, device=None, example_ids=None, position_ids=None):
        # A packed batch's rows are one teacher forward with its position_ids (no mask), row-major like ServedTopK's.
        with torch.no_grad():
            logits = self.teacher(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                  use_cache=False).logits[:, :-1]
        rows = logits[shifted_labels != -100]
        ids, log_probs, log_tail = topk_with_tail(rows, k=CHAR_VOCAB, temperature=TEMPERATURE, vocab_size=CHAR_VOCAB)
        return SparseTargets(ids, log_probs, log_tail, TEMPERATURE)


@pytest.fixture(scope="module")
def precomputed(models, indexed, collator):
    return PrecomputedTeacherLogits.build(models[1], indexed, collator, batch_size=8, device="cpu",
                                          disable_progress=True)


@pytest.fixture(scope="module")
def cache(tmp_path_factory, models, date_dataset, char_tokenizer, indexed):
    path = tmp_path_factory.mktemp("targets") / "cache"
    build(path, models[1], date_dataset, char_tokenizer, k=CHAR_VOCAB, temperature=TEMPERATURE)
    return TeacherCache.open(path, tokenizer=char_tokenizer, dataset=indexed, teacher=models[1])


EXACT_TARGETS = ["live logits", "live lm_head", "precomputed", "side process", "ensemble", "routed precomputed",
                 "served at k = V"]


def exact_target(name, student, teacher, precomputed):
    if name == "live logits":
        return LiveLogits(teacher)
    if name == "live lm_head":
        return LiveHead(student, teacher)
    if name == "precomputed":
        return PrecomputedLogits(precomputed)
    if name == "side process":
        return SideProcess(side_process_stand_in(teacher))
    if name == "served at k = V":
        return ServedTeacher(FullTopKSignal(teacher), "renormalise")
    if name == "ensemble":  # two copies of the teacher, half each: the mixture is the teacher's distribution
        return EnsembleMixture(TeacherEnsemble([teacher, teacher], [0.5, 0.5]), lambda: None)
    return Routed(PrecomputedLogits(precomputed), LiveLogits(teacher))


@pytest.mark.parametrize("name", EXACT_TARGETS)
def test_an_exact_target_gives_the_dense_reference_loss_and_gradients(name, models, precomputed, indexed, collator):
    student, teacher = models
    batch = batch_of(indexed, collator)
    expected, expected_grads = reference(student, teacher, batch)
    target = exact_target(name, student, teacher, precomputed).for_batch(batch, training=True)
    got, grads = run_target(target, student, batch)
    for key in ("total", "ce", "kd"):
        assert got[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-6), key
    for key, grad in expected_grads.items():
        torch.testing.assert_close(grads[key], grad.float(), **EXACT)
    assert expected["kd"] > 1e-3  # the teacher and the student differ: the KD term is not trivially 0


def test_the_top_k_cache_is_the_reference_within_its_codec_and_alike_dense_and_fused(models, cache, indexed,
                                                                                     collator):
    student, teacher = models
    batch = batch_of(indexed, collator)
    expected, expected_grads = reference(student, teacher, batch)
    dense, dense_grads = run_target(TopKCache(cache, "renormalise"), student, batch)
    fused, fused_grads = run_target(TopKCacheFused(cache, "renormalise", student), student, batch)
    for key in ("total", "ce", "kd"):
        assert fused[key] == pytest.approx(dense[key], rel=1e-5), key
        assert dense[key] == pytest.approx(expected[key], rel=2e-3), key  # float16 log-probabilities
    for key, grad in dense_grads.items():
        torch.testing.assert_close(fused_grads[key], grad, **EXACT)
        torch.testing.assert_close(grad, expected_grads[key].float(), rtol=0, atol=2e-3 * grad.abs().max().item())


def test_declared_capabilities_route_batches(models, precomputed, cache, indexed, collator):
    student, teacher = models
    training = batch_of(indexed, collator)
    evaluation = KDBatch(training.inputs, training.shifted_labels)  # no example index: not the training set
    generated = KDBatch(training.inputs, training.shifted_labels, training.example_index, "student")
    stored = PrecomputedLogits(precomputed)
    routed = Routed(stored, LiveHead(student, teacher))
    assert routed.for_batch(training, training=True) is stored
    assert isinstance(routed.for_batch(evaluation, training=False), LiveHead)
    assert isinstance(routed.for_batch(generated, training=True), LiveHead)
    assert isinstance(routed.for_batch(evaluation, training=False, needs_logits=True), LiveLogits)
    with pytest.raises(TargetCannotServe, match="top-k teacher cache .* cannot serve evaluation batches"):
        TopKCache(cache, "renormalise").for_batch(evaluation, training=False)
    with pytest.raises(TargetCannotServe, match="cannot serve generated batches"):
        stored.for_batch(generated, training=True)
    assert not SideProcess(None).writes_completions and LiveLogits(teacher).writes_completions


class LoggingTrainer(DistillationTrainer):
    """Overrides compute_loss and only calls super(): it must keep the fused loss."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.calls = getattr(self, "calls", 0) + 1
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def test_a_subclass_that_overrides_compute_loss_keeps_the_fused_loss(tmp_path, char_tokenizer, date_dataset, caplog):
    losses = []
    for name, trainer_class in (("plain", DistillationTrainer), ("subclass", LoggingTrainer)):
        with caplog.at_level(logging.INFO, logger="kd_llm.training.targets.choose"):
            trainer = trainer_class(model=tiny_llama(CHAR_VOCAB, seed=2),
                                    teacher_model=tiny_llama(CHAR_VOCAB, hidden=48, seed=1),
                                    args=tiny_distillation_config(tmp_path / name, max_steps=2),
                                    train_dataset=date_dataset, processing_class=char_tokenizer)
        assert trainer.fused_loss is True and isinstance(trainer.target, LiveHead)
        trainer.train()
        losses.append([entry["loss"] for entry in trainer.state.log_history if "loss" in entry])
    assert trainer.calls >= 2 and "fell back" not in caplog.text
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)


def test_a_cross_tokenizer_target_with_the_same_tokenizer_is_the_dense_reference(models, char_tokenizer):
    """CrossTokenizer (hybrid) with an equal tokenizer passed as the teacher's: every span is one token and every
    token is shared, so it must give the dense reference's loss and gradients."""
    from kd_llm.cross_tokenizer.data import CrossTokenizerCollator, build_cross_tokenizer_dataset
    from kd_llm.cross_tokenizer.teacher import cross_tokenizer_settings
    from kd_llm.data.sources import load_records
    from kd_llm.models.char_tokenizer import build_char_tokenizer
    from kd_llm.training.targets import CrossTokenizer

    student, teacher = models
    other = build_char_tokenizer()
    dataset = build_cross_tokenizer_dataset(load_records("date_arithmetic", size=8, seed=1), char_tokenizer, other)
    collate = CrossTokenizerCollator(char_tokenizer.pad_token_id, other.pad_token_id)
    batch = KDBatch.pop_from(collate([dataset[i] for i in (3, 0, 7, 5)]))
    assert set(batch.side_inputs) and not any(key.startswith("kd_") for key in batch.inputs)
    expected, expected_grads = reference(student, teacher, batch)
    target = CrossTokenizer(teacher, cross_tokenizer_settings("hybrid", char_tokenizer, other, student, teacher))
    got, grads = run_target(target.for_batch(batch, training=True), student, batch)
    for key in ("total", "ce", "kd"):
        assert got[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-6), key
    for key, grad in expected_grads.items():
        torch.testing.assert_close(grads[key], grad.float(), **EXACT)


@pytest.fixture(scope="module")
def hidden(tmp_path_factory, models, date_dataset, char_tokenizer, indexed):
    from kd_llm.models.lm_head import head_of_model
    from kd_llm.teacher_cache.hidden_cache import HiddenStateCache
    from tests.helpers.cache import build_hidden

    path = tmp_path_factory.mktemp("targets") / "hidden"
    build_hidden(path, models[1], date_dataset, char_tokenizer, dtype="float32")
    return HiddenStateCache.open(path, head=head_of_model(models[1]), tokenizer=char_tokenizer, dataset=indexed)


HIDDEN_TARGETS = ["hidden cache (dense)", "hidden cache (fused)", "side process hidden states (fused)"]


@pytest.mark.parametrize("name", HIDDEN_TARGETS)
def test_a_hidden_state_target_gives_the_dense_reference_loss_and_gradients(name, models, hidden, indexed,
                                                                            collator):
    """Exact like the live teacher: float32 states and the teacher's lm_head give its logits."""
    from kd_llm.training.targets import HiddenCache, HiddenCacheFused, SideProcessHidden

    student, teacher = models
    batch = batch_of(indexed, collator)
    expected, expected_grads = reference(student, teacher, batch)
    if name == "hidden cache (dense)":
        target = HiddenCache(hidden)
    elif name == "hidden cache (fused)":
        target = HiddenCacheFused(hidden, student)
    else:  # the in-process teacher stands in for the proxy, called and read the same way
        target = SideProcessHidden(student, teacher)
    got, grads = run_target(target.for_batch(batch, training=True), student, batch)
    for key in ("total", "ce", "kd"):
        assert got[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-6), key
    for key, grad in expected_grads.items():
        torch.testing.assert_close(grads[key], grad.float(), **EXACT)
    if name.startswith("hidden cache"):
        evaluation = KDBatch(batch.inputs, batch.shifted_labels)
        with pytest.raises(TargetCannotServe, match="hidden-state teacher cache .* cannot serve evaluation"):
            target.for_batch(evaluation, training=False)
