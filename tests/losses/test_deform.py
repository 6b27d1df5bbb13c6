"""Tests for regflow.losses.deform: exactness on affine/quadratic fields, scaling, gradients."""

import numpy as np
import pytest
import torch

from regflow.losses.deform import bending_energy, gradient_norm

SHAPES = [(8, 9, 10), (11, 12)]


def coordinates(shape, dtype=torch.float64):
    """(ndim, *shape) voxel coordinates."""
    axes = [torch.arange(size, dtype=dtype) for size in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))


def affine_field(shape, seed, dtype=torch.float64):
    """(2, ndim, *shape): u(x) = A x + t with random A (per batch element) and t."""
    generator = torch.Generator().manual_seed(seed)
    ndim = len(shape)
    matrix = torch.randn(2, ndim, ndim, generator=generator, dtype=dtype)
    shift = 5 * torch.randn(2, ndim, generator=generator, dtype=dtype)
    grid = coordinates(shape, dtype).reshape(ndim, -1)
    field = matrix @ grid + shift[:, :, None]
    return field.reshape(2, ndim, *shape), matrix


def smooth_field(shape, seed):
    generator = torch.Generator().manual_seed(seed)
    ndim = len(shape)
    grid = coordinates(shape)
    waves = [torch.sin(0.3 * grid[(i + 1) % ndim] + i) * torch.cos(0.2 * grid[i])
             for i in range(ndim)]
    noise = 0.1 * torch.randn(1, ndim, *shape, generator=generator, dtype=torch.float64)
    return torch.stack(waves)[None] + noise


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-20), (torch.float32, 1e-6)])
def test_affine_fields_have_no_bending_energy(shape, dtype, tolerance):
    field, _ = affine_field(shape, seed=0)
    assert field.abs().max() > 10  # large enough to expose any padding artefact
    assert bending_energy(field.to(dtype)).item() < tolerance


