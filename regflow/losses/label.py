"""Label losses: soft dice, soft jaccard, binary cross-entropy, ssd, with multi-scale smoothing.

Labels are (B, L, *S) binary or probabilistic, one channel per foreground label, 2 or 3 spatial
axes. Every function returns a scalar to minimise, called as ``loss(target, pred)``.

Multi-scale: with ``scales=[s1, s2, ...]`` both labels are smoothed by a Gaussian of sigma s voxels
(separable, zero padding; s = 0 is no smoothing), the per-label value is computed at every scale and
the scales are averaged. This widens the capture range of a label loss (DeepReg's multi-scale dice).

Soft scores use squared sums in the denominator by default (the V-Net form): for binary labels they
equal the set formulas, and identical soft labels (smoothed ones included) still score exactly 1.
``denominator="linear"`` sums the labels themselves, as DeepReg does; identical soft labels then
score below 1.

Background: labels carry no background channel. ``background_weight`` > 0 adds the implicit
background ``clamp(1 - sum over foreground channels, 0, 1)`` as an extra channel; the result is the
weighted mean over channels with weight 1 for every foreground label and ``background_weight`` for
the background. With the default 0 only foreground labels count.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch

from regflow.losses.filters import gaussian_smoothing_kernel, separable_filter
from regflow.losses.image import check_pair

ChannelScore = Callable[[torch.Tensor, torch.Tensor, tuple[int, ...]], torch.Tensor]


def _with_background(labels: torch.Tensor) -> torch.Tensor:
    """(B, L, *S) -> (B, L + 1, *S): the foreground channels, then the implicit background."""
    background = (1 - labels.sum(dim=1, keepdim=True)).clamp(0, 1)
    return torch.cat([labels, background], dim=1)


def _weighted_channel_mean(score: ChannelScore, target: torch.Tensor, pred: torch.Tensor,
                           scales: Sequence[float] | None, background_weight: float
                           ) -> torch.Tensor:
    """Average a per-channel score over scales, then over channels (weighted) and batch."""
    spatial_dims = check_pair(target, pred)
    if background_weight < 0:
        raise ValueError(f"background_weight {background_weight}: must be >= 0")
    weights = torch.ones(target.shape[1], dtype=target.dtype, device=target.device)
    if background_weight > 0:
        target, pred = _with_background(target), _with_background(pred)
        weights = torch.cat([weights, weights.new_tensor([background_weight])])
    per_scale = []
    for sigma in scales or [0.0]:
        kernel = gaussian_smoothing_kernel(sigma)
        if kernel.numel() > 1:
            target_scaled = separable_filter(target, kernel)
            pred_scaled = separable_filter(pred, kernel)
        else:
            target_scaled, pred_scaled = target, pred
        per_scale.append(score(target_scaled, pred_scaled, spatial_dims))  # (B, L')
    channel_score = torch.stack(per_scale).mean(dim=0)  # (B, L')
    return ((channel_score * weights).sum(dim=1) / weights.sum()).mean()


DENOMINATORS = ("squared", "linear")


def _overlap_and_total(target: torch.Tensor, pred: torch.Tensor, spatial_dims: tuple[int, ...],
                       denominator: str, binary: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (B, L): sum t p, and sum t^2 + sum p^2 ("squared") or sum t + sum p ("linear").

    With ``binary`` both labels are first thresholded at 0.5 (no gradient flows through that).
    """
    if binary:
        target, pred = (target >= 0.5).to(target.dtype), (pred >= 0.5).to(pred.dtype)
    overlap = (target * pred).sum(dim=spatial_dims)
    if denominator == "squared":
        target, pred = target.square(), pred.square()
    return overlap, target.sum(dim=spatial_dims) + pred.sum(dim=spatial_dims)


def _dice_score(target: torch.Tensor, pred: torch.Tensor, spatial_dims: tuple[int, ...],
                denominator: str, binary: bool, smooth_nr: float, smooth_dr: float
                ) -> torch.Tensor:
    """Soft dice (2 sum tp + smooth_nr) / (total + smooth_dr) per (B, L); empty pairs give 1."""
    overlap, total = _overlap_and_total(target, pred, spatial_dims, denominator, binary)
    return (2 * overlap + smooth_nr) / (total + smooth_dr)


def _jaccard_score(target: torch.Tensor, pred: torch.Tensor, spatial_dims: tuple[int, ...],
                   denominator: str, binary: bool, smooth_nr: float, smooth_dr: float
                   ) -> torch.Tensor:
    """Soft jaccard (sum tp + smooth_nr) / (total - sum tp + smooth_dr) per (B, L)."""
    overlap, total = _overlap_and_total(target, pred, spatial_dims, denominator, binary)
    return (overlap + smooth_nr) / (total - overlap + smooth_dr)


