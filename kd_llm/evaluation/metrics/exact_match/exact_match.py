"""Exact match as an ``evaluate`` metric, shipped with kd_llm so that it loads offline.

``evaluate.load("exact_match")`` would fetch the metric script from the Hub; this local copy is loaded by path with
``evaluate.load(<this folder>)`` and needs no network. Strings are compared after stripping surrounding whitespace.
"""

import datasets
import evaluate

_DESCRIPTION = "The fraction of predictions that equal their reference exactly (after stripping whitespace)."
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): predicted answers.
    references (list of str): reference answers.
Returns:
    exact_match (float): in [0, 1].
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ExactMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references):
        if not references:
            return {"exact_match": 0.0}
        hits = sum(p.strip() == r.strip() for p, r in zip(predictions, references))
        return {"exact_match": hits / len(references)}
