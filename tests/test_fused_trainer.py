"""DistillationTrainer on the fused loss path: same training as the dense path, chosen (or refused) as configured."""

import logging

import pytest
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaForCausalLM

from kd_llm import DistillationConfig, DistillationTrainer
from tests.conftest import CHAR_VOCAB, tiny_llama, tiny_llama_config
from tests.helpers.cache import build
from tests.helpers.training import max_difference, params

# Plain SGD: parameters then differ by lr x (gradient difference). Adam divides each gradient by its own running
# scale, which turns float rounding on a near-zero gradient into a step of ~lr in either direction.
BASE = dict(max_steps=3, per_device_train_batch_size=8, optim="sgd", learning_rate=0.5, logging_steps=1,
            save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, seed=0, alpha=0.5, temperature=2.0)


def make_trainer(tmp_path, tokenizer, dataset, teacher, student, **overrides):
    args = DistillationConfig(output_dir=str(tmp_path / "run"), **{**BASE, **overrides})
    return DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=dataset,
                               processing_class=tokenizer)


def train_both_ways(tmp_path, tokenizer, dataset, build_teacher, build_student, fused_overrides=None, **overrides):
    """Train identical copies with fused_loss=false and fused_loss=true; return (dense trainer, fused trainer)."""
    trainers = []
    for name, extra in (("dense", {"fused_loss": "false"}), ("fused", {"fused_loss": "true", **(fused_overrides or {})})):
        trainer = make_trainer(tmp_path / name, tokenizer, dataset, build_teacher(), build_student(),
                               **{**overrides, **extra})
        trainer.train()
        trainers.append(trainer)
    assert trainers[0].fused_loss is False and trainers[1].fused_loss is True
    return trainers


def logged(trainer, key="total_loss"):
    return [entry[key] for entry in trainer.state.log_history if key in entry]


@pytest.mark.parametrize("loss", ["forward_kl", "jsd"])
def test_fused_path_trains_like_the_dense_path_with_gradient_accumulation(tmp_path, char_tokenizer, date_dataset,
                                                                          loss):
    dense, fused = train_both_ways(
        tmp_path, char_tokenizer, date_dataset, lambda: tiny_llama(CHAR_VOCAB, hidden=48, seed=1),
        lambda: tiny_llama(CHAR_VOCAB, seed=2), per_device_train_batch_size=2, gradient_accumulation_steps=4,
        distillation_loss=loss, fused_overrides={"loss_chunk_size": 7},
    )
    assert max_difference(params(dense.model), params(fused.model)) < 1e-5
    assert max_difference(params(fused.model), params(tiny_llama(CHAR_VOCAB, seed=2))) > 1e-2  # it did train
    assert logged(fused) == pytest.approx(logged(dense), rel=1e-5)
    assert logged(fused, "kd_loss") == pytest.approx(logged(dense, "kd_loss"), rel=1e-5)
    assert all(value > 0 for value in logged(fused, "kd_loss"))
    # ... and the accumulated fused run equals a one-batch fused run.
    one_batch = make_trainer(tmp_path / "one", char_tokenizer, date_dataset, tiny_llama(CHAR_VOCAB, hidden=48, seed=1),
                             tiny_llama(CHAR_VOCAB, seed=2), distillation_loss=loss, fused_loss="true")
    one_batch.train()
    assert max_difference(params(one_batch.model), params(fused.model)) < 1e-5


def tiny_gemma3(seed: int, softcap: float | None, hidden: int = 32) -> Gemma3ForCausalLM:
    torch.manual_seed(seed)
    config = Gemma3TextConfig(vocab_size=CHAR_VOCAB, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=8, intermediate_size=2 * hidden,
                              max_position_embeddings=256, sliding_window=16, final_logit_softcapping=softcap,
                              layer_types=["sliding_attention", "full_attention"], pad_token_id=0, bos_token_id=1,
                              eos_token_id=2, tie_word_embeddings=True)
    model = Gemma3ForCausalLM(config)
    with torch.no_grad():  # larger logits than the init gives, so that the soft cap really bends them
        model.model.embed_tokens.weight.mul_(40)
    return model


def test_tied_embeddings_and_final_logit_soft_cap_train_like_the_dense_path(tmp_path, char_tokenizer, date_dataset):
    student = tiny_gemma3(2, softcap=3.0)
    assert student.lm_head.weight is student.model.embed_tokens.weight  # tied: one parameter, two uses
    dense, fused = train_both_ways(tmp_path, char_tokenizer, date_dataset,
                                   lambda: tiny_gemma3(1, softcap=2.0, hidden=48), lambda: tiny_gemma3(2, softcap=3.0),
                                   max_steps=2)
    assert max_difference(params(dense.model), params(fused.model)) < 1e-5
    assert logged(fused) == pytest.approx(logged(dense), rel=1e-5)
    # Without the cap the loss differs: the test can tell the two apart.
    uncapped = make_trainer(tmp_path / "uncapped", char_tokenizer, date_dataset, tiny_gemma3(1, None, hidden=48),
                            tiny_gemma3(2, None), max_steps=2)
    uncapped.train()
    assert abs(logged(uncapped)[0] - logged(fused)[0]) > 1e-3


def test_padded_teacher_vocabulary_and_hard_labels_only(tmp_path, char_tokenizer, date_dataset):
    dense, fused = train_both_ways(tmp_path / "padded", char_tokenizer, date_dataset,
                                   lambda: tiny_llama(96, hidden=48, seed=1), lambda: tiny_llama(CHAR_VOCAB, seed=2),
                                   max_steps=2)
    assert fused.kd_vocab_size == CHAR_VOCAB
    assert max_difference(params(dense.model), params(fused.model)) < 1e-5
    dense, fused = train_both_ways(tmp_path / "ce", char_tokenizer, date_dataset, lambda: None,
                                   lambda: tiny_llama(CHAR_VOCAB, seed=2), max_steps=2, alpha=1.0)
    assert max_difference(params(dense.model), params(fused.model)) < 1e-5


