"""Restructured attention by gathering: query groups and the keys each group sees, fused SDPA calls over them.

A pattern's tables say, per group, which tokens are its queries and which its keys (the prefix keys first). Groups
of one size form a part, one SDPA call that sees (batch·heads, groups, ·, d), so one mask per group serves every
image and head. Within a part, groups are padded to equal sizes with filler entries that the mask hides (filler
queries see every key, so no softmax row is empty, and their rows are dropped); a part without filler or hidden
keys has no mask and SDPA runs its unmasked kernel. Tables are built from Python integers without data-dependent
steps, so torch.export and ONNX record them as constants.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F


class GatherPart(NamedTuple):
    """One SDPA call: token indices of its groups' queries [G·Tq] and keys [G·Tk], the group count G, and the
    additive mask [1, G, Tq, Tk] (None: every key is visible)."""

    queries: torch.Tensor
    keys: torch.Tensor
    groups: int
    mask: torch.Tensor | None


class GatherTables(NamedTuple):
    """The parts of a pattern, and every patch's place among the parts' gathered query rows, in order [N]."""

    parts: tuple[GatherPart, ...]
    places: torch.Tensor


def gathered_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tables: GatherTables, dropout_p: float = 0.0
) -> torch.Tensor:
    """The patch queries' rows [B, H, N, d] from q, k, v [B, H, P + N, d], computed group by group."""
    B, H, _, d = q.shape
    rows = []
    for part in tables.parts:
        qg = q.index_select(2, part.queries).reshape(B * H, part.groups, -1, d)  # views of the gathered rows
        kg, vg = (t.index_select(2, part.keys).reshape(B * H, part.groups, -1, d) for t in (k, v))
        mask = None if part.mask is None else part.mask.to(q.dtype)
        out = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask, dropout_p=dropout_p)
        rows.append(out.reshape(B, H, -1, d))
    out = rows[0] if len(rows) == 1 else torch.cat(rows, dim=2)
    return out.index_select(2, tables.places)


def make_tables(
    queries: torch.Tensor, keys: torch.Tensor, seen: torch.Tensor | None, N: int, P: int, device: torch.device
) -> GatherTables:
    """One-part tables from per-group patch indices ``queries`` [G, Tq] (each of the N patches once) and ``keys``
    [G, Tk] (−1 = filler) and the visibility ``seen`` [G, Tq, Tk] among them; None only when there is no filler
    and every key is visible. The prefix keys are put first in every group."""
    return make_parts([(queries, keys, seen)], N, P, device)


def make_parts(
    parts: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]], N: int, P: int, device: torch.device
) -> GatherTables:
    """Tables of several parts, each given as ``make_tables`` takes one; every patch is a query of one group."""
    built, order = [], []
    for queries, keys, seen in parts:
        G = queries.shape[0]
        real_q = queries >= 0
        order.append(queries.where(real_q, N).flatten())
        keys_all = torch.cat([torch.arange(P).expand(G, P), keys.clamp(min=0) + P], dim=1)
        mask = None
        if seen is not None:
            visible = (seen & (keys >= 0)[:, None, :]) | ~real_q[:, :, None]
            visible = torch.cat([visible.new_ones(G, visible.shape[1], P), visible], dim=2)
            mask = torch.zeros(visible.shape).masked_fill(~visible, float("-inf"))[None].to(device)
        built.append(GatherPart((queries.clamp(min=0).flatten() + P).to(device), keys_all.flatten().to(device), G,
                                mask))
    rows = torch.cat(order)
    places = torch.zeros(N + 1, dtype=torch.long).scatter_(0, rows, torch.arange(rows.numel()))[:N]
    return GatherTables(tuple(built), places.to(device))
