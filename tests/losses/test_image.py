"""Tests for regflow.losses.image: closed forms, MONAI agreement, NaN safety, gradients."""

import math

import numpy as np
import pytest
import torch

from regflow.losses.filters import gaussian_smoothing_kernel, separable_filter, window
from regflow.losses.image import gmi, gncc, lncc, local_squared_ncc, ssd

KERNELS = ["rectangular", "triangular", "gaussian"]


def smooth_image(shape, seed=0, dtype=torch.float64):
    """Smooth random texture plus a ramp along the last axis: no window is constant."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(shape, generator=generator, dtype=dtype)
    texture = separable_filter(noise, gaussian_smoothing_kernel(1.5))
    ramp = torch.linspace(0, 2, shape[-1], dtype=dtype)
    return texture + ramp


def unit_interval(image):
    """Rescale to [0.05, 0.95] (inside gmi's clamp)."""
    return 0.05 + 0.9 * (image - image.min()) / (image.max() - image.min())


def test_ssd_of_a_constant_offset_is_its_square():
    image = smooth_image((2, 1, 6, 7, 8))
    assert ssd(image, image + 0.3).item() == pytest.approx(0.09, abs=1e-12)
    assert ssd(image, image).item() == 0.0


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("shape", [(2, 1, 14, 15, 16), (2, 2, 20, 21)])
def test_lncc_is_minus_one_for_affine_intensity_maps(kernel, shape):
    image = smooth_image(shape)
    for warped in (image, 2 * image + 3, -image):
        assert lncc(image, warped, kernel=kernel).item() == pytest.approx(-1.0, abs=1e-4)
    single = image.float()
    assert lncc(single, 2 * single + 3, kernel=kernel).item() == pytest.approx(-1.0, abs=1e-4)


def test_lncc_of_independent_images_is_near_zero():
    fixed = torch.randn(1, 1, 20, 20, 20, generator=torch.Generator().manual_seed(1))
    warped = torch.randn(1, 1, 20, 20, 20, generator=torch.Generator().manual_seed(2))
    # squared correlation of 729 independent pairs has mean about 1/729 (more at the border)
    assert -0.01 < lncc(fixed, warped).item() < 0


@pytest.mark.parametrize("kernel", KERNELS)
def test_local_ncc_matches_brute_force_windows_cropped_at_the_border(kernel):
    fixed = smooth_image((1, 1, 6, 7, 5), seed=13)
    warped = fixed + torch.randn(fixed.shape, generator=torch.Generator().manual_seed(14),
                                 dtype=torch.float64)
    taps = window(kernel, 5).double().numpy()
    f, g = fixed[0, 0].numpy(), warped[0, 0].numpy()
    expected = np.zeros(f.shape)
    for x in np.ndindex(f.shape):
        # the window's voxels inside the volume, with their separable weights
        ranges = [range(max(0, c - 2), min(n, c + 3)) for c, n in zip(x, f.shape, strict=True)]
        weights = np.einsum("i,j,k->ijk", *[taps[[i - c + 2 for i in r]]
                                           for r, c in zip(ranges, x, strict=True)])
        index = np.ix_(*ranges)
        fw, gw, total = f[index], g[index], weights.sum()
        cross = (weights * fw * gw).sum() - (weights * fw).sum() * (weights * gw).sum() / total
        f_var = (weights * fw**2).sum() - (weights * fw).sum() ** 2 / total
        g_var = (weights * gw**2).sum() - (weights * gw).sum() ** 2 / total
        expected[x] = cross**2 / (f_var * g_var)
    ours = local_squared_ncc(fixed, warped, kernel_size=5, kernel=kernel, eps=0)[0, 0]
    assert np.allclose(ours.numpy(), expected, rtol=1e-9, atol=1e-12)
    assert expected.min() < 0.9  # the images are not trivially correlated


@pytest.mark.parametrize("kernel", KERNELS)
def test_lncc_matches_monai_away_from_the_border(kernel):
    from monai.losses import LocalNormalizedCrossCorrelationLoss

    fixed = smooth_image((2, 1, 24, 24, 24), seed=3, dtype=torch.float32)
    warped = smooth_image((2, 1, 24, 24, 24), seed=4, dtype=torch.float32) + 0.5 * fixed
    monai_loss = LocalNormalizedCrossCorrelationLoss(
        spatial_dims=3, kernel_size=9, kernel_type=kernel, reduction="none")
    expected = -monai_loss(warped, fixed)  # MONAI's call order is (pred, target)
    ours = local_squared_ncc(fixed, warped, kernel_size=9, kernel=kernel)
    interior = (slice(None), slice(None), slice(4, -4), slice(4, -4), slice(4, -4))
    # MONAI pads with zeros and divides by the full window weight: the two agree only where the
    # window lies inside the volume. eps differs (MONAI clamps each variance at 1e-5, we add 1e-5
    # to their product), negligible here because the windowed variances are far above it.
    assert torch.allclose(ours[interior], expected[interior], atol=1e-4)
    assert 0.2 < expected[interior].mean() < 0.95  # a non-trivial correlation was compared


def test_lncc_rejects_bad_arguments():
    image = smooth_image((1, 1, 8, 8, 8))
    with pytest.raises(ValueError, match="kernel_size 4"):
        lncc(image, image, kernel_size=4)
    with pytest.raises(ValueError, match="shapes differ"):
        lncc(image, image[..., :7])


def test_gncc_closed_forms():
    image = smooth_image((2, 1, 6, 7, 8))
    assert gncc(image, 2 * image + 1).item() == pytest.approx(-1.0, abs=1e-6)
    assert gncc(image, -image).item() == pytest.approx(1.0, abs=1e-6)
    other = smooth_image((2, 1, 6, 7, 8), seed=5)
    expected = np.mean([np.corrcoef(image[b].flatten(), other[b].flatten())[0, 1]
                        for b in range(2)])
    assert gncc(image, other).item() == pytest.approx(-expected, abs=1e-6)


def test_gmi_prefers_the_same_image():
    image = unit_interval(smooth_image((1, 1, 12, 12, 12)))
    noise = torch.rand(1, 1, 12, 12, 12, generator=torch.Generator().manual_seed(6),
                       dtype=torch.float64)
    assert gmi(image, image).item() < gmi(image, noise).item() - 0.5
    assert gmi(image, noise).item() < 0  # mutual information is >= 0


def numpy_mutual_information(fixed, warped, num_bins, sigma_ratio, eps=1e-7):
    """Parzen mutual information voxel by voxel (no vectorised histogram)."""
    centres = np.linspace(0, 1, num_bins)
    sigma = sigma_ratio / (num_bins - 1)

    def membership(value):
        weights = np.exp(-((value - centres) ** 2) / (2 * sigma**2))
        return weights / weights.sum()

    joint = np.zeros((num_bins, num_bins))
    for f, w in zip(fixed.ravel(), warped.ravel(), strict=True):
        joint += np.outer(membership(f), membership(w))
    joint /= fixed.size
    product = np.outer(joint.sum(axis=1), joint.sum(axis=0))
    return float(np.sum(joint * np.log((joint + eps) / (product + eps))))


def test_gmi_matches_a_direct_computation():
    fixed = unit_interval(smooth_image((1, 1, 4, 5, 3), seed=7))
    warped = unit_interval(smooth_image((1, 1, 4, 5, 3), seed=8))
    expected = numpy_mutual_information(fixed.numpy(), warped.numpy(), num_bins=7, sigma_ratio=0.5)
    assert gmi(fixed, warped, num_bins=7).item() == pytest.approx(-expected, abs=1e-10)


def test_gmi_matches_monai():
    from monai.losses import GlobalMutualInformationLoss

    fixed = unit_interval(smooth_image((2, 1, 16, 16, 16), seed=9, dtype=torch.float32))
    warped = unit_interval(fixed + 0.3 * torch.rand(fixed.shape,
                                                    generator=torch.Generator().manual_seed(10)))
    expected = GlobalMutualInformationLoss(num_bins=23, sigma_ratio=0.5)(warped, fixed)
    # MONAI adds its 1e-7 inside the log differently: log((p + e) / (q + e) + e)
    assert gmi(fixed, warped).item() == pytest.approx(expected.item(), abs=1e-4)


def test_gmi_clamps_and_survives_a_narrow_window():
    image = unit_interval(smooth_image((1, 1, 6, 6, 6)))
    assert gmi(image * 3 - 1, image).item() == gmi(image.clamp(1 / 3, 2 / 3) * 3 - 1, image).item()
    assert math.isfinite(gmi(image, image, sigma_ratio=0.01).item())


LOSSES = [ssd, lncc, gncc, gmi]


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("shape", [(1, 1, 6, 6, 6), (2, 1, 7, 6)])
def test_constant_images_give_finite_values_and_gradients(loss, shape):
    for warped_value in (torch.zeros(shape), smooth_image(shape).float()):
        fixed = torch.full(shape, 0.5, requires_grad=True)
        warped = warped_value.clone().requires_grad_(True)
        value = loss(fixed, warped)
        value.backward()
        assert torch.isfinite(value)
        assert torch.isfinite(fixed.grad).all() and torch.isfinite(warped.grad).all()


@pytest.mark.parametrize("loss, options", [
    (ssd, {}), (lncc, {"kernel_size": 3}), (lncc, {"kernel_size": 5, "kernel": "gaussian"}),
    (gncc, {}), (gmi, {"num_bins": 8})])
@pytest.mark.parametrize("shape", [(1, 1, 6, 7, 5), (1, 1, 7, 6)])
def test_gradcheck(loss, options, shape):
    fixed = unit_interval(smooth_image(shape, seed=11)).requires_grad_(True)
    warped = unit_interval(smooth_image(shape, seed=12)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda f, w: loss(f, w, **options), (fixed, warped),
                                    fast_mode=True)


# DeepReg-compatible options: NumPy re-implementations of deepreg/loss/image.py (EPS = 1e-5).


def deepreg_lncc(fixed, warped, kernel_size):
    """DeepReg's LNCC loss with a rectangular window on (D, H, W) volumes: zero padding, sums
    over the window, means by the full window volume, (cross^2 + EPS) / (var * var + EPS)."""
    half = kernel_size // 2

    def window_sum(volume):
        padded = np.pad(volume, half)
        windows = np.lib.stride_tricks.sliding_window_view(padded, (kernel_size,) * 3)
        return windows.sum(axis=(-3, -2, -1))

    volume = kernel_size**3
    t_sum, p_sum = window_sum(fixed), window_sum(warped)
    t2_sum, p2_sum, tp_sum = window_sum(fixed**2), window_sum(warped**2), window_sum(fixed * warped)
    cross = tp_sum - p_sum / volume * t_sum
    t_var = np.maximum(t2_sum - t_sum / volume * t_sum, 0)
    p_var = np.maximum(p2_sum - p_sum / volume * p_sum, 0)
    return -((cross**2 + 1e-5) / (t_var * p_var + 1e-5)).mean()


def test_zero_padded_lncc_matches_deepreg_formula():
    rng = np.random.default_rng(31)
    fixed, warped = rng.uniform(size=(6, 5, 7)), rng.uniform(size=(6, 5, 7))
    expected = deepreg_lncc(fixed, warped, 3)
    assert expected == pytest.approx(-0.32566646, rel=1e-6)
    value = lncc(torch.from_numpy(fixed)[None, None], torch.from_numpy(warped)[None, None],
                 kernel_size=3, border="zero_pad", smooth_nr=1e-5, eps=1e-5)
    assert value.item() == pytest.approx(expected, rel=1e-9)
    cropped = lncc(torch.from_numpy(fixed)[None, None], torch.from_numpy(warped)[None, None],
                   kernel_size=3)
    assert cropped.item() != pytest.approx(expected, rel=1e-3)


def test_squared_gncc_matches_deepreg_formula():
    rng = np.random.default_rng(32)
    fixed, warped = rng.uniform(size=(2, 4, 5, 3)), rng.uniform(size=(2, 4, 5, 3))
    axes = (1, 2, 3)
    centred_f = fixed - fixed.mean(axis=axes, keepdims=True)
    centred_w = warped - warped.mean(axis=axes, keepdims=True)
    numerator = np.abs((centred_f * centred_w).mean(axis=axes))
    ratio = (numerator**2 + 1e-5) / (fixed.var(axis=axes) * warped.var(axis=axes) + 1e-5)
    expected = -ratio.mean()
    assert expected == pytest.approx(-0.02557703, rel=1e-6)
    value = gncc(torch.from_numpy(fixed)[:, None], torch.from_numpy(warped)[:, None],
                 eps=1e-5, squared=True)
    assert value.item() == pytest.approx(expected, rel=1e-9)


def test_lncc_rejects_an_unknown_border():
    image = torch.rand(1, 1, 5, 5)
    with pytest.raises(ValueError, match="border"):
        lncc(image, image, kernel_size=3, border="reflect")
