"""The distillation report: skill, size, speed and memory of teacher, hard-label baseline and distilled student on one
machine, their ratios, negative-transfer and capacity checks, plots, and the student's model card.

File names live in :mod:`kd_llm.report.artifacts`; the end of :func:`kd_llm.experiment.run_distillation` calls
:func:`write_run_report`, and ``scripts/report.py`` calls :func:`report_on_checkpoints`.
"""

from kd_llm.report.artifacts import (
    BASELINE_DIR,
    CATEGORY_PLOT,
    LOSS_PLOT,
    MODEL_CARD,
    PLOTS,
    REPORT_FILES,
    REPORT_JSON,
    REPORT_MARKDOWN,
    TEMPERATURE_PLOT,
    report_files,
)
from kd_llm.report.checks import TeacherCheckError, check_teacher, negative_transfer
from kd_llm.report.measure import BenchmarkSettings, measure_model
from kd_llm.report.model_card import render_model_card, write_model_card
from kd_llm.report.run import report_on_checkpoints, write_run_report

__all__ = [
    "BASELINE_DIR", "CATEGORY_PLOT", "LOSS_PLOT", "MODEL_CARD", "PLOTS", "REPORT_FILES", "REPORT_JSON",
    "REPORT_MARKDOWN", "TEMPERATURE_PLOT", "BenchmarkSettings", "TeacherCheckError", "check_teacher",
    "measure_model", "negative_transfer", "render_model_card", "report_files", "report_on_checkpoints",
    "write_model_card", "write_run_report",
]
