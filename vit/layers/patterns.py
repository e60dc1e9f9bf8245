"""The attention-pattern vocabulary: which keys each query sees, spelled as short strings, and per-block schedules.

    dense                every query sees every key (the default)
    window:W             non-overlapping W×W cells of the patch grid, from the top-left corner (Swin)
    window:W:shift       the same, with the cell boundaries of every odd-indexed block moved by W//2 (Swin's shift)
    neighborhood:K[:D]   the K×K patches around each query (K odd), the window clamped inside the grid (NATTEN);
                         dilation D takes every D-th patch, i.e. a K×K neighbourhood in the query's D×D sub-grid
    sliding:N            a band of ±N patches in raster order
    strided:S            |i − j| < S or i − j ≡ 0 (mod S) in raster order: Sparse Transformer's two strided heads
                         merged into one (bidirectional: a ViT has no causal order)
    kvpool:S             keys and values averaged over S×S cells of the grid (MViT / PVT); queries keep full resolution

Class and register tokens (the prefix) are global in every pattern: they see every token and every token sees them.
A schedule is a comma-separated cycle of patterns applied block by block, each entry optionally repeated with
``*n``: ``window:16*3,dense`` makes blocks 3, 7, 11, ... dense (ViTDet). A list of strings means the same cycle.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

KINDS = ("dense", "window", "neighborhood", "sliding", "strided", "kvpool")
SPATIAL = ("window", "neighborhood", "kvpool")  # patterns defined on the 2-D grid (the others on raster order)
AttentionSpec = str | Sequence[str]


@dataclass(frozen=True)
class Pattern:
    """One block's pattern, as parsed from its spelling.

    Args:
        kind: one of ``KINDS``.
        size: the window W, kernel K, band N, stride S or pool S (0 for dense).
        dilation: neighborhood dilation D (1 elsewhere).
        shift: window only: the cell boundaries sit at rows and columns ``shift + k·W`` (0 or W//2).
        shifted: window only: spelled ``:shift``, so the schedule shifts odd blocks (W//2) and not even ones (0).
    """

    kind: str = "dense"
    size: int = 0
    dilation: int = 1
    shift: int = 0
    shifted: bool = False

    @property
    def is_dense(self) -> bool:
        return self.kind == "dense"

    def __str__(self) -> str:
        if self.kind == "dense":
            return "dense"
        if self.kind == "window":
            return f"window:{self.size}" + (":shift" if self.shift else "")
        if self.kind == "neighborhood" and self.dilation > 1:
            return f"neighborhood:{self.size}:{self.dilation}"
        return f"{self.kind}:{self.size}"


def parse_pattern(spec: str | Pattern) -> Pattern:
    """``"window:8:shift"`` → ``Pattern("window", 8, shifted=True)``; ValueError naming the spelling otherwise."""
    if isinstance(spec, Pattern):
        return spec
    parts = str(spec).strip().split(":")
    kind, args = parts[0], parts[1:]
    if kind not in KINDS:
        raise ValueError(f"unknown attention pattern {spec!r}: the kind must be one of {', '.join(KINDS)}")
    if kind == "dense":
        if args:
            raise ValueError(f"attention pattern {spec!r}: dense takes no arguments")
        return Pattern()
    max_args = 2 if kind in ("window", "neighborhood") else 1
    if not 1 <= len(args) <= max_args:
        raise ValueError(f"attention pattern {spec!r}: expected {_GRAMMAR[kind]}")
    size = _positive(args[0], spec, kind)
    if kind == "window":
        if len(args) == 2 and args[1] != "shift":
            raise ValueError(f"attention pattern {spec!r}: expected {_GRAMMAR[kind]}")
        shifted = len(args) == 2
        if shifted and size < 2:
            raise ValueError(f"attention pattern {spec!r}: a shifted window needs W >= 2 (the shift is W // 2)")
        return Pattern("window", size, shift=size // 2 if shifted else 0, shifted=shifted)
    if kind == "neighborhood":
        if size % 2 == 0:
            raise ValueError(f"attention pattern {spec!r}: the neighbourhood K must be odd (centred on its query)")
        dilation = _positive(args[1], spec, kind) if len(args) == 2 else 1
        return Pattern("neighborhood", size, dilation=dilation)
    return Pattern(kind, size)


def attention_schedule(attention: AttentionSpec | None, depth: int) -> list[Pattern]:
    """The pattern of each of ``depth`` blocks: the cycle ``attention`` spells, repeated; shifts on odd blocks.

    A cycle longer than ``depth`` is an error (it would leave entries unused), as is an empty one.
    """
    cycle = _cycle(attention)
    if len(cycle) > depth:
        raise ValueError(f"attention schedule {_spelled(attention)!r} has {len(cycle)} entries for {depth} blocks")
    patterns = []
    for i in range(depth):
        p = cycle[i % len(cycle)]
        if p.shifted:
            p = replace(p, shift=p.size // 2 if i % 2 == 1 else 0)
        patterns.append(p)
    return patterns


def _cycle(attention: AttentionSpec | None) -> list[Pattern]:
    items = (attention or "dense").split(",") if isinstance(attention, str | type(None)) else list(attention)
    cycle: list[Pattern] = []
    for item in items:
        spec, _, times = str(item).strip().partition("*")
        n = _positive(times, item, "repeat") if times else 1
        cycle += [parse_pattern(spec)] * n
    if not cycle:
        raise ValueError("attention schedule is empty: give a pattern such as 'dense' or 'window:8'")
    return cycle


def _positive(text: str, spec: object, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise ValueError(f"attention pattern {spec!r}: {what} needs a positive integer, got {text!r}")
    return value


def _spelled(attention: AttentionSpec | None) -> str:
    return attention if isinstance(attention, str) else ",".join(map(str, attention or ()))


_GRAMMAR = {
    "window": "window:W or window:W:shift",
    "neighborhood": "neighborhood:K or neighborhood:K:D (dilation)",
    "sliding": "sliding:N",
    "strided": "strided:S",
    "kvpool": "kvpool:S",
}
