"""ViT-C's convolutional stem as a timm patch embedding (``VisionTransformer(embed_layer=...)``).

B-cos v2 ("B-cos Alignment for Inherently Interpretable CNNs and Vision Transformers", §5) replaces the
ViT's patchify convolution by a stack of 3x3 stride-2 convolutions ("Early convolutions help
transformers see better", Xiao et al. 2021); its B-cos ViT-C models gain 7 points of ImageNet top-1
over the plain B-cos ViT at Tiny size (67.3 vs 60.0%). Here it is a plain timm module: the converter
turns its convolutions into B-cos ones like any other CNN layer, so the ViT-C is a conversion of
timm's own `VisionTransformer`, not a copy of model code.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

from timm.layers import ConvNormAct, PatchEmbed
from torch import nn

__all__ = ['ConvStemPatchEmbed']


class ConvStemPatchEmbed(PatchEmbed):
    """timm's `PatchEmbed` whose patchify convolution is ``log2(patch_size)`` 3x3 stride-2 conv + BN + ReLU
    layers (widths doubling up to ``embed_dim / 2``) and a 1x1 projection to ``embed_dim``: the same token
    grid, sizes and output formats as `PatchEmbed`, so `VisionTransformer` takes it as ``embed_layer``."""

    def __init__(self, img_size: Optional[Union[int, Tuple[int, int]]] = 224, patch_size: int = 16,
                 in_chans: int = 3, embed_dim: int = 768, bias: bool = True, **kwargs) -> None:
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                         bias=bias, **kwargs)
        if self.patch_size[0] != self.patch_size[1] or self.patch_size[0] < 2 or \
                2 ** round(math.log2(self.patch_size[0])) != self.patch_size[0]:
            raise ValueError(f'a conv stem downsamples by 2 per layer: patch_size must be a square power of 2 '
                             f'(2, 4, 8, 16, ...), got {self.patch_size}')
        depth = round(math.log2(self.patch_size[0]))
        widths = [embed_dim // 2 ** (depth - i) for i in range(depth)]
        layers, chans = [], in_chans
        for width in widths:
            layers.append(ConvNormAct(chans, width, kernel_size=3, stride=2, padding=1))
            chans = width
        layers.append(nn.Conv2d(chans, embed_dim, kernel_size=1, bias=bias))
        self.proj = nn.Sequential(*layers)
