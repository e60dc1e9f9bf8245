"""`vit export` and `vit.load_backbone`: every format loaded back by its consumer, checkpoints, safety, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import timm
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader, TensorDataset

import vit
from vit.export import (
    ExportCheckError,
    UnsafeCheckpointError,
    build_network,
    export_model,
    find_checkpoint,
    read_weights,
    record_of,
    resize_model,
    timm_config,
)
from vit.export.command import main
from vit.models import RECORD_KEY, MaskedAutoencoder, NetworkRecord, VisionTransformer
from vit.train import ImageClassifier

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4)
TINY_MAE = dict(TINY, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4)
CLASSES = ["cat", "dog", "eel"]


class TinyData(L.LightningDataModule):
    """Random images with the data module's public facts: class names and the preprocessing to record."""

    preprocessing = {"img_size": [32, 32], "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3], "crop_pct": 1.0,
                     "interpolation": "bicubic"}

    def __init__(self) -> None:
        super().__init__()
        self.class_names, self.num_classes = CLASSES, len(CLASSES)

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        data = TensorDataset(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 3, (8,), generator=g))
        return DataLoader(data, batch_size=4)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real run of our classifier: two AdamW steps of a tiny ViT, checkpointed by the default ModelCheckpoint."""
    root = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    module = ImageClassifier("vit_tiny_patch16_224", model_kwargs=TINY, mixup=0.0, cutmix=0.0, warmup_epochs=0,
                             base_lr=0.1)
    trainer = L.Trainer(max_steps=2, default_root_dir=root, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", devices=1)
    trainer.fit(module, datamodule=TinyData())
    torch.save(module.model.state_dict(), root / "trained_state.pt")
    return root


@pytest.fixture(scope="module")
def trained(run_dir: Path) -> VisionTransformer:
    return vit.load_backbone(run_dir)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def _lightning_ckpt(path: Path, net: torch.nn.Module, record: dict | None) -> None:
    """A checkpoint laid out as our LightningModules write it: the network under ``model.``, its record beside."""
    ckpt = {"pytorch-lightning_version": "2.6.6", "hyper_parameters": {"model": "anything"},
            "state_dict": {f"model.{k}": v for k, v in net.state_dict().items()}}
    if record is not None:
        ckpt[RECORD_KEY] = {**record, "state_prefix": "model."}
    torch.save(ckpt, path)


def _mae_ckpt(path: Path) -> MaskedAutoencoder:
    """An MAE one optimiser step from init, checkpointed as MAEPretrainer does (weights + record)."""
    mae = vit.create_model("mae_vit_base_patch16", **TINY_MAE, norm_pix_loss=True)
    opt = torch.optim.AdamW(mae.parameters(), lr=1e-2)
    mae(torch.randn(2, 3, 32, 32))[0].backward()
    opt.step()
    _lightning_ckpt(path, mae, NetworkRecord.from_model(mae, name="mae_vit_base_patch16").to_dict())
    return mae.eval()


def _read(path: Path) -> tuple[torch.nn.Module, dict]:
    """What `vit export` reads: the network built from the source's record, and the record."""
    weights = read_weights(path)
    net = build_network(weights)
    return net, record_of(weights, net).to_dict()


# ------------------------------------------------------------------------------------------ checkpoints


def test_real_lightning_checkpoint_rebuilds_the_network(run_dir: Path, trained: VisionTransformer) -> None:
    ckpt = find_checkpoint(run_dir)
    assert ckpt.suffix == ".ckpt" and ckpt.is_relative_to(run_dir)
    record = torch.load(ckpt, weights_only=True)[RECORD_KEY]
    assert record["name"] == "vit_tiny_patch16_224" and record["model_args"]["global_pool"] == "avg"
    assert record["class_names"] == CLASSES and record["mean"] == TinyData.preprocessing["mean"]
    model, meta = _read(ckpt)
    assert meta["class_names"] == CLASSES and meta["std"] == TinyData.preprocessing["std"]
    state = torch.load(run_dir / "trained_state.pt", weights_only=True)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)
    fresh = vit.create_model("vit_tiny_patch16_224", num_classes=3, global_pool="avg", **TINY)
    assert _max_diff(fresh.head.weight, model.head.weight) > 1e-3  # trained, not init values
    assert not model.training