def test_evaluation_loss_is_the_same_on_both_paths(tmp_path, char_tokenizer, date_dataset):
    results = []
    for name, setting in (("dense", "false"), ("fused", "true")):
        trainer = make_trainer(tmp_path / name, char_tokenizer, date_dataset, tiny_llama(CHAR_VOCAB, hidden=48, seed=1),
                               tiny_llama(CHAR_VOCAB, seed=2), fused_loss=setting, max_steps=1)
        results.append(trainer.evaluate(eval_dataset=date_dataset.select(range(8))))
    for key in ("eval_loss", "eval_ce_loss", "eval_kd_loss"):
        assert results[1][key] == pytest.approx(results[0][key], rel=1e-5)


class ScaledLogitsLlama(LlamaForCausalLM):
    """Post-processes its logits (like Cohere's logit_scale), which the fused loss cannot know about."""

    def forward(self, *args, **kwargs):
        outputs = super().forward(*args, **kwargs)
        outputs.logits = outputs.logits * 2.0
        return outputs


def test_auto_falls_back_with_the_reason_logged_and_true_refuses(tmp_path, char_tokenizer, date_dataset, caplog):
    torch.manual_seed(2)
    scaled_student = ScaledLogitsLlama(tiny_llama_config())
    with caplog.at_level(logging.WARNING, logger="kd_llm.training.fused_path"):
        trainer = make_trainer(tmp_path / "a", char_tokenizer, date_dataset, tiny_llama(CHAR_VOCAB, seed=1),
                               scaled_student)
    assert trainer.fused_loss is False
    assert "dense" in caplog.text and "post-processes its logits" in caplog.text
    with pytest.raises(ValueError, match="fused_loss=true.*post-processes its logits"):
        make_trainer(tmp_path / "b", char_tokenizer, date_dataset, tiny_llama(CHAR_VOCAB, seed=1), scaled_student,
                     fused_loss="true")
    with pytest.raises(ValueError, match="precompute_teacher_logits"):
        make_trainer(tmp_path / "c", char_tokenizer, date_dataset, tiny_llama(CHAR_VOCAB, seed=1),
                     tiny_llama(CHAR_VOCAB, seed=2), fused_loss="true", precompute_teacher_logits=True)
    auto = make_trainer(tmp_path / "d", char_tokenizer, date_dataset, tiny_llama(CHAR_VOCAB, seed=1),
                        tiny_llama(CHAR_VOCAB, seed=2))
    assert auto.fused_loss is True  # auto picks the fused path for plain models


@pytest.mark.parametrize("field, value, message", [("fused_loss", "maybe", "fused_loss"),
                                                   ("loss_chunk_size", -1, "loss_chunk_size")])
def test_bad_fused_settings_are_refused(tmp_path, field, value, message):
    with pytest.raises(ValueError, match=message):
        DistillationConfig(output_dir=str(tmp_path), report_to="none", **{field: value})
    assert DistillationConfig(output_dir=str(tmp_path), report_to="none", fused_loss=True).fused_loss == "true"


class PlainForwardLlama(LlamaForCausalLM):
    """A forward that takes no logits_to_keep / output_hidden_states (as older custom models)."""

    def forward(self, input_ids=None, attention_mask=None, use_cache=None):
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache)


def test_a_forward_without_the_fused_arguments_is_reported(tmp_path, char_tokenizer, date_dataset):
    torch.manual_seed(1)
    teacher = PlainForwardLlama(tiny_llama_config())
    with pytest.raises(ValueError, match="teacher: PlainForwardLlama's forward failed"):
        make_trainer(tmp_path / "a", char_tokenizer, date_dataset, teacher, tiny_llama(CHAR_VOCAB, seed=2),
                     fused_loss="true")
    trainer = make_trainer(tmp_path / "b", char_tokenizer, date_dataset, teacher, tiny_llama(CHAR_VOCAB, seed=2))
    assert trainer.fused_loss is False
    trainer.train()  # the dense path runs with it


def test_teacher_cache_trains_alike_on_the_fused_and_the_dense_path(tmp_path, char_tokenizer, date_dataset):
    teacher = tiny_llama(CHAR_VOCAB, hidden=48, seed=1).eval()
    build(tmp_path / "cache", teacher, date_dataset, char_tokenizer, k=16, temperature=2.0)
    trainers = []
    for setting in ("false", "true"):
        args = DistillationConfig(output_dir=str(tmp_path / setting), **{
            **BASE, "max_steps": 2, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2},
            teacher_cache=str(tmp_path / "cache"), fused_loss=setting)
        trainer = DistillationTrainer(model=tiny_llama(CHAR_VOCAB, seed=2), args=args, train_dataset=date_dataset,
                                      processing_class=char_tokenizer)
        assert trainer.teacher is None and trainer.fused_loss is (setting == "true")
        trainer.train()
        trainers.append(trainer)
    dense, fused = trainers
    assert max_difference(params(dense.model), params(fused.model)) < 1e-5
    assert max_difference(params(fused.model), params(tiny_llama(CHAR_VOCAB, seed=2))) > 1e-2
    assert logged(fused, "kd_loss") == pytest.approx(logged(dense, "kd_loss"), rel=1e-5)
