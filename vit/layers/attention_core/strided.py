"""strided:S by restructuring: the band by chunks of S queries, the column by residue groups, one softmax.

Query i sees keys with |i − j| < S (its chunk and the two beside it: 3S candidates) and keys with
i − j ≡ 0 (mod S) (its residue group: ceil(N/S) candidates, itself left to the band). Both score sets and the
prefix keys are concatenated per query, normalised together, and applied to their own values: about
P + 3S + N/S scores per query instead of N. The softmax is explicit (fused SDPA takes one key set).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from vit.layers.attention_core.cache import cached
from vit.layers.patterns import Pattern


def strided_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern, grid: tuple[int, int], P: int,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """The patch queries' rows [B, H, N, d] of q, k, v [B, H, P + N, d]: band, column and prefix keys."""
    S = pattern.size
    q = q[:, :, P:]
    B, H, N, d = q.shape
    R = math.ceil(N / S)
    band_idx, band_mask, col_mask = strided_tables(S, N, q.device)
    qp, kp, vp = (F.pad(t, (0, 0, 0, R * S - N)) for t in (q * d**-0.5, k[:, :, P:], v[:, :, P:]))
    kb, vb = (F.pad(t, (0, 0, S, S)).index_select(2, band_idx).reshape(B, H, R, 3 * S, d) for t in (kp, vp))
    qr = qp.reshape(B, H, R, S, d)  # chunk r holds queries r·S .. r·S + S − 1
    kc, vc = (t.reshape(B, H, R, S, d).transpose(2, 3) for t in (kp, vp))  # (B, H, S, R, d): residue groups
    band = (qr @ kb.transpose(-2, -1)).masked_fill(~band_mask, float("-inf"))  # (B, H, R, S, 3S)
    col = (qr.transpose(2, 3) @ kc.transpose(-2, -1)).transpose(2, 3)  # (B, H, R, S, R)
    parts = [band, col.masked_fill(~col_mask, float("-inf"))]
    if P:
        parts.insert(0, qr @ k[:, :, None, :P].transpose(-2, -1))  # (B, H, R, S, P)
    probs = torch.cat(parts, dim=-1).softmax(dim=-1)
    if dropout_p:
        probs = F.dropout(probs, dropout_p)
    p_pre, p_band, p_col = probs.split([P, 3 * S, R], dim=-1)
    out = p_band @ vb + (p_col.transpose(2, 3) @ vc).transpose(2, 3)  # (B, H, R, S, d)
    if P:
        out = out + p_pre @ v[:, :, None, :P]
    return out.reshape(B, H, R * S, d)[:, :, :N]


def strided_tables(S: int, N: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Band halo indices [R·3S] into the keys padded by S each side, the band mask [R, S, 3S], the column mask
    [R, S, R] (query chunk, offset, key chunk)."""

    def build() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        R = math.ceil(N / S)
        r, a = torch.arange(R)[:, None, None], torch.arange(S)[None, :, None]
        b = torch.arange(3 * S)[None, None, :]
        j = r * S - S + b  # the key in band slot b of chunk r
        band = ((a + S - b).abs() < S) & (j >= 0) & (j < N)
        r_key = torch.arange(R)[None, None, :]
        col = (r_key * S + a < N) & (r_key != r)
        idx = (torch.arange(R)[:, None] * S + torch.arange(3 * S)).flatten()
        return idx.to(device), band.to(device), col.to(device)

    return cached(("strided", S, N, str(device)), build)
