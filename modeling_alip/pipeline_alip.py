"""The zero-shot image classification pipeline for ALIP models, scoring as the model was trained.

transformers' `ZeroShotImageClassificationPipeline` turns `logits_per_image` into scores with a softmax over the
candidate labels, or with a sigmoid per label when the model type names SigLIP. An ALIP model's type is `alip`
whatever its loss, so a model trained with the sigmoid loss (`config.loss == "siglip"`) would get softmax scores.
This subclass applies SigLIP's rule to such a model: each score is `sigmoid(t * cos + b)`, the probability that
the label matches, independent of the other labels (they need not sum to one). Rankings are the same either way.
"""

import torch
from transformers import ZeroShotImageClassificationPipeline


class ALIPZeroShotImageClassificationPipeline(ZeroShotImageClassificationPipeline):
    """`pipeline("zero-shot-image-classification", model=..., pipeline_class=ALIPZeroShotImageClassificationPipeline)`."""

    def postprocess(self, model_outputs):
        if getattr(self.model.config, "loss", None) != "siglip":
            return super().postprocess(model_outputs)
        candidate_labels = model_outputs.pop("candidate_labels")
        scores = torch.sigmoid(model_outputs["logits"][0]).squeeze(-1).tolist()
        scores = scores if isinstance(scores, list) else [scores]
        ranked = sorted(zip(scores, candidate_labels), key=lambda pair: -pair[0])
        return [{"score": score, "label": label} for score, label in ranked]


__all__ = ["ALIPZeroShotImageClassificationPipeline"]
