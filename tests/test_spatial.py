"""Tests for regflow.spatial: warping against scipy, integration, affine fields, composition."""

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from regflow import spatial
from regflow.metrics import folding_fraction
from tests.test_models import smooth_random_image

SHAPES = {2: (11, 9), 3: (10, 12, 8)}


def smooth_field(shape, batch=1, magnitude=3.0, seed=0, sigma=2.0):
    """(B, ndim, *shape) float64 random smooth DDF with max |value| = magnitude voxels."""
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((batch, len(shape), *shape))
    field = np.stack([[ndimage.gaussian_filter(c, sigma) for c in sample] for sample in noise])
    return torch.from_numpy(field * magnitude / np.abs(field).max())


def shifted(image, shift):
    """image[x + shift] with zeros where x + shift leaves the volume (numpy, integer shift)."""
    expected = np.zeros_like(image)
    target, source = [], []
    for size, step in zip(image.shape, shift, strict=True):
        target.append(slice(max(0, -step), min(size, size - step)))
        source.append(slice(max(0, step), min(size, size + step)))
    expected[tuple(target)] = image[tuple(source)]
    return expected


@pytest.mark.parametrize("ndim", [2, 3])
def test_integer_translation_is_a_shift_with_zeros_outside(ndim):
    shape = SHAPES[ndim]
    shift = (2, -1, 3)[:ndim]
    image = np.random.default_rng(1).standard_normal(shape)
    ddf = torch.tensor(shift, dtype=torch.float64).reshape(1, ndim, *[1] * ndim)
    warped = spatial.warp(torch.from_numpy(image)[None, None], ddf.expand(1, ndim, *shape))
    expected = shifted(image, shift)
    np.testing.assert_allclose(warped[0, 0].numpy(), expected, atol=1e-12)
    # The interior is np.roll of the input; the rows that leave the volume are zeros.
    interior = tuple(slice(3, -3) for _ in shape)
    rolled = np.roll(image, [-s for s in shift], axis=tuple(range(ndim)))
    np.testing.assert_allclose(warped[0, 0].numpy()[interior], rolled[interior], atol=1e-12)
    assert np.all(warped[0, 0].numpy()[-2:] == 0)


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize(("padding", "scipy_mode"), [("zeros", "grid-constant"),
                                                     ("border", "nearest")])
def test_warp_matches_scipy_map_coordinates(ndim, padding, scipy_mode):
    shape = SHAPES[ndim]
    rng = np.random.default_rng(2)
    image = rng.standard_normal((2, 3, *shape))
    ddf = smooth_field(shape, batch=2, magnitude=4.0, seed=3)  # pushes samples past the border
    warped = spatial.warp(torch.from_numpy(image), ddf, padding=padding).numpy()
    grid = spatial.identity_grid(shape, dtype=torch.float64).numpy()
    for b in range(2):
        coords = grid + ddf[b].numpy()
        for c in range(3):
            expected = ndimage.map_coordinates(image[b, c], coords, order=1, mode=scipy_mode,
                                               cval=0.0)
            np.testing.assert_allclose(warped[b, c], expected, atol=1e-5)


def test_scipy_constant_mode_differs_at_the_border():
    """Documents why the reference mode is 'grid-constant': 'constant' does not interpolate to 0."""
    shape = SHAPES[3]
    image = np.ones(shape)
    ddf = torch.zeros(1, 3, *shape, dtype=torch.float64)
    ddf[:, 0] = 0.5
    warped = spatial.warp(torch.from_numpy(image)[None, None], ddf)[0, 0].numpy()
    coords = spatial.identity_grid(shape, dtype=torch.float64).numpy() + ddf[0].numpy()
    constant = ndimage.map_coordinates(image, coords, order=1, mode="constant")
    assert warped[-1, 0, 0] == pytest.approx(0.5)  # halfway between the edge voxel and outside
    assert constant[-1, 0, 0] == 0.0


