"""On-policy (lmbda) and sequence-level (seq_kd) distillation: the generated batches, the generation itself, and the
trainer end to end on tiny models.

References are written here independently: a one-prompt-at-a-time greedy loop with full forward passes (no padding,
no KV cache), the prompt as ``format_prompt`` renders it, and the forward KL computed in float64 by hand.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kd_llm import DistillationTrainer
from kd_llm.data.collator import CausalLMCollator
from kd_llm.data.formatting import format_prompt
from kd_llm.data.sources import load_records
from kd_llm.models.char_tokenizer import build_char_tokenizer
from kd_llm.training.on_policy import (
    COMPLETION_SOURCE_KEY,
    STUDENT,
    TEACHER,
    build_completion_batch,
    cut_after_eos,
    generate_completions,
    generation_seed,
    is_on_policy,
    prompts_from_labels,
)
from tests.conftest import tiny_llama
from tests.conftest import tiny_distillation_config as make_config
from tests.helpers.training import max_difference, params


def pad_is_eos_tokenizer():
    tokenizer = build_char_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    return tokenizer


def eos_biased(model, eos_id: int, bias: float = 3.0):
    """``model`` with a bias towards EOS on its output layer: sampled completions end at different lengths."""
    old = model.lm_head
    head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(old.weight)
        head.bias.zero_()
        head.bias[eos_id] = bias
    model.lm_head = head
    return model


@torch.no_grad()
def reference_greedy(model, prompt: list[int], max_new_tokens: int, eos_id: int) -> list[int]:
    sequence, new = list(prompt), []
    for _ in range(max_new_tokens):
        token = int(torch.argmax(model(torch.tensor([sequence])).logits[0, -1]))
        new.append(token)
        sequence.append(token)
        if token == eos_id:
            break
    return new


def make_trainer(tmp_path, tokenizer, dataset, *, teacher=None, student=None, **overrides):
    teacher = teacher if teacher is not None else tiny_llama(len(tokenizer), hidden=48, seed=1)
    student = student if student is not None else tiny_llama(len(tokenizer), seed=2)
    overrides.setdefault("generation_max_new_tokens", 24)
    return DistillationTrainer(model=student, teacher_model=teacher, args=make_config(tmp_path, **overrides),
                               train_dataset=dataset, processing_class=tokenizer)


def spy_on_generation(trainer) -> list[tuple[int, list[dict], list[dict]]]:
    """Record (step, original micro-batches, micro-batches used for training) at every optimizer step."""
    calls = []
    original = trainer.completion_generator.replace

    def replace(batches, **kwargs):
        before = [copy.deepcopy(b) for b in batches]
        after = original(batches, **kwargs)
        calls.append((kwargs["step"], before, [copy.deepcopy(b) for b in after]))
        return after

    trainer.completion_generator.replace = replace
    return calls


def rows(batch) -> list[tuple[list[int], list[int]]]:
    """Each row's (prompt, supervised completion) with padding stripped, from labels and the attention mask."""
    out = []
    for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
        n = int(mask.sum())
        start = int((labels != -100).nonzero()[0, 0])
        assert (labels[:start] == -100).all() and (labels[start:n] != -100).all() and (labels[n:] == -100).all()
        assert labels[start:n].tolist() == ids[start:n].tolist()
        out.append((ids[:start].tolist(), ids[start:n].tolist()))
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Building the generated batch
# ----------------------------------------------------------------------------------------------------------------------


def test_prompts_from_labels_are_the_rendered_prompts(char_tokenizer):
    records = load_records("date_arithmetic", size=6, seed=3)
    from kd_llm.data.sources import build_dataset

    dataset = build_dataset(records, char_tokenizer)
    batch = CausalLMCollator(char_tokenizer.pad_token_id)([dataset[i] for i in range(6)])
    assert prompts_from_labels(batch["input_ids"], batch["labels"]) == [format_prompt(r, char_tokenizer)
                                                                          for r in records]


def test_rows_without_a_prompt_are_refused():
    input_ids = torch.tensor([[5, 6, 7], [5, 6, 7]])
    with pytest.raises(ValueError, match="supervised from its first token"):
        prompts_from_labels(input_ids, torch.tensor([[-100, 6, 7], [5, 6, 7]]))
    with pytest.raises(ValueError, match="no supervised label"):
        prompts_from_labels(input_ids, torch.tensor([[-100, 6, 7], [-100, -100, -100]]))


