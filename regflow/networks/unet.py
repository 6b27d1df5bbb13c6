"""UNet: classic encoder/decoder with skip connections (concatenated or added) and one head."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from regflow.networks.layers import (
    DEFAULT_NORM,
    EncoderDecoder,
    channels_last,
    crop_to,
    field_head,
    level_block,
    pad_to_multiple,
)


class UNet(EncoderDecoder):
    """Two plain conv blocks per level; decoder levels concatenate the encoder skip to the
    up-sampled features (``concat_skip``, regflow's default) or add it (DeepReg's default).

    Takes LocalNet's arguments (:class:`regflow.networks.local.LocalNet`); ``out_channels`` may
    also be the label channels of method "conditional". One head, at full resolution.

    Args:
        pooling: max pooling down (True) or strided convolutions (False, DeepReg's option).
        concat_skip: concatenate the skip (the decoder block sees ``2 * width`` features) or add
            it (``width`` features).
    """

    def __init__(self, ndim: int, in_channels: int, out_channels: int,
                 channels: Sequence[int] = (16, 32, 64), norm: str = DEFAULT_NORM,
                 pooling: bool = True, concat_skip: bool = True) -> None:
        super().__init__(ndim, in_channels, channels, residual=False, norm=norm, pooling=pooling)
        self.concat_skip = concat_skip
        merged = 2 if concat_skip else 1
        self.decoders = nn.ModuleList(
            level_block(ndim, merged * width, width, residual=False, norm=norm)
            for width in channels)
        self.head = field_head(ndim, channels[0], out_channels)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Predict a dense output.

        Args:
            image: (B, in_channels, *S), any spatial size S.

        Returns:
            (B, out_channels, *S), ~0 at initialisation.
        """
        padded, shape = pad_to_multiple(image, 2**self.depth)
        skips, features = self.encoder(channels_last(padded))
        for level in reversed(range(self.depth)):
            up = self.ups[level](features)
            merged = torch.cat([up, skips[level]], dim=1) if self.concat_skip else up + skips[level]
            features = self.decoders[level](merged)
        return crop_to(self.head(features), shape).contiguous()
