"""Symmetric training: both directions of every pair in one batch, and the inverse-consistency
penalty that ties the two fields together (Estienne et al.'s symmetric training for Learn2Reg
2020; the consistency term as in ICON and SYMNet)."""

from __future__ import annotations

from typing import Any

import torch

from regflow import spatial

# Batch keys of one side and their counterpart on the other side.
SWAPPED_KEYS = {"fixed_image": "moving_image", "moving_image": "fixed_image",
                "fixed_label": "moving_label", "moving_label": "fixed_label",
                "fixed_id": "moving_id", "moving_id": "fixed_id"}


def both_directions(batch: dict[str, Any]) -> dict[str, Any]:
    """The batch followed by the same pairs with fixed and moving swapped.

    Tensors of (B, ...) become (2B, ...): item ``b`` registers moving ``b`` to fixed ``b`` and
    item ``B + b`` registers fixed ``b`` to moving ``b``. Lists (case ids) are extended alike;
    other tensors (``label_index``, the fixed affine) are repeated, since both directions share
    them (the images of a processed dataset share one grid).

    Args:
        batch: a collated training batch (``fixed_image``, ``moving_image``, optional labels).

    Returns:
        The doubled batch.
    """
    doubled: dict[str, Any] = {}
    for key, value in batch.items():
        other = batch.get(SWAPPED_KEYS.get(key, key), value)
        if isinstance(value, torch.Tensor):
            doubled[key] = torch.cat([value, other])
        elif isinstance(value, list):
            doubled[key] = [*value, *other]
        else:
            doubled[key] = value
    return doubled


def inverse_consistency(forward: torch.Tensor, backward: torch.Tensor) -> torch.Tensor:
    """Mean squared round-trip displacement of two fields that should be each other's inverse.

    ``forward`` registers A to B (``warped_A[x] = A[x + forward[x]]``, x in B's space) and
    ``backward`` B to A. Following ``forward`` and then ``backward`` should come back to the
    start: ``forward(x) + backward(x + forward(x)) = 0`` for x in B's space, which is the
    composed field :func:`regflow.spatial.compose_ddfs` ``(backward, forward)``; and the same
    the other way round.

    Args:
        forward: (B, ndim, *S) DDF in voxels.
        backward: (B, ndim, *S) DDF in voxels, of the swapped pairs.

    Returns:
        Scalar in voxels^2: the mean over both round trips, voxels and batch of the squared
        length of the round-trip displacement (0 for exact inverses, e.g. opposite translations).
    """
    round_trips = torch.cat([spatial.compose_ddfs(backward, forward),
                             spatial.compose_ddfs(forward, backward)])
    return round_trips.pow(2).sum(dim=1).mean()