def test_cut_after_eos():
    assert cut_after_eos([5, 6, 2, 2, 2], [2]) == [5, 6, 2]
    assert cut_after_eos([2, 5], [2]) == [2]
    assert cut_after_eos([5, 6, 7], [2]) == [5, 6, 7]  # ran out of budget: no EOS invented
    assert cut_after_eos([5, 9, 6, 2], [2, 9]) == [5, 9]


def test_generated_batch_masks_the_prompt_and_supervises_the_eos_when_pad_is_eos():
    eos = pad = 2
    prompts = [[1, 10, 11], [1, 12], [1, 13, 14, 15]]
    completions = [[20, 21, eos], [eos], [22, 23, 24, 25]]  # the last ran out of budget
    batch = build_completion_batch(prompts, completions, pad, STUDENT)
    assert batch[COMPLETION_SOURCE_KEY] == STUDENT
    assert batch["input_ids"].shape == (3, 8)
    assert batch["input_ids"][0].tolist() == [1, 10, 11, 20, 21, eos, pad, pad]
    assert batch["labels"][0].tolist() == [-100, -100, -100, 20, 21, eos, -100, -100]
    assert batch["labels"][1].tolist() == [-100, -100, eos] + [-100] * 5
    assert batch["labels"][2].tolist() == [-100] * 4 + [22, 23, 24, 25]
    assert batch["attention_mask"].sum(1).tolist() == [6, 3, 8]
    assert rows(batch) == list(zip(prompts, completions))


# ----------------------------------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------------------------------


def test_greedy_generation_equals_one_prompt_at_a_time(char_tokenizer):
    model = tiny_llama(len(char_tokenizer), seed=4)
    prompts = [format_prompt(r, char_tokenizer) for r in load_records("date_arithmetic", size=6, seed=5)]
    assert len({len(p) for p in prompts}) > 1  # left padding is exercised
    eos = char_tokenizer.eos_token_id
    got = generate_completions(model, prompts, pad_token_id=char_tokenizer.pad_token_id, eos_ids=[eos],
                               max_new_tokens=10, do_sample=False)
    assert got == [reference_greedy(model, p, 10, eos) for p in prompts]
    assert model.training  # the mode is restored


def test_sampling_is_seeded_leaves_the_global_rng_alone_and_ends_rows_at_their_eos():
    tokenizer = pad_is_eos_tokenizer()
    eos = tokenizer.eos_token_id
    model = eos_biased(tiny_llama(len(tokenizer), seed=4), eos)
    prompts = [format_prompt(r, tokenizer) for r in load_records("date_arithmetic", size=16, seed=5)]
    sample = lambda seed: generate_completions(model, prompts, pad_token_id=eos, eos_ids=[eos],  # noqa: E731
                                               max_new_tokens=12, do_sample=True, temperature=1.0, seed=seed)
    torch.manual_seed(123)
    first = sample(7)
    after_generation = torch.rand(3)
    torch.manual_seed(123)
    expected = torch.rand(3)
    assert torch.equal(after_generation, expected)
    assert sample(7) == first and sample(8) != first
    lengths = {len(c) for c in first}
    assert len(lengths) > 1
    for completion in first:
        assert eos not in completion[:-1]  # cut after the first EOS
        assert completion[-1] == eos or len(completion) == 12


def test_sampling_draws_from_the_untruncated_tempered_softmax():
    # 89 tokens at temperature 3: transformers' global default top_k=50 would drop 30% of the mass, and sampling at
    # temperature 1 would be far off too, so both mistakes fail the comparison below.
    tokenizer = build_char_tokenizer()
    model = tiny_llama(len(tokenizer), seed=6)
    with torch.no_grad():
        model.lm_head.weight.mul_(10)
    prompt = format_prompt({"prompt": "a"}, tokenizer)
    temperature, draws = 3.0, 16000
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, -1].double()
    expected = torch.softmax(logits / temperature, -1)
    assert expected.sort(descending=True).values[50:].sum() > 0.25
    assert 0.5 * (expected - torch.softmax(logits, -1)).abs().sum() > 0.25
    samples = generate_completions(model, [prompt] * draws, pad_token_id=0, eos_ids=[2], max_new_tokens=1,
                                   do_sample=True, temperature=temperature, seed=0)
    counts = torch.bincount(torch.tensor([s[0] for s in samples]), minlength=len(tokenizer)).double()
    total_variation = 0.5 * (counts / draws - expected).abs().sum().item()
    assert total_variation < 0.06, total_variation  # sampling noise alone: about 0.03


