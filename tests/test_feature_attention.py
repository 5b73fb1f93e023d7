"""Attention maps rebuilt from captured projections (kd_llm.features): equal to the models' own eager attention
weights, and the head-mean / relation losses against naive float64 references."""

import copy
import math

import pytest
import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from kd_llm.features import FeatureDistiller, UnsupportedAttentionError
from kd_llm.features.attention_maps import (
    attention_log_probs,
    head_mean_attention_kl,
    queries_and_keys,
    relation_attention_kl,
)
from kd_llm.features.capture import FeatureCapture
from tests.conftest import CHAR_VOCAB, tiny_llama_config

SMALL = dict(vocab_size=CHAR_VOCAB, intermediate_size=48, max_position_embeddings=64, pad_token_id=0,
             bos_token_id=1, eos_token_id=2)


def gqa_llama(seed=0, **overrides):
    """9 query heads sharing 3 KV heads."""
    torch.manual_seed(seed)
    values = dict(hidden_size=36, num_attention_heads=9, num_key_value_heads=3, intermediate_size=48)
    values.update(overrides)
    return LlamaForCausalLM(tiny_llama_config(**values)).eval()


def gemma3(seed=0, **overrides):
    """q_norm/k_norm per head, query_pre_attn_scalar scaling, a sliding-window layer (window 4) and a full one."""
    torch.manual_seed(seed)
    values = dict(SMALL, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=8, sliding_window=4, layer_types=["sliding_attention", "full_attention"],
                  query_pre_attn_scalar=16)
    values.update(overrides)
    model = Gemma3ForCausalLM(Gemma3TextConfig(**values)).eval()
    with torch.no_grad():  # Gemma's norms start at weight 0 (scale 1); make them matter
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.normal_(0, 0.5)
    return model


def qwen3(seed=0):
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(Qwen3Config(**SMALL, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, head_dim=8)).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "q_norm" in name or "k_norm" in name:
                parameter.normal_(1, 0.5)
    return model


def padded_batch(batch=3, length=12, seed=0):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, CHAR_VOCAB, (batch, length), generator=generator)
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    attention_mask[1, 8:] = 0  # right padding
    attention_mask[2, 5:] = 0
    return input_ids, attention_mask


def captured_maps(model, input_ids, attention_mask, *, query_chunk=None, **forward_kwargs):
    layers = range(model.config.num_hidden_layers)
    with FeatureCapture(model, attention_layers=layers) as features, torch.no_grad():
        outputs = model(input_ids=input_ids, attention_mask=attention_mask, **forward_kwargs)
    maps = []
    length = input_ids.shape[1]
    chunk = query_chunk or length
    for index in layers:
        inputs = features.attention[index]
        query, key = queries_and_keys(inputs.query, inputs.key, inputs.geometry, inputs.position_embeddings, "test")
        blocks = [attention_log_probs(query, key, inputs.geometry, attention_mask.bool(), start, min(length, start + chunk))
                  for start in range(0, length, chunk)]
        full = torch.full((*blocks[0].shape[:2], length, length), float("-inf"))
        for start, block in zip(range(0, length, chunk), blocks):
            full[:, :, start:start + block.shape[2], :block.shape[3]] = block
        maps.append(full.exp())
    return maps, outputs


@pytest.mark.parametrize("build", [gqa_llama, gemma3, qwen3], ids=["llama-9q-3kv", "gemma3", "qwen3"])
def test_rebuilt_maps_equal_the_models_eager_attention_weights(build):
    model = build()
    model.config._attn_implementation = "eager"
    input_ids, attention_mask = padded_batch(length=12)  # longer than Gemma's window of 4
    ours, outputs = captured_maps(model, input_ids, attention_mask, query_chunk=5, output_attentions=True)
    valid_rows = attention_mask.bool()[:, None, :, None]
    for layer, (mine, eager) in enumerate(zip(ours, outputs.attentions)):
        assert mine.shape == eager.shape
        difference = (mine - eager).abs().masked_fill(~valid_rows, 0).max().item()
        assert difference < 1e-5, f"layer {layer}: {difference}"
    # The window really cut the first Gemma layer: row 11 gives no weight to key 0.
    if build is gemma3:
        assert ours[0][0, :, 11, :8].abs().max() == 0 and ours[1][0, :, 11, 0].min() > 0


