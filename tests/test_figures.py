"""vit.train figures: learning curves, the pyplot state left alone, the MAE reconstruction figure."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from PIL import Image

from vit.data import ImageDataModule
from vit.train import MAEPretrainer, ReconstructionPlotter
from vit.train import reconstruction as reconstruction_module
from vit.train.figures import DPI, learning_curves_figure, save_image_grid, save_learning_curves
from vit.train.reconstruction import MASK_GREY, reconstruction_columns

# A Lightning CSV log: step rows, then per epoch a validation row and a train-epoch row.
METRICS_CSV = """epoch,step,lr-AdamW,train/loss_epoch,train/loss_step,val/acc1,val/loss
0,0,0.001,,2.5,,
0,1,0.002,,2.1,,
0,1,,,,0.25,2.0
0,1,,2.3,,,
1,3,0.003,,1.5,,
1,3,,,,0.5,1.25
1,3,,1.75,,,
2,5,,,,0.75,1.0
2,5,,1.25,,,
2,5,,,,0.75,0.9
"""  # the last row: epoch 2 validated again (a run killed after it, resumed from before it): the last value counts


def test_learning_curves_panels_and_series(tmp_path) -> None:
    csv_path = tmp_path / "metrics.csv"
    csv_path.write_text(METRICS_CSV)
    fig = learning_curves_figure(csv_path)
    panels = {ax.get_ylabel(): ax for ax in fig.axes}
    assert sorted(panels) == ["acc1", "loss"]  # step-level columns and the lr are not epoch metrics
    assert panels["loss"].get_title() == "loss, epoch 2: train 1.25, val 0.9"
    assert panels["acc1"].get_title() == "acc1, epoch 2: val 0.75"
    for ax in panels.values():
        assert ax.get_xlabel() == "epoch"
    drawn = {
        (name, line.get_label()): (line.get_xdata().tolist(), line.get_ydata().tolist())
        for name, ax in panels.items()
        for line in ax.get_lines()
    }
    assert drawn == {
        ("loss", "train"): ([0.0, 1.0, 2.0], [2.3, 1.75, 1.25]),
        ("loss", "val"): ([0.0, 1.0, 2.0], [2.0, 1.25, 0.9]),
        ("acc1", "val"): ([0.0, 1.0, 2.0], [0.25, 0.5, 0.75]),
    }
    path = save_learning_curves(csv_path, tmp_path / "out" / "curves.png")
    width, height = (round(s * DPI) for s in fig.get_size_inches())
    with Image.open(path) as png:
        assert png.format == "PNG" and png.size == (width, height)  # two panels side by side
    assert width > height


def test_learning_curves_without_epoch_metrics(tmp_path) -> None:
    (tmp_path / "metrics.csv").write_text("epoch,step,train/loss_step\n0,0,2.5\n")
    assert save_learning_curves(tmp_path / "metrics.csv", tmp_path / "curves.png") is None
    assert not (tmp_path / "curves.png").exists()


def test_vit_train_leaves_the_pyplot_state_alone(tmp_path) -> None:
    # A subprocess: this one has already imported matplotlib and vit.train.
    code = textwrap.dedent(f"""
        import matplotlib
        matplotlib.use("svg")
        import matplotlib.pyplot as plt
        mine = plt.figure()
        import torch
        import vit.train
        from vit.train.figures import save_image_grid
        save_image_grid([[torch.rand(3, 4, 4)] * 4], {str(tmp_path / "grid.png")!r})
        assert matplotlib.get_backend() == "svg", matplotlib.get_backend()
        assert plt.get_fignums() == [mine.number] and plt.gcf() is mine, plt.get_fignums()
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "grid.png").is_file()


def test_reconstruction_columns_content() -> None:
    g = torch.Generator().manual_seed(0)
    shown, predicted = torch.rand(2, 3, 8, 8, generator=g), torch.rand(2, 3, 8, 8, generator=g)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.1)  # not ImageNet's: the columns must use these
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    hidden = torch.zeros(2, 1, 8, 8)
    hidden[0, :, :4, :4] = 1  # image 0: top-left 4x4 patch masked
    hidden[1, :, 4:, :] = 1  # image 1: the bottom row of patches masked
    original, masked, recon, pasted = reconstruction_columns((shown - m) / s, (predicted - m) / s, hidden, mean, std)
    hide, keep = hidden.expand(-1, 3, -1, -1).bool(), ~hidden.expand(-1, 3, -1, -1).bool()
    # float32 normalise / de-normalise round trip: a few ulps of values in [0, 1]
    torch.testing.assert_close(original, shown, atol=1e-6, rtol=0)
    torch.testing.assert_close(recon, predicted, atol=1e-6, rtol=0)
    assert torch.all(masked[hide] == MASK_GREY) and torch.equal(masked[keep], original[keep])
    assert torch.equal(pasted[keep], original[keep]) and torch.equal(pasted[hide], recon[hide])


@pytest.mark.filterwarnings("ignore:.*LeafSpec.*is deprecated")  # Lightning 2.6 on this torch
@pytest.mark.filterwarnings("ignore:The '\\w+_dataloader' does not have many workers")
def test_plotter_writes_the_figure_in_a_short_run(tmp_path, monkeypatch) -> None:
    seen = []

    def spy(*args):
        seen.append(args)
        return reconstruction_columns(*args)

    monkeypatch.setattr(reconstruction_module, "reconstruction_columns", spy)
    titles = []

    def grid_spy(*args, **kwargs):
        titles.append(kwargs.get("title"))
        return save_image_grid(*args, **kwargs)

    monkeypatch.setattr(reconstruction_module, "save_image_grid", grid_spy)
    dm = ImageDataModule(img_size=8, batch_size=16, task="pretrain", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    net = dict(patch_size=4, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=16, decoder_depth=1,
               decoder_num_heads=2)
    module = MAEPretrainer(model="mae_vit_tiny_patch16", model_kwargs=net, img_size=8, warmup_epochs=0)
    plotter = ReconstructionPlotter(num_images=3)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=1, num_sanity_val_steps=0,
                        callbacks=[plotter], logger=CSVLogger(tmp_path), enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
                        default_root_dir=tmp_path)
    trainer.fit(module, dm)
    assert plotter.last_path == tmp_path / "lightning_logs" / "version_0" / "reconstructions" / "epoch_0000.png"
    with Image.open(plotter.last_path) as png:
        assert png.size == (4 * 2 * DPI, 3 * 2 * DPI)  # 4 columns x 3 images, 2 inches each
    [title] = titles
    assert title.startswith("epoch 0, val/loss ") and float(title.rsplit(" ", 1)[1]) > 0
    [(imgs, _, hidden, mean, std)] = seen
    assert imgs.shape == (3, 3, 8, 8) and hidden.shape == (3, 1, 8, 8)
    assert (mean, std) == (dm.preprocessing["mean"], dm.preprocessing["std"])
    assert hidden.sum().item() == 3 * 3 * 16  # mask ratio 0.75: 3 of the 4 patches of 4x4 pixels per image
