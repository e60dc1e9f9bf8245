"""MaskedAutoencoder: masking convention, visible-only encoding, loss on masked patches, patchify."""

from __future__ import annotations

import pytest
import torch

from vit.models import MaskedAutoencoder


@pytest.fixture
def mae(tiny_mae_args: dict) -> MaskedAutoencoder:
    return MaskedAutoencoder(**tiny_mae_args).eval()


@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.75, 0.9])
def test_kept_count_and_encoder_sees_only_visible(mae: MaskedAutoencoder, ratio: float) -> None:
    L = 64
    seen = []
    handle = mae.encoder.blocks[0].register_forward_hook(lambda m, i, o: seen.append(i[0].shape[1]))
    loss, pred, mask = mae(torch.randn(3, 3, 32, 32), mask_ratio=ratio)
    handle.remove()
    keep = int(L * (1 - ratio))
    assert seen == [1 + keep]  # class token + visible patches only
    assert (mask.sum(1) == L - keep).all()
    assert pred.shape == (3, L, 4 * 4 * 3) and torch.isfinite(loss)


def test_masking_convention_lowest_noise_kept(mae: MaskedAutoencoder) -> None:
    x = torch.arange(8.0).reshape(1, 8, 1)
    noise = torch.tensor([[0.9, 0.1, 0.8, 0.2, 0.7, 0.3, 0.6, 0.4]])
    kept, mask, ids_restore = mae.random_masking(x, 0.5, noise)
    assert kept.flatten().tolist() == [1.0, 3.0, 5.0, 7.0]  # ascending noise order
    assert mask.tolist() == [[1, 0, 1, 0, 1, 0, 1, 0]]  # 0 keep, 1 remove
    shuffled = torch.cat([kept, torch.full((1, 4, 1), -1.0)], dim=1)
    restored = torch.gather(shuffled, 1, ids_restore.unsqueeze(-1))
    assert restored.flatten().tolist() == [-1, 1, -1, 3, -1, 5, -1, 7]


def test_ids_restore_inverts_shuffle(mae: MaskedAutoencoder) -> None:
    x = torch.randn(4, 64, 8)
    noise = torch.rand(4, 64)
    _, _, ids_restore = mae.random_masking(x, 0.0, noise)
    shuffled = torch.gather(x, 1, noise.argsort(1).unsqueeze(-1).expand(-1, -1, 8))
    torch.testing.assert_close(torch.gather(shuffled, 1, ids_restore.unsqueeze(-1).expand(-1, -1, 8)), x)


def test_same_noise_same_loss_different_noise_differs(mae: MaskedAutoencoder) -> None:
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 64)
    a, b = mae(imgs, noise=noise)[0], mae(imgs, noise=noise.clone())[0]
    assert a.item() == b.item()
    assert mae(imgs, noise=torch.rand(2, 64))[0].item() != a.item()


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_loss_ignores_visible_patches(tiny_mae_args: dict, norm_pix_loss: bool) -> None:
    mae = MaskedAutoencoder(**tiny_mae_args, norm_pix_loss=norm_pix_loss).eval()
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 64)
    loss, pred, mask = mae(imgs, noise=noise)
    target = mae.patchify(imgs)
    visible = (mask[0] == 0).nonzero()[0].item()
    masked = (mask[0] == 1).nonzero()[0].item()
    changed = target.clone()
    changed[0, visible] += 5.0 * torch.randn(48)
    assert mae.forward_loss(mae.unpatchify(changed), pred, mask).item() == pytest.approx(loss.item(), rel=1e-6)
    changed = target.clone()
    changed[0, masked] += 5.0 * torch.randn(48)
    assert mae.forward_loss(mae.unpatchify(changed), pred, mask).item() != pytest.approx(loss.item(), rel=1e-6)


