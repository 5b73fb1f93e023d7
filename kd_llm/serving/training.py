"""What training needs from a served teacher: :class:`ServedTopK`, the source of a batch's sparse targets, its
prefetching collator, and the parity check before the first step.

- **Requests.** A batch's sequences (its ``input_ids`` without padding) go to the server; the answer's rows are
  gathered at the supervised positions (``shifted_labels != -100``, row-major), as the top-k cache gathers its rows,
  into :class:`~kd_llm.losses.sparse.SparseTargets` with the tail the server computed (kd_llm's server) or
  ``1 - sum(top-k)`` (vLLM, which sends no tail).
- **Packed batches** (``packing=True``, kd_llm.data.packing): each example of a packed row is sent as its own
  sequence (the server would otherwise score the row as one sequence, examples attending to each other), and the
  answers are re-laid onto the packed rows' supervised positions by the rows' ``position_ids``. The wire protocol is
  unchanged (protocol version 1; vLLM's ``/v1/completions`` too): the server sees the sequences a padded batch of the
  same examples sends.
- **Prefetch.** :class:`PrefetchingCollator` wraps the data collator: as soon as a batch is collated, its request
  starts on a worker thread. The Trainer collates the micro-batches of a step before training on them and Accelerate
  fetches one batch ahead, so the answer is usually there when the step needs it. Answers are found again by the
  batch's token ids; a batch no collator saw (the student's on-policy samples) is requested when needed.
- **Routing.** With ``teacher_routes``, the collator reads each example's ``teacher_route_column`` and the rows of
  each teacher are requested from it.
- **Parity.** :func:`parity_report` scores a probe batch through the served teacher and a local reference (a
  teacher model, or a teacher cache) and measures the mean total-variation distance per supervised position over
  the reference's top-k ids plus the rest; the trainer refuses to start above ``teacher_parity_max_tvd``.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict, deque

import torch

from kd_llm.data.collator import CausalLMCollator
from kd_llm.data.packing import PACKED_EXAMPLE_KEY, PackingCollator, unpack
from kd_llm.losses.sparse import SparseTargets
from kd_llm.serving.settings import served_signal_temperature, split_urls, teacher_routes

_MAX_PENDING = 64  # prefetched answers kept; older ones (never asked for) are dropped


def batch_sequences(input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                    example_ids: torch.Tensor | None = None) -> list[list[int]]:
    """The token ids of each row without its (right) padding; of a packed batch (``example_ids``, see
    kd_llm.data.packing), each example's, in example order: the server scores every example as its own sequence."""
    input_ids = input_ids.detach().cpu()
    if example_ids is not None:
        return [tokens.tolist() for tokens in unpack(input_ids, example_ids.detach().cpu())]
    if attention_mask is None:
        return input_ids.tolist()
    lengths = attention_mask.detach().cpu().sum(-1).tolist()
    return [row[: int(n)] for row, n in zip(input_ids.tolist(), lengths)]


def _key(sequences: list[list[int]]) -> bytes:
    digest = hashlib.blake2b(digest_size=16)
    for sequence in sequences:
        digest.update(torch.tensor(sequence, dtype=torch.int64).numpy().tobytes())
        digest.update(b"|")
    return digest.digest()


def gather_targets(rows, shifted_labels: torch.Tensor, *, temperature: float, device=None,
                   example_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None) -> SparseTargets:
    """Rows of each sequence at its supervised positions, row-major, as :class:`SparseTargets`. A packed batch
    (``example_ids`` and ``position_ids``): ``rows`` are its examples' (:func:`batch_sequences`), re-laid onto the
    packed rows' supervised positions, row-major (each lies inside one example, at that example's position)."""
    if example_ids is not None:
        return _gather_packed(rows, shifted_labels, example_ids, position_ids, temperature=temperature, device=device)
    ids, values, tails = [], [], []
    labels = shifted_labels.detach().cpu()
    for row, (row_ids, row_values, row_tail) in enumerate(rows):
        positions = (labels[row] != -100).nonzero(as_tuple=True)[0]
        if len(positions) and int(positions.max()) >= len(row_ids) - 1:
            raise ValueError(f"row {row} is supervised at position {int(positions.max())} but the served answer "
                             f"covers {len(row_ids)} tokens: labels must lie inside the attention mask")
        ids.append(row_ids[positions])
        values.append(row_values[positions])
        tails.append(row_tail[positions])
    targets = SparseTargets(torch.cat(ids).long(), torch.cat(values).float(), torch.cat(tails).float(), temperature)
    return targets if device is None else targets.to(device)


