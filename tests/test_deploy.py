"""Deployment: the AOTInductor export re-runs equal, ``vit bench --deploy`` checks every format against eager
before timing it and writes the documented keys, and ``load_backbone`` says what runs a compiled graph.

No timings are asserted; the tiny models keep compiles short (the AOTInductor ones still take about a minute).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import vit
import vit.bench
from vit.errors import BadInputError
from vit.export import load_backbone
from vit.export.aoti import load_package
from vit.export.writers import export_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))  # the harness is a tool in the checkout, not part of the package

from bench import deploy  # noqa: E402

TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}
FAST = ["--repeats", "3", "--warmup", "1", "--min-time", "0", "--threads", "1"]


def _bench(tmp_path: Path, formats: str, *extra: str) -> dict[str, Any]:
    out = tmp_path / "deploy.json"
    argv = ["--deploy", "--deploy-models", "vit_tiny_patch16_224", "--model-args", json.dumps(TINY),
            "--deploy-batches", "1,2", "--deploy-formats", formats, *FAST, *extra, "--json", str(out)]
    assert vit.bench.main(argv) == 0
    return json.loads(out.read_text())


def _check_record(record: dict[str, Any], formats: list[str]) -> None:
    """Every format equal to eager and timed; the keys follow from the per-repeat seconds."""
    cases = {f"vit_tiny_patch16_224@b{b}" for b in (1, 2)}
    rows = {(r["format"], f"{r['model']}@b{r['batch']}"): r for r in record["deploy"]}
    assert set(rows) == {(f, c) for f in formats for c in cases}
    for (fmt, case), r in rows.items():
        assert r["equal"] and r["max_abs_diff"] <= deploy.FP32_ATOL, (fmt, case, r["max_abs_diff"])
        assert len(r["seconds"]) == 3
        assert record[f"deploy.{fmt}.img_s"][case] == pytest.approx(r["batch"] / statistics.median(r["seconds"]))
    for case in cases:
        best = record["ratio.deploy.by_case"][case]
        ours = [f for f in formats if f != "timm"]
        assert best["format"] == max(ours, key=lambda f: rows[f, case]["img_s"])
        win, timm = rows[best["format"], case], rows["timm", case]
        assert best["ratio"] == pytest.approx(statistics.median(
            t / w for w, t in zip(win["seconds"], timm["seconds"], strict=True)))
    assert record["ratio.deploy"] == record["ratio.deploy.by_case"]["vit_tiny_patch16_224@b2"]["ratio"]
    assert record["ratio.deploy_b1"] == record["ratio.deploy.by_case"]["vit_tiny_patch16_224@b1"]["ratio"]


@pytest.mark.onnx
def test_deploy_bench_checks_then_times_every_format(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    record = _bench(tmp_path, "eager,timm,onnx,onnx-basic,bf16")
    native, why = deploy.native_bf16()
    _check_record({**record, "deploy": [r for r in record["deploy"] if r["format"] != "bf16"]},
                  ["eager", "timm", "onnx", "onnx-basic"])
    if native:  # bf16 is timed and reported with its error, never as equal
        assert all(not r["equal"] for r in record["deploy"] if r["format"] == "bf16")
    else:
        assert record["skipped"] == {"bf16": why}
        assert f"skipped bf16: {why}" in capsys.readouterr().out
    assert set(record["deploy.onnx.compile_s"]) == {"vit_tiny_patch16_224@b1", "vit_tiny_patch16_224@b2"}


@pytest.mark.onnx
def test_deploy_bench_does_not_time_a_format_that_differs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def off_by_1e3(model: Any, *args: Any) -> Any:
        return lambda batch: (lambda x: model(x) + 1e-3)  # above the 1e-4 tolerance

    monkeypatch.setitem(deploy._BUILDERS, "onnx", off_by_1e3)
    record = _bench(tmp_path, "eager,timm,onnx")
    bad = [r for r in record["deploy"] if r["format"] == "onnx"]
    assert bad and all(not r["equal"] and r["img_s"] is None and r["max_abs_diff"] > 1e-4 for r in bad)
    assert "deploy.onnx.img_s" not in record
    assert {b["format"] for b in record["ratio.deploy.by_case"].values()} == {"eager"}


@pytest.mark.slow
def test_deploy_bench_compiled_formats_equal_eager(tmp_path: Path) -> None:
    """torch.compile with freezing (compiles C++; the AOTInductor package has its own export test below)."""
    record = _bench(tmp_path, "eager,timm,compile", "--profile")
    _check_record(record, ["eager", "timm", "compile"])
    profiled = [r for r in record["deploy"] if "profile" in r]
    assert len(profiled) == 2 and all(0 <= r["profile"]["matmul_share"] <= 1 for r in profiled)
    for r in profiled:  # the matmuls' rate against the peak measured in the same run
        p = r["profile"]
        assert p["matmul_peak_flop_s"] == record["peak_flops"]["fp32"] > 0
        assert p["matmul_flop_s"] > 0 and p["bound_if_only_matmul"] == pytest.approx(1 / p["matmul_share"])


def test_matmul_at_peak_follows_from_the_profile() -> None:
    """4 GFLOP in 50 ms of matmul (half of 100 ms): 80 GFLOP/s, 40% of a 200 GFLOP/s peak, 2x left at most."""
    got = deploy.matmul_at_peak({"self_ms": 100.0, "matmul_share": 0.5}, flops=4_000_000_000, peak=200e9)
    assert got == pytest.approx({"matmul_flop_s": 80e9, "matmul_peak_flop_s": 200e9, "matmul_of_peak": 0.4,
                                 "bound_if_only_matmul": 2.0})


@pytest.mark.slow
def test_aoti_export_reruns_equal_and_keeps_a_dynamic_batch(tmp_path: Path) -> None:
    """``vit export --format aoti`` of a tiny model (AOTInductor compiles C++: about a minute on 2 cores)."""
    model = vit.create_model("vit_tiny_patch16_224", **TINY, num_classes=3).eval()
    report = export_model(model, "aoti", tmp_path)
    assert [c.ok for c in report.checks] == [True]  # batches 1 and 3 re-run through the loaded package
    assert {p.name for p in report.files} == {"model.pt2", "config.json"}
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["format"] == "aoti" and config["files"] == {"32x32": "model.pt2"}
    assert config["compiled_for"]["torch"] == torch.__version__
    x = torch.randn(5, 3, 32, 32)  # a batch size neither traced nor checked
    with torch.no_grad():
        torch.testing.assert_close(load_package(tmp_path)(x), model(x), rtol=0, atol=1e-4)
    with pytest.raises(BadInputError, match=r"aoti export.*torch\._inductor\.aoti_load_package\('.*model\.pt2'\)"):
        load_backbone(tmp_path)


@pytest.mark.parametrize(("fmt", "file", "loader"), [
    ("aoti", "model.pt2", "torch._inductor.aoti_load_package"),
    ("torch-export", "model.pt2", "torch.export.load"),
    ("onnx", "model.onnx", "onnxruntime.InferenceSession"),
])
def test_load_backbone_says_what_runs_a_graph_export(tmp_path: Path, fmt: str, file: str, loader: str) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"format": fmt, "files": {"32x32": file}}))
    (tmp_path / file).write_bytes(b"")
    with pytest.raises(BadInputError, match=rf"is a {fmt} export.*{loader}\('{tmp_path / file}'\)"):
        load_backbone(tmp_path)
    with pytest.raises(BadInputError, match=loader):
        load_backbone(tmp_path / file)  # the bare file
