"""timm parity both ways (random weights built here), official-MAE key map, load_weights errors."""

from __future__ import annotations

import os

import pytest
import timm
import torch

import vit
from vit.export import (
    UnsafeCheckpointError,
    WeightsMismatchError,
    detect_layout,
    load_weights,
    vit_to_mae_official,
    vit_to_timm,
)
from vit.models import MaskedAutoencoder, VisionTransformer

TIMM_TINY = dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4, num_classes=10)

VARIANTS = {
    "cls_token": {},
    "avg_no_cls": dict(global_pool="avg", class_token=False),
    "map": dict(global_pool="map"),
    "map_no_cls": dict(global_pool="map", class_token=False),
    "no_qkv_bias": dict(qkv_bias=False),
    "qk_norm": dict(qk_norm=True),
    "layer_scale": dict(init_values=1e-5),
    "reg_tokens": dict(reg_tokens=4),
    "reg_tokens_no_embed_class": dict(reg_tokens=4, no_embed_class=True, global_pool="avg"),
}


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _randomise(model: torch.nn.Module) -> None:
    # non-trivial values everywhere (timm inits biases, LayerScale and norms to constants)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1)


@pytest.mark.parametrize("variant", VARIANTS)
def test_timm_to_ours_same_logits(variant: str) -> None:
    kwargs = {**TIMM_TINY, **VARIANTS[variant]}
    ref = timm.create_model("vit_base_patch16_224", pretrained=False, **kwargs).eval()
    _randomise(ref)
    ours = VisionTransformer(**kwargs).eval()
    report = load_weights(ours, ref.state_dict())
    assert report.layout == ("timm" if "map" in variant else "vit")
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        # fp32 with the same kernels: only summation order may differ
        assert _max_rel(ours(x), ref(x)) <= 1e-5
        assert _max_rel(ours.forward_features(x), ref.forward_features(x)) <= 1e-5


@pytest.mark.parametrize("variant", VARIANTS)
def test_ours_to_timm_same_logits(variant: str) -> None:
    kwargs = {**TIMM_TINY, **VARIANTS[variant]}
    ours = VisionTransformer(**kwargs).eval()
    _randomise(ours)
    ref = timm.create_model("vit_base_patch16_224", pretrained=False, **kwargs).eval()
    ref.load_state_dict(vit_to_timm(ours.state_dict()), strict=True)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert _max_rel(ours(x), ref(x)) <= 1e-5


@pytest.mark.parametrize("key", ["blocks.1.mlp.fc2.weight", "attn_pool.kv.weight", "norm.weight"])
def test_parity_test_can_fail(key: str) -> None:
    """Perturbing one timm weight must show up as a difference above the tolerance."""
    kwargs = {**TIMM_TINY, "global_pool": "map"}
    ref = timm.create_model("vit_base_patch16_224", pretrained=False, **kwargs).eval()
    _randomise(ref)
    ours = VisionTransformer(**kwargs).eval()
    load_weights(ours, ref.state_dict())
    with torch.no_grad():
        ref.state_dict()[key].add_(0.05 * torch.randn_like(ref.state_dict()[key]))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert _max_rel(ours(x), ref(x)) > 1e-5


def test_named_size_loads_into_timm_strict() -> None:
    ours = vit.create_model("vit_small_patch16_224", depth=2)
    ref = timm.create_model("vit_small_patch16_224", pretrained=False, depth=2)
    ref.load_state_dict(vit_to_timm(ours.state_dict()), strict=True)


def test_mismatch_errors_name_keys_and_shapes() -> None:
    ours = VisionTransformer(**TIMM_TINY)
    sd = ours.state_dict()
    sd.pop("blocks.1.norm1.weight")
    sd["head.extra"] = torch.zeros(1)
    sd["head.weight"] = torch.zeros(11, 64)
    with pytest.raises(WeightsMismatchError) as err:
        load_weights(VisionTransformer(**TIMM_TINY), sd)
    msg = str(err.value)
    assert "missing keys (1): blocks.1.norm1.weight" in msg
    assert "unexpected keys (1): head.extra" in msg
    assert "head.weight: checkpoint (11, 64) vs model (10, 64)" in msg
    report = load_weights(VisionTransformer(**TIMM_TINY), {k: v for k, v in sd.items() if k != "head.weight"},
                          strict=False)
    assert report.missing == ["blocks.1.norm1.weight", "head.weight"] and report.unexpected == ["head.extra"]


def test_wrong_architecture_is_refused() -> None:
    big = VisionTransformer(**{**TIMM_TINY, "embed_dim": 128})
    with pytest.raises(WeightsMismatchError, match="shape conflicts"):
        load_weights(VisionTransformer(**TIMM_TINY), big.state_dict())


def test_pos_embed_resampled_for_new_size() -> None:
    src = VisionTransformer(**TIMM_TINY)
    dst = VisionTransformer(**{**TIMM_TINY, "img_size": (48, 64)})
    report = load_weights(dst, src.state_dict())
    assert report.resampled == ["pos_embed"] and dst.pos_embed.shape == (1, 1 + 12 * 16, 64)
    assert dst(torch.randn(1, 3, 48, 64)).shape == (1, 10)


def _mae_official_keys(mae: MaskedAutoencoder) -> dict[str, torch.Tensor]:
    return vit_to_mae_official(mae.state_dict())


def test_official_mae_layout_round_trip(tiny_mae_args: dict) -> None:
    mae = MaskedAutoencoder(**tiny_mae_args)
    official = _mae_official_keys(mae)
    # key names follow the published checkpoints (mae_pretrain_vit_*.pth 'model' entry)
    for key in ["cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "norm.weight",
                "mask_token", "decoder_embed.weight", "decoder_pos_embed", "decoder_blocks.0.mlp.fc1.weight",
                "decoder_norm.bias", "decoder_pred.weight"]:
        assert key in official
    assert official["pos_embed"].shape == (1, 1 + 64, 64)
    assert detect_layout(official) == "mae_official"
    other = MaskedAutoencoder(**tiny_mae_args)
    load_weights(other, {"model": official})  # as published: the state dict under 'model'
    for k, v in mae.state_dict().items():
        torch.testing.assert_close(other.state_dict()[k], v)
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 64)
    torch.testing.assert_close(other(imgs, noise=noise)[0], mae(imgs, noise=noise)[0])


def test_official_mae_into_vit_drops_decoder(tiny_mae_args: dict, tiny_args: dict) -> None:
    mae = MaskedAutoencoder(**tiny_mae_args)
    encoder = VisionTransformer(**tiny_args, num_classes=0, pos_embed="sincos")
    load_weights(encoder, {"model": _mae_official_keys(mae)})
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(encoder.forward_features(x), mae.encoder.forward_features(x))


def test_malicious_pickle_is_refused(tmp_path: os.PathLike) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "x": Evil()}, path)
    assert not marker.exists()
    with pytest.raises(UnsafeCheckpointError, match="refusing to load .*evil.pth"):
        load_weights(VisionTransformer(**TIMM_TINY), path)
    assert not marker.exists()
