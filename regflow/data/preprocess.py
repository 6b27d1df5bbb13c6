"""Raw dataset folder -> data/processed/<dataset>/: resample, crop/pad, normalise, split, manifest.

Raw layouts (msd, DeepReg paired/unpaired/grouped, NIfTI or DeepReg HDF5) are described and read
in :mod:`regflow.data.layouts`. Per volume, the transforms of :mod:`regflow.data.transforms`
(which serving applies to a request's images too): resample to ``preprocess.spacing`` (linear for
images, nearest for labels), normalise intensities, centre crop/pad to ``preprocess.shape``;
every step updates the affine so that world coordinates stay put. Labels are checked and encoded
here (:class:`LabelSpec`).

Splits: source splits are kept; a missing test or val split is carved out of train (seeded); a
layout without splits is split at random by case, or by group for grouped data so that a group
never crosses splits. See :mod:`regflow.data.splits`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from regflow.config import Config, PreprocessConfig
from regflow.data.integrity import sha256_file
from regflow.data.io import write_nifti
from regflow.data.layouts import ROLES, RawCase, VolumeRef, discover_cases, folder_of, label_role
from regflow.data.manifest import Case, Manifest, PreprocessSettings, SourceSpacing
from regflow.data.splits import assign_folds, assign_splits
from regflow.data.transforms import crop_or_pad, process_image, regrid, voxel_spacing
from regflow.errors import DataError
from regflow.fileio import atomic_directory, write_csv
from regflow.paths import MANIFEST_CSV, MANIFEST_JSON


@dataclass(frozen=True)
class LabelSpec:
    """How labels are stored after preprocessing.

    ``source`` is "integer" (3-D maps), "channels" (4-D channels-last binary) or "soft"
    (probabilities in [0, 1], 3-D or 4-D channels-last, kept as floats); ``values`` are the
    foreground values of integer maps in channel order; ``one_hot`` turns integer maps into
    channels on output.
    """

    source: str
    values: tuple[int, ...] | None
    names: tuple[str, ...]
    one_hot: bool = False

    @property
    def output_format(self) -> str:
        """``"soft"``, ``"channels"`` or ``"integer"``, as written in the manifest."""
        if self.source == "soft":
            return "soft"
        return "channels" if self.source == "channels" or self.one_hot else "integer"

    @property
    def channels_source(self) -> bool:
        """Whether raw labels are channels-last maps (a 3-D one is one channel): channels, soft."""
        return self.source in ("channels", "soft")


def encode_label(label: np.ndarray, spec: LabelSpec, where: str) -> np.ndarray:
    """Turn a raw label into its stored uint8 form.

    Args:
        label: (*S) integer map, or (*S, L) channels-last map (binarised at 0.5, or kept as
            float32 probabilities for soft labels).
        spec: the dataset's :class:`LabelSpec`.
        where: case (and role) named in errors.

    Returns:
        (*S) uint8 map, (*S, L) uint8 binary channels when the source has channels or
        ``spec.one_hot``, or (*S, L) float32 soft labels.

    Raises:
        DataError: non-integer values, values outside ``spec.values``, or soft labels outside
            [0, 1].
    """
    if spec.source == "soft":
        label = np.asarray(label, dtype=np.float32)
        if not np.isfinite(label).all() or label.min() < 0 or label.max() > 1:
            raise DataError(f"{where}: soft label values must lie in [0, 1], found "
                            f"[{np.nanmin(label):g}, {np.nanmax(label):g}]")
        return label
    if spec.source == "channels":
        return (label > 0.5).astype(np.uint8)
    rounded = np.rint(label)
    if not np.array_equal(rounded, label):
        raise DataError(f"{where}: label map holds non-integer values")
    unexpected = sorted(set(np.unique(rounded).astype(int).tolist()) - {0, *spec.values})
    if unexpected:
        raise DataError(f"{where}: label values {unexpected} not among {list(spec.values)}")
    if spec.one_hot:
        return np.stack([rounded == value for value in spec.values], axis=-1).astype(np.uint8)
    return rounded.astype(np.uint8)


def process_label(label: np.ndarray, affine: np.ndarray, params: PreprocessConfig,
                  spec: LabelSpec, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Encode (:func:`encode_label`), resample as the image (nearest; linear for soft labels),
    crop/pad with 0.

    Returns:
        ``(label, affine)``: uint8 (*shape) or (*shape, L) array (float32 for soft labels) and
        its (4, 4) affine.
    """
    label = encode_label(label, spec, where)
    label, affine = regrid(label, affine, params, order=1 if spec.source == "soft" else 0)
    return crop_or_pad(label, affine, params.shape, fill=0)


