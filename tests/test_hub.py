"""Hugging Face and timm hub folders in and out, run as users do; the timm model API of VisionTransformer.

transformers is a test-only dependency: tiny random models are built from its config classes, perturbed away from
their init (LayerNorms, biases, tokens, layer scales) so that a loader dropping a bias or using the wrong LayerNorm
eps fails, and saved with ``save_pretrained``. Every comparison has a perturbation beside it that must fail it.
"""

from __future__ import annotations

import ast
import copy
import json
import logging
import sys
from pathlib import Path

import pytest
import timm
import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModel,
    AutoModelForImageClassification,
    BitImageProcessor,
    Dinov2Config,
    Dinov2ForImageClassification,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    TimmWrapperForImageClassification,
    TimmWrapperModel,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessor,
    ViTMAEConfig,
    ViTMAEForPreTraining,
    ViTMAEModel,
    ViTModel,
)

import vit
from vit.data import ImageDataModule
from vit.export import UnsafeCheckpointError, build_network, export_model, read_weights
from vit.export.command import main as export_main
from vit.models import MaskedAutoencoder, NetworkRecord, VisionTransformer
from vit.train.init_from import load_pretrained

transformers.logging.set_verbosity_error()

ROOT = Path(__file__).resolve().parents[1]
HF_SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32,
                patch_size=8)
MAE_DECODER = dict(decoder_hidden_size=16, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
                   decoder_intermediate_size=32)
