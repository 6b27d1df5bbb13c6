"""Deformation regularisers: gradient norm and bending energy of a dense displacement field.

The field is (B, ndim, *S) in voxels, ndim 2 or 3. Derivatives are central finite differences
(unit voxel spacing) evaluated on the interior, one voxel in from every face, with no padding: the
stencils are exact for quadratic fields, so an affine field has zero bending energy and a
translation zero gradient. Both follow DeepReg's reduction: the squared (or absolute) derivatives
are summed over the derivative directions and averaged over displacement components, voxels and
batch. DeepReg's defaults differ: its gradient norm is ``norm="l2"`` and its bending energy is
``stencil="wide"`` (first differences applied twice, on a domain two voxels in from every face).
"""

from __future__ import annotations

import torch


def _check_ddf(ddf: torch.Tensor, min_size: int = 3) -> int:
    """Return ndim after checking ddf is (B, ndim, *S) with every spatial size >= ``min_size``."""
    ndim = ddf.dim() - 2
    if ndim not in (2, 3) or ddf.shape[1] != ndim:
        raise ValueError(f"expected a ddf of shape (B, ndim, *S) with ndim 2 or 3, "
                         f"got {tuple(ddf.shape)}")
    if min(ddf.shape[2:]) < min_size:
        raise ValueError(f"ddf {tuple(ddf.shape)}: every spatial size must be >= {min_size}")
    return ndim


def _shifted(ddf: torch.Tensor, offsets: dict[int, int]) -> torch.Tensor:
    """The field sampled at interior voxel x + offset: (B, ndim, *S) -> (B, ndim, *(S - 2)).

    Args:
        ddf: the field.
        offsets: spatial axis (0-based) -> offset in {-1, 0, 1}; missing axes have offset 0.
    """
    index = [slice(None), slice(None)]
    for axis, size in enumerate(ddf.shape[2:]):
        offset = offsets.get(axis, 0)
        index.append(slice(1 + offset, size - 1 + offset))
    return ddf[tuple(index)]


def _first_derivative(ddf: torch.Tensor, axis: int) -> torch.Tensor:
    """(u(x + e) - u(x - e)) / 2 along ``axis`` on the interior."""
    return (_shifted(ddf, {axis: 1}) - _shifted(ddf, {axis: -1})) / 2


def _difference(field: torch.Tensor, axis: int) -> torch.Tensor:
    """u(x + e) - u(x - e) along tensor ``axis``, which shrinks by 2; other axes are kept whole."""
    size = field.shape[axis]
    return field.narrow(axis, 2, size - 2) - field.narrow(axis, 0, size - 2)


def gradient_norm(ddf: torch.Tensor, norm: str = "l1") -> torch.Tensor:
    """Mean norm of the displacement gradient.

    Args:
        ddf: (B, ndim, *S) displacement field in voxels, spatial sizes >= 3.
        norm: "l1" sums |du_i / dx_j| over directions j, "l2" sums (du_i / dx_j)^2.

    Returns:
        scalar >= 0 (dimensionless for l1, squared for l2): the sum over directions, averaged over
        components i, interior voxels and batch. 0 for a translation; scales with the amplitude
        (l1) or its square (l2).
    """
    ndim = _check_ddf(ddf)
    if norm not in ("l1", "l2"):
        raise ValueError(f"norm {norm!r}: expected 'l1' or 'l2'")
    derivatives = torch.stack([_first_derivative(ddf, axis) for axis in range(ndim)])
    magnitude = derivatives.abs() if norm == "l1" else derivatives.square()
    return magnitude.sum(dim=0).mean()


STENCILS = ("compact", "wide")


def _wide_bending_energy(ddf: torch.Tensor, ndim: int) -> torch.Tensor:
    """Bending energy from central first differences applied twice (DeepReg's stencil).

    Each pass crops one voxel per face on every axis, so the energy lives on (S - 4); the pure
    second derivative becomes (u(x + 2e) - 2 u(x) + u(x - 2e)) / 4.
    """
    first = [_first_derivative(ddf, axis) for axis in range(ndim)]  # each (B, ndim, *(S - 2))
    total, count = 0, 0
    for j in range(ndim):
        for k in range(j, ndim):
            second = _first_derivative(first[j], k)  # (B, ndim, *(S - 4))
            total = total + (1 if j == k else 2) * second.square().sum()
            count = second.numel()
    return total / count


def bending_energy(ddf: torch.Tensor, stencil: str = "compact") -> torch.Tensor:
    """Mean bending energy (thin-plate) of the displacement field.

    Per voxel and component: sum_j (d2u/dx_j^2)^2 + 2 * sum_{j<k} (d2u/dx_j dx_k)^2.

    Args:
        ddf: (B, ndim, *S) displacement field in voxels, spatial sizes >= 3 ("compact") or >= 5
            ("wide").
        stencil: "compact": pure second derivatives from [1, -2, 1] and mixed ones from the
            4-point stencil / 4, on the interior (S - 2). "wide": central first differences
            applied twice, as DeepReg does, on (S - 4); it sees every other voxel along an axis
            and so ignores a checkerboard.

    Returns:
        scalar >= 0 in voxel^-2: averaged over components, voxels and batch.
        0 for any affine field; scales with the amplitude squared.
    """
    if stencil not in STENCILS:
        raise ValueError(f"stencil {stencil!r}: expected one of {STENCILS}")
    ndim = _check_ddf(ddf, 3 if stencil == "compact" else 5)
    if stencil == "wide":
        return _wide_bending_energy(ddf, ndim)
    interior = _shifted(ddf, {})
    # Sums of squares, reduced as soon as each term is formed: no per-voxel energy map is kept.
    pure = sum((_shifted(ddf, {axis: 1}) + _shifted(ddf, {axis: -1})).sub_(interior, alpha=2)
               .square().sum() for axis in range(ndim))
    # The 4-point mixed stencil is a central difference of a central difference (each without the
    # 1/2), so one difference along ``second`` serves every ``first < second``.
    mixed = 0
    for second in range(1, ndim):
        along_second = _difference(ddf, 2 + second)
        for first in range(second):
            cross = _difference(along_second, 2 + first)
            for other in set(range(ndim)) - {first, second}:
                cross = cross.narrow(2 + other, 1, cross.shape[2 + other] - 2)
            mixed = mixed + cross.square().sum()
    # mixed derivative = stencil / 4, counted twice: 2 / 16 = 1 / 8
    return (pure + mixed / 8) / interior.numel()
