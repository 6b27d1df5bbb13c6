"""The geometry a registration can use: a finite, invertible voxel-to-world affine with non-zero
voxel sizes, on a volume of at least a few voxels along every axis.

Raw volumes reach regflow from files (``regflow predict``) and from requests (the served model);
both are checked here before anything is resampled, so that a bad header is a one-line error
naming the volume (exit 2 on the command line, HTTP 400 from the server) instead of a division by
zero deep in the resampler. The smallest size accepted along an axis is ``REGFLOW_MIN_SIZE``
(default 8 voxels): below it there is nothing a network's convolutions and poolings can align.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np

from regflow.errors import ConfigError, GeometryError

DEFAULT_MIN_SIZE = 8
MIN_SIZE_ENV = "REGFLOW_MIN_SIZE"
MIN_SINGULAR_VALUE = 1e-6  # of the voxel axes scaled to unit length: below, they are parallel


def min_size(environ: Mapping[str, str] = os.environ) -> int:
    """The smallest size along an axis, in voxels: ``REGFLOW_MIN_SIZE``, default 8.

    Raises:
        ConfigError: the variable is not a positive integer.
    """
    text = environ.get(MIN_SIZE_ENV, "").strip()
    if not text:
        return DEFAULT_MIN_SIZE
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ConfigError(f"{MIN_SIZE_ENV}={text[:40]!r}: expected a positive integer")
    return value


def check_geometry(name: str, spatial_shape: Sequence[int], affine: np.ndarray | None,
                   smallest: int = DEFAULT_MIN_SIZE) -> None:
    """Raise GeometryError unless a volume's grid and affine can be registered.

    Args:
        name: the volume, for the message (a path or a request field such as
            ``"inputs.fixed[0]"``).
        spatial_shape: the spatial size (D, H, W) (2-D: (H, W)), in voxels.
        affine: (4, 4) voxel-to-world matrix in mm; None for a volume without one (npy), which
            is then taken on a 1 mm grid.
        smallest: the smallest size accepted along every spatial axis.

    Raises:
        GeometryError: an axis shorter than ``smallest``; an affine that is not (4, 4), holds NaN
            or infinite values, has a zero voxel size (a zero column) or is singular (two voxel
            axes parallel); the message names the volume and the axis.
    """
    shape = tuple(int(size) for size in spatial_shape)
    short = [axis for axis, size in enumerate(shape) if size < smallest]
    if short:
        raise GeometryError(f"{name}: shape {shape} is below the minimum of {smallest} voxels "
                            f"along axis {short[0]} ({MIN_SIZE_ENV})")
    if affine is None:
        return
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise GeometryError(f"{name}: affine of shape {affine.shape}, expected (4, 4)")
    if not np.isfinite(affine).all():
        raise GeometryError(f"{name}: the affine holds NaN or infinite values")
    axes = affine[:3, :len(shape)]  # (3, ndim) voxel axes in mm
    spacing = np.linalg.norm(axes, axis=0)
    zero = [axis for axis, size in enumerate(spacing) if size == 0]
    if zero:
        raise GeometryError(f"{name}: zero voxel size along axis {zero[0]} (the affine's column "
                            f"{zero[0]} is zero)")
    if np.linalg.svd(axes / spacing, compute_uv=False).min() < MIN_SINGULAR_VALUE:
        raise GeometryError(f"{name}: singular affine: its voxel axes are parallel")
