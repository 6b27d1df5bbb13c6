"""Image similarity losses: ssd, lncc, gncc, gmi.

Every function takes ``(fixed, warped)`` images of shape (B, C, *S) with 2 or 3 spatial axes and
returns a scalar to minimise, averaged over batch and channels. None of them returns NaN for
constant images: each ratio carries an ``eps`` in its denominator.
"""

from __future__ import annotations

import torch

from regflow.losses.filters import separable_filter, window, window_weight


def check_pair(first: torch.Tensor, second: torch.Tensor) -> tuple[int, ...]:
    """Check that two channel-first tensors match and have 2 or 3 spatial axes.

    Returns:
        the spatial dimension indices, e.g. (2, 3, 4) for (B, C, D, H, W).

    Raises:
        ValueError: different shapes, or not 2-D / 3-D.
    """
    if first.shape != second.shape:
        raise ValueError(f"shapes differ: {tuple(first.shape)} vs {tuple(second.shape)}")
    if first.dim() not in (4, 5):
        raise ValueError(f"expected (B, C, H, W) or (B, C, D, H, W), got {tuple(first.shape)}")
    return tuple(range(2, first.dim()))


def ssd(fixed: torch.Tensor, warped: torch.Tensor) -> torch.Tensor:
    """Mean squared intensity difference.

    Args:
        fixed: (B, C, *S) fixed image.
        warped: (B, C, *S) warped moving image.

    Returns:
        scalar mean over all voxels of (fixed - warped)^2, in intensity units squared.
    """
    check_pair(fixed, warped)
    return (fixed - warped).square().mean()


BORDERS = ("crop", "zero_pad")


def local_squared_ncc(fixed: torch.Tensor, warped: torch.Tensor, kernel_size: int = 9,
                      kernel: str = "rectangular", eps: float = 1e-5, border: str = "crop",
                      smooth_nr: float = 0.0) -> torch.Tensor:
    """Local squared normalised cross-correlation map.

    In a window w around each voxel, ``ncc^2 = (cross^2 + smooth_nr) / (var_f * var_w + eps)``
    with ``cross = sum w f g - sum w f * sum w g / n`` and ``var_f = sum w f^2 - (sum w f)^2 / n``
    (window-weighted sums, not means, as in DeepReg and MONAI).

    ``border="crop"`` (default): windows are cropped at the volume border (the statistics use only
    the voxels inside, with their own total weight ``n``), so they are exact everywhere and
    ``ncc^2(x, a * x + b) = 1`` for any a != 0 (the square makes the sign of a irrelevant)
    wherever x is not constant over the window. Constant windows give 0.
    ``border="zero_pad"``: DeepReg's (and MONAI's) form: the images are padded with zeros and
    ``n`` is the full window weight everywhere, which differs within kernel_size // 2 voxels of
    the border (and makes the result depend on adding a constant to an image there).

    The five local sums are computed in one separable filtering pass over stacked channels.

    Args:
        fixed: (B, C, *S) fixed image.
        warped: (B, C, *S) warped moving image.
        kernel_size: window width in voxels along every axis, odd.
        kernel: window shape, "rectangular", "triangular" or "gaussian" (sigma = kernel_size / 3),
            peak weight 1.
        eps: added to ``var_f * var_w`` (units: intensity^4 times window weight^2).
        border: "crop" or "zero_pad" (above).
        smooth_nr: added to ``cross^2`` (DeepReg: 1e-5, so that constant windows give 1).

    Returns:
        (B, C, *S) map with values in [0, 1] (for smooth_nr <= eps).
    """
    spatial_dims = check_pair(fixed, warped)
    if border not in BORDERS:
        raise ValueError(f"border {border!r}: expected one of {BORDERS}")
    weights = window(kernel, kernel_size)  # (k,) on the CPU: its taps are Python numbers
    if border == "crop":
        # ncc is invariant to adding a constant to a cropped window: centring on the global mean
        # keeps the local sums small, so float32 round-off in sum(f^2) - sum(f)^2 / n stays far
        # below the variance. The mean needs no gradient for the same reason. Zero padding is not
        # invariant, so there the raw intensities are used.
        fixed = fixed - fixed.mean(dim=spatial_dims, keepdim=True).detach()
        warped = warped - warped.mean(dim=spatial_dims, keepdim=True).detach()
        count = window_weight(weights, fixed.shape[2:]).to(fixed)  # (1, 1, *S) inside weight
    else:
        count = weights.sum().item() ** len(spatial_dims)
    stacked = torch.cat([fixed, warped, fixed * fixed, warped * warped, fixed * warped], dim=1)
    sums = separable_filter(stacked, weights)  # (B, 5C, *S)
    f_sum, w_sum, ff_sum, ww_sum, fw_sum = sums.chunk(5, dim=1)  # each (B, C, *S)
    cross = fw_sum - f_sum * w_sum / count
    f_var = (ff_sum - f_sum * f_sum / count).clamp_min(0)
    w_var = (ww_sum - w_sum * w_sum / count).clamp_min(0)
    return (cross * cross + smooth_nr) / (f_var * w_var + eps)


