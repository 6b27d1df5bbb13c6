"""Label losses: soft dice, soft jaccard, binary cross-entropy, ssd, with multi-scale smoothing.

Labels are (B, L, *S) binary or probabilistic, one channel per foreground label, 2 or 3 spatial
axes. Every function returns a scalar to minimise, called as ``loss(target, pred)``.

Multi-scale: with ``scales=[s1, s2, ...]`` both labels are smoothed by a Gaussian of sigma s voxels
(separable, zero padding; s = 0 is no smoothing), the per-label value is computed at every scale and
the scales are averaged. This widens the capture range of a label loss (DeepReg's multi-scale dice).
``kernel="cauchy"`` smooths with DeepReg's Cauchy window of scale s instead.

Soft scores use squared sums in the denominator by default (the V-Net form): for binary labels they
equal the set formulas, and identical soft labels (smoothed ones included) still score exactly 1.
``denominator="linear"`` sums the labels themselves, as DeepReg does; identical soft labels then
score below 1.

Background: labels carry no background channel. ``background_weight`` > 0 adds, with the default
``background_mode="channel"``, the implicit background ``clamp(1 - sum over foreground channels,
0, 1)`` as an extra channel; the result is the weighted mean over channels with weight 1 for every
foreground label and ``background_weight`` for the background. With the default 0 only foreground
labels count. ``background_mode="generalised"`` is DeepReg's (after Sudre et al. 2017): within each
label the voxel sums of ``t, p`` get weight ``1 - w`` and those of their complements ``1 - t,
1 - p`` weight ``w = background_weight``; for Dice with linear sums that is DeepReg's
``2 (sum tp - w sum(t + p) + w N) / ((1 - 2w) sum(t + p) + 2 w N)``, N voxels, and its
cross-entropy ``-(1 - w) mean(t log p) - w mean((1 - t) log(1 - p))``, foreground only at w = 0.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch

from regflow.losses.filters import SMOOTHING_KERNELS, separable_filter
from regflow.losses.image import check_pair

ChannelScore = Callable[[torch.Tensor, torch.Tensor, tuple[int, ...]], torch.Tensor]


def _with_background(labels: torch.Tensor) -> torch.Tensor:
    """(B, L, *S) -> (B, L + 1, *S): the foreground channels, then the implicit background."""
    background = (1 - labels.sum(dim=1, keepdim=True)).clamp(0, 1)
    return torch.cat([labels, background], dim=1)


BACKGROUND_MODES = ("channel", "generalised")


def _background_channel_weight(background_weight: float, background_mode: str) -> float:
    """The weight of the implicit background channel: ``background_weight`` in "channel" mode,
    0 in "generalised" mode (there the score weighs the complements itself)."""
    if background_mode not in BACKGROUND_MODES:
        raise ValueError(f"background_mode {background_mode!r}: expected one of "
                         f"{BACKGROUND_MODES}")
    if background_mode == "generalised" and not 0 <= background_weight <= 1:
        raise ValueError(f"background_weight {background_weight}: must lie in [0, 1] for "
                         "background_mode generalised")
    return background_weight if background_mode == "channel" else 0.0


def _weighted_channel_mean(score: ChannelScore, target: torch.Tensor, pred: torch.Tensor,
                           scales: Sequence[float] | None, background_weight: float,
                           kernel: str = "gaussian") -> torch.Tensor:
    """Average a per-channel score over scales (``kernel`` smoothing), then over channels
    (weighted, with the implicit background channel at ``background_weight``) and batch."""
    spatial_dims = check_pair(target, pred)
    if background_weight < 0:
        raise ValueError(f"background_weight {background_weight}: must be >= 0")
    if kernel not in SMOOTHING_KERNELS:
        raise ValueError(f"kernel {kernel!r}: expected one of {sorted(SMOOTHING_KERNELS)}")
    weights = torch.ones(target.shape[1], dtype=target.dtype, device=target.device)
    if background_weight > 0:
        target, pred = _with_background(target), _with_background(pred)
        weights = torch.cat([weights, weights.new_tensor([background_weight])])
    per_scale = []
    for sigma in scales or [0.0]:
        kernel_taps = SMOOTHING_KERNELS[kernel](sigma)
        if kernel_taps.numel() > 1:
            target_scaled = separable_filter(target, kernel_taps)
            pred_scaled = separable_filter(pred, kernel_taps)
        else:
            target_scaled, pred_scaled = target, pred
        per_scale.append(score(target_scaled, pred_scaled, spatial_dims))  # (B, L')
    channel_score = torch.stack(per_scale).mean(dim=0)  # (B, L')
    return ((channel_score * weights).sum(dim=1) / weights.sum()).mean()


DENOMINATORS = ("squared", "linear")
CLAMP_EPS = 1e-7


def _threshold(target: torch.Tensor, pred: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both labels thresholded at 0.5 (DeepReg's ``binary``; no gradient flows through it)."""
    return (target >= 0.5).to(target.dtype), (pred >= 0.5).to(pred.dtype)


