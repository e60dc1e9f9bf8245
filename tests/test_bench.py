"""``vit bench``: its figures follow from what it measured, its FLOPs are analytical, the reference MAE is ours.

No timings are asserted (the machine is shared and noisy): the tests check that every summary figure is the
documented function of the recorded per-repeat times, and that the FLOP counts equal closed forms.
"""

from __future__ import annotations

import json
import math
import re
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import vit
import vit.bench
from vit.flops import count_flops, mae_forward_flops, sdpa_flop_mapping, vit_forward_flops
from vit.models import MaskedAutoencoder, VisionTransformer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))  # the harness is a tool in the checkout, not part of the package

from bench.memory import peak_memory  # noqa: E402
from bench.ratios import paired_ratio  # noqa: E402
from bench.reference_mae import ReferenceMAE  # noqa: E402
from bench.rows import Row  # noqa: E402
from bench.timing import time_interleaved  # noqa: E402

TINY = {"img_size": 32, "patch_size": 4, "embed_dim": 64, "depth": 2, "num_heads": 4}
TINY_MAE = {**TINY, "decoder_embed_dim": 32, "decoder_depth": 1, "decoder_num_heads": 4}
TINY_ARGS = ["--model", "vit_tiny_patch16_224", "--model-args", json.dumps(TINY)]
TINY_MAE_ARGS = ["--mae", "--model", "mae_vit_tiny_patch16", "--model-args", json.dumps(TINY_MAE)]
REPEATS = 3  # odd and > 1, so a median of per-repeat ratios differs from a ratio of medians
# one thread: tiny ops on a busy 2-core machine stall in OpenMP barriers when two threads compete
FAST = ["--batch-size", "2", "--repeats", str(REPEATS), "--warmup", "1", "--min-time", "0", "--peak-size", "256",
        "--threads", "1"]
PATCH_FLOPS = 2 * (32 // 4) ** 2 * 3 * 4 * 4 * 64  # the tiny patch projection: L · C·p·p · D multiply-adds, ×2


def _run(cmd: list[str], out: Path) -> tuple[subprocess.CompletedProcess, dict[str, Any]]:
    proc = subprocess.run([*cmd, "--json", str(out)], capture_output=True, text=True, timeout=300, cwd=out.parent)
    assert proc.returncode == 0, proc.stderr
    return proc, json.loads(out.read_text())


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, dict[str, Any]]:
    """``vit bench`` (through the console script's dispatch) on a tiny ViT against timm."""
    cmd = [sys.executable, "-m", "vit.cli", "bench", *TINY_ARGS, *FAST, "--against", "timm"]
    return _run(cmd, tmp_path_factory.mktemp("vit") / "bench.json")


@pytest.fixture(scope="module")
def mae_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, dict[str, Any]]:
    """``python tools/benchmark.py --mae`` on a tiny MAE against the reference."""
    cmd = [sys.executable, str(ROOT / "tools" / "benchmark.py"), *TINY_MAE_ARGS, *FAST]
    return _run(cmd, tmp_path_factory.mktemp("mae") / "mae.json")


def test_vit_bench_writes_the_documented_record(vit_run: tuple[subprocess.CompletedProcess, dict[str, Any]]) -> None:
    proc, record = vit_run
    assert record["config"]["model"] == record["info"]["model"] == "vit_tiny_patch16_224"
    assert record["config"]["batch_size"] == 2 and record["config"]["model_args"] == TINY
    for key in ("ratio.infer", "ratio.infer_b1", "ratio.train"):
        assert math.isfinite(record[key]) and record[key] > 0, key
    steps = {(r["impl"], r["step"], r["batch"]) for r in record["rows"]}
    assert steps == {(i, s, b) for i in ("ours", "timm") for s, b in (("infer", 1), ("infer", 2), ("train", 2))}
    assert record["info"]["max_abs_diff_vs_timm"] < 1e-5  # same weights, same math (fp32 rounding only)
    assert re.search(r"^other processes kept \d+% of the \d+ CPUs busy during the run", proc.stdout, re.MULTILINE)
    table = [line.split()[:6] for line in proc.stdout.splitlines() if re.match(r"(ours|timm) +fp32 ", line)]
    assert table == [[r["impl"], "fp32", "-", r["step"], str(r["batch"]), f"{r['img_per_s']:,.2f}"]
                     for r in record["rows"]]  # the printed table is the JSON's rows, in order


