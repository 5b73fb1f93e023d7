"""DistillationTrainer with packing=True: the same loss, gradients and trained student as the padded batches, on
every loss path that reads packed rows and every stored teacher target (precomputed logits, the top-k and
hidden-state caches, re-laid into packed rows example by example), with gradient accumulation; and the refusals."""

import pytest
import torch

from kd_llm import DistillationTrainer
from kd_llm.data.packing import PackingCollator
from tests.conftest import tiny_distillation_config as make_config, tiny_llama
from tests.helpers.training import loss_and_gradients


def trainer_for(tmp_path, tokenizer, dataset, *, packing, teacher=None, **overrides):
    teacher = teacher if teacher is not None else tiny_llama(len(tokenizer), hidden=48, seed=1)
    return DistillationTrainer(model=tiny_llama(len(tokenizer), seed=2), teacher_model=teacher,
                               args=make_config(tmp_path, packing=packing, **overrides), train_dataset=dataset,
                               processing_class=tokenizer)


def collated_loss_and_gradients(trainer, features):
    """One micro-batch collated by the trainer, through compute_loss and backward: (loss, {name: grad}, metrics)."""
    return *loss_and_gradients(trainer, trainer.data_collator(features)), trainer._metrics["train"]


PATHS = {
    "dense live": dict(fused_loss="false"),
    "fused live": dict(fused_loss="true"),
    "dense jsd + hidden states": dict(fused_loss="false", distillation_loss="jsd", hidden_weight=0.5),
    "attention maps (head mean)": dict(attention_weight=0.5, attention_loss="head_mean", attention_query_chunk=7),
    "attention maps (relation)": dict(attention_weight=0.5, attention_loss="relation", hidden_weight=0.3),
}


