"""Cross-tokenizer losses: naive references, identities (same tokenizer => kd_loss), T^2, masking, numerics."""

import math

import pytest
import torch

from kd_llm.cross_tokenizer.alignment import align_sides
from kd_llm.cross_tokenizer.losses import hybrid_loss, span_log_probs, span_loss, span_start_rows, uld_loss
from kd_llm.cross_tokenizer.objective import cross_tokenizer_objective
from kd_llm.cross_tokenizer.rendering import render_side
from kd_llm.cross_tokenizer.shared_vocab import shared_vocabulary, token_surfaces
from kd_llm.losses import distillation_objective
from kd_llm.losses.divergences import DIVERGENCES
from kd_llm.models.char_tokenizer import build_char_tokenizer
from tests.helpers.tokenizers import REAL_TEXTS, needs_smollm2, packaged_tokenizer

STUDENT_CHARS = "abcdefgh ."
TEACHER_CHARS = "hgfedxyz ."  # shares h g f e d, space and dot; a b c only in the student, x y z only in the teacher


def batch_for(tokenizer, texts, *, chat=False, teacher_tokenizer=None, max_length=None):
    """Stacked, shifted (ids, labels, spans) for the student and the teacher side of ``texts``."""
    teacher_tokenizer = teacher_tokenizer or tokenizer
    rows = []
    for text in texts:
        record = {"prompt": "x", "completion": text}
        student = render_side(record, tokenizer, use_chat_template=chat, max_length=max_length)
        teacher = render_side(record, teacher_tokenizer, use_chat_template=chat)
        rows.append((student, teacher, align_sides(student, teacher)))

    def stack(values, fill):
        width = max(len(v) for v in values)
        return torch.tensor([list(v) + [fill] * (width - len(v)) for v in values])[:, 1:]

    return {
        "labels": stack([s.labels for s, _, _ in rows], -100),
        "student_spans": stack([a.student_spans for _, _, a in rows], -1),
        "teacher_targets": stack([t.input_ids for _, t, _ in rows], 0),
        "teacher_spans": stack([a.teacher_spans for _, _, a in rows], -1),
    }


def random_logits(shape, seed, scale=3.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).requires_grad_()


def grads(value, tensor):
    return torch.autograd.grad(value, tensor)[0]


# ---------------------------------------------------------------- same tokenizer passed as "different" => kd_loss


def check_hybrid_is_kd(tokenizer, texts, *, loss, alpha, temperature, num_items=None, chat=False):
    batch = batch_for(tokenizer, texts, chat=chat)
    vocab = len(tokenizer)
    student = random_logits((*batch["labels"].shape, vocab), 0)
    teacher = random_logits((*batch["labels"].shape, vocab), 1).detach()
    shared = shared_vocabulary(tokenizer, tokenizer)
    assert shared.size == vocab and shared.student_unmatched.numel() == shared.teacher_unmatched.numel() == 0
    cross = cross_tokenizer_objective(student, teacher, batch["labels"], batch["student_spans"],
                                      batch["teacher_spans"], alpha=alpha, method="hybrid", loss=loss,
                                      temperature=temperature, shared=shared, num_items_in_batch=num_items)
    plain = distillation_objective(student, teacher, batch["labels"], alpha=alpha, loss=loss,
                                   temperature=temperature, num_items_in_batch=num_items)
    assert cross.spans == int((batch["labels"] != -100).sum())
    for name in ("total", "ce", "kd"):
        assert torch.allclose(getattr(cross, name), getattr(plain, name), atol=1e-6, rtol=1e-6), name
    assert torch.allclose(grads(cross.total, student), grads(plain.total, student), atol=1e-6, rtol=1e-5)
    assert torch.allclose(cross.student_matched_mass, torch.tensor(float(cross.spans)))


@pytest.mark.parametrize("loss", sorted(DIVERGENCES))
@pytest.mark.parametrize("alpha,temperature", [(0.0, 1.0), (0.5, 2.0), (0.3, 0.5)])
def test_hybrid_with_the_same_tokenizer_is_kd_loss(loss, alpha, temperature):
    check_hybrid_is_kd(build_char_tokenizer(), ["ab cd.", "hello there", "x"], loss=loss, alpha=alpha,
                       temperature=temperature, num_items=40)