def test_nearest_keeps_label_values():
    shape = SHAPES[3]
    labels = torch.from_numpy(np.random.default_rng(4).integers(0, 4, shape).astype(np.float32))
    ddf = smooth_field(shape, magnitude=2.5, seed=5).float()
    warped = spatial.warp(labels[None, None], ddf, interp="nearest")
    assert set(torch.unique(warped).tolist()) <= {0.0, 1.0, 2.0, 3.0}
    linear = spatial.warp(labels[None, None], ddf)
    assert len(torch.unique(linear)) > 4  # linear interpolation does mix values


def test_border_padding_repeats_edge_voxels():
    shape = SHAPES[3]
    image = torch.arange(np.prod(shape), dtype=torch.float64).reshape(1, 1, *shape)
    ddf = torch.zeros(1, 3, *shape, dtype=torch.float64)
    ddf[:, 0] = 3.0
    warped = spatial.warp(image, ddf, padding="border")
    rows = [min(x + 3, shape[0] - 1) for x in range(shape[0])]
    np.testing.assert_allclose(warped[0, 0].numpy(), image[0, 0].numpy()[rows], atol=1e-9)


def test_zero_ddf_is_identity_and_grid_axis_order():
    shape = SHAPES[3]
    image = torch.randn(1, 2, *shape, dtype=torch.float64)
    zero = torch.zeros(1, 3, *shape, dtype=torch.float64)
    torch.testing.assert_close(spatial.warp(image, zero), image, rtol=0, atol=1e-12)
    grid = spatial.ddf_to_grid(zero)
    assert grid.shape == (1, *shape, 3)
    # The last grid axis is (W, H, D): moving along array axis 0 changes the last entry.
    torch.testing.assert_close(grid[0, 0, 0, 0], torch.tensor([-1.0, -1.0, -1.0]).double())
    torch.testing.assert_close(grid[0, -1, 0, 0], torch.tensor([-1.0, -1.0, 1.0]).double())
    torch.testing.assert_close(grid[0, 0, 0, -1], torch.tensor([1.0, -1.0, -1.0]).double())


def test_ddf_broadcasts_over_batch_and_channels():
    shape = SHAPES[2]
    image = torch.randn(3, 2, *shape, dtype=torch.float64)
    ddf = smooth_field(shape, seed=6)
    together = spatial.warp(image, ddf)
    for b in range(3):
        for c in range(2):
            alone = spatial.warp(image[b:b + 1, c:c + 1], ddf)
            torch.testing.assert_close(together[b:b + 1, c:c + 1], alone)


def test_warp_rejects_bad_arguments():
    image = torch.zeros(1, 1, 4, 4, 4)
    with pytest.raises(ValueError, match="interp"):
        spatial.warp(image, torch.zeros(1, 3, 4, 4, 4), interp="cubic")
    with pytest.raises(ValueError, match="padding"):
        spatial.warp(image, torch.zeros(1, 3, 4, 4, 4), padding="reflect")
    with pytest.raises(ValueError, match="spatial axes"):
        spatial.warp(image, torch.zeros(1, 2, 4, 4))


def test_warp_onto_another_grid_samples_the_images_own_voxels():
    image = torch.arange(4 * 5 * 6, dtype=torch.float32).reshape(1, 1, 4, 5, 6)
    ddf = torch.zeros(1, 3, 2, 3, 2)
    ddf[:, 0] = 1.0  # one voxel along axis 0 of the image grid
    warped = spatial.warp(image, ddf)
    assert warped.shape == (1, 1, 2, 3, 2)
    torch.testing.assert_close(warped, image[:, :, 1:3, :3, :2])


