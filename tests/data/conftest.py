"""Tiny processed datasets in the manifest format, whose voxels say which case and side they are.

Case ``caseNNN`` (grouped: ``gG-caseNNN``) has number ``k = NNN``. Its image is
``10 * (k + 1) + 5 * [moving side] + a small ramp + 100 inside its label cubes``; its two label
cubes sit at a position set by ``k`` and the side, so a batch pairing the wrong files is caught.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest

from regflow.data.manifest import Case, Manifest, PreprocessSettings

SHAPE = (12, 14, 10)
LABEL_VALUES = [5, 3]  # channel 0 is stored as 5, channel 1 as 3: not simply 1..L
CUBE = 3
SIDES = ("fixed", "moving")


def case_number(case_id: str) -> int:
    """``k`` of ``caseNNN`` or ``gG-caseNNN``."""
    return int(re.search(r"case(\d+)$", case_id).group(1))


def label_channels(case_id: str, side: str = "fixed", shape=SHAPE) -> np.ndarray:
    """Expected (2, *shape) binary float32 label of a case's side: two disjoint cubes."""
    k, s = case_number(case_id), SIDES.index(side)
    i, j = k % (shape[0] - CUBE + 1), 1 + 5 * s
    depth = (slice(2, 2 + CUBE),) if len(shape) == 3 else ()
    channels = np.zeros((2, *shape), np.float32)
    channels[(0, slice(i, i + CUBE), slice(j, j + CUBE), *depth)] = 1
    channels[(1, slice(i, i + CUBE), slice(j + 4, j + 4 + CUBE), *depth)] = 1
    return channels


def image(case_id: str, side: str = "fixed", shape=SHAPE) -> np.ndarray:
    """Expected float32 image of a case's side."""
    k, s = case_number(case_id), SIDES.index(side)
    ramp = sum(np.indices(shape)[a] * 10.0 ** -(2 + a) for a in range(len(shape)))
    cubes = label_channels(case_id, side, shape).max(axis=0)
    return (10 * (k + 1) + 5 * s + ramp + 100 * cubes).astype(np.float32)


def affine(case_id: str, side: str = "fixed") -> np.ndarray:
    """A non-trivial affine per file: anisotropic spacing and an origin set by the case."""
    k, s = case_number(case_id), SIDES.index(side)
    return np.array([[1.5, 0, 0, k], [0, 2.0, 0, -k], [0, 0, 2.5, 3 + s], [0, 0, 0, 1]])


def _save(array: np.ndarray, matrix: np.ndarray, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, matrix), path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _label_file(case_id: str, side: str, label_format: str, shape) -> np.ndarray:
    channels = label_channels(case_id, side, shape).astype(np.uint8)
    if label_format == "channels":
        return np.moveaxis(channels, 0, -1)
    return (channels * np.array(LABEL_VALUES, np.uint8).reshape(-1, *[1] * len(shape))).max(0)


def write_dataset(root: Path, pairing: str, label_format: str | None,
                  splits: dict[str, list[str]], groups: dict[str, str] | None = None,
                  shape=SHAPE) -> Path:
    """Write NIfTI files + manifest.json under ``root``; return the manifest path."""
    cases = []
    for split, ids in splits.items():
        for case_id in ids:
            case = {"case_id": case_id, "split": split, "fold": None}
            sides = SIDES if pairing == "paired" else ("fixed",)
            for side in sides:
                prefix = f"{side}_" if pairing == "paired" else ""
                folder = f"{side}_" if pairing == "paired" else ""
                name = f"{case_id}.nii.gz"
                image_path = f"{folder}images/{name}"
                case[f"{prefix}image"] = image_path
                case[f"{prefix}image_sha256"] = _save(image(case_id, side, shape),
                                                      affine(case_id, side), root / image_path)
                case[f"{prefix}label"] = case[f"{prefix}label_sha256"] = None
                if label_format is not None:
                    label_path = f"{folder}labels/{name}"
                    case[f"{prefix}label"] = label_path
                    case[f"{prefix}label_sha256"] = _save(
                        _label_file(case_id, side, label_format, shape), affine(case_id, side),
                        root / label_path)
            if pairing != "paired":
                case["group"] = (groups or {}).get(case_id)
            cases.append(case)
    manifest = Manifest(
        dataset="synthetic", pairing=pairing, shape=list(shape),
        spacing=[1.5, 2.0, 2.5][:len(shape)], simulated=True, label_format=label_format,
        label_values=LABEL_VALUES if label_format == "integer" else None,
        label_names=["first", "second"] if label_format else None,
        preprocessing=PreprocessSettings(shape=list(shape), seed=0),
        cases=[Case(**case) for case in cases])
    path = root / "manifest.json"
    manifest.write(path)
    return path


def grouped_ids(num_groups: int, per_group: int, start: int = 0) -> dict[str, str]:
    """``{"gG-caseNNN": "gG"}`` for consecutive case numbers from ``start``."""
    return {f"g{g}-case{start + g * per_group + t:03d}": f"g{g}"
            for g in range(num_groups) for t in range(per_group)}


@pytest.fixture
def synthetic() -> SimpleNamespace:
    """What the synthetic files hold: ``image``, ``label_channels``, ``affine``, ``case_number``,
    ``shape`` (tests reach the helpers through this fixture rather than importing a conftest)."""
    return SimpleNamespace(image=image, label_channels=label_channels, affine=affine,
                           case_number=case_number, shape=SHAPE)


@pytest.fixture
def make_dataset(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``make_dataset(pairing, label_format, ...)`` -> manifest path in ``tmp_path``.

    Defaults: 6 train + 4 val cases (grouped: 3 groups of 3 train, 2 groups of 2 val).
    """

    def make(pairing: str = "unpaired", label_format: str | None = "integer", shape=SHAPE,
             name: str = "data") -> Path:
        if pairing == "grouped":
            train, val = grouped_ids(3, 3), grouped_ids(2, 2, start=9)
            groups = train | val
            splits = {"train": list(train), "val": list(val)}
        else:
            groups = None
            splits = {"train": [f"case{k:03d}" for k in range(6)],
                      "val": [f"case{k:03d}" for k in range(6, 10)]}
        return write_dataset(tmp_path / name, pairing, label_format, splits, groups, shape)

    return make
