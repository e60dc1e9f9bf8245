"""The MAE built the way its authors build it (timm ``Block``s, their masking code): what ours is compared against."""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from vit.export.interop import vit_to_mae_official
from vit.models import MaskedAutoencoder


class ReferenceMAE(nn.Module):
    """MAE from timm ``Block``s on the visible tokens, with the official masking and loss.

    Parameter names are the official checkpoint's, so ``vit_to_mae_official(ours.state_dict())`` loads into it
    and both compute the same loss for the same noise.

    Args:
        img_size / patch_size / in_chans: square images cut into square patches of ``in_chans`` channels.
        embed_dim / depth / num_heads: the encoder. decoder_*: the decoder. mlp_ratio: both.
        norm_pix_loss: regress per-patch normalised pixels.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        norm_pix_loss: bool = False,
    ) -> None:
        super().__init__()
        from timm.layers import PatchEmbed
        from timm.models.vision_transformer import Block

        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        L = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, L + 1, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList(
            [Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer) for _ in range(depth)]
        )
        self.norm = norm_layer(embed_dim)
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, L + 1, decoder_embed_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            [
                Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
                for _ in range(decoder_depth)
            ]
        )
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * in_chans)
        self.patch_size, self.in_chans, self.norm_pix_loss = patch_size, in_chans, norm_pix_loss

    @classmethod
    def like(cls, mae: MaskedAutoencoder) -> ReferenceMAE:
        """A reference with the configuration and the weights of our ``mae``."""
        a = mae.model_args
        if a.get("reg_tokens") or a.get("qk_norm") or not a.get("qkv_bias", True):
            raise ValueError("the reference MAE has a class token only, qkv bias and no qk-norm")
        ph, pw = (a["patch_size"],) * 2 if isinstance(a["patch_size"], int) else a["patch_size"]
        if ph != pw:
            raise ValueError(f"the reference MAE needs square patches, got {ph}x{pw}")
        keys = ("img_size", "in_chans", "embed_dim", "depth", "num_heads", "decoder_embed_dim", "decoder_depth",
                "decoder_num_heads", "mlp_ratio", "norm_pix_loss")
        ref = cls(patch_size=ph, **{k: a[k] for k in keys})
        ref.load_state_dict(vit_to_mae_official(mae.state_dict()))
        return ref

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] → [B, L, p·p·C]."""
        p, c = self.patch_size, self.in_chans
        h, w = imgs.shape[2] // p, imgs.shape[3] // p
        x = imgs.reshape(imgs.shape[0], c, h, p, w, p)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(imgs.shape[0], h * w, p * p * c)

    def random_masking(
        self, x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keep the lowest-noise patches of [B, L, D]; mask [B, L] is 0 for kept, 1 for removed."""
        B, L, D = x.shape
        keep = int(L * (1 - mask_ratio))
        if noise is None:
            noise = torch.rand(B, L, device=x.device)
        shuffle = torch.argsort(noise, dim=1)
        restore = torch.argsort(shuffle, dim=1)
        kept = torch.gather(x, 1, shuffle[:, :keep].unsqueeze(-1).repeat(1, 1, D))
        mask = torch.ones(B, L, device=x.device)
        mask[:, :keep] = 0
        return kept, torch.gather(mask, 1, restore), restore

    def forward_encoder(
        self, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Visible tokens through the encoder: [B, 1 + L_keep, D], mask, ids_restore."""
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:]
        x, mask, restore = self.random_masking(x, mask_ratio, noise)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), mask, restore

    def forward_decoder(self, x: torch.Tensor, restore: torch.Tensor) -> torch.Tensor:
        """[B, 1 + L_keep, D] → per-patch pixels [B, L, p·p·C]."""
        x = self.decoder_embed(x)
        masked = self.mask_token.repeat(x.shape[0], restore.shape[1] + 1 - x.shape[1], 1)
        patches = torch.cat([x[:, 1:], masked], dim=1)
        patches = torch.gather(patches, 1, restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
        x = torch.cat([x[:, :1], patches], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def forward(
        self, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """→ (loss over masked patches, or over all when none is masked; pred; mask)."""
        latent, mask, restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, restore)
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
        loss = ((pred - target) ** 2).mean(dim=-1)
        loss = (loss * mask).sum() / mask.sum() if mask_ratio > 0 else loss.mean()
        return loss, pred, mask