def test_voxel_map_ddf_of_a_flip_and_shift():
    shape = (4, 5, 6)
    matrix = torch.eye(4, dtype=torch.float64)
    matrix[0, 0], matrix[0, 3] = -1.0, 3.0  # axis 0 reversed: x -> 3 - x
    matrix[2, 3] = 0.5
    ddf = spatial.voxel_map_ddf(matrix, shape)
    voxels = spatial.identity_grid(shape, dtype=torch.float64)
    torch.testing.assert_close(ddf[0, 0], 3.0 - 2 * voxels[0])
    torch.testing.assert_close(ddf[0, 1], torch.zeros(shape, dtype=torch.float64))
    torch.testing.assert_close(ddf[0, 2], torch.full(shape, 0.5, dtype=torch.float64))
    flip = matrix.clone()
    flip[2, 3] = 0.0
    image = torch.rand(1, 1, *shape, dtype=torch.float64)
    torch.testing.assert_close(spatial.warp(image, spatial.voxel_map_ddf(flip, shape)),
                               image.flip(2))


@pytest.mark.parametrize("ndim", [2, 3])
def test_integrated_smooth_dvf_does_not_fold(ndim):
    shape = (24,) * ndim
    dvf = smooth_field(shape, magnitude=6.0, seed=7, sigma=4.0)
    ddf = spatial.integrate_dvf(dvf)
    assert ddf.abs().max() > 3.0  # a real deformation, not a near-identity
    assert folding_fraction(ddf) == 0.0
    assert torch.equal(spatial.integrate_dvf(dvf, steps=0), dvf)


@pytest.mark.parametrize("shape", [(24, 32, 24), (35, 50, 36)])
def test_downsized_integration_of_a_smooth_dvf_matches_full_resolution(shape):
    dvf = smooth_field(shape, magnitude=6.0, seed=3, sigma=5.0)
    full = spatial.integrate_dvf(dvf)
    assert torch.equal(spatial.integrate_dvf(dvf, downsize=1), full)
    half = spatial.integrate_dvf(dvf, downsize=2)
    assert half.shape == full.shape
    assert full.abs().max() > 3.0
    interior = (slice(None), slice(None)) + tuple(slice(3, size - 3) for size in shape)
    error = (half - full)[interior].abs()
    # voxels, against a ~6-voxel field (resampling the velocity alone errs by up to 0.15 here)
    assert error.max() < 0.4 and error.mean() < 0.05
    assert folding_fraction(half) == 0.0
    with pytest.raises(ValueError, match="downsize 0"):
        spatial.integrate_dvf(dvf, downsize=0)


@pytest.mark.parametrize("ndim", [2, 3])
def test_affine_identity_and_translation(ndim):
    shape = SHAPES[ndim]
    identity = torch.eye(ndim, ndim + 1, dtype=torch.float64)[None].repeat(2, 1, 1)
    assert torch.equal(spatial.affine_to_ddf(identity, shape),
                       torch.zeros(2, ndim, *shape, dtype=torch.float64))
    translation = identity.clone()
    translation[:, :, ndim] = torch.tensor([1.5, -2.0, 0.5][:ndim])
    ddf = spatial.affine_to_ddf(translation, shape)
    assert ddf.shape == (2, ndim, *shape)
    for axis in range(ndim):
        assert torch.all(ddf[:, axis] == translation[0, axis, ndim])