def _sums(target: torch.Tensor, pred: torch.Tensor, spatial_dims: tuple[int, ...],
          denominator: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (B, L): sum t p, and sum t^2 + sum p^2 ("squared") or sum t + sum p ("linear")."""
    overlap = (target * pred).sum(dim=spatial_dims)
    if denominator == "squared":
        target, pred = target.square(), pred.square()
    return overlap, target.sum(dim=spatial_dims) + pred.sum(dim=spatial_dims)


def _overlap_and_total(target: torch.Tensor, pred: torch.Tensor, spatial_dims: tuple[int, ...],
                       denominator: str, binary: bool, generalised_weight: float
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (B, L) overlap and total (:func:`_sums`); with ``generalised_weight`` w > 0 the sums
    of the foreground weighted 1 - w plus those of the complements ``1 - t``, ``1 - p`` weighted
    w. With ``binary`` both labels are first thresholded at 0.5."""
    if binary:
        target, pred = _threshold(target, pred)
    overlap, total = _sums(target, pred, spatial_dims, denominator)
    if generalised_weight > 0:
        overlap_bg, total_bg = _sums(1 - target, 1 - pred, spatial_dims, denominator)
        overlap = (1 - generalised_weight) * overlap + generalised_weight * overlap_bg
        total = (1 - generalised_weight) * total + generalised_weight * total_bg
    return overlap, total


def _dice_score(target: torch.Tensor, pred: torch.Tensor, spatial_dims: tuple[int, ...],
                denominator: str, binary: bool, smooth_nr: float, smooth_dr: float,
                generalised_weight: float) -> torch.Tensor:
    """Soft dice (2 sum tp + smooth_nr) / (total + smooth_dr) per (B, L); empty pairs give 1."""
    overlap, total = _overlap_and_total(target, pred, spatial_dims, denominator, binary,
                                        generalised_weight)
    return (2 * overlap + smooth_nr) / (total + smooth_dr)


def _jaccard_score(target: torch.Tensor, pred: torch.Tensor, spatial_dims: tuple[int, ...],
                   denominator: str, binary: bool, smooth_nr: float, smooth_dr: float,
                   generalised_weight: float) -> torch.Tensor:
    """Soft jaccard (sum tp + smooth_nr) / (total - sum tp + smooth_dr) per (B, L)."""
    overlap, total = _overlap_and_total(target, pred, spatial_dims, denominator, binary,
                                        generalised_weight)
    return (overlap + smooth_nr) / (total - overlap + smooth_dr)


def _overlap_score(score: Callable[..., torch.Tensor], denominator: str, binary: bool,
                   smooth_nr: float, smooth_dr: float, generalised_weight: float
                   ) -> ChannelScore:
    """Bind the options of a dice/jaccard score after checking ``denominator``."""
    if denominator not in DENOMINATORS:
        raise ValueError(f"denominator {denominator!r}: expected one of {DENOMINATORS}")
    return functools.partial(score, denominator=denominator, binary=binary,
                             smooth_nr=smooth_nr, smooth_dr=smooth_dr,
                             generalised_weight=generalised_weight)


def _squared_difference(target: torch.Tensor, pred: torch.Tensor, spatial_dims: tuple[int, ...]
                        ) -> torch.Tensor:
    """Mean of (t - p)^2 per (B, L)."""
    return (target - pred).square().mean(dim=spatial_dims)


def _binary_cross_entropy(target: torch.Tensor, pred: torch.Tensor, spatial_dims: tuple[int, ...],
                          binary: bool, smooth: float | None, generalised_weight: float | None
                          ) -> torch.Tensor:
    """Mean cross-entropy per (B, L): ``foreground = -t log p`` and ``background =
    -(1 - t) log(1 - p)``, summed (``generalised_weight`` None) or weighted ``1 - w`` and ``w``.

    The logarithms take p clamped to [1e-7, 1 - 1e-7] (``smooth`` None) or ``p + smooth`` and
    ``1 - p + smooth`` (DeepReg); ``binary`` thresholds both labels at 0.5 first.
    """
    if binary:
        target, pred = _threshold(target, pred)
    if smooth is None:
        pred = pred.clamp(CLAMP_EPS, 1 - CLAMP_EPS)
        log_p, log_not_p = torch.log(pred), torch.log(1 - pred)
    else:
        log_p, log_not_p = torch.log(pred + smooth), torch.log(1 - pred + smooth)
    foreground = -(target * log_p).mean(dim=spatial_dims)
    background = -((1 - target) * log_not_p).mean(dim=spatial_dims)
    if generalised_weight is None:
        return foreground + background
    return (1 - generalised_weight) * foreground + generalised_weight * background


def dice(target: torch.Tensor, pred: torch.Tensor, scales: Sequence[float] | None = None,
         background_weight: float = 0.0, denominator: str = "squared", binary: bool = False,
         smooth_nr: float = 1e-6, smooth_dr: float = 1e-6, kernel: str = "gaussian",
         background_mode: str = "channel") -> torch.Tensor:
    """One minus the soft dice score.

    Args:
        target: (B, L, *S) fixed label, values in [0, 1].
        pred: (B, L, *S) warped (or predicted) label, values in [0, 1].
        scales: smoothing scales in voxels for multi-scale smoothing; None means [0] (none).
        background_weight: weight of the background (module docstring).
        denominator: "squared" (sum t^2 + sum p^2, V-Net) or "linear" (sum t + sum p, DeepReg).
        binary: threshold both labels at 0.5 after smoothing (DeepReg's ``binary``; no gradient).
        smooth_nr: added to the numerator 2 sum t p (DeepReg: 1e-5).
        smooth_dr: added to the denominator (DeepReg: 1e-5).
        kernel: multi-scale smoothing window, "gaussian" or "cauchy" (DeepReg's options).
        background_mode: "channel" (an implicit background channel) or "generalised" (DeepReg's
            weighting of each label's complement), see the module docstring.

    Returns:
        scalar in [0, 1]: 0 for identical binary labels (and for two empty labels), about 1 for
        disjoint ones; for binary labels 1 - 2|A and B| / (|A| + |B|) per label with either
        denominator.
    """
    channel_weight = _background_channel_weight(background_weight, background_mode)
    score = _overlap_score(_dice_score, denominator, binary, smooth_nr, smooth_dr,
                           background_weight - channel_weight)
    return 1 - _weighted_channel_mean(score, target, pred, scales, channel_weight, kernel)


def jaccard(target: torch.Tensor, pred: torch.Tensor, scales: Sequence[float] | None = None,
            background_weight: float = 0.0, denominator: str = "squared", binary: bool = False,
            smooth_nr: float = 1e-6, smooth_dr: float = 1e-6, kernel: str = "gaussian",
            background_mode: str = "channel") -> torch.Tensor:
    """One minus the soft jaccard (intersection over union) score.

    Takes the arguments of :func:`dice`, with the jaccard score ``(sum t p + smooth_nr) /
    (D - sum t p + smooth_dr)`` in place of the dice score (D: the chosen denominator).

    Returns:
        scalar in [0, 1]: 0 for identical binary labels (and for two empty labels); for binary
        labels 1 - |A and B| / |A or B| per label.
    """
    channel_weight = _background_channel_weight(background_weight, background_mode)
    score = _overlap_score(_jaccard_score, denominator, binary, smooth_nr, smooth_dr,
                           background_weight - channel_weight)
    return 1 - _weighted_channel_mean(score, target, pred, scales, channel_weight, kernel)


def label_ssd(target: torch.Tensor, pred: torch.Tensor, scales: Sequence[float] | None = None,
              background_weight: float = 0.0, kernel: str = "gaussian") -> torch.Tensor:
    """Mean squared difference between labels (DeepReg's label ``ssd``), with multi-scale smoothing.

    Args:
        target: (B, L, *S) fixed label, values in [0, 1].
        pred: (B, L, *S) warped (or predicted) label, values in [0, 1].
        scales: smoothing scales in voxels for multi-scale smoothing; None means [0].
        background_weight: weight of the implicit background channel (module docstring).
        kernel: multi-scale smoothing window, "gaussian" or "cauchy".

    Returns:
        scalar in [0, 1]: mean over voxels of (t - p)^2, averaged over scales, labels and batch;
        for binary labels the fraction of voxels where they disagree.
    """
    return _weighted_channel_mean(_squared_difference, target, pred, scales, background_weight,
                                  kernel)


def cross_entropy(target: torch.Tensor, pred: torch.Tensor, scales: Sequence[float] | None = None,
                  background_weight: float = 0.0, binary: bool = False,
                  smooth: float | None = None, kernel: str = "gaussian",
                  background_mode: str = "channel") -> torch.Tensor:
    """Mean binary cross-entropy of the predicted label probabilities.

    Args:
        target: (B, L, *S) fixed label, values in [0, 1].
        pred: (B, L, *S) warped (or predicted) label probabilities in [0, 1].
        scales: smoothing scales in voxels for multi-scale smoothing; None means [0].
        background_weight: weight of the background (module docstring).
        binary: threshold both labels at 0.5 after smoothing (DeepReg's ``binary``).
        smooth: None clamps p to [1e-7, 1 - 1e-7]; a number takes ``log(p + smooth)`` and
            ``log(1 - p + smooth)`` as DeepReg (its default 1e-5).
        kernel: multi-scale smoothing window, "gaussian" or "cauchy".
        background_mode: "channel": ``-mean(t log p + (1 - t) log(1 - p))`` per channel, plus the
            implicit background channel at ``background_weight``; "generalised": DeepReg's
            ``(1 - w)`` foreground plus ``w`` background term, foreground only at w = 0.

    Returns:
        scalar >= 0 in nats per voxel; about 1e-7 for identical binary labels by default.
    """
    channel_weight = _background_channel_weight(background_weight, background_mode)
    score = functools.partial(
        _binary_cross_entropy, binary=binary, smooth=smooth,
        generalised_weight=background_weight if background_mode == "generalised" else None)
    return _weighted_channel_mean(score, target, pred, scales, channel_weight, kernel)
