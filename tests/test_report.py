"""kd_llm.report: checks, ratios, measurements, plots and the model card, on tiny models and hand-built reports."""

import math
import re
import struct

import pytest
import torch
from huggingface_hub import ModelCard
from torch import nn

from kd_llm.data.formatting import format_prompt
from kd_llm.report import artifacts
from kd_llm.report.build import bpb_table, build_report, recovered_fraction
from kd_llm.report.checks import TeacherCheckError, check_teacher, difference_noise, negative_transfer
from kd_llm.report.measure import (BenchmarkSettings, cpu_probe_request, generate_fixed_length, measure_model,
                                   parameter_count, peak_memory_cpu, size_on_disk, time_generation,
                                   weight_bytes)
from kd_llm.report.model_card import render_model_card
from kd_llm.report.plots import loss_components, plot_categories, plot_losses, plot_temperature
from kd_llm.report.recipe import citation_keys, extra_terms, recipe_lines
from kd_llm.report.writer import render_markdown, write_report
from tests.conftest import tiny_llama

CATEGORIES = ("add", "sub", "weekday")


# ------------------------------------------------------------------------------------------------------------- checks

def test_teacher_check_stops_a_weak_teacher_with_the_ways_out():
    with pytest.raises(TeacherCheckError, match=r"below min_teacher_accuracy = 10.0%.*--force"):
        check_teacher(0.05, 0.0, min_teacher_accuracy=0.1, force=False)
    with pytest.raises(TeacherCheckError, match="no better than the untrained student"):
        check_teacher(0.5, 0.5, min_teacher_accuracy=0.1, force=False)
    forced = check_teacher(0.05, 0.2, min_teacher_accuracy=0.1, force=True)
    assert forced["forced"] and not forced["passed"] and len(forced["problems"]) == 2
    good = check_teacher(0.9, 0.0, min_teacher_accuracy=0.1, force=False)
    assert good["passed"] and not good["forced"] and good["problems"] == []


def test_run_check_is_skipped_with_a_reason_where_it_cannot_mean_anything():
    from types import SimpleNamespace

    from kd_llm.report.checks import check_run_teacher

    rows = [{"mean_category_exact_match": 0.0}, {"mean_category_exact_match": 0.0}]
    args = SimpleNamespace(distillation_mode="offline", evaluate_skills=True, min_teacher_accuracy=0.1, force=False,
                           teacher="t")
    with pytest.raises(TeacherCheckError):
        check_run_teacher(args, rows)
    assert check_run_teacher(SimpleNamespace(**{**vars(args), "force": True}), rows)["forced"]
    skipped = check_run_teacher(SimpleNamespace(**{**vars(args), "evaluate_skills": False}), rows)
    assert not skipped["ran"] and "evaluate_skills" in skipped["reason"]
    assert "ema" in check_run_teacher(SimpleNamespace(**{**vars(args), "distillation_mode": "ema"}), rows)["reason"]


def test_negative_transfer_verdict_and_its_noise_band():
    worse = negative_transfer(0.20, 0.30, 500)
    expected_noise = 1.96 * math.sqrt((0.2 * 0.8 + 0.3 * 0.7) / 500)  # two binomial variances
    assert worse["negative_transfer"] and worse["gap"] == pytest.approx(-0.10)
    assert worse["noise_95"] == pytest.approx(expected_noise) and worse["significant"]
    assert worse["verdict"].startswith("Negative transfer") and "larger than" in worse["verdict"]
    close = negative_transfer(0.29, 0.30, 50)
    assert close["negative_transfer"] and not close["significant"] and "within" in close["verdict"]
    better = negative_transfer(0.4, 0.3, 500)
    assert not better["negative_transfer"] and "better than" in better["verdict"]
    assert difference_noise(0.0, 0.0, 10) == 0.0