@pytest.mark.parametrize("ndim", [2, 3])
def test_affine_rotation_matches_direct_computation(ndim):
    shape = SHAPES[ndim]
    angle = 0.3
    rotation = np.eye(ndim)
    rotation[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    matrix = rotation @ np.diag([1.1, 0.9, 1.05][:ndim])
    shift = np.array([0.5, -1.0, 2.0][:ndim])
    theta = torch.from_numpy(np.concatenate([matrix, shift[:, None]], axis=1))[None]
    centre = (np.array(shape) - 1) / 2
    points = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    moved = (points - centre) @ matrix.T + shift + centre
    expected = np.moveaxis(moved - points, -1, 0)
    np.testing.assert_allclose(spatial.affine_to_ddf(theta, shape)[0].numpy(), expected,
                               atol=1e-12)


@pytest.mark.parametrize("ndim", [2, 3])
def test_jacobian_of_identity_and_uniform_scaling(ndim):
    shape = SHAPES[ndim]
    zero = torch.zeros(2, ndim, *shape, dtype=torch.float64)
    torch.testing.assert_close(spatial.jacobian_determinant(zero), torch.ones(2, *shape).double())
    scale = 1.3
    grid = spatial.identity_grid(shape, dtype=torch.float64)[None]
    ddf = (scale - 1.0) * grid  # x -> scale * x
    expected = torch.full((1, *shape), scale**ndim, dtype=torch.float64)
    torch.testing.assert_close(spatial.jacobian_determinant(ddf), expected)


def test_jacobian_of_affine_field_is_matrix_determinant():
    theta = torch.tensor([[[1.2, 0.1, 0.0, 1.0], [0.0, 0.8, 0.3, 0.0], [0.2, 0.0, 1.1, -2.0]]],
                         dtype=torch.float64)
    det = spatial.jacobian_determinant(spatial.affine_to_ddf(theta, SHAPES[3]))
    expected = torch.linalg.det(theta[0, :, :3])
    torch.testing.assert_close(det, torch.full_like(det, expected.item()))


def test_gradcheck_warp():
    generator = torch.Generator().manual_seed(12)
    image = torch.randn(1, 1, 4, 5, 3, dtype=torch.float64, generator=generator,
                        requires_grad=True)
    ddf = (torch.rand(1, 3, 4, 5, 3, dtype=torch.float64, generator=generator) * 1.6 - 0.8)
    ddf.requires_grad_(True)
    assert torch.autograd.gradcheck(spatial.warp, (image, ddf))
    assert torch.autograd.gradcheck(lambda i, d: spatial.warp(i, d, padding="border"),
                                    (image, ddf))


def test_gradcheck_integrate_dvf():
    generator = torch.Generator().manual_seed(13)
    dvf = torch.rand(1, 3, 4, 5, 3, dtype=torch.float64, generator=generator) * 2.0 - 1.0
    dvf.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: spatial.integrate_dvf(v, steps=3), (dvf,))


def test_composing_translations_adds_them():
    first = torch.zeros(1, 3, *SHAPES[3])
    then = torch.zeros(1, 3, *SHAPES[3])
    first[:, 0], first[:, 2] = 1.5, -0.5
    then[:, 1], then[:, 2] = 2.0, 1.25
    composed = spatial.compose_ddfs(first, then)
    torch.testing.assert_close(composed[:, 0], torch.full((1, *SHAPES[3]), 1.5))
    torch.testing.assert_close(composed[:, 1], torch.full((1, *SHAPES[3]), 2.0))
    torch.testing.assert_close(composed[:, 2], torch.full((1, *SHAPES[3]), 0.75))


def test_warping_by_the_composed_field_equals_warping_twice():
    generator = torch.Generator().manual_seed(3)
    image = smooth_random_image(24, generator)
    grid = torch.linspace(0, 2 * math.pi, 24)
    zz, yy, xx = torch.meshgrid(grid, grid, grid, indexing="ij")
    first = torch.stack([3.0 * torch.sin(yy), 2.0 * torch.cos(xx), 1.6 * torch.sin(zz)])[None]
    then = torch.stack([1.4 * torch.cos(xx), -2.4 * torch.sin(zz), 1.8 * torch.cos(yy)])[None]
    twice = spatial.warp(spatial.warp(image, first), then)
    once = spatial.warp(image, spatial.compose_ddfs(first, then))
    summed = spatial.warp(image, first + then)
    interior = (slice(None), slice(None)) + (slice(5, -5),) * 3
    composed_error = (twice - once)[interior].abs().mean()
    summed_error = (twice - summed)[interior].abs().mean()
    assert composed_error < 0.01
    assert summed_error > 3 * composed_error


