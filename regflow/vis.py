"""``regflow vis``: DeepReg's ``deepreg_vis`` pictures, and those registration users look at first,
from NIfTI files or from a ``regflow predict --layout deepreg`` folder.

- :func:`slices_gif`: one frame per slice of one volume (``deepreg_vis`` mode 0), or of several
  side by side (mode 3);
- :func:`warp_gif`: the moving image warping into the fixed one, frame k warped by
  ``k / (frames - 1)`` of the DDF with that field's deformed grid drawn over it, the fixed image
  beside it (mode 1);
- :func:`mosaic_png`: slices of several volumes in rows and columns (mode 2);
- :func:`checkerboard_png`: fixed and moving (before), fixed and warped (after) interleaved;
- :func:`jacobian_png`: the DDF's Jacobian determinant with folding marked;
- :func:`predicted_pictures`: all of them for every ``pair_<i>/`` of a predict folder.

GIF frames are drawn with Pillow: grey values scaled to each volume's display range
(:func:`regflow.viz.display_range`), each voxel a ``zoom`` x ``zoom`` block, and a caption strip
of :data:`CAPTION_HEIGHT` pixels under the picture naming the slice or the fraction of the field.
Every file is written atomically. When an MLflow run is active in the process, or
``MLFLOW_RUN_ID`` names one (a tracked command), the pictures are also logged to it under
``vis/``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from regflow.data.io import read_volume
from regflow.errors import DataError
from regflow.fileio import atomic_open
from regflow.viz import (
    checkerboard_figure,
    display_range,
    jacobian_figure,
    mosaic_figure,
    save_figure,
)

CAPTION_HEIGHT = 14
GAP = 4  # pixels between panels
GAP_COLOUR = (96, 96, 96)
GRID_COLOUR = (0, 200, 255, 150)  # RGBA: the image shows through the grid
TARGET_SIZE = 256  # default zoom: the longer side of a panel near this many pixels


def auto_zoom(shape: Sequence[int]) -> int:
    """Integer enlargement that brings the longer side of a ``shape`` slice near 256 pixels."""
    return int(min(8, max(1, TARGET_SIZE // max(shape))))


def volume_slices(volume: np.ndarray, axis: int) -> list[np.ndarray]:
    """The 2-D slices of a 3-D volume along ``axis`` (a 2-D image is its own one slice)."""
    if volume.ndim == 2:
        return [volume]
    if volume.ndim != 3:
        raise DataError(f"expected a 2-D or 3-D volume, got shape {volume.shape}")
    return [np.take(volume, index, axis=axis) for index in range(volume.shape[axis])]


def _grey(image: np.ndarray, low: float, high: float, zoom: int) -> np.ndarray:
    """(H * zoom, W * zoom) uint8 of an image scaled from [low, high] to [0, 255]."""
    scaled = (image - low) / (high - low) if high > low else np.zeros_like(image)
    pixels = np.round(np.clip(scaled, 0, 1) * 255).astype(np.uint8)
    return np.repeat(np.repeat(pixels, zoom, axis=0), zoom, axis=1)


def _frame(panels: list[np.ndarray], caption: str):
    """One RGB frame: panels (H, W, 3) uint8 side by side, a caption strip below."""
    from PIL import Image, ImageDraw

    height = max(panel.shape[0] for panel in panels)
    width = sum(panel.shape[1] for panel in panels) + GAP * (len(panels) - 1)
    frame = Image.new("RGB", (width, height + CAPTION_HEIGHT))
    left = 0
    for number, panel in enumerate(panels):
        if number:
            frame.paste(GAP_COLOUR, (left - GAP, 0, left, height))
        frame.paste(Image.fromarray(panel), (left, 0))
        left += panel.shape[1] + GAP
    ImageDraw.Draw(frame).text((2, height + 1), caption, fill=(255, 255, 255))
    return frame


def _write_gif(path: Path, frames: list, interval: int) -> Path:
    """An endlessly looping GIF of ``frames``, ``interval`` ms each, written atomically."""
    with atomic_open(path, "wb") as handle:
        frames[0].save(handle, format="GIF", save_all=True, append_images=frames[1:],
                       duration=interval, loop=0)
    return Path(path)


def slices_gif(volumes: Sequence[np.ndarray], path: str | Path, titles: Sequence[str] = (),
               axis: int = 2, interval: int = 100, zoom: int | None = None) -> Path:
    """A GIF with one frame per slice along ``axis``: one volume, or several side by side.

    Args:
        volumes: same-shape (D, H, W) (or (H, W)) arrays, each scaled to its own range.
        path: the ``.gif`` to write.
        titles: names of the volumes, shown in the caption.
        axis: the array axis to step along.
        interval: milliseconds per frame.
        zoom: pixels per voxel (None: :func:`auto_zoom`).

    Returns:
        ``path``. Frame k holds slice k; each frame is ``(W x zoom) x n + gap`` by
        ``H x zoom + CAPTION_HEIGHT`` pixels for n volumes of slices H x W.
    """
    shapes = {volume.shape for volume in volumes}
    if len(shapes) != 1:
        raise DataError(f"volumes of different shapes {sorted(shapes)}: one slice GIF needs "
                        "volumes of one shape")
    stacks = [volume_slices(volume, axis) for volume in volumes]
    zoom = zoom or auto_zoom(stacks[0][0].shape)
    ranges = [display_range(volume) for volume in volumes]
    names = " | ".join(titles)
    frames = []
    for index in range(len(stacks[0])):
        panels = [np.repeat(_grey(stack[index], *scale, zoom)[..., None], 3, axis=2)
                  for stack, scale in zip(stacks, ranges, strict=True)]
        frames.append(_frame(panels, f"{names}  axis {axis} slice {index + 1}/{len(stacks[0])}"
                             .strip()))
    return _write_gif(Path(path), frames, interval)


def _grid_lines(ddf: np.ndarray, step: int, zoom: int) -> list[list[tuple[float, float]]]:
    """Pixel polylines of the grid ``x + ddf(x)`` drawn every ``step`` voxels of a (2, H, W)
    in-plane field (row, column displacements): rows then columns of the grid."""
    rows, columns = np.indices(ddf.shape[1:], dtype=np.float64)
    y = (rows + ddf[0] + 0.5) * zoom
    x = (columns + ddf[1] + 0.5) * zoom
    lines = [list(zip(x[i], y[i], strict=True)) for i in range(0, y.shape[0], step)]
    return lines + [list(zip(x[:, j], y[:, j], strict=True)) for j in range(0, y.shape[1], step)]


def warp_gif(moving: np.ndarray, ddf: np.ndarray, path: str | Path,
             fixed: np.ndarray | None = None, axis: int = 2, index: int | None = None,
             frames: int = 20, interval: int = 100, step: int = 4,
             zoom: int | None = None) -> Path:
    """A GIF of the moving image warping into the fixed one, the deformation grid drawn over it.

    Frame k shows slice ``index`` of ``moving`` warped by ``t x ddf`` with ``t = k / (frames -
    1)`` (``warped[x] = moving[x + t ddf[x]]``, :func:`regflow.spatial.warp`) and the grid
    ``x + t ddf(x)`` of the in-plane displacement, every ``step`` voxels; the fixed slice, when
    given, stands beside it. The first frame is the moving image, the last the warped one.

    Args:
        moving: (D, H, W) (or (H, W)) moving image on the DDF's grid.
        ddf: (ndim, *S) displacement in voxels.
        path: the ``.gif`` to write.
        fixed: the fixed image, shown beside; None: the warping image alone.
        axis, index: the slice shown (default the middle one along the last axis).
        frames: number of frames (at least 2).
        interval: milliseconds per frame.
        step: grid spacing in voxels.
        zoom: pixels per voxel (None: :func:`auto_zoom`).
    """
    import torch
    from PIL import Image, ImageDraw

    from regflow.spatial import warp

    if ddf.shape[1:] != moving.shape or ddf.shape[0] != moving.ndim:
        raise DataError(f"a DDF of shape {ddf.shape} does not fit an image of shape "
                        f"{moving.shape}")
    if frames < 2:
        raise DataError(f"frames {frames}: a warping needs at least 2")
    three_d = moving.ndim == 3
    index = moving.shape[axis] // 2 if index is None and three_d else index
    in_plane = [i for i in range(moving.ndim) if not three_d or i != axis]

    def plane(volume: np.ndarray) -> np.ndarray:
        return np.take(volume, index, axis=axis) if three_d else volume

    zoom = zoom or auto_zoom(plane(moving).shape)
    low, high = display_range(moving)
    side = []
    if fixed is not None:
        side = [np.repeat(_grey(plane(fixed), *display_range(fixed), zoom)[..., None], 3,
                          axis=2)]
    image = torch.from_numpy(np.asarray(moving, np.float32))[None, None]
    field = torch.from_numpy(np.asarray(ddf, np.float32))[None]
    pictures = []
    for t in np.linspace(0.0, 1.0, frames):
        warped = warp(image, field * float(t))[0, 0].numpy()
        panel = Image.fromarray(np.repeat(_grey(plane(warped), low, high, zoom)[..., None], 3,
                                          axis=2)).convert("RGBA")
        grid = Image.new("RGBA", panel.size, (0, 0, 0, 0))
        draw = ImageDraw.Draw(grid)
        in_plane_ddf = np.stack([plane(ddf[i]) for i in in_plane]) * t
        for line in _grid_lines(in_plane_ddf, step, zoom):
            draw.line(line, fill=GRID_COLOUR, width=1)
        panel = Image.alpha_composite(panel, grid).convert("RGB")
        where = f"axis {axis} slice {index}, " if three_d else ""
        pictures.append(_frame([np.asarray(panel), *side],
                               f"{where}t = {t:.2f}{' | fixed' if side else ''}"))
    return _write_gif(Path(path), pictures, interval)


def default_slices(size: int, count: int = 5) -> list[int]:
    """``count`` evenly spaced interior slice indices of an axis of ``size`` (all if fewer)."""
    if size <= count:
        return list(range(size))
    return sorted({int(round(value)) for value in np.linspace(0, size - 1, count + 2)[1:-1]})


def mosaic_png(volumes: Sequence[np.ndarray], titles: Sequence[str], path: str | Path,
               slices: Sequence[int] | None = None, axis: int = 2) -> Path:
    """PNG of slices (rows) across volumes (columns); default five interior slices."""
    if len({volume.shape for volume in volumes}) != 1:
        raise DataError("a mosaic needs volumes of one shape")
    size = volumes[0].shape[axis] if volumes[0].ndim == 3 else 1
    chosen = list(slices) if slices else default_slices(size)
    if any(not 0 <= index < size for index in chosen):
        raise DataError(f"slices {chosen}: the volumes have {size} slices along axis {axis}")
    return save_figure(mosaic_figure(list(volumes), list(titles), chosen, axis), path)


def checkerboard_png(fixed: np.ndarray, warped: np.ndarray, path: str | Path,
                     moving: np.ndarray | None = None, tiles: int = 8) -> Path:
    """PNG of the checkerboards of fixed with moving (before) and with warped (after)."""
    for name, image in (("warped", warped), ("moving", moving)):
        if image is not None and image.shape != fixed.shape:
            raise DataError(f"the {name} image {image.shape} is not on the fixed image's grid "
                            f"{fixed.shape}")
    return save_figure(checkerboard_figure(fixed, warped, moving, tiles), path)


def jacobian_png(ddf: np.ndarray, path: str | Path) -> Path:
    """PNG of the DDF's Jacobian determinant with folded voxels marked."""
    return save_figure(jacobian_figure(ddf), path)


