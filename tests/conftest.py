"""Shared fixtures: tiny models (32×32 images, patch 4, width 64), seeded RNG, offline wandb."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# one digits cache per test session (subprocesses inherit it), never the user's ~/.cache
os.environ["VIT_CACHE_DIR"] = tempfile.mkdtemp(prefix="vitkit-test-cache-")
if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n N: N workers share the cores, one compute thread each
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"  # and so do their subprocesses
    torch.set_num_threads(1)

TINY = dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4)
TINY_MAE = dict(TINY, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def tiny_args() -> dict:
    """Constructor arguments of a tiny ViT for fast tests."""
    return dict(TINY)


@pytest.fixture
def tiny_mae_args() -> dict:
    """Constructor arguments of a tiny MAE for fast tests."""
    return dict(TINY_MAE)