def test_recovered_fraction_identities():
    assert recovered_fraction(0.9, 0.3, 0.9) == pytest.approx(1.0)  # matches the teacher
    assert recovered_fraction(0.9, 0.3, 0.3) == pytest.approx(0.0)  # matches the baseline
    assert recovered_fraction(0.9, 0.3, 0.6) == pytest.approx(0.5)
    assert recovered_fraction(0.9, 0.3, 0.1) < 0  # worse than the baseline
    assert recovered_fraction(0.3, 0.3, 0.5) is None  # the teacher has no lead


# --------------------------------------------------------------------------------------------- hand-built reports

def skill(scores: dict, count: int = 300) -> dict:
    mean = sum(scores.values()) / len(scores)
    return {"exact_match": mean, "mean_category_exact_match": mean, "per_category": scores, "count": count,
            "examples": [{"prompt": "add:2023-05-17,45", "completion": "x>2023-07-01", "prediction": "2023-07-01",
                          "answer": "2023-07-01"}]}


def costs(parameters: int, tps1: float, tps16: float, memory: int) -> dict:
    return {"parameters": parameters, "size_on_disk": {"bytes": 4 * parameters, "files": 1, "how": "test"},
            "speed": {"batch_1": {"latency_seconds": 32 / tps1, "tokens_per_second": tps1},
                      "batch_16": {"latency_seconds": 16 * 32 / tps16, "tokens_per_second": tps16}},
            "memory": {"peak_bytes": memory, "method": "test"}}


def make_report(*, kd=0.6, baseline=0.4, teacher_spec="packaged:smollm2-135m-instruct", student_init="pruned",
                distillation=None, run=True):
    entries = [
        {"name": "teacher", "role": "teacher", "source": teacher_spec,
         "skill": skill(dict(zip(CATEGORIES, (0.9, 0.8, 1.0)))), **costs(1_000_000, 100.0, 800.0, 8_000_000)},
        {"name": "hard-label baseline", "role": "baseline", "source": "b",
         "skill": skill(dict.fromkeys(CATEGORIES, baseline)), **costs(250_000, 300.0, 3200.0, 2_000_000)},
        {"name": "distilled student", "role": "student", "source": "s",
         "skill": skill(dict.fromkeys(CATEGORIES, kd)), **costs(250_000, 320.0, 3000.0, 2_500_000)},
    ]
    run_info = {"teacher": teacher_spec, "steps": 100, "train_examples": 64, "transfer_examples": 0,
                "student_init": student_init, "student_teacher_layers": [0, 2] if student_init == "pruned" else None,
                "supervised_tokens": 2000,
                "distillation_settings": {"alpha": 0.5, "temperature": 4.0, "final_temperature": 1.0,
                                          "temperature_schedule": "cosine", "distillation_loss": "forward_kl",
                                          "beta": 0.5, "skew": 0.1, **(distillation or {})},
                "training": {"per_device_train_batch_size": 8, "gradient_accumulation_steps": 2, "world_size": 1,
                             "learning_rate": 1e-3, "lr_scheduler_type": "cosine", "warmup_steps": 5,
                             "weight_decay": 0.0, "seed": 0},
                "script_arguments": {"dataset": "date_arithmetic", "use_chat_template": True, "max_new_tokens": 48}}
    return build_report(entries, device="cpu", benchmark=BenchmarkSettings().to_dict() | {"new_tokens": 32},
                        eval_info={"task": "date_arithmetic", "count": 300},
                        teacher_check={"ran": True, "passed": True, "forced": False, "teacher_score": 0.9,
                                       "untrained_student_score": 0.0, "min_teacher_accuracy": 0.1, "problems": []},
                        run=run_info if run else None)


def test_report_ratios_against_hand_computed_values():
    report = make_report(kd=0.6, baseline=0.4)
    comparison = report["comparisons"][0]
    ratios = comparison["ratios"]
    assert ratios["parameters"] == pytest.approx(0.25) and comparison["teacher_student_size_ratio"] == pytest.approx(4)
    assert ratios["size_on_disk"] == pytest.approx(0.25)
    assert ratios["tokens_per_second_batch_1"] == pytest.approx(3.2)
    assert ratios["tokens_per_second_batch_16"] == pytest.approx(3000 / 800)
    assert ratios["peak_memory"] == pytest.approx(2.5 / 8)
    assert comparison["recovered_fraction"] == pytest.approx((0.6 - 0.4) / (0.9 - 0.4))
    assert comparison["negative_transfer"]["negative_transfer"] is False
    with pytest.raises(ValueError, match="exactly one teacher"):
        build_report(report["models"][1:], device="cpu", benchmark={"batch_size": 16}, eval_info={})


