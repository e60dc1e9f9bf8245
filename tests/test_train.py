"""Training recipe pieces: decay groups, lr scaling, warmup + cosine, and the MAE LightningModule's checkpoints."""

from __future__ import annotations

import csv
import math

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.model_summary.model_summary import get_human_readable_count

from vit.flops import mae_forward_flops
from vit.models import RECORD_KEY, MaskedAutoencoder
from vit.train import MAEPretrainer
from vit.train.optim import build_optimizer, build_scheduler
from vit.train.schedule import scaled_lr

TINY_KWARGS = dict(patch_size=4, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=16, decoder_depth=1,
                   decoder_num_heads=2)


def test_no_decay_on_norms_biases_tokens_positions(tiny_mae_args: dict) -> None:
    mae = MaskedAutoencoder(**tiny_mae_args)
    names = {id(p): n for n, p in mae.named_parameters()}
    groups = build_optimizer(mae, "adamw", lr=1e-3, weight_decay=0.05).param_groups
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
    opt = build_optimizer(torch.nn.Linear(2, 2), "adamw", lr=1.0, weight_decay=0.0)
    for g in opt.param_groups:
        g["lr_scale"] = 0.5
    sched = build_scheduler(opt, warmup_steps=4, total_steps=14, min_lr_ratio=0.1)
    lrs = []
    for step in range(14):  # as Lightning drives it: the lr of step t is set from the update count t
        sched.step_update(num_updates=step)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[:5] == pytest.approx([0.0, 0.125, 0.25, 0.375, 0.5])  # linear from 0 (the MAE reference's shape)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:], strict=False))  # then monotone down
    last = 0.5 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 9 / 10)))  # step 13: 9 of 10 cosine steps
    assert lrs[-1] == pytest.approx(last) and lrs[-1] > 0.05  # towards min_lr_ratio x peak, times lr_scale


def test_sgd_is_plain_momentum_and_skips_frozen_parameters() -> None:
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    net[0].requires_grad_(False)
    opt = build_optimizer(net, "sgd", lr=0.1, weight_decay=0.0, momentum=0.8)
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.8 and not opt.defaults["nesterov"]
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in net[1].parameters()}


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
    info = module.schedule
    assert info.effective_batch_size == 16 and info.peak_lr == pytest.approx(0.01 * 16 / 256)
    assert info.total_steps == 4 and info.warmup_steps == 2 and info.steps_per_epoch == 2
    assert not torch.equal(before, module.model.decoder_pred.weight)


def test_pretrainer_with_max_steps_only(tmp_path, recwarn) -> None:
    """Warmup in epochs still resolves when the trainer is limited by steps alone; a too-long warmup is said."""
    module = MAEPretrainer(model="mae_vit_tiny_patch16", model_kwargs=TINY_KWARGS, img_size=32, warmup_epochs=1)
    trainer = L.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        default_root_dir=tmp_path, limit_val_batches=0)
    trainer.fit(module, torch.utils.data.DataLoader(_Images(), batch_size=8))
    assert module.schedule.total_steps == 3 and module.schedule.warmup_steps == 3  # 4 asked, capped at the run
    assert any("4 warmup steps" in str(w.message) and "only 3" in str(w.message) for w in recwarn)
    assert trainer.global_step == 3


def _fit_and_save(module: MAEPretrainer, path) -> dict:
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        default_root_dir=path.parent, limit_val_batches=0, enable_model_summary=False)
    trainer.fit(module, torch.utils.data.DataLoader(_Images(), batch_size=8))
    trainer.save_checkpoint(path)
    return torch.load(path, weights_only=True)


def test_checkpoint_holds_each_tensor_once_and_records_the_network(tmp_path) -> None:
    module = MAEPretrainer(model="mae_vit_tiny_patch16", model_kwargs=TINY_KWARGS, img_size=32, warmup_epochs=0)
    ckpt = _fit_and_save(module, tmp_path / "mae.ckpt")
    assert sorted(ckpt["state_dict"]) == sorted(f"model.{k}" for k in module.model.state_dict())
    record = ckpt[RECORD_KEY]
    assert record["architecture"] == "MaskedAutoencoder" and record["name"] == "mae_vit_tiny_patch16"
    assert record["model_args"] == module.model.model_args  # the full constructor arguments
    assert record["encoder_args"]["embed_dim"] == 32 and record["img_size"] == [32, 32]


def test_a_compiled_run_loads_into_an_uncompiled_config(tmp_path, monkeypatch) -> None:
    real = torch.compile
    # dynamo really traces the MAE; the eager backend skips inductor's code generation (seconds, not a minute)
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real(fn, backend="eager"))
    compiled = MAEPretrainer(model="mae_vit_tiny_patch16", model_kwargs=TINY_KWARGS, img_size=32, warmup_epochs=0,
                             compile=True)
    ckpt = _fit_and_save(compiled, tmp_path / "compiled.ckpt")
    assert not any("_orig_mod" in k or "_forward" in k for k in ckpt["state_dict"])
    plain = MAEPretrainer(model="mae_vit_tiny_patch16", model_kwargs=TINY_KWARGS, img_size=32, warmup_epochs=0)
    plain.load_state_dict(ckpt["state_dict"], strict=True)
    x = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, 64)
    with torch.no_grad():
        torch.testing.assert_close(plain(x, noise=noise)[0], compiled(x, noise=noise)[0])


def test_a_short_fit_logs_throughput_and_data_wait_and_summarises_flops(tmp_path, capsys) -> None:
    """img/s, TFLOP/s and the data-wait fraction reach metrics.csv; the model summary shows our FLOP count."""
    module = MAEPretrainer(model="mae_vit_tiny_patch16", model_kwargs=TINY_KWARGS, img_size=32, warmup_epochs=0)
    trainer = L.Trainer(max_steps=4, logger=CSVLogger(tmp_path, name=""), enable_checkpointing=False,
                        enable_progress_bar=False, default_root_dir=tmp_path, limit_val_batches=0,
                        log_every_n_steps=2)
    trainer.fit(module, torch.utils.data.DataLoader(_Images(), batch_size=8))
    flops = mae_forward_flops(module.model, 0.75)
    assert module.forward_flops_per_image() == flops > 0
    # Lightning's (rich) summary table, printed to stdout, with our count in it
    assert f"Total FLOPs: {get_human_readable_count(flops)}" in capsys.readouterr().out
    rows = list(csv.DictReader((tmp_path / "version_0" / "metrics.csv").open()))
    rates = [float(r["train/device/samples_per_sec"]) for r in rows if r.get("train/device/samples_per_sec")]
    tflops = [float(r["train/device/flops_per_sec"]) for r in rows if r.get("train/device/flops_per_sec")]
    waits = [float(r["train/data_wait"]) for r in rows if r.get("train/data_wait")]
    assert rates and all(x > 0 for x in rates)
    # a training step is 3 forwards of each of its 8 images: FLOP/s over img/s is 3 x the forward count
    assert tflops[-1] / rates[-1] == pytest.approx(3 * flops, rel=1e-6)
    assert len(waits) == 2 and all(0 <= w < 1 for w in waits)  # logged every 2 of the 4 steps
