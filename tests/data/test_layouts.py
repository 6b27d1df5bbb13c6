"""regflow.data.layouts: finding cases in msd and DeepReg (NIfTI or HDF5) raw folders."""

import json
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest

from regflow.data.layouts import discover_cases
from regflow.errors import DataError


def save(path: Path, shape=(4, 4, 4)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.zeros(shape, np.float32), np.eye(4)), path)


def test_deepreg_paired_with_and_without_split_folders(tmp_path: Path) -> None:
    for split, case_id in (("train", "a"), ("train", "b"), ("test", "c")):
        for folder in ("fixed_images", "moving_images", "fixed_labels", "moving_labels"):
            save(tmp_path / "split" / split / folder / f"{case_id}.nii.gz")
            save(tmp_path / "flat" / folder / f"{case_id}.nii.gz")
    cases, msd_labels = discover_cases(tmp_path / "split", "deepreg-paired", "paired")
    assert msd_labels is None
    assert [(c.case_id, c.split) for c in cases] == [("a", "train"), ("b", "train"),
                                                     ("c", "test")]
    assert sorted(cases[0].volumes) == ["fixed_image", "fixed_label", "moving_image",
                                        "moving_label"]
    assert cases[2].volumes["moving_label"].path == (tmp_path /
                                                     "split/test/moving_labels/c.nii.gz")
    flat, _ = discover_cases(tmp_path / "flat", "deepreg-paired", "paired")
    assert [(c.case_id, c.split) for c in flat] == [("a", None), ("b", None), ("c", None)]


def test_missing_partner_is_named(tmp_path: Path) -> None:
    for folder, case_id in (("fixed_images", "a"), ("fixed_images", "b"), ("moving_images", "a")):
        save(tmp_path / "train" / folder / f"{case_id}.nii.gz")
    with pytest.raises(DataError, match=r"train/moving_images: no file for case b \(found in "
                                        r"fixed_images\)$"):
        discover_cases(tmp_path, "deepreg-paired", "paired")


def test_labels_for_some_cases_only(tmp_path: Path) -> None:
    save(tmp_path / "train/images/a.nii.gz")
    save(tmp_path / "train/labels/a.nii.gz")
    save(tmp_path / "test/images/b.nii.gz")
    with pytest.raises(DataError, match=r": case b has no label but others do$"):
        discover_cases(tmp_path, "deepreg-unpaired", "unpaired")


def test_grouped_nifti_and_h5_case_ids(tmp_path: Path) -> None:
    save(tmp_path / "nifti/images/g1/t0.nii.gz")
    save(tmp_path / "nifti/images/g1/t1.nii.gz")
    save(tmp_path / "nifti/images/g2/t0.nii.gz")
    (tmp_path / "h5").mkdir()
    with h5py.File(tmp_path / "h5/images.h5", "w") as handle:
        for key in ("group-1-0", "group-1-1", "group-my-subject-0"):
            handle[key] = np.zeros((2, 2, 2))
    nifti, _ = discover_cases(tmp_path / "nifti", "deepreg-grouped", "grouped")
    assert [(c.case_id, c.group) for c in nifti] == [("g1-t0", "g1"), ("g1-t1", "g1"),
                                                     ("g2-t0", "g2")]
    h5, _ = discover_cases(tmp_path / "h5", "deepreg-grouped", "grouped", "h5")
    assert [(c.case_id, c.group, c.volumes["image"].key) for c in h5] == [
        ("1-0", "1", "group-1-0"), ("1-1", "1", "group-1-1"),
        ("my-subject-0", "my-subject", "group-my-subject-0")]
    with h5py.File(tmp_path / "h5/images.h5", "a") as handle:
        handle["subject7"] = np.zeros((2, 2, 2))
    with pytest.raises(DataError, match=r"images.h5: key 'subject7' is not of the form"):
        discover_cases(tmp_path / "h5", "deepreg-grouped", "grouped", "h5")


def test_msd_index(tmp_path: Path) -> None:
    task = tmp_path / "Task09_X"
    save(task / "imagesTr/x_1.nii.gz")
    save(task / "labelsTr/x_1.nii.gz")
    (task / "dataset.json").write_text(json.dumps({
        "labels": {"0": "background", "1": "organ"},
        "training": [{"image": "./imagesTr/x_1.nii.gz", "label": "./labelsTr/x_1.nii.gz"}]}))
    cases, labels = discover_cases(tmp_path, "msd", "unpaired")  # subdir found
    assert labels == {0: "background", 1: "organ"}
    assert [c.case_id for c in cases] == ["x_1"] and cases[0].split is None
    (task / "dataset.json").write_text("{not json")
    with pytest.raises(DataError, match=r"Task09_X/dataset.json: not a Decathlon dataset.json"):
        discover_cases(tmp_path, "msd", "unpaired", subdir="Task09_X")
    with pytest.raises(DataError, match=r"dataset.json: missing"):
        discover_cases(tmp_path / "Task09_X" / "imagesTr", "msd", "unpaired", subdir=".")


def test_a_split_made_of_several_folders_reads_each_as_a_part(tmp_path: Path) -> None:
    """DeepReg's ``dir: [fold0, fold1]``: <root>/<split>/<part>/..., ids prefixed by the part."""
    save(tmp_path / "train/fold0/images/a.nii.gz")
    save(tmp_path / "train/fold1/images/a.nii.gz")  # the same name in another part
    save(tmp_path / "test/images/b.nii.gz")
    cases, _ = discover_cases(tmp_path, "deepreg-unpaired", "unpaired")
    assert [(c.case_id, c.split) for c in cases] == [("b", "test"), ("fold0-a", "train"),
                                                     ("fold1-a", "train")]
    (tmp_path / "h5/val/p1").mkdir(parents=True)
    (tmp_path / "h5/val/p2").mkdir(parents=True)
    for part in ("p1", "p2"):
        with h5py.File(tmp_path / f"h5/val/{part}/images.h5", "w") as handle:
            handle["group-s-0"] = np.zeros((2, 2, 2))
    grouped, _ = discover_cases(tmp_path / "h5", "deepreg-grouped", "grouped", "h5")
    assert [(c.case_id, c.group, c.split) for c in grouped] == [
        ("p1-s-0", "p1-s", "val"), ("p2-s-0", "p2-s", "val")]
