"""Tests for regflow.serving.limits: serving resource limits and their environment variables."""

import pytest

from regflow.errors import ConfigError, RequestTooLarge
from regflow.serving.limits import Limits, parse_bytes


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


def test_memory_queue_and_refinement_limits_from_the_environment():
    limits = Limits.from_env({"REGFLOW_MAX_MEMORY": "1.5G", "REGFLOW_QUEUE_TIMEOUT": "2.5",
                              "REGFLOW_MAX_REFINE_STEPS": "0"})
    assert (limits.max_memory, limits.queue_timeout_s, limits.max_refine_steps) == (
        3 * 2**29, 2.5, 0)
    assert Limits.from_env({}).max_memory == 768 * 2**20
    assert Limits.from_env({}).max_refine_steps is None
    assert [parse_bytes(text) for text in ("512", "768M", "2GiB", "64 KB")] == [
        512, 768 * 2**20, 2 * 2**30, 64 * 2**10]
    for variable, text, expected in [
            ("REGFLOW_MAX_MEMORY", "lots", "a size such as 768M or 2G"),
            ("REGFLOW_MAX_MEMORY", "0", "a size such as 768M or 2G"),
            ("REGFLOW_QUEUE_TIMEOUT", "-1", "a positive number of seconds"),
            ("REGFLOW_MAX_REFINE_STEPS", "-5", "a non-negative integer")]:
        with pytest.raises(ConfigError, match=f"^{variable}='{text}': expected {expected}$"):
            Limits.from_env({variable: text})


def test_resampled_shapes_label_values_and_refinement_steps_are_limited():
    limits = Limits(max_voxels=1000, max_channels=3)
    limits.check_resampled("v", (10, 10, 10), (1.0, 1.0, 1.0))
    with pytest.raises(RequestTooLarge, match=r"^v: resampled to the model's 1 x 1 x 1.5 mm voxels "
                                              r"shape \(480, 480, 320\) is 73,728,000 voxels, "
                                              r"over the limit of 1,000 per volume "
                                              r"\(REGFLOW_MAX_VOXELS\)$"):
        limits.check_resampled("v", (480, 480, 320), (1.0, 1.0, 1.5))
    with pytest.raises(RequestTooLarge, match=r"^l: 1,000 distinct non-zero label values, over "
                                              r"the limit of 3 per volume "
                                              r"\(REGFLOW_MAX_CHANNELS\)$"):
        limits.check_channels("l", 1000, "distinct non-zero label values")
    limits.check_refine_steps("inputs.refine_steps", 100, model_steps=100)
    with pytest.raises(RequestTooLarge, match=r"^inputs.refine_steps: 101 steps, over the limit "
                                              r"of 100 \(REGFLOW_MAX_REFINE_STEPS\)$"):
        limits.check_refine_steps("inputs.refine_steps", 101, model_steps=100)
    Limits(max_refine_steps=500).check_refine_steps("s", 500, model_steps=100)
