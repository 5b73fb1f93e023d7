"""DistillationTrainer with feature terms (hidden states, attention maps): what it trains, logs, saves beside the
student, restores on resume, and refuses; across architectures (Llama teacher, Qwen2 / Gemma-3 students)."""

import pytest
import torch
from safetensors.torch import load_file
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, Qwen2Config, Qwen2ForCausalLM

from kd_llm import DistillationTrainer
from kd_llm.features import PROJECTIONS_FILE, LayerMapError
from tests.conftest import tiny_distillation_config as make_config, tiny_llama

TEACHER_WIDTH = 48  # the student is 32 wide: a teacher tensor or a projection in its files would show this width




def make_trainer(tmp_path, tokenizer, dataset, *, teacher=None, student=None, **overrides):
    teacher = teacher if teacher is not None else tiny_llama(len(tokenizer), hidden=TEACHER_WIDTH, layers=3, heads=6,
                                                             kv_heads=2, seed=1)
    student = student if student is not None else tiny_llama(len(tokenizer), seed=2)
    return DistillationTrainer(model=student, teacher_model=teacher, args=make_config(tmp_path, **overrides),
                               train_dataset=dataset, processing_class=tokenizer)


def params(module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def max_difference(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


TERMS = {
    "hidden_mse": dict(hidden_weight=2.0, hidden_loss="mse"),
    "hidden_cosine": dict(hidden_weight=1.0, hidden_loss="cosine", hidden_projection_init="zero"),
    "attention_head_mean": dict(attention_weight=3.0, attention_loss="head_mean", attention_layer_map="uniform",
                                attention_query_chunk=16),
    "attention_relation": dict(attention_weight=3.0, attention_loss="relation", relation_heads=2),
}


@pytest.mark.parametrize("term", TERMS, ids=list(TERMS))
def test_each_term_trains_the_student_is_logged_and_saved_beside_it(tmp_path, char_tokenizer, date_dataset, term):
    settings = TERMS[term]
    trainer = make_trainer(tmp_path, char_tokenizer, date_dataset, save_strategy="steps", save_steps=3, **settings)
    teacher, student = trainer.teacher, trainer.model
    teacher_before, student_before = params(teacher), params(student)
    projections = trainer.feature_distiller.projections
    projections_before = params(projections) if projections is not None else {}
    if projections_before:  # they train with the student: in the optimizer from the start
        in_optimizer = {id(p) for group in trainer.create_optimizer().param_groups for p in group["params"]}
        assert all(id(p) in in_optimizer for p in projections.parameters())
    trainer.train()

    name, weight = ("hidden_loss", settings["hidden_weight"]) if "hidden_weight" in settings else \
        ("attention_loss", settings["attention_weight"])
    logged = [entry for entry in trainer.state.log_history if "ce_loss" in entry]
    assert len(logged) == 3
    for entry in logged:
        assert entry[name] > 0
        other = "attention_loss" if name == "hidden_loss" else "hidden_loss"
        assert other not in entry
        assert entry["total_loss"] == pytest.approx(0.5 * entry["ce_loss"] + 0.5 * entry["kd_loss"]
                                                    + weight * entry[name], rel=1e-4)
        assert entry["loss"] == pytest.approx(entry["total_loss"], rel=1e-4)
    assert max_difference(params(student), student_before) > 1e-4
    assert max_difference(params(teacher), teacher_before) == 0.0
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters()) and not teacher.training

    checkpoint = tmp_path / "run" / "checkpoint-3"
    saved = load_file(str(checkpoint / "model.safetensors"))
    assert set(saved) <= set(student.state_dict())
    assert all(TEACHER_WIDTH not in tensor.shape for tensor in saved.values())
    if projections_before:
        assert max_difference(params(projections), projections_before) > 1e-4
        beside = load_file(str(checkpoint / PROJECTIONS_FILE))
        assert {k: v.shape for k, v in beside.items()} == {"layers.student0_teacher1.weight": (48, 32),
                                                           "layers.student1_teacher2.weight": (48, 32)}
        for key, tensor in beside.items():
            torch.testing.assert_close(tensor, projections.state_dict()[key])
    else:
        assert not (checkpoint / PROJECTIONS_FILE).exists()


def test_resume_restores_the_projections_and_matches_an_uninterrupted_run(tmp_path, char_tokenizer, date_dataset):
    settings = dict(max_steps=6, per_device_train_batch_size=4, hidden_weight=1.0, attention_weight=1.0,
                    hidden_loss="normalized_mse")
    full = make_trainer(tmp_path / "full", char_tokenizer, date_dataset, **settings)
    full.train()
    make_trainer(tmp_path / "stopped", char_tokenizer, date_dataset, save_strategy="steps", save_steps=3,
                 **settings).train()
    checkpoint = tmp_path / "stopped" / "run" / "checkpoint-3"
    resumed = make_trainer(tmp_path / "resumed", char_tokenizer, date_dataset, **settings)
    fresh_projections = params(resumed.feature_distiller.projections)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert max_difference(params(full.model), params(resumed.model)) < 1e-6
    restored = params(resumed.feature_distiller.projections)
    assert max_difference(params(full.feature_distiller.projections), restored) < 1e-6
    assert max_difference(fresh_projections, restored) > 1e-3  # not merely the same initialisation

    (checkpoint / PROJECTIONS_FILE).unlink()
    again = make_trainer(tmp_path / "again", char_tokenizer, date_dataset, **settings)
    with pytest.raises(FileNotFoundError, match="the checkpoint has none"):
        again.train(resume_from_checkpoint=str(checkpoint))


def test_gradient_accumulation_does_not_change_the_feature_terms(tmp_path, char_tokenizer, date_dataset):
    settings = dict(hidden_weight=1.0, attention_weight=2.0, attention_layer_map="uniform")
    one_batch = make_trainer(tmp_path / "a", char_tokenizer, date_dataset, per_device_train_batch_size=8,
                             gradient_accumulation_steps=1, **settings)
    one_batch.train()
    accumulated = make_trainer(tmp_path / "b", char_tokenizer, date_dataset, per_device_train_batch_size=2,
                               gradient_accumulation_steps=4, **settings)
    accumulated.train()
    assert max_difference(params(one_batch.model), params(accumulated.model)) < 1e-5
    assert max_difference(params(one_batch.feature_distiller.projections),
                          params(accumulated.feature_distiller.projections)) < 1e-5
    for name in ("hidden_loss", "attention_loss", "total_loss"):
        values = lambda t: [e[name] for e in t.state.log_history if name in e]  # noqa: E731
        assert values(one_batch) == pytest.approx(values(accumulated), rel=1e-4)


def qwen2_student(vocab):
    torch.manual_seed(3)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab, hidden_size=40, num_hidden_layers=2, num_attention_heads=5,
                                        num_key_value_heads=1, intermediate_size=64, pad_token_id=0, bos_token_id=1,
                                        eos_token_id=2, max_position_embeddings=256))


