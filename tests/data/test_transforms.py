"""regflow.data.transforms: resampling, crop/pad and normalisation of one volume, affines kept."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from regflow.data.transforms import crop_or_pad, normalise, resample

TASK = "Task04_Hippocampus"


def test_resample_halves_shape_and_scales_affine(mirror: Path) -> None:
    source = nib.load(mirror / TASK / "imagesTr/hippocampus_001.nii.gz")  # (35, 51, 35), 1 mm
    image = source.get_fdata().astype(np.float32)
    resampled, affine = resample(image, source.affine, [2.0, 2.0, 2.0], order=1)
    assert resampled.shape == (18, 26, 18)
    np.testing.assert_allclose(np.diag(affine)[:3], [2.0, 2.0, 2.0])
    centre_before = source.affine @ [17, 25, 17, 1]
    np.testing.assert_allclose(affine @ [8.5, 12.5, 8.5, 1], centre_before)
    ramp = np.fromfunction(lambda i, j, k: i + 2 * j + 3 * k, (10, 12, 14)).astype(np.float32)
    out, out_affine = resample(ramp, np.eye(4), [2.0, 2.0, 2.0], order=1)
    assert out.shape == (5, 6, 7)
    np.testing.assert_allclose(out_affine @ [2, 2.5, 3, 1], [4.5, 5.5, 6.5, 1])  # same centre
    index = np.linalg.solve(np.eye(4), out_affine @ [2, 3, 4, 1])[:3]  # source voxel coords
    assert out[2, 3, 4] == pytest.approx(index @ [1, 2, 3], abs=1e-4)


def test_resampling_to_the_volumes_own_voxel_size_is_an_exact_copy() -> None:
    from scipy.ndimage import affine_transform

    array = np.random.default_rng(0).random((9, 12, 7), dtype=np.float32)
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = [4.0, -2.0, 7.5]
    resampled, new_affine = resample(array, affine, (1.0, 1.0, 1.0), order=1)
    interpolated = affine_transform(array, np.ones(3), np.zeros(3), order=1, mode="nearest")
    np.testing.assert_array_equal(resampled, interpolated)
    np.testing.assert_array_equal(new_affine, affine)
    assert resampled is not array and resampled.dtype == np.float32
    # a different voxel size is resampled
    assert resample(array, affine, (1.0, 1.0, 0.5), order=1)[0].shape == (9, 12, 14)


def test_crop_or_pad_centres_and_moves_origin() -> None:
    array = np.arange(4 * 6 * 3, dtype=np.float32).reshape(4, 6, 3)
    affine = np.diag([2.0, 3.0, 1.0, 1.0])
    out, out_affine = crop_or_pad(array, affine, (6, 4, 3), fill=-1)
    np.testing.assert_array_equal(out[1:5], array[:, 1:5])
    assert (out[0] == -1).all() and (out[5] == -1).all()
    np.testing.assert_allclose(out_affine[:3, 3], [-2.0, 3.0, 0.0])  # start = (-1, 1, 0)
    channels, _ = crop_or_pad(np.ones((3, 3, 3, 2), np.uint8), np.eye(4), (5, 1, 3), fill=0)
    assert channels.shape == (5, 1, 3, 2) and channels.sum() == 2 * 3 * 3


def test_normalise_minmax_and_percentile() -> None:
    np.testing.assert_allclose(normalise(np.array([2.0, 4.0, 6.0]), "minmax"), [0, 0.5, 1])
    assert not normalise(np.full((3, 3), 5.0), "minmax").any()
    image = np.linspace(0, 1, 1000)
    image[0], image[-1] = -500.0, 900.0  # outliers that minmax would be ruled by
    scaled = normalise(image, "percentile", [1.0, 99.0])
    assert scaled.dtype == np.float32 and scaled.min() == 0.0 and scaled.max() == 1.0
    assert np.count_nonzero(scaled == 0.0) == 10 and np.count_nonzero(scaled == 1.0) == 10
    assert scaled[500] == pytest.approx(0.5, abs=1e-3)