@pytest.mark.parametrize("path", PATHS)
def test_packed_batch_gives_the_padded_batchs_loss_and_gradients(tmp_path, char_tokenizer, date_dataset, path):
    features = [date_dataset[i] for i in range(8)]
    assert len({len(f["input_ids"]) for f in features}) > 3  # lengths vary: padding and packing differ
    padded = trainer_for(tmp_path / "padded", char_tokenizer, date_dataset, packing=False, **PATHS[path])
    packed = trainer_for(tmp_path / "packed", char_tokenizer, date_dataset, packing=True, **PATHS[path])
    assert isinstance(packed.data_collator, PackingCollator)
    assert packed.fused_loss == padded.fused_loss
    batch = packed.data_collator(features)
    assert batch["input_ids"].shape[0] < len(features)  # several examples share a row
    padded_loss, padded_grads, padded_metrics = collated_loss_and_gradients(padded, features)
    packed_loss, packed_grads, packed_metrics = collated_loss_and_gradients(packed, features)
    torch.testing.assert_close(packed_loss, padded_loss, atol=1e-5, rtol=1e-5)
    assert set(packed_grads) == set(padded_grads)
    for name in padded_grads:
        torch.testing.assert_close(packed_grads[name], padded_grads[name], atol=1e-5, rtol=1e-4)
    for name in [key for key in padded_metrics if key.endswith("_loss")]:
        torch.testing.assert_close(torch.stack(packed_metrics[name]), torch.stack(padded_metrics[name]),
                                   atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def stores(tmp_path_factory, char_tokenizer, date_dataset):
    """A top-k cache (k = 16, T = 2) and a float32 hidden-state cache of the teacher trainer_for uses."""
    from tests.helpers.cache import build, build_hidden

    folder = tmp_path_factory.mktemp("packed_stores")
    teacher = tiny_llama(len(char_tokenizer), hidden=48, seed=1).eval()
    build(folder / "top_k", teacher, date_dataset, char_tokenizer, k=16, temperature=2.0)
    build_hidden(folder / "hidden", teacher, date_dataset, char_tokenizer, dtype="float32")
    return {"TOP_K": str(folder / "top_k"), "HIDDEN": str(folder / "hidden")}


# Stored teacher targets: settings, the target that serves the training batches, and which teacher the trainer gets
# ("live": the model; "head": its lm_head alone, for the hidden-state cache; None: the cache serves every batch).
STORED = {
    "precomputed logits": (dict(precompute_teacher_logits=True), "PrecomputedLogits", "live"),
    "top-k cache (dense)": (dict(teacher_cache="TOP_K", fused_loss="false"), "TopKCache", None),
    "top-k cache (fused)": (dict(teacher_cache="TOP_K", fused_loss="true"), "TopKCacheFused", None),
    "hidden-state cache (dense)": (dict(teacher_cache="HIDDEN", teacher_cache_format="hidden_states",
                                        fused_loss="false", distillation_loss="jsd"), "HiddenCache", "head"),
    "hidden-state cache (fused)": (dict(teacher_cache="HIDDEN", teacher_cache_format="hidden_states",
                                        fused_loss="true"), "HiddenCacheFused", "head"),
}


def stored_trainer(tmp_path, tokenizer, dataset, stores, name, *, packing, **overrides):
    from kd_llm.models.lm_head import head_of_model

    settings, _, teacher = STORED[name]
    settings = {key: stores.get(value, value) if isinstance(value, str) else value for key, value in settings.items()}
    model = tiny_llama(len(tokenizer), hidden=48, seed=1)
    teacher = {"live": model, "head": head_of_model(model), None: None}[teacher]
    return DistillationTrainer(model=tiny_llama(len(tokenizer), seed=2), teacher_model=teacher,
                               args=make_config(tmp_path, packing=packing, **settings, **overrides),
                               train_dataset=dataset, processing_class=tokenizer)


def training_target(trainer, features):
    from kd_llm.training.targets import KDBatch

    return trainer.target.for_batch(KDBatch.pop_from(trainer.data_collator(features)), training=True)


@pytest.mark.parametrize("name", STORED)
def test_a_packed_batch_from_stored_teacher_targets_gives_the_padded_batchs_loss_and_gradients(
        tmp_path, char_tokenizer, date_dataset, stores, name):
    """The stored rows of each example are re-laid into the packed rows (kd_llm.data.packing.supervised_order): the
    same examples, packed or padded, read the same teacher targets from the same store."""
    from kd_llm.data.packing import PACKED_EXAMPLE_KEY, supervised_order
    from kd_llm.training.targets import EXAMPLE_INDEX_COLUMN

    padded = stored_trainer(tmp_path / "padded", char_tokenizer, date_dataset, stores, name, packing=False)
    packed = stored_trainer(tmp_path / "packed", char_tokenizer, date_dataset, stores, name, packing=True)
    features = [packed.train_dataset[i] for i in (5, 12, 0, 33, 7, 21, 40, 2)]  # rows of the store, shuffled
    assert type(training_target(packed, features)).__name__ == type(training_target(padded, features)).__name__ \
        == STORED[name][1]
    batch = packed.data_collator(features)
    assert batch["input_ids"].shape[0] < len(features)  # several examples share a row
    order = supervised_order(batch[EXAMPLE_INDEX_COLUMN], batch["labels"][:, 1:], batch[PACKED_EXAMPLE_KEY])[0]
    assert order != batch[EXAMPLE_INDEX_COLUMN].tolist()  # packing reorders them: the re-layout is exercised
    padded_loss, padded_grads, padded_metrics = collated_loss_and_gradients(padded, features)
    packed_loss, packed_grads, packed_metrics = collated_loss_and_gradients(packed, features)
    assert torch.stack(padded_metrics["kd_loss"]).abs().max() > 1e-3  # the stored teacher is read, and differs
    torch.testing.assert_close(packed_loss, padded_loss, atol=1e-5, rtol=1e-5)
    assert set(packed_grads) == set(padded_grads)
    for key in padded_grads:
        torch.testing.assert_close(packed_grads[key], padded_grads[key], atol=1e-5, rtol=1e-4)
    for key in ("ce_loss", "kd_loss", "total_loss"):
        torch.testing.assert_close(torch.stack(packed_metrics[key]), torch.stack(padded_metrics[key]),
                                   atol=1e-5, rtol=1e-5)


def test_packed_loss_differs_when_examples_may_attend_across_each_other(tmp_path, char_tokenizer, date_dataset):
    """The comparison above can fail: the same packed rows with a 2-D mask (no example isolation) lose exactness."""
    features = [date_dataset[i] for i in range(8)]
    padded = trainer_for(tmp_path / "padded", char_tokenizer, date_dataset, packing=False)
    packed = trainer_for(tmp_path / "packed", char_tokenizer, date_dataset, packing=True)
    collate = packed.data_collator

    def leaking(features):
        batch = collate(features)
        batch["attention_mask"] = torch.ones_like(batch["input_ids"])
        return batch

    packed.data_collator = leaking
    padded_loss = collated_loss_and_gradients(padded, features)[0]
    assert abs(collated_loss_and_gradients(packed, features)[0] - padded_loss) > 1e-4


def params(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def max_difference(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("source", ["live teacher", "precomputed logits", "hidden-state cache (fused)",
                                    "top-k cache (fused)"])
def test_packed_training_with_accumulation_trains_the_padded_runs_student(tmp_path, char_tokenizer, date_dataset,
                                                                          stores, source):
    def make(path, **overrides):
        if source == "live teacher":
            return trainer_for(path, char_tokenizer, date_dataset, fused_loss="true", **overrides)
        return stored_trainer(path, char_tokenizer, date_dataset, stores, source, **overrides)

    settings = dict(max_steps=3, l2_weight=1e-3)
    reference = make(tmp_path / "a", packing=False, per_device_train_batch_size=8, **settings)
    reference.train()
    accumulated = make(tmp_path / "b", packing=True, per_device_train_batch_size=2, gradient_accumulation_steps=4,
                       **settings)
    accumulated.train()
    initial = params(tiny_llama(len(char_tokenizer), seed=2))
    assert max_difference(params(reference.model), initial) > 1e-3  # it trained
    # The micro-batch gradients agree to float rounding (tests above); Adam's division by sqrt(v) amplifies that in
    # near-zero gradients: on the top-k cache, padded 2 x 4 against padded 8 alone (no packing) already differ by
    # ~6e-5 in the weights after 3 steps. A wrong normalisation or re-layout moves them by > 1e-3.
    tolerance = 1e-4 if source.startswith("top-k") else 1e-5
    assert max_difference(params(accumulated.model), params(reference.model)) < tolerance
    losses = lambda t: [e["total_loss"] for e in t.state.log_history if "total_loss" in e]  # noqa: E731
    assert losses(accumulated) == pytest.approx(losses(reference), rel=1e-5)


def test_packed_on_policy_run_from_a_cache_trains_the_padded_runs_student(tmp_path, char_tokenizer, date_dataset,
                                                                          stores):
    """lmbda = 0.5 from a hidden-state cache and the live teacher: the cache serves the packed dataset batches, the
    teacher scores the student's packed samples (kd_llm.training.on_policy); the padded run's student, 3 steps."""
    from kd_llm.training.targets import HiddenCacheFused, Routed

    settings = dict(lmbda=0.5, max_steps=3, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                    generation_max_new_tokens=10, teacher_cache=stores["HIDDEN"], teacher_cache_format="hidden_states")
    padded = trainer_for(tmp_path / "padded", char_tokenizer, date_dataset, packing=False, **settings)
    packed = trainer_for(tmp_path / "packed", char_tokenizer, date_dataset, packing=True, **settings)
    assert isinstance(packed.target, Routed) and isinstance(packed.target.primary, HiddenCacheFused)
    served = []
    cache_terms = packed.target.primary.terms

    def terms(outputs, batch, request):
        served.append(batch.packed_example_ids is not None)
        return cache_terms(outputs, batch, request)

    packed.target.primary.terms = terms
    padded.train()
    packed.train()
    fractions = [e["on_policy_fraction"] for e in packed.state.log_history if "on_policy_fraction" in e]
    assert 0 < sum(fractions) < len(fractions)  # both kinds of batches ran
    assert served and all(served)  # the cache served packed batches
    assert max_difference(params(padded.model), params(tiny_llama(len(char_tokenizer), seed=2))) > 1e-3
    assert max_difference(params(packed.model), params(padded.model)) < 1e-5  # 2.1e-6 measured
    losses = lambda t: [e["total_loss"] for e in t.state.log_history if "total_loss" in e]  # noqa: E731
    assert losses(packed) == pytest.approx(losses(padded), rel=1e-5)


@pytest.mark.parametrize("settings, message", [
    (dict(packing_max_length=-1), "packing_max_length must be an integer >= 0"),
    (dict(packing_overlong="split"), "packing_overlong must be one of error, truncate"),
    (dict(packing=True, precompute_teacher_logits=True, packing_overlong="truncate", packing_max_length=64),
     "packing_overlong=truncate would cut examples whose stored teacher targets"),
])
def test_packing_settings_that_cannot_work_are_refused(tmp_path, settings, message):
    with pytest.raises(ValueError, match=message):
        make_config(tmp_path, **settings)


def test_packing_refuses_flash_attention_and_a_foreign_collator(tmp_path, char_tokenizer, date_dataset):
    teacher = tiny_llama(len(char_tokenizer), hidden=48, seed=1)
    teacher.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="teacher uses attn_implementation='flash_attention_2'"):
        trainer_for(tmp_path, char_tokenizer, date_dataset, packing=True, teacher=teacher)
    with pytest.raises(ValueError, match="leave data_collator unset"):
        DistillationTrainer(model=tiny_llama(len(char_tokenizer), seed=2),
                            teacher_model=tiny_llama(len(char_tokenizer), hidden=48, seed=1),
                            args=make_config(tmp_path, packing=True), train_dataset=date_dataset,
                            processing_class=char_tokenizer, data_collator=lambda features: features)


def mode_trainer(mode, tmp_path, tokenizer, dataset, **overrides):
    """The trainer of one distillation mode, on fresh tiny models (the same weights for every call)."""
    from kd_llm.training.ensemble import EnsembleDistillationTrainer
    from kd_llm.training.online import MutualDistillationTrainer
    from kd_llm.training.self_distillation import EMADistillationTrainer
    from kd_llm.training.teachers import TeacherEnsemble

    common = dict(args=make_config(tmp_path, **overrides), train_dataset=dataset, processing_class=tokenizer)
    student, teacher = tiny_llama(len(tokenizer), seed=2), tiny_llama(len(tokenizer), hidden=48, seed=1)
    if mode == "online":
        return MutualDistillationTrainer(model=student, teacher_model=teacher, teacher_learning_rate=3e-3, **common)
    if mode == "ensemble":
        members = TeacherEnsemble([teacher, tiny_llama(96, hidden=32, layers=3, seed=3)], [0.6, 0.4])
        return EnsembleDistillationTrainer(model=student, teacher_model=members, **common)
    return EMADistillationTrainer(model=student, ema_decay=0.6, **common)


@pytest.mark.parametrize("mode", ["online", "ensemble", "ensemble, precomputed", "ema"])
def test_every_distillation_mode_trains_the_same_student_from_packed_batches(tmp_path, char_tokenizer, date_dataset,
                                                                              mode):
    mode, _, precomputed = mode.partition(", ")  # the ensemble's mixture precomputed, then laid into packed rows
    common = dict(max_steps=2, precompute_teacher_logits=bool(precomputed))
    padded = mode_trainer(mode, tmp_path / "padded", char_tokenizer, date_dataset, packing=False, **common)
    packed = mode_trainer(mode, tmp_path / "packed", char_tokenizer, date_dataset, packing=True, **common)
    assert (packed.teacher_logits is not None) == bool(precomputed)
    assert isinstance(packed.data_collator, PackingCollator)
    padded.train()
    packed.train()
    assert max_difference(params(padded.model), params(tiny_llama(len(char_tokenizer), seed=2))) > 1e-3
    # Adam divides by sqrt(v): float rounding in near-zero gradients moves weights by ~1e-5 after two steps.
    assert max_difference(params(packed.model), params(padded.model)) < 1e-4
    losses = lambda t: [e["total_loss"] for e in t.state.log_history if "total_loss" in e]  # noqa: E731
    assert losses(packed) == pytest.approx(losses(padded), rel=1e-5)


def computed_tokens(trainer, steps=6):
    """Tokens the first ``steps`` micro-batches of the training dataloader compute (rows x columns), and the example
    count."""
    tokens = examples = 0
    for index, batch in enumerate(trainer.get_train_dataloader()):
        if index == steps:
            break
        tokens += batch["input_ids"].numel()
        packed = batch.get("packed_example_ids")
        examples += int(packed.max()) + 1 if packed is not None else batch["input_ids"].shape[0]
    return tokens, examples


def test_length_grouping_and_packing_compute_fewer_tokens_than_random_padded_batches(tmp_path, char_tokenizer,
                                                                                      date_dataset):
    common = dict(per_device_train_batch_size=4, gradient_accumulation_steps=2)
    random_padded = computed_tokens(trainer_for(tmp_path / "r", char_tokenizer, date_dataset, packing=False, **common))
    grouped = computed_tokens(trainer_for(tmp_path / "g", char_tokenizer, date_dataset, packing=False,
                                          length_grouping="step", **common))
    packed = computed_tokens(trainer_for(tmp_path / "p", char_tokenizer, date_dataset, packing=True,
                                         packing_max_length=192, **common))
    assert random_padded[1] == grouped[1] == packed[1] == 24  # the same examples per micro-batch
    assert packed[0] < grouped[0] < random_padded[0]


def test_step_length_grouping_keeps_each_optimizer_step_a_random_draw(tmp_path, char_tokenizer, date_dataset):
    from kd_llm.data.sampling import StepShuffledLengthSampler

    trainer = trainer_for(tmp_path, char_tokenizer, date_dataset, packing=False, length_grouping="step",
                          per_device_train_batch_size=4, gradient_accumulation_steps=2)
    sampler = trainer._get_train_sampler()
    assert isinstance(sampler, StepShuffledLengthSampler) and sampler.step_size == 8
    order = list(sampler)
    generator = torch.Generator().manual_seed(trainer.args.seed)
    draw = torch.randperm(len(date_dataset), generator=generator).tolist()
    for start in range(0, len(order), 8):
        assert sorted(order[start:start + 8]) == sorted(draw[start:start + 8])
        lengths = [date_dataset[i]["length"] for i in order[start:start + 8]]
        assert lengths == sorted(lengths)
    with pytest.raises(ValueError, match="length_grouping=step is a training sampler"):
        make_config(tmp_path, length_grouping="step", train_sampling_strategy="group_by_length")


def test_packing_refuses_compute_metrics_which_would_read_rows_as_examples(tmp_path, char_tokenizer, date_dataset):
    with pytest.raises(ValueError, match="compute_metrics would read packed rows as examples"):
        DistillationTrainer(model=tiny_llama(len(char_tokenizer), seed=2),
                            teacher_model=tiny_llama(len(char_tokenizer), hidden=48, seed=1),
                            args=make_config(tmp_path, packing=True), train_dataset=date_dataset,
                            processing_class=char_tokenizer, compute_metrics=lambda prediction: {})
