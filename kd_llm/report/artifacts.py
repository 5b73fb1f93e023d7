"""File names of what a report writes into a run's output folder.

Other parts of kd_llm (the Hub upload, scripts) import these names rather than spelling them out, so that a renamed
file cannot silently drop out of an upload.
"""

from __future__ import annotations

from pathlib import Path

REPORT_MARKDOWN = "report.md"
REPORT_JSON = "report.json"
MODEL_CARD = "README.md"  # the Hub renders README.md as the model card
PLOTS_DIR = "plots"
LOSS_PLOT = f"{PLOTS_DIR}/training_losses.png"
TEMPERATURE_PLOT = f"{PLOTS_DIR}/temperature.png"
CATEGORY_PLOT = f"{PLOTS_DIR}/per_category.png"
PLOTS = (LOSS_PLOT, TEMPERATURE_PLOT, CATEGORY_PLOT)
RESULTS_JSON = "results.json"  # written by kd_llm.experiment.run_distillation
# run_distillation saves the hard-label student here (inside the output folder) so that reports can measure it.
BASELINE_DIR = "hard_label_baseline"

REPORT_FILES = (REPORT_MARKDOWN, REPORT_JSON, MODEL_CARD, *PLOTS)


def report_files(output_dir: str | Path) -> list[Path]:
    """The report files that exist in ``output_dir`` (a plot is missing when there was nothing to draw)."""
    folder = Path(output_dir)
    return [folder / name for name in REPORT_FILES if (folder / name).is_file()]