def test_maps_are_rebuilt_under_sdpa_too():
    """The point of hooks: the student runs its fast attention; the maps still match the eager weights."""
    model = gqa_llama()
    input_ids, attention_mask = padded_batch()
    model.config._attn_implementation = "sdpa"
    from_sdpa, _ = captured_maps(model, input_ids, attention_mask)
    model.config._attn_implementation = "eager"
    _, eager = captured_maps(model, input_ids, attention_mask, output_attentions=True)
    valid_rows = attention_mask.bool()[:, None, :, None]
    for mine, reference in zip(from_sdpa, eager.attentions):
        assert (mine - reference).abs().masked_fill(~valid_rows, 0).max() < 1e-5


# ---- losses against naive references ----------------------------------------------------------------------------


def naive_head_mean_kl(student_probs, teacher_probs, attention_mask):
    """Loops in float64 over per-head probability maps [B, H, T, T] (eager weights)."""
    total = 0.0
    for b in range(attention_mask.shape[0]):
        for i in range(attention_mask.shape[1]):
            if not attention_mask[b, i]:
                continue
            p = teacher_probs[b, :, i].double().mean(0)
            q = student_probs[b, :, i].double().mean(0)
            total += sum(float(p[j] * math.log(p[j] / q[j])) for j in range(len(p)) if p[j] > 0)
    return total


def teacher_student_qk(student, teacher, input_ids, attention_mask, layer=1):
    qk, geometry = [], []
    for model in (student, teacher):
        with FeatureCapture(model, attention_layers=[layer]) as features, torch.no_grad():
            model(input_ids=input_ids, attention_mask=attention_mask)
        inputs = features.attention[layer]
        qk.append(queries_and_keys(inputs.query, inputs.key, inputs.geometry, inputs.position_embeddings, "t"))
        geometry.append(inputs.geometry)
    return qk, geometry


def test_head_mean_kl_matches_a_naive_reference_across_head_counts():
    # Large initial weights: peaked attention, so the maps differ clearly.
    teacher = gqa_llama(seed=1, initializer_range=0.3)  # 9 query heads, 3 KV heads, head_dim 4
    student = LlamaForCausalLM(tiny_llama_config(hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                                 initializer_range=0.3)).eval()
    input_ids, attention_mask = padded_batch(seed=3)
    (s_qk, t_qk), (s_geo, t_geo) = teacher_student_qk(student, teacher, input_ids, attention_mask)
    ours = head_mean_attention_kl(s_qk, t_qk, s_geo, t_geo, attention_mask, query_chunk=5)
    student.config._attn_implementation = teacher.config._attn_implementation = "eager"
    with torch.no_grad():
        s_probs = student(input_ids=input_ids, attention_mask=attention_mask, output_attentions=True).attentions[1]
        t_probs = teacher(input_ids=input_ids, attention_mask=attention_mask, output_attentions=True).attentions[1]
    reference = naive_head_mean_kl(s_probs, t_probs, attention_mask)
    assert ours.dtype == torch.float32 and reference > 0.1
    assert ours.item() == pytest.approx(reference, rel=1e-4)


def naive_relation_kl(student_x, teacher_x, attention_mask, heads):
    total = 0.0
    for s_full, t_full in zip(student_x, teacher_x):
        for b in range(attention_mask.shape[0]):
            for r in range(heads):
                s = s_full[b].double().chunk(heads, dim=-1)[r]
                t = t_full[b].double().chunk(heads, dim=-1)[r]
                for i in range(attention_mask.shape[1]):
                    if not attention_mask[b, i]:
                        continue
                    keys = [j for j in range(i + 1) if attention_mask[b, j]]
                    p = torch.softmax(torch.stack([t[i] @ t[j] for j in keys]) / math.sqrt(t.shape[-1]), 0)
                    q = torch.softmax(torch.stack([s[i] @ s[j] for j in keys]) / math.sqrt(s.shape[-1]), 0)
                    total += (p * (p.log() - q.log())).sum().item() / heads
    return total / 3


