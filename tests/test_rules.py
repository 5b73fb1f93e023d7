"""kd_llm.training.rules, table-driven: settings and run shape -> loss path or refusal; and the memory estimate names
the loss path the trainer takes, for every combination of the table that builds on tiny models."""

import pytest

from kd_llm import DistillationConfig, DistillationTrainer
from kd_llm.models.lm_head import head_of_model
from kd_llm.training import rules
from kd_llm.training.ensemble import EnsembleDistillationTrainer
from kd_llm.training.memory_estimate import estimate_for_run
from kd_llm.training.online import MutualDistillationTrainer
from kd_llm.training.rules import RunShape
from kd_llm.training.self_distillation import EMADistillationTrainer
from kd_llm.training.teachers import TeacherEnsemble
from tests.conftest import CHAR_VOCAB, tiny_llama
from tests.helpers.cache import build, build_hidden

BASE = dict(use_cpu=True, report_to="none", max_steps=1, per_device_train_batch_size=4, save_strategy="no",
            disable_tqdm=True, alpha=0.5, temperature=2.0)


def config(tmp_path, **overrides) -> DistillationConfig:
    return DistillationConfig(output_dir=str(tmp_path / "run"), **{**BASE, **overrides})


# settings, shape -> expected loss path ("dense" / "fused") or the refusal's text (fused_loss=true with a blocker).
TABLE = [
    (dict(fused_loss="auto"), RunShape(), "fused"),
    (dict(fused_loss="true"), RunShape(), "fused"),
    (dict(fused_loss="false"), RunShape(), "dense"),
    (dict(fused_loss="auto", alpha=1.0), RunShape(teacher="none"), "fused"),
    (dict(fused_loss="auto", precompute_teacher_logits=True), RunShape(), "dense"),
    (dict(fused_loss="true", precompute_teacher_logits=True), RunShape(), "precompute_teacher_logits serves"),
    (dict(fused_loss="auto", hidden_weight=1.0), RunShape(), "dense"),
    (dict(fused_loss="true", attention_weight=1.0), RunShape(), "feature distillation"),
    (dict(fused_loss="auto", lmbda=0.5), RunShape(), "fused"),
    (dict(fused_loss="auto", teacher_cache="CACHE"), RunShape(teacher="none"), "fused"),
    (dict(fused_loss="false", teacher_cache="CACHE"), RunShape(teacher="none"), "dense"),
    (dict(fused_loss="auto", teacher_cache="CACHE"), RunShape(), "fused"),
    (dict(fused_loss="auto"), RunShape(mode="ema"), "fused"),
    (dict(fused_loss="auto"), RunShape(mode="ensemble"), "dense"),
    (dict(fused_loss="true"), RunShape(mode="ensemble"), "mixture of several teachers"),
    (dict(fused_loss="auto", precompute_teacher_logits=True), RunShape(mode="ensemble"), "dense"),
    (dict(fused_loss="auto"), RunShape(mode="online"), "dense"),
    (dict(fused_loss="true"), RunShape(mode="online"), "online distillation trains the teacher"),
    (dict(fused_loss="auto", cross_tokenizer_loss="hybrid"), RunShape(), "dense"),
    # Shapes the trainer cannot build on this machine (rules only):
    (dict(fused_loss="auto"), RunShape(sharded=True, processes=2), "dense"),
    (dict(fused_loss="true"), RunShape(sharded=True, processes=2), "FSDP / DeepSpeed shard"),
    (dict(fused_loss="auto", lmbda=0.5), RunShape(teacher="side_process"), "dense"),
    (dict(fused_loss="auto", lmbda=0.5, teacher_cache="CACHE"), RunShape(teacher="side_process"), "fused"),
    (dict(fused_loss="auto", teacher_url="http://127.0.0.1:1"), RunShape(teacher="none"), "dense"),
    (dict(fused_loss="true", teacher_url="http://127.0.0.1:1"), RunShape(teacher="none"), "served teacher's top-k"),
    (dict(fused_loss="auto", lmbda=0.5), RunShape(teacher="side_process", teacher_ships_hidden=True), "fused"),
    (dict(fused_loss="true", lmbda=0.5), RunShape(teacher="side_process"), "start it with hidden_states=True"),
    # The hidden-state cache: any divergence, a moving temperature; fused unless a blocker rules it out.
    (dict(fused_loss="auto", teacher_cache="HIDDEN", teacher_cache_format="hidden_states", distillation_loss="mse",
          final_temperature=1.0, temperature_schedule="linear"), RunShape(teacher="none"), "fused"),
    (dict(fused_loss="false", teacher_cache="HIDDEN", teacher_cache_format="hidden_states"), RunShape(teacher="none"),
     "dense"),
    (dict(fused_loss="auto", teacher_cache="HIDDEN", teacher_cache_format="hidden_states"),
     RunShape(sharded=True, processes=2), "dense"),
    # Packed batches read every stored target (re-laid per example): the same paths as padded ones.
    (dict(fused_loss="auto", precompute_teacher_logits=True, packing=True), RunShape(), "dense"),
    (dict(fused_loss="true", precompute_teacher_logits=True, packing=True), RunShape(),
     "precompute_teacher_logits serves"),
    (dict(fused_loss="auto", teacher_cache="CACHE", packing=True), RunShape(teacher="none"), "fused"),
    (dict(fused_loss="false", teacher_cache="CACHE", packing=True), RunShape(teacher="none"), "dense"),
    (dict(fused_loss="auto", teacher_cache="HIDDEN", teacher_cache_format="hidden_states", packing=True),
     RunShape(teacher="none"), "fused"),
    (dict(fused_loss="false", teacher_cache="HIDDEN", teacher_cache_format="hidden_states", packing=True),
     RunShape(teacher="none"), "dense"),
]
BUILDABLE = [row for row in TABLE
             if not row[1].sharded and row[1].teacher != "side_process" and "teacher_url" not in row[0]]