def _gather_packed(rows, shifted_labels, example_ids, position_ids, *, temperature: float, device=None):
    if position_ids is None:
        raise ValueError("a packed batch's served rows are re-laid by its position_ids, which the batch lacks")
    supervised = shifted_labels.detach().cpu() != -100
    examples = example_ids.detach().cpu()[:, :-1][supervised]
    positions = position_ids.detach().cpu()[:, :-1][supervised]
    lengths = torch.tensor([len(row_ids) for row_ids, _, _ in rows], dtype=torch.long)
    if len(examples) and ((examples < 0) | (positions >= lengths[examples.clamp_min(0)] - 1)).any():
        raise ValueError("a supervised position of the packed batch lies outside its example's served answer: "
                         "labels must lie inside the examples (kd_llm.data.packing)")
    offsets = torch.cumsum(lengths, 0) - lengths
    index = offsets[examples] + positions
    ids, values, tails = (torch.cat([row[part] for row in rows]) for part in range(3))
    targets = SparseTargets(ids[index].long(), values[index].float(), tails[index].float(), temperature)
    return targets if device is None else targets.to(device)


class ServedTopK:
    """The served teacher(s) of a run, asked for top-k at one temperature (see the module docstring)."""

    def __init__(self, config, *, clients=None):
        from kd_llm.serving.client import ServedTeacherClient, TeacherRouter

        self.k = config.teacher_top_k
        self.temperature = served_signal_temperature(config)
        self.route_column = None
        options = dict(protocol=config.teacher_protocol, timeout=config.teacher_timeout,
                       retries=config.teacher_retries, backoff=config.teacher_retry_backoff, workers=4)
        if clients is not None:
            self.source = clients
        elif teacher_routes(config):
            self.route_column = config.teacher_route_column
            self.source = TeacherRouter({name: ServedTeacherClient(urls, **options)
                                         for name, urls in teacher_routes(config).items()})
        else:
            self.source = ServedTeacherClient(split_urls(config.teacher_url), **options)
        self._pending: OrderedDict[bytes, deque] = OrderedDict()
        self._routes: dict[bytes, list] = {}
        self._lock = threading.Lock()
        self.prefetched = self.requested = 0  # answers found ready-or-in-flight / asked for when needed
        self.wait_seconds = 0.0  # time training waited for answers (what prefetch did not hide)

    @property
    def clients(self) -> dict:
        return getattr(self.source, "clients", None) or {"teacher": self.source}

    def describe(self) -> str:
        return "; ".join(f"{name}: {client.describe()}" for name, client in self.clients.items())

    def check(self, tokenizer, *, teacher_hash: str | None = None) -> dict:
        """Identity of every teacher, checked against the run's tokenizer (and a cache's teacher hash)."""
        return {name: client.check(tokenizer, teacher_hash=teacher_hash) for name, client in self.clients.items()}

    def vocab_size(self) -> int | None:
        sizes = {client.identity.vocab_size for client in self.clients.values()}
        return sizes.pop() if len(sizes) == 1 else None

    # --- requests ---------------------------------------------------------------------------------------------------

    def _fetch(self, sequences, teacher_ids):
        if self.route_column is None:
            return self.source.topk(sequences, k=self.k, temperature=self.temperature)
        return self.source.topk(sequences, teacher_ids, k=self.k, temperature=self.temperature)

    def prefetch(self, input_ids, attention_mask, teacher_ids=None, example_ids=None) -> None:
        sequences = batch_sequences(input_ids, attention_mask, example_ids)
        if self.route_column is not None and teacher_ids is None:
            raise ValueError(f"teacher_routes needs a {self.route_column!r} column naming each example's teacher")
        key = _key(sequences)
        future = next(iter(self.clients.values()))._executor.submit(self._fetch, sequences, teacher_ids)
        with self._lock:
            self._pending.setdefault(key, deque()).append(future)
            self._pending.move_to_end(key)
            if teacher_ids is not None:
                self._routes[key] = list(teacher_ids)
            while len(self._pending) > _MAX_PENDING:
                old_key, old = self._pending.popitem(last=False)
                self._routes.pop(old_key, None)
                for stale in old:
                    stale.cancel()

    def rows(self, input_ids, attention_mask, example_ids=None):
        """The served rows of a batch (of each example, for a packed batch): its prefetched answer if there is one,
        else a request now."""
        sequences = batch_sequences(input_ids, attention_mask, example_ids)
        key = _key(sequences)
        with self._lock:
            queue = self._pending.get(key)
            future = queue.popleft() if queue else None
            if queue is not None and not queue:
                del self._pending[key]
            teacher_ids = self._routes.get(key)
        started = time.perf_counter()
        try:
            if future is not None:
                self.prefetched += 1
                return future.result()
            if self.route_column is not None and teacher_ids is None:
                raise ValueError("this batch did not come through the routing collator (e.g. on-policy samples), so "
                                 "which teacher scores each example is unknown: teacher_routes serves dataset batches "
                                 "only")
            self.requested += 1
            return self._fetch(sequences, teacher_ids)
        finally:
            self.wait_seconds += time.perf_counter() - started

    def targets(self, input_ids, attention_mask, shifted_labels, *, device=None, example_ids=None,
                position_ids=None) -> SparseTargets:
        """The batch's sparse targets; a packed batch (``example_ids``, ``position_ids``: kd_llm.data.packing) is
        asked example by example and its answers re-laid onto the packed rows."""
        return gather_targets(self.rows(input_ids, attention_mask, example_ids), shifted_labels,
                              temperature=self.temperature, device=device, example_ids=example_ids,
                              position_ids=position_ids)

    def close(self) -> None:
        with self._lock:
            for queue in self._pending.values():
                for future in queue:
                    future.cancel()
            self._pending.clear()
        for client in self.clients.values():
            client.close()


