"""kd_llm.serving: real scripts/serve_teacher.py processes on 127.0.0.1 against the client and a local reference.

Identity checks, exact signals (kd_llm's binary endpoint and the vLLM-compatible JSON), batching, security, faults
through a proxy that breaks answers, replicas with one killed (kill -9), a server restarted with another teacher,
routing and prefetch.
"""

import threading

import pytest
import torch

pytest.importorskip("aiohttp")
httpx = pytest.importorskip("httpx")

from kd_llm.models.loading import load_model  # noqa: E402
from kd_llm.serving.client import (  # noqa: E402
    ServedTeacherClient,
    ServedTeacherError,
    ServedTeacherUnavailable,
    TeacherIdentityError,
    TeacherRouter,
)
from kd_llm.teacher_cache.metadata import state_dict_sha256  # noqa: E402
from tests.helpers.served import FaultProxy, ServerProcess, save_tiny_teacher  # noqa: E402


@pytest.fixture(scope="module")
def local_teacher(tiny_teacher_dir):
    return load_model(tiny_teacher_dir).eval()


@pytest.fixture(scope="module")
def other_teacher_dir(tmp_path_factory, char_tokenizer):
    return save_tiny_teacher(tmp_path_factory.mktemp("other_teacher"), char_tokenizer, seed=7)


@pytest.fixture
def sequences(char_tokenizer):
    texts = ["2024-01-05 + 3 days = 2024-01-08", "1999-12-31", "weekday of 2000-02-29?"]
    return [char_tokenizer(t)["input_ids"] for t in texts]


def reference_rows(model, sequence, *, k, temperature):
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([sequence])).logits[0].float()
    log_probs = torch.log_softmax(logits / temperature, dim=-1)
    top, ids = log_probs.topk(k, dim=-1)
    tail = torch.log1p(-top.double().exp().sum(-1)).float()
    return ids, top, tail


def client(url, **kwargs):
    return ServedTeacherClient(url, **{"backoff": 0.05, "max_backoff": 0.2, "timeout": 20, **kwargs})


def test_identity_is_checked_against_tokenizer_and_cache_hash(served_teacher, char_tokenizer, local_teacher,
                                                              tiny_teacher_dir):
    from transformers import AutoTokenizer

    with client(served_teacher.url) as teacher:
        identity = teacher.check(char_tokenizer, teacher_hash=state_dict_sha256(local_teacher))
        assert identity.vocab_size == len(char_tokenizer) and identity.server == "kd_llm"
        assert set(identity.signal_kinds) == {"topk", "hidden"}
        grown = AutoTokenizer.from_pretrained(tiny_teacher_dir)
        grown.add_tokens(["<extra>"])
        with pytest.raises(TeacherIdentityError, match="uses another tokenizer than this run"):
            teacher.check(grown)
        with pytest.raises(TeacherIdentityError, match="teacher cache was made by a teacher with hash"):
            teacher.check(char_tokenizer, teacher_hash="0" * 64)


@pytest.mark.parametrize("protocol, temperature", [("kd_llm", 2.0), ("vllm", 1.0)])
def test_topk_equals_the_local_teacher(served_teacher, local_teacher, sequences, protocol, temperature):
    with client(served_teacher.url, protocol=protocol) as teacher:
        rows = teacher.topk(sequences, k=6, temperature=temperature)
    assert len(rows) == len(sequences)
    for sequence, (ids, values, tail) in zip(sequences, rows):
        ref_ids, ref_values, ref_tail = reference_rows(local_teacher, sequence, k=6, temperature=temperature)
        # vLLM's prompt_logprobs have no row for the position past the prompt; kd_llm's binary answer does.
        n = len(sequence) - 1 if protocol == "vllm" else len(sequence)
        assert ids.shape == (len(sequence), 6)
        assert torch.equal(ids[:n], ref_ids[:n])
        assert torch.allclose(values[:n], ref_values[:n], atol=1e-5)
        assert torch.allclose(tail[:n], ref_tail[:n], atol=1e-4)


