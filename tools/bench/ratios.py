"""The summary figures: ours over timm per step, and MAE's masking speedup against its FLOP ratio."""

from __future__ import annotations

import statistics
from typing import Any

from .rows import Row


def paired_ratio(a: Row, b: Row) -> float:
    """img/s of ``a`` over ``b``: the median over repeats of each repeat's ratio.

    ``a`` and ``b`` ran in the same interleaved group, so repeat r of each ran back to back; pairing them cancels
    load that drifts over the run, which a ratio of the two medians would not.
    """
    return statistics.median((a.batch / ta) / (b.batch / tb) for ta, tb in zip(a.seconds, b.seconds, strict=True))


def vit_ratios(rows: list[Row], batch: int, first: tuple[str, bool]) -> dict[str, float]:
    """ours / timm img/s per step; keys ``ratio.infer`` (batch B), ``ratio.infer_b1``, ``ratio.train``.

    Keys of every (dtype, compiled) but ``first`` end in ``.bf16``, ``.fp32.compile``, ...
    """
    out = {}
    for dtype, compiled in {(r.dtype, r.compiled) for r in rows}:
        sfx = _suffix(dtype, compiled, first)
        for key, step, b in (("infer", "infer", batch), ("infer_b1", "infer", 1), ("train", "train", batch)):
            ours = _find(rows, impl="ours", dtype=dtype, compiled=compiled, step=step, batch=b)
            theirs = _find(rows, impl="timm", dtype=dtype, compiled=compiled, step=step, batch=b)
            if ours and theirs:
                out[f"ratio.{key}{sfx}"] = paired_ratio(ours, theirs)
    return out


def mae_ratios(rows: list[Row], flops: dict[str, int], first: tuple[str, bool]) -> dict[str, float]:
    """Speedup of mask 0.75 over 0.0, the FLOP ratio, efficiency, and ours / reference at 0.75 (and 0.0)."""
    out = {}
    flop_ratio = flops["0.0"] / flops["0.75"]
    for dtype, compiled in {(r.dtype, r.compiled) for r in rows}:
        sfx = _suffix(dtype, compiled, first)
        got = {(r.impl, r.mask_ratio): r for r in rows if r.dtype == dtype and r.compiled == compiled}
        out[f"mae.flop_ratio{sfx}"] = flop_ratio
        for impl, prefix in (("ours", "mae"), ("reference", "mae.reference")):
            if (impl, 0.75) in got:
                speedup = paired_ratio(got[impl, 0.75], got[impl, 0.0])
                out[f"{prefix}.speedup{sfx}"] = speedup
                out[f"{prefix}.efficiency{sfx}"] = speedup / flop_ratio
        if ("reference", 0.75) in got:
            out[f"mae.ratio_vs_reference{sfx}"] = paired_ratio(got["ours", 0.75], got["reference", 0.75])
            out[f"mae.ratio_vs_reference_mask0{sfx}"] = paired_ratio(got["ours", 0.0], got["reference", 0.0])
    return out


def _find(rows: list[Row], **want: Any) -> Row | None:
    for r in rows:
        if all(getattr(r, k) == v for k, v in want.items()):
            return r
    return None


def _suffix(dtype: str, compiled: bool, first: tuple[str, bool]) -> str:
    return "" if (dtype, compiled) == first else f".{dtype}{'.compile' if compiled else ''}"
