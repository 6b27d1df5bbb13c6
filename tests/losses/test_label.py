"""Tests for regflow.losses.label: overlap closed forms, multi-scale, background, NaN safety."""

import math

import pytest
import torch

from regflow.losses.label import cross_entropy, dice, jaccard

LOSSES = [dice, jaccard, cross_entropy]


def box(shape, start, stop, dtype=torch.float64):
    """A (1, 1, *shape) binary label that is 1 on the box [start, stop)."""
    label = torch.zeros(1, 1, *shape, dtype=dtype)
    label[(0, 0) + tuple(slice(a, b) for a, b in zip(start, stop, strict=True))] = 1
    return label


@pytest.mark.parametrize("shape", [(10, 11, 12), (12, 13)])
def test_identical_and_disjoint_labels(shape):
    ndim = len(shape)
    first = box(shape, (1,) * ndim, (5,) * ndim)
    second = box(shape, (6,) * ndim, (9,) * ndim)
    for loss in (dice, jaccard):
        assert loss(first, first).item() == pytest.approx(0.0, abs=1e-12)
        assert loss(first, second).item() == pytest.approx(1.0, abs=1e-6)
    assert cross_entropy(first, first).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("shape", [(10, 11, 12), (12, 13)])
def test_partial_overlap_closed_forms(shape):
    ndim = len(shape)
    target = box(shape, (1,) * ndim, (6,) * ndim)  # 5^n voxels
    pred = box(shape, (3,) * ndim, (9,) * ndim)  # 6^n voxels, overlap 3^n
    a, b, both = 5**ndim, 6**ndim, 3**ndim
    assert dice(target, pred).item() == pytest.approx(1 - 2 * both / (a + b), abs=1e-7)
    assert jaccard(target, pred).item() == pytest.approx(1 - both / (a + b - both), abs=1e-7)


def test_multiple_labels_are_averaged():
    shape = (10, 11, 12)
    target = torch.cat([box(shape, (0, 0, 0), (4, 4, 4)), box(shape, (5, 5, 5), (9, 9, 9))], 1)
    pred = torch.cat([box(shape, (0, 0, 0), (4, 4, 2)), box(shape, (5, 5, 5), (9, 9, 9))], 1)
    # label 1: |A| 64, |B| 32, overlap 32 -> dice 2/3; label 2 identical -> dice 1
    assert dice(target, pred).item() == pytest.approx(1 - (2 / 3 + 1) / 2, abs=1e-7)
    batch = dice(torch.cat([target, target]), torch.cat([pred, target]))
    assert batch.item() == pytest.approx((1 - (2 / 3 + 1) / 2) / 2, abs=1e-7)


def test_cross_entropy_closed_form():
    target = box((4, 5, 6), (0, 0, 0), (2, 5, 6))  # half the voxels
    pred = torch.full_like(target, 0.8)
    expected = -(0.5 * math.log(0.8) + 0.5 * math.log(0.2))
    assert cross_entropy(target, pred).item() == pytest.approx(expected, rel=1e-9)


def test_background_weight_adds_the_complement():
    shape = (8, 9, 10)
    target = box(shape, (1, 1, 1), (6, 6, 6))
    pred = box(shape, (3, 3, 3), (8, 8, 8))
    total, a, b, both = 8 * 9 * 10, 125, 125, 27
    foreground = 2 * both / (a + b)
    background = 2 * (total - (a + b - both)) / ((total - a) + (total - b))
    weighted = dice(target, pred, background_weight=0.5).item()
    assert weighted == pytest.approx(1 - (foreground + 0.5 * background) / 1.5, abs=1e-7)
    assert dice(target, pred, background_weight=0.0).item() == pytest.approx(1 - foreground)
    with pytest.raises(ValueError, match="background_weight"):
        dice(target, pred, background_weight=-1)


@pytest.mark.parametrize("loss", LOSSES)
def test_multi_scale_averages_the_scales(loss):
    shape = (12, 12, 12)
    target = box(shape, (2, 2, 2), (7, 7, 7))
    pred = 0.9 * box(shape, (4, 3, 2), (9, 8, 7))
    plain = loss(target, pred).item()
    assert loss(target, pred, scales=[0]).item() == pytest.approx(plain, abs=1e-12)
    smoothed = loss(target, pred, scales=[2]).item()
    assert smoothed != pytest.approx(plain, abs=1e-3)
    assert loss(target, pred, scales=[0, 2]).item() == pytest.approx((plain + smoothed) / 2)


def test_smoothing_softens_a_small_shift():
    shape = (16, 16, 16)
    target = box(shape, (4, 4, 4), (10, 10, 10))
    pred = box(shape, (6, 4, 4), (12, 10, 10))
    assert dice(target, pred, scales=[4]).item() < 0.5 * dice(target, pred).item()


@pytest.mark.parametrize("loss", [dice, jaccard])
def test_identical_soft_labels_score_perfectly(loss):
    label = box((8, 9, 10), (2, 2, 2), (6, 7, 8))
    assert loss(label, label, scales=[0, 1, 2], background_weight=0.3).item() == pytest.approx(
        0.0, abs=1e-12)
    assert loss(label, label.roll(2, dims=-1), scales=[0, 1, 2]).item() > 0.1


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("shape", [(1, 2, 6, 6, 6), (2, 1, 7, 6)])
def test_empty_labels_give_finite_values_and_gradients(loss, shape):
    target = torch.zeros(shape, requires_grad=True)
    pred = torch.zeros(shape, requires_grad=True)
    assert loss(target, pred).item() == pytest.approx(0.0, abs=1e-6)
    value = loss(target, pred, scales=[0, 1], background_weight=0.2)
    value.backward()
    assert torch.isfinite(value)
    assert torch.isfinite(target.grad).all() and torch.isfinite(pred.grad).all()


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("shape", [(1, 2, 6, 7, 5), (1, 2, 7, 6)])
def test_gradcheck(loss, shape):
    generator = torch.Generator().manual_seed(0)
    # probabilities in (0.05, 0.45): two channels sum below 1, away from the background's clamp
    target = 0.05 + 0.4 * torch.rand(shape, generator=generator, dtype=torch.float64)
    pred = 0.05 + 0.4 * torch.rand(shape, generator=generator, dtype=torch.float64)
    target.requires_grad_(True)
    pred.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda t, p: loss(t, p, scales=[0, 1], background_weight=0.5), (target, pred),
        fast_mode=True)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shapes differ"):
        dice(torch.zeros(1, 2, 4, 4, 4), torch.zeros(1, 1, 4, 4, 4))
