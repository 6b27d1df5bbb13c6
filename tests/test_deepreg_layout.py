"""DeepReg's predict output: the pair_<i>/ tree and the metrics CSVs, checked by hand."""

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from regflow.cli import cli
from regflow.data.manifest import Manifest
from regflow.deepreg.layout import (
    DeepRegWriter,
    describe,
    pair_rows,
    statistics_overall,
    statistics_per_label,
)
from regflow.models import RegistrationModel
from regflow.spatial import integrate_dvf

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


def test_statistics_match_deepregs_pandas_tables():
    """DeepReg: per label ``groupby(label_index)`` mean/median/std, columns sorted; overall
    ``describe()``. pandas (installed with MLflow) computes the expected tables here."""
    import pandas as pd

    rows = [{"pair_index": 0, "label_index": 0, "label_binary_dice": 0.5, "image_ssd": 0.1},
            {"pair_index": 1, "label_index": 0, "label_binary_dice": 1.0, "image_ssd": 0.3},
            {"pair_index": 0, "label_index": 1, "label_binary_dice": 0.2, "image_ssd": 0.1},
            {"pair_index": 1, "label_index": 1, "label_binary_dice": 0.4, "image_ssd": 0.3},
            {"pair_index": 2, "label_index": 1, "label_binary_dice": 0.6, "image_ssd": 0.7,
             "label_tre": float("nan")}]
    frame = pd.DataFrame(rows)
    grouped = frame.drop(["pair_index"], axis=1).groupby(["label_index"])
    expected = pd.concat([grouped.mean().add_suffix("_mean"),
                          grouped.median().add_suffix("_median"),
                          grouped.std().add_suffix("_std")], axis=1, sort=True)
    expected = expected.reindex(sorted(expected.columns), axis=1)
    per_label = statistics_per_label(rows)
    assert [list(row) for row in per_label] == [["label_index", *expected.columns]] * 2
    for row in per_label:
        for column in expected.columns:
            np.testing.assert_allclose(row[column], expected.loc[row["label_index"], column])
    described = frame.drop(["pair_index", "label_index"], axis=1).describe()
    overall = statistics_overall(rows)
    assert [row[""] for row in overall] == list(described.index)
    for row in overall:
        for column in described.columns:
            np.testing.assert_allclose(row[column], described.loc[row[""], column])
    assert describe(np.array([]))["count"] == 0.0


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


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("sample_label", ["sample", "all"])
def test_sampled_labels_go_to_their_own_label_folder_of_one_pair_folder(tiny_project,
                                                                         sample_label):
    """Under sample/all every (pair, label) item is one batch entry with one label channel:
    DeepReg writes it to pair_<i>/label_<k> with k the label's index, one pair folder per pair."""
    out = Path("predicted")
    result = CliRunner().invoke(cli, ["predict", "--model", "none", "--refine-steps", "1",
                                      "-S", f"loader.sample_label={sample_label}",
                                      "--split", "test", "--layout", "deepreg", "--out",
                                      str(out)])
    assert result.exit_code == 0, result.output
    assert sorted(path.name for path in out.glob("pair_*")) == ["pair_0", "pair_1"]
    rows = read_rows(out / "metrics.csv")
    assert [(row["pair_index"], row["label_index"]) for row in rows] == [
        ("0", "0"), ("0", "1"), ("1", "0"), ("1", "1")]
    processed = Path("data/processed/tiny")
    for row in rows:
        pair, label = int(row["pair_index"]), int(row["label_index"])
        folder = out / f"pair_{pair}" / f"label_{label}"
        expected = nib.load(processed / "labels" / f"{row['fixed_id']}.nii.gz").get_fdata()
        written = nib.load(folder / "fixed_label.nii.gz").get_fdata()
        assert np.array_equal(written, expected == label + 1)  # label values 1 and 2
        warped = nib.load(folder / "pred_fixed_label.nii.gz").get_fdata()
        dice = 2 * (written * warped).sum() / (written.sum() + warped.sum())
        assert float(row["label_binary_dice"]) == pytest.approx(dice, abs=1e-6)
    per_label = read_rows(out / "metrics_stats_per_label.csv")
    assert [row["label_index"] for row in per_label] == ["0", "1"]
    for stats in per_label:
        values = [float(row["label_binary_dice"]) for row in rows
                  if row["label_index"] == stats["label_index"]]
        assert float(stats["label_binary_dice_mean"]) == pytest.approx(np.mean(values))


