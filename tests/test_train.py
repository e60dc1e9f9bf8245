"""Training recipe pieces: decay groups, lr scaling, warmup + cosine, and the MAE LightningModule."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from vit.models import MaskedAutoencoder
from vit.train import MAEPretrainer
from vit.train.optim import build_adamw, param_groups, scaled_lr, warmup_cosine

TINY_KWARGS = dict(patch_size=4, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=16, decoder_depth=1,
                   decoder_num_heads=2)


def test_no_decay_on_norms_biases_tokens_positions(tiny_mae_args: dict) -> None:
    mae = MaskedAutoencoder(**tiny_mae_args)
    names = {id(p): n for n, p in mae.named_parameters()}
    groups = param_groups(mae, weight_decay=0.05)
    no_decay = {names[id(p)] for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    decay = {names[id(p)] for g in groups if g["weight_decay"] > 0.0 for p in g["params"]}
    assert {"encoder.cls_token", "mask_token", "encoder.norm.weight", "encoder.blocks.0.attn.qkv.bias"} <= no_decay
    assert "encoder.blocks.0.attn.qkv.weight" in decay and "decoder_pred.weight" in decay
    # fixed sin-cos positions are not trained at all
    assert "encoder.pos_embed" not in no_decay | decay and "decoder_pos_embed" not in no_decay | decay


def test_scaled_lr_is_the_linear_rule() -> None:
    assert scaled_lr(1.5e-4, 4096) == pytest.approx(2.4e-3)
    assert scaled_lr(4e-3, 64) == pytest.approx(1e-3)


def test_warmup_then_cosine() -> None:
    opt = build_adamw([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr_scale": 0.5}], lr=1.0)
    sched = warmup_cosine(opt, warmup_steps=4, total_steps=14, min_lr_ratio=0.1)
    lrs = []
    for _ in range(14):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.125, 0.25, 0.375, 0.5])  # linear warmup to lr x lr_scale
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:], strict=False))  # then monotone down
    last = 0.5 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.9)))  # step 13: 90% through the cosine
    assert lrs[-1] == pytest.approx(last) and lrs[-1] > 0.05  # towards min_lr_ratio x peak


def test_pretrainer_validates_and_builds() -> None:
    with pytest.raises(ValueError, match=r"mask_ratio must be in \[0, 1\), got 1.0"):
        MAEPretrainer(model="mae_vit_tiny_patch16", model_kwargs=TINY_KWARGS, img_size=32, mask_ratio=1.0)
    with pytest.raises(ValueError, match="is not a masked autoencoder"):
        MAEPretrainer(model="vit_tiny_patch16_224")
    module = MAEPretrainer(model="mae_vit_tiny_patch16", model_kwargs=TINY_KWARGS, img_size=32)
    assert module.model.norm_pix_loss and module.model.encoder.patch_embed.img_size == (32, 32)


class _Images(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 32

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(i)), 0


def test_pretrainer_trains_with_accumulation(tmp_path) -> None:
    module = MAEPretrainer(model="mae_vit_tiny_patch16", model_kwargs=TINY_KWARGS, img_size=32, base_lr=0.01,
                           warmup_epochs=1)
    loader = torch.utils.data.DataLoader(_Images(), batch_size=8)
    trainer = L.Trainer(max_epochs=2, accumulate_grad_batches=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, default_root_dir=tmp_path, limit_val_batches=0)
    before = module.model.decoder_pred.weight.detach().clone()
    trainer.fit(module, loader)
    info = module.run_info
    assert info["effective_batch_size"] == 16 and info["peak_lr"] == pytest.approx(0.01 * 16 / 256)
    assert info["total_steps"] == 4 and info["warmup_steps"] == 2
    assert not torch.equal(before, module.model.decoder_pred.weight)


def test_pretrainer_with_max_steps_only(tmp_path) -> None:
    """Warmup in epochs still resolves when the trainer is limited by steps alone."""
    module = MAEPretrainer(model="mae_vit_tiny_patch16", model_kwargs=TINY_KWARGS, img_size=32, warmup_epochs=1)
    trainer = L.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        default_root_dir=tmp_path, limit_val_batches=0)
    trainer.fit(module, torch.utils.data.DataLoader(_Images(), batch_size=8))
    assert module.run_info["total_steps"] == 3 and module.run_info["warmup_steps"] == 4
    assert trainer.global_step == 3