def row_id(row) -> str:
    settings, shape, _ = row
    return f"{shape.mode}-{shape.teacher}-" + ",".join(f"{k}={v}" for k, v in settings.items())


@pytest.mark.parametrize("row", TABLE, ids=row_id)
def test_loss_path_of_each_combination(tmp_path, row):
    settings, shape, expected = row
    settings = {k: (str(tmp_path) if v in ("CACHE", "HIDDEN") else v) for k, v in settings.items()}
    args = config(tmp_path, **settings)
    if expected in ("dense", "fused"):
        assert rules.loss_path(args, shape).path == expected
    else:
        with pytest.raises(ValueError, match=f"fused_loss=true, but the fused loss cannot be used here: .*{expected}"):
            rules.loss_path(args, shape)


def test_loss_path_follows_fused_loss(tmp_path):
    """(Moved from test_memory_estimate.py, where memory_estimate.chosen_loss_path was a copy of these rules.)"""
    args = DistillationConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", fused_loss="auto")
    assert rules.loss_path(args, RunShape()).path == "fused"
    sharded = rules.loss_path(args, RunShape(sharded=True))
    assert (sharded.path, sharded.note) == ("dense", "fused_loss=auto takes the dense loss here (FSDP/DeepSpeed)")
    args.fused_loss = "false"
    assert rules.loss_path(args, RunShape()) == rules.LossPath("dense", None)
    # The trainer computes the cache's sparse targets on the fused path too (kd_llm.losses.fused_sparse).
    cached = DistillationConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", fused_loss="auto",
                                teacher_cache="somewhere")
    assert rules.loss_path(cached, RunShape()).path == "fused"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, char_tokenizer, date_dataset):
    path = tmp_path_factory.mktemp("rules") / "cache"
    build(path, tiny_llama(CHAR_VOCAB, hidden=48, seed=1).eval(), date_dataset, char_tokenizer, k=16,
          temperature=2.0)
    return path


@pytest.fixture(scope="module")
def hidden_dir(tmp_path_factory, char_tokenizer, date_dataset):
    path = tmp_path_factory.mktemp("rules") / "hidden"
    build_hidden(path, tiny_llama(CHAR_VOCAB, hidden=48, seed=1).eval(), date_dataset, char_tokenizer)
    return path


def make_trainer(args, shape: RunShape, tokenizer, dataset):
    student = tiny_llama(CHAR_VOCAB, seed=2)
    common = dict(args=args, train_dataset=dataset, processing_class=tokenizer)
    teacher = None if shape.teacher == "none" else tiny_llama(CHAR_VOCAB, hidden=48, seed=1)
    if teacher is None and args.teacher_cache_format == "hidden_states":  # the teacher's lm_head alone
        teacher = head_of_model(tiny_llama(CHAR_VOCAB, hidden=48, seed=1))
    if shape.mode == "ema":
        return EMADistillationTrainer(model=student, ema_decay=0.5, **common)
    if shape.mode == "online":
        return MutualDistillationTrainer(model=student, teacher_model=teacher, teacher_learning_rate=1e-3, **common)
    if shape.mode == "ensemble":
        ensemble = TeacherEnsemble([teacher, tiny_llama(CHAR_VOCAB, hidden=48, seed=3)], [0.5, 0.5])
        return EnsembleDistillationTrainer(model=student, teacher_model=ensemble, **common)
    return DistillationTrainer(model=student, teacher_model=teacher, **common)


