"""Masked autoencoder (He et al., 2021): encode the visible patches only, reconstruct pixels with a light decoder."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vit.layers import AttentionSpec, attention_schedule, sincos_2d_pos_embed, to_2tuple
from vit.models.block import Block
from vit.models.vision_transformer import VisionTransformer


class MaskedAutoencoder(nn.Module):
    """A ``VisionTransformer`` encoder that sees only unmasked patches, plus a narrow decoder predicting pixels.

    Args:
        img_size / patch_size / in_chans / embed_dim / depth / num_heads / mlp_ratio: the encoder, as in
            ``VisionTransformer`` (fixed sin-cos positions, class token, no head).
        decoder_embed_dim / decoder_depth / decoder_num_heads: the decoder (the paper: 512, 8, 16).
        norm_pix_loss: regress per-patch normalised pixels (mean 0, var 1 in each patch), as the paper's best.
        qkv_bias / qk_norm / reg_tokens: passed to the encoder blocks.
        norm_eps: LayerNorm epsilon of encoder and decoder (MAE: 1e-6; Hugging Face ViTMAE: 1e-12).
        attention: the encoder's attention pattern (``vit.layers.patterns``). The encoder sees a random subset
            of the patches, on which spatial windows are not defined: a pattern other than dense runs only at
            mask ratio 0 and is refused otherwise. Pretrain dense and fine-tune the encoder with a pattern: the
            weights are the same.
        decoder_attention: the decoder's pattern or schedule; the decoder sees the full grid, so any pattern.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 16,
        in_chans: int = 3,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        norm_pix_loss: bool = False,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        reg_tokens: int = 0,
        norm_eps: float = 1e-6,
        attention: AttentionSpec = "dense",
        decoder_attention: AttentionSpec = "dense",
    ) -> None:
        super().__init__()
        self.model_args = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        if decoder_num_heads <= 0 or decoder_embed_dim % decoder_num_heads:
            raise ValueError(
                f"decoder_embed_dim {decoder_embed_dim} is not divisible by decoder_num_heads {decoder_num_heads}"
            )
        self.encoder = VisionTransformer(
            img_size, patch_size, in_chans, num_classes=0, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
            mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_norm=qk_norm, reg_tokens=reg_tokens, pos_embed="sincos",
            global_pool="token", norm_eps=norm_eps, attention=attention,
        )
        self.in_chans = in_chans
        self.patch_size = to_2tuple(patch_size)
        self.norm_pix_loss = norm_pix_loss
        num_prefix, num_patches = self.encoder.num_prefix_tokens, self.encoder.patch_embed.num_patches

        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(
            torch.zeros(1, num_prefix + num_patches, decoder_embed_dim), requires_grad=False
        )
        self.decoder_blocks = nn.ModuleList(
            [Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_eps=norm_eps, pattern=p)
             for p in attention_schedule(decoder_attention, decoder_depth)]
        )
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=norm_eps)
        self.decoder_pred = nn.Linear(decoder_embed_dim, self.patch_size[0] * self.patch_size[1] * in_chans)
        self.init_weights()

    @property
    def grid_size(self) -> tuple[int, int]:
        """The (h, w) patch grid."""
        return self.encoder.grid_size

    def init_weights(self) -> None:
        """The MAE reference init: sin-cos positions, xavier-uniform linears and patch projection, N(0, .02) tokens."""
        enc = self.encoder
        enc.pos_embed.data.copy_(sincos_2d_pos_embed(enc.embed_dim, self.grid_size, enc.num_prefix_tokens))
        self.decoder_pos_embed.data.copy_(
            sincos_2d_pos_embed(self.decoder_pos_embed.shape[-1], self.grid_size, enc.num_prefix_tokens)
        )
        w = enc.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # as a Linear over the flattened patch
        for token in (enc.cls_token, enc.reg_token, self.mask_token):
            if token is not None:
                nn.init.normal_(token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set[str]:
        """Names that take no weight decay besides norms and biases."""
        return {f"encoder.{n}" for n in self.encoder.no_weight_decay()} | {"mask_token", "decoder_pos_embed"}

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """Images [B, C, H, W] → patches [B, L, ph·pw·C], pixels ordered (row, column, channel) as MAE."""
        B, C, H, W = imgs.shape
        (ph, pw), (gh, gw) = self.patch_size, self.encoder.patch_embed.grid_size_for((H, W))
        # channels last first: on a CPU two copies that move runs of pixels beat one 6-D permute with C innermost
        x = imgs.permute(0, 2, 3, 1).contiguous().view(B, gh, ph, gw, pw, C)
        return x.transpose(2, 3).reshape(B, gh * gw, ph * pw * C)

    def unpatchify(self, x: torch.Tensor, grid_size: tuple[int, int] | None = None) -> torch.Tensor:
        """Patches [B, L, ph·pw·C] → images [B, C, H, W] (the inverse of ``patchify``)."""
        (ph, pw), (gh, gw) = self.patch_size, grid_size or self.grid_size
        B, C = x.shape[0], self.in_chans
        x = x.reshape(B, gh, gw, ph, pw, C)
        x = torch.einsum("bhwpqc->bchpwq", x)
        return x.reshape(B, C, gh * ph, gw * pw)

    def random_masking(
        self, x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keep the ``int(L·(1 − mask_ratio))`` patches of lowest noise per sample.

        Args:
            x: patch tokens [B, L, D]. noise: [B, L] in any range (uniform by default).
        Returns:
            kept tokens [B, L_keep, D]; mask [B, L] with 0 for kept and 1 for removed; ids_restore [B, L]
            such that gathering the shuffled sequence with it restores the original patch order.
        """
        B, L, D = x.shape
        ids_keep, mask, ids_restore = self._keep_ids(B, L, mask_ratio, noise, x)
        x_kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, D))
        return x_kept, mask, ids_restore

    def forward_encoder(
        self, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None,
        patches: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mask, embed and encode the visible patches: → latent [B, prefix + L_keep, D], mask, ids_restore.

        Only the kept patches are embedded: their pixels are gathered and projected with the patch embedding's
        own weights (``PatchEmbed.forward_patches``), a matmul over L_keep patches instead of the convolution
        over all L; the same tokens as embedding all and keeping some, up to fp32 summation order.
        ``patches``: ``patchify(imgs)`` when the caller has it already.
        """
        enc = self.encoder
        P = enc.num_prefix_tokens
        enc.patch_embed.check_images(imgs)
        grid = self._encoder_grid(imgs, mask_ratio)
        if grid is not None:  # a patterned encoder at mask ratio 0: keep the patches in raster order
            noise = torch.arange(enc.patch_embed.num_patches, device=imgs.device).float().expand(imgs.shape[0], -1)
        patches = self.patchify(imgs) if patches is None else patches  # (B, L, ph·pw·C)
        B, L, K = patches.shape
        ids_keep, mask, ids_restore = self._keep_ids(B, L, mask_ratio, noise, patches)
        kept = torch.gather(patches, 1, ids_keep.unsqueeze(-1).expand(-1, -1, K))  # (B, L_keep, ph·pw·C)
        x = enc.patch_embed.forward_patches(kept) + enc.pos_embed[0, P:][ids_keep]
        prefix = []
        if enc.cls_token is not None:
            prefix.append(enc.cls_token)
        if enc.reg_token is not None:
            prefix.append(enc.reg_token)
        if prefix:
            prefix_tokens = torch.cat(prefix, dim=1) + enc.pos_embed[:, :P]
            x = torch.cat([prefix_tokens.expand(x.shape[0], -1, -1), x], dim=1)
        for blk in enc.blocks:
            x = blk(x, grid)
        return enc.norm(x), mask, ids_restore

    def forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Latent [B, prefix + L_keep, D] → pixel predictions for every patch [B, L, ph·pw·C]."""
        P = self.encoder.num_prefix_tokens
        x = self.decoder_embed(x)
        B, L = ids_restore.shape
        mask_tokens = self.mask_token.expand(B, L + P - x.shape[1], -1)
        x = torch.cat([x, mask_tokens], dim=1)  # (B, P + L, Dd): prefix, then patches in shuffled order
        # one gather unshuffles the patches and keeps the prefix in place
        ids = torch.cat([torch.arange(P, device=x.device).expand(B, P), ids_restore + P], dim=1)
        x = torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1])) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x, self.grid_size)
        return self.decoder_pred(self.decoder_norm(x)[:, P:])  # the prefix tokens predict no pixels

    def forward_loss(
        self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, patches: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Mean squared error over the masked patches only (over all patches when none is masked).

        ``patches``: ``patchify(imgs)`` when the caller has it already.
        """
        target = self.patchify(imgs) if patches is None else patches
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        loss = F.mse_loss(pred, target, reduction="none").mean(dim=-1)  # (B, L) per-patch loss, one kernel
        n_masked = mask.sum()
        return torch.where(n_masked > 0, (loss * mask).sum() / n_masked.clamp_min(1), loss.mean())

    def forward(
        self, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Images [B, C, H, W] → (loss, pred [B, L, ph·pw·C], mask [B, L] with 1 = masked)."""
        self.encoder.patch_embed.check_images(imgs)
        patches = self.patchify(imgs)  # once: the kept ones are embedded, all are the target
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise, patches)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask, patches), pred, mask

    def _encoder_grid(self, imgs: torch.Tensor, mask_ratio: float) -> tuple[int, int] | None:
        """The patch grid a patterned encoder needs (None for a dense one); ValueError when patches are masked."""
        patterns = [blk.attn.pattern for blk in self.encoder.blocks]
        if all(p.is_dense for p in patterns):
            return None
        if mask_ratio > 0:
            spelled = self.model_args["attention"]
            raise ValueError(f"MaskedAutoencoder: attention={spelled!r} cannot run in the encoder at "
                             f"mask_ratio={mask_ratio:g}: the encoder sees a random subset of the patches, on which "
                             "the pattern's windows are not defined. Pretrain with attention='dense' (the weights "
                             "are the same) and fine-tune with the pattern, or use decoder_attention for the decoder")
        return self.encoder.patch_embed.grid_size_for(tuple(imgs.shape[-2:]))

    def reconstruct(self, imgs: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """Predicted patches → images [B, C, H, W] in the input's pixel space.

        With ``norm_pix_loss`` the prediction is in per-patch normalised units; each patch is de-normalised
        with the mean and variance of the same patch in ``imgs``, without which reconstructions look like noise.
        """
        if self.norm_pix_loss:
            target = self.patchify(imgs)
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            pred = pred * (var + 1e-6) ** 0.5 + mean
        return self.unpatchify(pred, self.encoder.patch_embed.grid_size_for(tuple(imgs.shape[-2:])))

    def _keep_ids(
        self, B: int, L: int, mask_ratio: float, noise: torch.Tensor | None, like: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ids_keep [B, L_keep] (lowest noise first), mask [B, L] (1 = removed, ``like``'s dtype), ids_restore."""
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        len_keep = int(L * (1 - mask_ratio))
        if noise is None:
            noise = torch.rand(B, L, device=like.device)
        elif noise.shape != (B, L):
            raise ValueError(f"noise must have shape [B, L] = [{B}, {L}], got {tuple(noise.shape)}")
        ids_shuffle = torch.argsort(noise, dim=1)  # ascending: small noise is kept
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        mask = torch.ones(B, L, device=like.device, dtype=like.dtype)
        mask[:, :len_keep] = 0
        return ids_shuffle[:, :len_keep], torch.gather(mask, 1, ids_restore), ids_restore
