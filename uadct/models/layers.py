"""Layer factories shared by the models: the 2D or 3D variant of a layer type."""

from __future__ import annotations

from torch import nn

POSITION_FEATURES = 3  # a patch centre (z, y, x) in normalised atlas coordinates, appended to latent codes


def conv_layer(dims: int) -> type[nn.Module]:
    """``nn.Conv2d`` for 2D patches, ``nn.Conv3d`` for 3D ones."""
    return nn.Conv2d if dims == 2 else nn.Conv3d


def deconv_layer(dims: int) -> type[nn.Module]:
    """Transposed convolution for 2D or 3D patches."""
    return nn.ConvTranspose2d if dims == 2 else nn.ConvTranspose3d


def norm_layer(dims: int) -> type[nn.Module]:
    """Batch norm for 2D or 3D patches."""
    return nn.BatchNorm2d if dims == 2 else nn.BatchNorm3d


def dropout_layer(dims: int) -> type[nn.Module]:
    """Channel dropout for 2D or 3D patches."""
    return nn.Dropout2d if dims == 2 else nn.Dropout3d
