"""Seeded train/val/test splits and k-fold assignment over split units (cases or groups).

A *unit* is what must never straddle two splits: a case for paired/unpaired data, a group (one
subject's images) for grouped data. Unit lists are sorted before shuffling, so the result depends
only on the unit names and the generator's seed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from regflow.errors import ConfigError

SPLITS = ("train", "val", "test")


def carve_count(fraction: float, total: int, available: int) -> int:
    """How many units to move out of train for a split making up ``fraction`` of all data.

    Args:
        fraction: wanted share of all units, in [0, 1).
        total: number of units in the whole dataset.
        available: number of units now in train.

    Returns:
        ``round(fraction * total)`` (half up), at least 1 when ``fraction > 0``, and never so many
        that train would be left empty.
    """
    if fraction <= 0 or available <= 1:
        return 0
    wanted = max(1, math.floor(fraction * total + 0.5))
    return min(wanted, available - 1)


def assign_splits(units: Sequence[str], source: Mapping[str, str] | None, val_fraction: float,
                  test_fraction: float, rng: np.random.Generator) -> dict[str, str]:
    """Give every unit a split, keeping the splits the source already has.

    Units without a source split start in train. A split the source lacks ("test", then "val")
    is carved out of train at random: ``fraction`` of all units, see :func:`carve_count`.

    Args:
        units: unit names (case ids or group names).
        source: unit -> split given by the raw layout; ``None`` when the layout has no splits.
        val_fraction: share of all units for val when the source has no val.
        test_fraction: share of all units for test when the source has no test.
        rng: the seeded generator (consumed).

    Returns:
        unit -> "train" | "val" | "test".
    """
    split = {unit: (source or {}).get(unit) or "train" for unit in units}
    for name, fraction in (("test", test_fraction), ("val", val_fraction)):
        if name in split.values():
            continue
        pool = sorted(unit for unit, current in split.items() if current == "train")
        count = carve_count(fraction, len(split), len(pool))
        for unit in rng.permutation(pool)[:count]:
            split[str(unit)] = name
    return split


def assign_folds(units: Sequence[str], folds: int, rng: np.random.Generator) -> dict[str, int]:
    """Assign k-fold indices 0..folds-1 to units at random, fold sizes within one of each other.

    Args:
        units: the train+val units.
        folds: k, at least 1.
        rng: the seeded generator (consumed).

    Returns:
        unit -> fold index.

    Raises:
        ConfigError: fewer units than folds.
    """
    if folds > len(units):
        raise ConfigError(f"preprocess.folds: {folds} folds need at least {folds} train/val "
                          f"units, found {len(units)}")
    order = rng.permutation(sorted(units))
    return {str(unit): index % folds for index, unit in enumerate(order)}