@pytest.mark.parametrize("row", BUILDABLE, ids=row_id)
def test_the_memory_estimate_names_the_path_the_trainer_takes(tmp_path, row, cache_dir, hidden_dir, char_tokenizer,
                                                              date_dataset):
    settings, shape, expected = row
    stores = {"CACHE": str(cache_dir), "HIDDEN": str(hidden_dir)}
    settings = {k: stores.get(v, v) if isinstance(v, str) else v for k, v in settings.items()}
    args = config(tmp_path, **settings)
    student, teacher = tiny_llama(CHAR_VOCAB, seed=2), tiny_llama(CHAR_VOCAB, hidden=48, seed=1)
    if expected not in ("dense", "fused"):  # both refuse fused_loss=true, with the same reason
        with pytest.raises(ValueError, match=expected):
            estimate_for_run(student, teacher, args, sequence_length=16, shape=shape)
        with pytest.raises(ValueError, match=expected):
            make_trainer(args, shape, char_tokenizer, date_dataset)
        return
    trainer = make_trainer(args, shape, char_tokenizer, date_dataset)
    assert trainer.run_shape == shape
    estimate = estimate_for_run(student, teacher, args, sequence_length=16, shape=trainer.run_shape)
    assert estimate.loss_path == ("fused" if trainer.fused_loss else "dense") == expected
    if args.packing:  # the trainer packs, and the estimate says so beside the path and the stored target it reads
        from kd_llm.data.packing import PackingCollator

        assert isinstance(trainer.data_collator, PackingCollator)
        assert f"float32, {expected} loss, " in estimate.format()
        assert any(note.startswith("packing: bounded by 4 rows") for note in estimate.notes)
        if args.teacher_cache:
            assert any(note.startswith("teacher_cache: the KD term reads") for note in estimate.notes)


@pytest.mark.parametrize("settings, shape, message", [
    (dict(alpha=0.5), RunShape(teacher="none"), "a teacher_model is required"),
    (dict(alpha=0.5, lmbda=0.5, teacher_cache="c"), RunShape(teacher="none"), "only a live teacher can score"),
    (dict(seq_kd=True), RunShape(teacher="side_process"), "seq_kd has the teacher write completions"),
    (dict(hidden_weight=1.0), RunShape(teacher="side_process"), "hidden_weight / attention_weight read"),
    (dict(lmbda=0.5), RunShape(teacher="side_process", processes=2), "each rank would need its own side process"),
    (dict(lmbda=0.5), RunShape(mode="ema", teacher="side_process"), "ema mode needs the teacher model itself"),
    (dict(lmbda=0.5, cross_tokenizer_loss="hybrid"), RunShape(teacher="side_process"),
     "the side process scores the student's token ids"),
])
def test_teacher_problems(tmp_path, settings, shape, message):
    problems = rules.teacher_problems(config(tmp_path, **settings), shape)
    assert any(message in problem for problem in problems), problems


def test_a_live_teacher_serves_everything_the_config_allows(tmp_path):
    assert rules.teacher_problems(config(tmp_path, lmbda=0.5, seq_kd=True), RunShape()) == []
    # A served teacher stands in for the teacher model (what it cannot serve: kd_llm.serving.settings).
    assert rules.teacher_problems(config(tmp_path, lmbda=0.5, teacher_url="http://127.0.0.1:1"),
                                  RunShape(teacher="none")) == []


