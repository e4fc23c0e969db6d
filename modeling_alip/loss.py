"""The step losses: gathering embeddings across processes, the pair losses, and their assembly per method.

Everything that forms a training loss lives here, used alike by `ALIPModel.forward(return_loss=True)` and by
the training recipes (`alip_hf.recipes`), so a new loss added here reaches both:
- pair losses, pure functions of the embeddings of one (image, text) path, its temperature, optional bias and
  optional per-sample weights: `contrastive_loss` (CLIP's symmetric InfoNCE; with ALIP's gate weights the
  adaptive contrastive loss of the ALIP paper) and `sigmoid_loss` (SigLIP), looked up in `PAIR_LOSSES`;
- step losses, which gather the local embeddings into the global batch once and sum pair losses over text
  paths: `single_path_loss` (CLIP, VeCLIP, SigLIP: one unweighted path) and `adaptive_loss` (ALIP: the raw
  text and caption paths weighted by the gates).
A step loss returns a `StepLoss`: the scalar to back-propagate, each path's loss, the same losses without
the gates' weights (diagnostics), and the gate values.
"""

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

if TYPE_CHECKING:
    from .gates import ALIPGates, GateOutput


class _AllGatherWithGrad(torch.autograd.Function):
    """`all_gather` whose backward sends each process the gradient summed over all processes.

    Every process computes the loss on the global batch, so the gradient of its local rows is the sum of
    the gradients that all processes' losses send them. DDP then averages parameter gradients over the
    `world_size` processes, which turns that sum into the gradient of one global loss: two processes
    equal one process fed the concatenated batch.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.batch_size = dist.get_rank(), tensor.shape[0]
        gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, tensor.contiguous())
        return torch.cat(gathered, dim=0)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:
        grad_output = grad_output.contiguous()
        dist.all_reduce(grad_output, op=dist.ReduceOp.SUM)
        start = ctx.rank * ctx.batch_size
        return grad_output[start : start + ctx.batch_size]


def is_distributed() -> bool:
    """True when a process group with more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_features(*features: torch.Tensor) -> tuple[list[torch.Tensor], slice]:
    """Gathers per-process embeddings into the global batch, keeping gradients.

    Args:
        *features: tensors of shape `(B, D)` with the same local batch size `B` on every process
            (Accelerate's default `even_batches=True` guarantees it).

    Returns:
        The gathered tensors, each `(world_size * B, D)` in rank order, and the slice of this process's
        rows in them. In a single process the inputs come back unchanged with `slice(0, B)`.

    Unlike the official ALIP code, which gathers without gradient by default (`--gather-with-grad False`,
    so each process back-propagates only through its own rows and DDP's averaging scales the gradient
    by `1 / world_size`), this always gathers with gradient, so the result does not depend on how many
    processes share the batch.
    """
    batch_size = features[0].shape[0]
    if not is_distributed():
        return list(features), slice(0, batch_size)
    rank = dist.get_rank()
    gathered = [_AllGatherWithGrad.apply(feature) for feature in features]
    return gathered, slice(rank * batch_size, (rank + 1) * batch_size)


