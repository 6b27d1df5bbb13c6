"""Spatial transforms on dense displacement fields, in 2-D and 3-D.

Conventions (shared by the whole package):

- A DDF is a dense displacement field in voxels, shape (B, ndim, *S); channel i is the
  displacement along array axis i. Warping means ``warped[x] = moving[x + ddf[x]]``.
- A DVF is a stationary velocity field in the same layout, integrated by scaling and squaring.
- This module is the only place that converts voxel displacements to the normalised
  ``torch.nn.functional.grid_sample`` coordinates (``align_corners=True``: -1 and +1 are the centres
  of the first and last voxel; the grid's last axis lists the array axes in reverse order).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

_GRID_MODES = {"linear": "bilinear", "nearest": "nearest"}
_PADDINGS = ("zeros", "border")


def _voxel_to_grid_scale(shape: Sequence[int]) -> list[float]:
    """Normalised grid units per voxel along each array axis (size-1 axes map to 0)."""
    return [2.0 / max(size - 1, 1) for size in shape]


@functools.lru_cache(maxsize=16)
def _normalised_identity(shape: tuple[int, ...], image_shape: tuple[int, ...],
                         device: torch.device, dtype: torch.dtype
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Identity grid of ``shape`` in the normalised units of ``image_shape``, cached.

    Returns:
        identity: (*shape, ndim) normalised coordinates of every voxel index of ``shape`` as a
            position in an image of ``image_shape``, last axis reversed (grid_sample order).
        scale: (ndim,) normalised units per voxel of ``image_shape``, reversed to match.
    """
    with torch.inference_mode(False):
        scale = torch.tensor(_voxel_to_grid_scale(image_shape), device=device, dtype=dtype)
        axes = [torch.arange(size, device=device, dtype=dtype) for size in shape]
        voxels = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)  # (*shape, ndim)
        identity = (voxels * scale - 1.0).flip(-1).contiguous()
        return identity, scale.flip(0).contiguous()


def ddf_to_grid(ddf: torch.Tensor, image_shape: Sequence[int] | None = None) -> torch.Tensor:
    """Turn a DDF in voxels into a ``grid_sample`` sampling grid.

    Args:
        ddf: (B, ndim, *S) displacement in voxels, channel i along array axis i.
        image_shape: spatial shape of the image to be sampled (default S): the positions
            ``x + ddf[x]`` are voxel coordinates of that image.

    Returns:
        (B, *S, ndim) sampling positions ``x + ddf[x]`` in normalised coordinates
        (``align_corners=True``), last axis in reversed array-axis order.
    """
    shape = tuple(ddf.shape[2:])
    image_shape = shape if image_shape is None else tuple(image_shape)
    identity, scale = _normalised_identity(shape, image_shape, ddf.device, ddf.dtype)
    # One fused multiply-add over the channel-last, axis-reversed view of the DDF.
    return torch.addcmul(identity, ddf.movedim(1, -1).flip(-1), scale)


