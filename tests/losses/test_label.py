"""Tests for regflow.losses.label: overlap closed forms, multi-scale, background, NaN safety."""

import math

import numpy as np
import pytest
import torch

from regflow.losses.filters import cauchy_smoothing_kernel
from regflow.losses.label import cross_entropy, dice, jaccard, label_ssd

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


# DeepReg-compatible options: NumPy re-implementations of deepreg/loss/label.py, which scores one
# label at a time over the flattened volume, smoothing with a normalised Gaussian truncated at
# int(3 sigma) (zero padding) and EPS = 1e-5.


def deepreg_window(sigma, kind="gaussian"):
    """gaussian_kernel1d_sigma / cauchy_kernel1d: tails int(3 sigma) / int(5 sigma), sum 1."""
    tail = int((3 if kind == "gaussian" else 5) * sigma)
    offsets = np.arange(-tail, tail + 1)
    kernel = (np.exp(-0.5 * offsets**2 / sigma**2) if kind == "gaussian"
              else 1 / ((offsets / sigma) ** 2 + 1))
    return kernel / kernel.sum()


def deepreg_smooth(volume, sigma, kind="gaussian"):
    """DeepReg's multi-scale smoothing (``kind``: gaussian or cauchy) of a (D, H, W) volume."""
    if sigma == 0:
        return volume
    kernel = deepreg_window(sigma, kind)
    tail = len(kernel) // 2
    for axis in range(3):  # "SAME" zero padding, correlation (the kernel is symmetric)
        padding = [(0, 0)] * 3
        padding[axis] = (tail, tail)
        padded = np.pad(volume, padding)
        size = volume.shape[axis]
        volume = sum(weight * padded.take(range(offset, offset + size), axis=axis)
                     for offset, weight in enumerate(kernel))
    return volume


def deepreg_label_loss(score, target, pred, scales, kind="gaussian"):
    """Mean over labels of the mean over scales of ``score`` on the smoothed labels."""
    return np.mean([np.mean([score(deepreg_smooth(t, s, kind), deepreg_smooth(p, s, kind))
                             for s in scales])
                    for t, p in zip(target[0], pred[0], strict=True)])


def deepreg_dice_score(target, pred, binary=False, background_weight=0.0, jaccard_form=False):
    """DiceScore (or JaccardIndex) of the latest DeepReg, generalised when background_weight w
    > 0 over the N voxels: 2 (sum tp - w sum(t + p) + w N) / ((1 - 2w) sum(t + p) + 2w N)."""
    if binary:
        target, pred = (target >= 0.5) * 1.0, (pred >= 0.5) * 1.0
    w, prod, total, voxels = background_weight, (target * pred).sum(), (target + pred).sum(), \
        target.size
    if jaccard_form:
        num, den = prod - w * total + w * voxels, (1 - w) * total - prod + w * voxels
    else:
        num, den = 2 * (prod - w * total + w * voxels), (1 - 2 * w) * total + 2 * w * voxels
    return (num + 1e-5) / (den + 1e-5)


def deepreg_cross_entropy(target, pred, binary=False, background_weight=0.0, smooth=1e-5):
    """CrossEntropy of the latest DeepReg: (1 - w) foreground + w background term (w > 0)."""
    if binary:
        target, pred = (target >= 0.5) * 1.0, (pred >= 0.5) * 1.0
    foreground = -(target * np.log(pred + smooth)).mean()
    if background_weight == 0:
        return foreground
    background = -((1 - target) * np.log(1 - pred + smooth)).mean()
    return (1 - background_weight) * foreground + background_weight * background


def soft_labels(seed):
    """Two random soft (1, 2, 5, 6, 4) labels in [0, 1]."""
    rng = np.random.default_rng(seed)
    return rng.uniform(size=(1, 2, 5, 6, 4)), rng.uniform(size=(1, 2, 5, 6, 4))


DEEPREG_DICE = {"denominator": "linear", "smooth_nr": 1e-5, "smooth_dr": 1e-5}


def test_linear_dice_matches_deepreg_formula_over_scales():
    target, pred = soft_labels(21)
    expected = 1 - deepreg_label_loss(deepreg_dice_score, target, pred, [0, 1, 2])
    assert expected == pytest.approx(0.67113907, rel=1e-6)
    value = dice(torch.from_numpy(target), torch.from_numpy(pred), scales=[0, 1, 2],
                 **DEEPREG_DICE)
    assert value.item() == pytest.approx(expected, rel=1e-6)  # regflow's kernels are float32


def test_binary_dice_matches_deepreg_formula():
    target, pred = soft_labels(22)
    expected = 1 - deepreg_label_loss(lambda t, p: deepreg_dice_score(t, p, binary=True),
                                      target, pred, [0])
    assert expected == pytest.approx(0.51961661, rel=1e-6)
    value = dice(torch.from_numpy(target), torch.from_numpy(pred), binary=True, **DEEPREG_DICE)
    assert value.item() == pytest.approx(expected, rel=1e-9)


