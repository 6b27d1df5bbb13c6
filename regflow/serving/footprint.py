"""What registering a request allocates, estimated from file headers before anything is decoded.

The served model reserves this estimate from its worker's memory budget
(:mod:`regflow.serving.budget`) before it decodes a request, so that concurrent requests queue
instead of exhausting memory. The estimate follows the inference path
(:meth:`regflow.inference.Registrar.register_volumes`) phase by phase, per pair:

- held throughout: the decoded float32 volumes;
- then the largest of: inflating and decoding one volume (its stored bytes and a NaN check),
  resampling one image to the model's voxel size (:data:`FRAME_BYTES` per resampled voxel), the
  network and refinement on the model's grid (measured once per worker, :func:`peak_growth`),
  carrying the field onto the raw fixed grid and warping the moving image and label slab by slab,
  encoding the largest output;
- the encoded outputs, held with the JSON answer until it is sent (:data:`ANSWER_FACTOR` times
  their raw size).

A request holds the outputs of all its pairs and the largest transient of any one pair. The
byte factors come from the peak RSS growth of a worker registering pairs of 48x64x48 to 160^3
voxels, with and without labels, on this project's CPU machine: the estimate was 1.4 to 2.5
times the growth measured.
"""

from __future__ import annotations

import math
import os
import resource
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from regflow.serving.codec import EncodedPair, EncodedVolume

FLOAT = 4  # bytes of float32
FRAME_BYTES = 20  # per resampled voxel: resampling, normalising and cropping one image
RAW_BYTES = 24  # per raw fixed voxel and channel warped: sampling grid, output, mask, bests
SLAB_BYTES = 16 * 2**20  # one slab of the raw-grid work (regflow.inference.RAW_SLAB_VOXELS)
ENCODE_FACTOR = 3  # transient bytes per raw output byte while one output is encoded
ANSWER_FACTOR = 4  # per raw output byte: base64 texts, then MLflow's JSON answer of them
_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def _status_bytes(key: str) -> int:
    """A memory line of /proc/self/status (``VmRSS``, ``VmHWM``) in bytes."""
    for line in _STATUS.read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) * 1024
    raise OSError(f"{key} not in {_STATUS}")


def peak_growth(run: Callable[[], Any]) -> int:
    """How far this process's resident size rose above where it stood while ``run()`` ran.

    Linux: the kernel's high-water mark, reset first (``/proc/self/clear_refs``); elsewhere the
    growth of the process's peak since it started (``ru_maxrss``), a lower bound.

    Returns:
        Bytes (0 when the peak did not rise).
    """
    try:
        _CLEAR_REFS.write_text("5")
        before = _status_bytes("VmRSS")
        run()
        return max(0, _status_bytes("VmHWM") - before)
    except OSError:
        scale = 1 if os.uname().sysname == "Darwin" else 1024  # ru_maxrss: bytes on macOS
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
        run()
        return max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale - before)


@dataclass(frozen=True)
class PairPlan:
    """One pair of a request as the inference path will compute it.

    Attributes:
        pair: the pair as read from the request (headers checked).
        fixed_frame, moving_frame: the shapes the images are resampled to (voxels).
        refine_steps: the refinement steps it will run.
    """

    pair: EncodedPair
    fixed_frame: tuple[int, ...]
    moving_frame: tuple[int, ...]
    refine_steps: int

    def transient_bytes(self, model_bytes: int) -> int:
        """Bytes held while the pair is registered, beyond its encoded outputs.

        Args:
            model_bytes: what the network (and refinement, if this pair runs any) allocates on
                the model's grid.
        """
        fixed, moving, label = self.pair.fixed, self.pair.moving, self.pair.moving_label
        volumes = [volume for volume in (fixed, moving, label) if volume is not None]
        decoded = sum(FLOAT * _voxels(volume) for volume in volumes)
        n_fixed = math.prod(fixed.spatial_shape)
        decode = max(volume.header.nbytes + _voxels(volume) for volume in volumes)
        frame = FRAME_BYTES * max(math.prod(self.fixed_frame), math.prod(self.moving_frame))
        warped = 1 + (label.layout.channels if label is not None else 0)
        raw = RAW_BYTES * n_fixed * warped + SLAB_BYTES
        encode = ENCODE_FACTOR * FLOAT * n_fixed * len(fixed.spatial_shape)  # the DDF
        return decoded + max(decode, frame, model_bytes, raw, encode)

    def output_bytes(self) -> int:
        """Raw bytes of the outputs: the DDF, the warped image and label on the fixed grid."""
        fixed, label = self.pair.fixed, self.pair.moving_label
        channels = len(fixed.spatial_shape) + 1 + (label.layout.channels if label else 0)
        return FLOAT * channels * math.prod(fixed.spatial_shape)


def _voxels(volume: EncodedVolume) -> int:
    return math.prod(volume.spatial_shape) * volume.layout.channels


def request_bytes(plans: Sequence[PairPlan], model_bytes: Callable[[int], int]) -> int:
    """The memory a request needs: the largest transient of its pairs (registered one at a time)
    plus every pair's answer.

    Args:
        plans: the request's pairs.
        model_bytes: refinement steps -> bytes the network and refinement allocate.
    """
    transient = max(plan.transient_bytes(model_bytes(plan.refine_steps)) for plan in plans)
    return transient + ANSWER_FACTOR * sum(plan.output_bytes() for plan in plans)
