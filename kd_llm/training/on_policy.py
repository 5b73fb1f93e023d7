"""On-policy (GKD) and sequence-level (Seq-KD) distillation: replace a batch's completions with generated ones.

* On-policy (Agarwal et al. 2024, "On-Policy Distillation of Language Models", GKD): in a fraction ``lmbda`` of the
  micro-batches the *student* samples the completion of each prompt, and the loss compares student and teacher on
  those tokens. The student then learns from the states it actually reaches at inference, not only from the
  dataset's (the train/inference mismatch of teacher forcing). These batches drop the cross-entropy term: the labels
  are the student's own samples, and imitating them would only reinforce its mistakes. The distillation term keeps
  its weight ``1 - alpha``, so ``lmbda`` changes where the teacher is consulted, not how strongly.
* Sequence-level KD (Kim & Rush 2016): the *teacher* writes the completion (greedy by default) and the student is
  trained on it, with the usual mix of cross-entropy (now on the teacher's output) and token-level KD.

Which micro-batches are on-policy is decided from ``(seed, global_step, micro-batch index)`` alone, so a resumed run
makes the same choices, and every process of a data-parallel run makes the same choice at the same step (they all
generate together; none waits for another). Sampling draws from its own seeded RNG, forked from the global one, so
generation neither depends on nor disturbs the RNG stream of dropout and data order.

A generated batch is built from the original: the prompt is everything before the first supervised label (labels
are -100 on the prompt, see ``kd_llm.data.formatting``), left-padded for generation; the new completion is cut after
its first EOS, which stays supervised even when the pad token is the EOS token (labels are built from the token
lists, never by comparing ids with the pad id); the rows are right-padded again by ``CausalLMCollator``. Only the
first assistant turn of a multi-turn record is regenerated; later turns are dropped. Extra batch columns (a teacher
cache index) describe the dataset's completion, so a generated batch carries only ``input_ids``, ``attention_mask``,
``labels`` and its source under ``COMPLETION_SOURCE_KEY``: a cached teacher serves dataset batches, and the live
teacher scores generated ones.

With ``packing=True`` the dataset batches are packed (kd_llm.data.packing): the prompts are taken example by example
(:func:`packed_prompts`), in the order the padded rows would have, so the generate calls, seeds and samples are the
padded run's; the generated examples are packed again (``position_ids`` and ``packed_example_ids`` instead of the
attention mask) before the student's and the teacher's forward. Packing changes only the layout.

How generated rows are laid out is the generator's ``rows`` (:class:`SameTokenizerRows` here; a teacher with another
tokenizer: ``kd_llm.cross_tokenizer.generated``, which renders each completion's text for both models); the choices
and seeds above do not depend on it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from kd_llm.data.collator import CausalLMCollator
from kd_llm.data.formatting import IGNORE_INDEX
from kd_llm.data.packing import PACKED_EXAMPLE_KEY, PROMPT_START_KEY, PackingCollator, unpack
from kd_llm.evaluation.generation import left_pad

COMPLETION_SOURCE_KEY = "kd_completion_source"
STUDENT, TEACHER = "student", "teacher"
SEQ_KD_DECODING = ("greedy", "sample")
# Generation settings that make `generate` draw from the model's softmax at the given temperature and nothing else:
# without them the model's generation_config (or transformers' global default top_k=50) would truncate it.
PLAIN_SAMPLING = dict(top_k=0, top_p=1.0, typical_p=1.0, min_p=0.0, repetition_penalty=1.0, no_repeat_ngram_size=0,
                      num_beams=1, min_new_tokens=0)
_ROLE_CODE = {STUDENT: 1, TEACHER: 2}


def _seed_state(*keys: int) -> np.random.SeedSequence:
    return np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in keys])


def is_on_policy(seed: int, step: int, micro_batch: int, lmbda: float) -> bool:
    """Whether micro-batch ``micro_batch`` of optimizer step ``step`` is on-policy: a Bernoulli(``lmbda``) draw that
    depends on its three integer arguments only (never on the global RNG), so resume reproduces it."""
    if lmbda <= 0.0:
        return False
    if lmbda >= 1.0:
        return True
    return float(np.random.default_rng(_seed_state(seed, step, micro_batch)).random()) < lmbda


def generation_seed(seed: int, step: int, micro_batch: int, process: int, role: str) -> int:
    """The sampling seed of one generation: distinct per step, micro-batch, process and generating model."""
    return int(_seed_state(seed, step, micro_batch, process, _ROLE_CODE[role]).generate_state(1)[0])


def prompts_from_labels(input_ids: torch.Tensor, labels: torch.Tensor) -> list[list[int]]:
    """Each row's prompt: its tokens before the first supervised (non -100) label.

    A row with no supervised label, or supervised from its first token, has no prompt to generate from: an error,
    since on-policy and sequence-level KD need prompt/completion (or chat) records.
    """
    input_ids, labels = input_ids.cpu(), labels.cpu()  # one transfer, not one per row
    supervised = labels != IGNORE_INDEX
    prompts = []
    for row in range(input_ids.shape[0]):
        positions = supervised[row].nonzero()
        if len(positions) == 0:
            raise ValueError(f"Row {row} of the batch has no supervised label, so its prompt cannot be told from its "
                             "completion; on-policy and seq_kd need prompt/completion or chat records.")
        start = int(positions[0, 0])
        if start == 0:
            raise ValueError(f"Row {row} of the batch is supervised from its first token, so it has no prompt to "
                             "generate from; on-policy and seq_kd need prompt/completion or chat records.")
        prompts.append(input_ids[row, :start].tolist())
    return prompts


def packed_prompts(batch: dict) -> list[list[int]]:
    """Each example's prompt in a packed batch (kd_llm.data.packing), in example order: the order of the rows of
    the same examples padded, so a packed batch generates from the same prompts, seeds and rows as a padded one.

    The prompt lengths come from the collator's :data:`~kd_llm.data.packing.PROMPT_START_KEY` (packing masks each
    example's first label, so the labels cannot tell an example supervised from its first token); the same examples
    are refused as by :func:`prompts_from_labels`."""
    if PROMPT_START_KEY not in batch:
        raise ValueError("on-policy and seq_kd generation from packed batches needs each example's prompt length: "
                         "build the PackingCollator with prompt_starts=True (DistillationTrainer does).")
    example_ids = batch[PACKED_EXAMPLE_KEY].cpu()
    starts = batch[PROMPT_START_KEY].cpu().tolist()
    tokens = unpack(batch["input_ids"].cpu(), example_ids, count=len(starts))
    prompts = []
    for example, (ids, start) in enumerate(zip(tokens, starts)):
        if start >= len(ids):
            raise ValueError(f"Example {example} of the batch has no supervised label, so its prompt cannot be told "
                             "from its completion; on-policy and seq_kd need prompt/completion or chat records.")
        if start == 0:
            raise ValueError(f"Example {example} of the batch is supervised from its first token, so it has no prompt "
                             "to generate from; on-policy and seq_kd need prompt/completion or chat records.")
        prompts.append(ids[:start].tolist())
    return prompts


def batch_prompts(batch: dict, columns: tuple[str, str] = ("input_ids", "labels")) -> list[list[int]]:
    """The prompts of a padded (:func:`prompts_from_labels`, from the ``columns`` holding ids and labels) or packed
    (:func:`packed_prompts`) batch."""
    if batch.get(PACKED_EXAMPLE_KEY) is not None:
        return packed_prompts(batch)
    return prompts_from_labels(batch[columns[0]], batch[columns[1]])


def cut_after_eos(tokens: Sequence[int], eos_ids: Sequence[int]) -> list[int]:
    """``tokens`` up to and including the first EOS (whatever follows is padding); all of them if none is EOS."""
    tokens = list(tokens)
    for index, token in enumerate(tokens):
        if token in eos_ids:
            return tokens[: index + 1]
    return tokens


def build_completion_batch(prompts: list[list[int]], completions: list[list[int]], pad_token_id: int,
                           source: str, packing_max_length: int | None = None) -> dict:
    """A right-padded training batch of ``prompt + completion`` rows: the prompt masked (-100), every completion
    token supervised, the EOS included, padding at -100. Labels come from the lists, never from the pad id.

    ``packing_max_length`` (not None): packed instead (:class:`~kd_llm.data.packing.PackingCollator`, rows of up to
    that many tokens, 0: the longest example). A generated example longer than it gets a row of its own, never cut:
    cutting it would change the loss against the padded batch of the same samples. Of the rows of that length and
    rows as long as the longest example, the layout computing fewer tokens is taken: completions that all run to
    ``max_new_tokens`` have near-equal lengths, and long rows would then compute their last row's padding, more than
    the padded batch; rows of the longest example never compute more than it."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions.")
    features = [{"input_ids": p + c, "labels": [IGNORE_INDEX] * len(p) + c} for p, c in zip(prompts, completions)]
    if packing_max_length is None:
        batch = CausalLMCollator(pad_token_id)(features)
    else:
        longest = max(len(f["input_ids"]) for f in features)
        layouts = [PackingCollator(pad_token_id, max_length=width)(features)
                   for width in dict.fromkeys((max(packing_max_length, longest), longest))]
        batch = min(layouts, key=lambda layout: layout["input_ids"].numel())  # the first of equals
    batch[COMPLETION_SOURCE_KEY] = source
    return batch


