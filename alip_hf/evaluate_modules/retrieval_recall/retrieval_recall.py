"""Image-text retrieval recall@k of CLIP_benchmark as an `evaluate` module, several captions per image.

    metric = evaluate.load(str(alip_hf.resources.EVALUATE_MODULES / "retrieval_recall"))
    metric.compute(predictions=scores, references=text_image_index, k_values=[1, 5, 10])

`predictions[t]` holds text t's similarity to every image (T rows of I scores); `references[t]` is the index of
text t's image. A query is a hit when at least one of its matches is in its top k. The recall is
`alip_hf.evaluation.metrics.recall_at_ks`, the routine eval.py reports with.
"""

import datasets
import evaluate
import numpy as np
import torch

_DESCRIPTION = """`image_retrieval_recall@k`: fraction of texts whose image is among the k images most similar to
them (text -> image). `text_retrieval_recall@k`: fraction of images with at least one of their captions among the
k texts most similar to them (image -> text). A k above the number of candidates counts every query as a hit."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: for each of the T texts, its similarity to each of the I images.
    references: for each text, the index of its image in [0, I).
    k_values: the cut-offs (default [1, 5, 10]).
Returns:
    image_retrieval_recall@k and text_retrieval_recall@k for each k.
Examples:
    >>> metric = evaluate.load(str(alip_hf.resources.EVALUATE_MODULES / "retrieval_recall"))
    >>> metric.compute(predictions=[[0.9, 0.1], [0.2, 0.3], [0.6, 0.4]], references=[0, 1, 1], k_values=[1])
    {'image_retrieval_recall@1': 0.6666666666666666, 'text_retrieval_recall@1': 1.0}
"""

_CITATION = """@inproceedings{radford2021clip, title={Learning Transferable Visual Models From Natural Language
Supervision}, author={Radford, Alec and others}, booktitle={ICML}, year={2021}}"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RetrievalRecall(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("float32")), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, k_values=(1, 5, 10)):
        scores = np.asarray(predictions, dtype=np.float32)
        index = np.asarray(references, dtype=np.int64)
        if scores.ndim != 2 or len(scores) != len(index) or len(index) == 0:
            raise ValueError(f"predictions must be (T, I) text-image scores for the T references; got {scores.shape}")
        if index.min() < 0 or index.max() >= scores.shape[1]:
            raise ValueError(f"references must be image indices in [0, {scores.shape[1]})")
        if len(np.unique(index)) != scores.shape[1]:
            raise ValueError("every image needs at least one text among the references (an image without captions "
                             "can never be retrieved by image -> text)")
        # The package's one recall routine (this module ships inside it as package data).
        from alip_hf.evaluation.metrics import recall_at_ks

        recalls = recall_at_ks(torch.from_numpy(scores), index, list(k_values))
        return {f"{name}@{k}": recalls[name][i] for name in recalls for i, k in enumerate(k_values)}
