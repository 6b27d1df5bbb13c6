"""preprocess.resize: images resampled to the shape over their own field of view (DeepReg's
resizing), so an MR-to-US style pair with different fixed and moving grids trains and predicts.

The synthetic pairs image one world object twice: the fixed grid 64x64x60 at 1 mm, the moving
grid 80x80x64 over the same 64x64x60 mm (0.8 x 0.8 x 0.9375 mm voxels), both centred on the
world origin. Resized, the two agree voxel for voxel; cropped or padded they would not.
"""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from regflow import metrics
from regflow.cli import cli
from regflow.config import load_config
from regflow.data.fetch import fetch_dataset
from regflow.data.io import write_nifti
from regflow.data.manifest import Manifest
from regflow.data.transforms import resize_to_shape
from regflow.engine import Trainer
from regflow.stages import preprocess_stage
from tests.synthetic import write_params

FIXED_SHAPE, FIXED_SPACING = (64, 64, 60), (1.0, 1.0, 1.0)
MOVING_SHAPE, MOVING_SPACING = (80, 80, 64), (0.8, 0.8, 0.9375)


def grid_affine(shape, spacing) -> np.ndarray:
    """Voxel-to-world of a grid centred on the world origin."""
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = -(np.asarray(shape) - 1) / 2 * np.asarray(spacing)
    return affine


def world_object(shape, spacing, centre) -> tuple[np.ndarray, np.ndarray]:
    """A smooth image and the label of an ellipsoid (radii 18, 14, 12 mm) around ``centre``."""
    affine = grid_affine(shape, spacing)
    voxels = np.stack(np.meshgrid(*map(np.arange, shape), indexing="ij"), axis=-1)
    world = voxels * np.asarray(spacing) + affine[:3, 3]
    distance = np.sqrt((((world - centre) / np.array([18.0, 14.0, 12.0])) ** 2).sum(-1))
    image = np.exp(-2 * distance**2).astype(np.float32)
    return image, (distance < 1).astype(np.uint8)


def write_pairs(root: Path, count: int) -> None:
    """DeepReg's paired layout, one world object per case, its centre moved a little per side
    (except in case00, centred on both sides)."""
    rng = np.random.default_rng(0)
    for number in range(count):
        case = f"case{number:02d}.nii.gz"
        for side, shape, spacing in (("fixed", FIXED_SHAPE, FIXED_SPACING),
                                     ("moving", MOVING_SHAPE, MOVING_SPACING)):
            centre = rng.normal(0, 2, 3) if number else np.zeros(3)
            image, label = world_object(shape, spacing, centre)
            write_nifti(root / f"{side}_images" / case, image, grid_affine(shape, spacing))
            write_nifti(root / f"{side}_labels" / case, label, grid_affine(shape, spacing))


def test_resize_to_shape_keeps_the_field_of_view_and_the_centre():
    array = np.random.default_rng(1).random(MOVING_SHAPE).astype(np.float32)
    affine = grid_affine(MOVING_SHAPE, MOVING_SPACING)
    resized, new_affine = resize_to_shape(array, affine, FIXED_SHAPE, order=1)
    assert resized.shape == FIXED_SHAPE
    np.testing.assert_allclose(new_affine, grid_affine(FIXED_SHAPE, FIXED_SPACING), atol=1e-9)


@pytest.fixture
def mr_us_project(tmp_path, mlflow_store, monkeypatch) -> Path:
    raw = tmp_path / "source"
    write_pairs(raw, 6)
    monkeypatch.chdir(tmp_path)
    return write_params(tmp_path, raw, preprocess={"shape": list(FIXED_SHAPE), "resize": True,
                                                   "val_fraction": 0.2, "test_fraction": 0.2},
                        loader={"batch_size": 1, "eval_pairs": 2, "augment": {"enabled": False}},
                        train={"steps": 2, "val_every": 2, "checkpoint_every": 2},
                        data={"local": {"tiny": {"path": str(raw), "pairing": "paired",
                                                 "label_names": ["organ"]}}})


def test_mr_us_style_pairs_preprocess_by_resizing_train_and_predict_on_the_fixed_grid(
        mr_us_project, tmp_path):
    config = load_config(mr_us_project)
    fetch_dataset("tiny", config)
    manifest_path = preprocess_stage(config, "tiny")
    manifest = Manifest.read(manifest_path)
    assert manifest.shape == list(FIXED_SHAPE) and manifest.pairing == "paired"
    case = next(case for case in manifest.cases if case.case_id == "case00")
    root = manifest_path.parent
    fixed_label = np.asarray(nib.load(root / case.fixed_label).dataobj)
    moving_label = nib.load(root / case.moving_label)
    assert moving_label.shape == FIXED_SHAPE  # 80x80x64 resized, not cropped
    np.testing.assert_allclose(moving_label.affine, grid_affine(FIXED_SHAPE, FIXED_SPACING),
                               atol=1e-9)
    # one world object on both grids: resized, they agree (cropped to 64 voxels: Dice 0.75)
    overlap = metrics.dice(fixed_label, np.asarray(moving_label.dataobj), labels=[1])[0]
    assert overlap > 0.95

    Trainer(config, manifest_path, Path("models/tiny")).fit()
    out = tmp_path / "predicted"
    raw = tmp_path / "source"
    result = CliRunner().invoke(cli, [
        "predict", "--model", "models/tiny/best.pt", "--out", str(out),
        "--fixed", str(raw / "fixed_images/case00.nii.gz"),
        "--moving", str(raw / "moving_images/case00.nii.gz"),
        "--moving-label", str(raw / "moving_labels/case00.nii.gz"),
        "--fixed-label", str(raw / "fixed_labels/case00.nii.gz")])
    assert result.exit_code == 0, result.output
    fixed_affine = grid_affine(FIXED_SHAPE, FIXED_SPACING)
    for name, shape in (("ddf", (*FIXED_SHAPE, 3)), ("warped", FIXED_SHAPE),
                        ("warped_label", FIXED_SHAPE)):
        volume = nib.load(out / f"{name}.nii.gz")
        assert volume.shape == shape, name
        np.testing.assert_allclose(volume.affine, fixed_affine, atol=1e-6)
    warped_label = np.asarray(nib.load(out / "warped_label.nii.gz").dataobj)
    raw_fixed_label = np.asarray(nib.load(raw / "fixed_labels/case00.nii.gz").dataobj)
    assert metrics.dice(raw_fixed_label, warped_label, labels=[1])[0] > 0.75
    assert torch.isfinite(torch.from_numpy(np.asarray(nib.load(out / "ddf.nii.gz").dataobj))).all()


def test_resize_and_spacing_exclude_each_other(tmp_path):
    from regflow.errors import ConfigError

    with pytest.raises(ConfigError, match="resize .* and spacing .* exclude each other"):
        load_config(tmp_path / "params.yaml", ["preprocess.resize=true",
                                               "preprocess.spacing=[1, 1, 1]"])