def deepreg_bspline(field: np.ndarray, spacing: tuple[int, int, int]) -> np.ndarray:
    """DeepReg's ResizeCPTransform then BSplines3DTransform (deepreg/model/layer.py), written
    again here: a 3-D Gaussian of sigma 0.44 c on ceil(3 sigma) taps made odd, zero-padded;
    linear resize to ceil(S / c) + 3 points; a transposed convolution with the 4c-wide cubic
    B-spline filter, stride c, cropped from 3c. ``field`` is (C, *S)."""
    sigma = [0.44 * c for c in spacing]
    sizes = [int(np.ceil(3 * s) + np.mod(np.ceil(3 * s) + 1, 2)) for s in sigma]
    grids = np.meshgrid(*[np.arange(n) for n in sizes], indexing="ij")
    kernel = np.exp(-sum((g - (n - 1) / 2) ** 2 / (2 * s**2)
                         for g, n, s in zip(grids, sizes, sigma, strict=True)))
    kernel = torch.from_numpy(kernel / kernel.sum())[None, None]
    volume = torch.from_numpy(field)[:, None]  # channels as batch
    smooth = torch.nn.functional.conv3d(volume, kernel, padding=[n // 2 for n in sizes])
    shape = field.shape[1:]
    points = [int(np.ceil(size / c)) + 3 for size, c in zip(shape, spacing, strict=True)]
    grid = torch.nn.functional.interpolate(smooth, size=points, mode="trilinear",
                                           align_corners=False)
    basis = [lambda u: (1 - u) ** 3 / 6, lambda u: (3 * u**3 - 6 * u**2 + 4) / 6,
             lambda u: (-3 * u**3 + 3 * u**2 + 3 * u + 1) / 6, lambda u: u**3 / 6]
    u = [1 - np.arange(1 / (2 * c), 1, 1 / c) for c in spacing]
    spline = np.zeros([4 * c for c in spacing])
    for f0, f1, f2 in np.ndindex(4, 4, 4):
        spline[f0 * spacing[0]:(f0 + 1) * spacing[0], f1 * spacing[1]:(f1 + 1) * spacing[1],
               f2 * spacing[2]:(f2 + 1) * spacing[2]] = (
            basis[f0](u[0])[:, None, None] * basis[f1](u[1])[None, :, None]
            * basis[f2](u[2])[None, None, :])
    dense = torch.nn.functional.conv_transpose3d(grid, torch.from_numpy(spline)[None, None],
                                                 stride=spacing)
    start = [3 * c for c in spacing]
    return dense[:, 0, start[0]:start[0] + shape[0], start[1]:start[1] + shape[1],
                 start[2]:start[2] + shape[2]].numpy()


@pytest.mark.parametrize("spacing", [(3, 2, 4), (5, 5, 5), (1, 1, 1)])
def test_bspline_field_is_deepregs_control_point_interpolation(spacing):
    field = np.random.default_rng(0).normal(size=(3, 13, 10, 9))
    ours = spatial.bspline_field(torch.from_numpy(field)[None], spacing)[0].numpy()
    np.testing.assert_allclose(ours, deepreg_bspline(field, spacing), atol=1e-10)


def test_bspline_field_keeps_constant_and_linear_fields_inside():
    """A cubic B-spline reproduces constants and straight lines: a translation stays one, and
    away from the zero-padded border a linear field stays linear."""
    constant = torch.full((1, 3, 24, 20, 16), 2.5, dtype=torch.float64)
    inner = (..., slice(8, -8), slice(8, -8), slice(6, -6))
    result = spatial.bspline_field(constant, [2, 2, 2])
    torch.testing.assert_close(result[inner], constant[inner])
    assert spatial.bspline_field(torch.rand(2, 2, 11, 13), [3, 4]).shape == (2, 2, 11, 13)