class PrefetchingCollator:
    """Wraps a data collator: every collated batch's served signal is requested at once (see the module
    docstring). In a DataLoader worker process (``dataloader_num_workers > 0``) it only collates: the answer would be
    lost with the worker, so the training process asks when it needs it."""

    def __init__(self, collator, signal: ServedTopK):
        self.collator, self.signal = collator, signal

    def __call__(self, features):
        route_column = self.signal.route_column
        teacher_ids = None
        if route_column is not None:
            missing = [i for i, f in enumerate(features) if route_column not in f]
            if missing:
                raise ValueError(f"example {missing[0]} of the batch has no {route_column!r} column, which "
                                 "teacher_routes needs to pick its teacher")
            teacher_ids = [str(f[route_column]) for f in features]
        batch = self.collator(features)
        if torch.utils.data.get_worker_info() is None:
            self.signal.prefetch(batch["input_ids"], batch.get("attention_mask"), teacher_ids,
                                 batch.get(PACKED_EXAMPLE_KEY))
        return batch


# --- parity ---------------------------------------------------------------------------------------------------------

def bucket_tvd(reference: SparseTargets, served: SparseTargets) -> torch.Tensor:
    """Per row: total-variation distance between the two distributions over the reference's ids plus one bucket for
    the rest. Where the served top-k lacks one of the reference's ids, its probability there counts as 0 (its mass
    goes to the rest bucket)."""
    ref_p = reference.log_probs.double().exp()
    matches = reference.token_ids[:, :, None] == served.token_ids[:, None, :]  # [N, k_ref, k_served]
    served_p = (matches.double() * served.log_probs.double().exp()[:, None, :]).sum(-1)
    ref_rest = (1 - ref_p.sum(-1)).clamp(min=0)
    served_rest = (1 - served_p.sum(-1)).clamp(min=0)
    return 0.5 * ((ref_p - served_p).abs().sum(-1) + (ref_rest - served_rest).abs())


def local_reference_targets(model, input_ids, attention_mask, shifted_labels, *, k: int, temperature: float,
                            vocab_size: int) -> SparseTargets:
    """A local teacher's top-k at the supervised positions of a batch (the parity reference)."""
    from kd_llm.serving.protocol import topk_with_tail

    parameters = list(model.parameters())[:1] if hasattr(model, "parameters") else []
    device = parameters[0].device if parameters else input_ids.device  # a TeacherProcess has none here
    with torch.no_grad():
        logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                       use_cache=False).logits[:, :-1]
    valid = shifted_labels.reshape(-1) != -100
    rows = logits.reshape(-1, logits.shape[-1])[valid.to(device)]
    ids, values, tail = topk_with_tail(rows, k=k, temperature=temperature, vocab_size=vocab_size)
    return SparseTargets(ids.cpu(), values.cpu(), tail.cpu(), temperature)


