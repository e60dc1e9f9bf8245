"""Reading weights, once: a file, folder or dict becomes one ``Weights`` — our key layout plus the network record.

Every source is read with safetensors or ``torch.load(weights_only=True)`` (pickled code is refused), its
container is unwrapped (Lightning ``.ckpt``, ``{"model": ...}`` of the official MAE, timm's ``state_dict`` /
EMA entries, a folder's ``config.json`` + weights file: ours, timm's hub layout or a Hugging Face
``save_pretrained`` folder), its key layout is detected once and converted once to ours. The record
(``vit.models.NetworkRecord``) comes from the checkpoint or the folder's ``config.json`` (see ``folder.py``); a
plain state dict has none, and then the caller says which network it is.
"""

from __future__ import annotations

import logging
import pickle
import pickletools
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vit.errors import BadInputError
from vit.export.folder import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    library_record,
    own_record,
    read_config,
    shard_files,
    weights_file,
)
from vit.export.hf import hf_to_vit
from vit.export.interop import Layout, detect_layout, mae_official_to_vit, timm_to_vit
from vit.models import RECORD_KEY, NetworkRecord

log = logging.getLogger(__name__)

CONTAINER_KEYS = ("state_dict", "model", "state_dict_ema", "model_ema")
SAFE_MODULES = ("torch.", "collections.", "_codecs.")  # what a plain checkpoint's pickle names


class UnsafeCheckpointError(BadInputError, pickle.UnpicklingError):
    """A checkpoint that would run code to unpickle (refused: weights are only ever read as plain data)."""


class NotACheckpointError(BadInputError):
    """A file that holds no checkpoint: empty, truncated, damaged, or not a PyTorch / safetensors file at all."""


class WeightsMismatchError(BadInputError):
    """Weights whose keys or shapes do not fit the model; the message lists every conflict."""


@dataclass
class Weights:
    """Weights read from one source: ``state`` in our layout (a ViT's keys, or an MAE's ``encoder.*`` + decoder).

    ``layout`` is the layout the source held (``vit``, ``timm``, ``mae``, ``mae_official``, ``hf``); ``record``
    says what built the network when the source recorded it; ``notes`` name the source's tensors left out.
    """

    state: dict[str, torch.Tensor]
    layout: Layout
    source: str
    record: NetworkRecord | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def is_mae(self) -> bool:
        """Whether ``state`` holds a whole masked autoencoder (encoder under ``encoder.`` plus decoder)."""
        return any(k.startswith("encoder.") for k in self.state)


