"""Metrics for one registered pair: overlap, surface distance, label centroids, regularity.

Every function accepts numpy arrays or torch tensors (moved to the CPU) and returns Python floats
or numpy arrays. Fields follow the package convention: a DDF is in voxels, shape (ndim, *S) or
(1, ndim, *S), channel i along array axis i, ``warped[x] = moving[x + ddf[x]]``. Distances in mm
use the voxel ``spacing`` (mm per voxel along each array axis).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from regflow.arrays import to_numpy
from regflow.spatial import jacobian_determinant

ArrayLike = Any  # numpy array, torch tensor or nested sequence


def _masks(label: ArrayLike, labels: Sequence[int] | None) -> np.ndarray:
    """(L, *S) boolean masks: channels > 0.5, or one channel per integer value in ``labels``."""
    array = to_numpy(label)
    if labels is None:
        return array > 0.5
    return np.stack([array == value for value in labels])


def _unbatched_ddf(ddf: ArrayLike) -> np.ndarray:
    """Accept (ndim, *S) or (1, ndim, *S); return (ndim, *S) float64."""
    array = to_numpy(ddf).astype(np.float64, copy=False)
    if array.ndim >= 3 and array.shape[0] == 1 and array.shape[1] == array.ndim - 2:
        array = array[0]
    if array.shape[0] != array.ndim - 1 or array.shape[0] not in (2, 3):
        raise ValueError(f"expected a ddf of shape (ndim, *S) or (1, ndim, *S) with ndim 2 or 3, "
                         f"got {array.shape}")
    return array


def _spacing(spacing: float | Sequence[float], ndim: int) -> np.ndarray:
    values = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (ndim,))
    return values.copy()


def dice(fixed_label: ArrayLike, warped_label: ArrayLike, labels: Sequence[int] | None = None
         ) -> np.ndarray:
    """Dice overlap per label, ``2 |F & W| / (|F| + |W|)``.

    Args:
        fixed_label: (L, *S) binary channels (a voxel is foreground when > 0.5, so linearly warped
            labels are thresholded at 0.5), or with ``labels`` an integer map (*S).
        warped_label: same layout as ``fixed_label``.
        labels: foreground values of integer maps, one output per value; None for channels.

    Returns:
        (L,) float64 Dice per label. A label absent from both is 1.0 (nothing to find, nothing
        found); absent from exactly one it is 0.0.
    """
    fixed, warped = _masks(fixed_label, labels), _masks(warped_label, labels)
    if fixed.shape != warped.shape:
        raise ValueError(f"label shapes differ: {fixed.shape} vs {warped.shape}")
    axes = tuple(range(1, fixed.ndim))
    overlap = np.logical_and(fixed, warped).sum(axis=axes)
    total = fixed.sum(axis=axes) + warped.sum(axis=axes)
    return np.where(total == 0, 1.0, 2.0 * overlap / np.maximum(total, 1))


def _surface(mask: np.ndarray) -> np.ndarray:
    """Foreground voxels with a face-neighbour in the background (the volume edge counts)."""
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def hd95(mask_a: ArrayLike, mask_b: ArrayLike, spacing: float | Sequence[float] = 1.0) -> float:
    """95th-percentile symmetric Hausdorff distance between two masks' surfaces, in mm.

    For each surface voxel of one mask, the Euclidean distance (mm) to the nearest surface voxel of
    the other; the result is the larger of the two directed 95th percentiles (the Learn2Reg /
    ``surface-distance`` definition, without surface-element weighting).

    Args:
        mask_a: (*S) binary mask (> 0.5 is foreground).
        mask_b: (*S) binary mask, same shape.
        spacing: mm per voxel, one value or one per array axis.

    Returns:
        HD95 in mm; nan when either mask is empty (the distance is undefined).
    """
    a, b = to_numpy(mask_a) > 0.5, to_numpy(mask_b) > 0.5
    if a.shape != b.shape:
        raise ValueError(f"mask shapes differ: {a.shape} vs {b.shape}")
    if not a.any() or not b.any():
        return float("nan")
    sampling = _spacing(spacing, a.ndim)
    surface_a, surface_b = _surface(a), _surface(b)
    to_b = ndimage.distance_transform_edt(~surface_b, sampling=sampling)[surface_a]
    to_a = ndimage.distance_transform_edt(~surface_a, sampling=sampling)[surface_b]
    return float(max(np.percentile(to_b, 95), np.percentile(to_a, 95)))


def label_centroids(label: ArrayLike) -> np.ndarray:
    """Centroid of each label channel (regflow's centroid distance, DeepReg's ``label_tre``).

    Args:
        label: (L, *S) binary channels (> 0.5 is foreground).

    Returns:
        (L, ndim) centroids in voxels; a row of nan for an empty channel.
    """
    masks = _masks(label, None)
    centroids = np.full((masks.shape[0], masks.ndim - 1), np.nan)
    for channel, mask in enumerate(masks):
        if mask.any():
            centroids[channel] = np.argwhere(mask).mean(axis=0)
    return centroids


def _jacobian_determinant(ddf: ArrayLike) -> np.ndarray:
    """(*S) float64 determinant via :func:`regflow.spatial.jacobian_determinant`."""
    field = torch.from_numpy(_unbatched_ddf(ddf))[None]
    return jacobian_determinant(field)[0].numpy()


def folding_fraction(ddf: ArrayLike) -> float:
    """Share of voxels whose Jacobian determinant is <= 0 (folded), in [0, 1].

    Args:
        ddf: (ndim, *S) or (1, ndim, *S) displacement in voxels.
    """
    return float(np.mean(_jacobian_determinant(ddf) <= 0))


def sdlogj(ddf: ArrayLike) -> float:
    """Standard deviation of the log Jacobian determinant, exactly as Learn2Reg evaluates it.

    Learn2Reg computes ``log((det J + 3).clip(1e-9, 1e9)).std()``; the ``+ 3`` shift (which keeps
    folded voxels finite and damps the value compared with ``std(log det J)``) is kept so that
    numbers are comparable with their leaderboards. Our determinant uses one-sided differences
    at the borders instead of cropping two voxels, as their zero-padded filter requires.

    Args:
        ddf: (ndim, *S) or (1, ndim, *S) displacement in voxels.

    Returns:
        SDlogJ (dimensionless; 0 for any affine field).
    """
    log_det = np.log(np.clip(_jacobian_determinant(ddf) + 3.0, 1e-9, 1e9))
    return float(log_det.std())
