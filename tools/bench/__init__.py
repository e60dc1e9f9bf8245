"""``vit bench``: throughput, peak memory, FLOPs and MFU of our models, side by side with timm and the MAE reference.

Everything is measured in one process, interleaved (each repeat runs every candidate once, in rotating order),
after warm-up, and reported as medians, because a shared machine drifts between runs. FLOPs are counted with
``FlopCounterMode`` plus our own formula for the fused attention kernels (``vit.flops``), and are model FLOPs.
MFU is achieved FLOP/s over a measured matmul peak.

A tool, not library code: it lives in the source checkout and runs as ``vit bench`` or ``python tools/benchmark.py``.
"""
