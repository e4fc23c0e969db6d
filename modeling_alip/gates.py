"""ALIP's consistency gates, with their running means held as buffers.

The Language Consistency Gate (LCG, in the ALIP paper's method section) compares the raw web text `t` with the synthetic
caption `c` and down-weights whole samples whose two texts disagree. The Description Consistency Gate
(DCG) compares the image `x` with each text and weights each image-text pair. Each gate keeps
an exponential running mean `H` of its batch-mean similarity; like BatchNorm statistics, the means live
in buffers (saved with the model, restored on load, moved by `.to()`) and only change in training mode.
The official code keeps them as Python locals in the training loop, so a resumed run restarts them.

Everything here runs without gradient: the official code computes the gates under `torch.no_grad()`.
"""

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class GateOutput:
    """Per-sample gate values for a batch of `N` samples (all `(N,)` tensors unless stated).

    Attributes:
        sample_weight: LCG weight `W^s`, clipped at 1.
        sample_weight_raw: `exp(S_tc - H_tc) ** gamma` before clipping; `< 1` marks samples where DCG applies.
        text_pair_weight: DCG weight `W^t` of the (image, raw text) pair.
        caption_pair_weight: DCG weight `W^c` of the (image, caption) pair.
        similarity_text_caption, similarity_image_text, similarity_image_caption: `S_tc`, `S_xt`, `S_xc`.
        running_mean_text_caption, running_mean_image_text, running_mean_image_caption: scalars `H_tc`,
            `H_xt`, `H_xc` after this batch's update.
    """

    sample_weight: torch.Tensor
    sample_weight_raw: torch.Tensor
    text_pair_weight: torch.Tensor
    caption_pair_weight: torch.Tensor
    similarity_text_caption: torch.Tensor
    similarity_image_text: torch.Tensor
    similarity_image_caption: torch.Tensor
    running_mean_text_caption: torch.Tensor
    running_mean_image_text: torch.Tensor
    running_mean_image_caption: torch.Tensor

    @property
    def dcg_applied(self) -> torch.Tensor:
        """`(N,)` bool: samples whose pair weights come from the DCG (the others have pair weight 1)."""
        return self.sample_weight_raw < 1

    def text_weights(self) -> torch.Tensor:
        """`(N,)` weight of the (image, raw text) loss: `W^s * W^t`."""
        return self.sample_weight * self.text_pair_weight

    def caption_weights(self) -> torch.Tensor:
        """`(N,)` weight of the (image, caption) loss: `W^s * W^c`."""
        return self.sample_weight * self.caption_pair_weight


