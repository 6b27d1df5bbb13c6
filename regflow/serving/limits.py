"""Resource limits of the serving contract, checked before any volume is decoded.

Every limit holds for what the server will allocate, not only for what the client sent: a volume
is checked as stored (its header's shape) and as the inference path will resample it to the
model's voxel size, a label map by the number of values it will warp one by one, a request by
the memory it will need. Over a limit, a request is refused with
:class:`~regflow.errors.RequestTooLarge` (HTTP 413) naming the limit and its variable:

- ``REGFLOW_MAX_PAIRS``: registration pairs per request (default 8).
- ``REGFLOW_MAX_VOXELS``: spatial voxels per volume, stored and resampled (default 256^3).
- ``REGFLOW_MAX_CHANNELS``: channels per label, or distinct non-zero values of a label map
  (default 16).
- ``REGFLOW_MAX_REFINE_STEPS``: test-time refinement steps a request may ask for (default: the
  served model's own ``evaluate.refine.steps``).
- ``REGFLOW_MAX_MEMORY``: bytes a server worker may spend on requests at once (default 768 MiB;
  ``K``/``M``/``G`` suffixes are binary multiples): three quarters for the model's computation
  (:mod:`regflow.serving.model`), a quarter for request bodies being read and parsed
  (:mod:`regflow.serving.app`); requests beyond it wait their turn for up to
  ``REGFLOW_QUEUE_TIMEOUT`` seconds (default 30), then get 503 (:mod:`regflow.serving.budget`).

The server reads them when the model loads (:meth:`Limits.from_env`); library code passes a
:class:`Limits`. The smallest accepted size along an axis, ``REGFLOW_MIN_SIZE``, is a geometry
check rather than a resource limit (:mod:`regflow.geometry`).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

from regflow.errors import ConfigError, RequestTooLarge

DEFAULT_MAX_VOXELS = 256**3  # 16.7 M voxels: 64 MiB per float32 channel
DEFAULT_MAX_PAIRS = 8
DEFAULT_MAX_CHANNELS = 16  # one-hot label channels or label values
DEFAULT_MAX_MEMORY = 768 * 2**20
DEFAULT_QUEUE_TIMEOUT_S = 30.0
COMPUTE_SHARE = 0.75  # of REGFLOW_MAX_MEMORY for the model's computation, the rest for bodies

ENV_VARS = {"max_voxels": "REGFLOW_MAX_VOXELS", "max_pairs": "REGFLOW_MAX_PAIRS",
            "max_channels": "REGFLOW_MAX_CHANNELS", "max_memory": "REGFLOW_MAX_MEMORY",
            "queue_timeout_s": "REGFLOW_QUEUE_TIMEOUT",
            "max_refine_steps": "REGFLOW_MAX_REFINE_STEPS"}
_SIZE = re.compile(r"^(?P<number>\d+(?:\.\d+)?)\s*(?P<unit>[KMG]?)(?:i?B)?$", re.I)
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}


def parse_bytes(text: str) -> int:
    """``"768M"``, ``"1.5G"``, ``"1GiB"`` or a plain number of bytes -> bytes.

    Raises:
        ValueError: not a size.
    """
    match = _SIZE.match(text.strip())
    if match is None:
        raise ValueError(text)
    return int(float(match["number"]) * _UNITS[match["unit"].upper()])


@dataclass(frozen=True)
class Limits:
    """Per-request ceilings of the serving contract.

    Attributes:
        max_voxels: spatial voxels per volume (D * H * W), as stored and as resampled.
        max_pairs: registration pairs per request.
        max_channels: channels per label volume, or non-zero values of a label map.
        max_memory: bytes a server worker's requests may hold at once.
        queue_timeout_s: the longest a request waits for memory before a 503.
        max_refine_steps: refinement steps a request may ask for; None: the served model's own.
    """

    max_voxels: int = DEFAULT_MAX_VOXELS
    max_pairs: int = DEFAULT_MAX_PAIRS
    max_channels: int = DEFAULT_MAX_CHANNELS
    max_memory: int = DEFAULT_MAX_MEMORY
    queue_timeout_s: float = DEFAULT_QUEUE_TIMEOUT_S
    max_refine_steps: int | None = None

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if field.name == "max_refine_steps" and (value is None or (
                    isinstance(value, int) and not isinstance(value, bool) and value >= 0)):
                continue
            if field.name == "queue_timeout_s" and isinstance(value, int | float) and value > 0:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{field.name}: expected a positive integer, got {value!r}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Limits:
        """Limits from the ``REGFLOW_MAX_*`` and ``REGFLOW_QUEUE_TIMEOUT`` variables; defaults
        where unset.

        Raises:
            ConfigError: a variable that does not hold what it should (named).
        """
        readers = {"max_memory": parse_bytes, "queue_timeout_s": float}
        values = {}
        for name, variable in ENV_VARS.items():
            text = environ.get(variable, "").strip()
            if not text:
                continue
            try:
                values[name] = readers.get(name, int)(text)
                cls(**{name: values[name]})
            except (ValueError, ConfigError):
                expected = {"max_memory": "a size such as 768M or 2G",
                            "queue_timeout_s": "a positive number of seconds",
                            "max_refine_steps": "a non-negative integer"}
                raise ConfigError(f"{variable}={text[:40]!r}: expected "
                                  f"{expected.get(name, 'a positive integer')}") from None
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
        self._check_voxels(name, spatial_shape, "")
        self.check_channels(name, channels, "channels")

    def check_resampled(self, name: str, spatial_shape: Sequence[int],
                        spacing: Sequence[float]) -> None:
        """Raise RequestTooLarge when a volume resampled to the model's voxel size would hold
        more than ``max_voxels`` voxels.

        Args:
            name: the field.
            spatial_shape: the shape after resampling (voxels).
            spacing: the model's voxel size (mm), for the message.
        """
        size = " x ".join(f"{value:g}" for value in spacing)
        self._check_voxels(name, spatial_shape, f"resampled to the model's {size} mm voxels ")

    def check_channels(self, name: str, count: int, what: str) -> None:
        """Raise RequestTooLarge when a label has more than ``max_channels`` ``what``
        (``"channels"``, ``"distinct non-zero label values"``)."""
        if count > self.max_channels:
            raise RequestTooLarge(f"{name}: {count:,} {what}, over the limit of "
                                  f"{self.max_channels} per volume ({ENV_VARS['max_channels']})")

    def check_refine_steps(self, name: str, steps: int, model_steps: int) -> None:
        """Raise RequestTooLarge when a request asks for more refinement steps than allowed
        (``max_refine_steps``, or the served model's own ``model_steps`` when that is None)."""
        allowed = self.max_refine_steps if self.max_refine_steps is not None else model_steps
        if steps > allowed:
            raise RequestTooLarge(f"{name}: {steps} steps, over the limit of {allowed} "
                                  f"({ENV_VARS['max_refine_steps']})")

    def _check_voxels(self, name: str, spatial_shape: Sequence[int], how: str) -> None:
        shape = tuple(int(size) for size in spatial_shape)
        voxels = math.prod(shape)
        if voxels > self.max_voxels:
            raise RequestTooLarge(
                f"{name}: {how}shape {shape} is {voxels:,} voxels, over the limit of "
                f"{self.max_voxels:,} per volume ({ENV_VARS['max_voxels']})")


DEFAULT_LIMITS = Limits()
