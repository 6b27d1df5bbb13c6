"""Per-volume transforms: resample to a voxel size or a shape, normalise, centre crop/pad.

Every step returns the new (4, 4) affine with the array, so that world coordinates stay put.
Dataset building (:mod:`regflow.data.preprocess`) and the inference path on raw volumes
(:meth:`regflow.inference.Registrar.register_volumes`, so serving too) apply the same functions.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.ndimage import affine_transform

from regflow.config import PreprocessConfig


def voxel_spacing(affine: np.ndarray, ndim: int = 3) -> np.ndarray:
    """Voxel size in mm along the first ``ndim`` array axes: the norms of the affine's columns."""
    return np.linalg.norm(np.asarray(affine)[:3, :ndim], axis=0)


def resampled_shape(spatial_shape: Sequence[int], affine: np.ndarray, spacing: Sequence[float]
                    ) -> tuple[int, ...]:
    """The spatial size :func:`resample` gives a volume: ``round(S * source_spacing / spacing)``
    per axis (half up, at least 1).

    Args:
        spatial_shape: (*S) voxels.
        affine: (4, 4) voxel-to-world matrix (mm).
        spacing: target voxel size per spatial axis (mm).
    """
    ndim = len(spacing)
    step = np.asarray(spacing, dtype=np.float64) / voxel_spacing(affine, ndim)
    in_shape = np.asarray(spatial_shape[:ndim], dtype=np.float64)
    return tuple(int(size) for size in np.maximum(1, np.floor(in_shape / step + 0.5)))


def resample(array: np.ndarray, affine: np.ndarray, spacing: Sequence[float], order: int
             ) -> tuple[np.ndarray, np.ndarray]:
    """Resample a volume to a new voxel size, keeping the grid centre fixed in world space.

    Args:
        array: (*S) or (*S, C) volume, ``len(S) == len(spacing)``; channels are resampled apart.
        affine: (4, 4) voxel-to-world matrix (mm).
        spacing: target voxel size per spatial axis (mm).
        order: spline order: 1 (linear) for images, 0 (nearest) for labels.

    Returns:
        ``(resampled, new_affine)``: spatial size :func:`resampled_shape` and the affine with
        columns scaled to ``spacing`` and the origin moved so that the centre voxel's world
        coordinate is unchanged.
    """
    ndim = len(spacing)
    step = np.asarray(spacing, dtype=np.float64) / voxel_spacing(affine, ndim)
    in_shape = np.asarray(array.shape[:ndim])
    out_shape = np.asarray(resampled_shape(array.shape, affine, spacing))
    if np.all(step == 1) and np.array_equal(in_shape, out_shape):  # already on that grid
        return array.copy(), np.array(affine, dtype=np.float64)
    offset = (in_shape - 1) / 2 - step * (out_shape - 1) / 2
    resampled = np.empty(tuple(out_shape) + array.shape[ndim:], dtype=array.dtype)
    channels = (resampled, array) if array.ndim > ndim else (resampled[..., None],
                                                             array[..., None])
    for channel in range(channels[1].shape[-1]):  # written in place: no stacked copy
        affine_transform(channels[1][..., channel], step, offset,
                         output=channels[0][..., channel], order=order, mode="nearest")
    new_affine = np.array(affine, dtype=np.float64)
    new_affine[:3, :ndim] = new_affine[:3, :ndim] * step
    new_affine[:3, 3] = affine[:3, 3] + affine[:3, :ndim] @ offset
    return resampled, new_affine


