"""Where training records come from, and how they become a tokenized ``datasets.Dataset``.

Sources: the built-in ``date_arithmetic`` generator, a JSONL file, a folder saved with ``Dataset.save_to_disk``, or
any name that ``datasets.load_dataset`` understands (a Hub id, or a local data folder). Every problem is reported
before training starts: an empty source, a malformed JSONL line (by line number), a record of unknown shape, or a
dataset whose labels are all masked.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets

from kd_llm.data.formatting import IGNORE_INDEX, DataFormatError, format_record, supervised_token_count
from kd_llm.tasks import date_arithmetic

BUILTIN_TASKS = ("date_arithmetic",)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Records of a JSONL file. A line that is not a JSON object is an error naming the file and line number."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Data file {str(path)!r} does not exist.")
    records = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataFormatError(f"{path}: line {number} is not valid JSON ({error.msg}).") from error
            if not isinstance(record, dict):
                raise DataFormatError(f"{path}: line {number} must be a JSON object, got {type(record).__name__}.")
            records.append(record)
    if not records:
        raise DataFormatError(f"{path} holds no records.")
    return records


def load_records(source: str, *, split: str = "train", size: int | None = None, seed: int = 0,
                 **task_options) -> list[dict[str, Any]]:
    """Records from ``source``: a built-in task name, a ``.jsonl`` file, a saved dataset folder, or a
    ``datasets.load_dataset`` name. ``size`` limits the count (built-in tasks generate exactly ``size``)."""
    if source == "date_arithmetic":
        problems = date_arithmetic.generate_problems(split, size or 1000, seed=seed, **task_options)
        return date_arithmetic.to_records(problems)
    path = Path(source)
    if path.suffix in (".jsonl", ".json") or path.is_file():
        records = read_jsonl(path)
    elif (path / "dataset_info.json").is_file() or (path / "state.json").is_file():
        records = list(datasets.load_from_disk(str(path)))
    elif path.is_dir() or "/" in source:
        records = list(datasets.load_dataset(source, split=split))
    else:
        raise FileNotFoundError(
            f"Data source {source!r} is neither a built-in task {BUILTIN_TASKS}, nor a JSONL file, nor a dataset "
            "folder or Hub dataset id."
        )
    if not records:
        raise DataFormatError(f"Data source {source!r} ({split}) is empty.")
    return records[:size] if size else records


def build_dataset(records: list[dict[str, Any]], tokenizer, *, max_length: int | None = None,
                  use_chat_template: bool = True, source_name: str = "dataset") -> datasets.Dataset:
    """Tokenize ``records`` into a ``Dataset`` with ``input_ids``, ``labels``, ``length`` (for length-grouped
    sampling) and ``category`` when the records have one.

    Each record's error names its index. Records that end up with no supervised token (e.g. a completion cut off by
    ``max_length``) are an error too: training on them silently would teach nothing.
    """
    if not records:
        raise DataFormatError(f"{source_name} is empty: there is nothing to train on.")
    rows = {"input_ids": [], "labels": []}
    categories = [] if all("category" in r for r in records) else None
    masked = []
    for index, record in enumerate(records):
        try:
            row = format_record(record, tokenizer, max_length=max_length, use_chat_template=use_chat_template)
        except DataFormatError as error:
            raise DataFormatError(f"{source_name}, record {index}: {error}") from error
        if all(label == IGNORE_INDEX for label in row["labels"]):
            masked.append(index)
        rows["input_ids"].append(row["input_ids"])
        rows["labels"].append(row["labels"])
        if categories is not None:
            categories.append(record["category"])
    if masked:
        raise DataFormatError(
            f"{source_name}: {len(masked)} record(s) have every label masked (first: record {masked[0]}), so they "
            f"carry no training signal. Check that completions are non-empty and that max_length={max_length} "
            "leaves room after the prompt."
        )
    rows["length"] = [len(ids) for ids in rows["input_ids"]]
    if categories is not None:
        rows["category"] = categories
    return datasets.Dataset.from_dict(rows)
