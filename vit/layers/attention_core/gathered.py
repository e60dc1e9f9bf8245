"""Restructured attention by gathering: query groups and the keys each group sees, one fused SDPA call for all.

A pattern's table says, per group, which tokens are its queries and which its keys (the prefix keys first);
groups are padded to equal sizes with filler entries that the mask hides (filler queries see every key, so no
softmax row is empty, and their rows are dropped). Each group is one (batch, head) entry of the SDPA call. Tables
are built from Python integers without data-dependent steps, so torch.export and ONNX record them as constants.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class GatherTables(NamedTuple):
    """Token indices of the groups' queries [G·Tq] and keys [G·Tk], every patch's place among the gathered
    queries [N], the group count G, and the additive mask [1, heads·G, Tq, Tk] (None: every key is visible)."""

    queries: torch.Tensor
    keys: torch.Tensor
    places: torch.Tensor
    groups: int
    mask: torch.Tensor | None


def gathered_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tables: GatherTables, dropout_p: float = 0.0
) -> torch.Tensor:
    """The patch queries' rows [B, H, N, d] from q, k, v [B, H, P + N, d], computed group by group."""
    B, H, _, d = q.shape
    qg = q.index_select(2, tables.queries).reshape(B, H * tables.groups, -1, d)
    kg, vg = (t.index_select(2, tables.keys).reshape(B, H * tables.groups, -1, d) for t in (k, v))
    mask = None if tables.mask is None else tables.mask.to(q.dtype)
    out = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask, dropout_p=dropout_p)
    return out.reshape(B, H, -1, d).index_select(2, tables.places)


def make_tables(
    queries: torch.Tensor, keys: torch.Tensor, seen: torch.Tensor | None, N: int, P: int, heads: int,
    device: torch.device,
) -> GatherTables:
    """Tables from per-group patch indices ``queries`` [G, Tq] (each of the N patches once) and ``keys``
    [G, Tk] (−1 = filler) and the visibility ``seen`` [G, Tq, Tk] among them; None only when there is no filler
    and every key is visible. The prefix keys are put first in every group."""
    G = queries.shape[0]
    real_q = queries >= 0
    flat = queries.clamp(min=0).flatten()
    places = torch.zeros(N + 1, dtype=torch.long).scatter_(0, queries.where(real_q, N).flatten(),
                                                           torch.arange(flat.numel()))[:N]
    keys_all = torch.cat([torch.arange(P).expand(G, P), keys.clamp(min=0) + P], dim=1)
    mask = None
    if seen is not None:
        visible = (seen & (keys >= 0)[:, None, :]) | ~real_q[:, :, None]
        visible = torch.cat([visible.new_ones(G, visible.shape[1], P), visible], dim=2)
        mask = torch.zeros(visible.shape).masked_fill(~visible, float("-inf")).repeat(heads, 1, 1)[None].to(device)
    return GatherTables((flat + P).to(device), keys_all.flatten().to(device), places.to(device), G, mask)