def read_weights(source: str | Path | dict[str, Any] | Weights) -> Weights:
    """Read ``source``: a folder with a ``config.json`` (our export, a timm hub folder, a Hugging Face folder), a
    run folder, a ``.ckpt`` / ``.pth`` / ``.bin`` / ``.safetensors`` file, or a dict."""
    if isinstance(source, Weights):
        return source
    if isinstance(source, dict):
        return _from_object(source, "the given state dict", None)
    path = Path(source)
    if path.is_dir():
        path = weights_file(path) if (path / CONFIG_NAME).is_file() else find_checkpoint(path)
    config_name = str(path.with_name(CONFIG_NAME))
    config = read_config(path.parent)
    weights = _from_object(read_checkpoint(path), str(path), own_record(config, config_name))
    if weights.record is None and config is not None:
        weights.record = library_record(config, weights.state, weights.layout, path.parent, config_name)
    return weights


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The whole object stored at ``path``, read as plain data (safetensors, else ``torch.load(weights_only)``).

    Raises ``FileNotFoundError``, ``UnsafeCheckpointError`` for pickles that would run code, and
    ``NotACheckpointError`` for files that are not checkpoints at all (empty, truncated, random bytes).
    """
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no weights at {path}")
    if path.name.endswith(".index.json"):
        return {k: v for shard in shard_files(path) for k, v in read_checkpoint(shard).items()}
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except SafetensorError as e:
            raise NotACheckpointError(f"{path} is not a readable safetensors file: {e}") from e
    if path.stat().st_size == 0:
        raise NotACheckpointError(f"{path} is not a checkpoint: the file is empty")
    try:
        with warnings.catch_warnings():  # torch's note on a pickle protocol it may not read: the error says it
            warnings.filterwarnings("ignore", message=".*Detected pickle protocol")
            try:  # memory-mapped: a large checkpoint is not read whole to pick out the network
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                obj = torch.load(path, map_location="cpu", weights_only=True)  # the legacy (non-zip) format
    except pickle.UnpicklingError as e:
        detail = _unpickler_detail(e)
        imports = _pickle_imports(path)
        if imports is None:  # random bytes fail the unpickler too, with the same error class
            raise NotACheckpointError(f"{path} is not a checkpoint (not a PyTorch, safetensors or pickle file: "
                                      f"{detail})") from e
        if not imports:
            raise NotACheckpointError(f"{path} is a pickle that torch.load(weights_only=True) cannot read "
                                      f"({detail}); re-save it with torch.save or safetensors") from e
        refused = re.findall(r"GLOBAL ([\w.]+)", str(e))  # what torch's weights-only unpickler refused
        named = refused or [i for i in imports if not i.startswith(SAFE_MODULES)] or imports
        raise UnsafeCheckpointError(
            f"refusing to load {path}: it holds pickled objects that would run code when read (it imports "
            f"{', '.join(dict.fromkeys(named[:3]))}; only tensors and plain data are accepted: re-save the weights "
            f"with safetensors or as a plain state dict)"
        ) from e
    except (PermissionError, IsADirectoryError) as e:
        raise NotACheckpointError(f"{path} cannot be read ({e.strerror})") from e
    except Exception as e:  # torch's many ways to fail on a damaged file (RuntimeError, EOFError, UnicodeError...)
        detail = " ".join(str(e).split()).split(". ")[0][:160]
        raise NotACheckpointError(f"{path} is not a checkpoint (truncated, damaged or another kind of file: "
                                  f"{type(e).__name__}: {detail})") from e
    if not isinstance(obj, dict):
        raise NotACheckpointError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict or state dict")
    return obj


def find_checkpoint(run_dir: str | Path) -> Path:
    """The checkpoint to take from a training run folder.

    Searched recursively for ``*.ckpt``: the checkpoint ``ModelCheckpoint`` recorded as best (in the newest
    checkpoint's callback state, when it monitored a metric and the file is still in the folder), else the
    newest ``last*.ckpt``, else the newest ``*.ckpt``.
    """
    run_dir = Path(run_dir)
    found = sorted(run_dir.rglob("*.ckpt"), key=lambda p: (p.stat().st_mtime, str(p)))
    if not found:
        raise FileNotFoundError(f"no *.ckpt under the run directory {run_dir}")
    newest = ([p for p in found if p.name.startswith("last")] or found)[-1]
    best = _best_recorded(read_checkpoint(newest), found)
    log.info("run directory %s: using %s (%s)", run_dir, best or newest, "best recorded" if best else "newest")
    return best or newest


def _best_recorded(ckpt: dict[str, Any], found: list[Path]) -> Path | None:
    for key, state in (ckpt.get("callbacks") or {}).items():
        if not str(key).startswith("ModelCheckpoint") or not isinstance(state, dict) or not state.get("monitor"):
            continue
        best = Path(str(state.get("best_model_path") or ""))
        matches = [p for p in found if p == best or p.name == best.name]
        if best.name and matches:
            return matches[-1]
    return None


def _from_object(obj: dict[str, Any], name: str, record: NetworkRecord | None) -> Weights:
    """Unwrap the container, take the record it holds, fold a probe head, detect and convert the layout."""
    if isinstance(obj.get(RECORD_KEY), dict):
        record = NetworkRecord.from_dict(obj[RECORD_KEY], f"{name} ({RECORD_KEY})")
    state = _unwrap(obj, name, record.state_prefix if record is not None else "model.")
    if record is not None and record.head.get("kind") == "batchnorm_linear":
        state = fold_batchnorm_head(state, float(record.head["eps"]))
    layout, notes = detect_layout(state), []
    if layout == "timm":
        state = timm_to_vit(state)
    elif layout == "mae_official":
        state = mae_official_to_vit(state)
    elif layout == "hf":
        state, notes = hf_to_vit(state)
        for note in notes:
            log.info("%s: %s", name, note)
    return Weights(state=state, layout=layout, source=name, record=record, notes=notes)


def fold_batchnorm_head(state: dict[str, torch.Tensor], eps: float) -> dict[str, torch.Tensor]:
    """A linear probe's ``head.0`` (BatchNorm without affine, this ``eps``) folded into ``head.1``: a plain ``head``.

    Exact in eval mode: W' = W / sqrt(var + eps), b' = b - W' · mean.
    """
    if "head.0.running_var" not in state or "head.1.weight" not in state:
        return state
    mean, var = state["head.0.running_mean"], state["head.0.running_var"]
    weight = state["head.1.weight"] * (var + eps).rsqrt()
    bias = state["head.1.bias"] - weight @ mean
    out = {k: v for k, v in state.items() if not k.startswith(("head.0.", "head.1."))}
    return {**out, "head.weight": weight, "head.bias": bias}


def _unwrap(obj: dict[str, Any], name: str, prefix: str) -> dict[str, torch.Tensor]:
    """The network's tensors: a Lightning checkpoint's under ``prefix`` (recorded; ``model.`` for ours)."""
    if "pytorch-lightning_version" in obj and isinstance(obj.get("state_dict"), dict):
        state = {k.removeprefix(prefix): v for k, v in obj["state_dict"].items() if k.startswith(prefix)}
        if not state:
            prefixes = sorted({k.split(".")[0] for k in obj["state_dict"]})
            raise WeightsMismatchError(f"{name} is a Lightning checkpoint without a network under {prefix!r} "
                                       f"(state_dict prefixes: {', '.join(prefixes[:8])})")
        return state
    for key in CONTAINER_KEYS:
        if isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightsMismatchError(f"{name} is not a state dict: entries {bad[:5]} are not tensors")
    return obj


def _pickle_imports(path: Path) -> list[str] | None:
    """The globals the pickle in ``path`` (a torch zip's ``data.pkl``, or the file itself) imports, or None when it
    is not a complete pickle: a refusal by the weights-only unpickler then means damage or junk, not code."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                name = next((n for n in z.namelist() if n.endswith("data.pkl")), None)
                ops = list(pickletools.genops(z.read(name))) if name else []
        else:
            with path.open("rb") as f:  # up to the first STOP: a legacy torch file is several pickles
                ops = list(pickletools.genops(f))
    except Exception:  # pickletools raises ValueError on junk, and other errors on truncated opcodes
        return None
    if not ops or ops[-1][0].name != "STOP":
        return None
    imports, strings = [], []
    for op, arg, _ in ops:
        if op.name in ("GLOBAL", "INST"):
            imports.append(str(arg).replace(" ", "."))
        elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
            imports.append(".".join(strings[-2:]))
        elif isinstance(arg, str):
            strings.append(arg)
    return imports


def _unpickler_detail(e: Exception) -> str:
    text = str(e)
    named = re.search(r"Unsupported (?:global|operand)(?:(?!\. |\n| was not).)*", text)
    if named:
        return " ".join(named.group(0).split())
    start = max(text.find("WeightsUnpickler error:"), 0)
    detail = " ".join(text[start:].split()).split(" Check the documentation")[0].split(" Please use")[0]
    return detail if len(detail) <= 300 else detail[:297] + "..."
