"""Instance optimisation: fit a displacement field to one pair at test time, without labels.

Started from a network's DDF, it is test-time refinement; started from zero (after an affine
stage), it is classical optimisation-based registration (DeepReg's two "classical" demos). The
loss is the training's image similarity plus its regulariser (:class:`SimilarityLoss`).

Non-rigid refinement is coarse to fine: ``levels`` stages, the first optimising a residual field
at ``1 / 2**(levels - 1)`` of the resolution (trilinearly upsampled), each later stage doubling the
resolution and starting from the field so far. A coarse residual moves whole structures in few
steps and cannot fold at the voxel scale; the finest stage adds detail.

Optionally the starting field is first smoothed with a Gaussian (``smooth_sigma`` voxels): a
network whose field comes from its full-resolution level carries voxel-scale roughness that
refinement's regulariser does not remove when it acts only on the residual.

The regulariser acts on the whole field (``regularize: field``: refinement also smooths the
network's field) or only on what refinement adds to it (``residual``: the starting field is kept
where the images give no reason to move it).

How hard the regulariser pulls is either ``regularization_scale`` (a multiple of the training's
regulariser weights, so it follows whatever balance training or tuning chose) or, when set,
``regularization_ratio``: the regulariser weights' sum as a multiple of the image terms' summed
weight, the same whatever the training's weights (Adam is blind to the objective's overall
scale, so only this ratio matters).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from regflow import spatial
from regflow.config import LossConfig, RefineConfig
from regflow.losses import CompositeLoss
from regflow.losses.filters import gaussian_smoothing_kernel, separable_filter, window_weight


def regularization_multiplier(settings: RefineConfig, loss_config: LossConfig) -> float:
    """What the training's regulariser weights are multiplied by during optimisation.

    ``settings.regularization_scale``; with ``settings.regularization_ratio``, the factor that
    makes the regulariser weights sum to that ratio times the image terms' summed weight (0 when
    the training has no regulariser).
    """
    if settings.regularization_ratio is None:
        return settings.regularization_scale
    image = sum(term.weight for term in loss_config.image.values())
    regularization = sum(term.weight for term in loss_config.regularization.values())
    return settings.regularization_ratio * image / regularization if regularization > 0 else 0.0


class SimilarityLoss:
    """The label-free part of a training loss: image terms plus regularisation terms.

    Args:
        loss_config: ``train.loss``; its label terms are dropped (no labels at test time).
        regularization_scale: multiplies every regulariser weight.

    Raises:
        ConfigError: no image term with a non-zero weight (nothing to optimise).
    """

    def __init__(self, loss_config: LossConfig, regularization_scale: float = 1.0) -> None:
        regularization = {name: term.model_copy(update={
            "weight": term.weight * regularization_scale})
            for name, term in loss_config.regularization.items()}
        self.image = CompositeLoss(LossConfig(image=loss_config.image))
        self.regularization = (CompositeLoss(LossConfig(regularization=regularization))
                               if any(term.weight > 0 for term in regularization.values())
                               else None)

    def __call__(self, fixed: torch.Tensor, warped: torch.Tensor, ddf: torch.Tensor
                 ) -> torch.Tensor:
        """Scalar loss of (B, 1, *S) images and a (B, ndim, *S) DDF."""
        total, _ = self.image(fixed, warped)
        if self.regularization is not None:
            total = total + self.regularization(None, None, ddf=ddf)[0]
        return total


def _upsample(field: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Resample a (B, ndim, *s) field of full-resolution voxels onto the ``shape`` grid."""
    if tuple(field.shape[2:]) == shape:
        return field
    mode = "trilinear" if len(shape) == 3 else "bilinear"
    return F.interpolate(field, size=shape, mode=mode, align_corners=True)


def smooth_field(field: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian smoothing of a (B, ndim, *S) field, ``sigma`` in voxels (0: the field itself).

    The window is cropped at the border and renormalised there, so a constant field is unchanged
    and the border is not pulled towards zero.
    """
    if sigma <= 0:
        return field
    kernel = gaussian_smoothing_kernel(sigma)
    weight = window_weight(kernel, tuple(field.shape[2:])).to(field.device, field.dtype)
    return separable_filter(field, kernel) / weight


def refine_ddf(fixed: torch.Tensor, moving: torch.Tensor, ddf: torch.Tensor,
               loss: SimilarityLoss, settings: RefineConfig) -> torch.Tensor:
    """Optimise ``ddf`` for one batch of pairs, coarse to fine.

    Args:
        fixed: (B, 1, *S) fixed image.
        moving: (B, 1, *S) moving image on the fixed grid.
        ddf: (B, ndim, *S) starting displacement in voxels (a network's, or zeros).
        loss: the label-free objective.
        settings: steps, learning rate, levels, regulariser scale and what it acts on, smoothing
            of the starting field.

    Returns:
        (B, ndim, *S) refined DDF (detached); ``ddf`` itself when ``settings.steps`` is 0.
    """
    if settings.steps <= 0:
        return ddf
    shape = tuple(ddf.shape[2:])
    current = smooth_field(ddf.detach(), settings.smooth_sigma)
    start = current if settings.regularize == "residual" else None
    levels = max(1, settings.levels)
    for level, steps in enumerate(_split(settings.steps, levels)):
        factor = 2 ** (levels - 1 - level)
        coarse = tuple(max(2, size // factor) for size in shape)
        residual = torch.zeros(ddf.shape[0], ddf.shape[1], *coarse, device=ddf.device,
                               dtype=torch.float32, requires_grad=True)
        optimizer = torch.optim.Adam([residual], lr=settings.lr)
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            candidate = current + _upsample(residual, shape)
            regularized = candidate if start is None else candidate - start
            objective = loss(fixed, spatial.warp(moving, candidate), regularized)
            objective.backward()
            optimizer.step()
        current = (current + _upsample(residual, shape)).detach()
    return current


def _split(total: int, parts: int) -> list[int]:
    """``total`` steps over ``parts`` stages, the remainder going to the finest."""
    share = [total // parts] * parts
    share[-1] += total - sum(share)
    return share


def affine_register(fixed: torch.Tensor, moving: torch.Tensor, loss: SimilarityLoss,
                    settings: RefineConfig) -> torch.Tensor:
    """Classical affine stage: the 12 (2-D: 6) parameters about the volume centre.

    Args:
        fixed: (B, 1, *S) fixed image.
        moving: (B, 1, *S) moving image on the fixed grid.
        loss: its image terms are the objective (an affine map needs no regulariser).
        settings: ``affine_steps`` and ``affine_lr``.

    Returns:
        (B, ndim, *S) DDF of the optimised affine map (zeros when ``affine_steps`` is 0).
    """
    batch, ndim, shape = fixed.shape[0], fixed.ndim - 2, tuple(fixed.shape[2:])
    eye = torch.eye(ndim, ndim + 1, device=fixed.device, dtype=torch.float32)
    # the translation column is optimised in units of 10 voxels so one lr suits both parts
    units = torch.ones(ndim, ndim + 1, device=fixed.device)
    units[:, ndim] = 10.0
    delta = torch.zeros(batch, ndim, ndim + 1, device=fixed.device, requires_grad=True)
    optimizer = torch.optim.Adam([delta], lr=settings.affine_lr)
    for _ in range(settings.affine_steps):
        optimizer.zero_grad(set_to_none=True)
        ddf = spatial.affine_to_ddf(eye + delta * units, shape)
        objective, _ = loss.image(fixed, spatial.warp(moving, ddf))
        objective.backward()
        optimizer.step()
    return spatial.affine_to_ddf(eye + delta.detach() * units, shape)
