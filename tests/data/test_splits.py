"""regflow.data.splits: seeded carving of val/test out of train, k-fold assignment."""

from collections import Counter

import numpy as np
import pytest

from regflow.data.splits import assign_folds, assign_splits, carve_count
from regflow.errors import ConfigError

UNITS = [f"u{k}" for k in range(10)]


def test_carve_count_rounds_half_up_and_keeps_train() -> None:
    assert carve_count(0.1, 12, 12) == 1 and carve_count(0.1, 27, 25) == 3
    assert carve_count(0.25, 10, 10) == 3  # 2.5 rounds up, not to even
    assert carve_count(0.01, 10, 10) == 1  # a wanted split is never empty
    assert carve_count(0.0, 12, 12) == 0 and carve_count(0.5, 4, 1) == 0
    assert carve_count(0.9, 10, 4) == 3  # one unit always stays in train


def test_random_split_without_source_splits() -> None:
    split = assign_splits(UNITS, None, 0.2, 0.1, np.random.default_rng(0))
    assert Counter(split.values()) == {"train": 7, "val": 2, "test": 1}
    assert split == assign_splits(list(reversed(UNITS)), None, 0.2, 0.1,
                                  np.random.default_rng(0))  # input order does not matter
    assert split != assign_splits(UNITS, None, 0.2, 0.1, np.random.default_rng(1))


def test_source_splits_are_kept_and_val_carved_from_train() -> None:
    source = dict.fromkeys(UNITS[:2], "test") | dict.fromkeys(UNITS[2:], "train")
    split = assign_splits(UNITS, source, 0.2, 0.1, np.random.default_rng(0))
    assert [split[u] for u in UNITS[:2]] == ["test", "test"]
    assert Counter(split.values()) == {"train": 6, "val": 2, "test": 2}
    with_val = source | {"u9": "val"}
    assert assign_splits(UNITS, with_val, 0.2, 0.1, np.random.default_rng(0)) == with_val


def test_folds_cover_units_with_sizes_within_one() -> None:
    folds = assign_folds(UNITS, 4, np.random.default_rng(0))
    assert set(folds) == set(UNITS)
    assert sorted(Counter(folds.values()).values()) == [2, 2, 3, 3]
    assert folds == assign_folds(UNITS, 4, np.random.default_rng(0))
    with pytest.raises(ConfigError, match=r"^preprocess.folds: 11 folds need at least 11"):
        assign_folds(UNITS, 11, np.random.default_rng(0))
