"""Tests for benchmarks.accuracy on the tiny synthetic dataset: the rows, the SimpleITK field
conversion (axis order, units) and the results file."""

import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from click.testing import CliRunner

from benchmarks import accuracy, records
from regflow.config import load_config, load_training_config
from regflow.data.manifest import Manifest
from regflow.engine import Trainer, config_digest
from regflow.paths import manifest_path
from regflow.shipping import export_checkpoint, file_sha256


def _setup(params):
    config = load_training_config(params)
    manifest = Manifest.read(manifest_path(config))
    return config, manifest.voxel_size, manifest.channel_names


def test_no_registration_demons_and_classical_rows_are_finite(tiny_project, tmp_path):
    config, _, label_names = _setup(tiny_project)
    settings = accuracy.Settings(split="test", pairs=2, tune_pairs=2,
                                 demons_grid=((5, 1.0), (3, 2.0)), bspline=False,
                                 classical_steps=4, machine_note="a test")
    saved = []
    rows = accuracy.run_benchmark(config, settings, log=lambda _: None, on_row=saved.append)

    assert saved == rows
    assert [row["method"] for row in rows] == ["no registration", "SimpleITK demons",
                                               "regflow classical"]
    assert rows[1]["settings"].endswith("iterations and smoothing sigma tuned on val")
    assert "by mean Dice on 2 val pairs (5/1: 0." in rows[1]["notes"]
    assert ", 3/2: 0." in rows[1]["notes"]
    assert "checked against SimpleITK" in rows[1]["notes"]
    assert rows[2]["settings"].startswith("model none, 4 affine steps (lr 0.01), +4 refinement")
    digest = config_digest(config)
    for row in rows:
        assert row["split"] == "test" and row["pairs"] == 2 and row["split_pairs"] >= 2
        assert row["config_digest"] == digest and row["model"] == ""
        assert row["commit"] and row["date"].endswith("Z") and row["machine"].endswith("a test")
        assert set(row["dice"]) == set(label_names)
        for column in ("dice_mean", "dice_sd", "dice30", "hd95_mm", "sdlogj", "folding_pct",
                       "seconds_per_pair"):
            assert math.isfinite(row[column]), (row["method"], column)
        assert row["dice30"] <= row["dice_mean"] + row["dice_sd"]
    assert rows[0]["sdlogj"] == rows[0]["folding_pct"] == 0.0


def test_summary_per_label_mean_sd_and_dice30():
    pair_rows = [{"dice/a": value, "dice/b": value + 0.1, "dice_mean": value + 0.05,
                  "hd95_mean": float("nan") if value == 0.2 else 2.0, "sdlogj": 0.1,
                  "folding_pct": 0.0, "time_s": 1.0} for value in (0.2, 0.4, 0.6, 0.8)]
    summary = accuracy.summarise(pair_rows, ["a", "b"])
    assert summary["pairs"] == 4
    assert summary["dice"] == {"a": pytest.approx(0.5), "b": pytest.approx(0.6)}
    assert summary["dice_mean"] == pytest.approx(0.55)
    assert summary["dice_sd"] == pytest.approx(np.std([0.25, 0.45, 0.65, 0.85]))
    assert summary["dice30"] == pytest.approx(np.percentile([0.25, 0.45, 0.65, 0.85], 30))
    assert summary["hd95_mm"] == 2.0  # the NaN of a pair with an empty label is left out


def test_no_registration_of_identical_images_has_dice_one(tiny_project):
    config, spacing, label_names = _setup(tiny_project)
    pair = accuracy.load_pairs(manifest_path(config), "test", config, limit=1)[0]
    identical = accuracy.Pair(pair.fixed_id, pair.fixed_id, pair.fixed, pair.fixed,
                              pair.fixed_label, pair.fixed_label)
    row = accuracy.measure("none", accuracy.no_registration, [identical], spacing,
                           label_names)[0]
    assert row["dice_mean"] == 1.0
    assert all(row[f"dice/{name}"] == 1.0 for name in label_names)
    assert row["hd95_mean"] == 0.0


def test_sitk_field_components_are_reversed_and_in_voxels():
    spacing = (1.0, 2.0, 4.0)  # mm per numpy axis
    shape = (5, 6, 7)
    vectors = np.zeros((*shape, 3))
    vectors[..., 0] = 8.0  # ITK x = numpy axis 2: 8 mm = 2 voxels of 4 mm
    vectors[..., 2] = -3.0  # ITK z = numpy axis 0: -3 mm = -3 voxels of 1 mm
    field = sitk.GetImageFromArray(vectors, isVector=True)
    field.SetSpacing(list(reversed(spacing)))
    ddf = accuracy.sitk_field_to_ddf(field, spacing)
    assert ddf.shape == (3, *shape)
    np.testing.assert_allclose(ddf[0], -3.0)
    np.testing.assert_allclose(ddf[1], 0.0)
    np.testing.assert_allclose(ddf[2], 2.0)


def test_converted_field_warps_labels_as_sitk_resamples_them(tiny_project):
    config, spacing, _ = _setup(tiny_project)
    pair = accuracy.load_pairs(manifest_path(config), "test", config, limit=1)[0]
    shape = tuple(pair.fixed.shape[1:])
    vectors = np.zeros((*shape, 3))
    vectors[..., 2] = 2.0  # 2 mm along numpy axis 0: a shift that changes the labels
    vectors[..., 0] = -1.0
    field = sitk.GetImageFromArray(vectors, isVector=True)
    field.SetSpacing([float(value) for value in reversed(spacing)])
    assert (accuracy.conversion_dice(pair, field, spacing) > 0.99).all()
    shifted = accuracy.warp_label(pair.moving_label, accuracy.sitk_field_to_ddf(field, spacing))
    assert not np.array_equal(shifted > 0.5, pair.moving_label.numpy() > 0.5)

    demons = accuracy.demons_field(pair, spacing, iterations=5, sigma=1.0)
    assert (accuracy.conversion_dice(pair, demons, spacing) > 0.99).all()


