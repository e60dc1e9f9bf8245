"""Hugging Face ``save_pretrained`` folders of ViT, ViTMAE and DINOv2 (with registers), read without transformers.

``hf_to_vit`` renames a state dict's keys to ours, accepting the Hub's legacy names
(``encoder.layer.N.attention.attention.query``, ViTMAE ``decoder.decoder_layers.N``, DINOv2
``layer_scale1.lambda1``) and those recent transformers versions write (``layers.N.attention.q_proj``,
``decoder.decoder_encoder.layer.N``); q, k and v are fused into our one ``qkv``. DINOv2 registers carry no
position embedding: the class token's position is folded into the token, the rest covers the patches only
(``no_embed_class``), so tokens stay [cls, registers, patches]. ``hf_record`` reads ``config.json`` into the
record of the network those keys fit; a setting our modules cannot represent is a ``ValueError`` naming it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from vit.models import MaskedAutoencoder, NetworkRecord, VisionTransformer

MODEL_TYPES = ("vit", "vit_mae", "dinov2", "dinov2_with_registers")
PATCH_KEY = "embeddings.patch_embeddings.projection.weight"  # the key every one of their state dicts holds
# transformers' interpolate_pos_encoding at another image size: bicubic, antialiased only with registers
POS_RESAMPLE = {t: {"mode": "bicubic", "antialias": t == "dinov2_with_registers"} for t in MODEL_TYPES}
# the config defaults of transformers (a config.json may leave a field out)
_COMMON = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, hidden_act="gelu", image_size=224,
               num_channels=3, qkv_bias=True, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
DEFAULTS: dict[str, dict[str, Any]] = {
    "vit": dict(_COMMON, intermediate_size=3072, layer_norm_eps=1e-12, patch_size=16),
    "vit_mae": dict(_COMMON, intermediate_size=3072, layer_norm_eps=1e-12, patch_size=16, decoder_hidden_size=512,
                    decoder_num_hidden_layers=8, decoder_num_attention_heads=16, decoder_intermediate_size=2048,
                    norm_pix_loss=False),
    "dinov2": dict(_COMMON, mlp_ratio=4, layer_norm_eps=1e-6, patch_size=14, layerscale_value=1.0,
                   drop_path_rate=0.0, use_swiglu_ffn=False),
    "dinov2_with_registers": dict(_COMMON, mlp_ratio=4, layer_norm_eps=1e-6, patch_size=16, layerscale_value=1.0,
                                  drop_path_rate=0.0, use_swiglu_ffn=False, num_register_tokens=4),
}

_PREFIXES = ("vit.", "dinov2.", "dinov2_with_registers.")
_TOP = {"embeddings.cls_token": "cls_token", "embeddings.position_embeddings": "pos_embed",
        "embeddings.register_tokens": "reg_token", PATCH_KEY: "patch_embed.proj.weight",
        "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias", "layernorm.weight": "norm.weight",
        "layernorm.bias": "norm.bias", "classifier.weight": "head.weight", "classifier.bias": "head.bias"}
_POOLER = "ViTModel's tanh pooler (it gives pooler_output only; last_hidden_state and logits do not use it)"
_DROPPED = {"embeddings.mask_token": "the mask token (used only with bool_masked_pos)",
            "pooler.dense.weight": _POOLER, "pooler.dense.bias": _POOLER}
_ENCODER_LAYER = re.compile(r"^(?:encoder\.layers?|layers)\.(\d+)\.(.+)$")
_DECODER_LAYER = re.compile(r"^decoder\.(?:decoder_layers|decoder_encoder\.layers?)\.(\d+)\.(.+)$")
# inside a layer: (legacy | recent names) → ours; q, k and v are collected for fusing
_LAYER = [
    (r"layernorm_before|norm1", "norm1"), (r"layernorm_after|norm2", "norm2"),
    (r"attention\.attention\.query|attention\.q_proj", "q"), (r"attention\.attention\.key|attention\.k_proj", "k"),
    (r"attention\.attention\.value|attention\.v_proj", "v"),
    (r"attention\.output\.dense|attention\.o_proj", "attn.proj"),
    (r"intermediate\.dense|mlp\.fc1", "mlp.fc1"), (r"output\.dense|mlp\.fc2", "mlp.fc2"),
]
_LAYER_SCALE = {"layer_scale1.lambda1": "ls1.gamma", "layer_scale2.lambda1": "ls2.gamma"}
_SWIGLU = re.compile(r"mlp\.(weights_in|weights_out|gate_proj|up_proj|down_proj)\.")


def is_hf_state(state: Mapping[str, Any]) -> bool:
    """Whether a state dict is laid out as a transformers ViT / ViTMAE / DINOv2 model."""
    return any(k == PATCH_KEY or k.endswith("." + PATCH_KEY) for k in state)


def hf_to_vit(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A transformers state dict → ours (an MAE's encoder under ``encoder.``), and notes on what was left out.

    Raises ``ValueError`` naming keys that have no counterpart (a SwiGLU MLP, another model's head).
    """
    has_decoder = any(k.startswith("decoder.") for k in state)
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    dropped, unknown = set(), []
    for key, value in state.items():
        name = next((key.removeprefix(p) for p in _PREFIXES if key.startswith(p)), key)
        if _SWIGLU.search(name):
            raise ValueError(f"{key}: a SwiGLU MLP (config use_swiglu_ffn: true, as DINOv2-giant) has no counterpart "
                             f"in vitkit's Mlp (fc1 → GELU → fc2)")
        if name in _DROPPED:
            dropped.add(_DROPPED[name])
            continue
        target = _rename(name, has_decoder)
        if target is None:
            unknown.append(key)
        elif target.endswith(("._q", "._k", "._v")):
            stem, part = target.rsplit("._", 1)
            qkv.setdefault(stem, {})[part] = value
        else:
            out[target] = value
    if unknown:
        raise ValueError(f"{len(unknown)} keys have no counterpart in vitkit's networks: {', '.join(unknown[:6])}")
    for stem, parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"{stem.replace('.qkv', '')}: the attention has {sorted(parts)} but needs query, key "
                             f"and value")
        out[stem] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    if "reg_token" in out:  # registers get no position: fold the class token's into the token itself
        out["cls_token"] = out["cls_token"] + out["pos_embed"][:, :1]
        out["pos_embed"] = out["pos_embed"][:, 1:]
    return out, [f"left out {what}" for what in sorted(dropped)]


