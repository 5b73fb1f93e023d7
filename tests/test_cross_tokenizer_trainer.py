"""DistillationTrainer with a teacher of another tokenizer: identity with plain KD, real tokenizers, refusals."""

import math

import pytest
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

from kd_llm import DistillationTrainer
from kd_llm.cross_tokenizer.data import build_cross_tokenizer_dataset
from kd_llm.data.sources import build_dataset, load_records
from kd_llm.models.char_tokenizer import build_char_tokenizer
from kd_llm.models.vocab import VocabularyMismatchError
from tests.conftest import tiny_distillation_config as make_config, tiny_llama
from tests.helpers.tokenizers import REAL_TEXTS, needs_gemma, needs_smollm2, packaged_tokenizer
from tests.helpers.training import max_difference, params


def date_records(size=16):
    return load_records("date_arithmetic", size=size, seed=1)


@pytest.mark.parametrize("loss", ["forward_kl", "jsd"])
def test_same_tokenizer_as_different_trains_exactly_like_plain_kd(tmp_path, loss):
    tokenizer = build_char_tokenizer()
    records = date_records()
    plain_student, cross_student = tiny_llama(len(tokenizer), seed=2), tiny_llama(len(tokenizer), seed=2)
    teacher = tiny_llama(len(tokenizer), hidden=48, seed=1)
    plain = DistillationTrainer(model=plain_student, teacher_model=teacher,
                                args=make_config(tmp_path / "plain", distillation_loss=loss, fused_loss="false"),
                                train_dataset=build_dataset(records, tokenizer), processing_class=tokenizer)
    plain.train()
    other = build_char_tokenizer()  # an equal tokenizer, another object: passed as "different"
    cross = DistillationTrainer(model=cross_student, teacher_model=teacher,
                                args=make_config(tmp_path / "cross", distillation_loss=loss,
                                                 cross_tokenizer_loss="hybrid"),
                                train_dataset=build_cross_tokenizer_dataset(records, tokenizer, other),
                                processing_class=tokenizer, teacher_tokenizer=other)
    cross.train()
    assert max_difference(params(plain_student), params(cross_student)) < 1e-5
    plain_logs = [e for e in plain.state.log_history if "kd_loss" in e]
    cross_logs = [e for e in cross.state.log_history if "kd_loss" in e]
    assert [e["kd_loss"] for e in cross_logs] == pytest.approx([e["kd_loss"] for e in plain_logs], abs=1e-5)
    assert all(e["student_matched_mass"] == pytest.approx(1.0) for e in cross_logs)


def tiny_gemma3(vocab_size, seed=1):
    torch.manual_seed(seed)
    return Gemma3ForCausalLM(Gemma3TextConfig(
        vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=512, sliding_window=64, pad_token_id=0,
        bos_token_id=2, eos_token_id=1))


@needs_gemma
@needs_smollm2
@pytest.mark.parametrize("method", ["hybrid", pytest.param("uld", marks=pytest.mark.slow),
                                    pytest.param("span", marks=pytest.mark.slow)])
def test_real_tokenizers_train_with_every_cross_tokenizer_loss(tmp_path, method):
    student_tokenizer, teacher_tokenizer = packaged_tokenizer("smollm2-135m-instruct"), packaged_tokenizer("gemma3-270m")
    records = [{"prompt": "Copy this sentence:", "completion": text} for text in REAL_TEXTS]
    dataset = build_cross_tokenizer_dataset(records, student_tokenizer, teacher_tokenizer, max_length=64)
    teacher = tiny_gemma3(len(teacher_tokenizer))
    before = params(teacher)
    student = tiny_llama(len(student_tokenizer), hidden=16, heads=2, kv_heads=1, seed=2)
    trainer = DistillationTrainer(model=student, teacher_model=teacher,
                                  args=make_config(tmp_path, cross_tokenizer_loss=method, max_steps=2,
                                                   per_device_train_batch_size=2),
                                  train_dataset=dataset, processing_class=student_tokenizer,
                                  teacher_tokenizer=teacher_tokenizer)
    trainer.train()
    logged = [e for e in trainer.state.log_history if "kd_loss" in e]
    assert len(logged) == 2 and all(math.isfinite(e["kd_loss"]) and e["kd_loss"] > 0 for e in logged)
    assert max_difference(before, params(teacher)) == 0 and not teacher.training
    if method == "hybrid":
        # SmolLM2 and Gemma share a good part of their vocabularies: the matched mass is a real share, not 0 or 1.
        assert all(0 < e["student_matched_mass"] < 1 and 0 < e["teacher_matched_mass"] < 1 for e in logged)


def test_different_tokenizers_without_cross_tokenizer_loss_are_refused_with_the_way_out(tmp_path):
    tokenizer, other = build_char_tokenizer(), build_char_tokenizer("abcdefgh .")
    with pytest.raises(VocabularyMismatchError, match="cross_tokenizer_loss"):
        DistillationTrainer(model=tiny_llama(len(tokenizer)), teacher_model=tiny_llama(len(other)),
                            args=make_config(tmp_path), train_dataset=build_dataset(date_records(), tokenizer),
                            processing_class=tokenizer, teacher_tokenizer=other)


def test_a_plain_dataset_is_refused_at_the_first_batch_with_the_fix(tmp_path):
    tokenizer, other = build_char_tokenizer(), build_char_tokenizer()
    trainer = DistillationTrainer(model=tiny_llama(len(tokenizer)), teacher_model=tiny_llama(len(other)),
                                  args=make_config(tmp_path, cross_tokenizer_loss="uld"),
                                  train_dataset=build_dataset(date_records(), tokenizer), processing_class=tokenizer,
                                  teacher_tokenizer=other)
    with pytest.raises(KeyError, match="build_cross_tokenizer_dataset"):
        trainer.train()


@pytest.mark.parametrize("setting,message", [
    ({"teacher_cache": "somewhere"}, "teacher_cache is not supported with cross_tokenizer_loss"),
    ({"precompute_teacher_logits": True}, "precompute_teacher_logits is not supported"),
    ({"hidden_weight": 1.0}, "hidden_weight is not supported"),
    ({"packing": True, "lmbda": 0.5}, "packing is not supported with cross_tokenizer_loss and lmbda=0.5"),
    ({"fused_loss": "true"}, "fused_loss=true is not possible"),
    ({"teacher_url": "http://127.0.0.1:9"}, "teacher_url / teacher_routes are not supported with cross_tokenizer"),
    ({"cross_tokenizer_loss": "dtw"}, "cross_tokenizer_loss must be one of"),
])
def test_what_cross_tokenizer_cannot_do_is_refused_in_the_config(tmp_path, setting, message):
    values = {"cross_tokenizer_loss": "hybrid", **setting}
    with pytest.raises(ValueError, match=message):
        make_config(tmp_path, **values)


def test_on_policy_and_seq_kd_are_accepted_across_tokenizers(tmp_path):
    for values in ({"lmbda": 0.5}, {"seq_kd": True}, {"seq_kd": True, "alpha": 1.0}):
        config = make_config(tmp_path, cross_tokenizer_loss="hybrid", **values)
        assert config.cross_tokenizer_loss == "hybrid"
