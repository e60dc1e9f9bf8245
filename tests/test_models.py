"""VisionTransformer and the registry: shapes, gradients, heads, intermediate layers, named sizes."""

from __future__ import annotations

import pytest
import timm
import torch

import vit
from vit.models import MAPHead, VisionTransformer


@pytest.mark.parametrize("name", vit.list_models("vit_*_patch16_224") + vit.list_models("mae_vit_*_patch16"))
def test_registry_models_tiny_overrides(name: str) -> None:
    """Every registered family builds with tiny overrides, runs, and gives every parameter a gradient."""
    model = vit.create_model(name, img_size=32, patch_size=4, embed_dim=32, depth=1, num_heads=2)
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    loss = out[0] if isinstance(out, tuple) else out.sum()
    assert torch.isfinite(loss).all()
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, f"parameters without gradient: {no_grad}"


@pytest.mark.parametrize(
    ("name", "count"),
    [
        ("vit_tiny_patch16_224", 5_717_416),
        ("vit_small_patch16_224", 22_050_664),
        ("vit_base_patch16_224", 86_567_656),
        ("vit_large_patch16_224", 304_326_632),
        ("vit_huge_patch14_224", 632_045_800),
        ("vit_base_patch32_224", 88_224_232),
        ("mae_vit_base_patch16", 111_907_840),
    ],
)
def test_published_parameter_counts(name: str, count: int) -> None:
    with torch.device("meta"):  # counting needs no memory
        model = vit.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == count


@pytest.mark.parametrize("name", ["vit_small_patch16_224", "vit_base_patch32_384", "vit_large_patch14_224"])
def test_counts_equal_timm(name: str) -> None:
    with torch.device("meta"):
        ours = vit.create_model(name, num_classes=1000)
        ref = timm.create_model(name, num_classes=1000)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]


def test_unknown_model_name_suggests() -> None:
    with pytest.raises(ValueError, match="unknown model name 'vit_bse_patch16_224'; did you mean vit_base_patch16_224"):
        vit.create_model("vit_bse_patch16_224")


@pytest.mark.parametrize("global_pool", ["token", "avg", "map"])
@pytest.mark.parametrize("reg_tokens", [0, 4])
def test_forward_api(tiny_args: dict, global_pool: str, reg_tokens: int) -> None:
    model = VisionTransformer(**tiny_args, num_classes=10, global_pool=global_pool, reg_tokens=reg_tokens).eval()
    x = torch.randn(3, 3, 32, 32)
    tokens = model.forward_features(x)
    assert tokens.shape == (3, 1 + reg_tokens + 64, 64)
    patches = tokens[:, 1 + reg_tokens:]  # what avg / MAP pooling see by default (timm: prefix tokens skipped)
    pooled = {"token": lambda: tokens[:, 0], "avg": lambda: model.fc_norm(patches.mean(dim=1)),
              "map": lambda: model.attn_pool(patches)}[global_pool]()
    torch.testing.assert_close(model.forward_head(tokens, pre_logits=True), pooled)
    torch.testing.assert_close(model(x), model.head(pooled))
    assert model(x).shape == (3, 10)


@pytest.mark.parametrize("global_pool", ["avg", "map"])
def test_pool_include_prefix(tiny_args: dict, global_pool: str) -> None:
    args = dict(tiny_args, num_classes=0, global_pool=global_pool, reg_tokens=2)
    skip, include = VisionTransformer(**args).eval(), VisionTransformer(**args, pool_include_prefix=True).eval()
    include.load_state_dict(skip.state_dict())
    tokens = skip.forward_features(torch.randn(2, 3, 32, 32))
    if global_pool == "avg":
        torch.testing.assert_close(include.pool(tokens), tokens.mean(dim=1))  # class + registers + patches
        torch.testing.assert_close(skip.pool(tokens), tokens[:, 3:].mean(dim=1))
    else:
        assert include.attn_pool.attention_weights(tokens).shape[-1] == 3 + 64
        torch.testing.assert_close(include.pool(tokens), include.attn_pool(tokens))
    assert (include.pool(tokens) - skip.pool(tokens)).abs().max() > 1e-4


