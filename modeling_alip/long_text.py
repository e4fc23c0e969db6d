"""Long text: stretching CLIP's text position embeddings beyond their trained length (Long-CLIP's rule).

Long-CLIP (Zhang et al., ECCV 2024, arXiv 2403.15378, Section 3.2, "knowledge-preserved stretching") observes
that CLIP's first ~20 position embeddings are well trained and the later ones much less, so it keeps the first
`kept_positions = 20` unchanged and interpolates the remaining `L - 20` over `N - 20` new positions (a ratio
`lambda_2 = (N - 20) / (L - 20)`; 4 in the paper, `77 -> 248`):

    PE*(p) = PE(p)                                          if p < 20
    PE*(p) = (1 - alpha) PE(floor(s)) + alpha PE(floor(s) + 1),   s = 20 + (p - 20) / lambda_2,  alpha = s - floor(s)

The last `lambda_2 - 1` new positions fall beyond the last trained one (`s > L - 1`); like the official Long-CLIP
code, they continue the line through the last two trained positions (`PE(L) := 2 PE(L-1) - PE(L-2)`).
Differences from the official code: any target length is accepted (a fractional ratio is interpolated the same
way), and the rule applied is recorded in the config (`ALIPConfig.text_position_stretch`).

Remote code: torch only.
"""

import torch

LONG_CLIP_RULE = "long-clip"
LONG_CLIP_KEPT_POSITIONS = 20
LONG_CLIP_LENGTH = 248  # 20 + 4 * (77 - 20)


def stretch_position_embeddings(weight: torch.Tensor, new_length: int,
                                kept_positions: int = LONG_CLIP_KEPT_POSITIONS) -> torch.Tensor:
    """Long-CLIP's knowledge-preserved stretching of a `(L, D)` position-embedding table to `(new_length, D)`.

    Rows `0 .. kept_positions - 1` are copied; the others interpolate the trained rows `kept_positions .. L - 1`
    linearly (see the module docstring). Computed in float64, returned in `weight`'s dtype.
    """
    length = weight.shape[0]
    if not 0 < kept_positions < length - 1:
        raise ValueError(f"kept_positions must be in [1, {length - 2}] for {length} positions, got {kept_positions}")
    if new_length <= length:
        raise ValueError(f"new_length must exceed the {length} trained positions, got {new_length}")
    table = weight.detach().double()
    # One virtual row past the end, on the line through the last two trained rows.
    table = torch.cat([table, 2 * table[-1:] - table[-2:-1]])
    ratio = (new_length - kept_positions) / (length - kept_positions)
    positions = torch.arange(kept_positions, new_length, dtype=torch.float64)
    source = kept_positions + (positions - kept_positions) / ratio
    low = source.floor().long()
    alpha = (source - low).unsqueeze(1)
    stretched = (1 - alpha) * table[low] + alpha * table[low + 1]
    return torch.cat([table[:kept_positions], stretched]).to(weight.dtype)


__all__ = ["LONG_CLIP_KEPT_POSITIONS", "LONG_CLIP_LENGTH", "LONG_CLIP_RULE", "stretch_position_embeddings"]