def test_markdown_says_negative_transfer_first_and_plainly():
    text = render_markdown(make_report(kd=0.3, baseline=0.5))
    summary = text.split("## Skill")[0]
    assert "**Negative transfer: the distilled student is worse than the hard-label baseline" in summary
    assert "teacher/student size ratio: 4×" in text
    assert "| distilled student | 30.0 | 30.0 | 30.0 | 30.0 | 30.0 |" in text
    assert "Negative transfer" not in render_markdown(make_report(kd=0.6, baseline=0.5)).split("## Skill")[0]


def test_recipe_names_schedule_extra_terms_and_citations():
    report = make_report(distillation={"distillation_loss": "jsd", "hidden_loss_weight": 0.5,
                                       "attention_loss_weight": 0.0, "layer_map": [0, 3]})
    run = report["run"]
    text = "\n".join(recipe_lines(run))
    assert "T from 4 to 1, cosine schedule" in text and "`jsd` (β = 0.5)" in text
    assert "kept" not in text and "keeping teacher layers [0, 2]" in text
    assert "`hidden_loss_weight` = 0.5" in text and "`layer_map` = [0, 3]" in text
    assert "attention_loss_weight" not in extra_terms(run["distillation_settings"])  # 0.0 changes nothing
    assert "1,600 examples seen" in text  # 100 steps × 8 × 2
    keys = citation_keys(run)
    assert keys[0] == "hinton2015distilling"
    assert {"agarwal2024onpolicy", "muralidharan2024compact", "romero2015fitnets", "jiao2020tinybert"} <= set(keys)


def test_recipe_says_when_batches_were_packed():
    packed = make_report(distillation={"packing": True, "packing_max_length": 512})["run"]
    assert "Batches packed without padding (rows of up to 512 tokens" in "\n".join(recipe_lines(packed))
    assert "packing" not in "\n".join(recipe_lines(make_report()["run"]))
    assert "stored teacher targets" not in "\n".join(recipe_lines(packed))


@pytest.mark.parametrize("cache, says", [
    ({"teacher_cache_format": "top_k", "teacher_cache_tail_mode": "tail_bucket"},
     "cache built before training (scripts/cache_teacher.py): the teacher's top-k distribution (tail: "
     "`tail_bucket`) at every supervised token"),
    ({"teacher_cache_format": "hidden_states"}, "the teacher's final hidden states (its exact distribution"),
])
def test_recipe_names_a_teacher_cache_and_its_packed_layout(cache, says):
    run = make_report(distillation={"packing": True, "teacher_cache": "outputs/cache", **cache})["run"]
    text = "\n".join(recipe_lines(run))
    assert says in text and "`teacher_cache`" not in text  # described, not listed as a further term
    assert "no attention across examples, the stored teacher targets laid into the rows example by example" in text


# ------------------------------------------------------------------------------------------------------ measuring

