"""One physical pair stored in different ways: the geometry matrix of the world-space issue.

Each case keeps the anatomy and the world coordinates and changes only how volumes are stored:
flipped axes (LPS), permuted axes, the moving image resampled to 0.5 or 2 mm, a 1 x 1 x 3 mm
fixed image. Lossless cases must register like the pair as stored; resampled ones may lose what
resampling the label there and back loses.
"""

from dataclasses import dataclass

import numpy as np

from regflow import metrics
from regflow.data.transforms import resample
from regflow.inference import Volume

LABELS = [1, 2]
LPS = ((0, 1), (0, 1, 2))
PERMUTED = ((), (2, 0, 1))


def restore(volume: Volume, flips=(), order=(0, 1, 2)) -> Volume:
    """The same world content stored with flipped and permuted axes (lossless)."""
    array, affine = volume.array, volume.affine.copy()
    for axis in flips:
        array = np.flip(array, axis)
        size = volume.array.shape[axis]
        affine[:3, 3] = affine[:3, 3] + affine[:3, axis] * (size - 1)
        affine[:3, axis] = -affine[:3, axis]
    array = np.transpose(array, order)
    affine[:3, :3] = affine[:3, :3][:, list(order)]
    return Volume(np.ascontiguousarray(array), affine, volume.source + "-restored")


def respaced(volume: Volume, spacing, order: int) -> Volume:
    """The volume resampled to ``spacing`` mm (order 1 for images, 0 for label maps)."""
    array, affine = resample(volume.array, volume.affine, spacing, order=order)
    return Volume(array, affine, f"{volume.source}@{spacing}")


def mean_dice(fixed_label: np.ndarray, warped_label: np.ndarray) -> float:
    """Mean Dice over the hippocampus labels 1 and 2."""
    return float(np.mean(metrics.dice(fixed_label, warped_label, labels=LABELS)))


def resampling_loss(label: Volume, spacing) -> float:
    """1 - Dice of a label map resampled to ``spacing`` and back (on their common voxels)."""
    back = respaced(respaced(label, spacing, 0), [1.0, 1.0, 1.0], 0)
    common = tuple(slice(min(a, b)) for a, b in zip(back.array.shape, label.array.shape,
                                                    strict=True))
    return 1 - mean_dice(label.array[common], back.array[common])


@dataclass
class Case:
    """A pair as re-stored, with the Dice it may lose against the pair as stored."""

    fixed: Volume
    fixed_label: Volume
    moving: Volume
    moving_label: Volume
    allowed_loss: float
    lossless: bool


def restorage_cases(fixed: Volume, fixed_label: Volume, moving: Volume, moving_label: Volume,
                    tolerance: float = 0.02) -> dict[str, Case]:
    """The matrix: as stored, LPS, permuted, moving at 0.5 and 2 mm, fixed at 1 x 1 x 3 mm.

    ``allowed_loss`` is ``tolerance`` for lossless re-storage, plus the measured resampling loss
    of the moving label when it is resampled. The thick-slice fixed image is scored against its
    own (resampled) label, on its own grid, and may lose 0.1.
    """
    cases = {"as stored": Case(fixed, fixed_label, moving, moving_label, 0.0, True)}
    for name, (flips, order) in {"LPS": LPS, "permuted": PERMUTED}.items():
        cases[name] = Case(fixed, fixed_label, restore(moving, flips, order),
                           restore(moving_label, flips, order), tolerance, True)
    for spacing in (0.5, 2.0):
        grid = [spacing] * 3
        cases[f"moving at {spacing} mm"] = Case(
            fixed, fixed_label, respaced(moving, grid, 1), respaced(moving_label, grid, 0),
            tolerance + resampling_loss(moving_label, grid), False)
    thick = [1.0, 1.0, 3.0]
    cases["fixed at 1x1x3 mm"] = Case(respaced(fixed, thick, 1), respaced(fixed_label, thick, 0),
                                      moving, moving_label, 0.1, False)
    return cases


def assert_registers_alike(name: str, case: Case, dice: float, base: float) -> None:
    """Lossless cases within ``allowed_loss`` either way; resampled ones may lose at most it."""
    print(f"{name}: Dice {dice:.3f} (as stored {base:.3f}, allowed loss {case.allowed_loss:.3f})")
    assert dice >= base - case.allowed_loss, name
    if case.lossless:
        assert dice <= base + case.allowed_loss, name
