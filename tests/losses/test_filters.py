"""Tests for regflow.losses.filters: separable windows and filtering."""

import pytest
import torch
import torch.nn.functional as F

from regflow.losses.filters import (
    gaussian_smoothing_kernel,
    separable_filter,
    window,
    window_weight,
)


@pytest.mark.parametrize("kind", ["rectangular", "triangular", "gaussian"])
def test_separable_filter_equals_full_convolution(kind):
    torch.manual_seed(0)
    volume = torch.randn(2, 3, 7, 8, 9, dtype=torch.float64)
    kernel = window(kind, 5).double()
    full = kernel[:, None, None] * kernel[None, :, None] * kernel[None, None, :]  # (5, 5, 5)
    expected = F.conv3d(volume.reshape(6, 1, 7, 8, 9), full[None, None], padding=2)
    assert torch.allclose(separable_filter(volume, kernel), expected.reshape(2, 3, 7, 8, 9))


def test_separable_filter_2d_and_kernel_longer_than_volume():
    torch.manual_seed(0)
    image = torch.randn(1, 1, 4, 5, dtype=torch.float64)
    kernel = gaussian_smoothing_kernel(3.0).double()  # 19 taps on a 4 x 5 image
    full = kernel[:, None] * kernel[None, :]
    expected = F.conv2d(image, full[None, None], padding=9)
    assert torch.allclose(separable_filter(image, kernel), expected)


def test_window_shapes():
    assert window("rectangular", 3).tolist() == [1.0, 1.0, 1.0]
    assert torch.allclose(window("triangular", 5), torch.tensor([1, 2, 3, 2, 1]) / 3.0)
    gaussian = window("gaussian", 9)
    assert gaussian[4] == 1.0
    assert gaussian[0] == pytest.approx(float(torch.exp(torch.tensor(-0.5 * (4 / 3) ** 2))))


def test_window_rejects_bad_arguments():
    with pytest.raises(ValueError, match="kernel 'box'"):
        window("box", 9)
    with pytest.raises(ValueError, match="kernel_size 8"):
        window("rectangular", 8)


def test_window_weight_is_filtered_ones():
    kernel = window("triangular", 7)
    ones = torch.ones(1, 1, 5, 9, 12)
    expected = separable_filter(ones, kernel).double()
    assert torch.allclose(window_weight(kernel, (5, 9, 12)), expected)
    assert window_weight(kernel, (5, 9, 12)).shape == (1, 1, 5, 9, 12)


def test_gaussian_smoothing_kernel_moments():
    kernel = gaussian_smoothing_kernel(2.0).double()
    offsets = torch.arange(-6, 7, dtype=torch.float64)
    assert kernel.numel() == 13
    assert kernel.sum().item() == pytest.approx(1.0)
    assert (kernel * offsets**2).sum().sqrt().item() == pytest.approx(2.0, rel=0.02)
    assert gaussian_smoothing_kernel(0).tolist() == [1.0]
    with pytest.raises(ValueError):
        gaussian_smoothing_kernel(-1)
