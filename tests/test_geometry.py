"""Tests for regflow.geometry: affines and sizes a registration can use."""

import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from regflow.errors import ConfigError, GeometryError
from regflow.geometry import check_geometry, min_size
from tests.synthetic import write_params


def test_a_usable_volume_passes():
    affine = np.array([[0.0, 0.0, 1.5, -10.0], [0.0, -2.0, 0.0, 5.0], [1.0, 0.0, 0.0, 3.0],
                       [0.0, 0.0, 0.0, 1.0]])  # permuted, flipped, anisotropic
    check_geometry("v", (8, 9, 10), affine)
    check_geometry("v", (8, 8, 8), None)  # npy: no affine
    check_geometry("v", (8, 8), np.eye(4))  # 2-D: the third column is not looked at


@pytest.mark.parametrize(("change", "message"), [
    (lambda a: a.__setitem__((slice(0, 3), 1), 0.0),
     r"^v: zero voxel size along axis 1 \(the affine's column 1 is zero\)$"),
    (lambda a: a.__setitem__((slice(0, 3), 2), a[:3, 0] * 3), r"^v: singular affine"),
    (lambda a: a.__setitem__((1, 1), np.nan), r"^v: the affine holds NaN or infinite values$"),
    (lambda a: a.__setitem__((0, 3), np.inf), r"^v: the affine holds NaN or infinite values$"),
])
def test_bad_affines_name_the_volume_and_the_problem(change, message):
    affine = np.diag([1.0, 2.0, 3.0, 1.0])
    change(affine)
    with pytest.raises(GeometryError, match=message):
        check_geometry("v", (8, 8, 8), affine)


def test_an_affine_of_the_wrong_shape_is_refused():
    with pytest.raises(GeometryError, match=r"^v: affine of shape \(3, 3\), expected \(4, 4\)$"):
        check_geometry("v", (8, 8, 8), np.eye(3))


def test_volumes_below_the_minimum_size_are_refused():
    with pytest.raises(GeometryError, match=r"^inputs.fixed\[0\]: shape \(2, 2, 2\) is below the "
                                            r"minimum of 8 voxels along axis 0 "
                                            r"\(REGFLOW_MIN_SIZE\)$"):
        check_geometry("inputs.fixed[0]", (2, 2, 2), np.eye(4))
    with pytest.raises(GeometryError, match="along axis 2"):
        check_geometry("v", (9, 9, 7), np.eye(4))
    check_geometry("v", (2, 2, 2), np.eye(4), smallest=2)


def test_minimum_size_from_the_environment():
    assert min_size({}) == 8
    assert min_size({"REGFLOW_MIN_SIZE": " 4 "}) == 4
    for text in ("0", "-1", "x", "1.5"):
        with pytest.raises(ConfigError, match=f"REGFLOW_MIN_SIZE='{text}': expected a positive"):
            min_size({"REGFLOW_MIN_SIZE": text})


@pytest.mark.parametrize(("affine", "shape", "problem"), [
    (np.diag([1.0, 0.0, 1.0, 1.0]), (12, 12, 12), "zero voxel size along axis 1"),
    (np.diag([1.0, 1.0, np.nan, 1.0]), (12, 12, 12), "the affine holds NaN or infinite values"),
    (np.eye(4), (2, 2, 2), "is below the minimum of 8 voxels along axis 0 (REGFLOW_MIN_SIZE)"),
], ids=["zero-column", "nan", "2x2x2"])
def test_predict_refuses_bad_geometry_in_one_line(tmp_path, tiny_raw, affine, shape, problem):
    params = write_params(tmp_path, tiny_raw)
    rng = np.random.default_rng(0)
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.float32)
    header.set_sform(affine, code=1)
    bad = tmp_path / "bad.nii.gz"
    nib.save(nib.Nifti1Image(rng.random(shape, dtype=np.float32), None, header), bad)
    good = tmp_path / "good.nii.gz"
    nib.save(nib.Nifti1Image(rng.random((12, 12, 12), dtype=np.float32), np.eye(4)), good)
    result = subprocess.run(
        [sys.executable, "-m", "regflow.cli", "predict", "--model", "none", "-c", str(params),
         "--refine-steps", "2", "--fixed", str(bad), "--moving", str(good),
         "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"Error: {bad}: ") and problem in result.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
