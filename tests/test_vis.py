"""Tests for regflow.vis and `regflow vis`: GIF frames and sizes, the warping grid, the PNGs,
a predict folder's pictures, MLflow logging inside a run, and one-line errors."""

from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from regflow.cli import cli
from regflow.data.io import write_nifti
from regflow.deepreg.layout import DeepRegWriter
from regflow.vis import (
    CAPTION_HEIGHT,
    GAP,
    log_to_mlflow,
    predicted_pictures,
    slices_gif,
    warp_gif,
)

SHAPE = (12, 10, 8)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def frames_of(path: Path) -> list[np.ndarray]:
    """Every frame of a GIF as an (H, W, 3) uint8 array."""
    with Image.open(path) as gif:
        frames = []
        for index in range(gif.n_frames):
            gif.seek(index)
            frames.append(np.asarray(gif.convert("RGB")))
        return frames


def ramp(shape=SHAPE) -> np.ndarray:
    """A volume whose every slice differs: value = flat voxel index."""
    return np.arange(np.prod(shape), dtype=np.float32).reshape(shape)


def test_slice_gif_has_one_frame_per_slice_of_each_panel_size(tmp_path):
    volume = ramp()
    path = slices_gif([volume], tmp_path / "one.gif", ["ramp"], axis=2, interval=80, zoom=3)
    frames = frames_of(path)
    assert len(frames) == SHAPE[2]
    assert frames[0].shape == (SHAPE[0] * 3 + CAPTION_HEIGHT, SHAPE[1] * 3, 3)
    with Image.open(path) as gif:
        assert gif.info["duration"] == 80 and gif.info["loop"] == 0
    # voxel (i, j) of slice k is a 3x3 block; values rise along every axis, so do the greys
    first, last = frames[0][:SHAPE[0] * 3, :, 0], frames[-1][:SHAPE[0] * 3, :, 0]
    assert first[0, 0] == 0 and last[-1, -1] == 255
    assert np.all(first[1:2, 0:3] == first[0, 0])  # one block per voxel
    assert np.all(np.diff(first[::3, 0].astype(int)) > 0)
    two = frames_of(slices_gif([volume, -volume], tmp_path / "two.gif", zoom=2, axis=0))
    assert len(two) == SHAPE[0]
    assert two[0].shape == (SHAPE[1] * 2 + CAPTION_HEIGHT, 2 * SHAPE[2] * 2 + GAP, 3)


def cyan_rows(panel: np.ndarray) -> set[int]:
    """Pixel rows of a panel where most pixels carry the grid's cyan (blue well above red)."""
    blue_over_red = panel[..., 2].astype(int) - panel[..., 0].astype(int) > 40
    return {int(row) for row in np.flatnonzero(blue_over_red.mean(axis=1) > 0.6)}


def test_warp_gif_moves_the_image_and_its_grid_by_the_field(tmp_path):
    """A DDF of +2 voxels along the rows: the last frame is the moving slice shifted up two
    rows (warped[x] = moving[x + 2]) and the grid's horizontal lines moved down by 2 voxels."""
    moving = np.zeros(SHAPE, np.float32)
    moving[6:9, :, :] = 1.0  # a band of rows 6-8
    ddf = np.zeros((3, *SHAPE), np.float32)
    ddf[0] = 2.0
    zoom, step = 4, 4
    path = warp_gif(moving, ddf, tmp_path / "warp.gif", fixed=moving, frames=5, step=step,
                    zoom=zoom, interval=50)
    frames = frames_of(path)
    assert len(frames) == 5
    width = SHAPE[1] * zoom
    assert frames[0].shape == (SHAPE[0] * zoom + CAPTION_HEIGHT, 2 * width + GAP, 3)
    first, last = (frame[:SHAPE[0] * zoom, :width] for frame in (frames[0], frames[-1]))
    bright = [{int(r) for r in np.flatnonzero(panel[:, 1, 1] > 200)} for panel in (first, last)]
    assert min(bright[0]) == 6 * zoom and min(bright[1]) == 4 * zoom  # the band moved up 2
    grid_rows = [int((row + 0.5) * zoom) for row in range(0, SHAPE[0], step)]
    assert set(grid_rows) <= cyan_rows(first)
    assert {row + 2 * zoom for row in grid_rows if row + 2 * zoom < SHAPE[0] * zoom} <= (
        cyan_rows(last))
    assert not cyan_rows(frames[-1][:SHAPE[0] * zoom, width + GAP:])  # the fixed side: no grid


def folding_ddf() -> np.ndarray:
    """A DDF whose first axis folds (d/dx of x + u < 0) on rows 4-5: 2 x 10 x 8 of 960 voxels."""
    ddf = np.zeros((3, *SHAPE), np.float32)
    ddf[0, 5:, :, :] = -3.0  # rows 4 and 5 see a jump of -3 over 2 rows: det 1 - 1.5 < 0
    return ddf


def deepreg_folder(root: Path) -> Path:
    """A predict --layout deepreg folder of two pairs written by DeepRegWriter."""
    writer = DeepRegWriter(root, png=False)
    rng = np.random.default_rng(0)
    for pair in range(2):
        image = torch.from_numpy(rng.random((1, 1, *SHAPE), dtype=np.float32))
        batch = {"fixed_image": image, "moving_image": image.flip(2),
                 "fixed_affine": torch.eye(4, dtype=torch.float64)[None],
                 "fixed_id": [f"f{pair}"], "moving_id": [f"m{pair}"]}
        writer(batch, {"warped": image * 0.9, "ddf": torch.from_numpy(folding_ddf())[None]}, 0)
    writer.write_metrics()
    return root


