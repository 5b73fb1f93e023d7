"""Tests for kd_llm.evaluation: left padding, batched greedy generation, exact-match scoring and evaluate_skill.

Generation is checked against a reference greedy loop written here (one prompt at a time, no padding, no KV cache, a
full forward pass per step); scores against hand computations; evaluate_skill end-to-end with a tiny random Llama and
with a scripted "oracle" model whose answers we control.
"""

from __future__ import annotations

import socket

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kd_llm.data.formatting import format_prompt
from kd_llm.evaluation.generation import generate_greedy, left_pad
from kd_llm.evaluation.skills import evaluate_skill, exact_match, score_answers
from kd_llm.models.char_tokenizer import build_char_tokenizer
from kd_llm.tasks import date_arithmetic as da

PROMPTS = ["wd:2020-01-01", "add:1999-12-31,45", "x", "iso:Dec 3 2001", "diff:2020-02-27,2020-03-07", "sub:2024-03-01,1"]


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def tiny_llama(tokenizer, seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.3,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_llama(tok)


@pytest.fixture(scope="module")
def stopping_model(tok):
    """A tiny Llama that says EOS whenever it would have said 'M': some prompts stop early, some never do."""
    model = tiny_llama(tok)
    with torch.no_grad():
        weight = model.lm_head.weight
        weight[tok.eos_token_id] = weight[tok.convert_tokens_to_ids("M")] * 1.05
    return model


@torch.no_grad()
def reference_greedy(model, prompt: list[int], max_new_tokens: int, eos_id: int) -> list[int]:
    sequence, new = list(prompt), []
    for _ in range(max_new_tokens):
        logits = model(torch.tensor([sequence])).logits[0, -1]
        token = int(torch.argmax(logits))
        new.append(token)
        sequence.append(token)
        if token == eos_id:
            break
    return new


# ----------------------------------------------------------------------------------------------------------------------
# left_pad
# ----------------------------------------------------------------------------------------------------------------------


def test_left_pad_layout():
    input_ids, attention_mask = left_pad([[5, 6, 7], [8], [9, 10]], pad_token_id=0, device="cpu")
    assert input_ids.dtype == attention_mask.dtype == torch.long
    assert input_ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 9, 10]]
    assert attention_mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]
    input_ids, _ = left_pad([[5], [6]], pad_token_id=3, device=torch.device("cpu"))
    assert input_ids.tolist() == [[5], [6]]


# ----------------------------------------------------------------------------------------------------------------------
# generate_greedy
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fixture", ["model", "stopping_model"])
@pytest.mark.parametrize("batch_size", [64, 4])
def test_batched_left_padded_generation_equals_one_prompt_at_a_time(request, tok, fixture, batch_size):
    model = request.getfixturevalue(fixture)
    prompts = [format_prompt({"prompt": p}, tok) for p in PROMPTS]
    assert len({len(p) for p in prompts}) == len(prompts)  # every prompt is padded differently in a batch
    max_new = 12
    references = [reference_greedy(model, p, max_new, tok.eos_token_id) for p in prompts]
    expected = [tok.decode(r, skip_special_tokens=True) for r in references]
    assert len(set(expected)) == len(expected)  # the model's output depends on its prompt
    if fixture == "stopping_model":
        ends = [r[-1] == tok.eos_token_id for r in references]
        assert any(ends) and not all(ends)  # rows finish at different steps
    # A random model also emits the pad id as a real token; it counts as a generated token like any other.
    assert any(tok.pad_token_id in r for r in references)

    model.train()
    result = generate_greedy(model, tok, prompts, max_new_tokens=max_new, batch_size=batch_size)
    assert model.training  # the mode is restored
    model.eval()
    assert result.completions == expected  # same text, same (original) order
    assert result.new_tokens == sum(len(r) for r in references)
    assert result.seconds > 0 and result.tokens_per_second > 0


def test_generation_reference_detects_bad_padding(tok, model):
    """The comparison above has teeth: left padding without an attention mask changes the padded rows' output."""
    prompts = [format_prompt({"prompt": p}, tok) for p in PROMPTS]
    input_ids, _ = left_pad(prompts, tok.pad_token_id, "cpu")
    output = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=8,
                            do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    unmasked = [row[input_ids.shape[1]:].tolist() for row in output]
    references = [reference_greedy(model, p, 8, tok.eos_token_id) for p in prompts]
    assert unmasked != references