def hf_record(config: Mapping[str, Any], state: Mapping[str, torch.Tensor], preprocessing: Mapping[str, Any] | None,
              source: str) -> NetworkRecord:
    """The record of the network a transformers ``config.json`` describes, for ``state`` (already in our keys)."""
    model_type = config.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"{source}: model_type {model_type!r} is not one vitkit reads ({', '.join(MODEL_TYPES)})")
    cfg = {**DEFAULTS[model_type], **config}
    if cfg["hidden_act"] != "gelu":
        raise ValueError(f"{source}: hidden_act {cfg['hidden_act']!r}: vitkit's Mlp uses the exact GELU ('gelu')")
    if cfg.get("use_swiglu_ffn"):
        raise ValueError(f"{source}: use_swiglu_ffn: true (DINOv2-giant's SwiGLU MLP) has no counterpart in vitkit's "
                         f"Mlp (fc1 → GELU → fc2)")
    dim = int(cfg["hidden_size"])
    args: dict[str, Any] = dict(
        img_size=_pair(cfg["image_size"]), patch_size=_pair(cfg["patch_size"]), in_chans=int(cfg["num_channels"]),
        embed_dim=dim, depth=int(cfg["num_hidden_layers"]), num_heads=int(cfg["num_attention_heads"]),
        mlp_ratio=_mlp_ratio(cfg, dim, source), qkv_bias=bool(cfg["qkv_bias"]), norm_eps=float(cfg["layer_norm_eps"]),
    )
    if any(k.startswith("encoder.") for k in state):
        net_cls, args = MaskedAutoencoder, {**args, **_decoder_args(cfg, args, source)}
    else:
        net_cls = VisionTransformer
        args.update(num_classes=_num_classes(state, dim, source), global_pool="token",
                    pos_drop_rate=float(cfg["hidden_dropout_prob"]), proj_drop_rate=float(cfg["hidden_dropout_prob"]),
                    attn_drop_rate=float(cfg["attention_probs_dropout_prob"]))
        if model_type == "vit_mae":
            args["pos_embed"] = "sincos"  # ViTMAE's positions are the fixed table (stored, not trained)
        if model_type.startswith("dinov2"):
            args.update(init_values=float(cfg["layerscale_value"]) or 1.0, drop_path_rate=float(cfg["drop_path_rate"]))
        if model_type == "dinov2_with_registers":
            args.update(reg_tokens=int(cfg["num_register_tokens"]), no_embed_class=True)
    with torch.device("meta"):  # the record of the network as built, without allocating it
        net = net_cls(**args)
    record = NetworkRecord.from_model(net, preprocessing=preprocessing, class_names=_class_names(config))
    record.pos_resample = dict(POS_RESAMPLE[model_type])
    return record


