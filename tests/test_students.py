"""Student construction: checkpoint, scaled-down config, layer pruning (explicit, uniform, importance)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig

from kd_llm.models.students import (
    build_student,
    prune_layers,
    rank_layers_by_importance,
    scaled_down_config,
    uniform_layer_indices,
)

from tests.conftest import CHAR_VOCAB, tiny_llama_config  # noqa: E402

VOCAB = CHAR_VOCAB


def llama_config(**overrides) -> LlamaConfig:
    return tiny_llama_config(**{"num_hidden_layers": 6, "max_position_embeddings": 64, "tie_word_embeddings": True,
                                **overrides})


def model_from(config, seed: int = 0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="module")
def teacher():
    return model_from(llama_config())


IDS = torch.tensor([[1, 10, 20, 30, 40, 50, 60, 70]])


def greedy_without_cache(model, ids, steps):
    for _ in range(steps):
        next_token = model(ids, use_cache=False).logits[:, -1:].argmax(-1)
        ids = torch.cat([ids, next_token], dim=1)
    return ids


# --------------------------------------------------------------------------------------------------------------------
# scaled


def test_scaled_config_overrides_applied_and_forward_works(teacher):
    student = build_student(
        "scaled", teacher=teacher, num_layers=2, hidden_size=16, num_attention_heads=2, intermediate_size=24, seed=3
    )
    config = student.config
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == (2, 16, 2)
    assert config.intermediate_size == 24 and config.head_dim == 8
    assert config.num_key_value_heads == 2  # teacher's 2 still divides 2 heads
    assert config.vocab_size == VOCAB and config.tie_word_embeddings
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, 0)
    assert len(student.model.layers) == 2 and student.model.layers[0].mlp.up_proj.weight.shape == (24, 16)
    assert student.lm_head.weight is student.model.embed_tokens.weight
    assert teacher.config.num_hidden_layers == 6 and teacher.config.hidden_size == 32  # teacher untouched
    assert student.training and all(p.requires_grad for p in student.parameters())
    logits = student(IDS).logits
    assert logits.shape == (1, IDS.shape[1], VOCAB) and torch.isfinite(logits).all()
    # seeded: same seed, same weights; other seed, other weights
    sizes = dict(num_layers=2, hidden_size=16, num_attention_heads=2, intermediate_size=24)
    again = build_student("scaled", teacher=teacher.config, seed=3, **sizes)  # a config works as the teacher too
    other = build_student("scaled", teacher=teacher, seed=4, **sizes)
    weight = student.model.layers[1].self_attn.q_proj.weight
    assert torch.equal(weight, again.model.layers[1].self_attn.q_proj.weight)
    assert not torch.equal(weight, other.model.layers[1].self_attn.q_proj.weight)


def test_scaled_keeps_gemma_head_dim_and_layer_types():
    config = Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=12, num_attention_heads=4, num_key_value_heads=1,
        head_dim=16, intermediate_size=64, query_pre_attn_scalar=16, sliding_window=4,
    )
    only_layers = scaled_down_config(config, num_layers=4)
    assert only_layers.head_dim == 16 and only_layers.query_pre_attn_scalar == 16  # not hidden // heads
    assert only_layers.layer_types == [config.layer_types[i] for i in (0, 4, 7, 11)]
    assert only_layers.layer_types[-1] == "full_attention"
    narrower = scaled_down_config(config, num_layers=3, hidden_size=16, num_attention_heads=2)
    assert narrower.head_dim == 8 and narrower.query_pre_attn_scalar == 8 and narrower.num_key_value_heads == 1
    student = build_student("scaled", teacher=config, num_layers=3, hidden_size=16, num_attention_heads=2)
    assert student(IDS).logits.shape == (1, IDS.shape[1], VOCAB)
    assert config.num_hidden_layers == 12 and len(config.layer_types) == 12  # teacher config untouched


def test_scaled_bad_arguments(teacher):
    with pytest.raises(ValueError, match="not divisible by num_attention_heads"):
        scaled_down_config(teacher.config, hidden_size=30, num_attention_heads=4)
    with pytest.raises(ValueError, match="not divisible by num_key_value_heads"):
        scaled_down_config(teacher.config, num_attention_heads=4, num_key_value_heads=3)
    with pytest.raises(ValueError, match="positive integer"):
        scaled_down_config(teacher.config, num_layers=0)
    with pytest.raises(ValueError, match="at least one size"):
        build_student("scaled", teacher=teacher)
    with pytest.raises(ValueError, match="needs teacher"):
        build_student("scaled", num_layers=2)
    with pytest.raises(ValueError, match="does not use layers"):
        build_student("scaled", teacher=teacher, num_layers=2, layers=[0, 1])


# --------------------------------------------------------------------------------------------------------------------
# pruned


def test_pruned_explicit_layers_copy_weights_and_generate(teacher):
    keep = [0, 2, 5]
    student = build_student("pruned", teacher=teacher, layers=[5, 0, 2])  # order does not matter
    assert student.config.num_hidden_layers == 3 and len(student.model.layers) == 3
    assert student.config.kd_llm_teacher_layers == keep
    assert len(teacher.model.layers) == 6 and teacher.config.num_hidden_layers == 6  # teacher untouched
    teacher_state = teacher.state_dict()
    for new_index, old_index in enumerate(keep):
        layer = student.model.layers[new_index]
        assert layer.self_attn.layer_idx == new_index
        for name, tensor in layer.state_dict().items():
            original = teacher_state[f"model.layers.{old_index}.{name}"]
            assert torch.equal(tensor, original)
            assert tensor.data_ptr() != original.data_ptr()  # a copy, not shared
    for name in ("model.embed_tokens.weight", "model.norm.weight"):
        assert torch.equal(student.state_dict()[name], teacher_state[name])
    assert student.lm_head.weight is student.model.embed_tokens.weight  # tying survives the copy
    assert all(p.requires_grad for p in student.parameters())

    student.eval()
    with torch.no_grad():
        generated = student.generate(IDS, max_new_tokens=3, do_sample=False, pad_token_id=0)
        assert generated.shape == (1, IDS.shape[1] + 3)
        assert torch.equal(generated, greedy_without_cache(student, IDS, 3))  # KV cache indexing is consistent


def test_pruned_keeps_per_layer_attention_types():
    config = Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=1,
        head_dim=8, intermediate_size=32, sliding_window=4,
    )
    teacher = model_from(config)
    student = prune_layers(teacher, [1, 5])
    assert student.config.layer_types == [config.layer_types[1], config.layer_types[5]] == [
        "sliding_attention",
        "full_attention",
    ]
    assert [layer.layer_idx for layer in student.model.layers] == [0, 1]
    ids = torch.tensor([[2, 11, 12, 13, 14, 15, 16]])  # longer than the sliding window
    with torch.no_grad():
        generated = student.eval().generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
        assert torch.equal(generated, greedy_without_cache(student, ids, 3))


def test_uniform_keeps_evenly_spaced_first_and_last(teacher):
    assert uniform_layer_indices(30, 15) == [0, 2, 4, 6, 8, 10, 12, 15, 17, 19, 21, 23, 25, 27, 29]
    assert uniform_layer_indices(6, 3) == [0, 3, 5]  # round(2.5) goes up
    assert uniform_layer_indices(6, 2) == [0, 5]
    assert uniform_layer_indices(6, 6) == list(range(6))
    assert uniform_layer_indices(7, 4) == [0, 2, 4, 6]
    assert uniform_layer_indices(6, 1) == [0]
    for total in range(1, 25):
        for count in range(2 if total > 1 else 1, total + 1):
            indices = uniform_layer_indices(total, count)
            assert len(set(indices)) == count and indices == sorted(indices)
            assert indices[0] == 0 and indices[-1] == total - 1
    student = build_student("pruned", teacher=teacher, num_layers=3, strategy="uniform")
    assert student.config.kd_llm_teacher_layers == [0, 3, 5]


def test_importance_ranks_identity_layer_least_important():
    teacher = model_from(llama_config(num_hidden_layers=4, hidden_size=64, intermediate_size=128), seed=1)
    with torch.no_grad():  # make layer 2 (nearly) the identity: its residual branches add nothing
        teacher.model.layers[2].self_attn.o_proj.weight.zero_()
        teacher.model.layers[2].mlp.down_proj.weight.zero_()
        for layer in (0, 1, 3):  # the other layers get a strong, non-trivial effect
            teacher.model.layers[layer].mlp.down_proj.weight.mul_(20)
    torch.manual_seed(0)
    calibration = torch.randint(4, VOCAB, (2, 24))
    before = {name: tensor.clone() for name, tensor in teacher.state_dict().items()}
    ranking = rank_layers_by_importance(teacher, calibration)
    assert sorted(index for index, _ in ranking) == [0, 1, 2, 3]
    assert ranking[-1][0] == 2 and abs(ranking[-1][1]) < 1e-5
    assert all(increase > 1e-3 for _, increase in ranking[:-1])
    assert all(torch.equal(before[name], tensor) for name, tensor in teacher.state_dict().items())  # not modified
    student = build_student(
        "pruned", teacher=teacher, num_layers=3, strategy="importance", calibration_input_ids=calibration
    )
    assert student.config.kd_llm_teacher_layers == [0, 1, 3]
    with torch.no_grad():  # dropping the identity layer changes nothing
        torch.testing.assert_close(student.eval()(calibration).logits, teacher(calibration).logits)


def test_importance_accepts_text_with_tokenizer():
    from kd_llm.models.char_tokenizer import build_char_tokenizer

    teacher = model_from(llama_config(num_hidden_layers=3))
    ranking = rank_layers_by_importance(
        teacher, ["some calibration text", "and more"], tokenizer=build_char_tokenizer()
    )
    assert sorted(index for index, _ in ranking) == [0, 1, 2]
    with pytest.raises(ValueError, match="tokenizer"):
        rank_layers_by_importance(teacher, "text without a tokenizer")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(layers=[0, 6]), ValueError, "out of range"),
        (dict(layers=[-1, 2]), ValueError, "out of range"),
        (dict(layers=[1, 1, 2]), ValueError, "duplicate"),
        (dict(layers=[]), ValueError, "at least one"),
        (dict(layers=[0, 1.5]), TypeError, "integers"),
        (dict(layers=[0, 1], num_layers=3), ValueError, "disagrees"),
        (dict(layers=[0, 1], strategy="importance"), ValueError, "not both"),
        (dict(num_layers=7), ValueError, "more than the teacher's 6"),
        (dict(num_layers=0), ValueError, "positive integer"),
        (dict(), ValueError, "needs num_layers"),
        (dict(num_layers=3, strategy="random"), ValueError, "unknown pruning strategy"),
        (dict(num_layers=3, strategy="importance"), ValueError, "needs calibration data"),
        (dict(num_layers=3, calibration_input_ids=IDS), ValueError, "only used by strategy='importance'"),
        (dict(num_layers=3, hidden_size=16), ValueError, "does not use hidden_size"),
    ],
)
def test_pruned_bad_arguments(teacher, kwargs, error, match):
    with pytest.raises(error, match=match):
        build_student("pruned", teacher=teacher, **kwargs)


def test_build_student_method_errors(teacher):
    with pytest.raises(ValueError, match="unknown student method"):
        build_student("distilled", teacher=teacher)
    with pytest.raises(ValueError, match="needs checkpoint"):
        build_student("checkpoint")
    with pytest.raises(ValueError, match="does not use num_layers"):
        build_student("checkpoint", checkpoint="x", num_layers=2)
    with pytest.raises(ValueError, match="needs teacher"):
        build_student("pruned", num_layers=2)
    with pytest.raises(FileNotFoundError):
        build_student("checkpoint", checkpoint="./no/such/student")


def test_checkpoint_student_loads_folder(teacher, tmp_path):
    pruned = build_student("pruned", teacher=teacher, layers=[0, 5])
    pruned.save_pretrained(tmp_path / "student")
    student = build_student("checkpoint", checkpoint=tmp_path / "student")
    assert student.config.num_hidden_layers == 2 and student.config.kd_llm_teacher_layers == [0, 5]
    assert student.training and all(p.requires_grad for p in student.parameters())
    with torch.no_grad():
        torch.testing.assert_close(student.eval()(IDS).logits, pruned.eval()(IDS).logits)
