"""The processed dataset's manifest and the preprocessing record a checkpoint carries: typed,
versioned, written by :mod:`regflow.data.preprocess` and read by everything else through
:meth:`Manifest.read` and :meth:`PreprocessingRecord.from_checkpoint`.

Version history: 1 (no ``version`` key; regflow 0.1), 2 (``version``; typed cases). A manifest of
another version is refused with a message naming the field; rerun ``regflow preprocess``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from regflow.config import PreprocessConfig
from regflow.errors import DataError, RegflowError

MANIFEST_VERSION = 2
Pairing = Literal["paired", "unpaired", "grouped"]
LabelFormat = Literal["integer", "channels", "soft"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SourceSpacing(_Strict):
    """Smallest and largest voxel size (mm) per axis over the raw images."""

    min: list[float]
    max: list[float]


class PreprocessSettings(PreprocessConfig):
    """``preprocess`` of params.yaml as it ran, plus the split seed and the raw voxel sizes."""

    seed: int
    source_spacing: SourceSpacing | None = None


class Case(_Strict):
    """One processed case: its split and the relative paths (and SHA-256) of its volumes.

    Unpaired and grouped cases use ``image``/``label``; paired cases ``fixed_*``/``moving_*``.
    """

    case_id: str
    split: Literal["train", "val", "test"] | None = None
    fold: int | None = None
    group: str | None = None
    image: str | None = None
    label: str | None = None
    fixed_image: str | None = None
    fixed_label: str | None = None
    moving_image: str | None = None
    moving_label: str | None = None
    image_sha256: str | None = None
    label_sha256: str | None = None
    fixed_image_sha256: str | None = None
    fixed_label_sha256: str | None = None
    moving_image_sha256: str | None = None
    moving_label_sha256: str | None = None

    def files(self, side: str, paired: bool) -> tuple[str, str | None]:
        """(image, label) relative paths of the ``fixed`` or ``moving`` side of this case.

        Raises:
            DataError: the case has no image for that side.
        """
        image, label = ((getattr(self, f"{side}_image"), getattr(self, f"{side}_label"))
                        if paired else (self.image, self.label))
        if image is None:
            raise DataError(f"case {self.case_id!r}: no {side} image in the manifest")
        return image, label


class PreprocessingRecord(_Strict):
    """What inference needs to prepare raw inputs as training saw them (saved in checkpoints).

    ``spacing`` is the model's voxel size in mm: the target spacing, or the raw spacing that
    preprocessing kept when every raw image shared it; None only when raw spacings differed and
    were kept as they were.
    """

    dataset: str
    shape: list[int]
    spacing: list[float] | None
    label_format: LabelFormat | None = None
    label_values: list[int] | None = None
    label_names: list[str] | None = None
    preprocessing: PreprocessSettings
    simulated: bool = False

    @property
    def ndim(self) -> int:
        """Spatial dimensions of the model's inputs."""
        return len(self.shape)

    @property
    def voxel_size(self) -> list[float]:
        """``spacing``, or 1 mm per axis where preprocessing recorded none."""
        return list(self.spacing) if self.spacing else [1.0] * self.ndim

    @classmethod
    def from_checkpoint(cls, extra: dict[str, Any], source: str) -> PreprocessingRecord:
        """The record stored in a checkpoint's ``extra["preprocessing"]``.

        Raises:
            RegflowError: no record, or one with a missing/unknown/bad field (named).
        """
        record = extra.get("preprocessing")
        if not isinstance(record, dict):
            raise RegflowError(f"{source}: checkpoint has no preprocessing record")
        try:
            return cls.model_validate(record)
        except ValidationError as exc:
            raise RegflowError(f"{source}: preprocessing record {_describe(exc)}") from None


