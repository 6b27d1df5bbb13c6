"""Layout conversions: a demo archive, as it unpacks, -> a layout :mod:`regflow.data.layouts` reads.

``fetch`` runs the catalogue entry's conversion after extraction and verification, inside the
staging folder: :func:`convert` moves the upstream tree aside (``.upstream/``), the conversion
writes the DeepReg layout in its place, and the upstream tree is removed. A failure anywhere
leaves nothing at ``data/raw/<name>`` (the staging folder is dropped).

Each conversion is generic (file moves, name patterns, HDF5 keys) and says in one line which file
or folder does not fit. A folder named in the options is looked for at the top of the archive or
one folder down, since GitHub archives unpack into ``<repository>-<branch>/``.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from scipy import ndimage

from regflow.data.io import (
    NIFTI_SUFFIXES,
    h5_keys,
    is_nifti,
    nifti_stem,
    read_h5_volume,
    write_nifti,
)
from regflow.data.layouts import folder_of
from regflow.errors import DataError

UPSTREAM_DIR = ".upstream"
GROUP_KEY = re.compile(r"group-[^-]+-[^-]+")
TAGGED_NAME = re.compile(r"(?P<case>.+)_(?P<tag>[A-Za-z0-9]+)")


def find_folder(upstream: Path, relative: str) -> Path:
    """``upstream/relative``, or ``upstream/<top>/relative`` for the one top folder holding it.

    Raises:
        DataError: no such folder, or several top folders hold one.
    """
    found = [path for path in [upstream / relative,
                               *(child / relative for child in sorted(upstream.iterdir())
                                 if child.is_dir())]
             if path.is_dir()]
    if not found:
        raise DataError(f"{upstream}: no {relative}/ folder (looked at the top of the archive "
                        "and one folder down)")
    if len(found) > 1 and found[0] != upstream / relative:
        raise DataError(f"{upstream}: {relative}/ found in several places "
                        f"({', '.join(str(path.relative_to(upstream)) for path in found)})")
    return found[0]


def find_single_file(upstream: Path, suffix: str) -> Path:
    """The one file ending in ``suffix`` anywhere under ``upstream``.

    Raises:
        DataError: none or several.
    """
    found = sorted(path for path in upstream.rglob(f"*{suffix}") if path.is_file())
    if len(found) != 1:
        listed = ", ".join(str(path.relative_to(upstream)) for path in found[:3]) or "none"
        raise DataError(f"{upstream}: expected one {suffix} file, found {len(found)} ({listed})")
    return found[0]


def _nifti_suffix(path: Path) -> str:
    return next(suffix for suffix in NIFTI_SUFFIXES if path.name.endswith(suffix))


def _move(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        raise DataError(f"{source}: would overwrite {target.name} (two files map to one case)")
    shutil.move(source, target)


def subfolder(upstream: Path, target: Path, *, path: str) -> None:
    """The archive already holds the layout in folder ``path``: make that folder the root."""
    root = find_folder(upstream, path)
    for child in sorted(root.iterdir()):
        _move(child, target / child.name)


def tagged_scans(upstream: Path, target: Path, *, images: str, labels: str,
                 sides: Mapping[str, str], exclude: tuple[str, ...] = ()) -> None:
    """Images and labels named ``<case>_<tag>.nii.gz`` in two folders -> DeepReg folders.

    Args:
        images, labels: the folders holding the images and the labels (same file names).
        sides: tag -> folder prefix: ``{"insp": "fixed_", "exp": "moving_"}`` gives a paired
            layout (``fixed_images/<case>.nii.gz``, ...), ``{"exp": ""}`` an unpaired one of one
            tag. Files with other tags are left out.
        exclude: case ids to leave out.

    Raises:
        DataError: a file not named ``<case>_<tag>``, or an image without its label.
    """
    image_dir, label_dir = find_folder(upstream, images), find_folder(upstream, labels)
    for image in sorted(path for path in image_dir.iterdir() if is_nifti(path)):
        match = TAGGED_NAME.fullmatch(nifti_stem(image))
        if match is None:
            raise DataError(f"{image}: expected a name <case>_<tag>.nii.gz")
        prefix = sides.get(match["tag"])
        if prefix is None or match["case"] in exclude:
            continue
        label = label_dir / image.name
        if not label.is_file():
            raise DataError(f"{image}: no label {label.name} in {label_dir}")
        name = match["case"] + _nifti_suffix(image)
        _move(image, target / f"{prefix}images" / name)
        _move(label, target / f"{prefix}labels" / name)


def grouped_by_prefix(upstream: Path, target: Path, *, separator: str = "_") -> None:
    """NIfTI files named ``<group><separator><image>.nii.gz`` anywhere in the archive ->
    ``images/<group>/<image>.nii.gz`` (a grouped layout; one group per subject).

    Raises:
        DataError: no NIfTI file, a name without the separator, or one image twice in a group.
    """
    files = sorted(path for path in upstream.rglob("*") if path.is_file() and is_nifti(path))
    if not files:
        raise DataError(f"{upstream}: no NIfTI files in the archive")
    for path in files:
        group, found, image = nifti_stem(path).partition(separator)
        if not found or not group or not image:
            raise DataError(f"{path}: expected a name <group>{separator}<image>.nii.gz")
        _move(path, target / "images" / group / (image + _nifti_suffix(path)))


def _write_h5(path: Path, volumes: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as handle:
        for key, array in volumes.items():
            handle.create_dataset(key, data=array, compression="gzip")


def h5_masks_as_images(upstream: Path, target: Path, *, sigma: float) -> None:
    """One HDF5 file of grouped masks (keys ``group-<g>-<i>``) -> ``labels.h5`` holding the masks
    and ``images.h5`` holding them smoothed (Gaussian, ``sigma`` voxels, float32): registration
    of the masks' shapes, as in feature-based registration.

    Raises:
        DataError: not one ``.h5`` file, an unreadable file, or a key of another form.
    """
    source = find_single_file(upstream, ".h5")
    masks = {}
    for key in h5_keys(source):
        if not GROUP_KEY.fullmatch(key):
            raise DataError(f"{source}: key {key!r} is not of the form 'group-<group>-<case>'")
        mask, _ = read_h5_volume(source, key)
        masks[key] = mask
    if not masks:
        raise DataError(f"{source}: holds no volumes")
    _write_h5(target / "labels.h5", masks)
    _write_h5(target / "images.h5", {key: ndimage.gaussian_filter(
        mask.astype(np.float32), sigma=sigma, output=np.float32) for key, mask in masks.items()})


def h5_folds(upstream: Path, target: Path, *, splits: Mapping[str, list[str]]) -> None:
    """Fold folders of DeepReg HDF5 files (``<fold>/images.h5`` [``labels.h5``]) -> one
    ``<split>/images.h5`` per split, keys prefixed ``<fold>-`` so that they stay unique.

    Args:
        splits: split -> the fold folders it takes, e.g. ``{"train": ["fold0", ...], ...}``.

    Raises:
        DataError: a missing fold folder or ``images.h5``, or a fold with labels beside one
            without.
    """
    for split, folds in splits.items():
        merged: dict[str, dict[str, np.ndarray]] = {}
        for fold in folds:
            folder = find_folder(upstream, fold)
            if not (folder / "images.h5").is_file():
                raise DataError(f"{folder}: no images.h5")
            for name in ("images.h5", "labels.h5"):
                if (folder / name).is_file():
                    volumes = merged.setdefault(name, {})
                    for key in h5_keys(folder / name):
                        volumes[f"{fold}-{key}"] = read_h5_volume(folder / name, key)[0]
        if "labels.h5" in merged and len(merged["labels.h5"]) != len(merged["images.h5"]):
            raise DataError(f"{upstream}: some folds of {split} have labels.h5 and some do not")
        for name, volumes in merged.items():
            _write_h5(target / split / name, volumes)


def h5_pair(upstream: Path, target: Path, *, roles: Mapping[str, str]) -> None:
    """One HDF5 file holding a pair -> a paired NIfTI layout of one case (the file's stem).

    Args:
        roles: paired role -> HDF5 key, e.g. ``{"moving_image": "image0", "fixed_image":
            "image1", ...}``; volumes keep their arrays, affines from a ``spacing`` attribute.

    Raises:
        DataError: not one ``.h5`` file, or a key it does not hold.
    """
    source = find_single_file(upstream, ".h5")
    for role, key in roles.items():
        array, affine = read_h5_volume(source, key)
        write_nifti(target / folder_of(role) / f"{source.stem}.nii.gz", array, affine)


def random_affine(shape: tuple[int, ...], scale: float, rng: np.random.Generator) -> np.ndarray:
    """A (4, 4) voxel matrix: identity plus uniform(-scale, scale) on the linear part, and a shift
    of up to ``scale`` half-widths, about the volume centre."""
    centre = (np.asarray(shape[:3], dtype=np.float64) - 1) / 2
    linear = np.eye(3) + rng.uniform(-scale, scale, size=(3, 3))
    shift = rng.uniform(-scale, scale, size=3) * centre
    matrix = np.eye(4)
    matrix[:3, :3] = linear
    matrix[:3, 3] = centre - linear @ centre + shift
    return matrix


def _transform(array: np.ndarray, matrix: np.ndarray, order: int) -> np.ndarray:
    """``out[y] = array[matrix @ y]`` for a (X, Y, Z) or (X, Y, Z, C) array, zeros outside."""
    channels = array[..., None] if array.ndim == 3 else array
    moved = np.stack([ndimage.affine_transform(channels[..., index].astype(np.float32),
                                               matrix, order=order, mode="constant")
                      for index in range(channels.shape[-1])], axis=-1)
    return moved[..., 0] if array.ndim == 3 else moved


def h5_affine_pair(upstream: Path, target: Path, *, image: str, label: str | None = None,
                   scale: float = 0.2, seed: int = 0) -> None:
    """One HDF5 image (and label) -> a paired layout whose moving side is the image under a
    random affine (seeded, so the ground truth is reproducible; it is written to
    ``simulated_affine.json`` as ``moving[y] = fixed[matrix @ y]`` in voxels).

    Raises:
        DataError: not one ``.h5`` file, or a key it does not hold.
    """
    source = find_single_file(upstream, ".h5")
    fixed, affine = read_h5_volume(source, image)
    matrix = random_affine(fixed.shape, scale, np.random.default_rng(seed))
    case = f"{source.stem}.nii.gz"
    write_nifti(target / "fixed_images" / case, fixed.astype(np.float32), affine)
    write_nifti(target / "moving_images" / case, _transform(fixed, matrix, order=1), affine)
    if label is not None:
        fixed_label, _ = read_h5_volume(source, label)
        moved = _transform(fixed_label, matrix, order=1) >= 0.5
        write_nifti(target / "fixed_labels" / case, (fixed_label > 0.5).astype(np.uint8), affine)
        write_nifti(target / "moving_labels" / case, moved.astype(np.uint8), affine)
    (target / "simulated_affine.json").write_text(json.dumps(
        {"meaning": "moving[y] = fixed[matrix @ y], voxels", "seed": seed, "scale": scale,
         "matrix": matrix.tolist()}, indent=1) + "\n", encoding="utf-8")


CONVERSIONS: dict[str, Callable[..., None]] = {
    "subfolder": subfolder,
    "tagged_scans": tagged_scans,
    "grouped_by_prefix": grouped_by_prefix,
    "h5_masks_as_images": h5_masks_as_images,
    "h5_folds": h5_folds,
    "h5_pair": h5_pair,
    "h5_affine_pair": h5_affine_pair,
}


def convert(folder: Path, name: str, options: Mapping[str, Any]) -> None:
    """Convert the upstream tree in ``folder`` in place with conversion ``name``.

    Args:
        folder: the staging folder holding the extracted archive (or downloaded files).
        name: a key of :data:`CONVERSIONS`.
        options: its keyword arguments (the catalogue entry's ``conversion_options``).

    Raises:
        DataError: the upstream tree does not fit the conversion (names the file or folder).
        KeyError: an unknown conversion name (a catalogue bug, not user input).
    """
    function = CONVERSIONS[name]
    upstream = folder / UPSTREAM_DIR
    upstream.mkdir()
    for child in sorted(folder.iterdir()):
        if child != upstream:
            shutil.move(child, upstream / child.name)
    try:
        function(upstream, folder, **options)
    except DataError as exc:  # name files as they are in the archive, not in the staging folder
        message = str(exc).replace(f"{upstream}/", "").replace(str(upstream), "the archive")
        raise DataError(message) from None
    except (OSError, ValueError) as exc:  # h5py and scipy report some bad files this way
        raise DataError(f"the {name} conversion failed ({exc.__class__.__name__}: {exc})"
                        ) from None
    shutil.rmtree(upstream)
