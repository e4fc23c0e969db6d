"""Zero-shot classification metrics of CLIP_benchmark as an `evaluate` module: `acc1`, `acc5`,
`mean_per_class_recall`.

    metric = evaluate.load(str(alip_hf.resources.EVALUATE_MODULES / "zeroshot_accuracy"))
    metric.compute(predictions=logits, references=labels)  # logits (N, C), labels (N,)

Self-contained (numpy only) so that `evaluate` can copy and import it anywhere; eval.py's
`classification_metrics` computes the same numbers (tests/test_eval.py checks it).
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """Top-1 and top-5 accuracy of class scores, and the mean over the classes present in the references
of each class's recall (sklearn's balanced accuracy). `acc5` is NaN with fewer than 5 classes."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: one list of C class scores (logits or similarities) per sample.
    references: the class id of each sample, in [0, C).
Returns:
    acc1, acc5, mean_per_class_recall (floats in [0, 1]).
Examples:
    >>> metric = evaluate.load(str(alip_hf.resources.EVALUATE_MODULES / "zeroshot_accuracy"))
    >>> metric.compute(predictions=[[0.1, 0.9], [0.8, 0.2]], references=[1, 1])["acc1"]
    0.5
"""

_CITATION = """@inproceedings{radford2021clip, title={Learning Transferable Visual Models From Natural Language
Supervision}, author={Radford, Alec and others}, booktitle={ICML}, year={2021}}"""


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, k: int) -> float:
    if scores.shape[1] < k:
        return float("nan")
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return int((top == labels[:, None]).any(axis=1).sum()) / len(labels)


def mean_per_class_recall(predictions: np.ndarray, labels: np.ndarray) -> float:
    recalls = np.array([(predictions[labels == c] == c).mean() for c in np.unique(labels)], dtype=np.float64)
    return float(recalls.mean())


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ZeroshotAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("float32")), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references):
        scores = np.asarray(predictions, dtype=np.float32)
        labels = np.asarray(references, dtype=np.int64)
        if scores.ndim != 2 or len(scores) != len(labels) or len(labels) == 0:
            raise ValueError(f"predictions must be (N, C) class scores for the N references; got {scores.shape}")
        if labels.min() < 0 or labels.max() >= scores.shape[1]:
            raise ValueError(f"references must be class ids in [0, {scores.shape[1]})")
        return {
            "acc1": topk_accuracy(scores, labels, 1),
            "acc5": topk_accuracy(scores, labels, 5),
            "mean_per_class_recall": mean_per_class_recall(scores.argmax(axis=1), labels),
        }