def gemma3_student(vocab):
    torch.manual_seed(4)
    return Gemma3ForCausalLM(Gemma3TextConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                              intermediate_size=64, sliding_window=8, pad_token_id=0, bos_token_id=1,
                                              eos_token_id=2, max_position_embeddings=256,
                                              layer_types=["sliding_attention", "full_attention"]))


@pytest.mark.parametrize("build_student", [qwen2_student, gemma3_student], ids=["qwen2", "gemma3"])
@pytest.mark.parametrize("attention_loss", ["head_mean", "relation"])
def test_llama_teacher_distils_features_into_another_family(tmp_path, char_tokenizer, date_dataset, build_student,
                                                             attention_loss):
    student = build_student(len(char_tokenizer))
    before = params(student)
    trainer = make_trainer(tmp_path, char_tokenizer, date_dataset, student=student, hidden_weight=1.0,
                           hidden_loss="normalized_mse", attention_weight=1.0, attention_loss=attention_loss)
    trainer.train()
    logged = [e for e in trainer.state.log_history if "hidden_loss" in e]
    assert len(logged) == 3 and all(e["hidden_loss"] > 0 and e["attention_loss"] > 0 for e in logged)
    assert all(torch.isfinite(p).all() for p in student.parameters())
    assert max_difference(params(student), before) > 1e-4