def preprocess_dataset(name: str, config: Config) -> Path:
    """Preprocess catalogue (or ``data.local``) dataset ``name`` from raw_dir into processed_dir.

    Returns:
        Path of the written ``manifest.json``.

    Raises:
        ConfigError: unknown dataset name.
        DataError: raw data missing (run ``regflow fetch``) or a bad file.
    """
    from regflow.data.catalogue import get_dataset

    entry = get_dataset(name, config)
    return preprocess_folder(
        Path(config.data.raw_dir) / name, Path(config.data.processed_dir) / name,
        layout=entry.layout, pairing=entry.pairing, file_format=entry.file_format,
        preprocess_config=config.preprocess, seed=config.seed, label_names=entry.label_names,
        simulated=entry.simulated, dataset_name=name, subdir=entry.subdir,
    )


def preprocess_folder(raw_root: str | Path, out_root: str | Path, *, layout: str, pairing: str,
                      file_format: str = "nifti", preprocess_config: PreprocessConfig,
                      seed: int, label_names: Sequence[str] | None = None,
                      simulated: bool = False, dataset_name: str | None = None,
                      subdir: str | None = None) -> Path:
    """Preprocess one raw dataset folder into ``out_root`` with ``manifest.json``/``.csv``.

    Everything is written into a temporary folder beside ``out_root`` and renamed into place at
    the end, replacing an older output; on any error nothing is left behind.

    Args:
        raw_root: the raw dataset folder (layouts in this module's docstring).
        out_root: the processed dataset folder to (re)create.
        layout: "msd" | "deepreg-paired" | "deepreg-unpaired" | "deepreg-grouped".
        pairing: "paired" | "unpaired" | "grouped".
        file_format: "nifti" | "h5".
        preprocess_config: shape, spacing, normalisation, split fractions, folds, one_hot.
        seed: seeds the split and fold assignment.
        label_names: names of the foreground labels in channel order (msd: default from
            dataset.json).
        simulated: recorded in the manifest (simulated data must never pass as clinical).
        dataset_name: recorded in the manifest; defaults to ``out_root``'s name.
        subdir: the msd folder inside ``raw_root`` holding dataset.json (found when omitted).

    Returns:
        Path of ``out_root/manifest.json``.

    Raises:
        DataError: missing/corrupt files, mismatched shapes or cases (one line naming them).
        ConfigError: more folds than train/val units.
    """
    raw_root, out_root = Path(raw_root), Path(out_root)
    params = preprocess_config
    if not raw_root.is_dir():
        raise DataError(f"{raw_root}: raw dataset folder not found (run `regflow fetch` first)")
    cases, msd_labels = discover_cases(raw_root, layout, pairing, file_format, subdir)
    spec = _label_spec(cases, pairing, params, msd_labels, label_names)
    splits, folds = _assign(cases, pairing, params, seed)

    with atomic_directory(out_root) as staging:  # replaces an earlier output whole on success
        rows, spacings = [], []
        for case in tqdm(cases, desc=f"preprocess {dataset_name or out_root.name}", unit="case"):
            row, case_spacings = _process_case(case, pairing, params, spec, staging)
            row.update(split=splits[case.case_id], fold=folds.get(case.case_id))
            rows.append(row)
            spacings.extend(case_spacings)
        manifest = _manifest(dataset_name or out_root.name, pairing, params, seed, simulated,
                             spec, spacings, rows)
        _write_manifest(staging, manifest)
    return out_root / MANIFEST_JSON


