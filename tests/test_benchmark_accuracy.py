"""Tests for benchmarks.accuracy on the tiny synthetic dataset: the rows, the SimpleITK field
conversion (axis order, units) and the outputs."""

import csv
import math
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from click.testing import CliRunner

from benchmarks import accuracy
from regflow.config import load_config, load_training_config
from regflow.data.manifest import Manifest
from regflow.engine import Trainer
from regflow.paths import manifest_path


def _setup(params):
    config = load_training_config(params)
    manifest = Manifest.read(manifest_path(config))
    return config, manifest.voxel_size, manifest.channel_names


def test_no_registration_demons_and_classical_rows_are_finite(tiny_project, tmp_path):
    config, _, label_names = _setup(tiny_project)
    settings = accuracy.Settings(split="test", pairs=2, tune_pairs=2, demons_grid=((5, 1.0),),
                                 bspline=False, classical_steps=4)
    summaries, pair_rows, notes = accuracy.run_benchmark(config, settings, log=lambda _: None)

    methods = [row["method"] for row in summaries]
    assert methods[0] == "no registration"
    assert methods[1].startswith("SimpleITK demons") and "5 it, sigma 1" in methods[1]
    assert methods[2].startswith("regflow classical")
    assert len(summaries) == 3 and len(pair_rows) == 6
    for row in summaries:
        assert row["pairs"] == 2
        for column in accuracy.table_columns(label_names)[1:]:
            assert math.isfinite(row[column]), (row["method"], column)
    assert summaries[0]["sdlogj"] == summaries[0]["folding_pct"] == 0.0
    assert accuracy.PUBLISHED in notes
    assert any("check" in note and "Dice" in note for note in notes)

    markdown = accuracy.format_markdown(summaries, label_names, notes)
    written = accuracy.write_results(tmp_path / "results", "test", summaries, pair_rows,
                                     label_names, markdown)
    assert [path.name for path in written] == ["accuracy_test.md", "accuracy_test.csv",
                                               "accuracy_test_pairs.csv"]
    with open(written[1]) as handle:
        table = list(csv.DictReader(handle))
    assert [row["method"] for row in table] == methods
    assert "0.839" in written[0].read_text() and "Learn2Reg 2020 task 4" in markdown
    assert not list((tmp_path / "results").glob(".*.tmp"))


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


def test_command_writes_the_table(tiny_project, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(accuracy.main, ["--pairs", "1", "--no-demons", "--no-bspline",
                                                "--classical-steps", "0", "--out-dir", str(out)])
    assert result.exit_code == 0, result.output
    assert "| no registration | 1 |" in result.output
    assert (out / "accuracy_test.md").exists() and (out / "accuracy_test.csv").exists()


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
        summaries, _, _ = accuracy.run_benchmark(config, settings, log=lambda _: None)
        rows[refine_steps] = [row["method"] for row in summaries]
    assert rows[None] == ["no registration", "tiny (network)", "tiny (+3 refinement steps)"]
    assert rows[0] == ["no registration", "tiny (network)"]