def contrastive_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale: torch.Tensor | float,
    weights: torch.Tensor | None = None,
    local_rows: slice | None = None,
    logit_bias: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Symmetric contrastive loss with optional per-pair weights (ALIP's adaptive contrastive loss).

    Args:
        image_embeds: `(N, D)` L2-normalised image embeddings of the global batch.
        text_embeds: `(N, D)` L2-normalised text embeddings, row `i` paired with image `i`.
        logit_scale: the exponentiated scale multiplying the cosine logits (`exp(model.logit_scale)`).
        weights: optional `(N,)` weight of each pair, treated as constants (detached), e.g. the product
            `W^s * W^t` of ALIP's gates. `None` gives CLIP's loss.
        local_rows: compute the loss only for these rows against all `N` columns (open_clip's
            `local_loss`): the logits are `(B, N)` instead of `(N, N)`. With gradients gathered by
            [`gather_features`], the average over processes equals the global loss exactly.
        logit_bias: must be `None`: a bias cancels in the softmax (the argument exists so that every entry of
            `PAIR_LOSSES` takes the same arguments).

    Returns:
        `(loss, diagnostics)`: the scalar mean over rows of
        `(CE_image->text_i + CE_text->image_i) / 2 * weights_i`, and a dict with the logits
        (`logits_per_image`, `(N or B, N)`), the per-row loss before weighting (`per_row_loss`) and its mean
        (`unweighted_loss`, detached).
    """
    if image_embeds.shape != text_embeds.shape:
        raise ValueError(
            f"image_embeds {tuple(image_embeds.shape)} and text_embeds {tuple(text_embeds.shape)} must have the same shape"
        )
    if logit_bias is not None:
        raise ValueError("contrastive_loss has no bias (it cancels in the softmax); the sigmoid loss has one")
    rows = local_rows if local_rows is not None else slice(0, image_embeds.shape[0])
    logits_per_image = logit_scale * image_embeds[rows] @ text_embeds.T
    logits_per_text = logit_scale * text_embeds[rows] @ image_embeds.T
    labels = torch.arange(image_embeds.shape[0], device=image_embeds.device)[rows]
    per_row_loss = (
        F.cross_entropy(logits_per_image, labels, reduction="none")
        + F.cross_entropy(logits_per_text, labels, reduction="none")
    ) / 2
    weighted = per_row_loss if weights is None else per_row_loss * weights.detach()[rows]
    return weighted.mean(), {"logits_per_image": logits_per_image, "per_row_loss": per_row_loss,
                             "unweighted_loss": per_row_loss.detach().mean()}


def sigmoid_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale: torch.Tensor | float,
    weights: torch.Tensor | None = None,
    local_rows: slice | None = None,
    logit_bias: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SigLIP's pairwise sigmoid loss (Zhai et al., "Sigmoid Loss for Language Image Pre-Training", ICCV 2023),
    with optional per-sample weights (this package's extension of ALIP's adaptive loss to it).

    `L = -1/N sum_i sum_j w_ij log sigmoid(z_ij (t x_i . y_j + b))`, `z_ij = 1` if `i == j` else `-1`, over the
    `N x N` pairs of the global batch; with `weights=None` every `w_ij = 1`, the paper's loss.

    ALIP's weights (the paper trains them with the softmax loss only): in the softmax loss the weight `w_i` of
    sample `i` scales its two cross-entropies, image `i` against all texts (row `i`) and text `i` against all
    images (column `i`), averaged. The sigmoid loss has one term per pair instead, which belongs to row `i`
    and to column `j`; giving each of the two halves its sample's weight makes `w_ij = (w_i + w_j) / 2`. So a
    down-weighted sample's positive pair counts `w_i` and its negatives count half from its side, as in the
    softmax form, and unit weights give SigLIP exactly.

    Args:
        image_embeds: `(N, D)` L2-normalised image embeddings of the global batch.
        text_embeds: `(N, D)` L2-normalised text embeddings, row `i` paired with image `i`.
        logit_scale: the temperature `t = exp(t')` (`exp(model.logit_scale)`).
        weights: optional `(N,)` weight of each sample (detached), e.g. ALIP's `W^s * W^t`.
        local_rows: only these image rows against all `N` texts, normalised by their count: the logits are
            `(B, N)`, and with gradients gathered by [`gather_features`] the average over processes equals the
            global loss exactly (each pair is in exactly one process's rows).
        logit_bias: the learnable bias `b` (`model.logit_bias`); required.

    Returns:
        `(loss, diagnostics)`: the scalar loss, and a dict with `logits_per_image` `(N or B, N)` (`t x.y + b`)
        and `unweighted_loss` (the same rows with unit weights, detached).
    """
    if image_embeds.shape != text_embeds.shape:
        raise ValueError(
            f"image_embeds {tuple(image_embeds.shape)} and text_embeds {tuple(text_embeds.shape)} must have the same shape"
        )
    if logit_bias is None:
        raise ValueError("sigmoid_loss needs logit_bias (the model's learnable bias; SigLIP initialises it at -10)")
    n = image_embeds.shape[0]
    rows = local_rows if local_rows is not None else slice(0, n)
    logits_per_image = logit_scale * image_embeds[rows] @ text_embeds.T + logit_bias
    # z_ij = +1 on the diagonal of the global batch, -1 elsewhere; `rows` picks this process's rows of it.
    signs = 2 * torch.eye(n, device=logits_per_image.device, dtype=logits_per_image.dtype)[rows] - 1
    per_pair_loss = -F.logsigmoid(signs * logits_per_image)
    num_rows = per_pair_loss.shape[0]
    unweighted = per_pair_loss.sum() / num_rows
    if weights is None:
        loss = unweighted
    else:
        weights = weights.detach().to(per_pair_loss.dtype)
        loss = (per_pair_loss * (weights[rows, None] + weights[None, :]) / 2).sum() / num_rows
    return loss, {"logits_per_image": logits_per_image, "unweighted_loss": unweighted.detach()}


# The pair loss of each `ALIPConfig.loss` / `--loss` name; every entry takes the same arguments.
PAIR_LOSSES: dict[str, Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]] = {
    "clip": contrastive_loss,
    "siglip": sigmoid_loss,
}


def pair_loss(name: str) -> Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """The pair loss called `name` (`"clip"` or `"siglip"`)."""
    if name not in PAIR_LOSSES:
        raise ValueError(f"unknown loss {name!r}; the losses are {sorted(PAIR_LOSSES)}")
    return PAIR_LOSSES[name]


