"""regflow.data.io: NIfTI/HDF5 reading with the file's dtype and affine, atomic NIfTI writing."""

import gzip
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest

from regflow.data.io import (
    h5_keys,
    is_nifti,
    nifti_stem,
    read_h5_volume,
    read_volume,
    volume_shape,
    write_nifti,
)
from regflow.errors import DataError

AFFINE = np.array([[0.5, 0, 0, -3.0], [0, 1.5, 0, 2.0], [0, 0, 2.0, 7.5], [0, 0, 0, 1]])


def test_reads_mirror_volume_in_stored_dtype(mirror: Path) -> None:
    image, affine = read_volume(mirror / "Task04_Hippocampus/imagesTr/hippocampus_001.nii.gz")
    label, _ = read_volume(mirror / "Task04_Hippocampus/labelsTr/hippocampus_003.nii.gz")
    assert image.shape == (35, 51, 35) and image.dtype == np.uint8
    np.testing.assert_array_equal(affine, [[1, 0, 0, 1], [0, 1, 0, 1], [0, 0, 1, 1], [0, 0, 0, 1]])
    assert label.dtype == np.float32  # stored float32: not widened to float64
    assert set(np.unique(label)) == {0.0, 1.0, 2.0}


def test_write_then_read_round_trip(tmp_path: Path) -> None:
    label = np.random.default_rng(0).integers(0, 3, size=(4, 5, 6, 2)).astype(np.uint8)
    path = write_nifti(tmp_path / "label.nii.gz", label, AFFINE)
    array, affine = read_volume(path)
    assert array.dtype == np.uint8
    np.testing.assert_array_equal(array, label)
    np.testing.assert_allclose(affine, AFFINE)
    header = nib.load(path).header
    assert int(header["qform_code"]) == 1 and int(header["sform_code"]) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["label.nii.gz"]  # no temporary left


def test_write_replaces_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "image.nii"
    write_nifti(path, np.zeros((3, 3, 3), np.float32), np.eye(4))
    write_nifti(path, np.full((2, 2, 2), 7.0, np.float32), AFFINE)
    array, affine = read_volume(path)
    assert array.shape == (2, 2, 2) and float(array.max()) == 7.0
    np.testing.assert_allclose(affine, AFFINE)


@pytest.mark.parametrize("payload", [b"this is not an image" * 20,
                                     gzip.compress(b"\x00" * 400)[:30]])
def test_corrupt_nifti_is_a_data_error_naming_the_file(tmp_path: Path, payload: bytes) -> None:
    path = tmp_path / "h_001.nii.gz"
    path.write_bytes(payload)
    with pytest.raises(DataError, match=rf"^{path}: not a readable NIfTI file \("):
        read_volume(path)
    with pytest.raises(DataError, match="not a readable NIfTI file"):
        volume_shape(path)


def test_missing_nifti_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=rf"{tmp_path / 'nope.nii.gz'}: no such file"):
        read_volume(tmp_path / "nope.nii.gz")


def test_h5_volume_identity_or_spacing_affine(tmp_path: Path) -> None:
    path = tmp_path / "images.h5"
    first = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    with h5py.File(path, "w") as handle:
        handle["case_b"] = first
        handle["case_a"] = first * 2
        handle["case_a"].attrs["spacing"] = [0.5, 0.75, 2.0]
        handle.create_group("not_a_volume")
    assert h5_keys(path) == ["case_a", "case_b"]
    array, affine = read_h5_volume(path, "case_b")
    np.testing.assert_array_equal(array, first)
    np.testing.assert_array_equal(affine, np.eye(4))
    array, affine = read_h5_volume(path, "case_a")
    np.testing.assert_array_equal(array, first * 2)
    np.testing.assert_array_equal(affine, np.diag([0.5, 0.75, 2.0, 1.0]))
    assert volume_shape(path, "case_a") == (2, 3, 4)


def test_h5_errors_name_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "labels.h5"
    with h5py.File(path, "w") as handle:
        handle["x"] = np.zeros((2, 2, 2))
    with pytest.raises(DataError, match=rf"^{path}: no dataset 'y'$"):
        read_h5_volume(path, "y")
    broken = tmp_path / "broken.h5"
    broken.write_bytes(b"garbage" * 50)
    with pytest.raises(DataError, match=rf"^{broken}: not a readable HDF5 file"):
        h5_keys(broken)


def test_nifti_names() -> None:
    assert nifti_stem("a/b/case_01.nii.gz") == "case_01"
    assert nifti_stem("case_01.nii") == "case_01"
    assert is_nifti("x.nii.gz") and is_nifti("x.nii") and not is_nifti("x.h5")