@pytest.mark.parametrize("settings, mode, message, unsupported", [
    (dict(alpha=1.0), "ensemble", "an ensemble of teachers would never be used", False),
    (dict(lmbda=0.5), "ensemble", "from a teacher ensemble is not supported", True),
    (dict(precompute_teacher_logits=True, temperature_schedule="linear", final_temperature=1.0), "ensemble",
     "use a constant temperature", False),
    (dict(precompute_teacher_logits=True), "ema", "cannot serve an EMA teacher", False),
    (dict(hidden_weight=1.0), "online", "not supported in online mode", True),
    (dict(cross_tokenizer_loss="uld"), "ema", "cross_tokenizer_loss (a teacher with another tokenizer)", True),
])
def test_mode_problems(tmp_path, settings, mode, message, unsupported):
    problems = rules.mode_problems(config(tmp_path, **settings), mode)
    assert len(problems) == 1 and message in problems[0].message
    assert isinstance(problems[0].error(), NotImplementedError if unsupported else ValueError)
    assert rules.mode_problems(config(tmp_path, **settings), "offline") == []


@pytest.mark.parametrize("settings, mode, source", [
    (dict(teacher_cache="c"), "offline", "none"),
    (dict(teacher_cache="c", lmbda=0.5), "offline", "side_process"),
    (dict(teacher_cache="c", hidden_weight=1.0), "offline", "live"),
    (dict(teacher_cache="c"), "ensemble", "live"),
    (dict(teacher_cache="c"), "born_again", "live"),
    (dict(teacher_cache="c", alpha=1.0), "offline", "live"),
    (dict(), "offline", "live"),
])
def test_teacher_source(tmp_path, settings, mode, source):
    assert rules.teacher_source(config(tmp_path, **settings), mode) == source


def test_the_rule_book_imports_nothing_from_training():
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(rules))
    imported = [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    imported += [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    assert imported and not [name for name in imported if name and name.startswith("kd_llm.training")]


def test_bad_run_shapes_are_refused():
    with pytest.raises(ValueError, match="mode must be one of"):
        RunShape(mode="sideways")
    with pytest.raises(ValueError, match="teacher must be one of"):
        RunShape(teacher="somewhere")


@pytest.mark.parametrize("settings", [dict(lmbda=0.5), dict(seq_kd=True), dict(lmbda=0.5, seq_kd=True)])
def test_packing_takes_on_policy_and_seq_kd(tmp_path, settings):
    """Generated completions are packed too (kd_llm.training.on_policy; exactness: tests/test_packed_generation)."""
    assert rules.packing_problems(config(tmp_path, packing=True, **settings)) == []


@pytest.mark.parametrize("settings, named", [
    (dict(precompute_teacher_logits=True), "precompute_teacher_logits"), (dict(teacher_cache="c"), "teacher_cache"),
    (dict(teacher_cache="c", teacher_cache_format="hidden_states"), "teacher_cache"),
])
def test_packing_takes_stored_teacher_targets_of_whole_examples(tmp_path, settings, named):
    """Stored targets are re-laid into packed rows example by example (the loss paths: the table above), so an
    example cut by packing_overlong=truncate, which they cover whole, is refused."""
    assert rules.packing_problems(config(tmp_path, packing=True, **settings)) == []
    cutting = dict(packing=True, packing_overlong="truncate", packing_max_length=64)
    with pytest.raises(ValueError, match=f"packing_overlong=truncate would cut examples whose stored teacher targets "
                                         f"\\({named}\\) cover them whole"):
        config(tmp_path, **cutting, **settings)
    assert rules.packing_problems(config(tmp_path, **cutting)) == []  # a live teacher sees the cut examples
    # Rows as long as the micro-batch's longest example (packing_max_length=0) never cut one.
    assert rules.packing_problems(config(tmp_path, packing=True, packing_overlong="truncate", **settings)) == []


def test_what_packing_still_cannot_serve_is_refused_with_its_reason(tmp_path):
    """Across tokenizers dataset batches pack (both renderings laid with the same examples per row), but generated
    cross-tokenizer rows are not packed yet, and truncation would cut the teacher's rendering and the alignment:
    refused in the config, with the reason."""
    assert rules.cross_tokenizer_config_problems(config(tmp_path, packing=True, cross_tokenizer_loss="hybrid")) == []
    with pytest.raises(ValueError, match="packing is not supported with cross_tokenizer_loss and lmbda=0.5: "
                                         "generated cross-tokenizer rows are not packed yet"):
        config(tmp_path, packing=True, cross_tokenizer_loss="hybrid", lmbda=0.5)
    with pytest.raises(ValueError, match="packing is not supported with cross_tokenizer_loss and seq_kd"):
        config(tmp_path, packing=True, cross_tokenizer_loss="hybrid", seq_kd=True)
    assert rules.cross_tokenizer_config_problems(config(tmp_path, cross_tokenizer_loss="hybrid")) == []