class Manifest(_Strict):
    """``data/processed/<dataset>/manifest.json``."""

    version: int = MANIFEST_VERSION
    dataset: str
    pairing: Pairing
    shape: list[int] = Field(min_length=2, max_length=3)
    spacing: list[float] | None
    simulated: bool = False
    label_format: LabelFormat | None = None
    label_values: list[int] | None = None
    label_names: list[str] | None = None
    preprocessing: PreprocessSettings
    cases: list[Case] = Field(min_length=1)

    @property
    def paired(self) -> bool:
        """Whether cases hold a fixed and a moving image."""
        return self.pairing == "paired"

    @property
    def voxel_size(self) -> list[float]:
        """``spacing``, or 1 mm per axis where none is common to the dataset."""
        return list(self.spacing) if self.spacing else [1.0] * len(self.shape)

    @property
    def channel_names(self) -> list[str]:
        """Names of the label channels (``label_<value>`` where the manifest has none)."""
        if self.label_names:
            return list(self.label_names)
        return [f"label_{value}" for value in self.label_values or []]

    def split_cases(self, split: str, fold: int | None = None) -> dict[str, Case]:
        """The cases of one split, by id.

        With ``fold`` k (cross-validation, ``loader.fold``), "train" and "val" are redrawn from
        the train and val cases together: "val" is fold k, "train" every other fold; "test"
        stays as it is.

        Raises:
            DataError: ``fold`` is given but the manifest has no folds
                (``preprocess.folds``), or fewer than ``fold + 1``.
        """
        if fold is None or split == "test":
            return {case.case_id: case for case in self.cases if case.split == split}
        pool = [case for case in self.cases if case.split in ("train", "val")]
        folds = {case.fold for case in pool}
        if None in folds:
            raise DataError(f"{self.dataset}: loader.fold {fold} but the manifest has no folds; "
                            "preprocess with preprocess.folds > 1")
        if fold >= len(folds):
            raise DataError(f"{self.dataset}: loader.fold {fold} but the manifest has "
                            f"{len(folds)} folds (0 to {len(folds) - 1})")
        return {case.case_id: case for case in pool if (case.fold == fold) == (split == "val")}

    def record(self) -> PreprocessingRecord:
        """The preprocessing record that checkpoints carry."""
        return PreprocessingRecord(
            dataset=self.dataset, shape=self.shape, spacing=self.spacing,
            label_format=self.label_format, label_values=self.label_values,
            label_names=self.label_names, preprocessing=self.preprocessing,
            simulated=self.simulated)

    def write(self, path: Path) -> None:
        """Write as indented JSON (callers write into a staging folder renamed whole)."""
        path.write_text(json.dumps(self.model_dump(mode="json"), indent=1) + "\n")

    @classmethod
    def read(cls, path: str | Path) -> Manifest:
        """Read and validate a manifest.

        Raises:
            DataError: missing or unreadable file, another version, or a bad field (named).
        """
        path = Path(path)
        try:
            tree = json.loads(path.read_text())
        except FileNotFoundError:
            raise DataError(f"{path}: no manifest; run `regflow preprocess` first") from None
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(f"{path}: unreadable manifest ({exc.__class__.__name__})") from None
        if not isinstance(tree, dict):
            raise DataError(f"{path}: a manifest is a JSON object")
        version = tree.get("version", 1)
        if version != MANIFEST_VERSION:
            raise DataError(f"{path}: version: manifest version {version}, this regflow reads "
                            f"{MANIFEST_VERSION}; rerun `regflow preprocess`")
        try:
            manifest = cls.model_validate(tree)
        except ValidationError as exc:
            raise DataError(f"{path}: {_describe(exc)}") from None
        if manifest.label_format == "integer" and not manifest.label_values:
            raise DataError(f"{path}: label_values: label_format integer needs label_values")
        return manifest


def _describe(exc: ValidationError) -> str:
    """The first validation error as ``field.path: problem``."""
    error = exc.errors()[0]
    location = ".".join(str(part) for part in error["loc"]) or "(top level)"
    problem = "unknown field" if error["type"] == "extra_forbidden" else error["msg"]
    return f"{location}: {problem}"
