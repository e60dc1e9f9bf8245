"""The benchmark runs, prints its table and writes JSON; FLOP counting with our SDPA formula is exact.

No timings are asserted: speed is what ``vit bench`` reports, not what tests check.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vit.bench import ReferenceMAE, count_flops, main, sdpa_flop_mapping, vit_forward_flops
from vit.models import MaskedAutoencoder, VisionTransformer

ROOT = Path(__file__).resolve().parents[1]
TINY_ARGS = ["--model", "vit_tiny_patch16_224", "--model-args",
             '{"img_size":32,"patch_size":4,"embed_dim":64,"depth":2,"num_heads":4}']
# one thread: tiny ops on a busy 2-core machine stall in OpenMP barriers when two threads compete
FAST = ["--batch-size", "2", "--repeats", "1", "--warmup", "1", "--min-time", "0", "--peak-size", "256",
        "--threads", "1"]
TINY_MAE_ARGS = ["--mae", "--model", "mae_vit_tiny_patch16", "--model-args",
                 '{"img_size":32,"patch_size":4,"embed_dim":64,"depth":2,"num_heads":4,'
                 '"decoder_embed_dim":32,"decoder_depth":1,"decoder_num_heads":4}']


def test_vit_against_timm_prints_table_and_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    assert main([*TINY_ARGS, *FAST, "--against", "timm", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "img/s" in text and "MFU" in text and "ratio.train" in text
    record = json.loads(out.read_text())
    assert {"ratio.infer", "ratio.infer_b1", "ratio.train"} <= record.keys()
    assert record["info"]["max_abs_diff_vs_timm"] < 1e-5  # same weights, same math (fp32 rounding only)
    assert record["info"]["flops_infer"] == record["info"]["flops_analytical"]
    steps = {(r["impl"], r["step"], r["batch"]) for r in record["rows"]}
    assert steps == {(i, s, b) for i in ("ours", "timm") for s, b in (("infer", 1), ("infer", 2), ("train", 2))}
    assert all(r["img_per_s"] > 0 and r["flops_per_img"] > 0 for r in record["rows"])


def test_mae_mode_reports_speedup_and_reference(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "mae.json"
    assert main([*TINY_MAE_ARGS, *FAST, "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "speedup" in text and "FLOP ratio" in text and "ours / reference" in text
    record = json.loads(out.read_text())
    for key in ("mae.speedup", "mae.flop_ratio", "mae.efficiency", "mae.ratio_vs_reference"):
        assert record[key] > 0, key
    assert record["mae.flop_ratio"] > 1  # masking 3/4 of the patches must save FLOPs
    assert record["info"]["abs_loss_diff_vs_reference"] < 1e-5  # same weights and noise → same loss


def test_script_runs_as_a_subprocess(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(ROOT / "tools" / "benchmark.py"), *TINY_ARGS, *FAST, "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "infer" in proc.stdout and "train" in proc.stdout
    assert json.loads(out.read_text())["rows"]


def test_unknown_model_is_a_clean_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--model", "vit_nope", *FAST]) == 2
    assert "unknown model name" in capsys.readouterr().err


@pytest.mark.parametrize("global_pool", ["token", "map"])
def test_sdpa_formula_makes_flop_count_analytical(tiny_args: dict, global_pool: str) -> None:
    model = VisionTransformer(**tiny_args, num_classes=10, global_pool=global_pool).eval()
    x = torch.randn(1, 3, 32, 32)
    counted = count_flops(lambda: model(x))
    with torch.utils.flop_counter.FlopCounterMode(display=False) as plain:
        model(x)
    assert counted == vit_forward_flops(model)
    assert plain.get_total_flops() < counted  # torch alone misses the CPU flash-attention kernel


def test_fused_and_manual_attention_count_the_same(tiny_args: dict) -> None:
    model = VisionTransformer(**tiny_args, num_classes=10)
    x = torch.randn(2, 3, 32, 32)

    def train_flops() -> int:
        flops = count_flops(lambda: model(x).sum().backward())
        model.zero_grad(set_to_none=True)
        return flops

    fused = train_flops()
    for blk in model.blocks:
        blk.attn.fused_attn = False  # the manual path: plain matmuls torch already counts
    assert train_flops() == fused
    assert len(sdpa_flop_mapping()) >= 2


def test_reference_mae_matches_ours(tiny_mae_args: dict) -> None:
    ours = MaskedAutoencoder(**tiny_mae_args)
    ref = ReferenceMAE.like(ours)
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 64)
    for ratio in (0.75, 0.0):
        a, b = ours(imgs, ratio, noise), ref(imgs, ratio, noise)
        torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-6)  # fp32, same ops in a different order
        torch.testing.assert_close(a[2], b[2])
