"""DeepReg's predict output: the pair_<i>/ tree and the metrics CSVs, checked by hand."""

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from regflow.cli import cli
from regflow.deepreg_layout import DeepRegWriter, pair_rows, statistics_rows

SHAPE = (8, 8, 8)


def cube(start: tuple[int, int, int]) -> np.ndarray:
    """A 4x4x4 cube of ones starting at ``start``."""
    mask = np.zeros(SHAPE, np.float32)
    mask[tuple(slice(s, s + 4) for s in start)] = 1
    return mask


def test_pair_rows_hold_the_hand_computed_values():
    fixed, warped = np.zeros(SHAPE, np.float32), np.full(SHAPE, 0.5, np.float32)
    fixed_label = np.stack([cube((0, 0, 0)), cube((2, 2, 2))])
    warped_label = np.stack([cube((2, 0, 0)), cube((2, 2, 2))])  # first shifted 2 voxels in x
    rows = pair_rows(3, {"fixed_id": "a", "moving_id": "b"}, fixed, warped,
                     np.zeros((3, *SHAPE), np.float32), fixed_label, warped_label)
    assert [row["label_index"] for row in rows] == [0, 1]
    first, second = rows
    assert first["pair_index"] == 3 and first["fixed_id"] == "a"
    assert first["image_ssd"] == pytest.approx(0.25)  # (0 - 0.5)^2 everywhere
    assert first["label_binary_dice"] == pytest.approx(2 * 32 / (64 + 64))  # 2x4x4 overlap
    assert first["label_tre"] == pytest.approx(2.0)
    assert (second["label_binary_dice"], second["label_tre"]) == (1.0, 0.0)
    assert first["folding_pct"] == 0.0 and first["sdlogj"] == 0.0
    assert pair_rows(0, {}, fixed, warped, None, None, None) == [
        {"label_index": -1, "pair_index": 0, "image_ssd": 0.25}]


def test_statistics_are_mean_std_median_and_quartiles_per_label_and_overall():
    rows = [{"label_index": 0, "label_binary_dice": value} for value in (0.5, 1.0)] + [
        {"label_index": 1, "label_binary_dice": value} for value in (0.2, 0.4, 0.6, float("nan"))]
    per_label = statistics_rows(rows, by_label=True)
    assert [row["label_index"] for row in per_label] == [0, 1]
    first, second = per_label
    assert first["label_binary_dice_mean"] == pytest.approx(0.75)
    assert first["label_binary_dice_std"] == pytest.approx(np.sqrt(0.125))  # n - 1
    assert first["label_binary_dice_median"] == pytest.approx(0.75)
    assert first["label_binary_dice_q1"] == pytest.approx(0.625)
    assert first["label_binary_dice_q3"] == pytest.approx(0.875)
    assert second["label_binary_dice_mean"] == pytest.approx(0.4)  # the NaN left out
    assert second["label_binary_dice_q1"] == pytest.approx(0.3)
    assert np.isnan(first["label_tre_mean"])
    (overall,) = statistics_rows(rows, by_label=False)
    assert overall["label_binary_dice_median"] == pytest.approx(0.5)  # of 0.2 .. 1.0
    assert "label_index" not in overall


def test_writer_puts_each_volume_in_deepregs_tree(tmp_path):
    fixed_label = torch.from_numpy(np.stack([cube((0, 0, 0))]))[None]
    batch = {"fixed_image": torch.rand(1, 1, *SHAPE), "moving_image": torch.rand(1, 1, *SHAPE),
             "fixed_label": fixed_label, "moving_label": fixed_label.clone(),
             "fixed_affine": torch.eye(4, dtype=torch.float64)[None],
             "fixed_id": ["f"], "moving_id": ["m"]}
    outputs = {"warped": batch["moving_image"], "warped_label": fixed_label * 0.9,
               "ddf": torch.zeros(1, 3, *SHAPE)}
    writer = DeepRegWriter(tmp_path)
    writer(batch, outputs, 0)
    writer.write_metrics()
    names = {str(path.relative_to(tmp_path)) for path in tmp_path.rglob("*.nii.gz")}
    assert names == {"pair_0/fixed_image.nii.gz", "pair_0/moving_image.nii.gz",
                     "pair_0/pred_fixed_image.nii.gz", "pair_0/ddf.nii.gz",
                     "pair_0/label_0/fixed_label.nii.gz", "pair_0/label_0/moving_label.nii.gz",
                     "pair_0/label_0/pred_fixed_label.nii.gz"}
    assert nib.load(tmp_path / "pair_0/ddf.nii.gz").shape == (*SHAPE, 3)
    assert len(list((tmp_path / "pair_0/fixed_image").glob("depth*_fixed_image.png"))) == 8
    assert (tmp_path / "pair_0/ddf/depth7_ddf.png").is_file()
    assert (tmp_path / "pair_0/label_0/pred_fixed_label/depth0_pred_fixed_label.png").is_file()
    with (tmp_path / "metrics.csv").open() as handle:
        (row,) = list(csv.DictReader(handle))
    assert float(row["label_binary_dice"]) == 1.0  # 0.9 thresholded at 0.5
    assert {"metrics_stats_per_label.csv", "metrics_stats_overall.csv"} <= {
        path.name for path in tmp_path.iterdir()}


def test_predict_split_with_the_deepreg_layout(tiny_project):
    out = Path("predicted")
    result = CliRunner().invoke(cli, ["predict", "--model", "none", "--refine-steps", "2",
                                      "--split", "test", "--layout", "deepreg", "--out",
                                      str(out)])
    assert result.exit_code == 0, result.output
    pairs = sorted(path.name for path in out.glob("pair_*"))
    assert pairs == ["pair_0", "pair_1"]  # the 2 test cases, both ways
    with (out / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(row["pair_index"], row["label_index"]) for row in rows] == [
        ("0", "0"), ("0", "1"), ("1", "0"), ("1", "1")]
    assert all(0 <= float(row["label_binary_dice"]) <= 1 for row in rows)
    assert all(float(row["image_ssd"]) >= 0 for row in rows)


def test_deepreg_layout_without_a_split_is_one_line(tiny_project):
    result = CliRunner().invoke(cli, ["predict", "--model", "none", "--fixed", "a.nii.gz",
                                      "--moving", "b.nii.gz", "--layout", "deepreg",
                                      "--out", "x"])
    assert result.exit_code == 2
    assert "--layout deepreg writes a split's pairs; give --split" in result.output
    assert not Path("x").exists()