def test_vit_ratios_are_medians_of_per_repeat_ratios(vit_run: tuple[Any, dict[str, Any]]) -> None:
    _, record = vit_run
    rows = {(r["impl"], r["step"], r["batch"]): r for r in record["rows"]}
    for key, step, batch in (("ratio.infer", "infer", 2), ("ratio.infer_b1", "infer", 1), ("ratio.train", "train", 2)):
        ours, timm = rows["ours", step, batch], rows["timm", step, batch]
        assert record[key] == pytest.approx(_paired(ours, timm), rel=1e-12), key


@pytest.mark.parametrize("run", ["vit_run", "mae_run"])
def test_row_figures_follow_from_the_recorded_seconds(run: str, request: pytest.FixtureRequest) -> None:
    _, record = request.getfixturevalue(run)
    for r in record["rows"]:
        seconds = r["seconds"]
        assert len(seconds) == REPEATS and all(math.isfinite(s) and s > 0 for s in seconds)
        assert r["img_per_s"] == pytest.approx(r["batch"] / statistics.median(seconds), rel=1e-12)
        assert r["img_per_s_best"] == pytest.approx(r["batch"] / min(seconds), rel=1e-12)
        assert r["ms_per_step"] == pytest.approx(1e3 * statistics.median(seconds), rel=1e-12)
        assert r["flops_per_s"] == pytest.approx(r["flops_per_img"] * r["img_per_s"], rel=1e-12)
        assert r["peak_flops"] == record["peak_flops"][r["dtype"]] > 0
        assert r["mfu"] == pytest.approx(r["flops_per_s"] / r["peak_flops"], rel=1e-12)


def test_vit_flops_are_analytical(vit_run: tuple[Any, dict[str, Any]]) -> None:
    _, record = vit_run
    info = record["info"]
    model = vit.create_model("vit_tiny_patch16_224", **TINY)
    assert info["flops_infer"] == info["flops_analytical"] == vit_forward_flops(model)
    assert info["flops_infer_torch_counter_only"] < info["flops_infer"]  # torch alone misses CPU flash attention
    # a training step is three forwards, less the patch projection's input gradient (images need none)
    assert info["flops_train"] == 3 * info["flops_infer"] - PATCH_FLOPS
    for r in record["rows"]:
        assert r["flops_per_img"] == info["flops_train" if r["step"] == "train" else "flops_infer"]


def test_mae_summary_follows_from_the_rows(mae_run: tuple[subprocess.CompletedProcess, dict[str, Any]]) -> None:
    proc, record = mae_run
    info, rows = record["info"], {(r["impl"], r["mask_ratio"]): r for r in record["rows"]}
    assert record["config"]["model"] == info["model"] == "mae_vit_tiny_patch16" and record["config"]["batch_size"] == 2
    assert set(rows) == {(i, m) for i in ("ours", "reference") for m in (0.75, 0.0)}
    flops = info["flops_train"]
    assert record["mae.flop_ratio"] == pytest.approx(flops["0.0"] / flops["0.75"], rel=1e-12)
    assert record["mae.flop_ratio"] > 2  # masking 3/4 of the patches skips most of the encoder
    assert record["mae.speedup"] == pytest.approx(_paired(rows["ours", 0.75], rows["ours", 0.0]), rel=1e-12)
    assert record["mae.efficiency"] == pytest.approx(record["mae.speedup"] / record["mae.flop_ratio"], rel=1e-12)
    assert record["mae.reference.speedup"] == pytest.approx(
        _paired(rows["reference", 0.75], rows["reference", 0.0]), rel=1e-12)
    assert record["mae.ratio_vs_reference"] == pytest.approx(
        _paired(rows["ours", 0.75], rows["reference", 0.75]), rel=1e-12)
    assert record["mae.ratio_vs_reference_mask0"] == pytest.approx(
        _paired(rows["ours", 0.0], rows["reference", 0.0]), rel=1e-12)
    for key in ("mae.speedup", "mae.efficiency", "mae.ratio_vs_reference"):
        assert math.isfinite(record[key]) and record[key] > 0, key
    assert info["abs_loss_diff_vs_reference"] < 1e-5  # same weights and noise → same loss
    assert "ours / reference" in proc.stdout


