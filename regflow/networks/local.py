"""LocalNet (Hu et al. 2018, as in DeepReg): a dense field summed over decoder levels."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from regflow.errors import ConfigError
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

    Every extracted decoder level (and the bottom, level ``depth``) predicts a field with its own
    ~0-initialised head; the coarse field is upsampled and added to the next finer one, so coarse
    levels capture large, smooth motion and fine levels the detail. Decoder levels finer than the
    finest extracted one are not built: their features would feed no field, so a coarse-only
    LocalNet (e.g. ``extract_levels=[1, 2, 3]``) skips the full-resolution decoder and its field is
    upsampled linearly to the input size.

    Args:
        ndim: 2 or 3 spatial dimensions.
        in_channels: input channels (2: moving and fixed image).
        out_channels: output channels (``ndim`` for a DDF/DVF).
        channels: features per level; ``depth = len(channels)`` poolings, bottom at
            ``2 * channels[-1]`` features.
        norm: feature normalisation: "instance", "batch" or "none".
        extract_levels: the levels whose fields are summed (0 is full resolution, ``depth`` the
            bottom; DeepReg's ``extract_levels``); None: all of them.
        pooling: max pooling down (True) or strided convolutions (False, DeepReg's option).

    Raises:
        ConfigError: an extract level outside 0..depth.
    """

    def __init__(self, ndim: int, in_channels: int, out_channels: int,
                 channels: Sequence[int] = (16, 32, 64), norm: str = DEFAULT_NORM,
                 extract_levels: Sequence[int] | None = None, pooling: bool = True) -> None:
        super().__init__(ndim, in_channels, channels, residual=True, norm=norm, pooling=pooling)
        levels = range(self.depth + 1)
        self.extract_levels = sorted(set(levels if extract_levels is None else extract_levels))
        if not self.extract_levels or not set(self.extract_levels) <= set(levels):
            raise ConfigError(f"train.model.backbone.extract_levels: {list(extract_levels)} must "
                              f"be levels in 0..{self.depth} (the number of backbone channels)")
        self.finest = self.extract_levels[0]
        self.decoders = nn.ModuleList(
            ResidualBlock(ndim, width, norm) if level >= self.finest else nn.Identity()
            for level, width in enumerate(channels))
        for level in range(self.finest):
            self.ups[level] = nn.Identity()
        self.heads = nn.ModuleDict({str(level): field_head(ndim, self.widths[level], out_channels)
                                    for level in self.extract_levels})

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Predict a dense field.

        Args:
            image: (B, in_channels, *S), any spatial size S.

        Returns:
            (B, out_channels, *S): e.g. a DDF in voxels, ~0 at initialisation.
        """
        padded, shape = pad_to_multiple(image, 2**self.depth)
        skips, features = self.encoder(channels_last(padded))
        field = self._level_field(self.depth, features, None)
        for level in reversed(range(self.finest, self.depth)):
            features = self.decoders[level](self.ups[level](features) + skips[level])
            field = self._level_field(level, features, field)
        if field.shape[2:] != padded.shape[2:]:  # level 0 not extracted
            field = resize(field, padded.shape[2:])
        return crop_to(field, shape).contiguous()

    def _level_field(self, level: int, features: torch.Tensor, coarser: torch.Tensor | None
                     ) -> torch.Tensor | None:
        """The coarser levels' field at this level's size, plus this level's own if extracted."""
        if str(level) not in self.heads:
            return coarser
        # Fields have ndim channels: resampling them is ~2x faster in the standard memory order.
        field = self.heads[str(level)](features).contiguous()
        return field if coarser is None else resize(coarser, features.shape[2:]) + field