def test_generation_never_samples_past_the_shared_vocabulary(char_tokenizer):
    model = tiny_llama(96, seed=6)  # an embedding padded past the tokenizer's 89 tokens
    with torch.no_grad():
        model.lm_head.weight[89:] = model.lm_head.weight[:7] * 50  # spare rows that would win every draw
    prompts = [format_prompt({"prompt": "add:2020-01-01,3"}, char_tokenizer)] * 64
    unrestricted = generate_completions(model, prompts, pad_token_id=0, eos_ids=[2], max_new_tokens=4, do_sample=True,
                                        seed=0)
    assert any(t >= 89 for c in unrestricted for t in c)
    restricted = generate_completions(model, prompts, pad_token_id=0, eos_ids=[2], max_new_tokens=4, do_sample=True,
                                      seed=0, vocab_size=89)
    assert all(t < 89 for c in restricted for t in c)


def test_on_policy_draw_is_a_seeded_bernoulli_of_step_and_micro_batch():
    torch.manual_seed(0)
    draws = [is_on_policy(11, step, micro, 0.3) for step in range(1000) for micro in range(2)]
    torch.manual_seed(1)  # the global RNG plays no part
    assert draws == [is_on_policy(11, step, micro, 0.3) for step in range(1000) for micro in range(2)]
    assert sum(draws) / len(draws) == pytest.approx(0.3, abs=0.04)
    assert draws != [is_on_policy(12, step, micro, 0.3) for step in range(1000) for micro in range(2)]
    assert not any(is_on_policy(11, s, 0, 0.0) for s in range(200))
    assert all(is_on_policy(11, s, 0, 1.0) for s in range(200))
    assert len({generation_seed(0, s, m, p, r) for s in range(3) for m in range(2) for p in range(2)
                for r in (STUDENT, TEACHER)}) == 24


# ----------------------------------------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------------------------------------


def test_lmbda_zero_and_a_never_drawn_lmbda_train_exactly_like_the_plain_trainer(tmp_path, char_tokenizer,
                                                                                   date_dataset):
    plain = make_trainer(tmp_path / "plain", char_tokenizer, date_dataset)
    assert plain.completion_generator is None
    plain.train()
    # lmbda=1e-9 runs through the generation path every step, but draws no on-policy batch in 3 steps.
    never = make_trainer(tmp_path / "never", char_tokenizer, date_dataset, lmbda=1e-9)
    assert never.completion_generator is not None
    never.train()
    assert max_difference(params(plain.model), params(never.model)) == 0.0
    logged = [e for e in never.state.log_history if "on_policy_fraction" in e]
    assert len(logged) == 3 and all(e["on_policy_fraction"] == 0 and e["generated_tokens"] == 0 for e in logged)


def test_lmbda_one_trains_on_student_samples_scored_by_the_frozen_teacher(tmp_path, char_tokenizer, date_dataset):
    teacher = tiny_llama(len(char_tokenizer), hidden=48, seed=1)
    student = tiny_llama(len(char_tokenizer), seed=2)
    initial_student = copy.deepcopy(student)
    teacher_before, student_before = params(teacher), params(student)
    trainer = make_trainer(tmp_path, char_tokenizer, date_dataset, teacher=teacher, student=student, lmbda=1.0,
                           gradient_accumulation_steps=2, per_device_train_batch_size=4)
    calls = spy_on_generation(trainer)
    trainer.train()

    assert [step for step, _, _ in calls] == [0, 1, 2]
    for _, before, after in calls:
        assert len(after) == 2
        for original, generated in zip(before, after):
            assert generated[COMPLETION_SOURCE_KEY] == STUDENT
            assert "kd_example_index" not in generated
            new_rows, old_rows = rows(generated), rows(original)
            assert [p for p, _ in new_rows] == [p for p, _ in old_rows]  # same prompts, kept and masked
            assert [c for _, c in new_rows] != [c for _, c in old_rows]  # new completions
    # The first step's completions are the untrained student's samples under the documented seed.
    pad = char_tokenizer.pad_token_id
    for micro, generated in enumerate(calls[0][2]):
        prompts = [p for p, _ in rows(generated)]
        expected = generate_completions(initial_student, prompts, pad_token_id=pad,
                                        eos_ids=[char_tokenizer.eos_token_id], max_new_tokens=24, do_sample=True,
                                        temperature=1.0, seed=generation_seed(0, 0, micro, 0, STUDENT),
                                        vocab_size=len(char_tokenizer))
        assert [c for _, c in rows(generated)] == expected

    assert max_difference(params(student), student_before) > 1e-4
    assert max_difference(params(teacher), teacher_before) == 0.0
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters()) and not teacher.training
    logged = [e for e in trainer.state.log_history if "generation_seconds" in e]
    assert len(logged) == 3
    for entry, (_, _, after) in zip(logged, calls):
        assert entry["on_policy_fraction"] == 1.0 and entry["seq_kd_fraction"] == 0.0
        assert entry["generation_seconds"] > 0 and entry["generated_tokens_per_second"] > 0
        # every generated token is supervised, so the logged count is the supervised-label count
        assert entry["generated_tokens"] == sum(int((b["labels"] != -100).sum()) for b in after)
        assert entry["ce_loss"] == 0.0 and entry["kd_loss"] > 0  # no cross-entropy on the student's own tokens
        assert entry["total_loss"] == pytest.approx(0.5 * entry["kd_loss"], rel=1e-4)  # KD keeps its 1 - alpha


