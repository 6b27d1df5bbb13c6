"""Resource limits of the serving contract, checked from file headers before any volume is decoded.

A request is refused with :class:`~regflow.errors.RequestTooLarge` (HTTP 413) when it holds more
pairs than ``max_pairs``, or a volume with more spatial voxels than ``max_voxels`` or more channels
than ``max_channels``. The server reads them from ``REGFLOW_MAX_PAIRS``, ``REGFLOW_MAX_VOXELS`` and
``REGFLOW_MAX_CHANNELS`` (:meth:`Limits.from_env`); library code passes a :class:`Limits`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

from regflow.errors import ConfigError, RequestTooLarge

DEFAULT_MAX_VOXELS = 256**3  # 16.7 M voxels: 64 MiB per float32 channel
DEFAULT_MAX_PAIRS = 8
DEFAULT_MAX_CHANNELS = 16  # one-hot label channels

ENV_VARS = {"max_voxels": "REGFLOW_MAX_VOXELS", "max_pairs": "REGFLOW_MAX_PAIRS",
            "max_channels": "REGFLOW_MAX_CHANNELS"}


@dataclass(frozen=True)
class Limits:
    """Per-request ceilings of the serving contract.

    Attributes:
        max_voxels: spatial voxels per volume (D * H * W).
        max_pairs: registration pairs per request.
        max_channels: channels per volume (label classes of a one-hot label).
    """

    max_voxels: int = DEFAULT_MAX_VOXELS
    max_pairs: int = DEFAULT_MAX_PAIRS
    max_channels: int = DEFAULT_MAX_CHANNELS

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{field.name}: expected a positive integer, got {value!r}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Limits:
        """Limits from ``REGFLOW_MAX_VOXELS`` / ``_PAIRS`` / ``_CHANNELS``; defaults where unset.

        Raises:
            ConfigError: a variable that is not a positive integer (named).
        """
        values = {}
        for name, variable in ENV_VARS.items():
            text = environ.get(variable, "").strip()
            if not text:
                continue
            try:
                values[name] = int(text)
                if values[name] < 1:
                    raise ValueError(text)
            except ValueError:
                raise ConfigError(f"{variable}={text[:40]!r}: expected a positive integer"
                                  ) from None
        return cls(**values)

    def check_pairs(self, count: int) -> None:
        """Raise RequestTooLarge when a request holds more than ``max_pairs`` pairs."""
        if count > self.max_pairs:
            raise RequestTooLarge(f"inputs: {count} pairs, over the limit of {self.max_pairs} per "
                                  f"request ({ENV_VARS['max_pairs']}); send several requests")

    def check_volume(self, name: str, spatial_shape: Sequence[int], channels: int) -> None:
        """Raise RequestTooLarge when a volume's header declares too many voxels or channels.

        Args:
            name: the field, e.g. ``"inputs.moving[0]"``.
            spatial_shape: (D, H, W) as the header declares it.
            channels: channels as the header declares them (1 for an image).
        """
        voxels = math.prod(int(size) for size in spatial_shape)
        if voxels > self.max_voxels:
            raise RequestTooLarge(
                f"{name}: shape {tuple(int(size) for size in spatial_shape)} is {voxels:,} "
                f"voxels, over the limit of {self.max_voxels:,} per volume "
                f"({ENV_VARS['max_voxels']})")
        if channels > self.max_channels:
            raise RequestTooLarge(f"{name}: {channels} channels, over the limit of "
                                  f"{self.max_channels} per volume ({ENV_VARS['max_channels']})")


DEFAULT_LIMITS = Limits()
