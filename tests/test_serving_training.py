"""DistillationTrainer against real scripts/serve_teacher.py processes on 127.0.0.1: the served top-k (k = V) trains
as the local teacher does, identity and parity refusals, a replica killed mid-run, routing, and a run resumed after
its server stopped that ends where an uninterrupted run ends."""

import pytest
import torch
from transformers import TrainerCallback

pytest.importorskip("aiohttp")
pytest.importorskip("httpx")

from kd_llm import DistillationTrainer  # noqa: E402
from kd_llm.models.loading import load_model  # noqa: E402
from kd_llm.serving.training import ServedTeacherStopped  # noqa: E402
from tests.conftest import tiny_distillation_config, tiny_llama  # noqa: E402
from tests.helpers.served import ServerProcess, save_tiny_teacher  # noqa: E402
from tests.helpers.training import max_difference, params  # noqa: E402

FAST = dict(teacher_retries=2, teacher_retry_backoff=0.05, teacher_timeout=20.0)
# Plain SGD: the server may score concurrent requests in one padded pass, which changes the targets by float rounding
# (~1e-7); Adam would blow that up on near-zero gradients into full-size steps, SGD keeps it at that size.
SGD = dict(optim="sgd", learning_rate=0.5)


@pytest.fixture(scope="module")
def other_teacher_dir(tmp_path_factory, char_tokenizer):
    return save_tiny_teacher(tmp_path_factory.mktemp("other_teacher"), char_tokenizer, seed=7)


def config(tmp_path, url, **overrides):
    values = dict(teacher_url=url, teacher_top_k=89, alpha=0.0, temperature=1.0, **FAST, **SGD)
    values.update(overrides)
    return tiny_distillation_config(tmp_path, **values)


def served_trainer(tmp_path, url, dataset, tokenizer, *, callbacks=(), teacher_model=None, **overrides):
    return DistillationTrainer(model=tiny_llama(len(tokenizer), seed=2), teacher_model=teacher_model,
                               args=config(tmp_path, url, **overrides), train_dataset=dataset,
                               processing_class=tokenizer, callbacks=list(callbacks))


class AtStep(TrainerCallback):
    def __init__(self, step, action):
        self.step, self.action, self.done = step, action, False

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step and not self.done:
            self.done = True
            self.action()


@pytest.mark.parametrize("protocol", ["kd_llm", "vllm"])
def test_served_top_k_trains_like_the_local_teacher(tmp_path, served_teacher, tiny_teacher_dir, date_dataset,
                                                    char_tokenizer, protocol):
    """k = V: the sparse objective on the served top-k is the dense one, so the student lands where the local
    teacher takes it, through kd_llm's binary endpoint or the vLLM-compatible JSON; the parity check against that
    teacher passes, and every batch was prefetched."""
    teacher = load_model(tiny_teacher_dir)
    local = DistillationTrainer(model=tiny_llama(89, seed=2), teacher_model=teacher,
                                args=tiny_distillation_config(tmp_path / "local", alpha=0.0, temperature=1.0, **SGD),
                                train_dataset=date_dataset, processing_class=char_tokenizer)
    local.train()
    served = served_trainer(tmp_path / "served", served_teacher.url, date_dataset, char_tokenizer,
                            teacher_parity_reference=str(tiny_teacher_dir), teacher_protocol=protocol)
    assert served.served_teacher.source.identity.server == protocol
    assert served.served_parity["mean_tvd"] < 1e-5 and served.served_parity["top1_agreement"] == 1.0
    served.train()
    moved = max_difference(params(local.model), params(tiny_llama(89, seed=2)))
    assert max_difference(params(served.model), params(local.model)) < 1e-3 * moved  # a misaligned row moves ~1x
    kd = lambda t: [e["kd_loss"] for e in t.state.log_history if "kd_loss" in e]  # noqa: E731
    assert kd(served) == pytest.approx(kd(local), rel=1e-4)
    assert served.served_teacher.prefetched == 3 and served.served_teacher.requested == 0


def test_refuses_another_tokenizer_and_a_teacher_that_disagrees(tmp_path, served_teacher, other_teacher_dir,
                                                                 tiny_teacher_dir, date_dataset, char_tokenizer):
    from transformers import AutoTokenizer

    from kd_llm.serving.client import TeacherIdentityError

    grown = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    grown.add_tokens(["<extra>"])
    with pytest.raises(TeacherIdentityError, match="uses another tokenizer than this run"):
        served_trainer(tmp_path / "a", served_teacher.url, date_dataset, grown)
    with pytest.raises(ValueError, match=r"disagrees with local teacher .*mean total-variation distance"):
        served_trainer(tmp_path / "b", served_teacher.url, date_dataset, char_tokenizer,
                       teacher_parity_reference=str(other_teacher_dir))
    with pytest.raises(ValueError, match="disagrees with the local teacher_model"):
        served_trainer(tmp_path / "c", served_teacher.url, date_dataset, char_tokenizer,
                       teacher_model=load_model(other_teacher_dir))