def test_on_policy_loss_is_the_teachers_divergence_on_the_generated_tokens(tmp_path, char_tokenizer, date_dataset):
    trainer = make_trainer(tmp_path, char_tokenizer, date_dataset, lmbda=1.0, alpha=0.5, temperature=2.0)
    batch = trainer.data_collator([date_dataset[i] for i in range(6)])
    [generated] = trainer.completion_generator.replace([batch], step=0, student=trainer.model,
                                                       teacher=trainer.teacher)
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, dict(generated), num_items_in_batch=None)

    with torch.no_grad():
        mask = generated["attention_mask"]
        student = trainer.model(input_ids=generated["input_ids"], attention_mask=mask).logits[:, :-1].double()
        teacher = trainer.teacher(input_ids=generated["input_ids"], attention_mask=mask).logits[:, :-1].double()
    valid = generated["labels"][:, 1:] != -100
    p_log = F.log_softmax(teacher[valid] / 2.0, -1)
    q_log = F.log_softmax(student[valid] / 2.0, -1)
    forward_kl = (p_log.exp() * (p_log - q_log)).sum(-1)
    expected = (1 - 0.5) * 4.0 * forward_kl.sum() / valid.sum()  # (1 - alpha) T^2 KL, and no CE term
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)


def test_eos_stays_supervised_in_on_policy_batches_when_pad_is_eos(tmp_path, date_dataset):
    tokenizer = pad_is_eos_tokenizer()
    eos = tokenizer.eos_token_id
    student = eos_biased(tiny_llama(len(tokenizer), seed=2), eos)
    trainer = make_trainer(tmp_path, tokenizer, date_dataset, student=student, lmbda=1.0, max_steps=1)
    calls = spy_on_generation(trainer)
    trainer.train()
    [(_, _, [generated])] = calls
    completions = [c for _, c in rows(generated)]
    assert sum(c[-1] == eos for c in completions) >= 2 and len({len(c) for c in completions}) > 1
    for row, completion in enumerate(completions):
        n = int(generated["attention_mask"][row].sum())
        if completion[-1] == eos:
            assert generated["labels"][row, n - 1] == eos  # the final EOS is a target ...
        assert (generated["input_ids"][row, n:] == eos).all()  # ... though the padding after it is the same id
        assert (generated["labels"][row, n:] == -100).all()


def test_seq_kd_targets_are_the_teachers_greedy_generation_and_are_reused(tmp_path, char_tokenizer, date_dataset):
    teacher = eos_biased(tiny_llama(len(char_tokenizer), hidden=48, seed=1), char_tokenizer.eos_token_id, bias=1.0)
    # 48 examples in batches of 8: steps 0-5 are the first epoch, 6-7 see the same prompts again.
    trainer = make_trainer(tmp_path, char_tokenizer, date_dataset, teacher=teacher, seq_kd=True, max_steps=8,
                           generation_max_new_tokens=16)
    calls = spy_on_generation(trainer)
    trainer.train()
    eos = char_tokenizer.eos_token_id
    for _, before, [generated] in calls:
        assert generated[COMPLETION_SOURCE_KEY] == TEACHER
        assert [p for p, _ in rows(generated)] == [p for p, _ in rows(before[0])]
        for prompt, completion in rows(generated):
            assert completion == reference_greedy(teacher, prompt, 16, eos)
    logged = [e for e in trainer.state.log_history if "seq_kd_fraction" in e]
    assert all(e["seq_kd_fraction"] == 1.0 and e["ce_loss"] > 0 and e["kd_loss"] > 0 for e in logged)
    assert all(e["generated_tokens"] > 0 for e in logged[:6])
    assert all(e["generated_tokens"] == 0 for e in logged[6:])  # second epoch: greedy targets already written


