"""GLUE metrics through `evaluate`, with no network: this file is itself an `evaluate` metric module.

`evaluate.load("glue", task)` fetches its metric script from the Hugging Face Hub, which offline machines
cannot reach. `load_glue_metric(task)` instead points `evaluate.load` at this file, a local metric module with
the same task names and result keys as the Hub's GLUE metric, computed by scikit-learn and SciPy (accuracy,
F1, Matthews correlation, Pearson and Spearman correlation).

The module keeps to what `evaluate` can import from a copy of this file: absolute imports of installed
libraries only, and one metric class.
"""

from __future__ import annotations

import os

import datasets
import evaluate

# The result keys of each GLUE task (the same as the Hub's `glue` metric).
TASK_METRICS: dict[str, tuple[str, ...]] = {
    "sst2": ("accuracy",),
    "mrpc": ("accuracy", "f1"),
    "cola": ("matthews_correlation",),
    "qnli": ("accuracy",),
    "rte": ("accuracy",),
    "stsb": ("pearson", "spearmanr"),
    "qqp": ("accuracy", "f1"),
    "mnli": ("accuracy",),
    "mnli_matched": ("accuracy",),
    "mnli_mismatched": ("accuracy",),
    "wnli": ("accuracy",),
}
REGRESSION_TASKS = ("stsb",)

_CITATION = """\
@inproceedings{wang2019glue,
  title={{GLUE}: A Multi-Task Benchmark and Analysis Platform for Natural Language Understanding},
  author={Wang, Alex and Singh, Amanpreet and Michael, Julian and Hill, Felix and Levy, Omer and Bowman, Samuel R.},
  booktitle={International Conference on Learning Representations},
  year={2019}
}
"""
_DESCRIPTION = "The GLUE metric of one task: accuracy, F1 (positive class 1), Matthews, Pearson / Spearman."
_INPUTS = """
Args:
    predictions: predicted labels (int), or scores for stsb (float).
    references: gold labels (int), or scores for stsb (float).
Returns: the task's keys of {accuracy, f1, matthews_correlation, pearson, spearmanr}, as floats.
"""


class GlueMetric(evaluate.Metric):
    """One GLUE task's metric (`config_name` is the task, e.g. 'sst2', 'stsb')."""

    def _info(self) -> evaluate.MetricInfo:
        if self.config_name not in TASK_METRICS:
            raise KeyError(f"GLUE metric: unknown task {self.config_name!r}; expected one of {sorted(TASK_METRICS)}.")
        dtype = "float64" if self.config_name in REGRESSION_TASKS else "int64"
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation=_CITATION, inputs_description=_INPUTS,
            features=datasets.Features({"predictions": datasets.Value(dtype), "references": datasets.Value(dtype)}),
            reference_urls=["https://gluebenchmark.com/"],  # plain lists: the "numpy" format casts to float32
        )

    def _compute(self, predictions, references) -> dict[str, float]:
        from scipy.stats import pearsonr, spearmanr
        from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

        functions = {
            "accuracy": lambda: accuracy_score(references, predictions),
            "f1": lambda: f1_score(references, predictions),
            "matthews_correlation": lambda: matthews_corrcoef(references, predictions),
            "pearson": lambda: pearsonr(predictions, references)[0],
            "spearmanr": lambda: spearmanr(predictions, references)[0],
        }
        return {name: float(functions[name]()) for name in TASK_METRICS[self.config_name]}


def load_glue_metric(task: str) -> evaluate.EvaluationModule:
    """The GLUE metric of `task`, loaded by `evaluate` from this file (kept in memory; no Hub, no cache files)."""
    if task not in TASK_METRICS:
        raise ValueError(f"load_glue_metric: unknown task {task!r}; expected one of {sorted(TASK_METRICS)}.")
    return evaluate.load(os.path.abspath(__file__), task, keep_in_memory=True)