def test_mae_flops_are_analytical(mae_run: tuple[Any, dict[str, Any]]) -> None:
    _, record = mae_run
    info = record["info"]
    mae = vit.create_model("mae_vit_tiny_patch16", **TINY_MAE)
    for ratio in ("0.75", "0.0"):
        assert info["flops_forward"][ratio] == info["flops_forward_analytical"][ratio]
        assert info["flops_forward"][ratio] == mae_forward_flops(mae, float(ratio))
        kept = int(64 * (1 - float(ratio))) / 64  # MAE embeds only the kept patches (no input gradient)
        assert info["flops_train"][ratio] == 3 * info["flops_forward"][ratio] - PATCH_FLOPS * kept
    for r in record["rows"]:
        assert r["flops_per_img"] == info["flops_train"][str(r["mask_ratio"])]


def test_launcher_without_tools_is_one_error_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(vit.bench, "TOOLS_DIR", tmp_path / "site-packages" / "tools")  # as installed from a wheel
    assert vit.bench.main(["--help"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert err.startswith("vit bench: error: the benchmark ships with the source checkout")
    assert "python tools/benchmark.py" in err


@pytest.mark.parametrize(("argv", "message"), [
    (["--model", "vit_nope"], "unknown model name"),
    ([*TINY_ARGS, "--against", "reference"], "--against reference needs --mae"),
    ([*TINY_MAE_ARGS, "--against", "timm"], "--against timm needs no --mae"),
    (["--model-args", "[1]"], "--model-args must be a JSON object"),
])
def test_usage_errors_exit_2_with_one_line(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert vit.bench.main([*argv, *FAST]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vit bench: ") and message in err


def test_time_interleaved_warms_up_then_rotates_the_order() -> None:
    calls: list[int] = []
    fns = [lambda i=i: calls.append(i) for i in range(3)]
    times = time_interleaved(fns, torch.device("cpu"), warmup=2, repeats=3, min_time=0, labels=["a", "b", "c"])
    warmup = [0, 0, 0, 1, 1, 1, 2, 2, 2]  # two warm-up calls and one calibrating call each
    assert calls == [*warmup, 0, 1, 2, 1, 2, 0, 2, 0, 1]
    assert [m.task_spec.stmt for m in times] == ["a", "b", "c"]
    assert all(m.number_per_run == 1 and len(m.times) == 3 for m in times)


def test_paired_ratio_is_the_median_of_per_repeat_ratios() -> None:
    a = Row("ours", "fp32", False, "train", 4, [1.0, 2.0, 10.0], 1, 1.0)
    b = Row("timm", "fp32", False, "train", 4, [2.0, 4.0, 1.0], 1, 1.0)
    assert paired_ratio(a, b) == 2.0  # per repeat 2, 2, 0.1; the ratio of the medians would be 1
    assert a.img_per_s / b.img_per_s == 1.0


def test_peak_memory_sees_an_allocation() -> None:
    size = 64 * 2**20
    peak = peak_memory(lambda: torch.ones(size // 4), torch.device("cpu"))
    if peak < 0:
        pytest.skip("no /proc/self/clear_refs here")
    assert peak >= size * 0.95  # the tensor's pages are touched; 5% for page and allocator rounding


@pytest.mark.parametrize("global_pool", ["token", "map"])
def test_sdpa_formula_makes_flop_count_analytical(tiny_args: dict, global_pool: str) -> None:
    model = VisionTransformer(**tiny_args, num_classes=10, global_pool=global_pool).eval()
    x = torch.randn(1, 3, 32, 32)
    counted = count_flops(lambda: model(x))
    with torch.utils.flop_counter.FlopCounterMode(display=False) as plain:
        model(x)
    assert counted == vit_forward_flops(model)
    assert plain.get_total_flops() < counted  # torch alone misses the CPU flash-attention kernel


@pytest.mark.parametrize(("mask_ratio", "reg_tokens"), [(0.75, 0), (0.5, 1), (0.0, 0)])
def test_mae_flop_formula_matches_the_counter(tiny_mae_args: dict, mask_ratio: float, reg_tokens: int) -> None:
    mae = MaskedAutoencoder(**tiny_mae_args, reg_tokens=reg_tokens)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert count_flops(lambda: mae(x, mask_ratio)) == mae_forward_flops(mae, mask_ratio)


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


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_reference_mae_matches_ours(tiny_mae_args: dict, norm_pix_loss: bool) -> None:
    ours = MaskedAutoencoder(**tiny_mae_args, norm_pix_loss=norm_pix_loss)
    ref = ReferenceMAE.like(ours)
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 64)
    for ratio in (0.75, 0.0):
        a, b = ours(imgs, ratio, noise), ref(imgs, ratio, noise)
        for x, y in zip(a, b, strict=True):  # loss, pred, mask
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)  # fp32, same ops in a different order
    with torch.no_grad():
        ref.decoder_pred.bias += 0.1  # a different weight must show: the comparison can fail
    assert not torch.allclose(ours(imgs, 0.75, noise)[0], ref(imgs, 0.75, noise)[0], rtol=1e-5, atol=1e-6)


ATTENTION_ARGS = ["--attention", "--attention-tokens", "16,64", "--attention-patterns",
                  "window:4:shift,neighborhood:3,kvpool:2", "--attention-backends", "window,tiles,mask",
                  "--model", "vit_tiny_patch16_224", "--e2e-size", "64", "--e2e-attention", "window:4*1,dense",
                  "--model-args", json.dumps({"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2})]


def test_attention_bench_records_follow_from_its_times(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from vit.layers import attention_schedule, density

    out = tmp_path / "attention.json"
    assert vit.bench.main([*ATTENTION_ARGS, *FAST, "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    rows = record["attention"]
    # every pattern on its automatic backend (the mask below 512 tokens, kvpool always pooled) and on the others
    # asked for that can compute it, plus dense, at every size and step
    want = {(p, b, n, s) for n in (16, 64) for s in ("fwd", "fwd+bwd")
            for p, b in (("dense", "sdpa"), ("window:4:shift", "window"), ("window:4:shift", "mask"),
                         ("neighborhood:3", "tiles"), ("neighborhood:3", "mask"), ("kvpool:2", "kvpool"),
                         ("kvpool:2", "mask"))}
    assert {(r["pattern"], r["backend"], r["tokens"], r["step"]) for r in rows} == want
    for r in rows:
        same = (r["tokens"], r["step"])
        dense = next(d for d in rows if d["pattern"] == "dense" and (d["tokens"], d["step"]) == same)
        assert r["dense_ms"] == dense["ms"] == pytest.approx(1e3 * statistics.median(dense["seconds"]), rel=1e-12)
        assert r["ms"] == pytest.approx(1e3 * statistics.median(r["seconds"]), rel=1e-12)
        assert r["speedup"] == pytest.approx(r["dense_ms"] / r["ms"], rel=1e-12)  # same step, same run
        side = int(r["tokens"] ** 0.5)
        p = attention_schedule(r["pattern"], 2)[1 if r["pattern"].endswith("shift") else 0]
        assert r["density"] == density(p, (side, side), 1) and (r["density"] == 1) == (r["pattern"] == "dense")
        assert len(r["seconds"]) == REPEATS and r["auto"] == (r["backend"] in ("sdpa", "kvpool", "mask")
                                                              and (r["backend"], r["pattern"]) != ("mask", "kvpool:2"))
        assert r["build_ms"] >= 0 and isinstance(r["peak_mem"], int)
    e2e = {(r["attention"], r["step"]): r for r in record["end_to_end"]}
    assert set(e2e) == {(a, s) for a in ("dense", "window:4*1,dense") for s in ("infer", "train")}
    for (_, step), r in e2e.items():
        assert r["speedup"] == pytest.approx(r["dense_ms"] / r["ms"], rel=1e-12)
        assert r["flop_speedup"] == e2e["dense", step]["flops"] / r["flops"]
    assert e2e["window:4*1,dense", "infer"]["flops"] < e2e["dense", "infer"]["flops"]  # density × dense cores
    assert "end to end (infer)" in record["targets"]
    table = capsys.readouterr().out
    assert "neighborhood:3" in table and "targets (fp32, this machine)" in table


def _paired(a: dict[str, Any], b: dict[str, Any]) -> float:
    """img/s of row ``a`` over row ``b``, median over the repeats of each repeat's ratio (written out again here)."""
    ratios = sorted((a["batch"] / ta) / (b["batch"] / tb) for ta, tb in zip(a["seconds"], b["seconds"], strict=True))
    return ratios[len(ratios) // 2]


def test_bench_data_record_follows_from_its_measurements(tmp_path: Path) -> None:
    """``vit bench --data``: loader rows per source and worker count, the train step, and cores per GPU from them."""
    cmd = [sys.executable, "-m", "vit.cli", "bench", "--data", "--model", "mae_vit_tiny_patch16", "--model-args",
           json.dumps(TINY_MAE), "--batch-size", "4", "--data-images", "8", "--data-workers", "0,1", "--repeats",
           str(REPEATS), "--warmup", "1", "--min-time", "0", "--threads", "1", "--device", "cpu"]
    proc, record = _run(cmd, tmp_path / "data.json")
    data = record["data"]
    assert {"images", "source_size", "crop", "jpeg_bytes_mean", "batch_size", "rows", "train_step", "gpu",
            "img_per_s_per_core", "cores_per_gpu", "other_processes_cpu"} <= set(data)
    assert data["images"] == 8 and data["source_size"] == [500, 375] and data["crop"] == 224
    assert {(r["source"], r["workers"]) for r in data["rows"]} == {(s, w) for s in ("folder", "shards") for w in (0, 1)}
    for r in data["rows"]:
        assert len(r["per_repeat"]) == REPEATS and r["img_per_s"] == statistics.median(r["per_repeat"]) > 0
    step, gpu = data["train_step"], data["gpu"]
    mae = vit.create_model("mae_vit_tiny_patch16", **TINY_MAE)
    assert step["flops_per_img"] == count_flops(lambda: mae(torch.randn(1, 3, 32, 32), 0.75)[0].backward())
    # off CUDA the GPU's rate is the assumed peak x MFU over the counted FLOPs (defaults: H100 SXM, 40%)
    assert gpu["img_per_s"] == pytest.approx(989e12 * 0.4 / step["flops_per_img"], rel=1e-12)
    for src in ("folder", "shards"):
        best = max(r["img_per_s"] / max(r["workers"], 1) for r in data["rows"] if r["source"] == src)
        assert data["img_per_s_per_core"][src] == best
        assert data["cores_per_gpu"][src] == pytest.approx(gpu["img_per_s"] / best, rel=1e-12)
    table = [line.split()[:3] for line in proc.stdout.splitlines() if re.match(r"(folder|shards) +\d", line)]
    assert table == [[r["source"], str(r["workers"]), f"{r['img_per_s']:,.1f}"] for r in data["rows"]]
    assert "CPU cores per GPU to keep up: folder" in proc.stdout