def parity_report(served: SparseTargets, reference: SparseTargets) -> dict:
    if served.num_rows != reference.num_rows:
        raise ValueError(f"{served.num_rows} served rows but {reference.num_rows} reference rows")
    tvd = bucket_tvd(reference, served)
    top1 = reference.token_ids.gather(-1, reference.log_probs.argmax(-1, keepdim=True))[:, 0] == \
        served.token_ids.gather(-1, served.log_probs.argmax(-1, keepdim=True))[:, 0]
    return {"positions": int(served.num_rows), "mean_tvd": float(tvd.mean()) if len(tvd) else 0.0,
            "max_tvd": float(tvd.max()) if len(tvd) else 0.0,
            "top1_agreement": float(top1.double().mean()) if len(top1) else 1.0}


# --- the trainer's hooks ---------------------------------------------------------------------------------------------

class ServedTeacherStopped(RuntimeError):
    """Training stopped because the served teacher failed for good; a checkpoint was saved first (if any step ran)."""


def open_served_teacher(trainer, *, teacher_model, tokenizer, custom_teacher_setup: bool = False) -> ServedTopK | None:
    """Connect to ``trainer.args.teacher_url`` / ``teacher_routes``, check the teachers' identity and the parity on
    a probe batch, and wrap the data collator so that batches are prefetched. None when no served teacher is set (or
    ``alpha == 1``, which reads no teacher)."""
    args = trainer.args
    if not (args.teacher_url or args.teacher_routes) or args.alpha >= 1:
        return None
    if tokenizer is None:
        raise ValueError("Pass processing_class=<the student's tokenizer>: the served teacher is checked against it.")
    if custom_teacher_setup:
        raise ValueError(f"{type(trainer).__name__} needs the teacher model itself (ensemble, online or EMA "
                         "teacher), not a served teacher: unset teacher_url / teacher_routes")
    if args.teacher_cache:
        raise ValueError("teacher_cache and a served teacher both serve the dataset's batches: use one (to compare "
                         "them before training, set teacher_parity_reference=<the cache folder>)")
    signal = ServedTopK(args)
    try:
        reference = args.teacher_parity_reference
        cache_hash = _cache_teacher_hash(reference) if reference else None
        signal.check(tokenizer, teacher_hash=cache_hash)
        _check_student_rows(trainer, signal, tokenizer)
        if args.teacher_parity_examples > 0 and trainer.train_dataset is not None:
            report = check_parity(trainer, signal, teacher_model=teacher_model, tokenizer=tokenizer)
            trainer.served_parity = report
    except BaseException:
        signal.close()
        raise
    trainer.data_collator = PrefetchingCollator(trainer.data_collator, signal)
    return signal


def _cache_teacher_hash(reference) -> str | None:
    from pathlib import Path

    from kd_llm.teacher_cache.metadata import METADATA_FILE, read_metadata

    if reference and (Path(reference) / METADATA_FILE).is_file():
        return read_metadata(reference).teacher_hash
    return None


def _check_student_rows(trainer, signal: ServedTopK, tokenizer) -> None:
    from kd_llm.models.vocab import tokenizer_vocab_size

    vocab = signal.vocab_size() or tokenizer_vocab_size(tokenizer)
    student = trainer.accelerator.unwrap_model(trainer.model)
    output = student.get_output_embeddings() if hasattr(student, "get_output_embeddings") else None
    rows = getattr(getattr(output, "weight", None), "shape", [None])[0]
    if rows is not None and rows < vocab:
        raise ValueError(f"The student has {rows} output logits but the served teacher's vocabulary has {vocab} "
                         "tokens: resize its embeddings to the tokenizer's length.")
    trainer.kd_vocab_size = vocab


