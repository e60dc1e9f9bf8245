"""Layers: the one Attention (fused vs manual, self vs cross), PatchEmbed checks, position embeddings."""

from __future__ import annotations

import pytest
import torch
from timm.layers import resample_abs_pos_embed

from vit.layers import Attention, Mlp, PatchEmbed, resample_pos_embed, sincos_2d_pos_embed


@pytest.mark.parametrize("qk_norm", [False, True])
def test_attention_fused_equals_manual(qk_norm: bool) -> None:
    attn = Attention(32, num_heads=4, qk_norm=qk_norm).eval()
    x = torch.randn(2, 7, 32)
    fused = attn(x)
    attn.fused_attn = False
    # fp32 SDPA and the explicit softmax differ only by summation order
    torch.testing.assert_close(attn(x), fused, rtol=1e-5, atol=1e-6)


def test_cross_attention_with_itself_equals_self_attention() -> None:
    attn = Attention(32, num_heads=4).eval()
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(attn(x, context=x), attn(x), rtol=1e-5, atol=1e-6)


def test_cross_attention_shapes_and_weights() -> None:
    attn = Attention(32, num_heads=4, qkv_bias=False).eval()
    q, ctx = torch.randn(2, 3, 32), torch.randn(2, 9, 32)
    assert attn(q, context=ctx).shape == (2, 3, 32)
    w = attn.attention_weights(q, context=ctx)
    assert w.shape == (2, 4, 3, 9)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 4, 3))


def test_attention_weights_reproduce_output() -> None:
    attn = Attention(16, num_heads=2).eval()
    x = torch.randn(1, 4, 16)
    w = attn.attention_weights(x)  # (1, 2, 4, 4)
    v = torch.nn.functional.linear(x, *[t[32:] for t in (attn.qkv.weight, attn.qkv.bias)])
    v = v.reshape(1, 4, 2, 8).transpose(1, 2)
    out = attn.proj((w @ v).transpose(1, 2).reshape(1, 4, 16))
    torch.testing.assert_close(out, attn(x), rtol=1e-5, atol=1e-6)


def test_attention_dim_not_divisible_by_heads() -> None:
    with pytest.raises(ValueError, match="embed dim 30 is not divisible by num_heads 4"):
        Attention(30, num_heads=4)


def test_mlp_shape() -> None:
    assert Mlp(8, 32, out_features=5)(torch.randn(2, 3, 8)).shape == (2, 3, 5)


def test_patch_embed_shapes_non_square() -> None:
    pe = PatchEmbed((32, 48), 8, 3, 16)
    assert pe.grid_size == (4, 6)
    assert pe(torch.randn(2, 3, 32, 48)).shape == (2, 24, 16)


def test_patch_embed_errors_name_shapes() -> None:
    with pytest.raises(ValueError, match="image size 30x32 is not divisible by patch size 4x4"):
        PatchEmbed(img_size=(30, 32), patch_size=4)
    pe = PatchEmbed(32, 4, 3, 16)
    with pytest.raises(ValueError, match=r"expected images \[B, 3, H, W\], got shape \(1, 1, 32, 32\)"):
        pe(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="input image size 64x64 does not match the model's img_size 32x32"):
        pe(torch.randn(1, 3, 64, 64))
    dyn = PatchEmbed(32, 4, 3, 16, strict_img_size=False)
    assert dyn(torch.randn(1, 3, 64, 40)).shape == (1, 160, 16)
    with pytest.raises(ValueError, match="image size 33x32 is not divisible"):
        dyn(torch.randn(1, 3, 33, 32))


def test_sincos_matches_mae_convention() -> None:
    emb = sincos_2d_pos_embed(16, (2, 3), num_prefix_tokens=1)
    assert emb.shape == (1, 7, 16)
    assert torch.all(emb[0, 0] == 0)
    # first half of the channels encodes the column (MAE's convention): same column → same first half
    torch.testing.assert_close(emb[0, 1, :8], emb[0, 4, :8])
    assert not torch.allclose(emb[0, 1, 8:], emb[0, 4, 8:])
    # position (0, 0): sin(0) = 0 and cos(0) = 1
    torch.testing.assert_close(emb[0, 1], torch.tensor([0.0] * 4 + [1.0] * 4 + [0.0] * 4 + [1.0] * 4))
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d_pos_embed(6, (2, 2))


def test_resample_identity_at_native_grid() -> None:
    pe = torch.randn(1, 1 + 14 * 14, 32)
    assert resample_pos_embed(pe, (14, 14), (14, 14), 1) is pe


@pytest.mark.parametrize(
    ("old", "new", "prefix"),
    [((14, 14), (24, 24), 1), ((14, 14), (12, 20), 1), ((14, 14), (12, 20), 5), ((8, 12), (16, 6), 0)],
)
def test_resample_matches_timm(old: tuple, new: tuple, prefix: int) -> None:
    pe = torch.randn(1, prefix + old[0] * old[1], 32)
    ours = resample_pos_embed(pe, new, old, prefix)
    assert ours.shape == (1, prefix + new[0] * new[1], 32)
    torch.testing.assert_close(ours[:, :prefix], pe[:, :prefix])  # prefix tokens untouched
    ref = resample_abs_pos_embed(pe, list(new), list(old), num_prefix_tokens=prefix)
    # same interpolation as timm (bicubic, antialiased): only fp32 rounding differs
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_resample_non_square_keeps_rows_and_columns() -> None:
    # a grid whose value is its column index must stay constant down each column after resampling
    cols = torch.arange(6.0).repeat(4, 1)  # (4, 6)
    pe = cols.reshape(1, 24, 1).expand(1, 24, 4).contiguous()
    out = resample_pos_embed(pe, (8, 6), (4, 6), 0).reshape(8, 6, 4)
    torch.testing.assert_close(out[..., 0], torch.arange(6.0).repeat(8, 1), rtol=1e-4, atol=1e-4)


def test_resample_wrong_length_names_shapes() -> None:
    with pytest.raises(ValueError, match=r"\(1, 11, 8\) does not hold 1 prefix tokens plus a 3x3 grid"):
        resample_pos_embed(torch.randn(1, 11, 8), (4, 4), (3, 3), 1)