def test_generate_greedy_with_pad_equal_to_eos(stopping_model):
    tokenizer = build_char_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token
    prompts = [format_prompt({"prompt": p}, tokenizer) for p in PROMPTS]
    references = [reference_greedy(stopping_model, p, 10, tokenizer.eos_token_id) for p in prompts]
    result = generate_greedy(stopping_model, tokenizer, prompts, max_new_tokens=10)
    assert result.completions == [tokenizer.decode(r, skip_special_tokens=True) for r in references]
    assert result.new_tokens == sum(len(r) for r in references)


def test_generate_greedy_needs_prompts(tok, model):
    with pytest.raises(ValueError, match="at least one prompt"):
        generate_greedy(model, tok, [])


# ----------------------------------------------------------------------------------------------------------------------
# exact_match / score_answers
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def offline(monkeypatch):
    """No network: the offline switches set, and any attempt to open a connection fails loudly."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def test_exact_match_offline(offline):
    assert exact_match(["a", "b", "c", "d"], ["a", "x", "c", "y"]) == 0.5
    assert exact_match(["2024-01-04"], ["2024-01-04"]) == 1.0
    assert exact_match(["2024-01-04"], ["2024-01-05"]) == 0.0
    # Surrounding whitespace is ignored on both sides; inner whitespace and case are not.
    assert exact_match(["  Sunday\n", "Sunday", "17 "], ["Sunday", " Sunday ", "17"]) == 1.0
    assert exact_match(["Sun day", "sunday"], ["Sunday", "Sunday"]) == 0.0


def test_score_answers_per_category_and_overall(offline):
    records = [
        {"category": "add", "answer": "2024-01-04"},
        {"category": "add", "answer": "2024-01-05"},
        {"category": "add", "answer": "2024-01-06"},
        {"category": "add", "answer": "2024-01-07"},
        {"category": "weekday", "answer": "Monday"},
        {"category": "weekday", "answer": "Friday"},
        {"category": "iso", "answer": "2001-12-03"},
    ]
    predictions = ["2024-01-04", " 2024-01-05 ", "2024-01-16", "", "Monday", "monday", "2001-12-03"]
    scores = score_answers(records, predictions)
    # add 2/4, weekday 1/2, iso 1/1; overall 4/7; mean over categories (0.5 + 0.5 + 1) / 3.
    assert scores["per_category"] == pytest.approx({"add": 0.5, "weekday": 0.5, "iso": 1.0})
    assert scores["exact_match"] == pytest.approx(4 / 7)
    assert scores["mean_category_exact_match"] == pytest.approx(2 / 3)
    assert scores["count"] == 7
    perfect = score_answers(records, [r["answer"] for r in records])
    assert perfect["per_category"] == {"add": 1.0, "weekday": 1.0, "iso": 1.0}
    assert perfect["exact_match"] == perfect["mean_category_exact_match"] == 1.0


def test_score_answers_without_categories_and_mismatched_lengths(offline):
    records = [{"answer": "a"}, {"answer": "b"}, {"answer": "c"}, {"answer": "d"}]
    scores = score_answers(records, ["a", "b", "x", "d"])
    assert scores["per_category"] == {"all": 0.75}
    assert scores["exact_match"] == scores["mean_category_exact_match"] == 0.75
    with pytest.raises(ValueError):
        score_answers(records, ["a", "b"])


# ----------------------------------------------------------------------------------------------------------------------
# evaluate_skill
# ----------------------------------------------------------------------------------------------------------------------


def test_evaluate_skill_end_to_end_on_a_tiny_model(tok, model):
    records = da.to_records(da.generate_problems("eval", 7, seed=1))
    scores = evaluate_skill(model, tok, records=records, max_new_tokens=6, batch_size=3, keep_examples=7)
    assert set(scores["per_category"]) == set(da.CATEGORIES)
    assert scores["count"] == 7
    assert set(scores["generation"]) == {"new_tokens", "seconds", "tokens_per_second", "batch_size"}
    assert scores["generation"]["batch_size"] == 3
    assert 0 < scores["generation"]["new_tokens"] <= 7 * 6
    # The examples are the model's real greedy completions, in record order, read with the task's extractor.
    prompts = [format_prompt(r, tok) for r in records]
    references = [tok.decode(reference_greedy(model, p, 6, tok.eos_token_id), skip_special_tokens=True)
                  for p in prompts]
    assert [e["prompt"] for e in scores["examples"]] == [r["prompt"] for r in records]
    assert [e["answer"] for e in scores["examples"]] == [r["answer"] for r in records]
    assert [e["completion"] for e in scores["examples"]] == references
    assert [e["prediction"] for e in scores["examples"]] == [da.extract_answer(c) for c in references]
    hits = [da.extract_answer(c).strip() == r["answer"] for c, r in zip(references, records)]
    assert scores["exact_match"] == pytest.approx(sum(hits) / len(hits))
    assert len(evaluate_skill(model, tok, records=records, max_new_tokens=2, keep_examples=2)["examples"]) == 2


def test_evaluate_skill_rejects_records_without_answers(tok, model):
    with pytest.raises(ValueError, match="'prompt' and 'answer'"):
        evaluate_skill(model, tok, records=[{"prompt": "wd:2000-01-01"}])
    with pytest.raises(ValueError, match="'prompt' and 'answer'"):
        evaluate_skill(model, tok, records=[])


class OracleModel(torch.nn.Module):
    """Answers by looking its prompt up: checks the left-padded batch it is given and writes the scripted completion,
    then EOS, then padding."""

    def __init__(self, tokenizer, completions: dict[str, str]):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.tokenizer = tokenizer
        self.completions = completions
        self.batch_sizes = []

    def generate(self, *, input_ids, attention_mask, max_new_tokens, pad_token_id, eos_token_id, **kwargs):
        assert kwargs.get("do_sample") is False
        assert not self.training
        self.batch_sizes.append(len(input_ids))
        rows = []
        for ids, mask in zip(input_ids, attention_mask):
            n = int(mask.sum())
            assert mask.tolist() == [0] * (len(mask) - n) + [1] * n  # left padding
            assert (ids[: len(ids) - n] == pad_token_id).all()
            text = self.tokenizer.decode(ids[len(ids) - n:])
            assert text.startswith("<s>") and text.endswith("\n"), text
            completion = self.completions[text[len("<s>"):-1]]
            new = self.tokenizer(completion, add_special_tokens=False)["input_ids"] + [eos_token_id]
            rows.append(new[:max_new_tokens])
        width = max(len(r) for r in rows)
        new = torch.tensor([r + [pad_token_id] * (width - len(r)) for r in rows])
        return torch.cat([input_ids, new], dim=1)


def test_evaluate_skill_scores_an_oracle(tok):
    problems = da.generate_problems("eval", 20, seed=4)
    records = da.to_records(problems)
    completions = {}
    for problem in problems:
        if problem.category == "weekday":  # always wrong
            wrong = da.WEEKDAYS[(da.WEEKDAYS.index(problem.answer) + 1) % 7]
            completions[problem.prompt] = f"{problem.scratchpad}>{wrong}"
        elif problem.category == "add":  # right, then rambling on a second line
            completions[problem.prompt] = f"{problem.target()}\nsub:2000-01-01,3"
        else:
            completions[problem.prompt] = problem.target()
    oracle = OracleModel(tok, completions)
    scores = evaluate_skill(oracle, tok, records=records, batch_size=6, keep_examples=20)
    assert oracle.batch_sizes == [6, 6, 6, 2]
    assert scores["per_category"] == {"add": 1.0, "diff": 1.0, "iso": 1.0, "sub": 1.0, "weekday": 0.0}
    assert scores["exact_match"] == pytest.approx(16 / 20)
    assert scores["mean_category_exact_match"] == pytest.approx(4 / 5)
    assert scores["count"] == 20
    for example, problem in zip(scores["examples"], problems):
        assert example["prompt"] == problem.prompt  # original order, though batches were sorted by length
        assert example["completion"] == completions[problem.prompt]
        assert (example["prediction"] == problem.answer) == (problem.category != "weekday")
    expected_tokens = sum(min(len(c) + 1, 160) for c in completions.values())  # one token per character, plus EOS
    assert scores["generation"]["new_tokens"] == expected_tokens


def test_evaluate_skill_generates_its_own_eval_split(tok):
    """Without records, the task's eval split is generated: the oracle knows every eval answer for seed 2."""
    problems = da.generate_problems("eval", 10, seed=2)
    oracle = OracleModel(tok, {p.prompt: p.target() for p in problems})
    scores = evaluate_skill(oracle, tok, size=10, seed=2)
    assert scores["count"] == 10
    assert scores["exact_match"] == 1.0