@needs_smollm2
@pytest.mark.parametrize("loss", ["forward_kl", "reverse_kl", "jsd"])
def test_hybrid_with_the_same_real_tokenizer_is_kd_loss(loss):
    check_hybrid_is_kd(packaged_tokenizer("smollm2-135m-instruct"), REAL_TEXTS[:2], loss=loss, alpha=0.5,
                       temperature=2.0, chat=True)


# ---------------------------------------------------------------- naive references


def naive_sorted_l1(p, q):
    p, q = sorted(p, reverse=True), sorted(q, reverse=True)
    width = max(len(p), len(q))
    p, q = p + [0.0] * (width - len(p)), q + [0.0] * (width - len(q))
    return sum(abs(a - b) for a, b in zip(p, q))


def test_uld_matches_a_naive_sorted_l1_and_scales_with_t_squared():
    student, teacher = random_logits((4, 7), 0), random_logits((4, 11), 1)
    for temperature in (1.0, 2.0):
        value = uld_loss(student, teacher, temperature=temperature)
        for row in range(4):
            p = torch.softmax(student[row] / temperature, -1).tolist()
            q = torch.softmax(teacher[row] / temperature, -1).tolist()
            assert value[row].item() == pytest.approx(naive_sorted_l1(p, q) * temperature**2, abs=1e-6)
    # T^2: logits scaled by T at temperature T give the same distributions, so T^2 times the T = 1 value.
    assert torch.allclose(uld_loss(student * 3, teacher * 3, temperature=3.0), 9 * uld_loss(student, teacher))
    # Identical distributions (even permuted, ULD ignores which token is which) give 0.
    assert uld_loss(student, student[:, torch.randperm(7)]).abs().max() < 1e-6


def naive_hybrid(student_row, teacher_row, student_tokenizer, teacher_tokenizer, temperature):
    """Dict-based: outcomes are token strings; KL over shared strings + tail, plus sorted L1 on the rest."""
    s_vocab = {i: t for t, i in student_tokenizer.get_vocab().items()}
    t_vocab = {i: t for t, i in teacher_tokenizer.get_vocab().items()}
    p = dict(zip(range(len(t_vocab)), torch.softmax(teacher_row / temperature, -1).tolist()))
    q = dict(zip(range(len(s_vocab)), torch.softmax(student_row / temperature, -1).tolist()))
    t_by_string = {t_vocab[i]: i for i in sorted(t_vocab, reverse=True)}
    pairs = {i: t_by_string[s_vocab[i]] for i in s_vocab if s_vocab[i] in t_by_string and s_vocab[i] != "</s>"}
    pairs[student_tokenizer.eos_token_id] = teacher_tokenizer.eos_token_id
    kl = sum(p[t] * math.log(p[t] / q[s]) for s, t in pairs.items())
    p_rest = [p[i] for i in p if i not in pairs.values()]
    q_rest = [q[i] for i in q if i not in pairs]
    p_tail, q_tail = sum(p_rest), sum(q_rest)
    kl += p_tail * math.log(p_tail / q_tail)
    matched = (1 - q_tail, 1 - p_tail)
    return (kl + naive_sorted_l1(q_rest, p_rest)) * temperature**2, matched


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_hybrid_matches_a_naive_reference_on_two_vocabularies(temperature):
    student_tokenizer, teacher_tokenizer = build_char_tokenizer(STUDENT_CHARS), build_char_tokenizer(TEACHER_CHARS)
    shared = shared_vocabulary(student_tokenizer, teacher_tokenizer)
    assert shared.size == 4 + 7  # <pad> <s> </s> <unk>, then h g f e d, space, dot
    student, teacher = random_logits((3, len(student_tokenizer)), 0), random_logits((3, len(teacher_tokenizer)), 1)
    value, student_mass, teacher_mass = hybrid_loss(student, teacher, shared, temperature=temperature)
    for row in range(3):
        expected, (s_mass, t_mass) = naive_hybrid(student[row].detach(), teacher[row], student_tokenizer,
                                                  teacher_tokenizer, temperature)
        assert value[row].item() == pytest.approx(expected, abs=1e-5)
        assert (student_mass[row].item(), teacher_mass[row].item()) == pytest.approx((s_mass, t_mass), abs=1e-6)


