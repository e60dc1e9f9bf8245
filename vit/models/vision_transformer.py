"""VisionTransformer: patch embedding, prefix tokens, pre-norm blocks, and a token / avg / MAP head."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from timm.data import DEFAULT_CROP_PCT, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn
from torch.utils.checkpoint import checkpoint

from vit.layers import AttentionSpec, PatchEmbed, attention_schedule, resample_pos_embed, sincos_2d_pos_embed, to_2tuple
from vit.models.block import Block
from vit.models.heads import GLOBAL_POOLS, GlobalPool, MAPHead, pool_tokens

PosEmbed = Literal["learn", "sincos", "none"]


class VisionTransformer(nn.Module):
    """An encoder-only ViT whose parameter names and numerics match timm's ``VisionTransformer``.

    Args:
        img_size: input size, int or (h, w).
        patch_size: patch size, int or (h, w); must divide ``img_size``.
        in_chans: input channels.
        num_classes: classifier outputs; 0 gives a backbone (``forward`` returns pooled features).
        embed_dim: token width.
        depth: number of blocks.
        num_heads: attention heads; must divide ``embed_dim``.
        mlp_ratio: Mlp hidden width over ``embed_dim``.
        qkv_bias: bias on the qkv projections.
        qk_norm: normalise queries and keys.
        class_token: prepend a learned class token.
        reg_tokens: number of register tokens after the class token.
        no_embed_class: position embeddings cover the patches only (not the prefix tokens).
        pos_embed: "learn" (trainable), "sincos" (fixed 2-D sin-cos, as MAE) or "none".
        global_pool: "token" (class token), "avg" (mean of patch tokens) or "map" (attention pooling).
        fc_norm: norm after pooling instead of before; None follows timm (on for avg pooling).
        pool_include_prefix: avg and MAP pooling also see the prefix tokens (default: patch tokens only).
        init_values: LayerScale init; None disables LayerScale.
        drop_rate: dropout before the head. pos_drop_rate: dropout after adding positions.
        proj_drop_rate / attn_drop_rate: dropout inside blocks. drop_path_rate: max stochastic depth (linear).
        dynamic_img_size: accept any image size the patch divides, resampling positions on the fly.
        zero_head_init: initialise the classifier to zero (fine-tuning recipes).
        norm_eps: LayerNorm epsilon of every norm (timm, MAE, DINOv2: 1e-6; Hugging Face ViT / ViTMAE: 1e-12).
        grad_checkpointing: recompute each block's activations in the backward pass (activation checkpointing:
            less memory for large models, about a third more compute); ``set_grad_checkpointing`` switches it.
        attention: the attention pattern of every block, or a per-block schedule (``vit.layers.patterns``):
            "dense", "window:8", "window:8:shift", "neighborhood:7", "sliding:64", "strided:16", "kvpool:2",
            "window:14*3,dense" (every fourth block dense). No pattern adds parameters.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        class_token: bool = True,
        reg_tokens: int = 0,
        no_embed_class: bool = False,
        pos_embed: PosEmbed = "learn",
        global_pool: GlobalPool = "token",
        fc_norm: bool | None = None,
        pool_include_prefix: bool = False,
        init_values: float | None = None,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        dynamic_img_size: bool = False,
        zero_head_init: bool = False,
        norm_eps: float = 1e-6,
        grad_checkpointing: bool = False,
        attention: AttentionSpec = "dense",
    ) -> None:
        super().__init__()
        # the constructor arguments, so exports can rebuild the model from config.json alone
        self.model_args = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        _check_args(num_classes, embed_dim, depth, num_heads, global_pool, class_token, pos_embed, reg_tokens)
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.pool_include_prefix = pool_include_prefix
        self.embed_dim = self.num_features = embed_dim
        self.num_prefix_tokens = int(class_token) + reg_tokens
        self.no_embed_class = no_embed_class
        self.dynamic_img_size = dynamic_img_size
        self.pos_embed_type = pos_embed
        self.grad_checkpointing = grad_checkpointing

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, strict_img_size=not dynamic_img_size)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, reg_tokens, embed_dim)) if reg_tokens else None
        embed_len = num_patches if no_embed_class else num_patches + self.num_prefix_tokens
        if pos_embed == "none":
            self.pos_embed = None
        else:
            self.pos_embed = nn.Parameter(torch.zeros(1, embed_len, embed_dim), requires_grad=pos_embed == "learn")
        self.pos_drop = nn.Dropout(pos_drop_rate)

        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # stochastic depth grows with depth
        patterns = attention_schedule(attention, depth)
        self.blocks = nn.Sequential(
            *[
                Block(embed_dim, num_heads, mlp_ratio, qkv_bias, qk_norm, init_values, dpr[i], proj_drop_rate,
                      attn_drop_rate, norm_eps=norm_eps, pattern=patterns[i])
                for i in range(depth)
            ]
        )
        use_fc_norm = global_pool == "avg" if fc_norm is None else fc_norm
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps) if not use_fc_norm else nn.Identity()
        # the MAP head keeps timm's fixed choices (qkv bias on, no qk-norm) so weights stay interchangeable
        self.attn_pool = MAPHead(embed_dim, num_heads, mlp_ratio, norm_eps=norm_eps) if global_pool == "map" else None
        self.fc_norm = nn.LayerNorm(embed_dim, eps=norm_eps) if use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights(zero_head_init)
        self.feature_info = [dict(module=f"blocks.{i}", num_chs=embed_dim, reduction=max(self.patch_embed.patch_size))
                             for i in range(depth)]
        # timm's data config (timm.data.resolve_model_data_config): ImageNet's until a loader sets the weights' own
        self.pretrained_cfg: dict[str, Any] = {
            "input_size": (in_chans, *self.patch_embed.img_size), "fixed_input_size": not dynamic_img_size,
            "interpolation": "bicubic", "crop_pct": DEFAULT_CROP_PCT, "crop_mode": "center",
            "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD, "num_classes": num_classes,
            "first_conv": "patch_embed.proj", "classifier": "head",
        }

    @property
    def grid_size(self) -> tuple[int, int]:
        """The (h, w) patch grid at the built image size."""
        return self.patch_embed.grid_size

    def init_weights(self, zero_head_init: bool = False) -> None:
        """timm's ViT init: trunc-normal(0.02) positions and Linear weights, tiny prefix tokens, zero biases."""
        if self.pos_embed is not None:
            if self.pos_embed_type == "sincos":
                prefix = 0 if self.no_embed_class else self.num_prefix_tokens
                self.pos_embed.data.copy_(sincos_2d_pos_embed(self.embed_dim, self.grid_size, prefix))
            else:
                nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        if self.reg_token is not None:
            nn.init.normal_(self.reg_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if zero_head_init and isinstance(self.head, nn.Linear):
            nn.init.zeros_(self.head.weight)

    def reset_classifier(self, num_classes: int, global_pool: GlobalPool | None = None) -> None:
        """Replace the head with a freshly initialised one of ``num_classes`` outputs (0 = none)."""
        if global_pool is not None and global_pool != self.global_pool:
            if "map" in (global_pool, self.global_pool):
                raise ValueError("switching to or from global_pool='map' needs a new model (the MAP head has weights)")
            self.global_pool = global_pool
            self.model_args["global_pool"] = global_pool
        self.num_classes = num_classes
        self.model_args["num_classes"] = num_classes  # the record of what the model is now (exports rebuild it)
        self.pretrained_cfg["num_classes"] = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            nn.init.trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)

    def no_weight_decay(self) -> set[str]:
        """Parameter names that take no weight decay besides norms and biases (timm's convention)."""
        return {"pos_embed", "cls_token", "reg_token", "attn_pool.latent"}

    def group_matcher(self, coarse: bool = False) -> dict:
        """Regexes that assign parameters to layers (timm's convention; used for layer-wise lr decay)."""
        return {
            "stem": r"^cls_token|reg_token|pos_embed|patch_embed",
            "blocks": r"^blocks\.(\d+)" if coarse else [(r"^blocks\.(\d+)", None), (r"^norm", (99999,))],
        }

    @property
    def default_cfg(self) -> dict[str, Any]:
        """timm's older name for ``pretrained_cfg``."""
        return self.pretrained_cfg

    def get_classifier(self) -> nn.Module:
        """The classifier head (timm's API)."""
        return self.head

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Switch activation checkpointing of the blocks on or off (timm's API; recorded in ``model_args``)."""
        self.grad_checkpointing = enable
        self.model_args["grad_checkpointing"] = enable

    def set_input_size(
        self, img_size: int | tuple[int, int] | None = None, patch_size: int | tuple[int, int] | None = None
    ) -> None:
        """Rebuild for another input size in place (timm's API): positions resampled to the new patch grid.

        The patch size stays (a new one would resample the patch projection): another one is a ``ValueError``.
        """
        if patch_size is not None and to_2tuple(patch_size) != self.patch_embed.patch_size:
            raise ValueError(f"set_input_size: changing the patch size ({self.patch_embed.patch_size} -> "
                             f"{to_2tuple(patch_size)}) is not supported")
        if img_size is None:
            return
        old = self.patch_embed
        new = PatchEmbed(img_size, old.patch_size, old.in_chans, self.embed_dim, strict_img_size=old.strict_img_size)
        new.proj = old.proj
        self.patch_embed = new
        if self.pos_embed is not None and new.grid_size != old.grid_size:
            prefix = 0 if self.no_embed_class else self.num_prefix_tokens
            resampled = resample_pos_embed(self.pos_embed.detach(), new.grid_size, old.grid_size, prefix)
            self.pos_embed = nn.Parameter(resampled, requires_grad=self.pos_embed.requires_grad)
        self.model_args["img_size"] = new.img_size
        self.pretrained_cfg["input_size"] = (new.in_chans, *new.img_size)

    def prepare_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, C, H, W] → patch tokens with prefix tokens and positions [B, prefix + N, D]."""
        grid = self.patch_embed.grid_size_for(tuple(x.shape[-2:]))
        return self._pos_embed(self.patch_embed(x), grid)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, C, H, W] → normalised tokens [B, prefix + N, D]."""
        grid = self.patch_embed.grid_size_for(tuple(x.shape[-2:]))  # attention patterns work on the real grid
        x = self.prepare_tokens(x)
        if self.grad_checkpointing and torch.is_grad_enabled():
            for blk in self.blocks:
                x = checkpoint(blk, x, grid, use_reentrant=False)
        else:
            for blk in self.blocks:
                x = blk(x, grid)
        return self.norm(x)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens [B, prefix + N, D] → pooled features [B, D] by the configured ``global_pool``."""
        skip = 0 if self.pool_include_prefix else self.num_prefix_tokens
        if self.attn_pool is not None:
            return self.attn_pool(x[:, skip:])
        return pool_tokens(x, self.global_pool, skip)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens → logits [B, num_classes], or the pooled, normalised features [B, D] with ``pre_logits``."""
        x = self.head_drop(self.fc_norm(self.pool(x)))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, C, H, W] → logits [B, num_classes] (pooled features when num_classes is 0)."""
        return self.forward_head(self.forward_features(x))

    def get_intermediate_layers(
        self,
        x: torch.Tensor,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_prefix_tokens: bool = False,
        norm: bool = False,
    ) -> tuple[torch.Tensor, ...] | tuple[tuple[torch.Tensor, torch.Tensor], ...]:
        """Outputs of the last ``n`` blocks (or the blocks at indices ``n``) for dense heads in other projects.

        Each output is patch tokens [B, N, D], or a feature map [B, D, H/p, W/p] with ``reshape``; with
        ``return_prefix_tokens`` each item is a pair (patch output, prefix tokens [B, prefix, D]).
        """
        depth = len(self.blocks)
        indices = list(range(depth - n, depth)) if isinstance(n, int) else [i % depth for i in n]
        if not indices or any(i < 0 or i >= depth for i in indices):
            raise ValueError(f"cannot take layers {n} from a model of depth {depth}")
        grid = self.patch_embed.grid_size_for(tuple(x.shape[-2:]))
        x = self.prepare_tokens(x)
        outputs = []
        for i, blk in enumerate(self.blocks[: max(indices) + 1]):
            x = blk(x, grid)
            if i in indices:
                outputs.append(self.norm(x) if norm else x)
        prefix = [o[:, : self.num_prefix_tokens] for o in outputs]
        outputs = [o[:, self.num_prefix_tokens :] for o in outputs]
        if reshape:
            B, D = x.shape[0], x.shape[-1]
            outputs = [o.reshape(B, grid[0], grid[1], D).permute(0, 3, 1, 2).contiguous() for o in outputs]
        if return_prefix_tokens:
            return tuple(zip(outputs, prefix, strict=True))
        return tuple(outputs)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        output_dict: bool = False,
    ) -> list | tuple[torch.Tensor, list] | dict[str, Any]:
        """timm's API for dense-prediction necks: the outputs of the blocks at ``indices``, and the final tokens.

        ``indices``: the last n blocks (int), every block (None) or those listed (negative from the end). Each
        intermediate is [B, D, H/p, W/p] (``NCHW``) or patch tokens [B, N, D] (``NLC``), passed through the final
        norm with ``norm``, paired with its prefix tokens [B, prefix, D] with ``return_prefix_tokens``.
        ``stop_early`` skips the blocks after the last index. Returns ``(final tokens [B, prefix + N, D],
        intermediates)``, the intermediates alone, or timm's dict (``image_features``, ``image_intermediates``,
        ``image_intermediates_prefix``). Attention masks (timm's ``attn_mask``, ``is_causal``) are not taken.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take = _take_indices(len(self.blocks), indices)
        grid = self.patch_embed.grid_size_for(tuple(x.shape[-2:]))
        x = self.prepare_tokens(x)
        intermediates, recompute = [], self.grad_checkpointing and torch.is_grad_enabled()
        for i, blk in enumerate(self.blocks[: max(take) + 1] if stop_early else self.blocks):
            x = checkpoint(blk, x, grid, use_reentrant=False) if recompute else blk(x, grid)
            if i in take:
                intermediates.append(self.norm(x) if norm else x)
        P = self.num_prefix_tokens
        prefix = [y[:, :P] for y in intermediates] if P else None
        intermediates = [y[:, P:] for y in intermediates]
        if output_fmt == "NCHW":
            intermediates = [y.reshape(y.shape[0], *grid, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]
        if output_dict:
            out: dict[str, Any] = {"image_intermediates": intermediates}
            if prefix is not None and return_prefix_tokens:
                out["image_intermediates_prefix"] = prefix
            if not intermediates_only:
                out["image_features"] = self.norm(x)
            return out
        if prefix is not None and return_prefix_tokens:
            intermediates = list(zip(intermediates, prefix, strict=True))
        return intermediates if intermediates_only else (self.norm(x), intermediates)

    def _pos_embed(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        pos_embed = self.pos_embed
        if pos_embed is not None and grid != self.grid_size:
            prefix = 0 if self.no_embed_class else self.num_prefix_tokens
            pos_embed = resample_pos_embed(pos_embed, grid, self.grid_size, prefix)
        prefix_tokens = []
        if self.cls_token is not None:
            prefix_tokens.append(self.cls_token.expand(x.shape[0], -1, -1))
        if self.reg_token is not None:
            prefix_tokens.append(self.reg_token.expand(x.shape[0], -1, -1))
        if self.no_embed_class:
            if pos_embed is not None:
                x = x + pos_embed
            x = torch.cat([*prefix_tokens, x], dim=1)
        else:
            x = torch.cat([*prefix_tokens, x], dim=1)
            if pos_embed is not None:
                x = x + pos_embed
        return self.pos_drop(x)


def _take_indices(depth: int, indices: int | Sequence[int] | None) -> list[int]:
    """Block indices as timm's ``feature_take_indices`` reads them: None all, n the last n, else (negative) indices."""
    if indices is None:
        indices = depth
    if isinstance(indices, int):
        if not 0 < indices <= depth:
            raise ValueError(f"cannot take the last {indices} of {depth} blocks")
        return list(range(depth - indices, depth))
    take = [depth + i if i < 0 else i for i in indices]
    if not take or any(not 0 <= i < depth for i in take):
        raise ValueError(f"block indices {list(indices)} are out of range for a model of depth {depth}")
    return take


def _check_args(
    num_classes: int,
    embed_dim: int,
    depth: int,
    num_heads: int,
    global_pool: str,
    class_token: bool,
    pos_embed: str,
    reg_tokens: int,
) -> None:
    if num_classes < 0:
        raise ValueError(f"num_classes must be >= 0 (0 = no head), got {num_classes}")
    if depth <= 0:
        raise ValueError(f"depth must be positive, got {depth}")
    if num_heads <= 0 or embed_dim % num_heads:
        raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
    if global_pool not in GLOBAL_POOLS:
        raise ValueError(f"global_pool must be one of {GLOBAL_POOLS}, got {global_pool!r}")
    if global_pool == "token" and not class_token:
        raise ValueError("global_pool='token' needs class_token=True (use 'avg' or 'map' without one)")
    if pos_embed not in ("learn", "sincos", "none"):
        raise ValueError(f"pos_embed must be one of ('learn', 'sincos', 'none'), got {pos_embed!r}")
    if reg_tokens < 0:
        raise ValueError(f"reg_tokens must be >= 0, got {reg_tokens}")


__all__ = ["VisionTransformer"]
