"""GlobalNet: encoder + global average pooling + linear head predicting an affine matrix."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from regflow.networks.layers import (
    DEFAULT_NORM,
    Encoder,
    channels_last,
    check_ndim,
    pad_to_multiple,
)


class GlobalNet(nn.Module):
    """Predict an affine transform ``theta`` (B, ndim, ndim + 1) from a moving/fixed pair.

    ``theta`` is in voxel coordinates about the volume centre (the convention of
    :func:`regflow.spatial.affine_to_ddf`): ``theta[:, :, :ndim]`` is the matrix and
    ``theta[:, :, -1]`` the translation in voxels. The linear head starts with zero weights and
    the identity as bias, so the untrained network returns exactly ``[I | 0]`` for any input.

    Args:
        ndim: 2 or 3 spatial dimensions.
        in_channels: input channels (2: moving and fixed image).
        channels: features per encoder level; ``depth = len(channels)``.
        norm: feature normalisation: "instance", "batch" or "none".
        pooling: max pooling down (True) or strided convolutions (False, DeepReg's option).
    """

    def __init__(self, ndim: int, in_channels: int,
                 channels: Sequence[int] = (16, 32, 64), norm: str = DEFAULT_NORM,
                 pooling: bool = True) -> None:
        super().__init__()
        self.ndim = check_ndim(ndim)
        self.depth = len(channels)
        self.encoder = Encoder(ndim, in_channels, channels, residual=True, norm=norm,
                               pooling=pooling)
        self.head = nn.Linear(2 * channels[-1], ndim * (ndim + 1))
        nn.init.zeros_(self.head.weight)
        with torch.no_grad():
            self.head.bias.copy_(torch.eye(ndim, ndim + 1).flatten())

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Predict the affine matrix.

        Args:
            image: (B, in_channels, *S), any spatial size S.

        Returns:
            theta: (B, ndim, ndim + 1), voxel units for the translation column.
        """
        padded, _ = pad_to_multiple(image, 2**self.depth)
        _, features = self.encoder(channels_last(padded))
        pooled = features.flatten(2).mean(dim=2)  # (B, 2 * channels[-1])
        return self.head(pooled).view(-1, self.ndim, self.ndim + 1)
