"""UNet: classic encoder/decoder with concatenated skip connections and one output head."""

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
    """Two plain conv blocks per level; decoder levels concatenate the encoder skip.

    Takes LocalNet's arguments (:class:`regflow.networks.local.LocalNet`); ``out_channels`` may
    also be the label channels of method "conditional". One head, at full resolution.
    """

    def __init__(self, ndim: int, in_channels: int, out_channels: int,
                 channels: Sequence[int] = (16, 32, 64), norm: str = DEFAULT_NORM) -> None:
        super().__init__(ndim, in_channels, channels, residual=False, norm=norm)
        self.decoders = nn.ModuleList(
            level_block(ndim, 2 * width, width, residual=False, norm=norm) for width in channels)
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
            merged = torch.cat([self.ups[level](features), skips[level]], dim=1)
            features = self.decoders[level](merged)
        return crop_to(self.head(features), shape).contiguous()