def test_resume_reproduces_the_on_policy_choices_and_samples(tmp_path, char_tokenizer, date_dataset):
    settings = dict(lmbda=0.5, max_steps=6, per_device_train_batch_size=4, generation_max_new_tokens=12)
    full = make_trainer(tmp_path / "full", char_tokenizer, date_dataset, **settings)
    full.train()
    fractions = [e["on_policy_fraction"] for e in full.state.log_history if "on_policy_fraction" in e]
    assert 0 < sum(fractions) < 6  # both kinds of batch occur
    make_trainer(tmp_path / "stopped", char_tokenizer, date_dataset, save_strategy="steps", save_steps=3,
                 **settings).train()
    resumed = make_trainer(tmp_path / "resumed", char_tokenizer, date_dataset, **settings)
    resumed.train(resume_from_checkpoint=str(tmp_path / "stopped" / "run" / "checkpoint-3"))
    assert max_difference(params(full.model), params(resumed.model)) < 1e-6


def test_cached_teacher_serves_dataset_batches_and_the_live_teacher_generated_ones(tmp_path, char_tokenizer,
                                                                                  date_dataset):
    # Both on the dense loss path (the cache never takes the fused one), so only the teacher's source differs.
    live = make_trainer(tmp_path / "live", char_tokenizer, date_dataset, lmbda=0.5, max_steps=4, fused_loss="false")
    live.train()
    cached = make_trainer(tmp_path / "cached", char_tokenizer, date_dataset, lmbda=0.5, max_steps=4,
                          precompute_teacher_logits=True, fused_loss="false")
    assert cached.teacher_logits is not None
    cached.train()
    assert max_difference(params(live.model), params(cached.model)) < 1e-5


@pytest.mark.parametrize("overrides, message", [
    (dict(lmbda=1.5), r"lmbda must be in \[0, 1\]"),
    (dict(lmbda=-0.1), r"lmbda must be in \[0, 1\]"),
    (dict(generation_max_new_tokens=0), "generation_max_new_tokens must be >= 1"),
    (dict(generation_temperature=0.0), "generation_temperature must be > 0"),
    (dict(seq_kd_decoding="beam"), "seq_kd_decoding must be greedy or sample"),
    (dict(lmbda=0.5, alpha=1.0), r"needs a distillation term \(alpha < 1\)"),
    (dict(seq_kd=True, precompute_teacher_logits=True), "seq_kd replaces in every batch"),
    (dict(lmbda=1.0, precompute_teacher_logits=True), "lmbda=1 replaces in every batch"),
])
def test_bad_on_policy_settings_are_refused(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        make_config(tmp_path, **overrides)


def test_generation_without_a_live_teacher_is_refused(tmp_path, char_tokenizer, date_dataset):
    with pytest.raises(ValueError, match="only a live teacher can score or write"):
        DistillationTrainer(model=tiny_llama(len(char_tokenizer)), args=make_config(tmp_path, alpha=1.0, seq_kd=True),
                            train_dataset=date_dataset, processing_class=char_tokenizer)


@pytest.mark.slow  # ~30 s on 2 busy cores: the script's whole pipeline (baseline, KD run, run report)
def test_example_config_runs_the_script_with_a_hard_label_baseline(tmp_path, tiny_teacher_dir):
    from tests.helpers.scripts import FAST, distill_llm

    teacher_dir = tiny_teacher_dir
    config = Path(__file__).resolve().parent.parent / "configs" / "date_on_policy.yaml"
    results = distill_llm.main(["--config", str(config), "--teacher", str(teacher_dir),
                                "--output_dir", str(tmp_path / "out"), *FAST, "--generation_max_new_tokens", "16",
                                "--lmbda", "0.5", "--evaluate_skills", "false"])
    names = [row["model"] for row in results["models"]]
    assert "student, hard labels only" in names and "student, distilled (KD)" in names  # baseline: lmbda, seq_kd off
    assert results["distillation"]["lmbda"] == 0.5 and results["distillation"]["generation_max_new_tokens"] == 16
    generation = results["training_generation"]
    assert generation["micro_batches"] == 4 and 0 < generation["on_policy_batches"] < 4
    assert generation["generated_tokens"] > 0 and generation["generation_seconds"] > 0