class RunningMeanSimilarity(nn.Module):
    """Cosine similarity of paired rows and an exponential running mean of its batch mean.

    The running mean is updated *before* it is used, as in the official code:
    `H <- momentum * H + (1 - momentum) * mean(S)`.
    """

    def __init__(self, momentum: float, initial_mean: float):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("running_mean", torch.tensor(float(initial_mean)))

    @torch.no_grad()
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`a`, `b`: `(N, D)` L2-normalised. Returns `S = <a_i, b_i>` `(N,)` and the running mean `H` (scalar)."""
        similarity = (a * b).sum(dim=1)
        running_mean = self.running_mean
        if self.training:
            # Same operation order as the official `cur_mean * 0.01 + momentum_sim * 0.99`.
            running_mean = similarity.mean() * (1 - self.momentum) + running_mean * self.momentum
            self.running_mean.copy_(running_mean)
        return similarity, running_mean


class LanguageConsistencyGate(nn.Module):
    """LCG: sample weight `W^s = min(exp(S_tc - H_tc) ** gamma, 1)` from the raw text-caption agreement."""

    def __init__(self, momentum: float = 0.99, gamma: float = 2.0, initial_mean: float = 1.0):
        super().__init__()
        self.gamma = gamma
        self.text_caption = RunningMeanSimilarity(momentum, initial_mean)

    @torch.no_grad()
    def forward(self, text_embeds: torch.Tensor, caption_embeds: torch.Tensor):
        """`text_embeds`, `caption_embeds`: `(N, D)`. Returns `(W^s, W^s before clipping, S_tc, H_tc)`."""
        similarity, running_mean = self.text_caption(text_embeds, caption_embeds)
        weight_raw = torch.exp(similarity - running_mean) ** self.gamma
        return weight_raw.clamp(max=1.0), weight_raw, similarity, running_mean


class DescriptionConsistencyGate(nn.Module):
    """DCG: pair weights `W = exp(S_x* - H_x*) ** gamma` for (image, raw text) and (image, caption) (the DCG equations)."""

    def __init__(self, momentum: float = 0.99, gamma: float = 2.0, initial_mean: float = 1.0, clip_weights: bool = False):
        super().__init__()
        self.gamma = gamma
        self.clip_weights = clip_weights
        self.image_text = RunningMeanSimilarity(momentum, initial_mean)
        self.image_caption = RunningMeanSimilarity(momentum, initial_mean)

    def _pair_weight(self, similarity: torch.Tensor, running_mean: torch.Tensor) -> torch.Tensor:
        weight = torch.exp(similarity - running_mean) ** self.gamma
        # Deviation, off by default: the official code never clips the DCG weights.
        return weight.clamp(max=1.0) if self.clip_weights else weight

    @torch.no_grad()
    def forward(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor, caption_embeds: torch.Tensor):
        """All `(N, D)`. Returns `(W^t, W^c, S_xt, S_xc, H_xt, H_xc)` before the LCG decides where they apply."""
        similarity_text, mean_text = self.image_text(text_embeds, image_embeds)
        similarity_caption, mean_caption = self.image_caption(caption_embeds, image_embeds)
        return (
            self._pair_weight(similarity_text, mean_text),
            self._pair_weight(similarity_caption, mean_caption),
            similarity_text,
            similarity_caption,
            mean_text,
            mean_caption,
        )


class ALIPGates(nn.Module):
    """Both gates and the rule that combines them. Buffers: `lcg.text_caption.running_mean` (`H_tc`),
    `dcg.image_text.running_mean` (`H_xt`), `dcg.image_caption.running_mean` (`H_xc`)."""

    def __init__(self, momentum: float = 0.99, lcg_gamma: float = 2.0, dcg_gamma: float = 2.0,
                 initial_mean: float = 1.0, clip_pair_weights: bool = False):
        super().__init__()
        self.lcg = LanguageConsistencyGate(momentum, lcg_gamma, initial_mean)
        self.dcg = DescriptionConsistencyGate(momentum, dcg_gamma, initial_mean, clip_pair_weights)

    @staticmethod
    def combine(sample_weight_raw: torch.Tensor, pair_weight: torch.Tensor) -> torch.Tensor:
        """Applies a DCG pair weight only where the LCG found the raw text and caption inconsistent.

        ALIP paper, DCG: when the two texts agree (`S_tc >= H_tc`, i.e. `exp(S_tc - H_tc) ** gamma >= 1`)
        the sample is trusted and its pairs get weight 1; otherwise the DCG weight is used. This is the
        official `torch.where(weight_sample_raw < 1, weight_pair, 1)`; the final loss weight of a pair is
        `W^s * W^{t|c}` (the adaptive contrastive loss).

        Args:
            sample_weight_raw: `(N,)` LCG weight before clipping.
            pair_weight: `(N,)` DCG weight.
        Returns:
            `(N,)` pair weight.
        """
        return torch.where(sample_weight_raw < 1, pair_weight, torch.ones_like(pair_weight))

    @torch.no_grad()
    def forward(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor, caption_embeds: torch.Tensor) -> GateOutput:
        """All inputs `(N, D)`, L2-normalised, of the global batch. Updates the running means in training mode."""
        image_embeds, text_embeds, caption_embeds = (e.detach().float() for e in (image_embeds, text_embeds, caption_embeds))
        sample_weight, sample_weight_raw, s_tc, h_tc = self.lcg(text_embeds, caption_embeds)
        w_t, w_c, s_xt, s_xc, h_xt, h_xc = self.dcg(image_embeds, text_embeds, caption_embeds)
        return GateOutput(
            sample_weight=sample_weight,
            sample_weight_raw=sample_weight_raw,
            text_pair_weight=self.combine(sample_weight_raw, w_t),
            caption_pair_weight=self.combine(sample_weight_raw, w_c),
            similarity_text_caption=s_tc,
            similarity_image_text=s_xt,
            similarity_image_caption=s_xc,
            running_mean_text_caption=h_tc,
            running_mean_image_text=h_xt,
            running_mean_image_caption=h_xc,
        )


__all__ = ["ALIPGates", "DescriptionConsistencyGate", "GateOutput", "LanguageConsistencyGate", "RunningMeanSimilarity"]