def _label_spec(cases: list[RawCase], pairing: str, params: PreprocessConfig,
                msd_labels: dict[int, str] | None, label_names: Sequence[str] | None
                ) -> LabelSpec | None:
    refs = [case.volumes[role] for case in cases for role in ROLES[pairing]
            if "label" in role and role in case.volumes]
    if not refs:
        return None
    ndim = len(params.shape)
    shapes = [squeezed_shape(ref.shape(), ndim) for ref in refs]
    if params.soft_labels:
        values = None
        count = max(shape[-1] if len(shape) > ndim else 1 for shape in shapes)
    elif msd_labels is None and any(len(shape) > ndim for shape in shapes):
        values = None
        count = max(shape[-1] if len(shape) > ndim else 1 for shape in shapes)
    else:
        if msd_labels:
            values = tuple(sorted(value for value in msd_labels if value != 0))
        elif label_names:
            values = tuple(range(1, len(label_names) + 1))
        else:
            values = _scan_label_values(refs)
        count = len(values)
    names = tuple(label_names or ([msd_labels[v] for v in values] if msd_labels else
                                  [f"label_{i + 1}" for i in range(count)]))
    if len(names) != count:
        raise DataError(f"{refs[0].path.parent}: {count} labels but {len(names)} label names "
                        f"{list(names)}")
    source = "soft" if params.soft_labels else "integer" if values is not None else "channels"
    return LabelSpec(source, values, names, one_hot=params.one_hot and source == "integer")


def _scan_label_values(refs: list[VolumeRef]) -> tuple[int, ...]:
    found: set[int] = set()
    for ref in refs:
        label, _ = ref.read()
        found.update(np.unique(np.rint(label)).astype(int).tolist())
    return tuple(sorted(found - {0}))


def _assign(cases: list[RawCase], pairing: str, params: PreprocessConfig, seed: int
            ) -> tuple[dict[str, str], dict[str, int]]:
    unit_of = {case.case_id: case.group if pairing == "grouped" else case.case_id
               for case in cases}
    source: dict[str, str] = {}
    for case in cases:
        unit = unit_of[case.case_id]
        if case.split is not None and source.setdefault(unit, case.split) != case.split:
            raise DataError(f"group {unit} appears in both {source[unit]} and {case.split}")
    rng = np.random.default_rng(seed)
    unit_split = assign_splits(sorted(set(unit_of.values())), source or None,
                               params.val_fraction, params.test_fraction, rng)
    unit_fold: dict[str, int] = {}
    if params.folds:
        unit_fold = assign_folds([u for u, s in unit_split.items() if s != "test"],
                                 params.folds, rng)
    splits = {case_id: unit_split[unit] for case_id, unit in unit_of.items()}
    folds = {case_id: unit_fold[unit] for case_id, unit in unit_of.items() if unit in unit_fold}
    return splits, folds


def _process_case(case: RawCase, pairing: str, params: PreprocessConfig,
                  spec: LabelSpec | None, staging: Path) -> tuple[dict[str, Any], list]:
    ndim = len(params.shape)
    row: dict[str, Any] = {"case_id": case.case_id, "split": None, "fold": None}
    if pairing != "paired":
        row["group"] = case.group
    paths: dict[str, str | None] = {role: None for role in ROLES[pairing]}
    spacings, label_counts = [], set()
    for image_role in (role for role in ROLES[pairing] if role.endswith("image")):
        where = case.case_id if pairing != "paired" else f"{case.case_id} ({image_role})"
        image, affine = case.volumes[image_role].read()
        image = _squeeze_to(image, ndim, where)
        spacings.append(voxel_spacing(affine, ndim))
        processed, new_affine = process_image(image, affine, params)
        paths[image_role] = _write(staging, image_role, case.case_id, processed, new_affine)
        if spec is None:
            continue
        label, label_affine = case.volumes[label_role(image_role)].read()
        label = _conform_label(label, image.shape, spec, where)
        label, label_affine = process_label(label, label_affine, params, spec, where)
        label_counts.add(label.shape[-1] if label.ndim > ndim else 1)
        if len(label_counts) > 1:
            raise DataError(f"{case.case_id}: fixed and moving labels hold different numbers "
                            f"of labels")
        paths[label_role(image_role)] = _write(staging, label_role(image_role), case.case_id,
                                               label, label_affine)
    row.update(paths)
    row.update({f"{role}_sha256": sha256_file(staging / path) if path else None
                for role, path in paths.items()})
    return row, spacings


