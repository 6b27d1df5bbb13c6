import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from regflow.config import load_config
from regflow.data.io import write_nifti
from regflow.engine import Trainer
from regflow.errors import DataError
from regflow.predict import (
    learn2reg_name,
    read_ddf,
    warp_array,
    warp_file,
)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "regflow.cli", *args], capture_output=True,
                          text=True, timeout=300)


def test_warp_array_by_integer_translation_shifts_the_volume():
    rng = np.random.default_rng(0)
    volume = rng.random((8, 9, 10)).astype(np.float32)
    ddf = np.zeros((3, 8, 9, 10), np.float32)
    ddf[1] = 2.0
    warped = warp_array(volume, ddf)
    np.testing.assert_allclose(warped[:, :-2], volume[:, 2:], atol=1e-6)
    assert np.all(warped[:, -2:] == 0)


def test_warp_file_nearest_keeps_label_values_and_affine(tmp_path):
    label = np.zeros((6, 7, 8), np.uint8)
    label[2:4, 2:5, 3:6] = 2
    label[0:2, 0:2, 0:2] = 1
    affine = np.diag([0.5, 0.7, 1.2, 1.0])
    affine[:3, 3] = [3, -4, 5]
    write_nifti(tmp_path / "label.nii.gz", label, affine)
    ddf = np.random.default_rng(1).normal(0, 0.7, (3, 6, 7, 8)).astype(np.float32)
    np.save(tmp_path / "ddf.npy", ddf)
    out = warp_file(tmp_path / "label.nii.gz", tmp_path / "ddf.npy", tmp_path / "out.nii.gz",
                    nearest=True)
    warped = nib.load(out)
    assert set(np.unique(np.asarray(warped.dataobj))) <= {0, 1, 2}
    np.testing.assert_allclose(warped.affine, affine)


def test_read_ddf_accepts_nifti_vector_images(tmp_path):
    ddf = np.random.default_rng(2).normal(size=(3, 5, 6, 7)).astype(np.float32)
    write_nifti(tmp_path / "ddf.nii.gz", np.moveaxis(ddf, 0, -1), np.eye(4))
    read, affine = read_ddf(tmp_path / "ddf.nii.gz")
    np.testing.assert_allclose(read, ddf)
    np.testing.assert_allclose(affine, np.eye(4))


def test_warp_file_samples_an_image_on_another_grid_and_keeps_the_ddf_affine(tmp_path):
    image = np.arange(6 * 7 * 9, dtype=np.float32).reshape(6, 7, 9)
    write_nifti(tmp_path / "image.nii.gz", image, np.eye(4))
    ddf = np.zeros((3, 4, 5, 3), np.float32)  # a 4x5x3 fixed grid, one voxel along axis 2
    ddf[2] = 1.0
    fixed_affine = np.diag([2.0, 2.0, 2.0, 1.0])
    write_nifti(tmp_path / "ddf.nii.gz", np.moveaxis(ddf, 0, -1), fixed_affine)
    out = nib.load(warp_file(tmp_path / "image.nii.gz", tmp_path / "ddf.nii.gz",
                             tmp_path / "out.nii.gz"))
    np.testing.assert_allclose(np.asarray(out.dataobj), image[:4, :5, 1:4], atol=1e-4)
    np.testing.assert_allclose(out.affine, fixed_affine)


def test_warp_file_rejects_a_ddf_of_other_dimensionality(tmp_path):
    write_nifti(tmp_path / "image.nii.gz", np.zeros((6, 7), np.float32), np.eye(4))
    np.save(tmp_path / "ddf.npy", np.zeros((3, 6, 7, 8), np.float32))
    with pytest.raises(DataError, match="cannot warp"):
        warp_file(tmp_path / "image.nii.gz", tmp_path / "ddf.npy", tmp_path / "out.nii.gz")
    assert not (tmp_path / "out.nii.gz").exists()


def test_learn2reg_name_uses_case_digits():
    assert learn2reg_name("hippocampus_012", "hippocampus_7") == "disp_0012_0007.npz"


@pytest.fixture
def trained(tiny_project):
    config = load_config(tiny_project, ["train.steps=2", "train.val_every=2"])
    Trainer(config, Path("data/processed/tiny/manifest.json"), Path("models/tiny")).fit()
    return Path("models/tiny/best.pt")


def raw_case(tiny_raw: Path, number: int, kind: str = "images") -> Path:
    return next(tiny_raw.glob(f"*/{kind}/case_{number:03d}.nii.gz"))


def test_predict_pair_writes_outputs_on_the_raw_fixed_grid(trained, tiny_raw):
    fixed, moving = raw_case(tiny_raw, 8), raw_case(tiny_raw, 9)
    result = run_cli("predict", "--model", str(trained), "--fixed", str(fixed),
                     "--moving", str(moving), "--moving-label", str(raw_case(tiny_raw, 9,
                                                                              "labels")),
                     "--fixed-label", str(raw_case(tiny_raw, 8, "labels")), "--learn2reg",
                     "--out", "out")
    assert result.returncode == 0, result.stderr
    fixed_image = nib.load(fixed)
    for name in ("ddf", "warped", "warped_label"):
        written = nib.load(f"out/{name}.nii.gz")
        assert written.shape[:3] == fixed_image.shape
        np.testing.assert_allclose(written.affine, fixed_image.affine)
    assert set(np.unique(np.asarray(nib.load("out/warped_label.nii.gz").dataobj))) <= {0, 1, 2}
    displacement = np.load("out/disp_0008_0009.npz")
    field = displacement[displacement.files[0]]
    assert field.dtype == np.float16 and field.shape == (3, *fixed_image.shape)
    lines = Path("out/metrics.csv").read_text().splitlines()
    assert lines[0] == "label,dice_before,dice_after" and len(lines) == 3


@pytest.mark.parametrize("problem", ["missing", "dimensionality", "checkpoint", "label"])
def test_predict_bad_input_is_one_line_exit_2_and_writes_nothing(trained, tiny_raw, tmp_path,
                                                                 problem):
    fixed, moving = str(raw_case(tiny_raw, 8)), str(raw_case(tiny_raw, 9))
    model, label = str(trained), str(raw_case(tiny_raw, 9, "labels"))
    if problem == "missing":
        moving = str(tmp_path / "nope.nii.gz")
    elif problem == "dimensionality":
        flat = tmp_path / "flat.nii.gz"
        write_nifti(flat, np.zeros((20, 24), np.float32), np.eye(4))
        moving = str(flat)
    elif problem == "checkpoint":
        corrupt = tmp_path / "corrupt.pt"
        corrupt.write_bytes(b"not a checkpoint")
        model = str(corrupt)
    else:
        wrong = tmp_path / "wrong_label.nii.gz"
        write_nifti(wrong, np.zeros((5, 5, 5), np.uint8), np.eye(4))
        label = str(wrong)
    out = tmp_path / "out"
    result = run_cli("predict", "--model", model, "--fixed", fixed, "--moving", moving,
                     "--moving-label", label, "--out", str(out))
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("Error: ") and result.stderr.strip().count("\n") == 0
    assert not out.exists() or not any(out.iterdir())


def test_warp_cli_missing_ddf_is_exit_2(tmp_path):
    write_nifti(tmp_path / "image.nii.gz", np.zeros((4, 4, 4), np.float32), np.eye(4))
    result = run_cli("warp", "--image", str(tmp_path / "image.nii.gz"), "--ddf",
                     str(tmp_path / "none.npy"), "--out", str(tmp_path / "out.nii.gz"))
    assert result.returncode == 2
    assert "none.npy" in result.stderr and result.stderr.strip().count("\n") == 0
