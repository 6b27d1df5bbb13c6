"""Registration of users' own files: warp a volume with a DDF, register a raw pair."""

from __future__ import annotations

import csv
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.ndimage import map_coordinates

from regflow import metrics, spatial
from regflow.config import Config, PreprocessConfig
from regflow.data.io import nifti_stem, read_volume, write_nifti
from regflow.data.preprocess import process_image
from regflow.errors import DataError, RegflowError
from regflow.models import RegistrationModel


def read_ddf(path: Path) -> np.ndarray:
    """Read a displacement field as (ndim, *S) float32 voxels.

    Accepts NIfTI vector images (*S, ndim) (also with NIfTI's extra singleton 5th axis),
    ``.npy`` (ndim, *S) and Learn2Reg ``.npz`` (first array, (ndim, *S)).

    Raises:
        DataError: unreadable file or not a displacement field.
    """
    name = path.name
    if name.endswith((".npy", ".npz")):
        if not path.is_file():
            raise DataError(f"{path}: no such file")
        try:
            loaded = np.load(path)
            ddf = loaded[loaded.files[0]] if name.endswith(".npz") else loaded
        except (OSError, ValueError, IndexError) as exc:
            raise DataError(f"{path}: not a readable numpy file ({exc})") from None
    else:
        array, _ = read_volume(path)
        ddf = np.moveaxis(np.squeeze(array, axis=3) if array.ndim == 5 else array, -1, 0)
    ddf = np.asarray(ddf, dtype=np.float32)
    if ddf.ndim not in (3, 4) or ddf.shape[0] != ddf.ndim - 1:
        raise DataError(f"{path}: expected a displacement field with one channel per axis, "
                        f"got shape {tuple(ddf.shape)}")
    return ddf


def warp_array(array: np.ndarray, ddf: np.ndarray, nearest: bool = False) -> np.ndarray:
    """Warp a (*S) or (*S, C) array with a (ndim, *S) DDF; warped[x] = array[x + ddf[x]]."""
    channels_last = array.ndim == ddf.shape[0] + 1
    image = torch.from_numpy(np.asarray(array, dtype=np.float32))
    image = image.movedim(-1, 0) if channels_last else image[None]
    warped = spatial.warp(image[None], torch.from_numpy(ddf)[None],
                          interp="nearest" if nearest else "linear")[0]
    warped = warped.movedim(0, -1) if channels_last else warped[0]
    result = warped.numpy()
    return result.astype(array.dtype) if nearest else result


def warp_file(image_path: Path, ddf_path: Path, out_path: Path, nearest: bool = False) -> Path:
    """Warp a NIfTI image (or label with ``nearest``) by a DDF and write it with its affine.

    Raises:
        DataError: unreadable inputs or a DDF whose grid differs from the image's.
    """
    array, affine = read_volume(image_path)
    ddf = read_ddf(ddf_path)
    if tuple(array.shape[: ddf.shape[0]]) != tuple(ddf.shape[1:]):
        raise DataError(f"{ddf_path}: grid {tuple(ddf.shape[1:])} does not match "
                        f"{image_path} {tuple(array.shape)}")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    return write_nifti(out_path, warp_array(array, ddf, nearest), affine)


def voxel_map(original_affine: np.ndarray, processed_affine: np.ndarray) -> np.ndarray:
    """(4, 4) map from processed voxel indices to original voxel indices.

    Both grids carry their voxel-to-world affines, so the map follows from them alone:
    ``original = inv(A_original) @ A_processed @ processed``.
    """
    return np.linalg.inv(original_affine) @ processed_affine


def sample_field(field: np.ndarray, coordinates: np.ndarray, order: int = 1,
                 mode: str = "nearest", cval: float = 0.0) -> np.ndarray:
    """Sample every channel of a (C, *S) field at (ndim, *T) voxel coordinates -> (C, *T)."""
    return np.stack([map_coordinates(channel, coordinates, order=order, mode=mode, cval=cval)
                     for channel in field])


def grid_coordinates(shape: tuple[int, ...]) -> np.ndarray:
    """(ndim, *shape) array of voxel indices."""
    return np.stack(np.meshgrid(*[np.arange(size, dtype=np.float64) for size in shape],
                                indexing="ij"))


