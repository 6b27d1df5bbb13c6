"""Tests for regflow.data.conversions, through ``regflow fetch`` of the catalogue entries that use
them: miniature upstream layouts (tests/demo_archives.py) served as an offline mirror."""

from __future__ import annotations

import json
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from scipy import ndimage

from regflow.cli import MIRROR_ENV, cli
from regflow.data.conversions import h5_affine_pair
from regflow.data.io import read_volume, write_nifti
from tests.demo_archives import (
    case_volumes,
    heart_archive,
    hnct_file,
    longitudinal_archive,
    lung_archive,
    run_regflow,
    trus_archive,
    write_mirror,
)


def test_lung_conversions_pair_by_tag_and_leave_case_020_out(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(MIRROR_ENV, str(write_mirror(tmp_path / "mirror", "learn2reg-lung-ct",
                                                    lung_archive)))
    run_regflow("fetch", "learn2reg-lung-ct")
    run_regflow("fetch", "learn2reg-lung-ct-unpaired")
    paired, unpaired = (tmp_path / "data/raw" / name for name in (
        "learn2reg-lung-ct", "learn2reg-lung-ct-unpaired"))
    cases = [f"case_{number:03d}.nii.gz" for number in range(1, 9)]
    for folder in ("fixed_images", "fixed_labels", "moving_images", "moving_labels"):
        assert sorted(path.name for path in (paired / folder).iterdir()) == cases
    assert sorted(path.name for path in (unpaired / "images").iterdir()) == cases
    source = tmp_path / "mirror/learn2reg_lung_ct/training/scans"
    assert (read_volume(paired / "moving_images" / cases[0])[0] ==
            read_volume(source / "case_001_exp.nii.gz")[0]).all()
    assert (read_volume(unpaired / "images" / cases[0])[0] ==
            read_volume(source / "case_001_exp.nii.gz")[0]).all()


def test_conversions_of_grouped_and_fold_archives(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    mirror = tmp_path / "mirror"
    write_mirror(mirror, "myops-grouped-mr-heart", heart_archive)
    write_mirror(mirror, "deepreg-prostate-longitudinal-masks", longitudinal_archive)
    write_mirror(mirror, "trus3d-prostate", trus_archive)
    monkeypatch.setenv(MIRROR_ENV, str(mirror))
    for dataset in ("myops-grouped-mr-heart", "deepreg-prostate-longitudinal-masks",
                    "trus3d-prostate"):
        run_regflow("fetch", dataset)
    raw = tmp_path / "data/raw"
    heart = raw / "myops-grouped-mr-heart" / "images"
    assert sorted(path.name for path in heart.iterdir()) == [f"{n:03d}" for n in range(1, 7)]
    assert sorted(path.name for path in (heart / "001").iterdir()) == [
        "C0.nii.gz", "DE.nii.gz", "T2.nii.gz"]
    masks = raw / "deepreg-prostate-longitudinal-masks"
    with h5py.File(masks / "labels.h5") as labels, h5py.File(masks / "images.h5") as images:
        assert sorted(labels) == sorted(images) and len(labels) == 18
        mask, smooth = labels["group-1-1"][()], images["group-1-1"][()]
        assert set(np.unique(mask)) == {0, 1}
        assert smooth.dtype == np.float32 and 0 < smooth.max() < 1
    trus = raw / "trus3d-prostate"
    with h5py.File(trus / "train/images.h5") as train, h5py.File(trus / "test/images.h5") as test:
        assert len(train) == 16 and sorted(test) == ["fold9-case000000", "fold9-case000001"]
    assert not (trus / "val/labels.h5").exists()


def _missing_mask(root: Path, rng: np.random.Generator) -> None:
    lung_archive(root, rng)
    (root / "training" / "lungMasks" / "case_003_exp.nii.gz").unlink()


def _untagged_heart(root: Path, rng: np.random.Generator) -> None:
    heart_archive(root, rng)
    write_nifti(root / "extra.nii.gz", case_volumes(rng)[0], np.eye(4))


def _bad_h5_key(root: Path, rng: np.random.Generator) -> None:
    longitudinal_archive(root, rng)
    with h5py.File(root / "data.h5", "a") as handle:
        handle.create_dataset("patient7", data=np.zeros((4, 4, 4), np.uint8))


def _no_dataset_folder(root: Path, rng: np.random.Generator) -> None:
    write_nifti(root / "abdct" / "images" / "0001.nii.gz", case_volumes(rng)[0], np.eye(4))


@pytest.mark.parametrize(("dataset", "archive", "message"), [
    ("learn2reg-lung-ct", _missing_mask, r"case_003_exp\.nii\.gz: no label case_003_exp"),
    ("myops-grouped-mr-heart", _untagged_heart,
     r"extra\.nii\.gz: expected a name <group>_<image>\.nii\.gz"),
    ("deepreg-prostate-longitudinal-masks", _bad_h5_key,
     r"data\.h5: key 'patient7' is not of the form"),
    ("learn2reg-abdomen-ct", _no_dataset_folder, r"no dataset/ folder"),
])
def test_bad_upstream_layout_is_one_line_naming_the_file_and_leaves_nothing(
        dataset, archive, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(MIRROR_ENV, str(write_mirror(tmp_path / "mirror", dataset, archive)))
    result = CliRunner().invoke(cli, ["fetch", dataset])
    assert result.exit_code == 2
    error = [line for line in result.stderr.splitlines() if line.startswith("Error")]
    assert len(error) == 1 and error[0].startswith(f"Error: {dataset}: "), result.stderr
    assert re.search(message, error[0]) and ".upstream" not in error[0], error[0]
    assert not (tmp_path / "data/raw" / dataset).exists()


def test_affine_pair_moving_is_the_fixed_volume_under_the_recorded_matrix(tmp_path):
    upstream, target = tmp_path / "upstream", tmp_path / "target"
    hnct_file(upstream, np.random.default_rng(3))
    h5_affine_pair(upstream, target, image="image", label="label", scale=0.2, seed=5)
    fixed, _ = read_volume(target / "fixed_images" / "demo.nii.gz")
    moving, _ = read_volume(target / "moving_images" / "demo.nii.gz")
    matrix = np.array(json.loads((target / "simulated_affine.json").read_text())["matrix"])
    assert not np.allclose(matrix, np.eye(4))
    voxels = np.stack(np.meshgrid(*map(np.arange, fixed.shape), indexing="ij"), -1).reshape(-1, 3)
    source = voxels @ matrix[:3, :3].T + matrix[:3, 3]
    inside = np.all((source >= 0) & (source <= np.array(fixed.shape) - 1), axis=1)
    expected = ndimage.map_coordinates(fixed, source[inside].T, order=1)
    assert np.allclose(moving.reshape(-1)[inside], expected, atol=1e-5)
    moving_label, _ = read_volume(target / "moving_labels" / "demo.nii.gz")
    assert moving_label.shape == (*fixed.shape, 2) and set(np.unique(moving_label)) <= {0, 1}
    second = tmp_path / "again"
    h5_affine_pair(upstream, second, image="image", label="label", scale=0.2, seed=5)
    assert (read_volume(second / "moving_images" / "demo.nii.gz")[0] == moving).all()
