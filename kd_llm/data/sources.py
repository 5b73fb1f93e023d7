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
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise DataFormatError(f"{path}: line {number} is not UTF-8 text (byte {raw[error.start:error.start + 1]!r} "
                                      f"at column {error.start + 1}); save the file as UTF-8.") from error
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
    if size is not None and size < 1:
        raise DataFormatError(f"{split} size must be at least 1, got {size} (for data source {source!r}).")
    if source == "date_arithmetic":
        problems = date_arithmetic.generate_problems(split, size or 1000, seed=seed, **task_options)
        return date_arithmetic.to_records(problems)
    path = Path(source)
    single = path.suffix in (".jsonl", ".json") or path.is_file() or (path / "dataset_info.json").is_file() \
        or (path / "state.json").is_file()
    if single and split != "train":
        # One file (or one saved Dataset) has no held-out part: its "eval" records would be its training records.
        raise DataFormatError(f"Data source {source!r} is a single dataset with no {split} split: evaluating on it "
                              "would score the student on its own training records. Give held-out records as "
                              "eval_dataset (a JSONL file or dataset folder), or set evaluate_skills false.")
    if path.suffix in (".jsonl", ".json") or path.is_file():
        records = read_jsonl(path)
    elif (path / "dataset_info.json").is_file() or (path / "state.json").is_file():
        records = list(datasets.load_from_disk(str(path)))
    elif not path.exists() and _looks_local(source):
        raise FileNotFoundError(f"Data source {source!r}: no such file or folder ({path.absolute()}).")
    elif path.is_dir() or "/" in source:
        records = _load_hub_or_folder(source, split)
    else:
        raise FileNotFoundError(
            f"Data source {source!r} is neither a built-in task {BUILTIN_TASKS}, nor a JSONL file, nor a dataset "
            "folder or Hub dataset id."
        )
    if not records:
        raise DataFormatError(f"Data source {source!r} ({split}) is empty.")
    return records[:size] if size else records


def _all_unknown(labels: list[list[int]], tokenizer) -> int | None:
    """The first record whose supervised tokens (EOS and padding aside) are all the unknown token, else None."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None:
        return None
    ends = {getattr(tokenizer, "eos_token_id", None), getattr(tokenizer, "pad_token_id", None)} - {unk}
    for index, row in enumerate(labels):
        supervised = [t for t in row if t != IGNORE_INDEX and t not in ends]
        if supervised and all(t == unk for t in supervised):
            return index
    return None


def _looks_local(source: str) -> bool:
    """A path, not a Hub id (``owner/name``): starts like a path, or has more than one separator."""
    return source.startswith((".", "/", "~")) or source.count("/") > 1 or "\\" in source


def _load_hub_or_folder(source: str, split: str) -> list[dict[str, Any]]:
    try:
        return list(datasets.load_dataset(source, split=split))
    except (ValueError, KeyError) as error:  # e.g. no such split
        raise DataFormatError(f"Data source {source!r} has no usable {split!r} split ({error}).") from error
    except Exception as error:  # noqa: BLE001 - the Hub or the network, whatever datasets raises for them
        if Path(source).is_dir():
            raise
        raise DataFormatError(
            f"Data source {source!r} was taken for a Hugging Face Hub dataset id, and loading it failed "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). Offline (or without "
            "network), point dataset at a local JSONL file or a folder saved with Dataset.save_to_disk.") from error


def evaluation_records(dataset: str, eval_dataset: str | None, *, size: int, seed: int,
                       **task_options) -> list[dict[str, Any]]:
    """The held-out records of a run: all of ``eval_dataset`` (up to ``size``) when given, else the eval split of
    ``dataset``."""
    if eval_dataset:
        return load_records(eval_dataset, split="train", size=size, seed=seed,
                            **(task_options if eval_dataset == "date_arithmetic" else {}))
    return load_records(dataset, split="eval", size=size, seed=seed, **task_options)


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
    completions = [r.get("completion") for r in records]
    if all(isinstance(c, str) and not c.strip() for c in completions):
        raise DataFormatError(f"{source_name}: every completion is empty, so the student would only learn to stop at "
                              "once. Fill in the completions (or use text records).")
    unknown = _all_unknown(rows["labels"], tokenizer)
    if unknown is not None:
        raise DataFormatError(
            f"{source_name}, record {unknown}: its supervised text tokenizes entirely into the unknown token "
            f"{tokenizer.unk_token!r}: this tokenizer does not cover the data (another alphabet or language?). Use "
            "a tokenizer that does, or fix the data.")
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
