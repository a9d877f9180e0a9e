"""Top-1 accuracy and error rate as an `evaluate` metric, shipped with the training script and loaded by path.

`evaluate.load("accuracy")` fetches its script from the Hub; loading this file by path works offline:
`evaluate.load("scripts/accuracy.py")`.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Top-1 accuracy, the fraction of predictions equal to their reference label, and its complement the error rate
(the number reported in Zhao, Zhang & Hu, "When Will Gradient Regularization Be Harmful?", ICML 2024):
accuracy = (1/N) Σ [prediction_i = reference_i], error_rate = 1 − accuracy.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[int]`): predicted labels.
    references (`list[int]`): true labels.
Returns:
    accuracy (`float`): top-1 accuracy in [0, 1].
    error_rate (`float`): 1 − accuracy.
Examples:
    >>> metric = evaluate.load("scripts/accuracy.py")
    >>> metric.compute(predictions=[0, 1, 1], references=[0, 1, 0])
    {'accuracy': 0.6666666666666666, 'error_rate': 0.33333333333333337}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    """Top-1 accuracy and error rate."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions: list[int], references: list[int]) -> dict[str, float]:
        if len(predictions) == 0:
            raise ValueError("accuracy needs at least one prediction.")
        accuracy = float(np.mean(np.asarray(predictions) == np.asarray(references)))
        return {"accuracy": accuracy, "error_rate": 1.0 - accuracy}