# ----------------------------------------------------------------------------------------------------------------
# Step losses: gather once, one pair loss per text path
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class StepLoss:
    """The loss of one step (the whole global batch) and what its metrics read.

    Attributes:
        loss: `()` the scalar that is back-propagated: the sum of `parts`.
        parts: `()` loss of each text path by name: `{"text": ...}`, and `"caption"` for ALIP's second path.
        unweighted: `()` detached loss of each path with unit weights (ALIP's gates ignored), same keys as
            `parts`: what CLIP's (or SigLIP's) loss would read on the same embeddings and temperature.
        gates: ALIP's gate values of the global batch (`(N,)` tensors), `None` without gates.
    """

    loss: torch.Tensor
    parts: dict[str, torch.Tensor]
    unweighted: dict[str, torch.Tensor] = field(default_factory=dict)
    gates: "GateOutput | None" = None


def _gather_float(*embeds: torch.Tensor) -> tuple[list[torch.Tensor], slice]:
    # Loss and gates in float32 whatever the autocast dtype, as the official ALIP code does (`.float()`).
    return gather_features(*(e.float() for e in embeds))


def _temperature(logit_scale: torch.Tensor, logit_bias: torch.Tensor | None):
    return logit_scale.exp().float(), (logit_bias.float() if logit_bias is not None else None)


def single_path_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor | None = None,
    loss: str = "clip",
    local_loss: bool = False,
) -> StepLoss:
    """One unweighted (image, text) path: CLIP's loss (`loss="clip"`) or SigLIP's (`loss="siglip"`).

    Args:
        image_embeds, text_embeds: `(B, D)` local L2-normalised embeddings; gathered here with gradient.
        logit_scale: the log temperature parameter (`model.logit_scale`, exponentiated here).
        logit_bias: the sigmoid loss's bias (`model.logit_bias`), `None` for the softmax loss.
        loss: a name of `PAIR_LOSSES`.
        local_loss: this process's rows against the global batch (see [`contrastive_loss`]).
    """
    (image, text), local_rows = _gather_float(image_embeds, text_embeds)
    scale, bias = _temperature(logit_scale, logit_bias)
    value, diagnostics = pair_loss(loss)(image, text, scale, local_rows=local_rows if local_loss else None,
                                         logit_bias=bias)
    return StepLoss(value, {"text": value}, {"text": diagnostics["unweighted_loss"]})


def adaptive_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    caption_embeds: torch.Tensor,
    logit_scale: torch.Tensor,
    gates: "ALIPGates | GateOutput",
    logit_bias: torch.Tensor | None = None,
    loss: str = "clip",
    local_loss: bool = False,
) -> StepLoss:
    """ALIP's bi-path adaptive loss: `loss_text + loss_caption`, each pair loss weighted by the gates
    (`W^s * W^t` for the raw text, `W^s * W^c` for the caption; ALIP paper, adaptive contrastive loss).

    With `loss="siglip"` the pair loss is the sigmoid loss with the same weights (see [`sigmoid_loss`] for how a
    sample weight enters it): this package's extension, the paper trains the softmax loss.

    Args:
        image_embeds, text_embeds, caption_embeds: `(B, D)` local L2-normalised embeddings; gathered here
            with gradient.
        logit_scale: the log temperature parameter (`model.logit_scale`, exponentiated here).
        gates: the model's `ALIPGates`, run here on the gathered embeddings (updating their running means in
            training mode, as the official code does), or the `GateOutput` of the whole global batch computed
            once beforehand (gradient accumulation computes it on all micro-batches).
        logit_bias, loss, local_loss: as in [`single_path_loss`].
    """
    (image, text, caption), local_rows = _gather_float(image_embeds, text_embeds, caption_embeds)
    if callable(gates):
        gates = gates(image, text, caption)
    scale, bias = _temperature(logit_scale, logit_bias)
    rows = local_rows if local_loss else None
    compute = pair_loss(loss)
    loss_text, text_diagnostics = compute(image, text, scale, gates.text_weights(), rows, logit_bias=bias)
    loss_caption, caption_diagnostics = compute(image, caption, scale, gates.caption_weights(), rows, logit_bias=bias)
    return StepLoss(
        loss_text + loss_caption,
        {"text": loss_text, "caption": loss_caption},
        {"text": text_diagnostics["unweighted_loss"], "caption": caption_diagnostics["unweighted_loss"]},
        gates,
    )


__all__ = ["PAIR_LOSSES", "StepLoss", "adaptive_loss", "contrastive_loss", "gather_features", "is_distributed", "pair_loss",
           "sigmoid_loss", "single_path_loss"]
