"""Tests for regflow.metrics: closed-form Dice/HD95/TRE values and Jacobian-based regularity."""

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from regflow import metrics


def cube(shape, start, side):
    mask = np.zeros(shape, dtype=np.uint8)
    mask[tuple(slice(s, s + side) for s in start)] = 1
    return mask


def test_dice_identical_disjoint_and_known_overlap():
    shape = (12, 12, 12)
    a, b = cube(shape, (2, 2, 2), 6), cube(shape, (4, 4, 4), 6)  # overlap 4^3 of 6^3 each
    far = cube(shape, (9, 9, 9), 3)
    labels = np.stack([a, a, a])
    warped = np.stack([a, b, far])
    np.testing.assert_allclose(metrics.dice(labels, warped), [1.0, 2 * 64 / (2 * 216), 0.0])
    # torch tensors in, soft (linearly warped) labels thresholded at 0.5
    soft = torch.from_numpy(np.stack([a * 0.6, b * 0.4])).float()
    np.testing.assert_allclose(metrics.dice(torch.from_numpy(np.stack([a, a])), soft), [1.0, 0.0])


def test_dice_of_integer_maps_and_empty_labels():
    fixed = np.zeros((10, 10), dtype=np.int64)
    warped = np.zeros((10, 10), dtype=np.int64)
    fixed[1:5, 1:5], warped[1:5, 3:7] = 1, 1  # 16 each, overlap 8
    fixed[6:9, 6:9] = 2  # label 2 only in fixed; label 3 in neither
    result = metrics.dice(fixed, warped, labels=[1, 2, 3])
    np.testing.assert_allclose(result, [0.5, 0.0, 1.0])


def test_hd95_of_shifted_cubes_is_the_shift_in_mm():
    shape = (24, 24, 24)
    for shift, spacing in [(1, 1.0), (2, 1.5), (3, 0.8)]:
        a = cube(shape, (4, 6, 6), 12)
        b = cube(shape, (4 + shift, 6, 6), 12)
        assert metrics.hd95(a, b, spacing) == pytest.approx(shift * spacing)
        assert metrics.hd95(b, a, (spacing,) * 3) == pytest.approx(shift * spacing)
    assert metrics.hd95(a, a, 2.0) == 0.0


def test_hd95_uses_per_axis_spacing_and_empty_is_nan():
    a = cube((20, 20), (4, 4), 10)
    b = cube((20, 20), (6, 4), 10)  # shifted by 2 voxels along axis 0
    assert metrics.hd95(a, b, spacing=(2.0, 0.5)) == pytest.approx(4.0)
    assert metrics.hd95(torch.from_numpy(a), torch.from_numpy(b), spacing=(0.5, 2.0)) \
        == pytest.approx(1.0)
    assert math.isnan(metrics.hd95(a, np.zeros_like(a)))
    assert math.isnan(metrics.hd95(np.zeros_like(a), np.zeros_like(a)))


def test_label_centroids():
    labels = np.stack([cube((10, 10, 10), (2, 3, 4), 4), np.zeros((10, 10, 10))])
    centroids = metrics.label_centroids(labels)
    np.testing.assert_allclose(centroids[0], [3.5, 4.5, 5.5])
    assert np.isnan(centroids[1]).all()


def test_folding_fraction_of_identity_and_of_a_folding_bump():
    shape = (30, 6, 6)
    assert metrics.folding_fraction(np.zeros((3, *shape))) == 0.0
    # Displacement along axis 0 only: det J = 1 + d(bump)/dx0, negative where the bump falls fast.
    x = np.arange(shape[0])
    bump = 6.0 * np.exp(-((x - 15.0) ** 2) / (2 * 2.0**2))
    ddf = np.zeros((1, 3, *shape))
    ddf[0, 0] = bump[:, None, None]
    expected = np.mean(1 + np.gradient(bump) <= 0)
    assert 0 < expected < 0.5
    assert metrics.folding_fraction(ddf) == pytest.approx(expected)
    assert metrics.folding_fraction(torch.from_numpy(ddf).float()) == pytest.approx(expected)


def test_sdlogj_of_identity_is_zero_and_follows_learn2reg():
    assert metrics.sdlogj(np.zeros((3, 8, 9, 10))) == 0.0
    rng = np.random.default_rng(0)
    ddf = np.stack([ndimage.gaussian_filter(c, 1.5) for c in rng.standard_normal((3, 12, 12, 12))])
    ddf *= 3.0 / np.abs(ddf).max()
    grads = [[np.gradient(ddf[i], axis=j) + (i == j) for j in range(3)] for i in range(3)]
    det = np.linalg.det(np.moveaxis(np.array(grads), (0, 1), (-2, -1)))
    expected = np.log(np.clip(det + 3, 1e-9, 1e9)).std()
    assert expected > 0.01
    assert metrics.sdlogj(ddf) == pytest.approx(expected, rel=1e-9)


def test_ddf_shape_is_checked():
    with pytest.raises(ValueError, match="ndim"):
        metrics.folding_fraction(np.zeros((2, 3, 8, 8, 8)))