@needs_smollm2
def test_shared_vocabulary_undoes_each_tokenizers_spelling():
    smollm2 = packaged_tokenizer("smollm2-135m-instruct")
    surfaces = token_surfaces(smollm2)
    assert surfaces[smollm2.convert_tokens_to_ids("Ġthe")] == ("bytes", b" the")
    assert surfaces[smollm2.convert_tokens_to_ids("Ċ")] == ("bytes", b"\n")
    assert surfaces[smollm2.eos_token_id] == ("special", "<|im_end|>")


def naive_span_log_probs(logits, targets, spans, temperature):
    out = {}
    for b in range(logits.shape[0]):
        for i in range(logits.shape[1]):
            if spans[b, i] >= 0:
                prob = torch.softmax(logits[b, i] / temperature, -1)[targets[b, i]].item()
                key = (b, int(spans[b, i]))
                out[key] = out.get(key, 1.0) * prob  # the chain rule: a product along the span
    return out


def test_span_probabilities_follow_the_chain_rule():
    spans = torch.tensor([[-1, 0, 0, 1, 2, 2, 2], [0, 1, 1, -1, -1, -1, -1]])
    targets = torch.randint(0, 9, spans.shape, generator=torch.Generator().manual_seed(0))
    logits = random_logits((2, 7, 9), 2)
    for temperature in (1.0, 0.7):
        got = span_log_probs(logits, targets, spans, 3, temperature=temperature)
        for (b, k), prob in naive_span_log_probs(logits.detach(), targets, spans, temperature).items():
            assert got[b, k].item() == pytest.approx(math.log(prob), abs=1e-5)
    assert got[1, 2].item() == 0.0  # a row with fewer spans is padded with log 1


def naive_binary_kl(p, q):
    return p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))


def test_span_loss_is_the_binary_divergence_of_span_probabilities():
    teacher, student = torch.tensor([0.9, 0.2, 0.5]), torch.tensor([0.6, 0.3, 0.5])
    value = span_loss(student.log().requires_grad_(), teacher.log(), temperature=2.0)
    expected = [naive_binary_kl(p, q) * 4 for p, q in zip(teacher.tolist(), student.tolist())]
    assert value.tolist() == pytest.approx(expected, abs=1e-6)
    assert value[2].item() == pytest.approx(0.0, abs=1e-7)  # equal span probabilities
    # Near-certain spans (log p -> 0) stay finite, in value and gradient.
    near_one = torch.tensor([0.0, -1e-9, -30.0], requires_grad=True)
    out = span_loss(near_one, torch.tensor([0.0, -1e-3, -1e-9])).sum()
    assert torch.isfinite(out) and torch.isfinite(grads(out, near_one)).all()


def test_span_objective_against_naive_chain_rule_on_two_tokenizers():
    student_tokenizer, teacher_tokenizer = build_char_tokenizer(STUDENT_CHARS), build_char_tokenizer(TEACHER_CHARS)
    # Char tokenizers: every character is a boundary on both sides, so spans are characters. The teacher has no
    # 'a', so it cannot render 'a': use text both can spell.
    batch = batch_for(student_tokenizer, ["hedge.", "fed"], teacher_tokenizer=teacher_tokenizer)
    student = random_logits((*batch["labels"].shape, len(student_tokenizer)), 0)
    teacher = random_logits((*batch["teacher_targets"].shape, len(teacher_tokenizer)), 1).detach()
    terms = cross_tokenizer_objective(student, teacher, batch["labels"], batch["student_spans"],
                                      batch["teacher_spans"], batch["teacher_targets"], alpha=0.0, method="span")
    s_probs = naive_span_log_probs(student.detach(), batch["labels"], batch["student_spans"], 1.0)
    t_probs = naive_span_log_probs(teacher, batch["teacher_targets"], batch["teacher_spans"], 1.0)
    assert s_probs.keys() == t_probs.keys()
    expected = sum(naive_binary_kl(t_probs[key], s_probs[key]) for key in s_probs) / int((batch["labels"] != -100).sum())
    assert terms.kd.item() == pytest.approx(expected, rel=1e-5)
    assert terms.spans == len(s_probs)


# ---------------------------------------------------------------- masking, normalisation, numerics