def identity_grid(shape: Sequence[int], device: torch.device | str | None = None,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Voxel coordinates of every voxel.

    Args:
        shape: spatial shape S (2 or 3 sizes).
        device, dtype: of the result.

    Returns:
        (ndim, *S) tensor whose channel i holds the index along array axis i (voxels).
    """
    axes = [torch.arange(size, device=device, dtype=dtype) for size in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0)


def warp(image: torch.Tensor, ddf: torch.Tensor, interp: str = "linear",
         padding: str = "zeros") -> torch.Tensor:
    """Resample ``image`` at ``x + ddf[x]``: ``warped[x] = image[x + ddf[x]]``.

    The one resampler of regflow: training, evaluation, ``regflow warp``, predict, serving and
    the geometry of raw inputs all go through it. Matches
    ``scipy.ndimage.map_coordinates(order=1, mode="grid-constant", cval=0)`` for
    ``padding="zeros"`` (values outside the volume are zeros and are interpolated with the border
    voxels) and ``mode="nearest"`` for ``padding="border"``.

    Args:
        image: (B, C, *S_image) floating-point image or multi-channel label; any number of
            channels (the same DDF moves every channel). S_image may differ from S: ``x + ddf[x]``
            is then a voxel coordinate of the image's own grid.
        ddf: (B, ndim, *S) displacement in voxels. A batch of 1 on either side is broadcast.
        interp: "linear" (bi/trilinear) or "nearest" (labels: keeps the set of values).
        padding: "zeros" (outside the volume is 0) or "border" (repeat the edge voxel).

    Returns:
        (B, C, *S) warped image, in the dtype of ``image`` (computed in at least float32).

    Raises:
        ValueError: unknown interp/padding, or shapes that do not fit together.
    """
    if interp not in _GRID_MODES:
        raise ValueError(f"interp must be one of {sorted(_GRID_MODES)}, got {interp!r}")
    if padding not in _PADDINGS:
        raise ValueError(f"padding must be one of {list(_PADDINGS)}, got {padding!r}")
    ndim = ddf.ndim - 2
    if ndim not in (2, 3) or ddf.shape[1] != ndim or image.ndim != ddf.ndim:
        raise ValueError(f"expected image (B, C, *S) and ddf (B, {ndim}, *S) with 2 or 3 spatial "
                         f"axes, got {tuple(image.shape)} and {tuple(ddf.shape)}")
    batch = torch.broadcast_shapes(image.shape[:1], ddf.shape[:1])[0]
    # Sample in at least float32: half-precision grid coordinates are off by ~0.1 voxel at 128^3.
    dtype = torch.promote_types(torch.promote_types(image.dtype, ddf.dtype), torch.float32)
    grid = ddf_to_grid(ddf.to(dtype), image.shape[2:]).expand(batch, *ddf.shape[2:], ndim)
    moving = image.to(dtype).expand(batch, *image.shape[1:])
    warped = F.grid_sample(moving, grid, mode=_GRID_MODES[interp], padding_mode=padding,
                           align_corners=True)
    return warped.to(image.dtype)


def voxel_map_ddf(matrix: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """The DDF of a voxel map: ``ddf[x] = M x - x`` for every voxel x of a grid of ``shape``.

    Args:
        matrix: (ndim + 1, ndim + 1) homogeneous map from this grid's voxel indices to another
            grid's voxel coordinates (e.g. ``inv(A_moving) @ A_fixed``).
        shape: spatial shape S of this grid.

    Returns:
        (1, ndim, *S) displacement; ``warp(image, ddf)`` resamples an image of the other grid onto
        this one.
    """
    ndim = len(shape)
    voxels = identity_grid(shape, device=matrix.device, dtype=matrix.dtype)  # (ndim, *S)
    linear, shift = matrix[:ndim, :ndim], matrix[:ndim, ndim]
    mapped = torch.einsum("ij,j...->i...", linear, voxels) + shift.reshape(ndim, *[1] * ndim)
    return (mapped - voxels)[None]


def compose_ddfs(first: torch.Tensor, then: torch.Tensor) -> torch.Tensor:
    """The DDF of warping by ``first`` and then warping that result by ``then``.

    ``warp(warp(m, first), then)[x] = m[x + then[x] + first[x + then[x]]]``, so the composed field
    is ``then + warp(first, then)``; ``first`` is resampled with border padding (a field does not
    fall to zero outside the volume).

    Args:
        first: (B, ndim, *S) the field applied first, in voxels.
        then: (B, ndim, *S) the field applied to the result, in voxels.

    Returns:
        (B, ndim, *S) the composed field.
    """
    return then + warp(first, then, padding="border")


def integrate_dvf(dvf: torch.Tensor, steps: int = 7, downsize: int = 1) -> torch.Tensor:
    """Integrate a stationary velocity field by scaling and squaring.

    ``ddf = dvf / 2**steps``, then ``steps`` times the field composed with itself,
    ``ddf = ddf + warp(ddf, ddf)`` (:func:`compose_ddfs`: border padding, so the field is
    extrapolated by its edge values rather than pulled towards zero).

    With ``downsize`` > 1 this runs on a grid ``ceil(size / downsize)`` voxels per axis: the
    velocity is linearly resampled onto it and rescaled into its voxels, and the displacement
    comes back the same way (VoxelMorph's ``int_downsize``). For a smooth field, such as a
    coarse-level LocalNet's, that matches full-resolution integration at a fraction of its cost.

    Args:
        dvf: (B, ndim, *S) velocity in voxels.
        steps: number of squarings; 0 returns the DVF itself.
        downsize: integer grid coarsening, >= 1 (1: the field's own grid).

    Returns:
        (B, ndim, *S) DDF in voxels.
    """
    if downsize < 1:
        raise ValueError(f"downsize {downsize}: must be >= 1")
    if downsize > 1:
        shape = dvf.shape[2:]
        coarse_shape = [-(-size // downsize) for size in shape]
        ratios = [coarse / size for coarse, size in zip(coarse_shape, shape, strict=True)]
        ratios = dvf.new_tensor(ratios).view((1, -1) + (1,) * len(shape))
        mode = {2: "bilinear", 3: "trilinear"}[len(shape)]
        coarse = F.interpolate(dvf, size=coarse_shape, mode=mode, align_corners=False)
        coarse_ddf = integrate_dvf(coarse * ratios, steps)
        return F.interpolate(coarse_ddf, size=tuple(shape), mode=mode,
                             align_corners=False) / ratios
    ddf = dvf / 2**steps
    for _ in range(steps):
        ddf = compose_ddfs(ddf, ddf)
    return ddf


def _cubic_bspline_weights(size: int, spacing: int, points: int) -> torch.Tensor:
    """(size, points) weights of the uniform cubic B-spline: voxel x lies between control points
    ``x // spacing + 1`` and ``+ 2`` at fraction ``t = ((x mod spacing) + 0.5) / spacing``, and
    takes ``(1 - t)^3 / 6``, ``(3t^3 - 6t^2 + 4) / 6``, ``(-3t^3 + 3t^2 + 3t + 1) / 6`` and
    ``t^3 / 6`` of control points ``x // spacing`` to ``x // spacing + 3``."""
    voxels = torch.arange(size, dtype=torch.float64)
    first = torch.div(voxels, spacing, rounding_mode="floor").long()
    t = (voxels - first * spacing + 0.5) / spacing
    basis = [(1 - t) ** 3 / 6, (3 * t**3 - 6 * t**2 + 4) / 6,
             (-3 * t**3 + 3 * t**2 + 3 * t + 1) / 6, t**3 / 6]
    weights = torch.zeros(size, points, dtype=torch.float64)
    for offset, values in enumerate(basis):
        weights[torch.arange(size), first + offset] = values
    return weights


def _gaussian_taps(sigma: float) -> torch.Tensor:
    """Normalised Gaussian of ``sigma`` on ``ceil(3 sigma)`` taps, rounded up to an odd count."""
    size = math.ceil(3 * sigma)
    size += (size + 1) % 2
    offsets = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    taps = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return taps / taps.sum()


def _along_axis(field: torch.Tensor, axis: int, matrix: torch.Tensor) -> torch.Tensor:
    """Apply a (new size, old size) matrix along spatial ``axis`` of (B, C, *S)."""
    moved = field.movedim(axis + 2, -1)
    return (moved @ matrix.to(field).T).movedim(-1, axis + 2)


def bspline_field(field: torch.Tensor, spacing: Sequence[int]) -> torch.Tensor:
    """A dense field made a cubic B-spline field with control points every ``spacing`` voxels.

    DeepReg's ``control_points``: the field is smoothed per axis by a Gaussian of sigma
    ``0.44 x spacing`` (anti-aliasing, zero padding), resampled linearly (half-voxel centres) to
    ``ceil(size / spacing) + 3`` control points per axis, and interpolated back to every voxel by
    the uniform cubic B-spline (:func:`_cubic_bspline_weights`). Values keep their units (voxels).

    Args:
        field: (B, C, *S) displacement or velocity field, 2 or 3 spatial axes.
        spacing: control point spacing in voxels, one per spatial axis.

    Returns:
        (B, C, *S) the B-spline field, smooth across control points.
    """
    shape = field.shape[2:]
    if len(spacing) != len(shape) or min(spacing) < 1:
        raise ValueError(f"spacing {list(spacing)}: one positive spacing per spatial axis "
                         f"of {tuple(shape)}")
    smooth = field
    for axis, step in enumerate(spacing):
        taps = _gaussian_taps(0.44 * step)
        half = (len(taps) - 1) // 2
        band = torch.zeros(shape[axis], shape[axis] + 2 * half, dtype=torch.float64)
        for row in range(shape[axis]):
            band[row, row:row + len(taps)] = taps
        smooth = _along_axis(smooth, axis, band[:, half:half + shape[axis]])
    points = [-(-size // step) + 3 for size, step in zip(shape, spacing, strict=True)]
    mode = {2: "bilinear", 3: "trilinear"}[len(shape)]
    grid = F.interpolate(smooth, size=points, mode=mode, align_corners=False)
    for axis, (size, step, count) in enumerate(zip(shape, spacing, points, strict=True)):
        grid = _along_axis(grid, axis, _cubic_bspline_weights(size, step, count))
    return grid


def affine_to_ddf(theta: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Dense displacement of an affine map given in voxel coordinates about the volume centre.

    The map is ``y = A (x - c) + t + c`` with ``theta = [A | t]`` and ``c = (size - 1) / 2`` per
    axis; the DDF is ``y - x``. The identity ``theta`` gives a zero field.

    Args:
        theta: (B, ndim, ndim + 1) affine matrices, array-axis order, voxels.
        shape: spatial shape S of the output.

    Returns:
        (B, ndim, *S) displacement in voxels, dtype and device of ``theta``.
    """
    batch, ndim = theta.shape[0], len(shape)
    if tuple(theta.shape[1:]) != (ndim, ndim + 1):
        raise ValueError(f"theta must be (B, {ndim}, {ndim + 1}) for a {ndim}-D shape, "
                         f"got {tuple(theta.shape)}")
    eye = torch.eye(ndim, device=theta.device, dtype=theta.dtype)
    linear = theta[:, :, :ndim] - eye  # (B, ndim, ndim): displacement is (A - I)(x - c) + t
    ones = [1] * ndim
    ddf = theta[:, :, ndim].reshape(batch, ndim, *ones)
    for axis, size in enumerate(shape):
        centred = torch.arange(size, device=theta.device, dtype=theta.dtype) - (size - 1) / 2
        along = ones.copy()
        along[axis] = size
        # Each axis contributes a column of (A - I) times its centred coordinate (broadcast).
        ddf = ddf + linear[:, :, axis].reshape(batch, ndim, *ones) * centred.reshape(1, 1, *along)
    return ddf.expand(batch, ndim, *shape).contiguous()


def jacobian_determinant(ddf: torch.Tensor) -> torch.Tensor:
    """Determinant of the Jacobian of ``x -> x + ddf(x)``.

    Derivatives are central differences in the interior and one-sided at the borders
    (``torch.gradient``), in voxel units; every spatial size must be at least 2.

    Args:
        ddf: (B, ndim, *S) displacement in voxels, ndim 2 or 3.

    Returns:
        (B, *S) determinant (1 = volume kept, <= 0 = folding).
    """
    ndim = ddf.shape[1]
    if ndim not in (2, 3) or ddf.ndim != ndim + 2:
        raise ValueError(f"expected ddf (B, ndim, *S) with ndim 2 or 3, got {tuple(ddf.shape)}")
    # derivatives[j][:, i] = d ddf_i / d x_j
    derivatives = torch.gradient(ddf, dim=tuple(range(2, ddf.ndim)))
    jac = [[derivatives[j][:, i] + (1.0 if i == j else 0.0) for j in range(ndim)]
           for i in range(ndim)]
    if ndim == 2:
        return jac[0][0] * jac[1][1] - jac[0][1] * jac[1][0]
    return (jac[0][0] * (jac[1][1] * jac[2][2] - jac[1][2] * jac[2][1])
            - jac[0][1] * (jac[1][0] * jac[2][2] - jac[1][2] * jac[2][0])
            + jac[0][2] * (jac[1][0] * jac[2][1] - jac[1][1] * jac[2][0]))
