"""The teacher a server holds, and the signals it computes for padded batches of token-id sequences.

Kept free of HTTP so that it is tested (and could be reused) on its own: :class:`ServedModel` loads a teacher as
kd_llm loads any (folder, .gguf, ``packaged:``, ``embedded:``, Hub id, LoRA adapter merged; safetensors only,
``trust_remote_code`` off unless asked), computes its identity once, and scores lists of sequences:

- ``topk``: the ``k`` most likely next tokens per position, their log-probabilities at a temperature and the exact
  log-mass of the rest (what the sparse loss takes);
- ``hidden``: the final hidden states after the last norm (what the teacher's lm_head reads), for a hidden-state
  teacher that applies the lm_head in the training process (served only when the logits are
  ``softcap(lm_head(h))``, checked with :func:`kd_llm.training.teacher_head.checked_teacher_head`; the head itself is
  sent once, ``GET /kd/v1/head``);
- ``completion rows`` for vLLM-compatible ``prompt_logprobs``: top-k at ``T = 1`` plus each prompt token's own
  log-probability and rank.

Logits are computed from the final hidden states a chunk of positions at a time (with the model's final-logit
soft-capping where its config has one), so a batch never holds ``[B, L, V]`` float32 logits at once.
"""

from __future__ import annotations

import torch

from kd_llm.serving.protocol import TeacherIdentity, topk_with_tail

_LOGIT_ROWS_PER_CHUNK = 2048