@pytest.mark.parametrize("method", ["uld", "hybrid", "span"])
def test_all_masked_batches_give_zero_with_zero_gradients(method):
    tokenizer = build_char_tokenizer()
    batch = batch_for(tokenizer, ["ab", "cd"])
    labels = torch.full_like(batch["labels"], -100)
    student = random_logits((*labels.shape, len(tokenizer)), 0)
    teacher = random_logits((*labels.shape, len(tokenizer)), 1).detach()
    terms = cross_tokenizer_objective(student, teacher, labels, batch["student_spans"], batch["teacher_spans"],
                                      batch["teacher_targets"], alpha=0.5, method=method,
                                      shared=shared_vocabulary(tokenizer, tokenizer))
    assert terms.total.item() == 0.0 and not grads(terms.total, student).any()


@pytest.mark.parametrize("method", ["uld", "hybrid", "span"])
def test_masked_positions_do_not_matter_and_micro_batches_add_up(method):
    student_tokenizer, teacher_tokenizer = build_char_tokenizer(STUDENT_CHARS), build_char_tokenizer(TEACHER_CHARS)
    shared = shared_vocabulary(student_tokenizer, teacher_tokenizer)
    batch = batch_for(student_tokenizer, ["hedge.", "fed", "d e"], teacher_tokenizer=teacher_tokenizer)
    student = random_logits((*batch["labels"].shape, len(student_tokenizer)), 0)
    teacher = random_logits((*batch["teacher_targets"].shape, len(teacher_tokenizer)), 1).detach()

    def run(rows, s=student, t=teacher, num_items=None):
        return cross_tokenizer_objective(s[rows], t[rows], batch["labels"][rows], batch["student_spans"][rows],
                                         batch["teacher_spans"][rows], batch["teacher_targets"][rows], alpha=0.4,
                                         method=method, temperature=2.0, shared=shared,
                                         num_items_in_batch=num_items).total
    everything = slice(None)
    whole = run(everything)
    garbage = student.detach().clone()
    garbage[batch["labels"] == -100] = 1e4  # padding / prompt logits: never read
    assert torch.allclose(run(everything, s=garbage), whole, atol=1e-6)
    total_items = int((batch["labels"] != -100).sum())
    parts = run(slice(0, 1), num_items=total_items) + run(slice(1, 3), num_items=total_items)
    assert torch.allclose(parts, whole, atol=1e-6)


@pytest.mark.parametrize("method", ["uld", "hybrid", "span"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_low_temperature_stays_finite_and_float32(method, dtype):
    student_tokenizer, teacher_tokenizer = build_char_tokenizer(STUDENT_CHARS), build_char_tokenizer(TEACHER_CHARS)
    batch = batch_for(student_tokenizer, ["hedge."], teacher_tokenizer=teacher_tokenizer)
    student = (random_logits((*batch["labels"].shape, len(student_tokenizer)), 0, scale=40.0)).to(dtype).detach()
    student.requires_grad_()
    teacher = random_logits((*batch["teacher_targets"].shape, len(teacher_tokenizer)), 1, scale=40.0).to(dtype)
    terms = cross_tokenizer_objective(student, teacher.detach(), batch["labels"], batch["student_spans"],
                                      batch["teacher_spans"], batch["teacher_targets"], alpha=0.0, method=method,
                                      temperature=0.05, shared=shared_vocabulary(student_tokenizer,
                                                                                 teacher_tokenizer))
    assert terms.total.dtype == torch.float32 and torch.isfinite(terms.total)
    assert torch.isfinite(grads(terms.total, student)).all()


def test_span_starts_pair_rows_one_to_one():
    spans = torch.tensor([[-1, 0, 0, 1, -1], [0, 1, 1, 2, 2]])
    assert span_start_rows(spans).tolist() == [[False, True, False, True, False], [True, True, False, True, False]]


def test_bad_settings_are_refused():
    tokenizer = build_char_tokenizer()
    batch = batch_for(tokenizer, ["ab"])
    logits = random_logits((*batch["labels"].shape, len(tokenizer)), 0)
    with pytest.raises(ValueError, match="Unknown cross-tokenizer loss"):
        cross_tokenizer_objective(logits, logits, batch["labels"], batch["student_spans"], batch["teacher_spans"],
                                  alpha=0.5, method="dtw")
    with pytest.raises(ValueError, match="needs shared"):
        cross_tokenizer_objective(logits, logits, batch["labels"], batch["student_spans"], batch["teacher_spans"],
                                  alpha=0.5, method="hybrid")
