"""Position embeddings: fixed 2-D sin-cos (MAE) and resampling a learned grid to a new grid size."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sincos_2d_pos_embed(
    embed_dim: int, grid_size: tuple[int, int], num_prefix_tokens: int = 0, temperature: float = 10000.0
) -> torch.Tensor:
    """Fixed 2-D sin-cos embedding [1, prefix + gh·gw, D] as in MAE; prefix tokens get zeros.

    Half the channels encode the row, half the column; rows of the (gh, gw) grid are laid out row-major,
    matching ``PatchEmbed``. Channel order follows the MAE reference (w-embedding first, then h), so its
    published checkpoints line up.
    """
    if embed_dim % 4 != 0:
        raise ValueError(f"embed_dim {embed_dim} must be divisible by 4 for a 2-D sin-cos position embedding")
    gh, gw = grid_size
    rows, cols = torch.meshgrid(
        torch.arange(gh, dtype=torch.float64), torch.arange(gw, dtype=torch.float64), indexing="ij"
    )
    omega = 1.0 / temperature ** (torch.arange(embed_dim // 4, dtype=torch.float64) / (embed_dim / 4.0))

    def embed_1d(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * omega.reshape(1, -1)  # (gh*gw, D/4)
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    emb = torch.cat([embed_1d(cols), embed_1d(rows)], dim=1)  # (gh*gw, D)
    emb = torch.cat([torch.zeros(num_prefix_tokens, embed_dim, dtype=emb.dtype), emb], dim=0)
    return emb.float().unsqueeze(0)


def resample_pos_embed(
    pos_embed: torch.Tensor,
    new_grid: tuple[int, int],
    old_grid: tuple[int, int],
    num_prefix_tokens: int = 0,
    mode: str = "bicubic",
    antialias: bool = True,
) -> torch.Tensor:
    """Resample a position-embedding grid [1, prefix + oh·ow, D] to [1, prefix + nh·nw, D].

    Grids are explicit (h, w) pairs so non-square images resample correctly; prefix tokens (class,
    registers) are kept as they are. Interpolation runs in fp32 (bicubic, antialiased when shrinking,
    like timm) and the result keeps the input dtype.
    """
    oh, ow = old_grid
    nh, nw = new_grid
    n_expected = num_prefix_tokens + oh * ow
    if pos_embed.ndim != 3 or pos_embed.shape[1] != n_expected:
        raise ValueError(
            f"pos_embed of shape {tuple(pos_embed.shape)} does not hold {num_prefix_tokens} prefix tokens "
            f"plus a {oh}x{ow} grid ({n_expected} positions)"
        )
    if (nh, nw) == (oh, ow):
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    D, dtype = grid.shape[-1], grid.dtype
    grid = grid.reshape(1, oh, ow, D).permute(0, 3, 1, 2).float()  # (1, D, oh, ow)
    grid = F.interpolate(grid, size=(nh, nw), mode=mode, antialias=antialias, align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, nh * nw, D).to(dtype)
    return torch.cat([prefix, grid], dim=1)