def test_a_checkpoint_without_a_record_is_not_guessed(tmp_path: Path, trained: VisionTransformer) -> None:
    _lightning_ckpt(tmp_path / "old.ckpt", trained, record=None)
    with pytest.raises(ValueError, match="without a record of its network"):
        vit.load_backbone(tmp_path / "old.ckpt")
    model = build_network(read_weights(tmp_path / "old.ckpt"), name="vit_tiny_patch16_224",
                          model_args={**TINY, "num_classes": 3, "global_pool": "avg"})
    torch.testing.assert_close(model.head.weight, trained.head.weight)


def test_run_directory_rule(tmp_path: Path) -> None:
    def save(name: str, callbacks: dict | None = None) -> Path:
        path = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"pytorch-lightning_version": "2.6.6", "callbacks": callbacks or {}}, path)
        os.utime(path, (len(list(path.parent.iterdir())),) * 2)  # mtimes in the order written
        return path

    best = save("epoch=1-step=20.ckpt")
    save("epoch=2-step=30.ckpt")
    state = {"monitor": None, "best_model_path": str(best)}
    last = save("last.ckpt", {"ModelCheckpoint{'monitor': None}": state})
    assert find_checkpoint(tmp_path) == last  # nothing monitored: the newest last*.ckpt
    state["monitor"] = "val/acc1"
    save("last.ckpt", {"ModelCheckpoint{'monitor': 'val/acc1'}": state})
    assert find_checkpoint(tmp_path) == best  # the best recorded by ModelCheckpoint
    with pytest.raises(FileNotFoundError, match="no \\*.ckpt"):
        find_checkpoint(tmp_path / "lightning_logs" / "version_0" / "nothing_here")


def test_linear_probe_checkpoint_folds_its_batchnorm_with_the_recorded_eps(tmp_path: Path) -> None:
    net = VisionTransformer(**TINY, num_classes=3, global_pool="avg")
    bn = torch.nn.BatchNorm1d(64, affine=False, eps=0.5)  # far from 1e-6: a loader with its own eps fails
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.1, 0.5)
    net.head = torch.nn.Sequential(bn, torch.nn.Linear(64, 3))
    net.eval()
    record = NetworkRecord.from_model(net, "vit_tiny_patch16_224", class_names=CLASSES)
    assert record.head == {"kind": "batchnorm_linear", "eps": 0.5}
    _lightning_ckpt(tmp_path / "probe.ckpt", net, record.to_dict())
    model, meta = _read(tmp_path / "probe.ckpt")
    assert model.global_pool == "avg" and isinstance(model.head, torch.nn.Linear) and meta["class_names"] == CLASSES
    assert meta["head"] == {"kind": "linear"}
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert _max_diff(model(x), net(x)) < 1e-5


def test_plain_state_dict_needs_a_model_name(tmp_path: Path, trained: VisionTransformer) -> None:
    path = tmp_path / "weights.pth"
    torch.save(trained.state_dict(), path)
    with pytest.raises(ValueError, match="--model NAME"):
        _read(path)
    model = build_network(read_weights(path), name="vit_tiny_patch16_224",
                          model_args={**TINY, "num_classes": 3, "global_pool": "avg"})
    torch.testing.assert_close(model.pos_embed, trained.pos_embed)


# ------------------------------------------------------------------------------------- every format