def test_linear_jaccard_matches_deepreg_formula():
    target, pred = soft_labels(23)

    def score(t, p):
        overlap = (t * p).sum()
        return (overlap + 1e-5) / (t.sum() + p.sum() - overlap + 1e-5)

    expected = 1 - deepreg_label_loss(score, target, pred, [0])
    assert expected == pytest.approx(0.64786949, rel=1e-6)
    value = jaccard(torch.from_numpy(target), torch.from_numpy(pred), **DEEPREG_DICE)
    assert value.item() == pytest.approx(expected, rel=1e-9)


def test_label_ssd_matches_deepreg_formula_over_scales():
    target, pred = soft_labels(24)
    expected = deepreg_label_loss(lambda t, p: ((t - p) ** 2).mean(), target, pred, [0, 1])
    assert expected == pytest.approx(0.07424994, rel=1e-6)
    value = label_ssd(torch.from_numpy(target), torch.from_numpy(pred), scales=[0, 1])
    assert value.item() == pytest.approx(expected, rel=1e-6)


def test_squared_and_linear_dice_agree_on_binary_labels_and_differ_on_soft_ones():
    first, second = box((6, 6), (1, 1), (4, 4)), box((6, 6), (2, 2), (5, 5))
    # |A| = |B| = 9, |A and B| = 4: 1 - 8 / 18
    for denominator in ("squared", "linear"):
        assert dice(first, second, denominator=denominator).item() == pytest.approx(10 / 18)
    soft = torch.full((1, 1, 4, 4), 0.5, dtype=torch.float64)
    assert dice(soft, soft).item() == pytest.approx(0.0, abs=1e-6)
    assert dice(soft, soft, denominator="linear").item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="denominator"):
        dice(soft, soft, denominator="cubic")




@pytest.mark.parametrize("weight", [0.0, 0.2, 0.5])
@pytest.mark.parametrize("binary", [False, True])
@pytest.mark.parametrize("form", ["dice", "jaccard"])
def test_generalised_background_weight_is_deepregs(weight, binary, form):
    target, pred = soft_labels(24)
    expected = 1 - deepreg_label_loss(
        lambda t, p: deepreg_dice_score(t, p, binary, weight, jaccard_form=form == "jaccard"),
        target, pred, [0])
    loss = dice if form == "dice" else jaccard
    value = loss(torch.from_numpy(target), torch.from_numpy(pred), binary=binary,
                 background_weight=weight, background_mode="generalised", **DEEPREG_DICE)
    assert value.item() == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize(("weight", "binary", "smooth"), [
    (0.0, False, 1e-5), (0.3, False, 1e-5), (0.0, True, 1e-5), (0.6, True, 1e-3)])
def test_deepregs_cross_entropy_foreground_binary_and_smooth(weight, binary, smooth):
    target, pred = soft_labels(25)
    expected = deepreg_label_loss(
        lambda t, p: deepreg_cross_entropy(t, p, binary, weight, smooth), target, pred, [0, 1])
    value = cross_entropy(torch.from_numpy(target), torch.from_numpy(pred), scales=[0, 1],
                          binary=binary, smooth=smooth, background_weight=weight,
                          background_mode="generalised")
    assert value.item() == pytest.approx(expected, rel=1e-6)


def test_generalised_cross_entropy_without_background_weight_is_foreground_only():
    """DeepReg's default: a prediction of 1 everywhere costs only -log(1 + smooth) per voxel."""
    target = box((6, 6, 6), (1, 1, 1), (4, 4, 4))
    value = cross_entropy(target, torch.ones_like(target), smooth=1e-5,
                          background_mode="generalised")
    assert value.item() == pytest.approx(-math.log(1 + 1e-5) * target.mean().item())
    assert cross_entropy(target, torch.ones_like(target)).item() > 1  # regflow's: both terms


@pytest.mark.parametrize("sigma", [1, 2, 4])
def test_cauchy_window_is_deepregs(sigma):
    np.testing.assert_allclose(cauchy_smoothing_kernel(sigma).numpy(),
                               deepreg_window(sigma, "cauchy"), rtol=1e-6)


def test_multi_scale_dice_with_the_cauchy_kernel_is_deepregs():
    target, pred = soft_labels(26)
    expected = 1 - deepreg_label_loss(deepreg_dice_score, target, pred, [0, 1, 2], "cauchy")
    value = dice(torch.from_numpy(target), torch.from_numpy(pred), scales=[0, 1, 2],
                 kernel="cauchy", **DEEPREG_DICE)
    assert value.item() == pytest.approx(expected, rel=1e-6)
    gaussian = dice(torch.from_numpy(target), torch.from_numpy(pred), scales=[0, 1, 2],
                    **DEEPREG_DICE)
    assert abs(value.item() - gaussian.item()) > 1e-4  # another window, another value
