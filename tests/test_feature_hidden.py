"""Hidden-state distillation pieces (kd_llm.features): layer maps and their errors, per-token losses against naive
references, projections (shapes, inits, save/load), and the distiller's masking and normalisation."""

import math

import pytest
import torch

from kd_llm.features import (
    PROJECTIONS_FILE,
    FeatureDistiller,
    HiddenStateProjections,
    LayerMapError,
    hidden_state_loss,
    resolve_layer_map,
)
from kd_llm.models.students import prune_layers
from tests.conftest import tiny_llama

# ---- layer maps ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("student, teacher", [(2, 4), (3, 4), (4, 30), (15, 30), (5, 5), (1, 7), (3, 5)])
def test_uniform_map_follows_the_formula(student, teacher):
    pairs = resolve_layer_map("uniform", student, teacher)
    # Independent rounding: half up via Fraction-free integer arithmetic, 2*(i+1)*L_t + L_s over 2*L_s.
    assert pairs == [(i, (2 * (i + 1) * teacher + student) // (2 * student) - 1) for i in range(student)]
    assert pairs[-1] == (student - 1, teacher - 1)
    teachers = [t for _, t in pairs]
    assert teachers == sorted(teachers) and len(set(teachers)) == len(teachers)


def test_uniform_map_examples():
    assert resolve_layer_map("uniform", 2, 4) == [(0, 1), (1, 3)]
    assert resolve_layer_map("uniform", 2, 5) == [(0, 2), (1, 4)]  # 2.5 rounds up to 3 -> layer 2


def test_last_explicit_and_negative_maps():
    assert resolve_layer_map("last", 3, 8) == [(2, 7)]
    assert resolve_layer_map(" 0:1, 2:7 ", 3, 8) == [(0, 1), (2, 7)]
    assert resolve_layer_map("-1:-1,0:0", 3, 8) == [(2, 7), (0, 0)]


def test_teacher_layers_map_of_a_pruned_student(char_tokenizer):
    teacher = tiny_llama(len(char_tokenizer), layers=5)
    student = prune_layers(teacher, [0, 2, 4])
    distiller = FeatureDistiller(student, teacher, hidden_weight=1.0, hidden_layer_map="teacher_layers")
    assert distiller.hidden_pairs == [(0, 0), (1, 2), (2, 4)]
    assert distiller.projections is not None and len(distiller.projections.layers) == 0  # same width: no projection


@pytest.mark.parametrize("spec, message", [
    ("0:4", r"teacher layer 4 is out of range \(the teacher has layers 0..3\)"),
    ("3:0", r"student layer 3 is out of range \(the student has layers 0..1\)"),
    ("-3:0", "student layer -3 is out of range"),
    ("0:1,0:1", r"names the pair\(s\) \[\(0, 1\)\] more than once"),
    ("0-1", "is not a 'student:teacher' pair of integers"),
    ("every", "is not a 'student:teacher' pair"),
    ("", "must be one of uniform, last, teacher_layers"),
    ("teacher_layers", "needs a student pruned from the teacher"),
])
def test_bad_layer_maps_are_refused(spec, message):
    with pytest.raises(LayerMapError, match=message):
        resolve_layer_map(spec, 2, 4, name="hidden_layer_map")


def test_teacher_layers_of_another_teacher_are_refused():
    with pytest.raises(LayerMapError, match="teacher layer 5 is out of range.*pruned from another model"):
        resolve_layer_map("teacher_layers", 2, 4, student_teacher_layers=[0, 5])
    with pytest.raises(LayerMapError, match="lists 3 layers but the student has 2"):
        resolve_layer_map("teacher_layers", 2, 4, student_teacher_layers=[0, 1, 2])


# ---- losses -------------------------------------------------------------------------------------------------------


def naive_loss(student, teacher, loss):
    out = []
    for s, t in zip(student.double().tolist(), teacher.double().tolist()):
        diff2 = sum((a - b) ** 2 for a, b in zip(s, t))
        if loss == "mse":
            out.append(diff2 / len(s))
        elif loss == "cosine":
            dot = sum(a * b for a, b in zip(s, t))
            out.append(1 - dot / math.sqrt(sum(a * a for a in s) * sum(b * b for b in t)))
        else:
            out.append(diff2 / sum(b * b for b in t))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("loss", ["mse", "cosine", "normalized_mse"])
def test_hidden_losses_match_naive_references(loss):
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(7, 5, generator=generator)
    teacher = torch.randn(7, 5, generator=generator) * torch.tensor([[1.0], [10.0], [0.1], [1], [1], [3], [1]])
    ours = hidden_state_loss(student.to(torch.bfloat16), teacher.to(torch.bfloat16), loss)
    assert ours.dtype == torch.float32 and ours.shape == (7,)
    torch.testing.assert_close(ours.double(), naive_loss(student.to(torch.bfloat16).float(),
                                                         teacher.to(torch.bfloat16).float(), loss),
                               rtol=1e-5, atol=1e-6)
    # Identities: equal states give 0; the scale invariances each loss promises.
    assert hidden_state_loss(teacher, teacher, loss).abs().max() < 1e-6
    if loss != "mse":
        torch.testing.assert_close(hidden_state_loss(3 * student, 3 * teacher, loss),
                                   hidden_state_loss(student, teacher, loss))


def test_unknown_hidden_loss_and_shape_mismatch_are_refused():
    with pytest.raises(ValueError, match="hidden_loss must be one of"):
        hidden_state_loss(torch.ones(2, 3), torch.ones(2, 3), "l1")
    with pytest.raises(ValueError, match="project the student first"):
        hidden_state_loss(torch.ones(2, 3), torch.ones(2, 4))


# ---- projections --------------------------------------------------------------------------------------------------


def test_projection_shapes_and_inits():
    pairs = [(0, 1), (1, 3)]
    xavier = HiddenStateProjections(pairs, 32, 48)
    assert sorted(xavier.layers) == ["student0_teacher1", "student1_teacher3"]
    for linear in xavier.layers.values():
        assert linear.weight.shape == (48, 32) and linear.bias is None
        bound = math.sqrt(6 / (32 + 48))
        assert linear.weight.abs().max() <= bound and linear.weight.std() > bound / 3
    assert xavier(torch.ones(5, 32), 1, 3).shape == (5, 48)
    zero = HiddenStateProjections(pairs, 32, 48, init="zero")
    assert all(linear.weight.abs().max() == 0 for linear in zero.layers.values())
    same = HiddenStateProjections(pairs, 32, 32)  # auto: equal widths need no projection
    ones = torch.ones(2, 32)
    assert len(same.layers) == 0 and same(ones, 0, 1) is ones
    identity = HiddenStateProjections(pairs, 32, 32, mode="always", init="identity")
    x = torch.randn(4, 32)
    torch.testing.assert_close(identity(x, 0, 1), x)
    with pytest.raises(ValueError, match="identity needs equal widths.*32 wide and the teacher 48"):
        HiddenStateProjections(pairs, 32, 48, init="identity")


def test_projections_save_and_load(tmp_path):
    saved = HiddenStateProjections([(0, 1)], 8, 12)
    saved.save(tmp_path)
    assert (tmp_path / PROJECTIONS_FILE).is_file()
    restored = HiddenStateProjections([(0, 1)], 8, 12, init="zero")
    restored.load(tmp_path)
    torch.testing.assert_close(restored.layers["student0_teacher1"].weight, saved.layers["student0_teacher1"].weight)
    with pytest.raises(ValueError, match="another layer map"):
        HiddenStateProjections([(0, 2)], 8, 12).load(tmp_path)
    with pytest.raises(FileNotFoundError, match="distillation_projections.safetensors is missing"):
        HiddenStateProjections([(0, 1)], 8, 12).load(tmp_path / "elsewhere")


# ---- the distiller: masking and normalisation -------------------------------------------------------------------


def test_hidden_term_counts_valid_tokens_only_against_a_naive_reference(char_tokenizer):
    teacher = tiny_llama(len(char_tokenizer), hidden=48, layers=4, seed=1)
    student = tiny_llama(len(char_tokenizer), hidden=32, layers=2, seed=2)
    distiller = FeatureDistiller(student, teacher, hidden_weight=1.0, hidden_loss="normalized_mse")
    assert distiller.hidden_pairs == [(0, 1), (1, 3)]
    input_ids = torch.randint(3, 80, (2, 6), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    with distiller.capture(student, "student") as s_features:
        student(input_ids=input_ids, attention_mask=attention_mask)
    with distiller.capture(teacher, "teacher") as t_features, torch.no_grad():
        teacher_hidden = teacher(input_ids=input_ids, attention_mask=attention_mask,
                                 output_hidden_states=True).hidden_states
    # The hooks see what output_hidden_states reports for intermediate layers (index i + 1 is layer i's output).
    torch.testing.assert_close(t_features.hidden[1], teacher_hidden[2])
    terms = distiller.terms(s_features, t_features, attention_mask, normaliser=20.0, expect_grad=True)
    reference = 0.0
    for s, t in distiller.hidden_pairs:
        projection = distiller.projections.layers[f"student{s}_teacher{t}"].weight.detach().double()
        for b in range(2):
            for i in range(6):
                if attention_mask[b, i]:
                    predicted = projection @ s_features.hidden[s][b, i].detach().double()
                    target = t_features.hidden[t][b, i].double()
                    reference += ((predicted - target).square().sum() / target.square().sum()).item()
    assert terms.hidden.item() == pytest.approx(reference / 2 / 20.0, rel=1e-5)
    # Padding changes nothing: garbage in the padded positions of the captured states leaves the term as it is.
    t_features.hidden[3][1, 4:] += 100.0
    again = distiller.terms(s_features, t_features, attention_mask, normaliser=20.0)
    assert again.hidden.item() == pytest.approx(terms.hidden.item(), rel=1e-6)