class ServedModel:
    """A frozen teacher and its tokenizer, ready to score (see the module docstring)."""

    def __init__(self, model, tokenizer, *, model_id: str, device: str = "cpu"):
        from kd_llm.models.loading import freeze_teacher
        from kd_llm.models.vocab import tokenizer_vocab_size
        from kd_llm.teacher_cache.metadata import state_dict_sha256, tokenizer_sha256

        self.model = freeze_teacher(model).to(device)
        self.tokenizer = tokenizer
        self.device = device
        self.vocab_size = tokenizer_vocab_size(tokenizer)
        head = self.model.get_output_embeddings()
        rows = int(head.weight.shape[0])
        if rows < self.vocab_size:
            raise ValueError(f"the teacher has {rows} output logits but its tokenizer addresses {self.vocab_size} "
                             "tokens: resize its embeddings to the tokenizer's length")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        text_config = self.model.config.get_text_config(decoder=True)
        self.softcap = getattr(text_config, "final_logit_softcapping", None)
        self.max_length = getattr(text_config, "max_position_embeddings", None)
        # Hidden states stand in for the logits only when they are softcap(lm_head(h)): checked once, here.
        self.head, head_problem = None, None
        try:
            from kd_llm.training.teacher_head import checked_teacher_head

            self.head = checked_teacher_head(self.model, self.vocab_size)
        except ValueError as error:
            head_problem = str(error)
        extra = {"max_model_len": self.max_length}
        if self.head is not None:
            extra.update(head_sha256=self.head.sha256, softcap=self.head.softcap)
        else:
            extra["hidden_unavailable"] = head_problem
        self.identity = TeacherIdentity(
            model_id=model_id, weights_hash=state_dict_sha256(self.model), tokenizer_hash=tokenizer_sha256(tokenizer),
            vocab_size=self.vocab_size, signal_kinds=("topk", "hidden") if self.head is not None else ("topk",),
            output_rows=rows, hidden_size=int(text_config.hidden_size), max_k=self.vocab_size,
            dtype=str(next(self.model.parameters()).dtype).removeprefix("torch."), extra=extra)

    @classmethod
    def load(cls, spec: str, *, adapter: str | None = None, dtype: str = "float32", device: str = "cpu",
             trust_remote_code: bool = False, model_id: str | None = None) -> "ServedModel":
        from kd_llm.models.loading import load_model, load_peft_teacher, load_tokenizer

        weights_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
        if adapter:
            model = load_peft_teacher(spec, adapter, dtype=weights_dtype, trust_remote_code=trust_remote_code)
        else:
            model = load_model(spec, dtype=weights_dtype, trust_remote_code=trust_remote_code)
        tokenizer = load_tokenizer(spec, trust_remote_code=trust_remote_code)
        return cls(model, tokenizer, model_id=model_id or str(spec), device=device)

    # --- checks ---------------------------------------------------------------------------------------------------

    def check_sequences(self, sequences) -> list[list[int]]:
        """Token-id lists, each non-empty and inside the vocabulary; raises ``ValueError`` naming what is wrong."""
        if not isinstance(sequences, list) or not sequences:
            raise ValueError("give a non-empty list of token-id lists")
        checked = []
        for index, sequence in enumerate(sequences):
            if not isinstance(sequence, list) or not sequence or not all(type(t) is int for t in sequence):
                raise ValueError(f"sequence {index} is not a non-empty list of integer token ids")
            low, high = min(sequence), max(sequence)
            if low < 0 or high >= self.vocab_size:
                raise ValueError(f"sequence {index} has token id {low if low < 0 else high}, outside this teacher's "
                                 f"vocabulary of {self.vocab_size}")
            if self.max_length and len(sequence) > self.max_length:
                raise ValueError(f"sequence {index} has {len(sequence)} tokens, more than the teacher's "
                                 f"{self.max_length} positions")
            checked.append(sequence)
        return checked

    # --- forward ----------------------------------------------------------------------------------------------------

    def _padded(self, sequences: list[list[int]]):
        longest = max(len(s) for s in sequences)
        input_ids = torch.full((len(sequences), longest), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), longest), dtype=torch.long)
        for row, sequence in enumerate(sequences):
            input_ids[row, : len(sequence)] = torch.tensor(sequence)
            attention_mask[row, : len(sequence)] = 1
        return input_ids.to(self.device), attention_mask.to(self.device)

    @torch.no_grad()
    def final_hidden(self, sequences: list[list[int]]) -> list[torch.Tensor]:
        """Per sequence ``[L_i, H]``: the decoder's output after its final norm, in the teacher's dtype."""
        input_ids, attention_mask = self._padded(sequences)
        hidden = self.model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                          use_cache=False).last_hidden_state
        return [hidden[row, : len(sequence)].cpu() for row, sequence in enumerate(sequences)]

    def _logits(self, hidden_rows: torch.Tensor) -> torch.Tensor:
        logits = self.model.get_output_embeddings()(hidden_rows.to(self.device)).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    @torch.no_grad()
    def topk(self, sequences: list[list[int]], *, k: int, temperature: float = 1.0):
        """Per sequence ``(ids [L_i, k], log_probs [L_i, k], log_tail [L_i])``: row ``t`` is the distribution of the
        token after position ``t`` at ``temperature``, over the tokenizer's vocabulary."""
        results = []
        for hidden in self.final_hidden(sequences):
            parts = [topk_with_tail(self._logits(chunk), k=k, temperature=temperature, vocab_size=self.vocab_size)
                     for chunk in hidden.split(_LOGIT_ROWS_PER_CHUNK)]
            results.append(tuple(torch.cat(columns) for columns in zip(*parts)))
        return results

    @torch.no_grad()
    def completion_rows(self, sequences: list[list[int]], *, k: int):
        """Per sequence, for vLLM-style ``prompt_logprobs`` at ``T = 1``: ``(ids, log_probs, target_logprob,
        target_rank, next_token)`` where the targets are each next prompt token's own log-probability and 1-based
        rank (positions ``0 .. L-2``) and ``next_token`` is the greedy token after the prompt."""
        results = []
        for sequence, hidden in zip(sequences, self.final_hidden(sequences)):
            ids, values, target_lp, target_rank = [], [], [], []
            targets = torch.tensor(sequence[1:] + [0])
            for start, chunk in zip(range(0, len(sequence), _LOGIT_ROWS_PER_CHUNK),
                                    hidden.split(_LOGIT_ROWS_PER_CHUNK)):
                log_probs = torch.log_softmax(self._logits(chunk)[:, : self.vocab_size], dim=-1)
                top, top_ids = log_probs.topk(min(k, self.vocab_size), dim=-1) if k > 0 else \
                    (log_probs[:, :0], torch.zeros((len(chunk), 0), dtype=torch.long))
                chunk_targets = targets[start:start + len(chunk)].to(log_probs.device)
                own = log_probs.gather(-1, chunk_targets[:, None])
                ids.append(top_ids.cpu())
                values.append(top.cpu())
                target_lp.append(own[:, 0].cpu())
                target_rank.append(((log_probs > own).sum(-1) + 1).cpu())  # as vLLM: 1 + tokens strictly likelier
                last_row = log_probs[-1]
            results.append((torch.cat(ids), torch.cat(values), torch.cat(target_lp), torch.cat(target_rank),
                            int(last_row.argmax())))
        return results