def _rename(name: str, has_decoder: bool) -> str | None:
    """Our key for a transformers key (prefix removed); q/k/v as ``<block>.attn.qkv._q``; None if unknown."""
    encoder = "encoder." if has_decoder else ""
    if name in _TOP:
        return encoder + _TOP[name] if not name.startswith("classifier") else _TOP[name]
    if (m := _ENCODER_LAYER.match(name)) and (inner := _layer_key(m[2])):
        return f"{encoder}blocks.{m[1]}.{inner}"
    if (m := _DECODER_LAYER.match(name)) and (inner := _layer_key(m[2])):
        return f"decoder_blocks.{m[1]}.{inner}"
    if name.startswith("decoder.") and name.split(".")[1] in ("decoder_embed", "mask_token", "decoder_pos_embed",
                                                               "decoder_norm", "decoder_pred"):
        return name.removeprefix("decoder.")
    return None


def _layer_key(rest: str) -> str | None:
    if rest in _LAYER_SCALE:
        return _LAYER_SCALE[rest]
    for pattern, ours in _LAYER:
        if m := re.fullmatch(rf"(?:{pattern})\.(weight|bias)", rest):
            return f"attn.qkv.{m[1]}._{ours}" if ours in ("q", "k", "v") else f"{ours}.{m[1]}"
    return None


def _mlp_ratio(cfg: Mapping[str, Any], dim: int, source: str, prefix: str = "") -> float:
    if "mlp_ratio" in cfg and not prefix:
        return float(cfg["mlp_ratio"])  # DINOv2 sizes its MLP by the ratio (intermediate_size is unused)
    hidden = int(cfg[f"{prefix}intermediate_size"])
    ratio = hidden / dim
    if int(dim * ratio) != hidden:
        raise ValueError(f"{source}: {prefix}intermediate_size {hidden} is not int({dim} × a ratio), as vitkit "
                         f"sizes its Mlp")
    return ratio


def _decoder_args(cfg: Mapping[str, Any], encoder: Mapping[str, Any], source: str) -> dict[str, Any]:
    """ViTMAE's decoder as our ``MaskedAutoencoder`` arguments; it shares the encoder's MLP ratio and qkv bias."""
    dim = int(cfg["decoder_hidden_size"])
    ratio = _mlp_ratio(cfg, dim, source, prefix="decoder_")
    if ratio != encoder["mlp_ratio"]:
        raise ValueError(f"{source}: decoder_intermediate_size / decoder_hidden_size = {ratio:g} differs from the "
                         f"encoder's {encoder['mlp_ratio']:g}; vitkit's MaskedAutoencoder has one mlp_ratio")
    if not encoder["qkv_bias"]:
        raise ValueError(f"{source}: qkv_bias: false also removes the decoder's qkv bias in ViTMAE; vitkit's decoder "
                         f"always has one")
    return dict(decoder_embed_dim=dim, decoder_depth=int(cfg["decoder_num_hidden_layers"]),
                decoder_num_heads=int(cfg["decoder_num_attention_heads"]), norm_pix_loss=bool(cfg["norm_pix_loss"]))


def _num_classes(state: Mapping[str, torch.Tensor], dim: int, source: str) -> int:
    head = state.get("head.weight")
    if head is None:
        return 0
    if head.shape[1] != dim:
        raise ValueError(f"{source}: classifier.weight takes {head.shape[1]} inputs, not hidden_size {dim}: "
                         f"Dinov2ForImageClassification classifies [class token, mean of patch tokens] concatenated, "
                         f"a head vitkit's VisionTransformer does not have (global_pool token | avg | map); read the "
                         f"backbone from a Dinov2Model folder (save_pretrained of model.dinov2)")
    return int(head.shape[0])


def _class_names(config: Mapping[str, Any]) -> list[str] | None:
    id2label = config.get("id2label")
    if not isinstance(id2label, Mapping) or not id2label:
        return None
    return [str(id2label[k]) for k in sorted(id2label, key=int)]


def _pair(value: Any) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, int | float) else (int(value[0]), int(value[-1]))