def test_a_replica_killed_mid_run_changes_nothing(tmp_path, served_teacher, tiny_teacher_dir, date_dataset,
                                                  char_tokenizer):
    reference = served_trainer(tmp_path / "ref", served_teacher.url, date_dataset, char_tokenizer, max_steps=4)
    reference.train()
    with ServerProcess(tiny_teacher_dir, tmp_path / "replica") as replica:
        trainer = served_trainer(tmp_path / "run", f"{replica.url},{served_teacher.url}", date_dataset,
                                 char_tokenizer, max_steps=4, callbacks=[AtStep(1, replica.kill)])
        trainer.train()
    assert max_difference(params(trainer.model), params(reference.model)) < 1e-6
    assert trainer.served_teacher.source.failures >= 1  # the killed replica was tried, and the other one answered


def test_resume_after_a_stopped_server_matches_an_uninterrupted_run(tmp_path, served_teacher, tiny_teacher_dir,
                                                                   date_dataset, char_tokenizer):
    uninterrupted = served_trainer(tmp_path / "whole", served_teacher.url, date_dataset, char_tokenizer,
                                   max_steps=5)
    uninterrupted.train()
    server = ServerProcess(tiny_teacher_dir, tmp_path / "dying")
    stopped = served_trainer(tmp_path / "run", server.url, date_dataset, char_tokenizer, max_steps=5,
                             callbacks=[AtStep(2, server.kill)])
    with pytest.raises(ServedTeacherStopped, match=r"failed 3 times in a row.*resume exactly with "
                                                   r"--resume_from_checkpoint") as stop:
        stopped.train()
    assert server.url in str(stop.value)
    checkpoint = str(stop.value).rsplit("--resume_from_checkpoint ", 1)[1].rstrip(".")
    assert stopped.state.global_step in (2, 3) and checkpoint.endswith(f"checkpoint-{stopped.state.global_step}")
    with ServerProcess(tiny_teacher_dir, tmp_path / "back") as back:
        resumed = served_trainer(tmp_path / "run", back.url, date_dataset, char_tokenizer, max_steps=5)
        resumed.train(resume_from_checkpoint=checkpoint)
    assert resumed.state.global_step == 5
    assert max_difference(params(resumed.model), params(uninterrupted.model)) < 1e-6


def test_routed_teachers_score_their_own_examples(tmp_path, served_teacher, other_teacher_dir, tiny_teacher_dir,
                                                  date_dataset, char_tokenizer):
    """Every example goes to the teacher its teacher_id names: with both ids on servers of the same teacher the run
    equals the unrouted one; with another teacher on one id it differs, and both teachers were asked."""
    import httpx

    routed_data = date_dataset.add_column("teacher_id", ["dates" if i % 2 else "other" for i in
                                                         range(len(date_dataset))])
    plain = served_trainer(tmp_path / "plain", served_teacher.url, date_dataset, char_tokenizer)
    plain.train()
    with ServerProcess(tiny_teacher_dir, tmp_path / "twin") as twin, \
            ServerProcess(other_teacher_dir, tmp_path / "other") as other:
        same = served_trainer(tmp_path / "same", None, routed_data, char_tokenizer,
                              teacher_routes={"dates": served_teacher.url, "other": twin.url})
        same.train()
        assert max_difference(params(same.model), params(plain.model)) < 1e-6
        mixed = served_trainer(tmp_path / "mixed", None, routed_data, char_tokenizer,
                               teacher_routes={"dates": served_teacher.url, "other": other.url})
        mixed.train()
        assert httpx.get(other.url + "/kd/v1/stats", timeout=20).json()["requests"] >= 3
    assert max_difference(params(mixed.model), params(plain.model)) > 1e-4
    with pytest.raises(ValueError, match="has no 'teacher_id' column"):
        served_trainer(tmp_path / "bad", None, date_dataset, char_tokenizer,
                       teacher_routes={"dates": served_teacher.url}).train()