def test_hidden_states_are_the_final_normed_states(served_teacher, local_teacher, sequences):
    with client(served_teacher.url) as teacher:
        hidden = teacher.hidden(sequences)
        half = teacher.hidden(sequences[:1], dtype="bfloat16")
    for sequence, states in zip(sequences, hidden):
        with torch.no_grad():
            out = local_teacher(input_ids=torch.tensor([sequence]), output_hidden_states=True)
            expected = out.hidden_states[-1][0]
            logits = local_teacher.lm_head(states)
        assert states.shape == (len(sequence), 48)
        assert torch.allclose(states, expected, atol=1e-5)
        assert torch.allclose(logits, out.logits[0], atol=1e-4)  # what the lm_head of a hidden-state teacher sees
    assert half[0].dtype == torch.bfloat16 and torch.allclose(half[0].float(), hidden[0], atol=2e-2)
    with client(served_teacher.url) as teacher:
        head = teacher.head()  # sent once, checked against the hash in the identity
    assert torch.equal(head.weight, local_teacher.lm_head.weight) and head.softcap is None
    with torch.no_grad():
        rebuilt = hidden[0] @ head.weight.T
        expected_logits = local_teacher(input_ids=torch.tensor([sequences[0]])).logits[0]
    assert torch.allclose(rebuilt, expected_logits, atol=1e-4)


def test_vllm_completions_response_shape(served_teacher, sequences):
    prompt = sequences[1]
    response = httpx.post(served_teacher.url + "/v1/completions",
                          json={"prompt": [prompt, prompt[:3]], "max_tokens": 1, "prompt_logprobs": 2,
                                "return_token_ids": True}, timeout=20)
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert [c["index"] for c in body["choices"]] == [0, 1]
    first = body["choices"][0]
    assert first["prompt_token_ids"] == prompt and len(first["token_ids"]) == 1
    assert first["prompt_logprobs"][0] is None and len(first["prompt_logprobs"]) == len(prompt)
    assert all(len(e) in (2, 3) for e in first["prompt_logprobs"][1:])
    assert body["usage"]["prompt_tokens"] == len(prompt) + 3
    models = httpx.get(served_teacher.url + "/v1/models", timeout=20).json()
    assert models["object"] == "list" and models["data"][0]["object"] == "model"
    refused = httpx.post(served_teacher.url + "/v1/completions", json={"prompt": prompt, "max_tokens": 8},
                         timeout=20)
    assert refused.status_code == 400 and "max_tokens" in refused.json()["error"]["message"]
    bad_id = httpx.post(served_teacher.url + "/kd/v1/signal",
                        json={"kind": "topk", "k": 2, "sequences": [[1, 10_000]]}, timeout=20)
    assert bad_id.status_code == 400 and "outside this teacher's vocabulary" in bad_id.json()["error"]["message"]


def test_concurrent_requests_are_batched(served_teacher, sequences):
    stats = lambda: httpx.get(served_teacher.url + "/kd/v1/stats", timeout=20).json()  # noqa: E731
    before = stats()
    results, errors = [None] * 8, []
    barrier = threading.Barrier(8)
    with client(served_teacher.url) as teacher:
        teacher.identity  # noqa: B018 -- connect once, outside the race

        def ask(index):
            try:
                barrier.wait(10)
                results[index] = teacher.topk([sequences[index % 3]], k=3)
            except Exception as error:  # noqa: BLE001
                errors.append(error)

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        single = teacher.topk([sequences[0]], k=3)
    assert not errors
    after = stats()
    assert after["requests"] - before["requests"] == 9
    assert after["passes"] - before["passes"] < 9  # some requests shared a forward pass
    assert torch.allclose(results[0][0][1], single[0][1], atol=1e-6)


def test_token_limits_and_loopback(tiny_teacher_dir, tmp_path, char_tokenizer, sequences):
    secret = "s3cret-token-value"
    with ServerProcess(tiny_teacher_dir, tmp_path, token=secret, extra=("--max-body-mb", "0.001",
                                                                       "--max-sequences", "4")) as server:
        assert server.url.startswith("http://127.0.0.1:")
        with client(server.url, token="wrong") as teacher, pytest.raises(ServedTeacherError, match="HTTP 401"):
            teacher.identity  # noqa: B018
        assert httpx.get(server.url + "/health", timeout=20).status_code == 200
        with client(server.url, token=secret) as teacher:
            assert teacher.check(char_tokenizer).vocab_size == len(char_tokenizer)
            assert secret not in repr(teacher)
            with pytest.raises(ServedTeacherError, match="more than the limit of 4"):
                teacher.topk(sequences * 2, k=2)
            with pytest.raises(ServedTeacherError, match="HTTP 413"):
                teacher.topk([list(range(4, 85)) * 3] * 4, k=2)  # over 1 kB of JSON
        output = server.output()
    assert secret not in output


