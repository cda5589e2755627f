"""A small 2D/3D U-Net, and :class:`UNetModel`, the base of the large-patch models built on one
(``dae-unet``, ``synthetic-anomaly``).

Each level has two 3x3 convolutions (batch norm, leaky ReLU); max pooling halves the
resolution on the way down, transposed convolutions double it on the way up, and the
features of the same level are concatenated (skip connections). Not a registered model:
a building block.
"""

from __future__ import annotations

import torch
from torch import nn

from uadct.errors import UadctError
from uadct.models.base import CorruptionModel, ModelConfig
from uadct.models.layers import conv_layer, deconv_layer, norm_layer


class DoubleConv(nn.Sequential):
    """Two (3x3 conv, batch norm, leaky ReLU) blocks."""

    def __init__(self, dims: int, c_in: int, c_out: int) -> None:
        conv, norm = conv_layer(dims), norm_layer(dims)
        super().__init__(conv(c_in, c_out, 3, 1, 1), norm(c_out), nn.LeakyReLU(0.2),
                         conv(c_out, c_out, 3, 1, 1), norm(c_out), nn.LeakyReLU(0.2))


def check_unet_patch(model_name: str, patch_size: int, levels: int) -> None:
    """One-line error unless ``patch_size`` is divisible by ``2**levels`` (and levels >= 1)."""
    if levels < 1:
        raise UadctError(f"{model_name}: levels must be at least 1, got {levels}")
    if patch_size % 2**levels:
        raise UadctError(f"{model_name}: patch size {patch_size} must be divisible by 2**levels = {2**levels}")


class UNet(nn.Module):
    """``(B, in_channels, *patch) -> (B, out_channels, *patch)``; ``base_channels`` doubled per level."""

    def __init__(self, dims: int, in_channels: int, out_channels: int, base_channels: int, levels: int) -> None:
        super().__init__()
        channels = [base_channels * 2**i for i in range(levels + 1)]
        self.encoders = nn.ModuleList([DoubleConv(dims, in_channels, channels[0])])
        self.encoders.extend(DoubleConv(dims, c_in, c_out) for c_in, c_out in zip(channels[:-1], channels[1:]))
        self.pool = nn.MaxPool2d(2) if dims == 2 else nn.MaxPool3d(2)
        self.ups = nn.ModuleList(deconv_layer(dims)(c_out, c_in, 2, 2) for c_in, c_out in zip(channels[:-1], channels[1:]))
        self.decoders = nn.ModuleList(DoubleConv(dims, 2 * c_in, c_in) for c_in in channels[:-1])
        self.head = conv_layer(dims)(channels[0], out_channels, 1)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The encoder's features at every level, finest first; the last is the bottleneck
        ``(B, base_channels * 2**levels, *patch / 2**levels)``."""
        levels = []
        for index, encoder in enumerate(self.encoders):
            x = encoder(x if index == 0 else self.pool(x))
            levels.append(x)
        return levels

    def bottleneck_features(self, x: torch.Tensor) -> torch.Tensor:
        """The bottleneck averaged over space: one feature vector per patch ``(B, base_channels * 2**levels)``."""
        return self.encode(x)[-1].flatten(2).mean(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = self.encode(x)
        x = skips.pop()
        for up, decoder in zip(reversed(self.ups), reversed(self.decoders)):
            x = decoder(torch.cat([up(x), skips.pop()], dim=1))
        return self.head(x)


class UNetModel(CorruptionModel):
    """A model whose network is one :class:`UNet` ``self.unet`` (``config``: ``base_channels``, ``levels``):
    the patch-size check, the network, and its features for the forest scorer."""

    def __init__(self, config: ModelConfig, out_channels: int) -> None:
        super().__init__(config)
        base_channels, levels = getattr(config, "base_channels"), getattr(config, "levels")
        check_unet_patch(self.name, config.patch_size, levels)
        self.unet = UNet(config.dims, config.in_channels, out_channels, base_channels, levels)

    def encode_features(self, patches: torch.Tensor) -> torch.Tensor:
        """The U-Net's bottleneck averaged over space ``(B, base_channels * 2**levels)`` (forest scorer features)."""
        return self.unet.bottleneck_features(patches)