def test_safetensors_export_loads_with_our_loader(tmp_path: Path, trained: VisionTransformer) -> None:
    record = NetworkRecord.from_model(trained, "vit_tiny_patch16_224", TinyData.preprocessing, CLASSES)
    report = export_model(trained, "safetensors", tmp_path, record=record, source="x.ckpt")
    assert {p.name for p in report.files} == {"model.safetensors", "config.json"}
    assert report.checks and all(c.ok for c in report.checks)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["format_version"] == 1 and config["architecture"] == "VisionTransformer"
    assert config["img_size"] == [32, 32] and config["patch_size"] == [4, 4] and config["num_classes"] == 3
    assert config["class_names"] == CLASSES and config["mean"] == TinyData.preprocessing["mean"]
    assert config["name"] == "vit_tiny_patch16_224" and config["source"] == "x.ckpt" and config["vitkit_version"]
    loaded = vit.load_backbone(tmp_path)
    assert isinstance(loaded, VisionTransformer) and not loaded.training
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert _max_diff(loaded(x), trained(x)) <= 1e-4
        assert _max_diff(loaded.forward_features(x), trained.forward_features(x)) <= 1e-4


def test_timm_export_is_a_timm_hub_folder(tmp_path: Path, trained: VisionTransformer) -> None:
    record = NetworkRecord.from_model(trained, "vit_tiny_patch16_224", TinyData.preprocessing, CLASSES)
    report = export_model(trained, "timm", tmp_path, record=record)
    assert {p.name for p in report.files} == {"model.safetensors", "config.json", "README.md"}
    assert [c.name.split(" (")[0] for c in report.checks] == ["timm.create_model(local-dir, pretrained)",
                                                              "vit.load_backbone"]
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["num_classes"] == 3 and cfg["num_features"] == 64 and cfg["global_pool"] == "avg"
    assert "num_classes" not in cfg["model_args"] and cfg["label_names"] == CLASSES  # TimmWrapper passes its own
    pre = cfg["pretrained_cfg"]
    assert pre["tag"] == "vitkit" and pre["input_size"] == [3, 32, 32] and pre["mean"] == TinyData.preprocessing["mean"]
    assert pre["crop_pct"] == 1.0 and pre["interpolation"] == "bicubic" and pre["num_classes"] == 3
    assert cfg["vitkit"]["architecture"] == "VisionTransformer" and cfg["vitkit"]["format"] == "timm"
    assert "timm.create_model" in (tmp_path / "README.md").read_text()
    # the weights are timm's own layout, loaded strictly into the model the config names
    ref = timm.create_model(cfg["architecture"], pretrained=False, num_classes=3, **cfg["model_args"]).eval()
    ref.load_state_dict(load_file(str(tmp_path / "model.safetensors")), strict=True)
    hub = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert _max_diff(ref(x), trained(x)) <= 1e-5 and _max_diff(hub(x), trained(x)) <= 1e-5
    assert list(timm.data.resolve_model_data_config(hub)["mean"]) == TinyData.preprocessing["mean"]