def read_image(path: str | Path) -> np.ndarray:
    """A NIfTI image as float32, trailing singleton axes dropped (2-D images stored as 3-D)."""
    array, _ = read_volume(Path(path))
    while array.ndim > 2 and array.shape[-1] == 1:
        array = array[..., 0]
    return np.asarray(array, np.float32)


def read_field(path: str | Path) -> np.ndarray:
    """A displacement field (NIfTI vector image, ``.npy`` or ``.npz``) as (ndim, *S) voxels."""
    from regflow.predict import read_ddf

    return read_ddf(Path(path))[0]


def predicted_pairs(folder: str | Path) -> list[Path]:
    """The ``pair_<i>/`` folders of a ``regflow predict --layout deepreg`` folder, by index.

    Raises:
        DataError: none holding NIfTI images.
    """
    folder = Path(folder)
    pairs = sorted((path for path in folder.glob("pair_*")
                    if (path / "fixed_image.nii.gz").is_file()),
                   key=lambda path: int(path.name.split("_")[1]))
    if not pairs:
        raise DataError(f"{folder}: no pair_<i>/fixed_image.nii.gz (write it with regflow "
                        "predict --split S --layout deepreg, without --no-nifti)")
    return pairs


def predicted_pictures(folder: str | Path, out_dir: str | Path, axis: int = 2,
                       frames: int = 20) -> list[Path]:
    """Every picture for each ``pair_<i>/`` of a ``regflow predict --layout deepreg`` folder.

    Writes ``out_dir/pair_<i>/``: ``slices.gif`` (fixed | moving | warped, slice by slice),
    ``mosaic.png``, and where the pair has them ``warp.gif`` and ``jacobian.png`` (a DDF) and
    ``checkerboard.png`` (a warped image).

    Raises:
        DataError: no ``pair_<i>/`` folder holding NIfTI images.
    """
    from regflow.fileio import atomic_directory

    pairs = predicted_pairs(folder)
    with atomic_directory(out_dir) as staging:
        for pair in pairs:
            target = staging / pair.name
            target.mkdir()
            images = {name: read_image(pair / f"{name}.nii.gz") for name in
                      ("fixed_image", "moving_image", "pred_fixed_image")
                      if (pair / f"{name}.nii.gz").is_file()}
            names = [name.replace("pred_fixed_image", "warped").replace("_image", "")
                     for name in images]
            slices_gif(list(images.values()), target / "slices.gif", names, axis)
            mosaic_png(list(images.values()), names, target / "mosaic.png", axis=axis)
            if "pred_fixed_image" in images:
                checkerboard_png(images["fixed_image"], images["pred_fixed_image"],
                                 target / "checkerboard.png", images["moving_image"])
            if (pair / "ddf.nii.gz").is_file():
                ddf = read_field(pair / "ddf.nii.gz")
                warp_gif(images["moving_image"], ddf, target / "warp.gif",
                         images["fixed_image"], axis, frames=frames)
                jacobian_png(ddf, target / "jacobian.png")
        written = sorted(path.relative_to(staging) for path in staging.rglob("*")
                         if path.is_file())
    return [Path(out_dir) / path for path in written]


def log_to_mlflow(paths: Sequence[Path], root: Path, artifact_path: str = "vis") -> str | None:
    """Log pictures to the MLflow run this process is in: the active run, or the one
    ``MLFLOW_RUN_ID`` names (set for tracked commands); nothing outside a run. Each file goes to
    ``artifact_path/<its folder relative to root>``.

    Returns:
        The run id logged to, or None.
    """
    module = sys.modules.get("mlflow")
    active = module.active_run() if module is not None else None
    run_id = active.info.run_id if active is not None else os.environ.get("MLFLOW_RUN_ID")
    if not run_id:
        return None
    from regflow.tracking import log_files_to_run

    files = [(path, Path(artifact_path, path.parent.relative_to(root)).as_posix())
             for path in paths]
    log_files_to_run(files, None if active is not None else run_id)
    return run_id