def lncc(fixed: torch.Tensor, warped: torch.Tensor, kernel_size: int = 9,
         kernel: str = "rectangular", eps: float = 1e-5, border: str = "crop",
         smooth_nr: float = 0.0) -> torch.Tensor:
    """Negative local squared normalised cross-correlation (see :func:`local_squared_ncc`).

    Args:
        fixed: (B, C, *S) fixed image.
        warped: (B, C, *S) warped moving image.
        kernel_size: window width in voxels along every axis, odd.
        kernel: window shape, "rectangular", "triangular" or "gaussian".
        eps: added to ``var_f * var_w`` (units: intensity^4 times window weight^2).
        border: "crop" (exact windows at the border) or "zero_pad" (DeepReg).
        smooth_nr: added to ``cross^2`` (DeepReg: 1e-5).

    Returns:
        scalar in [-1, 0]: minus the mean over voxels, channels and batch of ncc^2; -1 for
        ``warped = a * fixed + b`` (a != 0) when no window of ``fixed`` is constant (crop).
    """
    return -local_squared_ncc(fixed, warped, kernel_size, kernel, eps, border, smooth_nr).mean()


def gncc(fixed: torch.Tensor, warped: torch.Tensor, eps: float = 1e-8,
         squared: bool = False) -> torch.Tensor:
    """Negative global normalised cross-correlation (Pearson correlation per image and channel).

    Args:
        fixed: (B, C, *S) fixed image.
        warped: (B, C, *S) warped moving image.
        eps: added to ``var_f * var_w`` (intensity^4), so constant images give 0, not NaN
            (-1 when squared: (0 + eps) / (0 + eps), as in DeepReg).
        squared: DeepReg's form ``(cov^2 + eps) / (var_f * var_w + eps)`` (the squared
            correlation, blind to the sign of the relation) instead of ``cov / sqrt(...)``.

    Returns:
        scalar in [-1, 1]: minus the correlation (or its square), averaged over batch and channels;
        ``gncc(x, a * x + b) = -1`` for a > 0 and +1 for a < 0 (-1 for both when squared).
    """
    spatial_dims = check_pair(fixed, warped)
    fixed = fixed - fixed.mean(dim=spatial_dims, keepdim=True)
    warped = warped - warped.mean(dim=spatial_dims, keepdim=True)
    cov = (fixed * warped).mean(dim=spatial_dims)  # (B, C)
    f_var = fixed.square().mean(dim=spatial_dims)
    w_var = warped.square().mean(dim=spatial_dims)
    if squared:
        return -((cov.square() + eps) / (f_var * w_var + eps)).mean()
    return -(cov / torch.sqrt(f_var * w_var + eps)).mean()


def _parzen_weights(image: torch.Tensor, centres: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian Parzen window memberships, (B, C, *S) -> (B, N, bins), each row summing to 1."""
    samples = image.clamp(0, 1).reshape(image.shape[0], -1, 1)  # (B, N, 1)
    # softmax subtracts the largest exponent (the nearest bin's), so that a narrow sigma cannot
    # underflow every bin to 0, and normalises, in one fused pass forward and one backward
    exponents = (samples - centres).square().mul_(-0.5 / sigma**2)  # (B, N, bins)
    return torch.softmax(exponents, dim=-1)


def gmi(fixed: torch.Tensor, warped: torch.Tensor, num_bins: int = 23, sigma_ratio: float = 0.5,
        eps: float = 1e-7) -> torch.Tensor:
    """Negative global mutual information with Gaussian Parzen windows.

    Intensities are assumed in [0, 1] and clamped there. Bin centres are ``linspace(0, 1,
    num_bins)``; each voxel spreads over the bins with weights ``exp(-(x - c)^2 / (2 sigma^2))``
    normalised to 1, ``sigma = sigma_ratio * bin spacing``. The joint histogram p(f, w) is the mean
    over voxels (all channels of one batch element together) of the outer product of the two
    memberships; MI = sum p(f, w) log((p(f, w) + eps) / (p(f) p(w) + eps)) in nats.

    Args:
        fixed: (B, C, *S) fixed image, intensities in [0, 1].
        warped: (B, C, *S) warped moving image, intensities in [0, 1].
        num_bins: number of histogram bins, >= 2.
        sigma_ratio: Parzen sigma as a fraction of the bin spacing, > 0.
        eps: keeps the logarithm finite for empty bins.

    Returns:
        scalar: minus the mutual information (nats), averaged over the batch.
    """
    check_pair(fixed, warped)
    if num_bins < 2 or sigma_ratio <= 0:
        raise ValueError(f"gmi: need num_bins >= 2 and sigma_ratio > 0, got {num_bins}, "
                         f"{sigma_ratio}")
    centres = torch.linspace(0, 1, num_bins, dtype=fixed.dtype, device=fixed.device)
    sigma = sigma_ratio / (num_bins - 1)
    fixed_weights = _parzen_weights(fixed, centres, sigma)  # (B, N, bins)
    warped_weights = _parzen_weights(warped, centres, sigma)
    samples = fixed_weights.shape[1]
    joint = fixed_weights.transpose(1, 2) @ warped_weights / samples  # (B, bins, bins)
    fixed_marginal = fixed_weights.mean(dim=1)  # (B, bins)
    warped_marginal = warped_weights.mean(dim=1)
    independent = fixed_marginal[:, :, None] * warped_marginal[:, None, :]  # (B, bins, bins)
    mutual_information = (joint * torch.log((joint + eps) / (independent + eps))).sum(dim=(1, 2))
    return -mutual_information.mean()