def apply_voxel_map(matrix: np.ndarray, coordinates: np.ndarray) -> np.ndarray:
    """Apply a (4, 4) voxel map to (ndim, *S) coordinates."""
    ndim = coordinates.shape[0]
    linear, shift = matrix[:ndim, :ndim], matrix[:ndim, 3]
    flat = coordinates.reshape(ndim, -1)
    return (linear @ flat + shift[:, None]).reshape(coordinates.shape)


def ddf_on_original_grid(ddf: np.ndarray, fixed_map: np.ndarray, moving_map: np.ndarray,
                         fixed_shape: tuple[int, ...]) -> np.ndarray:
    """Carry a DDF predicted between processed grids onto the raw images' grids.

    Args:
        ddf: (ndim, *P) displacement on the processed fixed grid (voxels).
        fixed_map: processed -> original voxel map of the fixed image (:func:`voxel_map`).
        moving_map: the same for the moving image.
        fixed_shape: spatial shape of the raw fixed image.

    Returns:
        (ndim, *fixed_shape) DDF with ``moving_raw[x + ddf[x]]`` corresponding to ``fixed_raw[x]``.
    """
    original = grid_coordinates(fixed_shape)
    processed = apply_voxel_map(np.linalg.inv(fixed_map), original)
    displaced = processed + sample_field(ddf.astype(np.float64), processed)
    return (apply_voxel_map(moving_map, displaced) - original).astype(np.float32)


def warp_raw(volume: np.ndarray, ddf: np.ndarray, nearest: bool) -> np.ndarray:
    """Warp a raw (*S_m) or (*S_m, C) volume by a (ndim, *S_f) DDF onto the fixed grid (zeros
    outside; nearest keeps label values)."""
    ndim = ddf.shape[0]
    coordinates = grid_coordinates(ddf.shape[1:]) + ddf
    channels = volume[None] if volume.ndim == ndim else np.moveaxis(volume, -1, 0)
    order = 0 if nearest else 1
    warped = sample_field(channels.astype(np.float32), coordinates, order=order,
                          mode="constant")
    warped = warped[0] if volume.ndim == ndim else np.moveaxis(warped, 0, -1)
    return warped.astype(volume.dtype) if nearest else warped.astype(np.float32)


@dataclass(frozen=True)
class RawVolume:
    """A volume as the user has it: array in its own grid and the voxel-to-world affine."""

    array: np.ndarray
    affine: np.ndarray
    source: str

    @classmethod
    def read(cls, path: Path) -> RawVolume:
        """Read a NIfTI file (DataError naming it when unreadable)."""
        array, affine = read_volume(path)
        return cls(np.asarray(array), affine, str(path))


def check_dimensionality(volume: RawVolume, ndim: int) -> None:
    """Raise when a raw volume does not have the model's number of spatial dimensions."""
    spatial_ndim = volume.array.ndim - (1 if volume.array.ndim == ndim + 1 and
                                        volume.array.shape[-1] == 1 else 0)
    if spatial_ndim != ndim:
        raise DataError(f"{volume.source}: expected a {ndim}-D volume for this model, got shape "
                        f"{tuple(volume.array.shape)}")


def preprocess_params(record: dict[str, Any]) -> PreprocessConfig:
    """The preprocess settings recorded in a checkpoint (source-spacing notes dropped)."""
    return PreprocessConfig.model_validate({
        key: value for key, value in record["preprocessing"].items()
        if key in PreprocessConfig.model_fields})


def prepare_image(volume: RawVolume, params: PreprocessConfig) -> tuple[torch.Tensor, np.ndarray]:
    """Preprocess a raw image as training data was (resample, normalise, crop/pad).

    Returns:
        ``(image, voxel_map)``: (1, 1, *shape) float32 tensor and the processed -> raw voxel map.
    """
    array = volume.array[..., 0] if volume.array.ndim == len(params.shape) + 1 else volume.array
    processed, processed_affine = process_image(array, volume.affine, params)
    return (torch.from_numpy(np.ascontiguousarray(processed))[None, None],
            voxel_map(volume.affine, processed_affine))