def test_command_updates_its_rows_and_keeps_the_others(tiny_project, tmp_path):
    results = tmp_path / "out" / "accuracy.json"
    records.upsert(results, [{"split": "test", "method": "SimpleITK demons", "settings": "kept",
                              "dice_mean": 0.5},
                             {"split": "test", "method": "no registration",
                              "settings": "identity (zero field)", "dice_mean": -1.0}])
    result = CliRunner().invoke(accuracy.main, ["--pairs", "1", "--no-demons", "--no-bspline",
                                                "--classical-steps", "0", "--results",
                                                str(results)])
    assert result.exit_code == 0, result.output
    assert "| no registration | identity (zero field) | 1 of " in result.output
    rows = records.read(results)["rows"]
    assert [(row["method"], row["settings"]) for row in rows] == [
        ("SimpleITK demons", "kept"), ("no registration", "identity (zero field)")]
    assert rows[0]["dice_mean"] == 0.5
    assert 0.0 < rows[1]["dice_mean"] <= 1.0 and rows[1]["pairs"] == 1


def test_command_refuses_a_damaged_results_file_before_measuring(tiny_project, tmp_path):
    results = tmp_path / "accuracy.json"
    results.write_text("[1, 2]")
    result = CliRunner().invoke(accuracy.main, ["--no-demons", "--no-bspline", "--results",
                                                str(results)])
    assert result.exit_code == 2
    assert "'rows' list" in result.output and results.read_text() == "[1, 2]"


def test_one_demons_setting_is_used_without_tuning(tiny_project):
    config, _, _ = _setup(tiny_project)
    settings = accuracy.Settings(split="test", pairs=1, identity=False, demons_grid=((5, 1.5),),
                                 bspline=False, classical_steps=0)
    rows = accuracy.run_benchmark(config, settings, log=lambda _: None)
    assert [(row["method"], row["settings"]) for row in rows] == [
        ("SimpleITK demons", "fast symmetric forces after histogram matching; 5 iterations, "
                             "sigma 1.5 (given)")]
    assert rows[0]["notes"].startswith("the setting given by --demons-grid, not tuned")


def test_demons_grid_option_is_checked():
    for value in ("200", "x/1", "0/1", "200/-1"):
        result = CliRunner().invoke(accuracy.main, ["--demons-grid", value])
        assert result.exit_code == 2 and "ITERATIONS/SIGMA" in result.output, value


def test_model_option_needs_a_name():
    result = CliRunner().invoke(accuracy.main, ["--model", "best.pt"])
    assert result.exit_code == 2
    assert "NAME=PATH_OR_URI" in result.output



def test_model_rows_refine_as_the_config_says_unless_told(tiny_project):
    config = load_config(tiny_project, ["train.steps=2", "train.val_every=2",
                                        "evaluate.refine.steps=3"])
    Trainer(config, manifest_path(config), Path("models/tiny")).fit()
    rows = {}
    for refine_steps in (None, 0):
        settings = accuracy.Settings(split="test", pairs=1, demons_grid=(), bspline=False,
                                     classical_steps=0, models=(("tiny", "models/tiny/best.pt"),),
                                     refine_steps=refine_steps)
        rows[refine_steps] = accuracy.run_benchmark(config, settings, log=lambda _: None)
    assert [(row["method"], row["settings"].split(" (")[0]) for row in rows[None]] == [
        ("no registration", "identity"), ("tiny", "1 pass, network"),
        ("tiny", "1 pass, +3 refinement steps")]
    assert [row["method"] for row in rows[0]] == ["no registration", "tiny"]
    checkpoint = torch.load("models/tiny/best.pt", map_location="cpu", weights_only=False)
    model_row = rows[None][1]
    assert model_row["config_digest"] == checkpoint["extra"]["training"]["config_digest"]
    assert model_row["model"] == ("models/tiny/best.pt sha256:"
                                  + file_sha256(Path("models/tiny/best.pt"))[:12])


def test_model_rows_use_a_shipped_checkpoints_own_settings(tiny_project):
    config = load_config(tiny_project, ["train.steps=2", "train.val_every=2"])
    Trainer(config, manifest_path(config), Path("models/tiny")).fit()
    shipped_with = load_config(tiny_project, ["evaluate.refine.steps=2",
                                              "evaluate.refine.levels=1",
                                              "evaluate.refine.regularization_ratio=7"])
    export_checkpoint(Path("models/tiny/best.pt"), shipped_with, Path("shipped.pt"))
    settings = accuracy.Settings(split="test", pairs=1, demons_grid=(), bspline=False,
                                 classical_steps=0, models=(("shipped", "shipped.pt"),),
                                 own_settings=True)
    rows = accuracy.run_benchmark(config, settings, log=lambda _: None)[1:]
    assert [row["settings"] for row in rows] == [
        "1 pass, network",
        "1 pass, +2 refinement steps (lr 0.1, 1 level, regulariser ratio 7 on the field)"]
    assert {row["config_digest"] for row in rows} == {config_digest(shipped_with)}
    assert all("own test-time settings" in row["notes"] for row in rows)
