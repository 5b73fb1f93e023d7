"""The teacher's head alone: read from a folder's safetensors equal to the loaded model's, the soft cap and the tie
recorded, and models whose logits are not softcap(lm_head(h)) refused with the reason."""

from __future__ import annotations

import pytest
import torch
from transformers import CohereConfig, CohereForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, GraniteConfig, \
    GraniteForCausalLM

from kd_llm.models.lm_head import (
    TeacherHeadError,
    final_hidden_states,
    head_of_model,
    head_sha256,
    load_teacher_head,
    logit_postprocessing_problem,
)
from kd_llm.models.loading import load_model
from tests.conftest import tiny_llama

SMALL = dict(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
             num_key_value_heads=1, head_dim=8, pad_token_id=0)


def tiny_gemma3(cap=30.0, seed=0):
    torch.manual_seed(seed)
    config = Gemma3TextConfig(**SMALL, final_logit_softcapping=cap, layer_types=["full_attention"],
                              sliding_window=16)
    return Gemma3ForCausalLM(config).eval()


def rebuilt_logits(model, head, input_ids):
    hidden = final_hidden_states(model, input_ids, None)
    logits = hidden @ head.weight.T
    return logits if head.softcap is None else torch.tanh(logits / head.softcap) * head.softcap


@pytest.mark.parametrize("tied", [True, False])
def test_head_from_the_folder_is_the_loaded_models_head(tmp_path, tied):
    model = tiny_llama(89, hidden=24, seed=3)
    model.config.tie_word_embeddings = tied
    if not tied:  # an untied head with its own values
        model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight))
    else:
        model.tie_weights()
    model.save_pretrained(tmp_path)
    loaded = load_model(tmp_path)
    from_folder, from_model = load_teacher_head(tmp_path), head_of_model(loaded)
    assert from_folder.sha256 == from_model.sha256 and from_folder.tied is tied and from_model.tied is tied
    torch.testing.assert_close(from_folder.weight, loaded.lm_head.weight, rtol=0, atol=0)
    ids = torch.randint(0, 89, (2, 7))
    torch.testing.assert_close(rebuilt_logits(loaded, from_folder, ids), loaded(input_ids=ids).logits,
                               rtol=1e-5, atol=1e-5)


def test_gemma3_soft_cap_is_recorded_and_rebuilds_the_logits(tmp_path):
    model = tiny_gemma3(cap=2.0)
    model.save_pretrained(tmp_path)
    head = load_teacher_head(tmp_path)
    assert head.softcap == 2.0 and head.sha256 == head_of_model(model).sha256
    ids = torch.randint(0, 50, (1, 6))
    torch.testing.assert_close(rebuilt_logits(model, head, ids), model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    assert head_sha256(head.weight, 3.0) != head.sha256  # another cap is another head


def test_hash_is_of_values_not_storage_dtype():
    weight = torch.randn(7, 5).to(torch.bfloat16)
    assert head_sha256(weight, None) == head_sha256(weight.float(), None)
    assert head_sha256(weight, None) != head_sha256(weight.float() + 1e-3, None)


@pytest.mark.parametrize("model_class, config, reason", [
    (CohereForCausalLM, CohereConfig(**SMALL, logit_scale=0.0625), "logit_scale"),
    (GraniteForCausalLM, GraniteConfig(**{k: v for k, v in SMALL.items() if k != "head_dim"}, logits_scaling=8.0),
     "logits_scaling"),
])
def test_models_with_logit_post_processing_are_refused(tmp_path, model_class, config, reason):
    model = model_class(config)
    with pytest.raises(TeacherHeadError, match=f"not softcap\\(lm_head.*{reason}"):
        head_of_model(model)
    model.save_pretrained(tmp_path)
    with pytest.raises(TeacherHeadError, match=reason):
        load_teacher_head(tmp_path)


def test_neutral_settings_and_a_bias_are_told_apart(tmp_path):
    assert logit_postprocessing_problem(CohereConfig(**SMALL, logit_scale=1.0)) is None
    assert logit_postprocessing_problem({"model_type": "granite", "logits_scaling": 4.0}) is not None
    model = tiny_llama(89, hidden=16)
    model.lm_head = torch.nn.Linear(16, 89, bias=True)
    with pytest.raises(TeacherHeadError, match="has a bias"):
        head_of_model(model)


def test_a_folder_with_an_lm_head_bias_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    model = tiny_llama(89, hidden=16)
    model.config.tie_word_embeddings = False
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["lm_head.bias"] = torch.zeros(89)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(TeacherHeadError, match="has a bias"):
        load_teacher_head(tmp_path)
