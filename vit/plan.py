"""``vit plan``: validate a config and print what its run would do, without training or writing anything.

    vit plan --config configs/mae/vit_tiny_digits.yaml --trainer.devices 2
    vit plan --config configs/mae/vit_base_in1k.yaml --images 1281167

The config goes through the same LightningCLI as ``vit fit`` (same overrides, same errors). The model is built on
the meta device (no memory, no init cost, so ViT-H plans on a laptop); no Trainer is made, so a GPU recipe plans
on a CPU. The data module is set up to count the training images, unless ``--images N`` gives the count and the
data is not read (e.g. ImageNet-1k's 1,281,167 where it is not at hand). ``--classes K`` then sets the head of a
classifier whose ``num_classes`` comes from the data.

torch, Lightning and the models are imported when a plan is made, not with this module, so ``vit plan --help``
answers at once.
"""

from __future__ import annotations

import argparse
import functools
import logging
import math
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from lightning import LightningModule
    from torch import nn

    from vit.data import ImageDataModule

log = logging.getLogger(__name__)

ADAMW_BYTES_PER_PARAM = 16  # fp32 weight, gradient and two moments (mixed precision keeps fp32 masters)
# images in the measured forward: a BatchNorm in train mode (a linear probe's head) needs two; counts are per image
IMAGES = 2


def main(argv: list[str]) -> int:
    """Entry point of ``vit plan``; returns the exit status."""
    own = _own_parser()
    if any(a in ("-h", "--help") for a in argv):
        print(own.format_help())
        return 0
    opts, rest = own.parse_known_args(argv)
    from vit.lightning_cli import ConfigError

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    for pattern in (".*LightningCLI's args parameter.*", ".*'set_vital' is deprecated.*"):
        warnings.filterwarnings("ignore", message=pattern)  # plan passes its own args; third-party noise
    try:
        plan = make_plan(rest, images=opts.images, classes=opts.classes)
    except (ConfigError, ValueError, OSError) as e:  # config and data errors, each naming its cause
        log.error("vit plan: error: %s", e)
        return 2
    print(format_plan(plan))
    return 0