def test_transient_faults_are_retried_and_persistent_ones_named(served_teacher, local_teacher, sequences):
    expected = None
    with client(served_teacher.url) as direct:
        expected = direct.topk(sequences, k=4)
    with FaultProxy(served_teacher.url, delay=3.0) as proxy:
        with client(proxy.url, retries=6, timeout=1.0) as teacher:
            teacher.identity  # noqa: B018
            proxy.inject("500", "reset", "corrupt", "garbage", "delay")
            rows = teacher.topk(sequences, k=4)
            assert teacher.failures == 5
            for (ids, values, tail), (e_ids, e_values, e_tail) in zip(rows, expected):
                assert torch.equal(ids, e_ids) and torch.equal(values, e_values) and torch.equal(tail, e_tail)
            proxy.inject(*["500"] * 10)
            with pytest.raises(ServedTeacherUnavailable, match=r"failed 7 times in a row.*Fix: start the server"):
                teacher.topk(sequences, k=4)
            proxy.faults.clear()


def test_replicas_spread_and_survive_a_killed_one(tiny_teacher_dir, tmp_path, local_teacher, sequences):
    with ServerProcess(tiny_teacher_dir, tmp_path / "a") as a, ServerProcess(tiny_teacher_dir, tmp_path / "b") as b:
        with client([a.url, b.url]) as teacher:
            expected = [teacher.topk([s], k=4)[0] for s in sequences * 2]
            counts = [httpx.get(s.url + "/kd/v1/stats", timeout=20).json()["requests"] for s in (a, b)]
            assert min(counts) >= 2  # round-robin reached both
            a.kill()  # kill -9 mid-run
            after = [teacher.topk([s], k=4)[0] for s in sequences * 2]
            for got, want in zip(after, expected):
                assert all(torch.equal(x, y) for x, y in zip(got, want))
            assert teacher.replicas[0].failures >= 1 and teacher.replicas[1].failures == 0


def test_a_server_restarted_with_another_teacher_is_never_used(tiny_teacher_dir, other_teacher_dir, tmp_path,
                                                              sequences):
    first = ServerProcess(tiny_teacher_dir, tmp_path / "first")
    port = first.port
    with client(first.url) as teacher:
        teacher.topk(sequences[:1], k=3)
        first.kill()
        with ServerProcess(other_teacher_dir, tmp_path / "second", port=port):
            with pytest.raises(TeacherIdentityError, match="every replica of the served teacher now serves another"):
                teacher.topk(sequences[:1], k=3)


def test_routing_by_teacher_id_and_prefetch(served_teacher, other_teacher_dir, tmp_path, local_teacher,
                                            char_tokenizer, sequences):
    other_model = load_model(other_teacher_dir).eval()
    with ServerProcess(other_teacher_dir, tmp_path) as other:
        router = TeacherRouter({"dates": client(served_teacher.url), "other": client(other.url)})
        try:
            assert set(router.check(char_tokenizer)) == {"dates", "other"}
            ids = ["other", "dates", "other"]
            rows = router.topk(sequences, ids, k=4, temperature=1.0)
            for sequence, name, (got_ids, got_values, _) in zip(sequences, ids, rows):
                model = other_model if name == "other" else local_teacher
                ref_ids, ref_values, _ = reference_rows(model, sequence, k=4, temperature=1.0)
                assert torch.equal(got_ids, ref_ids) and torch.allclose(got_values, ref_values, atol=1e-5)
            with pytest.raises(ValueError, match="teacher_id 'nobody' names no teacher"):
                router.topk(sequences[:1], ["nobody"], k=4)
            future = router.clients["dates"].submit("topk", sequences, k=4)
            assert all(torch.equal(x[0], y[0]) for x, y in zip(future.result(60),
                                                                router.clients["dates"].topk(sequences, k=4)))
        finally:
            router.close()