def test_final_save_writes_the_projections_beside_the_student(tmp_path, char_tokenizer, date_dataset):
    from transformers import AutoModelForCausalLM

    trainer = make_trainer(tmp_path, char_tokenizer, date_dataset, max_steps=1, hidden_weight=1.0)
    trainer.train()
    out = tmp_path / "final"
    trainer.save_model(str(out))
    assert (out / PROJECTIONS_FILE).is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(str(out))
    assert set(reloaded.state_dict()) == set(trainer.model.state_dict())


def test_hard_labels_plus_features_need_no_logit_term(tmp_path, char_tokenizer, date_dataset):
    trainer = make_trainer(tmp_path, char_tokenizer, date_dataset, alpha=1.0, hidden_weight=1.0)
    trainer.train()
    logged = [e for e in trainer.state.log_history if "hidden_loss" in e]
    assert logged and all(e["kd_loss"] == 0 and e["hidden_loss"] > 0 for e in logged)


def test_evaluation_reports_the_feature_terms(tmp_path, char_tokenizer, date_dataset):
    trainer = DistillationTrainer(model=tiny_llama(len(char_tokenizer), seed=2),
                                  teacher_model=tiny_llama(len(char_tokenizer), hidden=48, seed=1),
                                  args=make_config(tmp_path, per_device_eval_batch_size=16, hidden_weight=1.0,
                                                   attention_weight=1.0),
                                  eval_dataset=date_dataset, processing_class=char_tokenizer)
    metrics = trainer.evaluate()
    assert metrics["eval_hidden_loss"] > 0 and metrics["eval_attention_loss"] > 0


def test_features_without_a_teacher_are_refused(tmp_path, char_tokenizer, date_dataset):
    with pytest.raises(ValueError, match="a teacher_model is required"):
        DistillationTrainer(model=tiny_llama(len(char_tokenizer)), args=make_config(tmp_path, alpha=1.0,
                                                                                    hidden_weight=1.0),
                            train_dataset=date_dataset, processing_class=char_tokenizer)


def test_a_bad_layer_map_is_refused_before_training(tmp_path, char_tokenizer, date_dataset):
    with pytest.raises(LayerMapError, match=r"attention_layer_map '1:5'.*teacher layer 5 is out of range"):
        make_trainer(tmp_path, char_tokenizer, date_dataset, attention_weight=1.0, attention_layer_map="1:5")


@pytest.mark.parametrize("field, value, message", [
    ("hidden_weight", -1.0, "hidden_weight must be >= 0"),
    ("attention_weight", -0.5, "attention_weight must be >= 0"),
    ("hidden_loss", "l1", "hidden_loss must be one of mse, cosine, normalized_mse"),
    ("hidden_projection", "never", "hidden_projection must be one of auto, always"),
    ("hidden_projection_init", "orthogonal", "hidden_projection_init must be one of xavier, identity, zero"),
    ("attention_loss", "kl", "attention_loss must be one of head_mean, relation"),
    ("hidden_layer_map", "0->1", "is not a 'student:teacher' pair"),
    ("attention_layer_map", "first", "is not a 'student:teacher' pair"),
    ("relation_heads", -1, "relation_heads must be >= 0"),
    ("attention_query_chunk", 0, "attention_query_chunk must be >= 1"),
])
def test_out_of_range_feature_settings_are_refused(tmp_path, field, value, message):
    with pytest.raises(ValueError, match=message):
        make_config(tmp_path, **{field: value})


def test_cached_teacher_logits_with_feature_terms_are_refused(tmp_path):
    with pytest.raises(ValueError, match="precompute_teacher_logits keeps only the teacher's logits.*set "
                                         "precompute_teacher_logits=False"):
        make_config(tmp_path, precompute_teacher_logits=True, attention_weight=1.0)