def make_plan(args: list[str], images: int | None = None, classes: int | None = None) -> dict[str, Any]:
    """Parse ``args`` as ``vit fit`` would (without the ``fit``), build everything but the Trainer, and measure."""
    from lightning import LightningModule

    from vit.data import ImageDataModule
    from vit.flops import attention_densities, count_flops
    from vit.models import MaskedAutoencoder, VisionTransformer
    from vit.train.schedule import effective_batch_size, optimizer_steps_per_epoch, scaled_lr, warmup_steps

    if images is not None and images <= 0:
        raise ValueError(f"--images must be positive, got {images}")
    cli = _plan_cli()(LightningModule, ImageDataModule, subclass_mode_model=True, run=False, args=args,
                   images=images, classes=classes,
                   parser_kwargs={"description": "vit plan: validate a config and print its run's numbers. "
                                                 "Own options: --images N (training images; data not read), "
                                                 "--classes K (classifier head when the data is not read)."})
    cfg, model, dm = cli.config, cli.model, cli.datamodule
    tcfg = cfg.trainer
    configs = [str(c) for c in cli.parser.default_config_files + (cfg.get("config") or [])]
    plan: dict[str, Any] = {"config": configs, "module": type(model).__name__}

    if images is None:
        dm.prepare_data()
        dm.setup("fit")
        loader = dm.train_dataloader()
        n_train, drop_last = len(loader.dataset), loader.drop_last
        val = getattr(dm, "val_dataset", None)
        plan["val_images"] = len(val) if val is not None else 0
    else:
        n_train, drop_last = images, bool(dm.hparams.get("drop_last", True))
        plan["val_images"] = None
    plan["train_images"] = n_train
    _build_network(model, dm)
    net = getattr(model, "model", model)

    # network
    params = list(model.parameters())
    plan["params_total"] = sum(p.numel() for p in params)
    plan["params_trainable"] = sum(p.numel() for p in params if p.requires_grad)
    plan["model_name"] = model.hparams.get("model", type(net).__name__)
    encoder = net.encoder if isinstance(net, MaskedAutoencoder) else net
    if isinstance(encoder, VisionTransformer):
        pe = encoder.patch_embed
        plan.update(img_size=tuple(pe.img_size), patch_size=tuple(pe.patch_size), patches=pe.num_patches,
                    prefix_tokens=encoder.num_prefix_tokens, in_chans=pe.in_chans)
    mask_ratio = getattr(model, "mask_ratio", None) if isinstance(net, MaskedAutoencoder) else None
    plan["mask_ratio"] = mask_ratio
    if mask_ratio is not None and "patches" in plan:
        plan["tokens_kept"] = int(plan["patches"] * (1 - mask_ratio))  # as MAE's random_masking
    forward = _forward_fn(net, plan, mask_ratio)
    plan["flops_forward"] = count_flops(forward) // IMAGES
    plan["flops_train"] = count_flops(lambda: _scalar(forward()).backward()) // IMAGES
    plan["attention"] = attention_densities(net) if isinstance(net, MaskedAutoencoder | VisionTransformer) else []
    plan["activation_bytes_per_image"] = _saved_activation_bytes(forward, params) // IMAGES

    # run
    per_node = _num_devices(tcfg)
    world = per_node * int(tcfg.get("num_nodes") or 1)
    batch = int(dm.hparams.batch_size)
    accum = int(tcfg.get("accumulate_grad_batches") or 1)
    per_rank = math.ceil(n_train / world)  # DistributedSampler pads every rank to the same count
    batches = per_rank // batch if drop_last else math.ceil(per_rank / batch)
    limit = tcfg.get("limit_train_batches")
    if isinstance(limit, float):
        batches = int(batches * limit)
    elif isinstance(limit, int):
        batches = min(batches, limit)
    steps_per_epoch = optimizer_steps_per_epoch(batches, accum)
    max_epochs, max_steps = tcfg.get("max_epochs"), tcfg.get("max_steps", -1)
    # Lightning's estimated_stepping_batches: 1000 epochs when neither limit is set, max_steps caps the epochs
    epochs = max_epochs if max_epochs is not None else (1000 if max_steps in (None, -1) else None)
    total = steps_per_epoch * max(epochs, 1) if epochs not in (None, -1) else math.inf
    if max_steps not in (None, -1):
        total = min(total, max_steps)
    eff = effective_batch_size(world, batch, accum)
    hp = model.hparams
    lr = hp.get("lr") if hp.get("lr") is not None else (
        scaled_lr(hp["base_lr"], eff) if hp.get("base_lr") is not None else None)
    warmup_epochs = hp.get("warmup_epochs")
    warmup = warmup_steps(warmup_epochs, steps_per_epoch, total) if warmup_epochs is not None else None
    plan.update(
        devices=world, devices_per_node=per_node, devices_counted_here=_counted_here(tcfg),
        num_nodes=int(tcfg.get("num_nodes") or 1), strategy=_name(tcfg.get("strategy")),
        precision=str(tcfg.get("precision")), batch_size=batch, accumulate=accum, effective_batch=eff,
        base_lr=hp.get("base_lr"), lr=lr, batches_per_epoch=batches, steps_per_epoch=steps_per_epoch,
        max_epochs=epochs, total_steps=total, warmup_epochs=warmup_epochs, warmup_steps=warmup,
        state_bytes_per_device=plan["params_trainable"] * ADAMW_BYTES_PER_PARAM
        + (plan["params_total"] - plan["params_trainable"]) * 4,
        activation_bytes_per_device=plan["activation_bytes_per_image"] * batch,
    )
    return plan


