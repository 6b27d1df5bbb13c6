"""Registration outputs as files: ``regflow warp``, ``regflow predict`` on a raw pair or on a
processed split. The registering itself is :mod:`regflow.inference`'s; this module reads inputs,
and writes NIfTI/NumPy outputs and metrics tables, each output folder staged and renamed whole."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from regflow import metrics, spatial
from regflow.config import Config
from regflow.data.io import nifti_stem, read_volume, write_nifti
from regflow.data.manifest import Manifest
from regflow.errors import DataError, RegflowError
from regflow.fileio import atomic_directory, atomic_open, write_csv
from regflow.inference import Registrar, Volume, load_registrar, warp_label


def read_ddf(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Read a displacement field as (ndim, *S) float32 voxels, with its grid's affine.

    Accepts NIfTI vector images (*S, ndim) (also with NIfTI's extra singleton 5th axis), whose
    affine is the fixed grid's, ``.npy`` (ndim, *S) and Learn2Reg ``.npz`` (first array,
    (ndim, *S)), which carry none.

    Raises:
        DataError: unreadable file or not a displacement field.
    """
    name = path.name
    affine = None
    if name.endswith((".npy", ".npz")):
        if not path.is_file():
            raise DataError(f"{path}: no such file")
        try:
            loaded = np.load(path)
            ddf = loaded[loaded.files[0]] if name.endswith(".npz") else loaded
        except (OSError, ValueError, IndexError) as exc:
            raise DataError(f"{path}: not a readable numpy file ({exc})") from None
    else:
        array, affine = read_volume(path)
        ddf = np.moveaxis(np.squeeze(array, axis=3) if array.ndim == 5 else array, -1, 0)
    ddf = np.asarray(ddf, dtype=np.float32)
    if ddf.ndim not in (3, 4) or ddf.shape[0] != ddf.ndim - 1:
        raise DataError(f"{path}: expected a displacement field with one channel per axis, "
                        f"got shape {tuple(ddf.shape)}")
    return ddf, affine


def warp_array(array: np.ndarray, ddf: np.ndarray, nearest: bool = False) -> np.ndarray:
    """Warp a (*S_image) or (*S_image, C) array with a (ndim, *S) DDF into the image's grid.

    ``warped[x] = array[x + ddf[x]]``, linear (``nearest``: nearest neighbour, values kept),
    zeros outside: :func:`regflow.spatial.warp`.
    """
    ndim = ddf.shape[0]
    channels_last = array.ndim == ndim + 1
    image = torch.from_numpy(np.asarray(array, dtype=np.float32))
    image = image.movedim(-1, 0) if channels_last else image[None]
    warped = spatial.warp(image[None], torch.from_numpy(ddf)[None],
                          interp="nearest" if nearest else "linear")[0]
    warped = warped.movedim(0, -1) if channels_last else warped[0]
    result = warped.numpy()
    return result.astype(array.dtype) if nearest else result


def warp_file(image_path: Path, ddf_path: Path, out_path: Path, nearest: bool = False) -> Path:
    """Warp a NIfTI image (or label with ``nearest``) by a DDF; write it on the DDF's grid.

    The image may be on another grid than the DDF (``regflow predict``'s raw-grid DDF points into
    the moving image's own voxels). The output carries the DDF file's affine (the fixed grid's)
    when it is a NIfTI file, else the image's.

    Raises:
        DataError: unreadable inputs or a DDF with another number of axes than the image.
    """
    array, affine = read_volume(image_path)
    ddf, ddf_affine = read_ddf(ddf_path)
    if array.ndim not in (ddf.shape[0], ddf.shape[0] + 1):
        raise DataError(f"{ddf_path}: a {ddf.shape[0]}-D field cannot warp {image_path} of "
                        f"shape {tuple(array.shape)}")
    return write_nifti(out_path, warp_array(array, ddf, nearest),
                       affine if ddf_affine is None else ddf_affine)


def learn2reg_name(fixed_id: str, moving_id: str) -> str:
    """``disp_FFFF_MMMM.npz`` from the digits of the two case ids."""
    def digits(case_id: str) -> int:
        found = "".join(char for char in case_id if char.isdigit())
        return int(found) if found else 0

    return f"disp_{digits(fixed_id):04d}_{digits(moving_id):04d}.npz"


