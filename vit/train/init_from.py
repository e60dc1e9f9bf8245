"""``init_from``: a pretrained backbone into a classifier's network, with MAE's fine-tuning rules.

Only the parts a classifier adds may be new (head, fc_norm, MAP head), as MAE's fine-tune script asserts; an
encoder's final ``norm`` is dropped when the classifier pools by average (it normalises after pooling, in
``fc_norm``); an MAE's decoder is dropped; positions are resampled from the grid the source records; a head
of another class count is re-initialised. Anything else missing or mismatched is an error naming the file.
"""

from __future__ import annotations

from torch import nn

from vit.export import WeightsMismatchError, load_weights, read_weights
from vit.models import VisionTransformer

NEW_PARTS = ("head.", "fc_norm.", "attn_pool.", "norm.")


def load_pretrained(net: VisionTransformer, source: str, head_std: float) -> str:
    """Load ``source`` into ``net``; a fresh head gets N(0, ``head_std``) weights. Returns what was done."""
    weights = read_weights(source)
    old_head = weights.state.get("head.weight")
    try:
        report = load_weights(net, weights, strict=True, new=NEW_PARTS)
    except WeightsMismatchError as e:
        raise WeightsMismatchError(f"model.init_from {source} does not fit this classifier's network "
                                   f"({_describe(net)}): {e}") from e
    notes = []
    if any(k.startswith("head.") for k in report.fresh):
        _init_head(net, head_std)
        if old_head is not None:
            notes.append(f"re-initialised the head: {source} has {old_head.shape[0]} classes, this model "
                         f"{net.num_classes}")
    loaded = len(net.state_dict()) - len(report.fresh)
    parts = sorted({k.split(".")[0] for k in report.fresh})
    return (f"init_from {source} (layout {weights.layout!r}): loaded {loaded} tensors"
            + (f"; resampled {', '.join(report.resampled)}" if report.resampled else "")
            + (f"; new: {', '.join(parts)}" if parts else "")
            + ("; dropped the MAE decoder" if report.dropped_decoder else "")
            + "".join(f"; {n}" for n in notes))


def _init_head(net: VisionTransformer, std: float) -> None:
    linear = net.head[-1] if isinstance(net.head, nn.Sequential) else net.head
    if isinstance(linear, nn.Linear):
        nn.init.trunc_normal_(linear.weight, std=std)
        nn.init.zeros_(linear.bias)


def _describe(net: VisionTransformer) -> str:
    args = net.model_args
    return (f"embed_dim {args['embed_dim']}, depth {args['depth']}, patch {args['patch_size']}, "
            f"global_pool {args['global_pool']}, class_token {args['class_token']}, reg_tokens {args['reg_tokens']}")