@pytest.mark.parametrize("overrides, message", [
    (dict(teacher_url="ftp://x"), "must start with http"),
    (dict(teacher_url="http://127.0.0.1:1", teacher_routes={"a": "http://127.0.0.1:2"}), "not both"),
    (dict(teacher_url="http://127.0.0.1:1", teacher_protocol="vllm", temperature=2.0), "comes at temperature 1"),
    (dict(teacher_url="http://127.0.0.1:1", distillation_loss="mse"), "cannot be computed from a served"),
    (dict(teacher_url="http://127.0.0.1:1", hidden_weight=1.0), "intermediate features"),
])
def test_config_refuses_what_a_served_teacher_cannot_serve(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_distillation_config(tmp_path, **overrides)


def test_on_policy_samples_are_scored_by_the_server(tmp_path, served_teacher, date_dataset, char_tokenizer):
    trainer = served_trainer(tmp_path, served_teacher.url, date_dataset, char_tokenizer, lmbda=1.0 - 1e-9,
                             max_steps=2, generation_max_new_tokens=4, alpha=0.5)
    trainer.train()
    assert trainer.served_teacher.requested >= 1  # the student's own samples were asked for when needed
    assert all(torch.isfinite(torch.tensor(e["kd_loss"])) for e in trainer.state.log_history if "kd_loss" in e)


def test_parity_against_a_teacher_cache(tmp_path, served_teacher, tiny_teacher_dir, other_teacher_dir, date_dataset,
                                        char_tokenizer):
    """A cache of the served teacher passes the parity check (within its float16 codec); a cache of another teacher
    is refused by its weights hash before any scoring."""
    from kd_llm.serving.client import TeacherIdentityError
    from tests.helpers.cache import build

    build(tmp_path / "same", load_model(tiny_teacher_dir), date_dataset, char_tokenizer, k=16, temperature=1.0)
    trainer = served_trainer(tmp_path / "a", served_teacher.url, date_dataset, char_tokenizer, teacher_top_k=16,
                             teacher_parity_reference=str(tmp_path / "same"))
    assert trainer.served_parity["mean_tvd"] < 1e-3 and "teacher cache" in trainer.served_parity["reference"]
    build(tmp_path / "other", load_model(other_teacher_dir), date_dataset, char_tokenizer, k=16, temperature=1.0)
    with pytest.raises(TeacherIdentityError, match="teacher cache was made by a teacher with hash"):
        served_trainer(tmp_path / "b", served_teacher.url, date_dataset, char_tokenizer, teacher_top_k=16,
                       teacher_parity_reference=str(tmp_path / "other"))


def test_packed_batches_are_sent_example_by_example_and_give_the_padded_loss_and_gradients(
        tmp_path, served_teacher, date_dataset, char_tokenizer):
    """packing=True: each example of a packed row is its own request sequence, and the answers are re-laid onto the
    packed rows: the dataset's batches and the student's on-policy samples give the padded batches' loss and
    gradients (1e-5), at k = V and at k = 8 (a tail); the requests are the padded batch's sequences."""
    from kd_llm.serving.training import batch_sequences
    from tests.test_packed_generation import assert_same_loss_and_gradients, micro_batches

    for k in (89, 8):
        trainers = {packing: served_trainer(tmp_path / f"{k}-{packing}", served_teacher.url, date_dataset,
                                            char_tokenizer, packing=packing, packing_max_length=160, lmbda=1.0,
                                            alpha=0.5, teacher_top_k=k, generation_max_new_tokens=8,
                                            teacher_parity_examples=0)
                    for packing in (False, True)}
        padded, packed = trainers[False], trainers[True]
        padded_in, packed_in = micro_batches(padded, date_dataset), micro_batches(packed, date_dataset)
        for padded_batch, packed_batch in zip(padded_in, packed_in):
            assert packed_batch["input_ids"].shape[0] < padded_batch["input_ids"].shape[0]
            assert batch_sequences(packed_batch["input_ids"], None, packed_batch["packed_example_ids"]) == \
                batch_sequences(padded_batch["input_ids"], padded_batch["attention_mask"])
            assert_same_loss_and_gradients(padded, packed, padded_batch, packed_batch)
        assert packed.served_teacher.prefetched == 2 and packed.served_teacher.requested == 0
        generated = [t.completion_generator.replace(b, step=0, student=t.model, teacher=t.teacher)
                     for t, b in ((padded, padded_in), (packed, packed_in))]
        for padded_batch, packed_batch in zip(*generated):  # not prefetched: asked for when needed
            assert_same_loss_and_gradients(padded, packed, padded_batch, packed_batch)
        assert packed.served_teacher.requested == 2


def test_packed_training_with_routed_teachers_trains_the_padded_runs_student(tmp_path, served_teacher,
                                                                             other_teacher_dir, date_dataset,
                                                                             char_tokenizer):
    """Each example of a packed row goes to the teacher its teacher_id names: with another teacher on one id, the
    packed run (accumulated, parity probe on) trains the padded run's student."""
    routed_data = date_dataset.add_column("teacher_id", ["dates" if i % 2 else "other" for i in
                                                         range(len(date_dataset))])
    settings = dict(per_device_train_batch_size=4, gradient_accumulation_steps=2, teacher_parity_examples=4)
    with ServerProcess(other_teacher_dir, tmp_path / "other") as other:
        routes = {"dates": served_teacher.url, "other": other.url}
        runs = {}
        for packing in (False, True):
            runs[packing] = served_trainer(tmp_path / str(packing), None, routed_data, char_tokenizer,
                                           teacher_routes=routes, packing=packing, **settings)
            runs[packing].train()
    padded, packed = runs[False], runs[True]
    assert max_difference(params(padded.model), params(tiny_llama(89, seed=2))) > 1e-3
    assert max_difference(params(packed.model), params(padded.model)) < 1e-6
    assert packed.served_teacher.prefetched == 6 and packed.served_teacher.requested == 0
