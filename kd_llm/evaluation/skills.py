"""Skill evaluation: generate answers to held-out problems and score exact match per category and overall.

Scores come from the ``evaluate`` library, through an exact-match metric that kd_llm ships (``metrics/``) so that
evaluation runs offline.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import evaluate

from kd_llm.data.formatting import format_prompt
from kd_llm.data.sources import load_records
from kd_llm.evaluation.generation import generate_greedy
from kd_llm.tasks import date_arithmetic

EXACT_MATCH_METRIC = Path(__file__).parent / "metrics" / "exact_match"
ANSWER_EXTRACTORS = {"date_arithmetic": date_arithmetic.extract_answer}


def exact_match(predictions: list[str], references: list[str]) -> float:
    metric = evaluate.load(str(EXACT_MATCH_METRIC))
    return metric.compute(predictions=predictions, references=references)["exact_match"]


def score_answers(records: list[dict], predictions: list[str]) -> dict:
    """Exact match overall and per ``category`` (records without one count as ``"all"``)."""
    by_category: dict[str, tuple[list, list]] = defaultdict(lambda: ([], []))
    for record, prediction in zip(records, predictions, strict=True):
        predicted, expected = by_category[record.get("category", "all")]
        predicted.append(prediction)
        expected.append(record["answer"])
    per_category = {name: exact_match(*pair) for name, pair in sorted(by_category.items())}
    return {
        "exact_match": exact_match(predictions, [r["answer"] for r in records]),
        "mean_category_exact_match": sum(per_category.values()) / len(per_category),
        "per_category": per_category,
        "count": len(records),
    }


def evaluate_skill(
    model,
    tokenizer,
    *,
    task: str = "date_arithmetic",
    records: list[dict] | None = None,
    size: int = 500,
    seed: int = 0,
    max_new_tokens: int = 160,
    batch_size: int = 64,
    use_chat_template: bool = True,
    progress: bool = False,
    keep_examples: int = 5,
) -> dict:
    """Greedy-generate answers for the eval split of ``task`` (or for ``records``) and score them.

    Returns exact match overall, the mean over categories, per category, generation speed, and a few examples.
    """
    if records is None:
        records = load_records(task, split="eval", size=size, seed=seed)
    if not records or not all("prompt" in r and "answer" in r for r in records):
        raise ValueError("Skill evaluation needs records with 'prompt' and 'answer' fields.")
    extract = ANSWER_EXTRACTORS.get(task, str.strip)
    prompts = [format_prompt(r, tokenizer, use_chat_template=use_chat_template) for r in records]
    result = generate_greedy(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                             progress=progress)
    predictions = [extract(c) for c in result.completions]
    scores = score_answers(records, predictions)
    scores["generation"] = {
        "new_tokens": result.new_tokens,
        "seconds": round(result.seconds, 3),
        "tokens_per_second": round(result.tokens_per_second, 1),
        "batch_size": batch_size,
    }
    scores["examples"] = [
        {"prompt": r["prompt"], "completion": c, "prediction": p, "answer": r["answer"]}
        for r, c, p in list(zip(records, result.completions, predictions))[:keep_examples]
    ]
    return scores