@pytest.mark.parametrize("shape", SHAPES)
def test_gradient_norm_of_affine_field_is_its_matrix_norm(shape):
    field, matrix = affine_field(shape, seed=1)
    ndim = len(shape)
    # du_i / dx_j = A_ij everywhere: sum over j, mean over components i and the batch
    assert gradient_norm(field, "l1").item() == pytest.approx(
        matrix.abs().sum().item() / (2 * ndim), rel=1e-12)
    assert gradient_norm(field, "l2").item() == pytest.approx(
        matrix.square().sum().item() / (2 * ndim), rel=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
def test_translation_has_zero_gradient_norm(shape):
    ndim = len(shape)
    translation = torch.tensor([3.5, -2.0, 1.25][:ndim]).reshape(1, ndim, *[1] * ndim)
    field = translation.expand(2, ndim, *shape)
    assert gradient_norm(field, "l1").item() == 0.0
    assert gradient_norm(field, "l2").item() == 0.0


def test_bending_energy_of_quadratic_fields():
    shape = (7, 8, 9)
    x = coordinates(shape)
    pure = torch.zeros(1, 3, *shape, dtype=torch.float64)
    pure[0, 0] = 0.5 * x[0] ** 2  # d2u0/dx0^2 = 1
    assert bending_energy(pure).item() == pytest.approx(1 / 3, rel=1e-12)
    mixed = torch.zeros(1, 3, *shape, dtype=torch.float64)
    mixed[0, 2] = x[0] * x[1]  # d2u2/dx0dx1 = 1, counted twice
    assert bending_energy(mixed).item() == pytest.approx(2 / 3, rel=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
def test_regularisers_scale_with_amplitude(shape):
    field = smooth_field(shape, seed=2)
    energy = bending_energy(field).item()
    assert energy > 1e-3
    assert bending_energy(3 * field).item() == pytest.approx(9 * energy, rel=1e-12)
    assert gradient_norm(-3 * field, "l1").item() == pytest.approx(
        3 * gradient_norm(field, "l1").item(), rel=1e-12)
    assert gradient_norm(3 * field, "l2").item() == pytest.approx(
        9 * gradient_norm(field, "l2").item(), rel=1e-12)


@pytest.mark.parametrize("regulariser", [
    bending_energy, lambda ddf: gradient_norm(ddf, "l1"), lambda ddf: gradient_norm(ddf, "l2")])
@pytest.mark.parametrize("shape", [(6, 7, 5), (6, 7)])
def test_gradcheck(regulariser, shape):
    field = smooth_field(shape, seed=3).requires_grad_(True)
    assert torch.autograd.gradcheck(regulariser, (field,), fast_mode=True)


def test_bad_fields_are_rejected():
    with pytest.raises(ValueError, match="expected a ddf"):
        bending_energy(torch.zeros(1, 2, 5, 5, 5))
    with pytest.raises(ValueError, match=">= 3"):
        gradient_norm(torch.zeros(1, 3, 5, 2, 5))
    with pytest.raises(ValueError, match="norm 'l3'"):
        gradient_norm(torch.zeros(1, 2, 5, 5), "l3")


# DeepReg-compatible options: NumPy re-implementations of deepreg/loss/deform.py (channels last,
# (B, D, H, W, 3)), which differences the field along array axes 1, 2, 3 and crops every axis.


def deepreg_gradient(field, axis):
    """DeepReg's central difference (f[x + 1] - f[x - 1]) / 2 along ``axis`` (1..3), all axes
    cropped by one voxel per face."""
    inner = [slice(None)] + [slice(1, -1)] * 3 + [slice(None)]
    ahead, behind = list(inner), list(inner)
    ahead[axis], behind[axis] = slice(2, None), slice(None, -2)
    return (field[tuple(ahead)] - field[tuple(behind)]) / 2


def deepreg_field(seed):
    """A random (1, 3, 6, 5, 7) ddf and its channels-last NumPy copy."""
    field = np.random.default_rng(seed).normal(size=(1, 3, 6, 5, 7))
    return torch.from_numpy(field), np.moveaxis(field, 1, -1)


def test_gradient_norm_l2_matches_deepreg_formula():
    ddf, field = deepreg_field(11)
    dx, dy, dz = (deepreg_gradient(field, axis) for axis in (1, 2, 3))
    expected = (dx**2 + dy**2 + dz**2).mean()
    assert expected == pytest.approx(1.7251122, rel=1e-6)
    assert gradient_norm(ddf, norm="l2").item() == pytest.approx(expected, rel=1e-12)


def test_wide_bending_energy_matches_deepreg_formula():
    ddf, field = deepreg_field(12)
    first = {axis: deepreg_gradient(field, axis) for axis in (1, 2, 3)}
    second = {(j, k): deepreg_gradient(first[j], k) for j in (1, 2, 3) for k in (1, 2, 3)}
    expected = (second[1, 1]**2 + second[2, 2]**2 + second[3, 3]**2
                + 2 * second[1, 2]**2 + 2 * second[1, 3]**2 + 2 * second[2, 3]**2).mean()
    assert expected == pytest.approx(2.3255638, rel=1e-6)
    assert bending_energy(ddf, stencil="wide").item() == pytest.approx(expected, rel=1e-12)
    assert bending_energy(ddf).item() != pytest.approx(expected, rel=1e-2)


def test_wide_bending_energy_is_blind_to_a_checkerboard_along_one_axis():
    field = torch.zeros(1, 2, 8, 8, dtype=torch.float64)
    field[:, :, ::2] = 1.0  # alternates along axis 0 only
    assert bending_energy(field, stencil="wide").item() == 0.0
    assert bending_energy(field, stencil="compact").item() == pytest.approx(4.0)  # (1 - 0 + 1)^2


def test_bending_energy_rejects_unknown_stencils_and_small_fields():
    with pytest.raises(ValueError, match="stencil"):
        bending_energy(torch.zeros(1, 2, 6, 6), stencil="five-point")
    with pytest.raises(ValueError, match=">= 5"):
        bending_energy(torch.zeros(1, 2, 4, 6), stencil="wide")