def save_learn2reg(path: Path, ddf: np.ndarray) -> None:
    """A Learn2Reg displacement file: (ndim, *S) float16 in a compressed ``.npz``."""
    with atomic_open(path, "wb") as handle:
        np.savez_compressed(handle, ddf.astype(np.float16))


def label_values(record_values: list[int] | None, fixed_label: np.ndarray) -> list[int]:
    """Label values to score: the training data's, else those present in the fixed label."""
    if record_values:
        return [int(value) for value in record_values]
    return [int(value) for value in np.unique(fixed_label) if value != 0]


def pair_dice_rows(fixed_label: np.ndarray, moving_label: np.ndarray,
                   warped_label: np.ndarray, values: list[int]) -> list[dict[str, Any]]:
    """Dice per label value before (moving resampled without registration) and after."""
    before = metrics.dice(fixed_label, moving_label, labels=values)
    after = metrics.dice(fixed_label, warped_label, labels=values)
    return [{"label": value, "dice_before": float(b), "dice_after": float(a)}
            for value, b, a in zip(values, before, after, strict=True)]


def predict_files(registrar: Registrar, fixed_path: Path, moving_path: Path, out_dir: Path,
                  moving_label_path: Path | None = None, fixed_label_path: Path | None = None,
                  learn2reg: bool = False, init: str = "centre") -> list[Path]:
    """Register one raw pair and write DDF, warped image/label (and metrics) into ``out_dir``.

    The folder is staged and renamed whole, so a failure leaves an earlier ``out_dir`` as it was.

    Returns:
        The written files.
    """
    fixed, moving = Volume.read(fixed_path), Volume.read(moving_path)
    moving_label = Volume.read(moving_label_path) if moving_label_path else None
    fixed_label = Volume.read(fixed_label_path) if fixed_label_path else None
    ndim = registrar.ndim
    if fixed_label is not None and fixed_label.array.shape[:ndim] != fixed.array.shape[:ndim]:
        raise DataError(f"{fixed_label.source}: label grid {fixed_label.array.shape} does not "
                        f"match its image {fixed.source} {fixed.array.shape}")
    result = registrar.register_volumes(fixed, moving, moving_label, init=init)
    with atomic_directory(out_dir) as staging:
        write_nifti(staging / "ddf.nii.gz", np.moveaxis(result["ddf"], 0, -1), fixed.affine)
        write_nifti(staging / "warped.nii.gz", result["warped"], fixed.affine)
        if "warped_label" in result:
            write_nifti(staging / "warped_label.nii.gz", result["warped_label"], fixed.affine)
        if fixed_label is not None and moving_label is not None:
            before = _unregistered_label(registrar, fixed, moving, moving_label, init)
            rows = pair_dice_rows(fixed_label.array, before, result["warped_label"],
                                  label_values(registrar.record.label_values, fixed_label.array))
            write_csv(staging / "metrics.csv", rows, ["label", "dice_before", "dice_after"])
        if learn2reg:
            save_learn2reg(staging / learn2reg_name(nifti_stem(fixed_path),
                                                    nifti_stem(moving_path)), result["ddf"])
        names = sorted(path.name for path in staging.iterdir())
    return [out_dir / name for name in names]


def _unregistered_label(registrar: Registrar, fixed: Volume, moving: Volume,
                        moving_label: Volume, init: str) -> np.ndarray:
    """The moving label on the fixed grid after the initial alignment alone (no registration)."""
    fixed_frame, moving_frame = registrar.to_model_frame(fixed), registrar.to_model_frame(moving)
    start = (np.eye(4) if init == "centre"
             else np.linalg.inv(moving_frame.affine) @ fixed_frame.affine)
    zero = torch.zeros(1, registrar.ndim, *fixed_frame.image.shape[2:])
    ddf = registrar.to_raw_grid(zero, fixed, moving, fixed_frame, moving_frame, start)
    return warp_label(moving_label.array, ddf, registrar.ndim)