def test_pictures_of_a_predict_folder(tmp_path):
    written = predicted_pictures(deepreg_folder(tmp_path / "pred"), tmp_path / "vis", frames=3)
    names = {str(path.relative_to(tmp_path / "vis")) for path in written}
    assert names == {f"pair_{pair}/{name}" for pair in (0, 1) for name in (
        "slices.gif", "warp.gif", "mosaic.png", "checkerboard.png", "jacobian.png")}
    assert len(frames_of(tmp_path / "vis/pair_0/slices.gif")) == SHAPE[2]
    assert len(frames_of(tmp_path / "vis/pair_0/warp.gif")) == 3
    for name in ("mosaic.png", "checkerboard.png", "jacobian.png"):
        assert (tmp_path / "vis/pair_1" / name).read_bytes().startswith(PNG_MAGIC)
    with Image.open(tmp_path / "vis/pair_0/mosaic.png") as mosaic:  # 3 columns x 5 slices
        assert mosaic.size == (720, 1200)


def test_cli_logs_to_the_run_a_tracked_command_names(tmp_path, monkeypatch, mlflow_store):
    folder = deepreg_folder(tmp_path / "pred")
    run = mlflow.MlflowClient(mlflow_store).create_run(
        mlflow.MlflowClient(mlflow_store).create_experiment("vis-test"))
    monkeypatch.setenv("MLFLOW_RUN_ID", run.info.run_id)
    result = CliRunner().invoke(cli, ["vis", "predicted", str(folder), "--frames", "2"])
    assert result.exit_code == 0, result.output
    assert f"logged 10 pictures to MLflow run {run.info.run_id}" in result.output
    logged = mlflow.MlflowClient(mlflow_store).list_artifacts(run.info.run_id, "vis/pair_1")
    assert sorted(Path(item.path).name for item in logged) == [
        "checkerboard.png", "jacobian.png", "mosaic.png", "slices.gif", "warp.gif"]
    assert (folder / "vis/pair_0/warp.gif").is_file()


def test_pictures_go_to_the_active_run_and_nowhere_outside_one(tmp_path, mlflow_store):
    path = slices_gif([ramp()], tmp_path / "a" / "ramp.gif")
    assert log_to_mlflow([path], tmp_path) is None
    mlflow.set_tracking_uri(mlflow_store)
    with mlflow.start_run() as run:
        assert log_to_mlflow([path], tmp_path) == run.info.run_id
    logged = mlflow.MlflowClient(mlflow_store).list_artifacts(run.info.run_id, "vis/a")
    assert [Path(item.path).name for item in logged] == ["ramp.gif"]


def test_cli_files_and_one_line_errors(tmp_path):
    affine = np.eye(4)
    write_nifti(tmp_path / "moving.nii.gz", ramp(), affine)
    write_nifti(tmp_path / "fixed.nii.gz", ramp()[::-1].copy(), affine)
    write_nifti(tmp_path / "ddf.nii.gz", np.moveaxis(folding_ddf(), 0, -1), affine)
    runner = CliRunner()
    for arguments in (
            ["slices", str(tmp_path / "moving.nii.gz"), "--out", str(tmp_path / "s.gif")],
            ["warp", "--moving", str(tmp_path / "moving.nii.gz"), "--ddf",
             str(tmp_path / "ddf.nii.gz"), "--fixed", str(tmp_path / "fixed.nii.gz"),
             "--frames", "3", "--out", str(tmp_path / "w.gif")],
            ["mosaic", str(tmp_path / "moving.nii.gz"), str(tmp_path / "fixed.nii.gz"),
             "--slices", "1,3", "--out", str(tmp_path / "m.png")],
            ["checkerboard", "--fixed", str(tmp_path / "fixed.nii.gz"), "--warped",
             str(tmp_path / "moving.nii.gz"), "--out", str(tmp_path / "c.png")],
            ["jacobian", "--ddf", str(tmp_path / "ddf.nii.gz"), "--out", str(tmp_path / "j.png")]):
        result = runner.invoke(cli, ["vis", *arguments])
        assert result.exit_code == 0, result.output
        assert Path(arguments[-1]).is_file()
    assert len(frames_of(tmp_path / "w.gif")) == 3
    for arguments, message in (
            (["predicted", str(tmp_path)], "no pair_<i>/fixed_image.nii.gz"),
            (["mosaic", str(tmp_path / "moving.nii.gz"), "--slices", "99", "--out",
              str(tmp_path / "x.png")], "the volumes have 8 slices along axis 2"),
            (["warp", "--moving", str(tmp_path / "moving.nii.gz"), "--ddf",
              str(tmp_path / "ddf.nii.gz"), "--out", str(tmp_path / "x.png")],
             "must end in .gif")):
        result = runner.invoke(cli, ["vis", *arguments])
        assert result.exit_code == 2
        assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "vis").exists()


@pytest.mark.parametrize("shape", [(9, 7)])
def test_two_dimensional_images_make_one_frame(tmp_path, shape):
    frames = frames_of(slices_gif([ramp(shape)], tmp_path / "flat.gif", zoom=2))
    assert len(frames) == 1 and frames[0].shape == (9 * 2 + CAPTION_HEIGHT, 7 * 2, 3)
