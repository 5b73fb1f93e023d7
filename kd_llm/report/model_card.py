"""The distilled student's model card (``README.md``), rendered from a report with ``huggingface_hub.ModelCard``.

The template is ``model_cards/distilled_student.md.jinja``. The YAML metadata is built as a
``huggingface_hub.ModelCardData`` (so it is valid by construction): the teacher as ``base_model`` when it is a Hub
model, ``datasets`` when the training data is a Hub dataset, the ``distillation`` and ``kd_llm`` tags, license and a
``model-index`` with the student's exact match per category. Nothing secret is ever passed to the template: it only
sees the report, and :func:`render_model_card` refuses a card that contains a Hugging Face token.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from kd_llm.report import artifacts
from kd_llm.report.build import bpb_table, comparison_lines, cost_table, skill_table
from kd_llm.report.checks import SCORE_KEY
from kd_llm.report.recipe import CITATIONS, citation_keys, recipe_lines
from kd_llm.report.writer import measurement_notes, summary, teacher_check_lines

TEMPLATE = Path(__file__).resolve().parents[2] / "model_cards" / "distilled_student.md.jinja"
# Teachers kd_llm can name on the Hub: spec -> (Hub id of the model the weights come from, its license).
KNOWN_TEACHERS = {
    "packaged:smollm2-135m-instruct": ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0"),
    "packaged:gemma3-270m": ("google/gemma-3-270m", "gemma"),
    "embedded:date-teacher": (None, "apache-2.0"),  # ships inside kd_llm (Apache-2.0); not on the Hub
}
GENERATED_DATASETS = {"date_arithmetic"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+$")
_TOKEN = re.compile(r"hf_[A-Za-z0-9]{30,}")


def hub_id(spec: str | None) -> str | None:
    """``spec`` when it names a Hub repository (``org/name`` and no such local path), else None."""
    if not spec or spec.startswith(("packaged:", "embedded:")) or not _HUB_ID.match(spec):
        return None
    return None if Path(spec).expanduser().exists() else spec


def teacher_lineage(teacher: str, student_init: str | None) -> tuple[str | None, str | None, str | None]:
    """(base_model, base_model_relation, license) for the card. The relation is ``finetune`` only when the student's
    weights start from the teacher's (``pruned``); a student built fresh (``scaled``) learned from the teacher's
    outputs, not its weights, and the Hub has no relation for that, so none is claimed."""
    base, license_ = KNOWN_TEACHERS.get(teacher, (hub_id(teacher), None))
    relation = "finetune" if base and student_init == "pruned" else None
    return base, relation, license_


def _student(report: dict) -> dict:
    students = [m for m in report["models"] if m["role"] == "student"]
    return students[0]


def eval_results(report: dict, *, dataset_type: str, dataset_name: str) -> list[EvalResult]:
    """The student's exact match (%) as model-index results: the mean over categories, then each category."""
    skill = _student(report).get("skill")
    if not skill:
        return []
    common = dict(task_type="text-generation", task_name="Text Generation", dataset_type=dataset_type,
                  dataset_name=dataset_name, dataset_split="eval", metric_type="exact_match")
    results = [EvalResult(metric_name="exact match, mean over categories (%)",
                          metric_value=round(100 * skill[SCORE_KEY], 2), **common)]
    for category, value in sorted(skill.get("per_category", {}).items()):
        results.append(EvalResult(metric_name=f"exact match, {category} (%)", metric_value=round(100 * value, 2),
                                  **common))
    return results


def card_data(report: dict, *, model_name: str, license: str | None = None) -> ModelCardData:
    run = report.get("run") or {}
    arguments = run.get("script_arguments") or {}
    teacher = run.get("teacher") or next(m["source"] for m in report["models"] if m["role"] == "teacher")
    base, relation, teacher_license = teacher_lineage(teacher, run.get("student_init"))
    task = report["eval"].get("task", "skill")
    dataset = hub_id(arguments.get("dataset") or task)
    extra = {"base_model_relation": relation} if relation else {}
    tags = ["distillation", "kd_llm", "knowledge-distillation"]
    if task in GENERATED_DATASETS:
        tags.append(task.replace("_", "-"))
    license_ = license or teacher_license or "other"
    if license_ == "other":
        extra["license_name"] = "same-as-teacher"  # the card's text says so; no licence is claimed for it
    return ModelCardData(
        model_name=model_name, base_model=base, datasets=[dataset] if dataset else None, tags=tags,
        library_name="transformers", pipeline_tag="text-generation", license=license_,
        eval_results=eval_results(report, dataset_type=dataset or task,
                                  dataset_name=f"{task} (held-out eval split, {report['eval'].get('count')} problems)")
        or None,
        **extra,
    )


def render_model_card(report: dict, *, model_id: str | None = None, license: str | None = None,
                      template: str | Path = TEMPLATE) -> ModelCard:
    """The card for the first student of ``report``. ``model_id``: the Hub repo id (or folder) used in the
    quick-start snippet and as the model name; defaults to a placeholder path."""
    template = Path(template)
    if not template.is_file():
        raise FileNotFoundError(f"Model card template {template} is missing; it ships in the kd_llm source tree "
                                "(model_cards/). Install kd_llm from a checkout with `pip install -e .`.")
    run = report.get("run") or {}
    arguments = run.get("script_arguments") or {}
    student = _student(report)
    examples = (student.get("skill") or {}).get("examples") or []
    name = model_id or "path/to/distilled-student"
    comparison = report["comparisons"][0]
    card = ModelCard.from_template(
        card_data(report, model_name=name.rsplit("/", 1)[-1], license=license),
        template_path=str(template),
        model_id=name,
        title=name.rsplit("/", 1)[-1],
        teacher=run.get("teacher") or next(m["source"] for m in report["models"] if m["role"] == "teacher"),
        student=student,
        summary=summary(report),
        comparison=comparison,
        negative_transfer=comparison["negative_transfer"],
        skill_table=skill_table(report),
        bpb_table=bpb_table(report),
        cost_table=cost_table(report),
        comparison_lines="\n".join(comparison_lines(report)).strip(),
        teacher_check="\n".join(teacher_check_lines(report.get("teacher_check"))),
        recipe="\n".join(recipe_lines(run)) if run else "Not recorded (the card was written from checkpoints "
                                                      "alone, without the run's results.json).",
        measurement_notes="\n".join(measurement_notes(report)),
        plots=report.get("plots", []),
        example=examples[0] if examples else None,
        use_chat_template=arguments.get("use_chat_template", True),
        max_new_tokens=arguments.get("max_new_tokens", 64),
        eval=report["eval"],
        framework_versions=report["environment"]["framework_versions"],
        citations=[CITATIONS[key] for key in citation_keys(run)],
    )
    if _TOKEN.search(str(card)):
        raise ValueError("The rendered model card contains what looks like a Hugging Face token; refusing to write "
                         "it. Remove the token from the run's settings.")
    return card


def write_model_card(output_dir: str | Path, *, model_id: str | None = None, license: str | None = None) -> Path:
    """Render the card from ``output_dir/report.json`` and save it as ``output_dir/README.md``."""
    folder = Path(output_dir)
    source = folder / artifacts.REPORT_JSON
    if not source.is_file():
        raise FileNotFoundError(f"{source} does not exist: write the report first (scripts/report.py, or the end of "
                                "scripts/distill_llm.py).")
    card = render_model_card(json.loads(source.read_text()), model_id=model_id, license=license)
    path = folder / artifacts.MODEL_CARD
    card.save(path)
    return path