def test_mask_ratio_zero_uses_all_patches(mae: MaskedAutoencoder) -> None:
    imgs = torch.randn(2, 3, 32, 32)
    loss, pred, mask = mae(imgs, mask_ratio=0.0)
    assert mask.sum() == 0
    torch.testing.assert_close(loss, ((pred - mae.patchify(imgs)) ** 2).mean())


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5])
def test_bad_mask_ratio(mae: MaskedAutoencoder, ratio: float) -> None:
    with pytest.raises(ValueError, match=r"mask_ratio must be in \[0, 1\)"):
        mae(torch.randn(1, 3, 32, 32), mask_ratio=ratio)


def test_bad_noise_shape(mae: MaskedAutoencoder) -> None:
    with pytest.raises(ValueError, match=r"noise must have shape \[B, L\] = \[1, 64\]"):
        mae(torch.randn(1, 3, 32, 32), noise=torch.rand(1, 63))


@pytest.mark.parametrize(("img_size", "patch", "chans"), [(32, 4, 3), ((32, 48), 8, 1), ((16, 24), (4, 8), 2)])
def test_patchify_unpatchify_roundtrip(img_size, patch, chans) -> None:
    mae = MaskedAutoencoder(img_size=img_size, patch_size=patch, in_chans=chans, embed_dim=32, depth=1, num_heads=2,
                            decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    imgs = torch.randn(2, chans, h, w)
    p = mae.patchify(imgs)
    assert p.shape[-1] == mae.patch_size[0] * mae.patch_size[1] * chans
    torch.testing.assert_close(mae.unpatchify(p), imgs)


def test_patchify_matches_reference_order(mae: MaskedAutoencoder) -> None:
    imgs = torch.randn(1, 3, 32, 32)
    p = mae.patchify(imgs)
    # patch (row 1, col 2), pixel (r, c), channel k is imgs[k, 4 + r, 8 + c], flattened as (r, c, k)
    patch = p[0, 1 * 8 + 2].reshape(4, 4, 3)
    torch.testing.assert_close(patch.permute(2, 0, 1), imgs[0, :, 4:8, 8:12])


def test_patchify_ignores_memory_format(mae: MaskedAutoencoder) -> None:
    imgs = torch.randn(2, 3, 32, 32)
    expected = torch.einsum("bchpwq->bhwpqc", imgs.reshape(2, 3, 8, 4, 8, 4)).reshape(2, 64, 48)
    assert torch.equal(mae.patchify(imgs), expected)
    assert torch.equal(mae.patchify(imgs.contiguous(memory_format=torch.channels_last)), expected)


def test_forward_patchifies_once(mae: MaskedAutoencoder, monkeypatch: pytest.MonkeyPatch) -> None:
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 64)
    expected = mae(imgs, 0.75, noise)[0]
    calls = []
    patchify = mae.patchify
    monkeypatch.setattr(mae, "patchify", lambda x: calls.append(x) or patchify(x))
    assert mae(imgs, 0.75, noise)[0].item() == expected.item() and len(calls) == 1


def test_reconstruct_denormalises_norm_pix(tiny_mae_args: dict) -> None:
    mae = MaskedAutoencoder(**tiny_mae_args, norm_pix_loss=True)
    imgs = torch.rand(2, 3, 32, 32)
    target = mae.patchify(imgs)
    normed = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    torch.testing.assert_close(mae.reconstruct(imgs, normed), imgs, rtol=1e-4, atol=1e-4)


def test_encoder_is_a_plain_vit_that_never_masks(mae: MaskedAutoencoder) -> None:
    feats = mae.encoder.forward_features(torch.randn(2, 3, 32, 32))
    assert feats.shape == (2, 65, 64)
    assert not mae.encoder.pos_embed.requires_grad and not mae.decoder_pos_embed.requires_grad


def test_gradients_reach_trainable_parameters(mae: MaskedAutoencoder) -> None:
    mae.train()
    mae(torch.randn(2, 3, 32, 32))[0].backward()
    missing = [n for n, p in mae.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