def format_plan(plan: dict[str, Any]) -> str:
    """The plan as an aligned two-column table."""
    from vit.train.schedule import scaled_lr

    rows = [("config", ", ".join(plan["config"]) or "(command line)")]
    shape = ""
    if "patches" in plan:
        shape = f" (img {_hw(plan['img_size'])}, patch {_hw(plan['patch_size'])})"
    rows.append(("model", f"{plan['module']}: {plan['model_name']}{shape}"))
    rows.append(("parameters", f"{_m(plan['params_total'])} total, {_m(plan['params_trainable'])} trainable"))
    if "patches" in plan:
        prefix = plan["prefix_tokens"]
        tokens = f"{plan['patches']} patches + {prefix} prefix"
        if plan.get("tokens_kept") is not None:
            tokens += (f"; {plan['tokens_kept']} + {prefix} kept by the encoder "
                       f"(mask ratio {plan['mask_ratio']:g})")
        rows.append(("tokens / image", tokens))
    rows.append(("GFLOPs / image", f"{plan['flops_forward'] / 1e9:,.3f} forward, "
                                   f"{plan['flops_train'] / 1e9:,.3f} train step (forward + backward)"))
    if any(p != "dense" for p, _ in plan.get("attention", [])):
        rows.append(("attention", _patterns(plan["attention"])))
    val = "not read" if plan["val_images"] is None else f"{plan['val_images']:,} val"
    given = " (given by --images)" if plan["val_images"] is None else ""
    rows.append(("data", f"{plan['train_images']:,} train images{given}, {val}"))
    here = " (counted on this machine)" if plan["devices_counted_here"] else ""
    rows.append(("devices", f"{plan['devices']} = {plan['devices_per_node']} per node{here} x {plan['num_nodes']} "
                            f"node(s); strategy {plan['strategy']}, precision {plan['precision']}"))
    rows.append(("batch", f"{plan['batch_size']} per device x {plan['devices']} devices x accumulate "
                          f"{plan['accumulate']} = {plan['effective_batch']:,} effective"))
    if plan["lr"] is not None:
        rule = (f" = base_lr {plan['base_lr']:g} x {plan['effective_batch']:,} / 256"
                if plan["base_lr"] is not None and plan["lr"] == scaled_lr(plan["base_lr"], plan["effective_batch"])
                else " (set directly)")
        rows.append(("learning rate", f"{plan['lr']:.4g}{rule}"))
    epochs = plan["max_epochs"]
    steps = (f"{plan['steps_per_epoch']:,} per epoch ({plan['batches_per_epoch']:,} batches per device)"
             + (f" x {epochs} epochs" if epochs is not None else "") + f", {_int(plan['total_steps'])} in all")
    rows.append(("optimizer steps", steps))
    if plan["warmup_steps"] is not None:
        rows.append(("warmup", f"{_int(plan['warmup_steps'])} steps ({plan['warmup_epochs']:g} epochs)"))
    rows.append(("memory / device", f"weights + grads + AdamW {_gib(plan['state_bytes_per_device'])} "
                                    "(FSDP full-shard divides it by the devices); activations saved for backward "
                                    f"~{_gib(plan['activation_bytes_per_device'])} at batch {plan['batch_size']} "
                                    "(fp32, unfused attention: bf16 and fused kernels need less)"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows) + "\n  (plan only: nothing was trained or written)"


def _own_parser() -> argparse.ArgumentParser:
    """``vit plan``'s own options; everything else is a ``vit fit`` option."""
    parser = argparse.ArgumentParser(
        prog="vit plan", allow_abbrev=False, add_help=False,
        usage="vit plan --config RECIPE [--images N] [--classes K] [any vit fit option, e.g. --trainer.devices 8]",
        description="Validate a recipe and print what its run would do (parameters, FLOPs, batch, lr, steps, "
                    "warmup, memory per device), without training or writing anything.",
        epilog="Every `vit fit` option is accepted as well (--config, --trainer.*, --model.*, --data.*), with the "
               "same checks and errors; `vit fit --help` lists them.")
    parser.add_argument("-h", "--help", action="store_true", help="show this message and exit")
    parser.add_argument("--images", type=int, default=None, metavar="N",
                        help="the number of training images; the data is not read (e.g. 1281167 for ImageNet-1k)")
    parser.add_argument("--classes", type=int, default=None, metavar="K",
                        help="the classifier's classes when the data is not read (its num_classes comes from it)")
    return parser


@functools.cache
def _plan_cli() -> type:
    """``_PlanCLI``, defined on first use (it derives from ``VitCLI``, which needs Lightning)."""
    import torch

    from vit.lightning_cli import VitCLI

    class _PlanCLI(VitCLI):
        """VitCLI that builds the model on the meta device and no Trainer; ``--images`` leaves the data unread."""

        def __init__(self, *args: Any, images: int | None = None, classes: int | None = None, **kwargs: Any) -> None:
            self._images, self._classes = images, classes
            super().__init__(*args, **kwargs)

        def before_instantiate_classes(self) -> None:
            super().before_instantiate_classes()
            if self._images is not None:
                data = self.config["data"]["init_args"]
                if "root" in data:
                    data["root"] = None  # not read: no folder checks, no setup
                if "val_split" in data:
                    data["val_split"] = 0.0
            init_args = self.config["model"].get("init_args")
            if self._classes is not None and init_args is not None and "num_classes" in init_args:
                init_args["num_classes"] = self._classes

        def instantiate_classes(self) -> None:
            with torch.device("meta"):
                super().instantiate_classes()

        def instantiate_trainer(self, **kwargs: Any) -> None:
            return None

    return _PlanCLI


def _build_network(model: LightningModule, dm: ImageDataModule) -> None:
    """Build a classifier's network for the data's classes on the meta device, as ``configure_model`` would."""
    if not hasattr(model, "build_network") or getattr(model, "model", None) is not None:
        return
    import torch

    num_classes = getattr(dm, "num_classes", 0)
    if not num_classes:
        raise ValueError("the classifier's num_classes comes from the data, which is not read: pass --classes K")
    with torch.device("meta"):
        model.build_network(num_classes, model.hparams.get("class_names") or getattr(dm, "class_names", None))


def _forward_fn(net: nn.Module, plan: dict[str, Any], mask_ratio: float | None) -> Callable[[], Any]:
    import torch

    from vit.models import MaskedAutoencoder

    h, w = plan.get("img_size", (224, 224))
    x = torch.empty(IMAGES, plan.get("in_chans", 3), h, w, device="meta")
    net.train()
    if isinstance(net, MaskedAutoencoder):
        return lambda: net(x, mask_ratio)
    return lambda: net(x)


def _scalar(out: Any) -> torch.Tensor:
    out = out[0] if isinstance(out, tuple | list) else out
    return out if out.dim() == 0 else out.float().mean()


def _saved_activation_bytes(fn: Callable[[], Any], params: list[nn.Parameter]) -> int:
    """Bytes of the tensors autograd keeps for backward during ``fn()``, parameters and their views excluded."""
    import torch

    param_ids = {id(p) for p in params}
    seen: dict[int, torch.Tensor] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        base = t._base if t._base is not None else t
        if id(base) not in param_ids:
            seen.setdefault(id(base), base)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(t.numel() * t.element_size() for t in seen.values())


def _num_devices(tcfg: Any) -> int:
    devices, accelerator = tcfg.get("devices"), str(tcfg.get("accelerator") or "auto")
    if isinstance(devices, list | tuple):
        return len(devices)
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    if isinstance(devices, str) and "," in devices:
        return len([d for d in devices.split(",") if d.strip()])
    if isinstance(devices, int) and devices > 0:
        return devices
    # "auto" / -1: every visible GPU for a GPU run, one process on a CPU (as Lightning does)
    import torch

    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return torch.cuda.device_count()
    return 1


def _counted_here(tcfg: Any) -> bool:
    devices = tcfg.get("devices")
    return devices in (None, "auto", -1, "-1")


def _name(strategy: Any) -> str:
    if strategy is None:
        return "auto"
    if isinstance(strategy, str):
        return strategy
    path = strategy.get("class_path") if hasattr(strategy, "get") else None
    return str(path).rsplit(".", 1)[-1] if path else type(strategy).__name__


def _patterns(blocks: list[tuple[str, float]]) -> str:
    """'window:8 x3 (density 0.062), dense x1': each pattern, its blocks and the share of dense attention it costs."""
    counts: dict[str, list[float]] = {}
    for pattern, rho in blocks:
        counts.setdefault(pattern, []).append(rho)
    parts = [f"{p} x{len(r)}" + ("" if p == "dense" else f" (density {sum(r) / len(r):.3f})")
             for p, r in counts.items()]
    return ", ".join(parts) + "; the attention core counts as density x dense"


def _hw(hw: tuple[int, int]) -> str:
    return str(hw[0]) if hw[0] == hw[1] else f"{hw[0]}x{hw[1]}"


def _m(n: int) -> str:
    return f"{n / 1e6:,.2f} M" if n >= 1e5 else f"{n:,}"


def _gib(n: float) -> str:
    return f"{n / 2**30:,.2f} GiB" if n >= 2**28 else f"{n / 2**20:,.1f} MiB"


def _int(n: float) -> str:
    return "unbounded" if not math.isfinite(n) else f"{int(n):,}"
