"""kd_llm.serving.protocol: binary bodies, top-k tails, vLLM's prompt_logprobs in both directions."""

import math

import pytest
import torch

from kd_llm.serving.protocol import (
    SignalBodyError,
    TeacherIdentity,
    completion_request,
    decode_signal,
    encode_signal,
    parse_prompt_logprobs,
    prompt_logprobs_entries,
    tail_from_top,
    topk_with_tail,
)


def test_signal_body_round_trips_every_dtype_and_detects_damage():
    arrays = {"ids": torch.arange(12, dtype=torch.int32).reshape(3, 4), "lp": torch.randn(3, 4),
              "h": torch.randn(3, 5).to(torch.bfloat16), "lengths": torch.tensor([1, 2], dtype=torch.int64)}
    body = encode_signal(arrays, meta={"kind": "topk", "weights_hash": "abc"})
    meta, back = decode_signal(body)
    assert meta == {"kind": "topk", "weights_hash": "abc"}
    for name, tensor in arrays.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor)
    with pytest.raises(SignalBodyError, match="truncated"):
        decode_signal(body[:-3])
    flipped = bytearray(body)
    flipped[-2] ^= 1
    with pytest.raises(SignalBodyError, match="CRC"):
        decode_signal(bytes(flipped))
    with pytest.raises(SignalBodyError, match="not a kd_llm signal"):
        decode_signal(b"<html>bad gateway</html>")


def test_topk_tail_is_the_exact_mass_outside_and_vllm_tail_recovers_it():
    logits = torch.randn(6, 50, dtype=torch.float64) * 3
    ids, top, tail = topk_with_tail(logits, k=7, temperature=2.0, vocab_size=40)
    full = torch.log_softmax(logits[:, :40] / 2.0, dim=-1)
    naive_tail = torch.log(1 - full.gather(-1, ids).exp().sum(-1))
    assert torch.allclose(tail.double(), naive_tail, atol=1e-5)
    assert torch.allclose(top.double(), full.gather(-1, ids), atol=1e-6)
    assert ids.max() < 40  # padding columns never selected
    assert torch.allclose(tail_from_top(top).double(), naive_tail, atol=1e-4)
    _, _, no_tail = topk_with_tail(logits, k=40, temperature=1.0, vocab_size=40)
    assert torch.isinf(no_tail).all() and (no_tail < 0).all()


def test_prompt_logprobs_match_vllm_shape_and_parse_back():
    """The server side writes what vLLM writes (None first, k entries + the prompt token with its rank, -inf
    clamped); the client side reads it back into rows aligned with the predicting positions."""
    torch.manual_seed(0)
    prompt = [3, 9, 1, 4]
    log_probs = torch.log_softmax(torch.randn(4, 12), dim=-1)
    log_probs[0, 5] = -math.inf
    top, ids = log_probs.topk(3, dim=-1)
    targets = torch.tensor(prompt[1:] + [0])
    own = log_probs.gather(-1, targets[:, None])[:, 0]
    rank = (log_probs > own[:, None]).sum(-1) + 1
    entries = prompt_logprobs_entries(ids, top, prompt, target_logprob=own, target_rank=rank, decode=str)
    assert entries[0] is None and len(entries) == len(prompt)
    for position in range(1, len(prompt)):
        entry = entries[position]
        token = str(prompt[position])
        assert token in entry and entry[token]["rank"] == int(rank[position - 1])
        assert len(entry) == (3 if int(rank[position - 1]) <= 3 else 4)
        assert all(isinstance(key, str) and set(v) == {"logprob", "rank", "decoded_token"} for key, v in entry.items())
        assert all(v["logprob"] >= -9999.0 for v in entry.values())
    got_ids, got_lp, got_tail = parse_prompt_logprobs(entries, prompt, k=3)
    assert torch.equal(got_ids[:-1], ids[:-1]) and torch.allclose(got_lp[:-1], top[:-1])
    expected_tail = torch.log1p(-top[:-1].exp().sum(-1))
    assert torch.allclose(got_tail[:-1], expected_tail, atol=1e-5)
    with pytest.raises(ValueError, match="fewer than k=5"):
        parse_prompt_logprobs(entries, prompt, k=5)
    with pytest.raises(ValueError, match="entries for a prompt"):
        parse_prompt_logprobs(entries[:-1], prompt, k=3)


def test_completion_request_asks_vllm_for_prompt_logprobs_of_token_ids():
    body = completion_request([[1, 2, 3], [4, 5]], k=8, model="teacher")
    assert body == {"prompt": [[1, 2, 3], [4, 5]], "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 8,
                    "add_special_tokens": False, "model": "teacher"}


def test_identity_round_trip_and_sameness():
    identity = TeacherIdentity("t", "w" * 64, "h" * 64, 89, ("topk", "hidden"), output_rows=96)
    back = TeacherIdentity.from_dict({**identity.to_dict(), "unknown_future_field": 1})
    assert back == identity and back.same_teacher(identity)
    assert not identity.same_teacher(TeacherIdentity("t", "x" * 64, "h" * 64, 89))