class VolumeWriter:
    """Writes warped image, warped label and DDF of each evaluated pair as NIfTI (fixed affine).

    Args:
        out_dir: the (staging) folder to write into.
        learn2reg: also write ``disp_FFFF_MMMM.npz``.
    """

    def __init__(self, out_dir: Path, learn2reg: bool = False):
        self.out_dir = out_dir
        self.learn2reg = learn2reg
        out_dir.mkdir(parents=True, exist_ok=True)

    def __call__(self, batch: dict[str, Any], outputs: dict[str, torch.Tensor],
                 index: int) -> None:
        affine = batch["fixed_affine"][index].numpy()
        stem = f"{batch['fixed_id'][index]}__{batch['moving_id'][index]}"
        if "label_index" in batch and int(batch["label_index"][index]) >= 0:
            stem += f"__label{int(batch['label_index'][index])}"
        if "warped" in outputs:
            write_nifti(self.out_dir / f"{stem}_warped.nii.gz",
                        outputs["warped"][index, 0].numpy(), affine)
        if "warped_label" in outputs:
            label = (outputs["warped_label"][index].numpy() > 0.5).astype(np.uint8)
            write_nifti(self.out_dir / f"{stem}_warped_label.nii.gz",
                        np.moveaxis(label, 0, -1), affine)
        if "ddf" in outputs:
            ddf = outputs["ddf"][index].numpy()
            write_nifti(self.out_dir / f"{stem}_ddf.nii.gz", np.moveaxis(ddf, 0, -1), affine)
            if self.learn2reg:
                save_learn2reg(self.out_dir / learn2reg_name(batch["fixed_id"][index],
                                                             batch["moving_id"][index]), ddf)


def predict_split(registrar: Registrar, config: Config, manifest_file: Path, split: str,
                  out_dir: Path, learn2reg: bool = False, layout: str = "regflow",
                  png: bool = True, nifti: bool = True) -> list[Path]:
    """Register every evaluation pair of a processed split; NIfTI outputs and metrics CSVs.

    Args:
        layout: "regflow" (flat ``<fixed>__<moving>_*.nii.gz`` files and ``metrics.csv``) or
            "deepreg" (``deepreg_predict``'s ``pair_<i>/`` tree, see regflow.deepreg.layout).
        png, nifti: "deepreg" layout: write the PNG slices, the NIfTI volumes.

    Returns:
        The written files and folders (top level of ``out_dir``).
    """
    from regflow.data.loader import build_dataloader
    from regflow.deepreg.layout import DeepRegWriter
    from regflow.evaluation import evaluate_pairs

    manifest = Manifest.read(manifest_file)
    loader = build_dataloader(manifest_file, split, config, train=False)
    with atomic_directory(out_dir) as staging:
        writer = (DeepRegWriter(staging, png, nifti) if layout == "deepreg"
                  else VolumeWriter(staging, learn2reg))
        rows = evaluate_pairs(registrar, loader, manifest.voxel_size, manifest.channel_names,
                              on_pair=writer)
        if not rows:
            raise RegflowError(f"{manifest_file}: split {split!r} has no pairs")
        if isinstance(writer, DeepRegWriter):
            writer.write_metrics()
        else:
            write_csv(staging / "metrics.csv", rows)
        names = sorted(path.name for path in staging.iterdir())
    return [out_dir / name for name in names]


def predict_command(config: Config, model_spec: str, out_dir: Path, *, refine_steps: int | None,
                    fixed: Path | None, moving: Path | None, moving_label: Path | None,
                    fixed_label: Path | None, split: str | None, learn2reg: bool,
                    init: str, layout: str = "regflow", own_settings: bool = False,
                    png: bool = True, nifti: bool = True) -> list[Path]:
    """``regflow predict``: a raw pair or a split, with a model, an MLflow URI or none (the
    options as :func:`regflow.cli.check_predict_options` accepts them).

    ``own_settings``: a shipped checkpoint's own test-time settings instead of the config's
    (:func:`regflow.inference.load_registrar`).

    Raises:
        RegflowError: any input problem.
    """
    from regflow.paths import manifest_path

    registrar = load_registrar(model_spec, config, refine_steps, own_settings=own_settings)
    if split:
        return predict_split(registrar, config, manifest_path(config), split, out_dir,
                             learn2reg, layout, png, nifti)
    return predict_files(registrar, fixed, moving, out_dir, moving_label, fixed_label,
                         learn2reg, init)
