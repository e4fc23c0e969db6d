"""Gathering embeddings across processes and the (adaptive) contrastive loss.

The loss is a pure function of embeddings, weights and the logit scale. With all weights equal to one
it is CLIP's symmetric InfoNCE loss; with ALIP's gate weights it is the adaptive contrastive loss of the
ALIP paper, computed per path (image-raw text, image-caption) as the official code does.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F


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

    Returns:
        `(loss, diagnostics)`: the scalar mean over rows of
        `(CE_image->text_i + CE_text->image_i) / 2 * weights_i`, and a dict with the logits
        (`logits_per_image`, `(N or B, N)`) and the per-row loss before weighting (`per_row_loss`).
    """
    if image_embeds.shape != text_embeds.shape:
        raise ValueError(
            f"image_embeds {tuple(image_embeds.shape)} and text_embeds {tuple(text_embeds.shape)} must have the same shape"
        )
    rows = local_rows if local_rows is not None else slice(0, image_embeds.shape[0])
    logits_per_image = logit_scale * image_embeds[rows] @ text_embeds.T
    logits_per_text = logit_scale * text_embeds[rows] @ image_embeds.T
    labels = torch.arange(image_embeds.shape[0], device=image_embeds.device)[rows]
    per_row_loss = (
        F.cross_entropy(logits_per_image, labels, reduction="none")
        + F.cross_entropy(logits_per_text, labels, reduction="none")
    ) / 2
    weighted = per_row_loss if weights is None else per_row_loss * weights.detach()[rows]
    return weighted.mean(), {"logits_per_image": logits_per_image, "per_row_loss": per_row_loss}


__all__ = ["contrastive_loss", "gather_features", "is_distributed"]