def test_fc_norm_follows_timm(tiny_args: dict) -> None:
    avg = VisionTransformer(**tiny_args, global_pool="avg", class_token=False)
    assert isinstance(avg.norm, torch.nn.Identity) and isinstance(avg.fc_norm, torch.nn.LayerNorm)
    tok = VisionTransformer(**tiny_args, global_pool="token")
    assert isinstance(tok.norm, torch.nn.LayerNorm) and isinstance(tok.fc_norm, torch.nn.Identity)
    assert tok.norm.eps == 1e-6


def test_map_head_uses_shared_attention(tiny_args: dict) -> None:
    model = VisionTransformer(**tiny_args, global_pool="map")
    from vit.layers import Attention

    assert isinstance(model.attn_pool, MAPHead) and isinstance(model.attn_pool.attn, Attention)
    w = model.attn_pool.attention_weights(model.forward_features(torch.randn(2, 3, 32, 32)))
    assert w.shape == (2, 4, 1, 65)


def test_backbone_without_head(tiny_args: dict) -> None:
    model = VisionTransformer(**tiny_args, num_classes=0)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 64)


def test_zero_head_init_and_reset(tiny_args: dict) -> None:
    model = VisionTransformer(**tiny_args, num_classes=5, zero_head_init=True)
    assert torch.all(model.head.weight == 0)
    model.reset_classifier(7)
    assert model.head.out_features == 7 and model(torch.randn(1, 3, 32, 32)).shape == (1, 7)


@pytest.mark.parametrize("reshape", [False, True])
def test_intermediate_layers_non_square(tiny_args: dict, reshape: bool) -> None:
    model = VisionTransformer(**dict(tiny_args, img_size=(32, 48)), reg_tokens=2).eval()
    outs = model.get_intermediate_layers(torch.randn(2, 3, 32, 48), n=2, reshape=reshape)
    assert len(outs) == 2
    assert outs[0].shape == ((2, 64, 8, 12) if reshape else (2, 96, 64))
    pairs = model.get_intermediate_layers(torch.randn(2, 3, 32, 48), n=[0], return_prefix_tokens=True)
    assert pairs[0][1].shape == (2, 3, 64)
    with pytest.raises(ValueError, match="cannot take layers"):
        model.get_intermediate_layers(torch.randn(2, 3, 32, 48), n=3)


def test_last_intermediate_layer_is_forward_features(tiny_args: dict) -> None:
    model = VisionTransformer(**tiny_args).eval()
    x = torch.randn(2, 3, 32, 32)
    (last,) = model.get_intermediate_layers(x, n=1, norm=True)
    torch.testing.assert_close(last, model.forward_features(x)[:, 1:])


def test_dynamic_img_size(tiny_args: dict) -> None:
    model = VisionTransformer(**tiny_args, dynamic_img_size=True).eval()
    assert model.forward_features(torch.randn(1, 3, 48, 64)).shape == (1, 1 + 12 * 16, 64)
    fixed = VisionTransformer(**tiny_args)
    with pytest.raises(ValueError, match="does not match the model's img_size 32x32"):
        fixed(torch.randn(1, 3, 48, 64))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(img_size=30), "image size 30x30 is not divisible by patch size 4x4"),
        (dict(embed_dim=60, num_heads=8), "embed_dim 60 is not divisible by num_heads 8"),
        (dict(global_pool="max"), "global_pool must be one of"),
        (dict(global_pool="token", class_token=False), "needs class_token=True"),
        (dict(num_classes=-1), "num_classes must be >= 0"),
        (dict(pos_embed="rope"), "pos_embed must be one of"),
    ],
)
def test_constructor_errors(tiny_args: dict, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        VisionTransformer(**{**tiny_args, **kwargs})


def test_drop_path_and_layer_scale_train_mode(tiny_args: dict) -> None:
    model = VisionTransformer(**tiny_args, drop_path_rate=0.5, init_values=1e-5).train()
    x = torch.randn(4, 3, 32, 32)
    assert not torch.allclose(model(x), model(x))  # stochastic depth is active in training
    model.eval()
    torch.testing.assert_close(model(x), model(x))
