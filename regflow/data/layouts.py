"""Raw dataset layouts: find every case's volumes (by role) in a raw dataset folder.

Accepted layouts (``layout`` / ``file_format``):

- ``msd``: ``<root>[/<subdir>]/dataset.json`` (Decathlon index: ``labels`` maps "0" background,
  "1" ...; ``training`` lists ``{"image", "label"}`` paths relative to that folder). No splits.
- ``deepreg-paired``: ``<root>/{train,val,test}/{fixed_images,moving_images,fixed_labels,
  moving_labels}/<case>.nii.gz``.
- ``deepreg-unpaired``: ``<root>/{train,val,test}/{images,labels}/<case>.nii.gz``.
- ``deepreg-grouped``: ``<root>/{train,val,test}/{images,labels}/<group>/<case>.nii.gz``; the
  case id becomes ``<group>-<case>``.

In the DeepReg layouts the split folders are optional (without them the role folders sit in
``<root>``) and so are the label folders (all or none); labels are 3-D integer maps or 4-D
channels-last binary maps. A split may be made of several folders, as DeepReg's ``dir: [a, b]``:
``<root>/<split>/<part>/<role folders>``; the case (and group) ids of a part then start with
``<part>-``, so that parts may reuse names. With ``file_format="h5"`` (DeepReg's HDF5) every
role folder is replaced by one file ``<folder>.h5``, e.g. ``train/fixed_images.h5``,
``train/images.h5``, whose dataset keys are the case ids; grouped data use keys
``group-<group>-<case>`` in ``images.h5``/``labels.h5``. HDF5 volumes have no affine: an optional
``spacing`` attribute gives a diagonal one, otherwise it is the identity.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from regflow.data.io import (
    h5_keys,
    is_nifti,
    nifti_stem,
    read_h5_volume,
    read_volume,
    volume_shape,
)
from regflow.data.splits import SPLITS
from regflow.errors import DataError

ROLES = {
    "paired": ("fixed_image", "moving_image", "fixed_label", "moving_label"),
    "unpaired": ("image", "label"),
    "grouped": ("image", "label"),
}


def folder_of(role: str) -> str:
    """The raw and processed folder name of a role: ``fixed_image`` -> ``fixed_images``."""
    return f"{role}s"


def label_role(image_role: str) -> str:
    """The label role that goes with an image role: ``fixed_image`` -> ``fixed_label``."""
    return image_role.replace("image", "label")


@dataclass(frozen=True)
class VolumeRef:
    """Where one raw volume lives: a NIfTI file, or a dataset ``key`` inside an HDF5 file."""

    path: Path
    key: str | None = None

    def read(self) -> tuple[np.ndarray, np.ndarray]:
        """``(array, (4, 4) affine)`` of the volume; see :mod:`regflow.data.io`."""
        if self.key is None:
            return read_volume(self.path)
        return read_h5_volume(self.path, self.key)

    def shape(self) -> tuple[int, ...]:
        """The stored array shape, read from the header only."""
        return volume_shape(self.path, self.key)


@dataclass
class RawCase:
    """One raw case: its id, the split and group the layout gives, and its volumes by role."""

    case_id: str
    split: str | None
    group: str | None
    volumes: dict[str, VolumeRef] = field(default_factory=dict)


def discover_cases(raw_root: Path, layout: str, pairing: str, file_format: str = "nifti",
                   subdir: str | None = None) -> tuple[list[RawCase], dict[int, str] | None]:
    """Find the cases of a raw dataset folder.

    Args:
        raw_root: the raw dataset folder.
        layout: "msd" | "deepreg-paired" | "deepreg-unpaired" | "deepreg-grouped".
        pairing: "paired" | "unpaired" | "grouped" (which roles each case has, see ROLES).
        file_format: "nifti" | "h5" (DeepReg layouts only).
        subdir: msd only: the folder holding dataset.json (found when omitted).

    Returns:
        ``(cases, msd_labels)``: cases sorted by id, each with every image role and either every
        label role or none; msd_labels is dataset.json's ``{value: name}`` map (None otherwise).

    Raises:
        DataError: no cases, a case missing from one role folder, a duplicate case id, labels
            for only some cases, an unreadable dataset.json or HDF5 key list.
    """
    if layout == "msd":
        return _discover_msd(raw_root, subdir)
    return _discover_deepreg(raw_root, pairing, file_format), None


def _discover_msd(root: Path, subdir: str | None) -> tuple[list[RawCase], dict[int, str]]:
    folder = root / subdir if subdir else _msd_folder(root)
    index = folder / "dataset.json"
    try:
        meta = json.loads(index.read_text())
        items = meta["training"]
        labels = {int(value): str(name) for value, name in meta.get("labels", {}).items()}
        cases = [RawCase(nifti_stem(item["image"]), None, None,
                         {"image": VolumeRef(folder / item["image"])}
                         | ({"label": VolumeRef(folder / item["label"])} if item.get("label")
                            else {}))
                 for item in items]
    except FileNotFoundError:
        raise DataError(f"{index}: missing (the Decathlon dataset index)") from None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DataError(f"{index}: not a Decathlon dataset.json ({exc!r})") from None
    if not cases:
        raise DataError(f"{index}: lists no training cases")
    _check_cases(cases, index)
    return sorted(cases, key=lambda case: case.case_id), labels


def _msd_folder(root: Path) -> Path:
    if (root / "dataset.json").is_file():
        return root
    found = sorted(child for child in root.iterdir() if (child / "dataset.json").is_file())
    if len(found) != 1:
        raise DataError(f"{root}: expected one folder with a dataset.json, found {len(found)}")
    return found[0]


def _holds_roles(folder: Path, pairing: str, file_format: str) -> bool:
    """Whether ``folder`` directly holds a role folder (or HDF5 role file) of ``pairing``."""
    suffix = ".h5" if file_format == "h5" else ""
    return any((folder / f"{folder_of(role)}{suffix}").exists() for role in ROLES[pairing])


def _split_bases(root: Path, pairing: str, file_format: str
                 ) -> list[tuple[str | None, Path, str]]:
    """``(split, folder, id prefix)`` of every folder holding role folders: the split folders,
    the part folders of a split made of several, or ``root`` itself."""
    bases = []
    for split in SPLITS:
        folder = root / split
        if not folder.is_dir():
            continue
        if _holds_roles(folder, pairing, file_format):
            bases.append((split, folder, ""))
            continue
        bases += [(split, part, f"{part.name}-") for part in sorted(folder.iterdir())
                  if part.is_dir() and _holds_roles(part, pairing, file_format)]
    return bases or [(None, root, "")]


def _discover_deepreg(root: Path, pairing: str, file_format: str) -> list[RawCase]:
    cases = []
    for split, base, prefix in _split_bases(root, pairing, file_format):
        cases.extend(_discover_base(base, split, pairing, file_format, prefix))
    if not cases:
        role = folder_of(ROLES[pairing][0])
        raise DataError(f"{root}: no {pairing} cases found (expected [train|val|test/]{role}"
                        f"{'.h5' if file_format == 'h5' else '/'})")
    _check_cases(cases, root)
    return sorted(cases, key=lambda case: case.case_id)


def _discover_base(base: Path, split: str | None, pairing: str, file_format: str,
                   prefix: str = "") -> list[RawCase]:
    listings = {role: _list_role(base, folder_of(role), file_format, pairing == "grouped")
                for role in ROLES[pairing]}
    image_roles = [role for role in ROLES[pairing] if role.endswith("image")]
    keys = set(listings[image_roles[0]])
    labelled = any(listings[label_role(role)] for role in image_roles)
    suffix = ".h5" if file_format == "h5" else ""
    for role in image_roles + ([label_role(r) for r in image_roles] if labelled else []):
        missing = sorted(keys - set(listings[role]), key=str)
        stray = sorted(set(listings[role]) - keys, key=str)
        if missing or stray:
            group, case = (missing or stray)[0]
            lacking, holding = (role, image_roles[0]) if missing else (image_roles[0], role)
            raise DataError(f"{base / folder_of(lacking)}{suffix}: no file for case "
                            f"{f'{group}-{case}' if group else case} (found in "
                            f"{folder_of(holding)}{suffix})")
    return [RawCase(prefix + (f"{group}-{case}" if group else case), split,
                    prefix + group if group else None,
                    {role: listings[role][(group, case)] for role in ROLES[pairing]
                     if (group, case) in listings[role]})
            for group, case in sorted(keys, key=str)]


def _list_role(base: Path, folder: str, file_format: str, grouped: bool
               ) -> dict[tuple[str | None, str], VolumeRef]:
    if file_format == "h5":
        path = base / f"{folder}.h5"
        if not path.is_file():
            return {}
        return {_parse_h5_key(path, key, grouped): VolumeRef(path, key) for key in h5_keys(path)}
    directory = base / folder
    if not directory.is_dir():
        return {}
    if grouped:
        files = [(group.name, path) for group in sorted(directory.iterdir()) if group.is_dir()
                 for path in sorted(group.iterdir()) if is_nifti(path)]
    else:
        files = [(None, path) for path in sorted(directory.iterdir()) if is_nifti(path)]
    return {(group, nifti_stem(path)): VolumeRef(path) for group, path in files}


def _parse_h5_key(path: Path, key: str, grouped: bool) -> tuple[str | None, str]:
    if not grouped:
        return None, key
    group, separator, case = key.removeprefix("group-").rpartition("-")
    if not key.startswith("group-") or not separator or not group:
        raise DataError(f"{path}: key {key!r} is not of the form 'group-<group>-<case>'")
    return group, case


def _check_cases(cases: list[RawCase], source: Path) -> None:
    seen: dict[str, RawCase] = {}
    for case in cases:
        if case.case_id in seen:
            raise DataError(f"{source}: case id {case.case_id} appears twice")
        seen[case.case_id] = case
    labelled = {any("label" in role for role in case.volumes) for case in cases}
    if len(labelled) > 1:
        unlabelled = next(c for c in cases if not any("label" in r for r in c.volumes))
        raise DataError(f"{source}: case {unlabelled.case_id} has no label but others do")
