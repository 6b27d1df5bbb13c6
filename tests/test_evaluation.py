"""Evaluation numbers that decide who becomes @champion, against values worked out by hand."""

import math

import numpy as np
import pytest
import torch

from regflow.config import Config, LossConfig, RefineConfig
from regflow.evaluation import (
    dice_plot_rows,
    evaluate_pairs,
    headline_metrics,
    pair_metrics,
    summarise,
)
from regflow.inference import Registrar, record_from_config
from regflow.models import RegistrationModel

SHAPE = (10, 10, 10)
SPACING = (1.5, 1.0, 2.0)


def cube(start, size=4) -> np.ndarray:
    mask = np.zeros(SHAPE, np.float32)
    mask[tuple(slice(s, s + size) for s in start)] = 1
    return mask


def test_pair_metrics_of_a_shifted_cube_match_the_hand_computation():
    fixed = np.stack([cube((2, 2, 2)), cube((1, 5, 5), size=2)])
    warped = np.stack([cube((4, 2, 2)), cube((1, 5, 5), size=2)])  # label 0 moved 2 voxels
    ddf = np.zeros((3, *SHAPE), np.float32)
    row = pair_metrics(fixed, warped, ddf, SPACING, ["a", "b"], with_hd95=True)
    # label a: 4x4x4 cubes overlapping on 2x4x4 = 32 of 64 + 64 voxels -> 2 * 32 / 128
    assert row["dice/a"] == pytest.approx(0.5)
    assert row["dice/b"] == 1.0
    assert row["dice_mean"] == pytest.approx(0.75)
    # centroids 2 voxels apart along axis 0 (1.5 mm) for a, 0 for b -> mean 1.5 mm
    assert row["centroid_distance_mm"] == pytest.approx(1.5)
    assert row["hd95/b"] == 0.0
    assert row["hd95/a"] == pytest.approx(3.0)  # the far faces are 2 voxels x 1.5 mm apart
    assert row["folding_pct"] == 0.0 and row["sdlogj"] == pytest.approx(0.0, abs=1e-12)


def test_pair_metrics_of_a_label_absent_from_both_sides():
    empty = np.zeros((1, *SHAPE), np.float32)
    row = pair_metrics(empty, empty, None, SPACING, ["gone"], with_hd95=True)
    assert row["dice/gone"] == 1.0  # nothing to find, nothing found
    assert math.isnan(row["hd95_mean"]) and math.isnan(row["centroid_distance_mm"])
    assert "folding_pct" not in row  # no DDF, no regularity


def test_pair_metrics_of_a_folding_field():
    ddf = np.zeros((3, *SHAPE), np.float32)
    ddf[0, 5] = -3.0  # slice 5 jumps back over slices 3 and 4: the map folds around it
    row = pair_metrics(None, None, ddf, SPACING, [], with_hd95=False)
    assert row["folding_pct"] > 0 and row["sdlogj"] > 0
    assert set(row) == {"folding_pct", "sdlogj"}


ROWS = [
    {"fixed_id": "f1", "moving_id": "m1", "method": "regflow", "time_s": 0.1,
     "dice/a": 0.8, "dice/b": 0.6, "dice_mean": 0.7, "hd95_mean": 2.0,
     "centroid_distance_mm": 1.0, "folding_pct": 0.5, "sdlogj": 0.1},
    {"fixed_id": "f2", "moving_id": "m2", "method": "regflow", "time_s": 0.3,
     "dice/a": 0.6, "dice/b": float("nan"), "dice_mean": 0.6, "hd95_mean": 4.0,
     "centroid_distance_mm": 3.0, "folding_pct": 1.5, "sdlogj": 0.3},
    {"fixed_id": "f1", "moving_id": "m1", "method": "none", "time_s": 0.0,
     "dice/a": 0.4, "dice/b": 0.2, "dice_mean": 0.3, "hd95_mean": 6.0,
     "centroid_distance_mm": 5.0, "folding_pct": 0.0, "sdlogj": 0.0},
    {"fixed_id": "f2", "moving_id": "m2", "method": "none", "time_s": 0.0,
     "dice/a": 0.2, "dice/b": 0.4, "dice_mean": 0.3, "hd95_mean": 8.0,
     "centroid_distance_mm": 7.0, "folding_pct": 0.0, "sdlogj": 0.0},
]


