"""``init_from``: pretrained weights into a classifier's network (MAE's fine-tuning rules) or an MAE to pretrain on.

Classifier: only the parts a classifier adds may be new (head, fc_norm, MAP head), as MAE's fine-tune script
asserts; an encoder's final ``norm`` is dropped when the classifier pools by average (it normalises after
pooling, in ``fc_norm``); an MAE's decoder is dropped; positions are resampled from the grid the source records
(the way its library does it); a head of another class count is re-initialised. MAE: a whole MAE (ours, the
official one, Hugging Face's ViTMAEForPreTraining) loads strictly; an encoder alone leaves the decoder at its
init. Either way the source may be anything ``vit.export.read_weights`` reads, and anything else missing or
mismatched is an error naming the file, as is a LayerNorm epsilon other than the one the source records.
"""

from __future__ import annotations

from torch import nn

from vit.errors import BadInputError
from vit.export import Weights, WeightsMismatchError, load_weights, read_weights
from vit.models import MaskedAutoencoder, VisionTransformer

NEW_PARTS = ("head.", "fc_norm.", "attn_pool.", "norm.")
MAE_DECODER_PARTS = ("decoder_", "mask_token", "encoder.head.")


def load_pretrained(net: VisionTransformer, source: str, head_std: float) -> str:
    """Load ``source`` into ``net``; a fresh head gets N(0, ``head_std``) weights. Returns what was done."""
    weights = read_source(source)
    _check_eps(net, weights, source)
    old_head = weights.state.get("head.weight")
    try:
        report = load_weights(net, weights, strict=True, new=NEW_PARTS)
    except WeightsMismatchError as e:
        raise WeightsMismatchError(f"model.init_from {source} does not fit this classifier's network "
                                   f"({_describe(net)}): {e}") from e
    notes = list(weights.notes)
    if any(k.startswith("head.") for k in report.fresh):
        _init_head(net, head_std)
        if old_head is not None:
            notes.append(f"re-initialised the head: {source} has {old_head.shape[0]} classes, this model "
                         f"{net.num_classes}")
    loaded = len(net.state_dict()) - len(report.fresh)
    parts = sorted({k.split(".")[0] for k in report.fresh})
    return (f"init_from {source} (layout {weights.layout!r}): loaded {loaded} tensors"
            + (f"; resampled {', '.join(report.resampled)} ({report.resample_mode})" if report.resampled else "")
            + (f"; new: {', '.join(parts)}" if parts else "")
            + ("; dropped the MAE decoder" if report.dropped_decoder else "")
            + "".join(f"; {n}" for n in notes))


def load_pretrained_mae(net: MaskedAutoencoder, source: str) -> str:
    """Load ``source`` into ``net`` to continue pretraining; an encoder-only source keeps the decoder's init."""
    weights = read_source(source)
    _check_eps(net.encoder, weights, source)
    try:
        report = load_weights(net, weights, strict=True, new=() if weights.is_mae else MAE_DECODER_PARTS)
    except WeightsMismatchError as e:
        raise WeightsMismatchError(f"model.init_from {source} does not fit this masked autoencoder "
                                   f"({_describe(net.encoder)}): {e}") from e
    loaded = len(net.state_dict()) - len(report.fresh)
    return (f"init_from {source} (layout {weights.layout!r}): loaded {loaded} tensors"
            + ("; new decoder (the source is an encoder)" if report.fresh else "")
            + "".join(f"; {n}" for n in weights.notes))


def read_source(source: str | Weights) -> Weights:
    """The weights ``init_from`` names, read as plain data; a source that is missing or not weights at all is a
    ``BadInputError`` naming it (``vit fit`` checks this before anything is written)."""
    try:
        return read_weights(source)
    except FileNotFoundError as e:
        raise BadInputError(f"model.init_from {source}: no such file or folder ({e})") from e
    except BadInputError as e:
        raise type(e)(f"model.init_from: {e}") from e


def _check_eps(net: VisionTransformer, weights: Weights, source: str) -> None:
    """A LayerNorm epsilon other than the source's changes every output (1e-12 vs 1e-6: ~1e-4) without a key
    or a shape to show it: the one architecture fact the weights cannot check themselves."""
    if weights.record is None:
        return
    args = weights.record.encoder_record().model_args
    theirs, ours = args.get("norm_eps", 1e-6), net.model_args.get("norm_eps", 1e-6)
    if theirs != ours:
        raise WeightsMismatchError(f"model.init_from {source} records LayerNorm eps {theirs:g}, this network has "
                                   f"{ours:g}: set norm_eps: {theirs:g} in model.model_kwargs")


def _init_head(net: VisionTransformer, std: float) -> None:
    linear = net.head[-1] if isinstance(net.head, nn.Sequential) else net.head
    if isinstance(linear, nn.Linear):
        nn.init.trunc_normal_(linear.weight, std=std)
        nn.init.zeros_(linear.bias)


def _describe(net: VisionTransformer) -> str:
    args = net.model_args
    return (f"embed_dim {args['embed_dim']}, depth {args['depth']}, patch {args['patch_size']}, "
            f"global_pool {args['global_pool']}, class_token {args['class_token']}, reg_tokens {args['reg_tokens']}, "
            f"norm_eps {args.get('norm_eps', 1e-6):g}")