LABELS = {0: "cat", 1: "dog", 2: "eel"}
KINDS = ("vit", "vit_classifier", "vit_mae_encoder", "dinov2", "dinov2_registers")
NATIVE, RESAMPLED = 1e-5, 1e-4  # the tolerances (fp32)
TIMM_TINY = dict(img_size=32, patch_size=4, embed_dim=64, depth=3, num_heads=4, num_classes=3)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def _perturb(model: torch.nn.Module) -> torch.nn.Module:
    """Every 1-d parameter (norms, biases, layer scales) and every token moved off its init; heads made O(1)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.05 * torch.randn_like(p))
            elif "token" in name or "position" in name or "pos_embed" in name:
                p.add_(0.02 * torch.randn_like(p))
            elif name.startswith(("classifier", "head")):
                p.mul_(30.0)  # logits of size 1, where a 1e-5 miss shows
    return model.eval()


def _hf_model(kind: str) -> torch.nn.Module:
    models = {
        "vit": lambda: ViTModel(ViTConfig(**HF_SMALL)),
        "vit_classifier": lambda: ViTForImageClassification(ViTConfig(**HF_SMALL, id2label=LABELS)),
        "vit_mae_encoder": lambda: ViTMAEModel(ViTMAEConfig(**HF_SMALL, mask_ratio=0.0)),
        "dinov2": lambda: Dinov2Model(Dinov2Config(**HF_SMALL)),
        "dinov2_registers": lambda: Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**HF_SMALL,
                                                                                      num_register_tokens=2)),
    }
    return _perturb(models[kind]())


def _hf_out(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What the library gives: logits of a classifier, else ``last_hidden_state`` (positions resampled as it does)."""
    kwargs = {}
    if isinstance(model, ViTModel | ViTMAEModel | ViTForImageClassification):
        kwargs["interpolate_pos_encoding"] = x.shape[-1] != model.config.image_size
    if isinstance(model, ViTMAEModel):  # mask ratio 0 still shuffles: an increasing noise keeps the patch order
        kwargs["noise"] = torch.arange(float((x.shape[-2] // 8) * (x.shape[-1] // 8))).expand(x.shape[0], -1)
    with torch.no_grad():
        out = model(x, **kwargs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _ours_out(model: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x) if model.num_classes else model.forward_features(x)


def _saved(model: torch.nn.Module, folder: Path) -> Path:
    model.save_pretrained(folder)
    return folder


def _rebuilt(model: VisionTransformer, **overrides: object) -> VisionTransformer:
    """The same weights in a network built with other arguments (a loader that got one of them wrong)."""
    other = VisionTransformer(**{**model.model_args, **overrides}).eval()
    other.load_state_dict(model.state_dict())
    return other


# ------------------------------------------------------------------------------ Hugging Face folders in


@pytest.mark.parametrize("kind", KINDS)
def test_hf_folder_matches_transformers_at_the_native_size(kind: str, tmp_path: Path) -> None:
    hf = _hf_model(kind)
    ours = vit.load_backbone(_saved(hf, tmp_path))
    x = torch.randn(2, 3, 32, 32)
    ref = _hf_out(hf, x)
    assert _max_diff(_ours_out(ours, x), ref) <= NATIVE
    if kind == "dinov2_registers":  # [cls, registers, patches], registers without positions
        assert ours.forward_features(x).shape == (2, 1 + 2 + 16, 32) and ours.pos_embed.shape == (1, 16, 32)
    if kind == "vit_classifier":
        assert read_weights(tmp_path).record.class_names == ["cat", "dog", "eel"]
    # perturbations: the other LayerNorm eps (1e-6 vs 1e-12), one bias dropped
    wrong_eps = 1e-6 if ours.model_args["norm_eps"] == 1e-12 else 1e-12
    assert _max_diff(_ours_out(_rebuilt(ours, norm_eps=wrong_eps), x), ref) > NATIVE
    no_bias = _rebuilt(ours)
    with torch.no_grad():
        no_bias.blocks[1].mlp.fc2.bias.zero_()
    assert _max_diff(_ours_out(no_bias, x), ref) > NATIVE


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "vit_classifier"])
def test_hf_folder_resampled_like_transformers(kind: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    hf = _hf_model(kind)
    _saved(hf, tmp_path)
    x = torch.randn(2, 3, 48, 48)
    ref = _hf_out(hf, x)
    with caplog.at_level(logging.INFO, logger="vit"):
        ours = vit.load_backbone(tmp_path, img_size=48)
    antialias = kind == "dinov2_registers"  # transformers: bicubic, antialiased only with registers
    mode = f"bicubic, {'with' if antialias else 'without'} antialias"
    assert f"resampled pos_embed from a 4x4 grid to 6x6 ({mode})" in caplog.text
    assert _max_diff(_ours_out(ours, x), ref) <= RESAMPLED
    net = VisionTransformer(**{**ours.model_args, "img_size": 48}).eval()
    assert vit.load_weights(net, tmp_path).resample_mode == mode
    assert _max_diff(_ours_out(net, x), ref) <= RESAMPLED
    vit.load_weights(net, tmp_path, resample={"mode": "bicubic", "antialias": not antialias})  # the other mode
    assert _max_diff(_ours_out(net, x), ref) > RESAMPLED


def test_hf_vit_mae_loads_whole_into_our_mae(tmp_path: Path) -> None:
    hf = _perturb(ViTMAEForPreTraining(ViTMAEConfig(**HF_SMALL, **MAE_DECODER, norm_pix_loss=True)))
    weights = read_weights(_saved(hf, tmp_path))
    assert weights.layout == "hf" and weights.record.architecture == "MaskedAutoencoder"
    mae = build_network(weights)
    assert isinstance(mae, MaskedAutoencoder) and mae.model_args["norm_eps"] == 1e-12
    x, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    with torch.no_grad():
        ref = hf(x, noise=noise)
        loss, pred, mask = mae(x, mask_ratio=0.75, noise=noise)
        assert _max_diff(pred, ref.logits) <= NATIVE and _max_diff(loss, ref.loss) <= NATIVE
        assert torch.equal(mask, ref.mask)
        wrong = MaskedAutoencoder(**{**mae.model_args, "norm_eps": 1e-6}).eval()
        wrong.load_state_dict(mae.state_dict())
        assert _max_diff(wrong(x, mask_ratio=0.75, noise=noise)[1], ref.logits) > NATIVE
    # its encoder is a backbone too
    assert _max_diff(vit.load_backbone(tmp_path).forward_features(x), mae.encoder.forward_features(x)) == 0


def _imports_transformers(source: str) -> bool:
    """Whether Python source imports transformers, at any depth (function-level imports count)."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        else:
            continue
        if any(n.split(".")[0] == "transformers" for n in names):
            return True
    return False


def test_nothing_in_vitkit_imports_transformers() -> None:
    found = [str(p.relative_to(ROOT)) for p in (ROOT / "vit").rglob("*.py") if _imports_transformers(p.read_text())]
    assert not found, f"transformers is a test-only dependency; imported by {found}"
    assert _imports_transformers("def f():\n    from transformers.models import vit\n")  # the scan does see one


def _renamed(src: Path, dst: Path, renames: list[tuple[str, str]]) -> Path:
    """A copy of a Hugging Face folder with its keys renamed (``str.replace`` pairs, in order)."""
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    state = load_file(str(src / "model.safetensors"))
    for old, new in renames:
        state = {k.replace(old, new): v for k, v in state.items()}
    save_file(state, str(dst / "model.safetensors"))
    return dst


def test_legacy_and_recent_key_names_read_alike(tmp_path: Path) -> None:
    hf = _perturb(ViTMAEForPreTraining(ViTMAEConfig(**HF_SMALL, **MAE_DECODER)))
    saved = _saved(hf, tmp_path / "saved")
    keys = load_file(str(saved / "model.safetensors")).keys()
    assert any("attention.attention.query" in k for k in keys) and any("decoder_encoder.layer." in k for k in keys)
    recent = [(".attention.attention.query", ".attention.q_proj"), (".attention.attention.key", ".attention.k_proj"),
              (".attention.attention.value", ".attention.v_proj"), (".attention.output.dense", ".attention.o_proj"),
              (".intermediate.dense", ".mlp.fc1"), (".output.dense", ".mlp.fc2"), ("vit.encoder.layer.", "vit.layers.")]
    variants = {"hub legacy": [("decoder.decoder_encoder.layer.", "decoder.decoder_layers.")],
                "recent": [*recent, ("decoder.decoder_encoder.layer.", "decoder.decoder_layers.")]}
    reference = read_weights(saved).state
    for name, renames in variants.items():
        state = read_weights(_renamed(saved, tmp_path / name.replace(" ", "_"), renames)).state
        assert state.keys() == reference.keys(), name
        assert all(torch.equal(state[k], reference[k]) for k in state), name
    typo = _renamed(saved, tmp_path / "typo", [(".attention.attention.key", ".attention.attention.kee")])
    with pytest.raises(ValueError, match=r"no counterpart .*attention\.attention\.kee"):
        read_weights(typo)


@pytest.mark.parametrize("case", ["swiglu", "activation", "dinov2_classifier", "mae_decoder_ratio"])
def test_what_we_cannot_represent_is_named(case: str, tmp_path: Path) -> None:
    model, field = {
        "swiglu": (lambda: Dinov2Model(Dinov2Config(**HF_SMALL, use_swiglu_ffn=True)), "use_swiglu_ffn"),
        "activation": (lambda: ViTModel(ViTConfig(**{**HF_SMALL, "hidden_act": "gelu_new"})), "hidden_act"),
        "dinov2_classifier": (lambda: Dinov2ForImageClassification(Dinov2Config(**HF_SMALL, num_labels=3)),
                              r"classifier\.weight takes 64 inputs"),
        "mae_decoder_ratio": (lambda: ViTMAEForPreTraining(ViTMAEConfig(**HF_SMALL, **{**MAE_DECODER,
                              "decoder_intermediate_size": 48})), "decoder_intermediate_size"),
    }[case]
    _saved(model(), tmp_path)
    with pytest.raises(ValueError, match=field):
        vit.load_backbone(tmp_path)


def test_left_out_tensors_are_said(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    weights = read_weights(_saved(_hf_model("vit"), tmp_path / "vit"))
    assert weights.notes == ["left out ViTModel's tanh pooler (it gives pooler_output only; last_hidden_state and "
                             "logits do not use it)"]
    assert export_main([str(tmp_path / "vit"), "--out", str(tmp_path / "out")]) == 0
    assert "note: left out ViTModel's tanh pooler" in capsys.readouterr().out
    assert read_weights(_saved(ViTModel(ViTConfig(**HF_SMALL), add_pooling_layer=False), tmp_path / "bare")).notes == []


def test_bin_only_and_sharded_folders(tmp_path: Path) -> None:
    hf = _hf_model("dinov2")
    x = torch.randn(2, 3, 32, 32)
    ref = _hf_out(hf, x)
    state = hf.state_dict()
    for folder in ("bin", "sharded"):
        (tmp_path / folder).mkdir()
        hf.config.to_json_file(tmp_path / folder / "config.json")
    torch.save(state, tmp_path / "bin" / "pytorch_model.bin")
    keys = sorted(state)
    half = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2], "model-00002-of-00002.safetensors":
            keys[len(keys) // 2:]}
    for file, names in half.items():
        save_file({k: state[k].contiguous() for k in names}, str(tmp_path / "sharded" / file))
    index = {"metadata": {}, "weight_map": {k: file for file, names in half.items() for k in names}}
    (tmp_path / "sharded" / "model.safetensors.index.json").write_text(json.dumps(index))
    for folder in ("bin", "sharded"):
        assert _max_diff(_ours_out(vit.load_backbone(tmp_path / folder), x), ref) <= NATIVE, folder
    torch.save({**state, "extra": logging.getLogger("x")}, tmp_path / "bin" / "pytorch_model.bin")  # pickled code
    with pytest.raises(UnsafeCheckpointError):
        vit.load_backbone(tmp_path / "bin")


def test_load_weights_and_init_from_take_hf_folders(tmp_path: Path) -> None:
    hf = _hf_model("vit_classifier")
    _saved(hf, tmp_path)
    x = torch.randn(2, 3, 32, 32)
    net = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, mlp_ratio=2.0,
                            num_classes=3, norm_eps=1e-12).eval()
    assert vit.load_weights(net, tmp_path).layout == "hf"
    assert _max_diff(_ours_out(net, x), _hf_out(hf, x)) <= NATIVE
    classifier = VisionTransformer(**{**net.model_args, "num_classes": 5, "global_pool": "avg"})
    message = load_pretrained(classifier, str(tmp_path), head_std=0.01)
    assert "layout 'hf'" in message and "re-initialised the head" in message
    with torch.no_grad():
        assert _max_diff(classifier.blocks[0].attn.qkv.weight, net.blocks[0].attn.qkv.weight) == 0
    with pytest.raises(ValueError, match=r"records LayerNorm eps 1e-12, this network has 1e-06"):
        load_pretrained(VisionTransformer(**{**classifier.model_args, "norm_eps": 1e-6}), str(tmp_path), 0.01)


# ------------------------------------------------------------------------------------ timm folders in and out


def test_timm_save_for_hf_folder_reads_back(tmp_path: Path) -> None:
    ref = _perturb(timm.create_model("vit_tiny_patch16_224", pretrained=False, **TIMM_TINY, global_pool="map"))
    timm.models.save_for_hf(ref, tmp_path, safe_serialization=True)
    x = torch.randn(2, 3, 32, 32)
    ours = vit.load_backbone(tmp_path)  # architecture vit_tiny_patch16_224 is one of our names too
    with torch.no_grad():
        assert _max_diff(ours(x), ref(x)) <= NATIVE and _max_diff(ours.forward_features(x), ref.forward_features(x)) \
            <= NATIVE
    assert list(timm.data.resolve_model_data_config(ours)["mean"]) == list(ref.pretrained_cfg["mean"])
    config = json.loads((tmp_path / "config.json").read_text())
    config["architecture"] = "vit_base_patch16_clip_224"  # a timm name we do not have: no record, weights still load
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="without a record of its network"):
        vit.load_backbone(tmp_path)
    net = VisionTransformer(**TIMM_TINY, global_pool="map").eval()
    vit.load_weights(net, tmp_path)
    with torch.no_grad():
        assert _max_diff(net(x), ref(x)) <= NATIVE


def _our_tiny() -> VisionTransformer:
    return _perturb(VisionTransformer(**TIMM_TINY, reg_tokens=2, global_pool="map", init_values=0.1))


def test_timm_folder_loads_in_timm_and_transformers(tmp_path: Path) -> None:
    ours = _our_tiny()
    record = NetworkRecord.from_model(ours, preprocessing={"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.2, 0.2],
                                                           "crop_pct": 1.0}, class_names=["a", "b", "c"])
    export_model(ours, "timm", tmp_path, record=record)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features, logits = ours.forward_features(x), ours(x)
        hub = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
        assert _max_diff(hub.forward_features(x), features) <= NATIVE and _max_diff(hub(x), logits) <= NATIVE
        backbone = AutoModel.from_pretrained(tmp_path).eval()
        classifier = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
        assert isinstance(backbone, TimmWrapperModel) and isinstance(classifier, TimmWrapperForImageClassification)
        assert _max_diff(backbone(x).last_hidden_state, features) <= NATIVE
        assert _max_diff(classifier(x).logits, logits) <= NATIVE
    assert classifier.config.id2label == {0: "a", 1: "b", 2: "c"}
    assert timm.data.resolve_model_data_config(hub)["crop_pct"] == 1.0
    # perturbation: one tensor of the file changed, and every consumer sees it
    state = load_file(str(tmp_path / "model.safetensors"))
    state["head.bias"] += 1e-3
    save_file(state, str(tmp_path / "model.safetensors"))
    with torch.no_grad():
        assert _max_diff(AutoModelForImageClassification.from_pretrained(tmp_path).eval()(x).logits, logits) > NATIVE


def test_hf_dinov2_to_timm_folder_with_vit_export(tmp_path: Path) -> None:
    """HF DINOv2 with registers → ours → timm folder → timm and TimmWrapper, exactly (LayerNorm eps 1e-6 in all)."""
    hf = _hf_model("dinov2_registers")
    _saved(hf, tmp_path / "hf")
    assert export_main([str(tmp_path / "hf"), "--format", "timm", "--out", str(tmp_path / "timm")]) == 0
    x = torch.randn(2, 3, 32, 32)
    ref = _hf_out(hf, x)
    with torch.no_grad():
        hub = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()
        assert _max_diff(hub.forward_features(x), ref) <= NATIVE
        assert _max_diff(AutoModel.from_pretrained(tmp_path / "timm").eval()(x).last_hidden_state, ref) <= NATIVE
        state = load_file(str(tmp_path / "timm" / "model.safetensors"))
        state["norm.bias"] += 1e-3  # perturbation: the final norm's bias in the file
        save_file(state, str(tmp_path / "timm" / "model.safetensors"))
        hub = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()
        assert _max_diff(hub.forward_features(x), ref) > NATIVE


def test_hf_vit_to_timm_folder_says_what_timm_cannot_build(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """HF ViT → ours → timm folder → timm. timm has no LayerNorm eps argument: its network uses 1e-6, HF's 1e-12."""
    hf = ViTForImageClassification(ViTConfig(**HF_SMALL, id2label=LABELS)).eval()  # HF's own init
    _saved(hf, tmp_path / "hf")
    args = [str(tmp_path / "hf"), "--format", "timm", "--out", str(tmp_path / "timm")]
    assert export_main(args) == 1  # the check measures what timm's eps changes, above the default 1e-4
    out = capsys.readouterr().out
    assert "timm has no norm_eps argument: its network uses its own default instead of 1e-12" in out
    assert "timm.create_model(local-dir, pretrained) (features, logits) 32x32 batches 1,3: max |diff| =" in out
    assert export_main([*args, "--atol", "1e-2"]) == 0  # accepted on purpose
    x = torch.randn(2, 3, 32, 32)
    ref = _hf_out(hf, x)
    with torch.no_grad():
        timm_diff = _max_diff(timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()(x), ref)
    assert NATIVE < timm_diff <= 1e-2
    assert _max_diff(vit.load_backbone(tmp_path / "timm")(x), ref) <= NATIVE  # our record keeps eps 1e-12
    assert json.loads((tmp_path / "timm" / "config.json").read_text())["label_names"] == ["cat", "dog", "eel"]


@pytest.mark.onnx
def test_dinov2_registers_to_onnx(tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    hf = _hf_model("dinov2_registers")
    ours = vit.load_backbone(_saved(hf, tmp_path / "hf"))
    report = export_model(ours, "onnx", tmp_path / "onnx", image_sizes=[48])  # resampled as transformers does
    assert all(c.ok for c in report.checks)
    other = copy.deepcopy(hf)
    with torch.no_grad():
        other.layernorm.bias.add_(1e-3)  # perturbation: the final norm's bias
    session = ort.InferenceSession(str(tmp_path / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 3, 48, 48)
    out = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
    # our backbone's output is the class token after the final norm; onnxruntime has its own kernels
    assert _max_diff(out, _hf_out(hf, x)[:, 0]) <= RESAMPLED
    assert _max_diff(out, _hf_out(other, x)[:, 0]) > RESAMPLED


# ------------------------------------------------------------------------------------- the timm model API


TIMM_VARIANTS = {"cls": {}, "registers": dict(reg_tokens=2), "avg_no_cls": dict(class_token=False, global_pool="avg")}
INTERMEDIATE_CALLS = [
    {}, dict(indices=2), dict(indices=[0, -1], norm=True), dict(output_fmt="NLC", return_prefix_tokens=True),
    dict(indices=[1], stop_early=True, intermediates_only=True), dict(output_dict=True, return_prefix_tokens=True),
]


def _same(a: object, b: object, tol: float = NATIVE) -> float:
    """The max abs difference of two equally structured outputs (tensors in lists, tuples and dicts)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape, (getattr(a, "shape", a), getattr(b, "shape", b))
        return _max_diff(a, b)
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        return max(_same(a[k], b[k]) for k in a)
    assert type(a) is type(b) and len(a) == len(b)
    return max(_same(u, v) for u, v in zip(a, b, strict=True))


def _timm_pair(variant: str) -> tuple[torch.nn.Module, VisionTransformer]:
    kwargs = {**TIMM_TINY, **TIMM_VARIANTS[variant]}
    ref = _perturb(timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs))
    ours = VisionTransformer(**kwargs).eval()
    vit.load_weights(ours, ref.state_dict())
    return ref, ours


@pytest.mark.parametrize("variant", TIMM_VARIANTS)
def test_forward_intermediates_as_timm(variant: str) -> None:
    ref, ours = _timm_pair(variant)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for kwargs in INTERMEDIATE_CALLS:
            assert _same(ours.forward_intermediates(x, **kwargs), ref.forward_intermediates(x, **kwargs)) <= NATIVE
        ref.blocks[0].attn.proj.bias.add_(1e-3)  # perturbation: one bias of the first block
        assert _same(ours.forward_intermediates(x, indices=[0]), ref.forward_intermediates(x, indices=[0])) > NATIVE
    assert ours.feature_info == ref.feature_info
    with pytest.raises(ValueError, match="out of range"):
        ours.forward_intermediates(x, indices=[3])


def test_set_input_size_and_data_config_as_timm(tmp_path: Path) -> None:
    ref, ours = _timm_pair("registers")
    before = copy.deepcopy(ours)
    ref.set_input_size((48, 64))
    ours.set_input_size((48, 64))
    x = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        assert _max_diff(ours(x), ref(x)) <= NATIVE
        assert _max_diff(ours(x), vit.export.resize_model(before, (48, 64))(x)) == 0
        no_antialias = vit.export.resize_model(before, (48, 64), {"mode": "bicubic", "antialias": False})
        assert _max_diff(no_antialias(x), ref(x)) > NATIVE  # perturbation: the other resampling
    assert ours.model_args["img_size"] == (48, 64) and ours.get_classifier() is ours.head
    assert timm.data.resolve_model_data_config(ours) == {
        "input_size": (3, 48, 64), "interpolation": "bicubic", "mean": timm.data.IMAGENET_DEFAULT_MEAN,
        "std": timm.data.IMAGENET_DEFAULT_STD, "crop_pct": 0.875, "crop_mode": "center"}
    # a loaded network says how its weights were trained, not timm's 224 / 0.875 / ImageNet defaults
    record = NetworkRecord.from_model(ours, preprocessing={"mean": [0.1, 0.2, 0.3], "std": [0.5, 0.5, 0.5],
                                                           "crop_pct": 1.0, "interpolation": "bilinear"})
    export_model(ours, "safetensors", tmp_path, record=record)
    config = timm.data.resolve_model_data_config(vit.load_backbone(tmp_path))
    assert config == {"input_size": (3, 48, 64), "interpolation": "bilinear", "mean": (0.1, 0.2, 0.3),
                      "std": (0.5, 0.5, 0.5), "crop_pct": 1.0, "crop_mode": "center"}
    assert ours.default_cfg is ours.pretrained_cfg
    with pytest.raises(ValueError, match="patch size"):
        ours.set_input_size(patch_size=8)


def test_grad_checkpointing_recomputes_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    import vit.models.vision_transformer as module

    calls = []
    real = module.checkpoint
    monkeypatch.setattr(module, "checkpoint", lambda fn, *a, **k: calls.append(fn) or real(fn, *a, **k))
    plain = vit.create_model("vit_tiny_patch16_224", **TIMM_TINY)
    switched = vit.create_model("vit_tiny_patch16_224", **TIMM_TINY, grad_checkpointing=True)  # the recipe switch
    switched.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 32, 32)
    grads = []
    for model in (plain, switched):
        model.train()
        model(x).square().sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert len(calls) == 3  # each block of the switched model once; none of the plain one
    assert max(_max_diff(grads[0][n], grads[1][n]) for n in grads[0]) <= 1e-6
    switched.set_grad_checkpointing(False)
    switched(x).sum().backward()
    assert len(calls) == 3 and switched.model_args["grad_checkpointing"] is False
    assert "grad_checkpointing" not in vit.export.timm_config(switched)["model_args"]  # timm has no such argument


# ----------------------------------------------------------------------------------------- the data side


def _dm_preprocessing(folder: Path) -> dict:
    return ImageDataModule(preprocessing_from=str(folder)).preprocessing


def test_datamodule_takes_the_weights_folder_preprocessing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    hf = _saved(_hf_model("dinov2"), tmp_path / "hf")
    BitImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32}, do_center_crop=True,
                      image_mean=[0.1, 0.2, 0.3], image_std=[0.4, 0.5, 0.6], resample=2).save_pretrained(hf)
    with caplog.at_level(logging.INFO, logger="vit"):
        pre = _dm_preprocessing(hf)
    assert pre["mean"] == [0.1, 0.2, 0.3] and pre["std"] == [0.4, 0.5, 0.6] and pre["crop_pct"] == 0.8
    assert "resizes bilinear; vitkit's transforms resize bicubic" in caplog.text
    assert timm.data.resolve_model_data_config(vit.load_backbone(hf)) == {  # the loader reads the same file
        "input_size": (3, 32, 32), "interpolation": "bilinear", "mean": (0.1, 0.2, 0.3), "std": (0.4, 0.5, 0.6),
        "crop_pct": 0.8, "crop_mode": "center"}
    ours = _our_tiny()
    record = NetworkRecord.from_model(ours, preprocessing={"mean": [0.3, 0.3, 0.3], "std": [0.2, 0.2, 0.2],
                                                           "crop_pct": 0.9, "interpolation": "bicubic"})
    for fmt in ("safetensors", "timm"):
        export_model(ours, fmt, tmp_path / fmt, record=record)
        pre = _dm_preprocessing(tmp_path / fmt)
        assert pre["mean"] == [0.3, 0.3, 0.3] and pre["std"] == [0.2, 0.2, 0.2] and pre["crop_pct"] == 0.9, fmt
    vit_folder = _saved(_hf_model("vit"), tmp_path / "vit")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(vit_folder)
    assert _dm_preprocessing(vit_folder)["crop_pct"] == 1.0 and _dm_preprocessing(vit_folder)["mean"] == [0.5] * 3
    # perturbation: without the option, the defaults (ImageNet's, 0.875) — and a folder that records nothing
    assert ImageDataModule().preprocessing["mean"] != [0.3, 0.3, 0.3]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="preprocessing_from"):
        _dm_preprocessing(tmp_path / "empty")


# -------------------------------------------------------------------------------- the command line, end to end

MAE_KWARGS = dict(patch_size=8, embed_dim=32, depth=2, num_heads=4, mlp_ratio=2.0, decoder_embed_dim=16,
                  decoder_depth=1, decoder_num_heads=2, norm_eps=1e-12)
FIT = ["--data.batch_size", "16", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
       "--trainer.limit_val_batches", "1", "--trainer.enable_model_summary", "false"]


@pytest.mark.slow
def test_continue_hf_mae_pretraining_then_finetune_and_export(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """HF ViTMAE → our MAE (a few CLI steps) → fine-tune (CLI) → vit export --format timm → TimmWrapper."""
    from vit.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["vit"])
    hf = _perturb(ViTMAEForPreTraining(ViTMAEConfig(**HF_SMALL, **MAE_DECODER)))
    _saved(hf, tmp_path / "hf")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "hf")
    mae_args = ["fit", "--config", str(ROOT / "configs" / "mae" / "vit_tiny_digits.yaml"), *FIT,
                "--model.init_args.init_from", "hf", "--data.preprocessing_from", "hf", "--model.init_args.lr",
                "1e-3", "--model.init_args.warmup_epochs", "0", "--trainer.default_root_dir", "mae"]
    # perturbation: the recipe's LayerNorm eps is not the one the weights were trained with
    wrong = {**MAE_KWARGS, "norm_eps": 1e-6}
    with pytest.raises(ValueError, match="records LayerNorm eps 1e-12"):  # --debug: raised, not one line
        main([*mae_args, "--model.init_args.model_kwargs", json.dumps(wrong), "--debug"])
    assert main([*mae_args, "--model.init_args.model_kwargs", json.dumps(MAE_KWARGS)]) == 0
    ckpt = torch.load(tmp_path / "mae" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["vit_network"]["mean"] == [0.5, 0.5, 0.5]  # the folder's preprocessing, recorded
    trained = ckpt["state_dict"]["model.decoder_pred.weight"]
    start = hf.state_dict()["decoder.decoder_pred.weight"]
    fresh = MaskedAutoencoder(**MAE_KWARGS).state_dict()["decoder_pred.weight"]
    assert 0 < _max_diff(trained, start) < 0.1 * _max_diff(fresh, start)  # two steps from the HF weights

    finetune = {k: v for k, v in MAE_KWARGS.items() if not k.startswith("decoder")}
    assert main(["fit", "--config", str(ROOT / "configs" / "finetune" / "vit_tiny_digits.yaml"), *FIT,
                 "--model.init_args.model_kwargs", json.dumps(finetune), "--data.preprocessing_from", "hf",
                 "--model.init_args.init_from", "mae/checkpoints/last.ckpt", "--trainer.default_root_dir", "ft"]) == 0
    assert main(["export", "ft/checkpoints/last.ckpt", "--format", "timm", "--out", "exported", "--with-head"]) == 0
    ours = vit.load_backbone(tmp_path / "ft" / "checkpoints" / "last.ckpt")
    wrapper = TimmWrapperForImageClassification.from_pretrained(tmp_path / "exported").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert _max_diff(wrapper(x).logits, ours(x)) <= RESAMPLED  # timm's LayerNorm eps is 1e-6, ours 1e-12
        assert wrapper(x).logits.shape == (2, 10)