def test_timm_export_of_a_named_size(tmp_path: Path) -> None:
    small = vit.create_model("vit_small_patch16_224", depth=1, num_classes=10).eval()
    report = export_model(small, "timm", tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architecture"] == "vit_small_patch16_224" and cfg["model_args"] == {"depth": 1}
    assert cfg["num_classes"] == 10 and all(c.ok for c in report.checks)
    # the real size (12 blocks) maps to timm's name with no structural override; keys checked on meta tensors
    with torch.device("meta"):
        full = vit.create_model("vit_small_patch16_224", num_classes=10)
        cfg = timm_config(full)
        ref = timm.create_model(cfg["architecture"], num_classes=10, **cfg["model_args"])
    assert cfg["exact"] and cfg["model_args"] == {} and cfg["unsupported"] == {}
    ref.load_state_dict(vit.export.vit_to_timm(full.state_dict()), strict=True, assign=True)


def test_mae_source_exports_encoder_or_full(tmp_path: Path) -> None:
    mae = _mae_ckpt(tmp_path / "mae.ckpt")
    rc = main([str(tmp_path / "mae.ckpt"), "--out", str(tmp_path / "st")])
    assert rc == 0
    config = json.loads((tmp_path / "st" / "config.json").read_text())
    assert config["architecture"] == "VisionTransformer" and config["num_classes"] == 0
    exported = load_file(str(tmp_path / "st" / "model.safetensors"))
    assert not any(k.startswith(("decoder", "mask_token")) for k in exported)
    encoder = vit.load_backbone(tmp_path / "st")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert _max_diff(encoder.forward_features(x), mae.encoder.forward_features(x)) <= 1e-4

    assert main([str(tmp_path / "mae.ckpt"), "--format", "mae", "--out", str(tmp_path / "mae")]) == 0
    official = torch.load(tmp_path / "mae" / "checkpoint.pth", weights_only=True)["model"]
    assert "decoder_pred.weight" in official and "blocks.0.attn.qkv.weight" in official and "mask_token" in official
    again = MaskedAutoencoder(**TINY_MAE, norm_pix_loss=True)
    vit.load_weights(again, tmp_path / "mae" / "checkpoint.pth")
    noise = torch.rand(2, 64)
    with torch.no_grad():
        assert _max_diff(again(x, noise=noise)[1], mae(x, noise=noise)[1]) <= 1e-4
    # the encoder of the MAE export is also a backbone for our loader
    assert vit.load_backbone(tmp_path / "mae").embed_dim == 64


def test_vit_source_mae_format_is_encoder_only(tmp_path: Path, trained: VisionTransformer) -> None:
    report = export_model(trained, "mae", tmp_path, head=False)
    assert any("encoder-only" in n for n in report.notes)
    official = torch.load(tmp_path / "checkpoint.pth", weights_only=True)["model"]
    assert "cls_token" in official and "fc_norm.weight" in official  # the classifier pools by average
    assert not any(k.startswith(("decoder", "head.")) for k in official)


@pytest.mark.onnx
def test_onnx_export_runs_in_onnxruntime(tmp_path: Path, trained: VisionTransformer) -> None:
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    report = export_model(trained, "onnx", tmp_path, image_sizes=[32, (48, 64)])
    assert [c.name.split()[1] for c in report.checks] == ["32x32", "48x64"]
    for name, size, ref in (("model.onnx", (32, 32), trained), ("model_48x64.onnx", (48, 64),
                                                                  resize_model(trained, (48, 64)).eval())):
        proto = onnx.load(str(tmp_path / name))
        assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
        session = ort.InferenceSession(str(tmp_path / name), providers=["CPUExecutionProvider"])
        assert session.get_inputs()[0].shape[0] == "batch"
        for batch in (1, 3):
            x = torch.randn(batch, 3, *size)
            out = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
            with torch.no_grad():
                assert _max_diff(out, ref(x)) <= 1e-4


def test_onnx_without_the_extra_says_what_to_install(tmp_path: Path, trained: VisionTransformer,
                                                    monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
    with pytest.raises(ImportError, match=r"pip install vitkit\[onnx\]"):
        export_model(trained, "onnx", tmp_path)


def test_torch_export_program_loads(tmp_path: Path, trained: VisionTransformer) -> None:
    report = export_model(trained, "torch-export", tmp_path, head=False)
    assert all(c.ok for c in report.checks)
    program = torch.export.load(tmp_path / "model.pt2").module()
    backbone = VisionTransformer(**{**trained.model_args, "num_classes": 0})
    vit.load_weights(backbone, {k: v for k, v in trained.state_dict().items() if not k.startswith("head.")})
    for batch in (1, 3):
        x = torch.randn(batch, 3, 32, 32)
        out = program(x)
        assert out.shape == (batch, 64)
        with torch.no_grad():
            assert _max_diff(out, backbone.eval()(x)) <= 1e-4


def test_a_bad_export_fails_loudly(tmp_path: Path, trained: VisionTransformer, run_dir: Path, monkeypatch,
                                   capsys) -> None:
    real = vit.export.writers.load_backbone

    def perturbed(path: Path) -> VisionTransformer:
        model = real(path)
        with torch.no_grad():
            model.head.bias.add_(1e-3)
        return model

    monkeypatch.setattr(vit.export.writers, "load_backbone", perturbed)
    with pytest.raises(ExportCheckError, match=r"vit.load_backbone .* max \|diff\| 0\.001 > 0\.0001"):
        export_model(trained, "safetensors", tmp_path)
    assert main([str(run_dir), "--out", str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    assert "FAILED" in out and "does not reproduce" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------- loading


def test_load_backbone_for_a_new_image_size(tmp_path: Path, trained: VisionTransformer) -> None:
    export_model(trained, "safetensors", tmp_path)
    model = vit.load_backbone(tmp_path, img_size=(48, 64))
    x = torch.randn(2, 3, 48, 64)
    maps = model.get_intermediate_layers(x, 2, reshape=True)
    assert len(maps) == 2 and maps[-1].shape == (2, 64, 48 // 4, 64 // 4)
    assert model.forward_features(x).shape == (2, 1 + 12 * 16, 64)
    fresh = vit.load_backbone(tmp_path, num_classes=7)
    assert fresh(torch.randn(1, 3, 32, 32)).shape == (1, 7)
    assert vit.load_backbone(tmp_path, num_classes=0)(torch.randn(1, 3, 32, 32)).shape == (1, 64)


# -------------------------------------------------------------------------------------- safety, CLI


def test_malicious_pickle_is_refused_everywhere(tmp_path: Path, capsys) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    ckpt = tmp_path / "evil.ckpt"
    torch.save({"pytorch-lightning_version": "2.6.6", "hyper_parameters": {"model": "vit_tiny_patch16_224"},
                "state_dict": {}, "callbacks": Evil()}, ckpt)
    assert main([str(ckpt), "--out", str(tmp_path / "out")]) == 2
    assert "refusing to load" in capsys.readouterr().err
    with pytest.raises(UnsafeCheckpointError, match="would run code"):
        vit.load_backbone(ckpt)
    export_dir = tmp_path / "export"
    export_dir.mkdir()
    (export_dir / "config.json").write_text(json.dumps({"architecture": "VisionTransformer", "model_args": TINY}))
    torch.save({"model": Evil()}, export_dir / "checkpoint.pth")
    with pytest.raises(UnsafeCheckpointError):
        vit.load_backbone(export_dir)
    assert not marker.exists()


def test_cli_user_errors_are_short(tmp_path: Path, trained: VisionTransformer, capsys) -> None:
    assert main([str(tmp_path / "missing.ckpt"), "--out", str(tmp_path / "o")]) == 2
    assert "missing.ckpt" in capsys.readouterr().err
    assert main([str(tmp_path / "missing.ckpt"), "--format", "tflite", "--out", "o"]) == 2
    assert "invalid choice" in capsys.readouterr().err
    wrong = tmp_path / "wrong.ckpt"
    record = NetworkRecord.from_model(trained).to_dict()
    record["model_args"]["embed_dim"] = 32  # a record that does not describe the weights
    _lightning_ckpt(wrong, trained, record)
    assert main([str(wrong), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "wrong.ckpt" in err and "shape conflicts" in err and "pos_embed" in err and "Traceback" not in err
    assert main([str(wrong), "--out", str(tmp_path / "o"), "--image-size", "30"]) == 2


def test_cli_subprocess_prints_max_differences(tmp_path: Path, run_dir: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "vit.export.command", str(run_dir), "--out", str(tmp_path / "out"),
         "--image-size", "32x48", "--backbone-only"],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if "max |diff|" in line]
    assert lines and all(line.endswith("ok") for line in lines), result.stdout
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["img_size"] == [32, 48] and config["num_classes"] == 0 and config["class_names"] is None