def register_pair(model: RegistrationModel, record: dict[str, Any], fixed: RawVolume,
                  moving: RawVolume, moving_label: RawVolume | None = None,
                  device: torch.device | None = None) -> dict[str, np.ndarray]:
    """Register one raw pair with a trained model; outputs on the raw fixed image's grid.

    Args:
        model: a DDF-producing RegistrationModel (ddf, dvf or affine).
        record: the checkpoint's ``preprocessing`` record (shape, spacing, normalisation).
        fixed, moving: raw volumes of any size and spacing.
        moving_label: optional raw label of the moving image (warped with nearest neighbour).
        device: where to run the model (default: the model's).

    Returns:
        "ddf" (ndim, *S_fixed) voxels of the raw grids, "warped" (*S_fixed) float32 and
        "warped_label" when a label is given.

    Raises:
        RegflowError: the model predicts no DDF, or the volumes have the wrong dimensionality.
    """
    if model.method == "conditional":
        raise RegflowError("predict: a conditional model predicts labels, not a DDF; "
                           "use `regflow evaluate` for it")
    params = preprocess_params(record)
    for volume in (fixed, moving, moving_label):
        if volume is not None:
            check_dimensionality(volume, model.ndim)
    device = device or next(model.parameters()).device
    fixed_image, fixed_map = prepare_image(fixed, params)
    moving_image, moving_map = prepare_image(moving, params)
    model.eval()
    with torch.no_grad():
        outputs = model(moving_image.to(device), fixed_image.to(device))
    ddf = ddf_on_original_grid(outputs["ddf"][0].float().cpu().numpy(), fixed_map, moving_map,
                               tuple(fixed.array.shape[: model.ndim]))
    result = {"ddf": ddf, "warped": warp_raw(moving.array.astype(np.float32), ddf, False)}
    if moving_label is not None:
        result["warped_label"] = warp_raw(moving_label.array, ddf, nearest=True)
    return result


def load_model(spec: str, device: torch.device | None = None
               ) -> tuple[RegistrationModel, dict[str, Any]]:
    """Load a checkpoint path or an MLflow model URI (``models:/regflow@champion``, ``runs:/``).

    Raises:
        RegflowError: unknown URI, no checkpoint inside it, or a corrupt checkpoint.
    """
    if "://" in spec or spec.startswith(("models:/", "runs:/")):
        import mlflow

        from regflow import tracking

        mlflow.set_tracking_uri(tracking.tracking_uri())
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=spec))
        except Exception as exc:  # MLflow raises several kinds for unknown names and aliases
            raise RegflowError(f"{spec}: cannot load the model ({exc.__class__.__name__}: "
                               f"{str(exc).splitlines()[0]})") from None
        checkpoints = sorted(local.rglob("*.pt"))
        if not checkpoints:
            raise RegflowError(f"{spec}: no regflow checkpoint inside the model")
        spec = str(checkpoints[0])
    model, extra = RegistrationModel.load(spec, map_location=device or "cpu")
    return model, extra


def label_values_of(record: dict[str, Any], fixed_label: np.ndarray) -> list[int]:
    """Label values to score: the training data's, else those present in the fixed label."""
    values = record.get("label_values")
    if values:
        return [int(value) for value in values]
    return [int(value) for value in np.unique(fixed_label) if value != 0]


def pair_metric_rows(fixed_label: np.ndarray, moving_label: np.ndarray,
                     warped_label: np.ndarray, values: list[int]) -> list[dict[str, Any]]:
    """Dice per label value before (moving) and after (warped) registration."""
    before = metrics.dice(fixed_label, moving_label, labels=values)
    after = metrics.dice(fixed_label, warped_label, labels=values)
    return [{"label": value, "dice_before": float(b), "dice_after": float(a)}
            for value, b, a in zip(values, before, after, strict=True)]


def learn2reg_name(fixed_id: str, moving_id: str) -> str:
    """``disp_FFFF_MMMM.npz`` from the digits of the two case ids."""
    def digits(case_id: str) -> int:
        found = "".join(char for char in case_id if char.isdigit())
        return int(found) if found else 0

    return f"disp_{digits(fixed_id):04d}_{digits(moving_id):04d}.npz"