def test_summarise_averages_one_method_and_ignores_nan():
    summary = summarise(ROWS, "regflow")
    assert summary["dice/a"] == pytest.approx(0.7)
    assert summary["dice/b"] == pytest.approx(0.6)  # the NaN of pair 2 is left out
    assert summary["time_s"] == pytest.approx(0.2)
    assert summarise(ROWS, "none")["dice_mean"] == pytest.approx(0.3)


def test_headline_metrics_pair_before_and_after():
    headline = headline_metrics(ROWS, ["a", "b"])
    assert headline == {
        "pairs": 2.0, "dice_mean": 0.65, "dice_mean_before": 0.3, "hd95_mean": 3.0,
        "hd95_mean_before": 7.0, "centroid_distance_mm": 2.0, "centroid_distance_mm_before": 6.0,
        "folding_pct": 1.0, "sdlogj": 0.2, "dice_a": 0.7, "dice_b": 0.6, "dice30": 0.63,
        "time_ms_per_pair": 200.0}


def test_dice30_is_the_30th_percentile_of_the_pairs_dice():
    rows = [{"fixed_id": str(k), "moving_id": "m", "method": "regflow", "time_s": 0.1,
             "dice_mean": dice} for k, dice in enumerate([0.9, 0.1, 0.5, 0.7, 0.3, 0.8, 0.2,
                                                          0.6, 0.4, float("nan"), 1.0])]
    # sorted 0.1 ... 1.0 (the NaN pair left out): rank 0.3 * 9 = 2.7 -> 0.3 + 0.7 * 0.1
    assert headline_metrics(rows, [])["dice30"] == pytest.approx(0.37)


def test_dice_plot_rows_one_row_per_label_and_method():
    table = dice_plot_rows(ROWS, ["a", "b"])
    assert [(row["label"], row["method"]) for row in table] == [
        ("a", "none"), ("b", "none"), ("a", "regflow"), ("b", "regflow")]
    assert table[0]["dice"] == pytest.approx(0.3)
    assert table[3]["dice"] == pytest.approx(0.6)  # NaN pairs left out, as in the headline


def near_identity_registrar() -> Registrar:
    """A fresh LocalNet: its field heads start at ~0 voxels, so labels come back as they were."""
    torch.manual_seed(0)
    model = RegistrationModel(channels=(4, 8), ndim=3)
    return Registrar(model, record_from_config(Config()), LossConfig(), RefineConfig(),
                     torch.device("cpu"))


def test_evaluate_pairs_rows_baseline_and_label_index():
    label = torch.from_numpy(cube((2, 2, 2)))[None, None]
    batch = {"fixed_image": torch.zeros(1, 1, *SHAPE), "moving_image": torch.zeros(1, 1, *SHAPE),
             "fixed_label": label, "moving_label": label, "fixed_id": ["f"], "moving_id": ["m"],
             "label_index": torch.tensor([1])}
    rows = evaluate_pairs(near_identity_registrar(), [batch], SPACING, ["a", "b"], baseline=True)
    assert [row["method"] for row in rows] == ["regflow", "none"]
    assert rows[0]["label_index"] == 1 and "dice/b" in rows[0] and "dice/a" not in rows[0]
    assert rows[0]["dice/b"] == 1.0 and rows[0]["time_s"] > 0 and rows[1]["time_s"] == 0.0
    assert rows[1]["dice/b"] == 1.0 and rows[1]["folding_pct"] == 0.0
