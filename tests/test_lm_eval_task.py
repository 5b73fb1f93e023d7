"""The date-arithmetic task exported for lm-evaluation-harness: same problems, same answer extraction, and (when
lm-eval is installed) the same predictions and exact match as kd_llm's own evaluation."""

import json
import random
import re
from pathlib import Path

import pytest
import yaml

from kd_llm.data.sources import load_records
from kd_llm.evaluation.lm_eval_task import ANSWER_REGEX, export_lm_eval_task
from kd_llm.tasks.date_arithmetic import extract_answer, split_of

ROOT = Path(__file__).resolve().parent.parent


def regex_filter(response: str, pattern: str = ANSWER_REGEX, fallback: str = "[invalid]") -> str:
    """What lm-eval's ``regex`` filter does with group_select 0 (lm_eval/filters/extraction.py, RegexFilter)."""
    found = re.findall(pattern, response)
    return found[0].strip() if found else fallback


def test_export_writes_the_eval_split_and_a_generate_until_task(tmp_path):
    config_path = export_lm_eval_task(tmp_path, task_name="dates_small", size=30, seed=3, prompt_style="verbose",
                                      max_gen_toks=64)
    config = yaml.safe_load(config_path.read_text())
    assert config["task"] == "dates_small" and config["output_type"] == "generate_until"
    assert config["test_split"] == "test" and config["generation_kwargs"]["max_gen_toks"] == 64
    assert config["generation_kwargs"]["until"] == ["\n"] and config["generation_kwargs"]["do_sample"] is False
    assert [m["metric"] for m in config["metric_list"]] == ["exact_match"]
    regex_step = config["filter_list"][0]["filter"][0]
    assert regex_step["function"] == "regex" and regex_step["regex_pattern"] == ANSWER_REGEX
    data_file = config["dataset_kwargs"]["data_files"]["test"]
    rows = [json.loads(line) for line in open(data_file)]
    expected = load_records("date_arithmetic", split="eval", size=30, seed=3, prompt_style="verbose")
    assert rows == [{"prompt": r["prompt"], "answer": r["answer"], "category": r["category"]} for r in expected]
    assert all(split_of(row["prompt"]) == "eval" for row in rows) and rows[0]["prompt"].startswith(("What", "How",
                                                                                                     "Write"))


def test_export_refuses_bad_names(tmp_path):
    with pytest.raises(ValueError, match="task_name"):
        export_lm_eval_task(tmp_path, task_name="bad name/..")


HANDPICKED = ["2023-05:31-17=14>2023-06-14", "  \n0+0=3>Thursday\nmore>text", "42", "", "   ", ">", "a>b>c ",
              "no mark here\nsecond>line", "x>\u2028y>z", "\r\nfirst>1\r\n", "tab\t>\tanswer\t"]


def test_answer_regex_extracts_what_extract_answer_extracts():
    rng = random.Random(0)
    alphabet = "0123456789-:,;=>+ abcWT\n\r\t\v\f\x1c\x85\u2028"
    randomized = ["".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 40))) for _ in range(3000)]
    for text in HANDPICKED + randomized:
        assert regex_filter(text) == extract_answer(text), repr(text)


def test_lm_eval_regex_filter_agrees():
    extraction = pytest.importorskip("lm_eval.filters.extraction")
    config = {"regex_pattern": ANSWER_REGEX, "group_select": 0, "fallback": "[invalid]"}
    filtered = extraction.RegexFilter(**config).apply([[text] for text in HANDPICKED], docs=[{}] * len(HANDPICKED))
    assert [f[0] for f in filtered] == [extract_answer(text) for text in HANDPICKED]


def test_lm_eval_scores_the_embedded_teacher_like_kd_llm(tmp_path, monkeypatch):
    """End to end through lm-eval's hf model: chat-templated prompts, greedy generation, the regex filter and
    exact_match give, problem by problem, kd_llm's own predictions and score."""
    lm_eval = pytest.importorskip("lm_eval")
    import datasets
    from lm_eval.tasks import TaskManager

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")  # not ~/.cache

    from kd_llm.evaluation.skills import evaluate_skill
    from kd_llm.models.loading import load_model, load_tokenizer

    export_lm_eval_task(tmp_path, size=500, seed=0)
    teacher_dir = ROOT / "kd_llm" / "assets" / "date_teacher"
    limit = 6
    out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={teacher_dir}", tasks=["kd_date_arithmetic"],
                                  task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
                                  limit=limit, apply_chat_template=True, batch_size=limit, device="cpu",
                                  log_samples=True)
    samples = sorted(out["samples"]["kd_date_arithmetic"], key=lambda s: s["doc_id"])
    records = load_records("date_arithmetic", split="eval", size=500, seed=0)[:limit]
    ours = evaluate_skill(load_model(str(teacher_dir)), load_tokenizer(str(teacher_dir)), records=records,
                          max_new_tokens=160, batch_size=limit, keep_examples=limit)
    assert [s["filtered_resps"][0] for s in samples] == [e["prediction"] for e in ours["examples"]]
    assert out["results"]["kd_date_arithmetic"]["exact_match,extract-answer"] == pytest.approx(ours["exact_match"])
    assert samples[0]["arguments"][0][0] == f"<s>{records[0]['prompt']}\n"  # the prompt as in training
