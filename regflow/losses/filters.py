"""Separable smoothing windows shared by the image and label losses.

A separable filter applies one 1-D kernel along every spatial axis in turn, so a k^n window costs
n * k multiplications per voxel instead of k^n.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F


def rectangular_kernel(kernel_size: int) -> torch.Tensor:
    """Box window of ``kernel_size`` ones, shape (kernel_size,)."""
    return torch.ones(kernel_size)


def triangular_kernel(kernel_size: int) -> torch.Tensor:
    """Triangle (hat) window, peak 1 at the centre, shape (kernel_size,).

    The weights fall linearly to ``1 / (half + 1)`` at the ends, so every tap is positive.
    """
    half = kernel_size // 2
    offsets = torch.arange(-half, half + 1, dtype=torch.float32)
    return 1.0 - offsets.abs() / (half + 1)


def gaussian_kernel(kernel_size: int) -> torch.Tensor:
    """Gaussian window with sigma = kernel_size / 3 voxels, peak 1, shape (kernel_size,)."""
    half = kernel_size // 2
    offsets = torch.arange(-half, half + 1, dtype=torch.float32)
    sigma = kernel_size / 3.0
    return torch.exp(-0.5 * (offsets / sigma) ** 2)


WINDOWS = {
    "rectangular": rectangular_kernel,
    "triangular": triangular_kernel,
    "gaussian": gaussian_kernel,
}


def window(kind: str, kernel_size: int) -> torch.Tensor:
    """A 1-D window by name.

    Args:
        kind: "rectangular", "triangular" or "gaussian".
        kernel_size: number of taps, odd and positive.

    Returns:
        (kernel_size,) float32 weights (not normalised).

    Raises:
        ValueError: unknown kind or an even / non-positive size.
    """
    if kind not in WINDOWS:
        raise ValueError(f"kernel {kind!r}: expected one of {sorted(WINDOWS)}")
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size {kernel_size}: must be a positive odd number")
    return WINDOWS[kind](kernel_size)


def gaussian_smoothing_kernel(sigma: float) -> torch.Tensor:
    """Normalised Gaussian of standard deviation ``sigma`` voxels, truncated at 3 sigma.

    Returns:
        (2 * ceil(3 sigma) + 1,) float32 weights summing to 1; sigma 0 gives the identity [1].
    """
    return _normalised_window(sigma, 3, lambda scaled: torch.exp(-0.5 * scaled ** 2))


def cauchy_smoothing_kernel(sigma: float) -> torch.Tensor:
    """Normalised Cauchy window ``1 / (1 + (x / sigma)^2)`` of scale ``sigma`` voxels, truncated
    at 5 sigma (DeepReg's ``cauchy`` multi-scale kernel: heavier tails than a Gaussian).

    Returns:
        (2 * ceil(5 sigma) + 1,) float32 weights summing to 1; sigma 0 gives the identity [1].
    """
    return _normalised_window(sigma, 5, lambda scaled: 1 / (1 + scaled ** 2))


def _normalised_window(sigma: float, truncate: int,
                       profile: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``profile(offset / sigma)`` over offsets within ``truncate`` sigma, summing to 1."""
    if sigma < 0:
        raise ValueError(f"sigma {sigma}: must be >= 0")
    radius = math.ceil(truncate * sigma)
    if radius == 0:
        return torch.ones(1)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = profile(offsets / sigma)
    return kernel / kernel.sum()


SMOOTHING_KERNELS = {"gaussian": gaussian_smoothing_kernel, "cauchy": cauchy_smoothing_kernel}


def _box_sums(padded: torch.Tensor, width: int, length: int, axis: int) -> torch.Tensor:
    """Sums of ``width`` consecutive entries along ``axis`` at the first ``length`` positions.

    Blocks of 1, 2, 4, ... entries are built by doubling and those in the binary expansion of
    ``width`` added up: 4 additions for a 9-wide box instead of 8.
    """
    total, offset = None, 0
    block, block_width, remaining = padded, 1, width
    while remaining:
        if remaining & 1:
            part = block.narrow(axis, offset, length)
            total = part if total is None else total + part
            offset += block_width
        remaining >>= 1
        if remaining:
            size = block.shape[axis] - block_width
            block = block.narrow(axis, 0, size) + block.narrow(axis, block_width, size)
            block_width *= 2
    return total


def _filter_axis(volume: torch.Tensor, taps: list[float], axis: int) -> torch.Tensor:
    """Correlate along one tensor axis with zero padding: a weighted sum of shifted copies.

    On CPU this is several times faster than a single-channel convolution for short kernels; a
    window of equal taps (rectangular) takes the cheaper doubling sums of :func:`_box_sums`.
    """
    half = len(taps) // 2
    length = volume.shape[axis]
    padding = [0, 0] * (volume.dim() - 2)  # F.pad lists the last axis first
    padding[2 * (volume.dim() - 1 - axis)] = half
    padding[2 * (volume.dim() - 1 - axis) + 1] = half
    padded = F.pad(volume, padding)
    if len(set(taps)) == 1:
        box = _box_sums(padded, len(taps), length, axis)
        return box if taps[0] == 1 else box * taps[0]
    filtered = padded.narrow(axis, 0, length) * taps[0]
    for offset, tap in enumerate(taps[1:], start=1):
        filtered.add_(padded.narrow(axis, offset, length), alpha=tap)
    return filtered


def _correlate(volume: torch.Tensor, taps: tuple[float, ...]) -> torch.Tensor:
    """Correlate with ``taps`` along every spatial axis in turn (zero padding, same size)."""
    filtered = volume
    for axis in range(2, volume.dim()):
        filtered = _filter_axis(filtered, list(taps), axis)
    return filtered


class _SeparableCorrelation(torch.autograd.Function):
    """Separable correlation whose gradient is the correlation with the mirrored taps.

    Zero-padded same-size correlation is linear, and its adjoint is the same operation with the
    kernel reversed; backward therefore costs one filtering pass, where autograd through the
    shifted copies would build and sum a zero-filled gradient for every tap.
    """

    @staticmethod
    def forward(ctx, volume: torch.Tensor, taps: tuple[float, ...]) -> torch.Tensor:
        ctx.taps = taps
        return _correlate(volume, taps)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _SeparableCorrelation.apply(grad_output, ctx.taps[::-1]), None


def separable_filter(volume: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Correlate every channel with ``kernel`` along each spatial axis, zero padding, same size.

    Args:
        volume: (B, C, *S) with 1 to 3 spatial axes.
        kernel: (k,) odd-length 1-D weights, used on every axis.

    Returns:
        (B, C, *S) filtered volume: out[x] = sum_o prod_i kernel[o_i] * volume[x + o] over offsets
        o in [-k//2, k//2]^n, with zeros outside the volume.
    """
    return _SeparableCorrelation.apply(volume, tuple(kernel.tolist()))


def window_weight(kernel: torch.Tensor, spatial: list[int] | tuple[int, ...]) -> torch.Tensor:
    """Total kernel weight that falls inside the volume at each voxel.

    Equal to ``separable_filter`` of a volume of ones, but computed as an outer product of 1-D
    profiles (cheap): the window is cropped at the border.

    Args:
        kernel: (k,) 1-D weights.
        spatial: the spatial shape (D, H, W) or (H, W).

    Returns:
        (1, 1, *spatial) float64 weights on the CPU.
    """
    ndim = len(spatial)
    kernel = kernel.to(dtype=torch.float64, device="cpu").reshape(1, 1, -1)
    weight = torch.ones([1, 1] + [1] * ndim, dtype=torch.float64)
    for axis, size in enumerate(spatial):
        ones = torch.ones(1, 1, size, dtype=torch.float64)
        profile = F.conv1d(ones, kernel, padding=kernel.shape[-1] // 2)  # (1, 1, size)
        weight = weight * profile.reshape([1, 1] + [size if i == axis else 1 for i in range(ndim)])
    return weight
