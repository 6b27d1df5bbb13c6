"""LocalNet (Hu et al. 2018, as in DeepReg): a dense field summed over decoder levels."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from regflow.networks.layers import (
    DEFAULT_NORM,
    EncoderDecoder,
    ResidualBlock,
    channels_last,
    crop_to,
    field_head,
    pad_to_multiple,
    resize,
)


class LocalNet(EncoderDecoder):
    """Encoder of conv + residual levels, decoder with additive skips, multi-level field output.

    Every decoder level (and the bottom) predicts a field with its own ~0-initialised head; the
    coarse field is upsampled and added to the next finer one, so coarse levels capture large,
    smooth motion and fine levels the detail.

    Args:
        ndim: 2 or 3 spatial dimensions.
        in_channels: input channels (2: moving and fixed image).
        out_channels: output channels (``ndim`` for a DDF/DVF).
        channels: features per level; ``depth = len(channels)`` poolings, bottom at
            ``2 * channels[-1]`` features.
        norm: feature normalisation: "instance", "batch" or "none".
    """

    def __init__(self, ndim: int, in_channels: int, out_channels: int,
                 channels: Sequence[int] = (16, 32, 64), norm: str = DEFAULT_NORM) -> None:
        super().__init__(ndim, in_channels, channels, residual=True, norm=norm)
        self.decoders = nn.ModuleList(ResidualBlock(ndim, width, norm) for width in channels)
        self.heads = nn.ModuleList(field_head(ndim, width, out_channels) for width in self.widths)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Predict a dense field.

        Args:
            image: (B, in_channels, *S), any spatial size S.

        Returns:
            (B, out_channels, *S): e.g. a DDF in voxels, ~0 at initialisation.
        """
        padded, shape = pad_to_multiple(image, 2**self.depth)
        skips, features = self.encoder(channels_last(padded))
        field = self.heads[-1](features)
        for level in reversed(range(self.depth)):
            features = self.decoders[level](self.ups[level](features) + skips[level])
            field = resize(field, features.shape[2:]) + self.heads[level](features)
        return crop_to(field, shape).contiguous()