def resize_to_shape(array: np.ndarray, affine: np.ndarray, shape: Sequence[int], order: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Resample to exactly ``shape`` voxels over the same field of view (DeepReg's resizing).

    The voxel size becomes ``spacing * S / shape`` per axis and the grid centre stays where it
    is in world space (see :func:`resample`).

    Args:
        array: (*S) or (*S, C) volume.
        affine: (4, 4) voxel-to-world matrix (mm).
        shape: target spatial size (voxels).
        order: 1 (linear) for images and soft labels, 0 (nearest) for label maps.
    """
    ndim = len(shape)
    spacing = voxel_spacing(affine, ndim) * np.asarray(array.shape[:ndim], dtype=np.float64) \
        / np.asarray(shape, dtype=np.float64)
    resized, new_affine = resample(array, affine, spacing.tolist(), order=order)
    return crop_or_pad(resized, new_affine, shape, fill=0)  # a no-op unless rounding slipped


def regrid(array: np.ndarray, affine: np.ndarray, params: PreprocessConfig, order: int
           ) -> tuple[np.ndarray, np.ndarray]:
    """The grid preprocessing asks for: the shape (``resize``), the voxel size (``spacing``), or
    the volume's own (neither)."""
    if params.resize:
        return resize_to_shape(array, affine, params.shape, order=order)
    if params.spacing is not None:
        return resample(array, affine, params.spacing, order=order)
    return array, affine


def crop_or_pad(array: np.ndarray, affine: np.ndarray, shape: Sequence[int], fill: float
                ) -> tuple[np.ndarray, np.ndarray]:
    """Centre-crop and/or pad the spatial axes to ``shape``; world coordinates stay put.

    Args:
        array: (*S) or (*S, C) volume with ``len(S) == len(shape)``.
        affine: (4, 4) voxel-to-world matrix (mm).
        shape: target spatial size (voxels).
        fill: value of padded voxels.

    Returns:
        ``(array, new_affine)`` with output voxel ``j`` = input voxel ``j + start`` where
        ``start = (S - shape) // 2`` (negative where padding), and the affine translated by
        ``start`` voxels so that ``new_affine @ j == affine @ (j + start)``.
    """
    ndim = len(shape)
    start = np.array([(size - target) // 2 for size, target in zip(array.shape, shape,
                                                                    strict=False)])
    output = np.full(tuple(shape) + array.shape[ndim:], fill, dtype=array.dtype)
    source, target = [], []
    for first, size, wanted in zip(start, array.shape, shape, strict=False):
        length = min(size, wanted)
        source.append(slice(max(first, 0), max(first, 0) + length))
        target.append(slice(max(-first, 0), max(-first, 0) + length))
    output[tuple(target)] = array[tuple(source)]
    new_affine = np.array(affine, dtype=np.float64)
    new_affine[:3, 3] = affine[:3, 3] + affine[:3, :ndim] @ start
    return output, new_affine


def normalise(image: np.ndarray, method: str, percentiles: Sequence[float] = (0.5, 99.5)
              ) -> np.ndarray:
    """Intensity normalisation to float32.

    Args:
        image: any-shape intensity array.
        method: "minmax" (scale to [0, 1]), "percentile" (clip to the ``percentiles`` then scale to
            [0, 1]) or "none" (cast only).
        percentiles: [low, high] in percent, for "percentile".

    Returns:
        float32 array of the same shape; a constant image becomes all zeros.
    """
    image = np.asarray(image, dtype=np.float32)
    if method == "none":
        return image
    if method == "percentile":
        low, high = np.percentile(image, percentiles)
        image = np.clip(image, low, high)
    else:
        low, high = image.min(), image.max()
    if high <= low:
        return np.zeros_like(image)
    return ((image - low) / (high - low)).astype(np.float32)


def process_image(image: np.ndarray, affine: np.ndarray, params: PreprocessConfig
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Resample (linear) to the voxel size or, with ``resize``, to the shape; normalise; then
    crop/pad (filling with the image minimum).

    Returns:
        ``(image, affine)``: float32 array of exactly ``params.shape`` and its (4, 4) affine.
    """
    image, affine = regrid(np.asarray(image, dtype=np.float32), affine, params, order=1)
    image = normalise(image, params.normalise, params.percentiles)
    return crop_or_pad(image, affine, params.shape, fill=float(image.min()))