def _overlap_score(score: Callable[..., torch.Tensor], denominator: str, binary: bool,
                   smooth_nr: float, smooth_dr: float) -> ChannelScore:
    """Bind the options of a dice/jaccard score after checking ``denominator``."""
    if denominator not in DENOMINATORS:
        raise ValueError(f"denominator {denominator!r}: expected one of {DENOMINATORS}")
    return functools.partial(score, denominator=denominator, binary=binary,
                             smooth_nr=smooth_nr, smooth_dr=smooth_dr)


def _squared_difference(target: torch.Tensor, pred: torch.Tensor, spatial_dims: tuple[int, ...]
                        ) -> torch.Tensor:
    """Mean of (t - p)^2 per (B, L)."""
    return (target - pred).square().mean(dim=spatial_dims)


def _binary_cross_entropy(target: torch.Tensor, pred: torch.Tensor, spatial_dims: tuple[int, ...],
                          eps: float = 1e-7) -> torch.Tensor:
    """Mean binary cross-entropy per (B, L), pred clamped to [eps, 1 - eps]."""
    pred = pred.clamp(eps, 1 - eps)
    entropy = -(target * torch.log(pred) + (1 - target) * torch.log(1 - pred))
    return entropy.mean(dim=spatial_dims)


def dice(target: torch.Tensor, pred: torch.Tensor, scales: Sequence[float] | None = None,
         background_weight: float = 0.0, denominator: str = "squared", binary: bool = False,
         smooth_nr: float = 1e-6, smooth_dr: float = 1e-6) -> torch.Tensor:
    """One minus the soft dice score.

    Args:
        target: (B, L, *S) fixed label, values in [0, 1].
        pred: (B, L, *S) warped (or predicted) label, values in [0, 1].
        scales: Gaussian sigmas in voxels for multi-scale smoothing; None means [0] (no smoothing).
        background_weight: weight of the implicit background channel (module docstring).
        denominator: "squared" (sum t^2 + sum p^2, V-Net) or "linear" (sum t + sum p, DeepReg).
        binary: threshold both labels at 0.5 after smoothing (DeepReg's ``binary``; no gradient).
        smooth_nr: added to the numerator 2 sum t p (DeepReg: 1e-5).
        smooth_dr: added to the denominator (DeepReg: 1e-5).

    Returns:
        scalar in [0, 1]: 0 for identical binary labels (and for two empty labels), about 1 for
        disjoint ones; for binary labels 1 - 2|A and B| / (|A| + |B|) per label with either
        denominator.
    """
    score = _overlap_score(_dice_score, denominator, binary, smooth_nr, smooth_dr)
    return 1 - _weighted_channel_mean(score, target, pred, scales, background_weight)


def jaccard(target: torch.Tensor, pred: torch.Tensor, scales: Sequence[float] | None = None,
            background_weight: float = 0.0, denominator: str = "squared", binary: bool = False,
            smooth_nr: float = 1e-6, smooth_dr: float = 1e-6) -> torch.Tensor:
    """One minus the soft jaccard (intersection over union) score.

    Takes the arguments of :func:`dice`, with the jaccard score ``(sum t p + smooth_nr) /
    (D - sum t p + smooth_dr)`` in place of the dice score (D: the chosen denominator).

    Returns:
        scalar in [0, 1]: 0 for identical binary labels (and for two empty labels); for binary
        labels 1 - |A and B| / |A or B| per label.
    """
    score = _overlap_score(_jaccard_score, denominator, binary, smooth_nr, smooth_dr)
    return 1 - _weighted_channel_mean(score, target, pred, scales, background_weight)


def label_ssd(target: torch.Tensor, pred: torch.Tensor, scales: Sequence[float] | None = None,
              background_weight: float = 0.0) -> torch.Tensor:
    """Mean squared difference between labels (DeepReg's label ``ssd``), with multi-scale smoothing.

    Args:
        target: (B, L, *S) fixed label, values in [0, 1].
        pred: (B, L, *S) warped (or predicted) label, values in [0, 1].
        scales: Gaussian sigmas in voxels for multi-scale smoothing; None means [0].
        background_weight: weight of the implicit background channel (module docstring).

    Returns:
        scalar in [0, 1]: mean over voxels of (t - p)^2, averaged over scales, labels and batch;
        for binary labels the fraction of voxels where they disagree.
    """
    return _weighted_channel_mean(_squared_difference, target, pred, scales, background_weight)


def cross_entropy(target: torch.Tensor, pred: torch.Tensor, scales: Sequence[float] | None = None,
                  background_weight: float = 0.0) -> torch.Tensor:
    """Mean binary cross-entropy of the predicted label probabilities.

    Args:
        target: (B, L, *S) fixed label, values in [0, 1].
        pred: (B, L, *S) warped (or predicted) label probabilities in [0, 1].
        scales: Gaussian sigmas in voxels for multi-scale smoothing; None means [0].
        background_weight: weight of the implicit background channel (module docstring).

    Returns:
        scalar >= 0 in nats per voxel: -mean(t log p + (1 - t) log(1 - p)), p clamped to
        [1e-7, 1 - 1e-7]; about 1e-7 for identical binary labels.
    """
    return _weighted_channel_mean(_binary_cross_entropy, target, pred, scales, background_weight)