def test_conditional_outputs_write_the_label_tree_without_image_or_field(tmp_path):
    """A conditional model predicts the fixed label only: no warped image, no DDF."""
    fixed_label = torch.from_numpy(cube((0, 0, 0)))[None, None]
    batch = {"fixed_image": torch.rand(1, 1, *SHAPE), "moving_image": torch.rand(1, 1, *SHAPE),
             "fixed_label": fixed_label, "moving_label": fixed_label.clone(),
             "fixed_affine": torch.eye(4, dtype=torch.float64)[None],
             "fixed_id": ["f"], "moving_id": ["m"], "label_index": torch.tensor([-1])}
    writer = DeepRegWriter(tmp_path)
    writer(batch, {"warped_label": fixed_label * 0.8}, 0)
    writer.write_metrics()
    names = {str(path.relative_to(tmp_path)) for path in tmp_path.rglob("*.nii.gz")}
    assert names == {"pair_0/fixed_image.nii.gz", "pair_0/moving_image.nii.gz",
                     "pair_0/label_0/fixed_label.nii.gz", "pair_0/label_0/moving_label.nii.gz",
                     "pair_0/label_0/pred_fixed_label.nii.gz"}
    (row,) = read_rows(tmp_path / "metrics.csv")
    assert float(row["label_binary_dice"]) == 1.0 and row["image_ssd"] == ""


@pytest.mark.parametrize("method", ["affine", "dvf", "conditional"])
def test_each_method_writes_its_own_outputs(tiny_project, method):
    """affine.txt for affine models, the DVF for DVF models, labels only for conditional ones."""
    manifest = Manifest.read(Path("data/processed/tiny/manifest.json"))
    model = RegistrationModel(method, "global" if method == "affine" else "local", channels=[4],
                              label_channels=2)
    model.save("model.pt", extra={"preprocessing": manifest.record().model_dump(mode="json")})
    out = Path("predicted")
    result = CliRunner().invoke(cli, ["predict", "--model", "model.pt", "--refine-steps", "0",
                                      "--split", "test", "--layout", "deepreg", "--no-png",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    pair = out / "pair_0"
    assert not list(out.rglob("*.png"))
    if method == "affine":  # an untrained GlobalNet returns exactly [I | 0]
        theta = np.loadtxt(pair / "affine.txt", delimiter=",")
        np.testing.assert_array_equal(theta, np.eye(3, 4))
        assert not (pair / "dvf.nii.gz").exists()
    elif method == "conditional":
        names = {path.name for path in pair.rglob("*.nii.gz")}
        assert names == {"fixed_image.nii.gz", "moving_image.nii.gz", "fixed_label.nii.gz",
                         "moving_label.nii.gz", "pred_fixed_label.nii.gz"}
        assert {path.name for path in pair.glob("label_*")} == {"label_0", "label_1"}
    else:
        dvf = nib.load(pair / "dvf.nii.gz").get_fdata()
        ddf = nib.load(pair / "ddf.nii.gz").get_fdata()
        assert dvf.shape == (16, 24, 16, 3) and np.abs(dvf).max() > 0
        integrated = integrate_dvf(torch.from_numpy(np.moveaxis(dvf, -1, 0))[None].float())
        np.testing.assert_allclose(np.moveaxis(integrated[0].numpy(), 0, -1), ddf, atol=1e-6)
        assert not (pair / "affine.txt").exists()


def test_no_nifti_keeps_pngs_and_metrics_and_the_flags_need_the_deepreg_layout(tiny_project):
    result = CliRunner().invoke(cli, ["predict", "--model", "none", "--refine-steps", "1",
                                      "--split", "test", "--layout", "deepreg", "--no-nifti",
                                      "--out", "predicted"])
    assert result.exit_code == 0, result.output
    assert not list(Path("predicted").rglob("*.nii.gz"))
    assert (Path("predicted") / "pair_0/fixed_image/depth0_fixed_image.png").is_file()
    assert (Path("predicted") / "metrics_stats_overall.csv").is_file()
    result = CliRunner().invoke(cli, ["predict", "--model", "none", "--refine-steps", "1",
                                      "--split", "test", "--no-png", "--out", "flat"])
    assert result.exit_code == 2
    assert "add --layout deepreg" in result.output
    assert not Path("flat").exists()