def eos_forever(vocab_size: int, eos: int):
    """A tiny Llama whose next token is always EOS (a biased head), to tell fixed-length timing from early stops."""
    model = tiny_llama(vocab_size)
    head = nn.Linear(model.config.hidden_size, vocab_size, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[eos] = 10.0
    model.lm_head = head
    model.config.tie_word_embeddings = False
    return model


def test_fixed_length_generation_ignores_eos_and_timing_counts_every_token(char_tokenizer):
    from kd_llm.evaluation.generation import generate_greedy

    model = eos_forever(len(char_tokenizer), char_tokenizer.eos_token_id)
    prompts = [char_tokenizer("wd:2021-01-01")["input_ids"], char_tokenizer("add:2023-05-17,45")["input_ids"]]
    natural = generate_greedy(model, char_tokenizer, prompts, max_new_tokens=8)
    assert natural.new_tokens == 2  # stops at once, one EOS each
    output = generate_fixed_length(model, prompts, new_tokens=8, pad_token_id=0,
                                   eos_token_id=char_tokenizer.eos_token_id)
    assert output.shape[1] == max(map(len, prompts)) + 8
    timing = time_generation(model, prompts, batch_size=3, new_tokens=8, repeats=2, pad_token_id=0,
                             eos_token_id=char_tokenizer.eos_token_id)
    assert timing["tokens_per_second"] == pytest.approx(3 * 8 / timing["latency_seconds"])
    low, high = timing["latency_range_seconds"]
    assert low <= timing["latency_seconds"] <= high


def test_parameters_and_size_on_disk_count_tied_weights_once(char_tokenizer, tmp_path):
    model = tiny_llama(len(char_tokenizer))
    assert model.config.tie_word_embeddings is False or model.lm_head.weight is model.model.embed_tokens.weight
    naive = sum(t.numel() for t in {id(p): p for _, p in model.named_parameters(remove_duplicate=False)}.values())
    assert parameter_count(model) == naive
    model.save_pretrained(tmp_path)
    on_disk = sum(f.stat().st_size for f in tmp_path.glob("*.safetensors"))
    assert size_on_disk(model, tmp_path) == {"bytes": on_disk, "files": 1, "how": "weight files of its folder"}
    copy = size_on_disk(model, None)  # no folder: measured on a saved copy
    assert copy["bytes"] == on_disk and copy["how"].startswith("safetensors copy")
    # float32: about 4 bytes per parameter plus the safetensors header
    assert 4 * naive <= on_disk < 4 * naive + 64_000


def test_cpu_peak_memory_grows_with_the_model(char_tokenizer, tmp_path):
    """One subprocess per model, run together: each must see at least its own weights, and the 4-layer, 384-wide
    model (about 24 MB of weights) must peak higher than the tiny one by most of the difference in weights."""
    prompts = [char_tokenizer("add:2023-05-17,45")["input_ids"]] * 4
    sizes = {"small": dict(hidden=32, layers=2), "large": dict(hidden=384, layers=4, heads=6, kv_heads=2)}
    requests, weights = [], []
    for name, shape in sizes.items():
        tiny_llama(len(char_tokenizer), **shape).save_pretrained(tmp_path / name)
        requests.append(cpu_probe_request(tmp_path / name, prompts, new_tokens=8, pad_token_id=0,
                                          eos_token_id=char_tokenizer.eos_token_id, dtype=torch.float32))
        weights.append(weight_bytes(tiny_llama(len(char_tokenizer), **shape)))
    small, large = peak_memory_cpu(requests)
    for result, own_weights in zip((small, large), weights):
        assert result["peak_bytes"] >= own_weights and result["working_bytes"] >= 0
        assert "VmHWM" in result["method"] and result["generated_tokens"] == 8
    assert weights[1] > 20e6
    assert large["peak_bytes"] - small["peak_bytes"] > 0.8 * (weights[1] - weights[0])


def test_measure_model_reports_both_batches(char_tokenizer):
    model = tiny_llama(len(char_tokenizer))
    prompts = [char_tokenizer("iso:March 5, 2021")["input_ids"]]
    result = measure_model(model, source=None, prompts=prompts, new_tokens=4, pad_token_id=0,
                           eos_token_id=char_tokenizer.eos_token_id,
                           settings=BenchmarkSettings(batch_size=4, repeats=1, measure_memory=False))
    assert set(result["speed"]) == {"batch_1", "batch_4"} and "memory" not in result
    assert result["speed"]["batch_4"]["batch_size"] == 4 and result["parameters"] == parameter_count(model)
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        BenchmarkSettings(batch_size=0)


# --------------------------------------------------------------------------------------------------------- plots

LOG = [
    {"step": 2, "loss": 2.0, "ce_loss": 3.0, "kd_loss": 1.0, "total_loss": 2.0, "hidden_loss": 0.5, "temperature": 4.0},
    {"step": 4, "eval_kd_loss": 0.9, "eval_loss": 1.9},
    {"step": 4, "loss": 1.5, "ce_loss": 2.5, "kd_loss": 0.5, "total_loss": 1.5, "hidden_loss": 0.4, "temperature": 2.0},
    {"step": 4, "train_runtime": 1.0, "train_loss": 1.7},
]


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_plots_cover_every_loss_component_and_are_real_pngs(tmp_path):
    assert loss_components(LOG) == ["ce_loss", "kd_loss", "total_loss", "hidden_loss"]
    losses = plot_losses(LOG, tmp_path / artifacts.LOSS_PLOT, baseline_log_history=[{"step": 2, "ce_loss": 3.1}])
    width, height = png_size(losses)
    assert width > 1000 and height > 600  # four panels on a 3-column grid: two rows
    assert png_size(plot_temperature(LOG, tmp_path / artifacts.TEMPERATURE_PLOT))[0] > 400
    assert plot_temperature([{"step": 1, "ce_loss": 1.0}], tmp_path / "none.png") is None
    assert plot_losses([], tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()
    report = make_report()
    assert png_size(plot_categories(report["models"], tmp_path / artifacts.CATEGORY_PLOT))[0] > 600


def test_write_report_writes_the_agreed_file_names(tmp_path):
    report = make_report()
    files = write_report(report, tmp_path, log_history=LOG)
    assert {f.relative_to(tmp_path).as_posix() for f in files} == {
        artifacts.REPORT_JSON, artifacts.REPORT_MARKDOWN, *artifacts.PLOTS}
    assert "![training losses](plots/training_losses.png)" in (tmp_path / artifacts.REPORT_MARKDOWN).read_text()
    assert set(artifacts.report_files(tmp_path)) == set(files)


# ---------------------------------------------------------------------------------------------------- model card

def test_card_parses_with_valid_metadata_and_model_index():
    card = ModelCard(str(render_model_card(make_report(), model_id="me/smol-student")), ignore_metadata_errors=False)
    data = card.data
    assert {"distillation", "kd_llm"} <= set(data.tags) and data.library_name == "transformers"
    assert data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct" and data.base_model_relation == "finetune"
    assert data.license == "apache-2.0" and data.pipeline_tag == "text-generation"
    results = {r.metric_name: r.metric_value for r in data.eval_results}
    assert results["exact match, mean over categories (%)"] == pytest.approx(60.0)
    assert results["exact match, weekday (%)"] == pytest.approx(60.0) and len(results) == 1 + len(CATEGORIES)
    assert all(r.task_type == "text-generation" and r.dataset_split == "eval" for r in data.eval_results)
    assert data.model_name == "smol-student"
    text = card.text
    assert 'model_id = "me/smol-student"' in text and "teacher/student size ratio: 4×" in text
    assert "@article{hinton2015distilling" in text and "muralidharan2024compact" in text
    assert "T from 4 to 1, cosine schedule" in text and "transformers 5." in text


def test_card_lineage_for_fresh_students_and_local_teachers():
    scaled = ModelCard(str(render_model_card(make_report(student_init="scaled"))))
    assert scaled.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert getattr(scaled.data, "base_model_relation", None) is None  # learned from outputs, not weights
    embedded = ModelCard(str(render_model_card(make_report(teacher_spec="embedded:date-teacher"))))
    assert embedded.data.base_model is None and embedded.data.license == "apache-2.0"
    local = ModelCard(str(render_model_card(make_report(teacher_spec="/no/such/teacher"))))
    assert local.data.base_model is None and local.data.license == "other"
    hub = ModelCard(str(render_model_card(make_report(teacher_spec="someorg/some-teacher", student_init="scaled"))))
    assert hub.data.base_model == "someorg/some-teacher"
    bare = ModelCard(str(render_model_card(make_report(run=False))))  # from checkpoints alone
    assert "Not recorded" in bare.text and bare.data.eval_results


def test_card_warns_about_negative_transfer():
    text = str(render_model_card(make_report(kd=0.3, baseline=0.5)))
    assert "> [!WARNING]" in text and "**Negative transfer**: this distilled student scores below" in text
    assert "[!WARNING]" not in str(render_model_card(make_report(kd=0.6, baseline=0.5)))


def test_card_never_carries_a_token():
    token = "hf_" + "a1B2" * 9
    with pytest.raises(ValueError, match="token"):
        render_model_card(make_report(teacher_spec=f"/models/{token}"))


def test_card_quick_start_runs_and_feeds_the_evaluation_prompt(char_tokenizer, tmp_path):
    folder = tmp_path / "student"
    tiny_llama(len(char_tokenizer)).save_pretrained(folder)
    char_tokenizer.save_pretrained(folder)
    text = str(render_model_card(make_report(), model_id=str(folder)))
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    namespace = {}
    exec(compile(code, "quick_start", "exec"), namespace)  # noqa: S102 - our own rendered snippet
    expected = format_prompt({"prompt": "add:2023-05-17,45"}, char_tokenizer, use_chat_template=True)
    assert namespace["inputs"]["input_ids"][0].tolist() == expected
    assert namespace["output"].shape[1] > len(expected)


def test_lora_students_are_measured_merged_from_a_copy(char_tokenizer, tmp_path):
    from kd_llm.models.peft_student import apply_lora, is_peft_model
    from kd_llm.report.run import as_deployed

    plain = tiny_llama(len(char_tokenizer))
    assert as_deployed(plain, tmp_path) == (plain, str(tmp_path))
    lora = apply_lora(tiny_llama(len(char_tokenizer)), {"r": 4, "target_modules": ["q_proj", "v_proj"]})
    with torch.no_grad():  # non-zero adapters, so that merging changes the weights
        for name, parameter in lora.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    merged, source = as_deployed(lora, tmp_path)
    assert source is None and not is_peft_model(merged) and is_peft_model(lora)
    ids = torch.tensor([char_tokenizer("add:2023-05-17,45")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, lora(ids).logits, atol=1e-4, rtol=1e-4)
    assert parameter_count(merged) < parameter_count(lora)  # the adapters are folded in


def test_without_a_baseline_the_report_and_card_say_so():
    full = make_report()
    report = build_report([m for m in full["models"] if m["role"] != "baseline"], device="cpu",
                          benchmark=full["benchmark"], eval_info=full["eval"], run=full["run"])
    comparison = report["comparisons"][0]
    assert comparison["recovered_fraction"] is None and comparison["negative_transfer"] is None
    assert "no hard-label baseline was measured" in render_markdown(report)
    card = ModelCard(str(render_model_card(report)), ignore_metadata_errors=False)
    assert "No hard-label baseline was measured" in card.text and "Teacher check: not run." in card.text


def with_bpb(report):
    for entry, value in zip(report["models"], (1.1, 1.9, 1.5)):
        entry["bits_per_byte"] = {"source": "debian-licenses", "bits_per_byte": value, "bytes": 4000,
                                  "tokens": 1000, "bytes_per_token": 4.0}
    return report


def test_report_and_model_card_show_bits_per_byte_for_every_model():
    report = with_bpb(make_report())
    table = bpb_table(report)
    assert "| teacher | 1.1000 |" in table and "| distilled student | 1.5000 |" in table
    assert "`debian-licenses` (4,000 bytes)" in table
    assert "## Bits per byte" in render_markdown(report)
    card = str(render_model_card(report, model_id="me/student"))
    assert "| hard-label baseline | 1.9000 |" in card
    ModelCard(card, ignore_metadata_errors=False)  # still a valid card
    assert bpb_table(make_report()) == "" and "Bits per byte" not in render_markdown(make_report())
    report = make_report()
    report["models"][0]["bits_per_byte"] = {"source": "debian-licenses", "skipped": "cannot spell the text"}
    assert bpb_table(report) == "Bits per byte: not measured (cannot spell the text)"
