#!/usr/bin/env python
"""Benchmark our models side by side with timm and the MAE reference; the same as ``vit bench``.

    python tools/benchmark.py --model vit_small_patch16_224 --batch-size 32 --against timm
    python tools/benchmark.py --mae --batch-size 32

The harness is the package ``tools/bench`` next to this file (Python puts this folder first on sys.path).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from bench.command import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