def _conform_label(label: np.ndarray, image_shape: tuple[int, ...], spec: LabelSpec,
                   where: str) -> np.ndarray:
    """Check a raw label against its image; a lone-label map of a channels dataset -> 1 channel.

    DeepReg datasets may store a case holding one label as a 3-D map beside 4-D cases.
    """
    label = label.reshape(squeezed_shape(label.shape, len(image_shape)))
    if spec.channels_source and label.ndim == len(image_shape):
        label = label[..., None]
    channels = spec.channels_source and label.ndim == len(image_shape) + 1
    if label.shape[:len(image_shape)] != image_shape or (label.ndim != len(image_shape)
                                                         and not channels):
        raise DataError(f"{where}: image shape {list(image_shape)} and label shape "
                        f"{list(label.shape)} differ")
    return label


def squeezed_shape(shape: tuple[int, ...], ndim: int) -> tuple[int, ...]:
    """``shape`` without trailing axes of size 1 beyond the first ``ndim`` (NIfTI pads 2-D
    images and 3-D maps with them)."""
    while len(shape) > ndim and shape[-1] == 1:
        shape = shape[:-1]
    return tuple(shape)


def _squeeze_to(image: np.ndarray, ndim: int, where: str) -> np.ndarray:
    image = image.reshape(squeezed_shape(image.shape, ndim))
    if image.ndim != ndim:
        raise DataError(f"{where}: image has shape {list(image.shape)}, expected a {ndim}-D "
                        f"volume")
    return image


def _write(staging: Path, role: str, case_id: str, array: np.ndarray, affine: np.ndarray) -> str:
    relative = f"{folder_of(role)}/{case_id}.nii.gz"
    (staging / folder_of(role)).mkdir(parents=True, exist_ok=True)
    write_nifti(staging / relative, array, affine)
    return relative


def _manifest(name: str, pairing: str, params: PreprocessConfig, seed: int, simulated: bool,
              spec: LabelSpec | None, spacings: list[np.ndarray], rows: list[dict[str, Any]]
              ) -> Manifest:
    stacked = np.round(np.stack(spacings), 6)
    common = params.spacing or (stacked[0].tolist() if np.all(stacked == stacked[0])
                                and not params.resize else None)
    return Manifest(
        dataset=name,
        pairing=pairing,
        shape=list(params.shape),
        spacing=common,
        simulated=simulated,
        label_format=spec.output_format if spec else None,
        label_values=list(spec.values) if spec and spec.output_format == "integer" else None,
        label_names=list(spec.names) if spec else None,
        preprocessing=PreprocessSettings(
            **params.model_dump(), seed=seed,
            source_spacing=SourceSpacing(min=stacked.min(axis=0).tolist(),
                                         max=stacked.max(axis=0).tolist())),
        cases=[Case(**row) for row in rows],
    )


def _write_manifest(staging: Path, manifest: Manifest) -> None:
    manifest.write(staging / MANIFEST_JSON)
    rows = [case.model_dump(exclude_none=False) for case in manifest.cases]
    columns = [key for key in rows[0] if any(row[key] is not None for row in rows)]
    write_csv(staging / MANIFEST_CSV, [{key: "" if row[key] is None else row[key]
                                        for key in columns} for row in rows], columns)