def check_parity(trainer, signal: ServedTopK, *, teacher_model, tokenizer) -> dict | None:
    """Score the first ``teacher_parity_examples`` training examples through the served teacher and the local
    reference (``teacher_parity_reference``: a model spec or a teacher-cache folder; else ``teacher_model``); log the
    difference and raise ``ValueError`` above ``teacher_parity_max_tvd``. None when there is no reference."""
    import logging

    args = trainer.args
    reference = args.teacher_parity_reference
    if reference is None and teacher_model is None:
        logging.getLogger("kd_llm").warning(
            "served teacher at %s: no local reference to compare it with (teacher_parity_reference or a teacher "
            "model), so its signal is trusted as served", signal.describe())
        return None
    count = min(args.teacher_parity_examples, len(trainer.train_dataset))
    indices = list(range(count))
    features = [trainer.train_dataset[i] for i in indices]
    collator = trainer.data_collator.collator if isinstance(trainer.data_collator, PrefetchingCollator) else \
        trainer.data_collator
    if isinstance(collator, PackingCollator):  # the probe compares teachers, example by example: padded rows
        collator = CausalLMCollator(collator.pad_token_id)
    batch = collator(features)
    shifted = batch["labels"][:, 1:]
    sequences = batch_sequences(batch["input_ids"], batch.get("attention_mask"))
    teacher_ids = [str(f[signal.route_column]) for f in features] if signal.route_column else None
    served = gather_targets(signal._fetch(sequences, teacher_ids), shifted, temperature=signal.temperature)
    vocab = trainer.kd_vocab_size
    if reference is not None and _cache_teacher_hash(reference) is not None:
        from kd_llm.teacher_cache.reader import TeacherCache

        cache = TeacherCache.open(reference, tokenizer=tokenizer, dataset=trainer.train_dataset)
        ref_targets = cache.gather(torch.tensor(indices), shifted)
        from kd_llm.losses.sparse import same_temperature

        if not same_temperature(cache.temperature, signal.temperature):
            raise ValueError(f"the parity reference cache holds values at temperature {cache.temperature:g} and the "
                             f"served top-k comes at {signal.temperature:g}: compare at one temperature (train at "
                             f"{cache.temperature:g}, or use a local teacher as teacher_parity_reference)")
        source = f"teacher cache {reference}"
    else:
        model = teacher_model
        if reference is not None:
            from kd_llm.models.loading import freeze_teacher, load_model

            model = freeze_teacher(load_model(reference, trust_remote_code=False))
        ref_targets = local_reference_targets(model, batch["input_ids"], batch["attention_mask"], shifted,
                                              k=signal.k, temperature=signal.temperature, vocab_size=vocab)
        source = f"local teacher {reference}" if reference else "the local teacher_model"
        del model
    report = parity_report(served, ref_targets)
    report.update(reference=source, threshold=args.teacher_parity_max_tvd)
    logging.getLogger("kd_llm").warning(
        "served teacher parity on %d positions against %s: mean TVD %.3g (max %.3g), top-1 agreement %.1f%%",
        report["positions"], source, report["mean_tvd"], report["max_tvd"], 100 * report["top1_agreement"])
    if report["mean_tvd"] > args.teacher_parity_max_tvd:
        raise ValueError(
            f"the served teacher at {signal.describe()} disagrees with {source}: mean total-variation distance "
            f"{report['mean_tvd']:.4g} per position on {report['positions']} probe positions (top-1 agreement "
            f"{100 * report['top1_agreement']:.1f}%), above teacher_parity_max_tvd={args.teacher_parity_max_tvd}. "
            "Fix: serve the same teacher, weights dtype and tokenizer as the reference (or raise the threshold if "
            "the difference is expected, e.g. a quantised server).")
    return report


def save_and_stop(trainer, error: Exception):
    """On a served teacher that failed for good during training: save a checkpoint of the last finished step (the
    failed step's partial gradients are dropped), then raise :class:`ServedTeacherStopped` with the server, the
    error and how to resume."""
    import os

    step = trainer.state.global_step
    if step > 0:
        trainer._save_checkpoint(trainer.model, trial=None)
        folder = os.path.join(trainer.args.output_dir, f"checkpoint-{step}")
        saved = (f"Saved {folder} (step {step}) before stopping; after fixing it, resume exactly with "
                 f"--resume_from_checkpoint {folder}.")
    else:
        saved = "No step had finished, so nothing was saved; start the run again once the teacher answers."
    raise ServedTeacherStopped(f"training stopped: {error} {saved}") from error