class _KeepVocabulary(LogitsProcessor):
    """Never sample an id past the shared vocabulary (a padded embedding's spare rows): the other model may have no
    row for it."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, input_ids, scores):
        scores[:, self.size:] = -float("inf")
        return scores


def eos_ids_of(model, tokenizer) -> list[int]:
    """Every id that ends a completion: the tokenizer's EOS and the model's generation_config EOS (may be several,
    e.g. a chat model's end-of-turn token)."""
    ids = set()
    for value in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif value is not None:
            ids.update(int(v) for v in value)
    if not ids:
        raise ValueError("Neither the tokenizer nor the model defines an EOS token, so generated completions could "
                         "never end; set tokenizer.eos_token.")
    return sorted(ids)


class _SeededGroupSampler(LogitsProcessor):
    """Samples each group of rows from ``softmax(scores / temperature)`` with the group's own seeded generator, and
    returns scores that keep only the drawn token, so greedy selection takes it.

    ``generate``'s own sampling draws ``torch.multinomial`` over the whole batch from the global RNG; a group here
    draws the same rows from a generator seeded as that RNG was, so one batched call writes, for each group, what a
    call on that group alone under ``torch.manual_seed(seed)`` writes (the generation buffer's guarantee)."""

    def __init__(self, groups: list[tuple[int, int, int]], temperature: float, device: torch.device):
        self.temperature = temperature
        self.groups = [(start, stop, torch.Generator(device=device).manual_seed(seed)) for start, stop, seed in groups]

    def __call__(self, input_ids, scores):
        probs = torch.softmax(scores / self.temperature, dim=-1)
        tokens = torch.empty(scores.shape[0], dtype=torch.long, device=scores.device)
        for start, stop, generator in self.groups:
            tokens[start:stop] = torch.multinomial(probs[start:stop], num_samples=1, generator=generator).squeeze(1)
        kept = torch.full_like(scores, -float("inf"))
        return kept.scatter_(1, tokens[:, None], 0.0)


@torch.no_grad()
def generate_completions(model, prompts: list[list[int]], *, pad_token_id: int, eos_ids: list[int],
                         max_new_tokens: int, do_sample: bool, temperature: float = 1.0, seed: int | None = None,
                         vocab_size: int | None = None,
                         seed_groups: list[tuple[int, int, int]] | None = None) -> list[list[int]]:
    """One completion per prompt, in a single left-padded, KV-cached ``generate`` call, each cut after its first EOS.
    ``generate`` stops each row at its EOS (padding it afterwards) and the call when every row has stopped.

    With ``do_sample`` it draws from ``softmax(logits / temperature)`` untruncated, under ``torch.manual_seed(seed)``
    inside a forked RNG, so the global RNG is left as it was; or, given ``seed_groups`` (``(start, stop, seed)`` row
    ranges covering the prompts), each range from its own seeded generator, as if it were generated alone (the
    buffer of :class:`CompletionGenerator`). The model's train/eval mode is restored.
    """
    device = next(model.parameters()).device
    input_ids, attention_mask = left_pad(prompts, pad_token_id, device)
    options = dict(do_sample=do_sample, max_new_tokens=max_new_tokens, use_cache=True, pad_token_id=pad_token_id,
                   eos_token_id=eos_ids, num_beams=1)
    processors = []
    width = model.get_output_embeddings().weight.shape[0]
    if vocab_size is not None and vocab_size < width:
        processors.append(_KeepVocabulary(vocab_size))
    if do_sample and seed_groups is not None:
        # Greedy selection of the one token each group's sampler kept; no other processor may act after it.
        options.update(do_sample=False, repetition_penalty=1.0, no_repeat_ngram_size=0, min_new_tokens=0)
        processors.append(_SeededGroupSampler(seed_groups, temperature, device))
    elif do_sample:
        options.update(PLAIN_SAMPLING, temperature=temperature)
    if processors:
        options["logits_processor"] = LogitsProcessorList(processors)
    was_training = model.training
    model.eval()
    try:
        fork = [device.index if device.index is not None else 0] if device.type != "cpu" else []
        with torch.random.fork_rng(devices=fork, device_type=device.type if device.type != "cpu" else "cuda"):
            if seed is not None:
                torch.manual_seed(seed)
            output = model.generate(input_ids=input_ids, attention_mask=attention_mask, **options)
    finally:
        model.train(was_training)
    generated = output[:, input_ids.shape[1]:].tolist()
    return [cut_after_eos(tokens, eos_ids) for tokens in generated]


@dataclass
class GenerationStats:
    """Generation cost since the last log: seconds, generated tokens, and which micro-batches were generated."""

    seconds: float = 0.0
    tokens: int = 0
    micro_batches: int = 0
    on_policy_batches: int = 0
    seq_kd_batches: int = 0
    steps: int = 0
    generate_calls: int = 0
    window_started: float | None = None  # when the first step of this logging window began

    def summary(self, reduce: Callable[[torch.Tensor], torch.Tensor] = lambda value: value) -> dict[str, float]:
        """Per optimizer step (and per process, averaged over processes by ``reduce``) over the logging window."""
        if self.steps == 0:
            return {}
        values = torch.tensor([self.seconds, float(self.tokens), float(self.on_policy_batches),
                               float(self.seq_kd_batches), float(self.micro_batches)], dtype=torch.float32)
        seconds, tokens, on_policy, seq_kd, micro = reduce(values).tolist()
        return {
            "generation_seconds": round(seconds / self.steps, 4),
            "generated_tokens": round(tokens / self.steps, 2),
            "generated_tokens_per_second": round(tokens / seconds, 1) if seconds > 0 else 0.0,
            "on_policy_fraction": round(on_policy / max(micro, 1.0), 4),
            "seq_kd_fraction": round(seq_kd / max(micro, 1.0), 4),
            # The share of the steps' wall time spent generating (this window's steps are complete at log time).
            "generation_share": round(seconds / elapsed, 4) if (elapsed := self._elapsed()) > 0 else 0.0,
            "generate_calls": round(self.generate_calls / self.steps, 2),
        }

    def _elapsed(self) -> float:
        return time.perf_counter() - self.window_started if self.window_started is not None else 0.0


class SameTokenizerRows:
    """How generated completions become training rows when teacher and student share the tokenizer: both models
    generate from the batch's prompt ids, and a row is ``prompt + completion`` (:func:`build_completion_batch`,
    packed again when ``packing_max_length`` is not None)."""

    def __init__(self, tokenizer, pad_token_id: int, vocab_size: int | None = None,
                 packing_max_length: int | None = None):
        self.tokenizer, self.pad_token_id, self.vocab_size = tokenizer, pad_token_id, vocab_size
        self.packing_max_length = packing_max_length

    def prompt_columns(self, role: str) -> tuple[str, str]:
        """The batch columns (ids, labels) that ``role``'s prompts are read from."""
        return "input_ids", "labels"

    def generation_side(self, role: str) -> tuple[int, object, int | None]:
        """``(pad_token_id, tokenizer, vocab_size)`` the generating model ``role`` uses."""
        return self.pad_token_id, self.tokenizer, self.vocab_size

    def build(self, batch: dict, prompts: list[list[int]], completions: list[list[int]], role: str,
              eos_ids: list[int]) -> dict:
        return build_completion_batch(prompts, completions, self.pad_token_id, role,
                                      packing_max_length=self.packing_max_length)

    def pop_log_metrics(self) -> dict:
        return {}

    def run_totals(self) -> dict:
        return {}


class CompletionGenerator:
    """Replaces the completions of training micro-batches with the student's samples (a ``lmbda`` fraction) or the
    teacher's generations (``seq_kd``, the others). Built by :meth:`from_config` when either is on."""

    def __init__(self, *, lmbda: float, seq_kd: bool, seq_kd_decoding: str, max_new_tokens: int, temperature: float,
                 seed: int, pad_token_id: int, tokenizer, vocab_size: int | None = None, buffer: int = 0,
                 packing_max_length: int | None = None, rows=None):
        if seq_kd_decoding not in SEQ_KD_DECODING:
            raise ValueError(f"seq_kd_decoding must be one of {SEQ_KD_DECODING}, got {seq_kd_decoding!r}.")
        self.lmbda, self.seq_kd, self.seq_kd_decoding = lmbda, seq_kd, seq_kd_decoding
        self.max_new_tokens, self.temperature, self.seed = max_new_tokens, temperature, seed
        self.pad_token_id, self.tokenizer, self.vocab_size = pad_token_id, tokenizer, vocab_size
        if buffer < 0:
            raise ValueError(f"buffer must be >= 0 (0: every micro-batch of the step in one call), got {buffer}.")
        self.buffer = buffer
        self.packing_max_length = packing_max_length  # not None: generated batches are packed (kd_llm.data.packing)
        # Where each model's prompts are and how generated rows are built (SameTokenizerRows, or cross-tokenizer).
        self.rows = rows if rows is not None else SameTokenizerRows(tokenizer, pad_token_id, vocab_size,
                                                                    packing_max_length)
        self.stats = GenerationStats()
        self.totals = GenerationStats()  # the whole run, for results.json
        # Greedy teacher targets depend on the prompt alone: generate each once, reuse it in every later epoch.
        # Kept as int32 bytes (key) and arrays (value): Python int lists would cost ~7x the memory on large datasets.
        self._greedy_targets: dict[bytes, np.ndarray] = {}

    @classmethod
    def from_config(cls, args, tokenizer, vocab_size: int | None, rows=None) -> CompletionGenerator | None:
        if args.lmbda == 0 and not args.seq_kd:
            return None
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return cls(lmbda=args.lmbda, seq_kd=args.seq_kd, seq_kd_decoding=args.seq_kd_decoding,
                   max_new_tokens=args.generation_max_new_tokens, temperature=args.generation_temperature,
                   seed=args.seed, pad_token_id=pad_id, tokenizer=tokenizer, vocab_size=vocab_size,
                   buffer=args.generation_buffer,
                   packing_max_length=args.packing_max_length if getattr(args, "packing", False) else None,
                   rows=rows)

    def source_of(self, step: int, micro_batch: int) -> str | None:
        """``"student"``, ``"teacher"`` or None (keep the dataset's completion) for one micro-batch."""
        if is_on_policy(self.seed, step, micro_batch, self.lmbda):
            return STUDENT
        return TEACHER if self.seq_kd else None

    def replace(self, batches: list[dict], *, step: int, student, teacher, process_index: int = 0,
                autocast=None) -> list[dict]:
        """The micro-batches of optimizer step ``step``, each kept or rebuilt with generated completions.

        The generation buffer: the completions of all micro-batches of the step that need one are written in one
        ``generate`` call per model (``buffer`` micro-batches a call when > 0), each micro-batch still sampled from
        its own seed, so the samples are those of one call per micro-batch (``buffer=1``)."""
        if self.stats.window_started is None:
            self.stats.window_started = time.perf_counter()
        sources = [self.source_of(step, index) for index in range(len(batches))]
        prompts = {index: batch_prompts(batch, self.rows.prompt_columns(source))
                   for index, (batch, source) in enumerate(zip(batches, sources)) if source is not None}
        started = time.perf_counter()
        completions: dict[int, list[list[int]]] = {}
        with autocast() if autocast is not None else contextlib.nullcontext():
            on_policy = [index for index in prompts if sources[index] == STUDENT]
            for group in self._chunks(on_policy):
                completions.update(self._sample(student, group, prompts, step, process_index, STUDENT))
            written = [index for index in prompts if sources[index] == TEACHER]
            if self.seq_kd_decoding == "sample":
                for group in self._chunks(written):
                    completions.update(self._sample(teacher, group, prompts, step, process_index, TEACHER))
            elif written:
                completions.update(self._greedy_teacher_targets(teacher, written, prompts))
        self.stats.seconds += time.perf_counter() - started
        out = []
        for index, (batch, source) in enumerate(zip(batches, sources)):
            if source is None:
                out.append(batch)
                continue
            self.stats.on_policy_batches += source == STUDENT
            self.stats.seq_kd_batches += source == TEACHER
            new = self.rows.build(batch, prompts[index], completions[index], source,
                                  self._eos_ids(student if source == STUDENT else teacher, source))
            new[COMPLETION_SOURCE_KEY] = source
            device = batch["input_ids"].device
            out.append({k: v.to(device) if torch.is_tensor(v) else v for k, v in new.items()})
        self.stats.micro_batches += len(batches)
        self.stats.steps += 1
        return out

    def _chunks(self, indices: list[int]) -> list[list[int]]:
        size = self.buffer or max(len(indices), 1)
        return [indices[start:start + size] for start in range(0, len(indices), size)]

    def _sample(self, model, group: list[int], prompts: dict, step: int, process_index: int,
                role: str) -> dict[int, list[list[int]]]:
        """Sampled completions of the micro-batches ``group`` in one call, each from its own seed."""
        rows, seed_groups = [], []
        for index in group:
            seed_groups.append((len(rows), len(rows) + len(prompts[index]),
                                generation_seed(self.seed, step, index, process_index, role)))
            rows.extend(prompts[index])
        generated = self._generate(model, rows, role, do_sample=True, seed=None, seed_groups=seed_groups)
        return {index: generated[start:stop] for index, (start, stop, _) in zip(group, seed_groups)}

    def _eos_ids(self, model, role: str) -> list[int]:
        return eos_ids_of(model, self.rows.generation_side(role)[1])

    def _generate(self, model, prompts, role: str, *, do_sample: bool, seed: int | None,
                  seed_groups: list[tuple[int, int, int]] | None = None) -> list[list[int]]:
        pad_token_id, _, vocab_size = self.rows.generation_side(role)
        completions = generate_completions(model, prompts, pad_token_id=pad_token_id,
                                           eos_ids=self._eos_ids(model, role),
                                           max_new_tokens=self.max_new_tokens, do_sample=do_sample,
                                           temperature=self.temperature, seed=seed, vocab_size=vocab_size,
                                           seed_groups=seed_groups)
        self.stats.tokens += sum(len(c) for c in completions)  # what was generated (memoised targets cost nothing)
        self.stats.generate_calls += 1
        return completions

    def _greedy_teacher_targets(self, teacher, group: list[int], prompts: dict) -> dict[int, list[list[int]]]:
        """Greedy teacher targets depend on the prompt alone: the prompts not seen before, across the micro-batches
        ``group``, written in one call (``buffer`` micro-batches' worth a call when > 0), then reused."""
        missing = {}
        for index in group:
            for prompt in prompts[index]:
                key = np.asarray(prompt, dtype=np.int32).tobytes()
                if key not in self._greedy_targets:
                    missing[key] = prompt
        if missing:
            keys = list(missing)
            per_call = self.buffer * max(len(prompts[i]) for i in group) if self.buffer else len(keys)
            for start in range(0, len(keys), per_call):
                chunk = keys[start:start + per_call]
                written = self._generate(teacher, [missing[key] for key in chunk], TEACHER, do_sample=False,
                                         seed=None)
                for key, completion in zip(chunk, written):
                    self._greedy_targets[key] = np.asarray(completion, dtype=np.int32)
        return {index: [self._greedy_targets[np.asarray(p, dtype=np.int32).tobytes()].tolist() for p in prompts[index]]
                for index in group}

    def pop_log_metrics(self, reduce=lambda value: value) -> dict[str, float]:
        """The generation cost since the last call (see :meth:`GenerationStats.summary`), then reset."""
        summary = self.stats.summary(reduce)
        for name in ("seconds", "tokens", "micro_batches", "on_policy_batches", "seq_kd_batches", "steps",
                     "generate_calls"):
            setattr(self.totals, name, getattr(self.totals, name) + getattr(self.stats, name))
        self.stats = GenerationStats()
        extra = self.rows.pop_log_metrics()  # e.g. the cross-tokenizer samples that could not be aligned
        if summary and extra:
            means = reduce(torch.tensor([float(v) for v in extra.values()], dtype=torch.float32)).tolist()
            summary.update({name: round(value, 4) for name, value in zip(extra, means)})
        return summary

    def run_totals(self) -> dict[str, float]:
        """This process's generation over the run so far (logged windows): seconds, tokens, batch counts."""
        totals = self.totals
        return {"generation_seconds": round(totals.seconds, 2), "generated_tokens": totals.tokens,
                "on_policy_batches": totals.on_policy_batches, "seq_kd_batches": totals.seq_kd_batches,
                "micro_batches": totals.micro_batches, **self.rows.run_totals()}

