"""Image to patch tokens with a strided convolution."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import to_2tuple
from torch import nn


class PatchEmbed(nn.Module):
    """Split an image into non-overlapping patches and project each to ``embed_dim``.

    Args:
        img_size: (h, w) or int; the image size the model is built for.
        patch_size: (ph, pw) or int; must divide the image size.
        in_chans: input channels.
        embed_dim: output token width.
        strict_img_size: require inputs of exactly ``img_size`` (else any size the patch divides).
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        bias: bool = True,
        strict_img_size: bool = True,
    ) -> None:
        super().__init__()
        self.img_size = to_2tuple(img_size)
        self.patch_size = to_2tuple(patch_size)
        self.in_chans = in_chans
        self.strict_img_size = strict_img_size
        self.grid_size = self.grid_size_for(self.img_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size, bias=bias)

    def grid_size_for(self, img_size: tuple[int, int]) -> tuple[int, int]:
        """The (h, w) patch grid of an image size; ValueError when the patch does not divide it."""
        (h, w), (ph, pw) = img_size, self.patch_size
        if h <= 0 or w <= 0 or h % ph or w % pw:
            raise ValueError(f"image size {h}x{w} is not divisible by patch size {ph}x{pw}")
        return (h // ph, w // pw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, C, H, W] → tokens [B, (H/ph)·(W/pw), D], row-major over the grid."""
        self.check_images(x)
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, D, gh, gw) -> (B, N, D)

    def forward_patches(self, patches: torch.Tensor) -> torch.Tensor:
        """Pixel patches already cut out [..., ph·pw·C], ordered (row, column, channel) → tokens [..., D].

        The convolution's projection as a matmul over the flattened patch, for callers that embed only some
        patches (MAE's visible ones); equal to ``forward`` up to fp32 summation order.
        """
        w = self.proj.weight  # (D, C, ph, pw), timm's layout
        return F.linear(patches, w.permute(0, 2, 3, 1).reshape(w.shape[0], -1), self.proj.bias)

    def check_images(self, x: torch.Tensor) -> None:
        """ValueError unless ``x`` is [B, in_chans, H, W] with a size this embedding accepts."""
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"expected images [B, {self.in_chans}, H, W], got shape {tuple(x.shape)}")
        H, W = x.shape[-2:]
        if self.strict_img_size and self.img_size != (H, W):
            raise ValueError(
                f"input image size {H}x{W} does not match the model's img_size "
                f"{self.img_size[0]}x{self.img_size[1]} (build the model with dynamic_img_size=True, "
                f"or load it for the new size to resample its position embeddings)"
            )
        self.grid_size_for((H, W))