def predict_files(model_spec: str, fixed_path: Path, moving_path: Path, out_dir: Path,
                  moving_label_path: Path | None = None, fixed_label_path: Path | None = None,
                  learn2reg: bool = False) -> list[Path]:
    """Register one raw pair and write DDF, warped image/label (and metrics) into ``out_dir``.

    Everything is written into a staging folder first and moved into ``out_dir`` only when
    complete, so a failure leaves ``out_dir`` untouched.

    Returns:
        The written files.
    """
    model, extra = load_model(model_spec)
    record = extra.get("preprocessing") or {}
    if "preprocessing" not in record:
        raise RegflowError(f"{model_spec}: checkpoint has no preprocessing record")
    fixed, moving = RawVolume.read(fixed_path), RawVolume.read(moving_path)
    moving_label = RawVolume.read(moving_label_path) if moving_label_path else None
    fixed_label = RawVolume.read(fixed_label_path) if fixed_label_path else None
    for label, image in ((moving_label, moving), (fixed_label, fixed)):
        if label is not None and label.array.shape[: model.ndim] != image.array.shape[: model.ndim]:
            raise DataError(f"{label.source}: label grid {label.array.shape} does not match its "
                            f"image {image.source} {image.array.shape}")
    result = register_pair(model, record, fixed, moving, moving_label)
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".predict-", dir=out_dir))
    try:
        write_nifti(staging / "ddf.nii.gz", np.moveaxis(result["ddf"], 0, -1), fixed.affine)
        write_nifti(staging / "warped.nii.gz", result["warped"], fixed.affine)
        if "warped_label" in result:
            write_nifti(staging / "warped_label.nii.gz", result["warped_label"], fixed.affine)
        if fixed_label is not None and moving_label is not None:
            write_metrics_csv(staging / "metrics.csv", model, record, fixed, moving,
                              fixed_label, moving_label, result["warped_label"])
        if learn2reg:
            name = learn2reg_name(nifti_stem(fixed_path), nifti_stem(moving_path))
            np.savez_compressed(staging / name, result["ddf"].astype(np.float16))
        written = []
        for path in sorted(staging.iterdir()):
            target = out_dir / path.name
            os.replace(path, target)
            written.append(target)
        return written
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_metrics_csv(path: Path, model: RegistrationModel, record: dict[str, Any],
                      fixed: RawVolume, moving: RawVolume, fixed_label: RawVolume,
                      moving_label: RawVolume, warped_label: np.ndarray) -> None:
    """Dice per label before (centre-aligned as in preprocessing, no registration) and after."""
    params = preprocess_params(record)
    _, fixed_map = prepare_image(fixed, params)
    _, moving_map = prepare_image(moving, params)
    zero = np.zeros((model.ndim, *params.shape), np.float32)
    identity = ddf_on_original_grid(zero, fixed_map, moving_map,
                                    tuple(fixed.array.shape[: model.ndim]))
    unregistered = warp_raw(moving_label.array, identity, nearest=True)
    values = label_values_of(record, fixed_label.array)
    rows = pair_metric_rows(fixed_label.array, unregistered, warped_label, values)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["label", "dice_before", "dice_after"])
        writer.writeheader()
        writer.writerows(rows)


def predict_split(model_spec: str, config: Config, split: str, out_dir: Path,
                  learn2reg: bool = False) -> list[Path]:
    """Register every evaluation pair of a processed split; NIfTI outputs, metrics CSV.

    Returns:
        The written files.
    """
    from regflow.data.loader import build_dataloader, read_manifest
    from regflow.engine import label_names_of
    from regflow.evaluation import evaluate_pairs
    from regflow.pipeline import VolumeWriter, manifest_path, write_csv

    model, _ = load_model(model_spec)
    manifest_file = manifest_path(config)
    manifest = read_manifest(manifest_file)
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".predict-", dir=out_dir))
    try:
        writer = VolumeWriter(staging)

        def write_pair(batch: dict[str, Any], outputs: dict[str, torch.Tensor],
                       index: int) -> None:
            writer(batch, outputs, index)
            if learn2reg and "ddf" in outputs:
                name = learn2reg_name(batch["fixed_id"][index], batch["moving_id"][index])
                np.savez_compressed(staging / name,
                                    outputs["ddf"][index].numpy().astype(np.float16))

        loader = build_dataloader(manifest_file, split, config, train=False)
        spacing = manifest.get("spacing") or [1.0] * len(manifest["shape"])
        rows = evaluate_pairs(model, loader, next(model.parameters()).device, spacing,
                              label_names_of(manifest), on_pair=write_pair)
        write_csv(staging / "metrics.csv", rows)
        written = []
        for path in sorted(staging.iterdir()):
            os.replace(path, out_dir / path.name)
            written.append(out_dir / path.name)
        return written
    finally:
        shutil.rmtree(staging, ignore_errors=True)
