"""Tests for regflow.limits: serving resource limits and their environment variables."""

import pytest

from regflow.errors import ConfigError, RequestTooLarge
from regflow.limits import Limits


def test_limits_from_the_environment():
    assert Limits.from_env({}) == Limits(256**3, 8, 16)
    assert Limits.from_env({"REGFLOW_MAX_VOXELS": "1_000", "REGFLOW_MAX_PAIRS": " 2 "}) == Limits(
        max_voxels=1000, max_pairs=2)
    for value in ("0", "-3", "many", "1.5"):
        with pytest.raises(ConfigError, match=f"REGFLOW_MAX_PAIRS='{value}': expected a positive"):
            Limits.from_env({"REGFLOW_MAX_PAIRS": value})
    with pytest.raises(ConfigError, match="max_voxels: expected a positive integer, got 0"):
        Limits(max_voxels=0)


def test_checks_name_the_limit_and_its_variable():
    limits = Limits(max_voxels=1000, max_pairs=2, max_channels=3)
    limits.check_pairs(2)
    limits.check_volume("v", (10, 10, 10), 3)
    with pytest.raises(RequestTooLarge, match=r"^inputs: 3 pairs, over the limit of 2 per request "
                                              r"\(REGFLOW_MAX_PAIRS\)"):
        limits.check_pairs(3)
    with pytest.raises(RequestTooLarge, match=r"^v: shape \(10, 10, 11\) is 1,100 voxels, over the "
                                              r"limit of 1,000 per volume \(REGFLOW_MAX_VOXELS\)$"):
        limits.check_volume("v", (10, 10, 11), 1)
    with pytest.raises(RequestTooLarge, match=r"^v: 4 channels, over the limit of 3 per volume "
                                              r"\(REGFLOW_MAX_CHANNELS\)$"):
        limits.check_volume("v", (2, 2, 2), 4)