def test_relation_kl_matches_a_naive_reference_for_different_widths():
    generator = torch.Generator().manual_seed(0)
    _, attention_mask = padded_batch(length=7)
    student = [torch.randn(3, 7, width, generator=generator) for width in (16, 8, 8)]
    teacher = [torch.randn(3, 7, width, generator=generator) for width in (36, 12, 12)]
    ours = relation_attention_kl(student, teacher, attention_mask, relation_heads=4, query_chunk=3)
    reference = naive_relation_kl(student, teacher, attention_mask, heads=4)
    assert reference > 0 and ours.item() == pytest.approx(reference, rel=1e-4)


def test_chunked_maps_give_the_same_loss_and_gradients():
    teacher = gqa_llama(seed=1, initializer_range=0.3)
    student = LlamaForCausalLM(tiny_llama_config(hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                                 initializer_range=0.3))
    input_ids, attention_mask = padded_batch(seed=4)
    losses, grads = [], []
    for chunk in (12, 5, 1):
        student.zero_grad()
        with FeatureCapture(student, attention_layers=[1]) as s_features:
            student(input_ids=input_ids, attention_mask=attention_mask)
        with FeatureCapture(teacher, attention_layers=[1]) as t_features, torch.no_grad():
            teacher(input_ids=input_ids, attention_mask=attention_mask)
        s, t = s_features.attention[1], t_features.attention[1]
        loss = head_mean_attention_kl(
            queries_and_keys(s.query, s.key, s.geometry, s.position_embeddings, "s"),
            queries_and_keys(t.query, t.key, t.geometry, t.position_embeddings, "t"),
            s.geometry, t.geometry, attention_mask, query_chunk=chunk)
        loss.backward()
        losses.append(loss.item())
        grads.append(student.model.layers[1].self_attn.q_proj.weight.grad.clone())
    # Float32 sums in another order: equal to rounding.
    assert losses[0] > 0.1 and losses[1] == pytest.approx(losses[0], rel=1e-5)
    assert losses[2] == pytest.approx(losses[0], rel=1e-5)
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(grads[2], grads[0], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("loss", ["relation", "head_mean"])
def test_identical_models_give_zero_attention_loss(loss):
    teacher = gqa_llama(seed=5)
    student = copy.deepcopy(teacher)
    distiller = FeatureDistiller(student, teacher, attention_weight=1.0, attention_loss=loss,
                                 attention_layer_map="uniform", attention_query_chunk=4)
    input_ids, attention_mask = padded_batch(seed=6)
    with distiller.capture(student, "student") as s_features:
        student(input_ids=input_ids, attention_mask=attention_mask)
    with distiller.capture(teacher, "teacher") as t_features, torch.no_grad():
        teacher(input_ids=input_ids, attention_mask=attention_mask)
    terms = distiller.terms(s_features, t_features, attention_mask, attention_mask.sum(), expect_grad=True)
    assert terms.hidden is None
    assert abs(terms.attention.item()) < 1e-6
    terms.attention.backward()  # differentiable, and a minimum: zero gradient
    assert student.model.layers[0].self_attn.q_proj.weight.grad.abs().max() < 1e-6


def test_relation_heads_default_and_bad_choice():
    teacher = gqa_llama()  # widths q 36, k/v 12
    student = Qwen2ForCausalLM(Qwen2Config(**SMALL, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                           num_key_value_heads=2))  # q 32, k/v 16
    distiller = FeatureDistiller(student, teacher, attention_weight=1.0, attention_loss="relation")
    assert distiller.relation_heads == {(1, 1): 4}  # largest <= 4 query heads dividing 36, 12, 32, 16
    with pytest.raises(UnsupportedAttentionError, match=r"relation_heads=3 does not divide.*student Q=32.*Choose one "
                                                        r"of \[1, 2, 4\]"):
        FeatureDistiller(student, teacher, attention_weight=1.0, attention_loss="relation", relation_heads=3)


def test_fused_qkv_attention_is_refused_clearly():
    phi3 = Phi3ForCausalLM(Phi3Config(**SMALL, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2))
    with pytest.raises(UnsupportedAttentionError, match="teacher layer 1 .*no separate q_proj/k_proj/v_proj"):
        FeatureDistiller(gqa_llama(), phi3, attention_weight=1.0)
    # Hidden-state distillation still works with it.
    assert FeatureDistiller(gqa_llama(), phi3, hidden_weight=1.0).hidden_pairs == [(0, 0), (1, 1)]
