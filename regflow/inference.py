"""The one inference path: a model (a checkpoint, an MLflow model URI, or none) and a pair in,
a registration on the fixed image's grid out. ``regflow evaluate``, ``regflow predict`` and the
served model all go through :class:`Registrar`.

Two entry points share one core:

- :meth:`Registrar.register_tensors`: a batch already in the model's frame (processed data): the
  network's DDF, then test-time refinement (``evaluate.refine``), or classical registration
  without a model (affine, then non-rigid).
- :meth:`Registrar.register_volumes`: one raw pair in world space, of any orientation, voxel size
  and shape. Each image is brought to the model's frame as training data were (closest canonical
  orientation with nibabel, then preprocessing: resampling to the model's voxel size, intensity
  normalisation, centred crop/pad). The moving image is initialised on the fixed model grid by
  ``init``: "centre" (the two images' geometric centres coincide in world space, orientation and
  voxel size from the affines: ITK's geometry-centred initialiser, and exactly what training saw)
  or "header" (the affines alone: world coordinates taken as they are). The model's DDF is then
  carried back onto the raw fixed grid.

Meaning of a raw-grid DDF (``register_volumes``' "ddf"): ``(ndim, *S_fixed)`` in voxels, with
``fixed voxel x`` corresponding to ``moving voxel x + ddf[x]`` of the moving image's own grid, so
``regflow warp --image moving --ddf ddf`` (:func:`regflow.spatial.warp`, linear, zeros outside)
reproduces "warped". With both images on one grid this is DeepReg's DDF.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from regflow import shipping, spatial
from regflow.config import Config, EvaluateConfig, LossConfig, PreprocessConfig, RefineConfig
from regflow.data.io import read_volume
from regflow.data.manifest import PreprocessingRecord, PreprocessSettings
from regflow.data.transforms import process_image, resampled_shape
from regflow.errors import NothingToRegister, RegflowError
from regflow.geometry import check_geometry, min_size
from regflow.models import RegistrationModel, select_device
from regflow.refine import SimilarityLoss, affine_register, refine_ddf, regularization_multiplier

INITIALISATIONS = ("centre", "header")
NO_MODEL = "none"
RAW_SLAB_VOXELS = 2**16  # work on a raw grid is done in slabs of about this many voxels


@dataclass(frozen=True)
class Volume:
    """A volume as its owner stores it: array on its own grid and its voxel-to-world affine.

    Attributes:
        array: (*S) image or integer label map, or (*S, C) channels-last labels.
        affine: (4, 4) voxel-to-world matrix in mm.
        source: what to call it in errors (a path or a request field).
    """

    array: np.ndarray
    affine: np.ndarray
    source: str

    @classmethod
    def read(cls, path: str | Path) -> Volume:
        """Read a NIfTI file (DataError naming it when unreadable)."""
        array, affine = read_volume(Path(path))
        return cls(np.asarray(array), np.asarray(affine, dtype=np.float64), str(path))

    def spatial_array(self, ndim: int) -> np.ndarray:
        """The (*S) image, a trailing channel axis of 1 dropped.

        Raises:
            RegflowError: not an ``ndim``-D single-channel volume.
        """
        array = self.array
        while array.ndim > ndim and array.shape[-1] == 1:
            array = array[..., 0]
        if array.ndim != ndim:
            raise RegflowError(f"{self.source}: expected a {ndim}-D volume for this model, got "
                               f"shape {tuple(self.array.shape)}")
        return array


@dataclass(frozen=True)
class ModelFrame:
    """An image brought into the model's frame: (1, 1, *shape) tensor and its (4, 4) affine."""

    image: torch.Tensor
    affine: np.ndarray


def canonical(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorder and flip the axes of a 3-D volume to the closest RAS orientation (lossless).

    Args:
        array: (*S) or (*S, C) volume.
        affine: (4, 4) voxel-to-world matrix.

    Returns:
        ``(array, affine)`` describing the same world content with axes closest to R, A, S.
        2-D volumes are returned unchanged.
    """
    if array.ndim < 3:
        return array, affine
    image = nib.as_closest_canonical(nib.Nifti1Image(array, affine))
    return np.asanyarray(image.dataobj), image.affine


def _check_structure(array: np.ndarray, source: str) -> None:
    """NothingToRegister for a blank or constant image."""
    if not np.isfinite(array).all():
        raise RegflowError(f"{source}: image holds NaN or infinite values")
    if array.size == 0 or float(array.max()) == float(array.min()):
        raise NothingToRegister(f"{source}: nothing to register (the image is constant)")


def _homogeneous_ddf(matrix: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
    """(1, ndim, *shape) float64 DDF of a (4, 4) voxel map restricted to ``len(shape)`` axes."""
    ndim = len(shape)
    reduced = np.eye(ndim + 1)
    reduced[:ndim, :ndim] = matrix[:ndim, :ndim]
    reduced[:ndim, ndim] = matrix[:ndim, 3]
    return spatial.voxel_map_ddf(torch.from_numpy(reduced), shape)


def slabs(shape: Sequence[int]) -> Iterator[slice]:
    """Consecutive row ranges along axis 0 of a grid, each of about :data:`RAW_SLAB_VOXELS`."""
    rows = max(1, RAW_SLAB_VOXELS // max(1, math.prod(shape[1:])))
    for first in range(0, shape[0], rows):
        yield slice(first, min(first + rows, shape[0]))


def warp_raw(source: torch.Tensor, ddf: torch.Tensor) -> torch.Tensor:
    """:func:`regflow.spatial.warp` onto a raw grid, slab by slab, so that the sampling grid
    never exists whole.

    Args:
        source: (1, C, *S_moving) volume, any floating dtype.
        ddf: (1, ndim, *S_fixed) DDF into the source's grid (voxels).

    Returns:
        (1, C, *S_fixed) float32, linear, zeros outside.
    """
    shape = tuple(ddf.shape[2:])
    warped = torch.empty((1, source.shape[1], *shape), dtype=torch.float32)
    offset = torch.zeros((1, len(shape)) + (1,) * len(shape), dtype=ddf.dtype)
    for rows in slabs(shape):
        offset[0, 0] = rows.start  # the slab's first row is row 0 of the grid warp sees
        warped[:, :, rows] = spatial.warp(source, ddf[:, :, rows] + offset).float()
    return warped


def label_values(label: np.ndarray, ndim: int) -> np.ndarray | None:
    """The non-zero values of an integer label map (each warped as its own mask by
    :func:`warp_label`); None for a soft or multi-channel ``(*S, C)`` label."""
    if label.ndim == ndim + 1:
        return None
    values = np.unique(label)
    return values[values != 0] if np.array_equal(values, np.round(values)) else None


def warped_channels(label: np.ndarray, ndim: int) -> int:
    """How many channels :func:`warp_label` warps: one per non-zero value of an integer map,
    the channels of a ``(*S, C)`` label, 1 for a soft map."""
    values = label_values(label, ndim)
    if values is not None:
        return len(values)
    return label.shape[-1] if label.ndim == ndim + 1 else 1


def warp_label(label: np.ndarray, ddf: torch.Tensor, ndim: int) -> np.ndarray:
    """Warp a raw label by a raw-grid DDF, keeping its kind.

    An integer map comes back with its own values: each value is warped as a mask (linearly) and
    every voxel takes the value whose mask is largest there (the smallest value on a tie), or 0
    where none reaches 0.5; the masks are warped one at a time, so memory does not grow with the
    number of values. Soft or multi-channel labels (``(*S, C)``, one-hot included) are warped
    linearly, channel by channel, binary channels thresholded at 0.5.

    Args:
        label: (*S_moving) map or (*S_moving, C) channels, any dtype.
        ddf: (1, ndim, *S_fixed) DDF into the label's grid.
        ndim: spatial dimensions.

    Returns:
        The warped label on the fixed grid, in the input's dtype.
    """
    foreground = label_values(label, ndim)
    if foreground is not None:
        result = np.zeros(ddf.shape[2:], dtype=label.dtype)
        best = np.full(ddf.shape[2:], -1.0, dtype=np.float32)
        for value in foreground:
            mask = torch.from_numpy((label == value).astype(np.float32))[None, None]
            warped = warp_raw(mask, ddf)[0, 0].numpy()
            larger = warped > best
            best[larger], result[larger] = warped[larger], value
        result[best < 0.5] = 0
        return result
    channels_last = label.ndim == ndim + 1
    masks = np.moveaxis(label, -1, 0) if channels_last else label[None]
    warped = warp_raw(torch.from_numpy(masks.astype(np.float32))[None], ddf)[0].numpy()
    if np.isin(np.unique(label), (0, 1)).all():
        warped = warped >= 0.5
    warped = warped.astype(label.dtype)
    return np.moveaxis(warped, 0, -1) if channels_last else warped[0]


class Registrar:
    """A model (or none), its preprocessing record and refinement settings: registers pairs.

    Args:
        model: a DDF-producing RegistrationModel, or None for classical registration.
        record: the model's preprocessing record (shape, voxel size, normalisation).
        loss_config: the training loss; its image and regularisation terms drive refinement.
        refine: refinement settings (steps 0: the network's field as it is).
        device: where to compute (default: CUDA when available).

    Raises:
        RegflowError: a conditional model (it predicts labels, not a DDF), or no model and no
            refinement steps.
    """

    def __init__(self, model: RegistrationModel | None, record: PreprocessingRecord,
                 loss_config: LossConfig, refine: RefineConfig,
                 device: torch.device | None = None) -> None:
        if model is None and refine.steps + refine.affine_steps <= 0:
            raise RegflowError("--model none registers by optimisation alone: give "
                               "--refine-steps N (N > 0)")
        self.device = device or select_device("auto")
        self.model = model.to(self.device).eval() if model is not None else None
        self.record = record
        self.refine = refine
        self.loss_config = loss_config
        self._similarity: SimilarityLoss | None = None

    @property
    def similarity(self) -> SimilarityLoss:
        """The refinement loss (training image terms and regulariser), built on first use."""
        if self._similarity is None:
            self._similarity = SimilarityLoss(
                self.loss_config, regularization_multiplier(self.refine, self.loss_config))
        return self._similarity

    @property
    def ndim(self) -> int:
        """Spatial dimensions of the model's frame."""
        return self.record.ndim

    def register_tensors(self, moving: torch.Tensor, fixed: torch.Tensor,
                         moving_label: torch.Tensor | None = None,
                         refine_steps: int | None = None) -> dict[str, torch.Tensor]:
        """Register a batch in the model's frame: network, then refinement.

        Args:
            moving: (B, 1, *S) moving images.
            fixed: (B, 1, *S) fixed images.
            moving_label: optional (B, L, *S) labels of the moving images (warped linearly).
            refine_steps: refinement steps for this call (None: ``self.refine.steps``; 0: the
                network's field as it is).

        Returns:
            On the CPU: "ddf" (B, ndim, *S) voxels, "warped" (B, 1, *S), "warped_label" when a
            label is given, "network_ddf" (the field before refinement), the network's "theta"
            (B, ndim, ndim + 1) of method affine or "dvf" (B, ndim, *S) of method dvf, and
            "time_s" (a 0-d tensor: seconds per pair, network and refinement).
        """
        moving, fixed = moving.to(self.device), fixed.to(self.device)
        if self.conditional:
            return self._predict_labels(moving, fixed, moving_label)
        settings = (self.refine if refine_steps is None
                    else self.refine.model_copy(update={"steps": refine_steps}))
        self._synchronise()
        started = time.perf_counter()
        network: dict[str, torch.Tensor] = {}
        if self.model is not None:
            with torch.no_grad():
                network = self.model(moving, fixed, warp=False)
            network_ddf = network["ddf"].float()
        else:
            network_ddf = torch.zeros(fixed.shape[0], self.ndim, *fixed.shape[2:],
                                      device=self.device)
            if settings.affine_steps > 0:
                network_ddf = affine_register(fixed, moving, self.similarity, settings)
        ddf = network_ddf
        if settings.steps > 0:
            with torch.enable_grad():
                ddf = refine_ddf(fixed, moving, network_ddf, self.similarity, settings)
        self._synchronise()
        seconds = (time.perf_counter() - started) / fixed.shape[0]
        outputs = {"ddf": ddf, "network_ddf": network_ddf, "warped": spatial.warp(moving, ddf)}
        outputs.update({key: network[key] for key in ("theta", "dvf") if key in network})
        if moving_label is not None:
            outputs["warped_label"] = spatial.warp(moving_label.to(self.device).float(), ddf)
        result = {key: value.detach().float().cpu() for key, value in outputs.items()}
        result["time_s"] = torch.tensor(seconds)
        return result

    @property
    def conditional(self) -> bool:
        """Whether the model predicts the fixed label itself (method "conditional", no DDF)."""
        return self.model is not None and self.model.method == "conditional"

    @torch.no_grad()
    def _predict_labels(self, moving: torch.Tensor, fixed: torch.Tensor,
                        moving_label: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """A conditional model's "warped_label" (B, L, *S) and "time_s"."""
        if moving_label is None:
            raise RegflowError("a conditional model needs the moving label")
        self._synchronise()
        started = time.perf_counter()
        outputs = self.model(moving, fixed, moving_label.to(self.device).float())
        self._synchronise()
        seconds = (time.perf_counter() - started) / fixed.shape[0]
        return {"warped_label": outputs["warped_label"].float().cpu(),
                "time_s": torch.tensor(seconds)}

    def _synchronise(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def to_model_frame(self, volume: Volume) -> ModelFrame:
        """Canonical orientation, then the training preprocessing (voxel size, intensities,
        crop/pad) of one raw image.

        Raises:
            RegflowError: wrong dimensionality; NothingToRegister: a constant image.
        """
        array = np.asarray(volume.spatial_array(self.ndim), dtype=np.float32)
        _check_structure(array, volume.source)
        array, affine = canonical(array, volume.affine)
        processed, processed_affine = process_image(array, affine, self._preprocess_params())
        tensor = torch.from_numpy(np.ascontiguousarray(processed, dtype=np.float32))
        return ModelFrame(tensor[None, None], processed_affine)

    def frame_shape(self, spatial_shape: Sequence[int], affine: np.ndarray) -> tuple[int, ...]:
        """The shape a raw image of this shape and affine is resampled to on its way into the
        model's frame (:meth:`to_model_frame`), before the centred crop/pad: what the
        preprocessing allocates, found without any voxel data.

        Args:
            spatial_shape: (*S) of the raw image.
            affine: its (4, 4) voxel-to-world matrix (mm).
        """
        shape = tuple(int(size) for size in spatial_shape)
        params = self._preprocess_params()
        if params.resize:
            return tuple(params.shape)
        if len(shape) == 3:  # canonical(): the axes reordered closest to RAS
            order = np.argsort(nib.io_orientation(affine)[:, 0])
            affine = affine[:, [*order, 3]]
            shape = tuple(shape[axis] for axis in order)
        if params.spacing is None:
            return shape
        return resampled_shape(shape, affine, params.spacing)

    def _preprocess_params(self) -> PreprocessConfig:
        """The record's preprocessing, resampling to the model's voxel size when it has one
        (a model trained on resized images resizes instead)."""
        settings = self.record.preprocessing
        fields = {key: getattr(settings, key) for key in PreprocessConfig.model_fields}
        fields["spacing"] = None if settings.resize else self.record.spacing
        return PreprocessConfig.model_validate(fields)

    def register_volumes(self, fixed: Volume, moving: Volume, moving_label: Volume | None = None,
                         init: str = "centre", refine_steps: int | None = None,
                         smallest: int | None = None) -> dict[str, Any]:
        """Register one raw pair; every output on the raw fixed image's grid.

        Args:
            fixed: the fixed image, any orientation, voxel size and shape.
            moving: the moving image, likewise (its own grid).
            moving_label: optional label on the moving image's grid: an integer map (values kept)
                or (*S, C) channels (one-hot or soft).
            init: initial alignment of moving to fixed, "centre" or "header" (module docstring).
            refine_steps: refinement steps for this pair (None: the registrar's own).
            smallest: the smallest size along an axis accepted (None: ``REGFLOW_MIN_SIZE``,
                see :mod:`regflow.geometry`).

        Returns:
            "ddf" (ndim, *S_fixed) float32 voxels (module docstring), "warped" (*S_fixed) float32
            moving intensities, "warped_label" when a label is given, "time_s" the seconds spent
            in the network and refinement.

        Raises:
            RegflowError: unknown ``init``, wrong dimensionality, a label whose grid differs from
                its image; GeometryError: a singular, non-finite or zero-spacing affine or a
                volume too small (:func:`regflow.geometry.check_geometry`); NothingToRegister: a
                constant image.
        """
        if self.conditional:
            raise RegflowError("a conditional model predicts labels, not a DDF; use "
                               "`regflow evaluate` for it")
        if init not in INITIALISATIONS:
            raise RegflowError(f"init: expected one of {', '.join(INITIALISATIONS)}, got {init!r}")
        ndim = self.ndim
        smallest = min_size() if smallest is None else smallest
        for volume in (fixed, moving):
            check_geometry(volume.source, volume.spatial_array(ndim).shape, volume.affine,
                           smallest)
        if moving_label is not None and moving_label.array.shape[:ndim] != \
                moving.array.shape[:ndim]:
            raise RegflowError(f"{moving_label.source}: label grid {moving_label.array.shape} "
                               f"does not match its image {moving.source} {moving.array.shape}")
        fixed_frame, moving_frame = self.to_model_frame(fixed), self.to_model_frame(moving)
        shape = tuple(fixed_frame.image.shape[2:])
        # fixed-model voxel -> moving-model voxel before registration
        start = (np.eye(4) if init == "centre"
                 else np.linalg.inv(moving_frame.affine) @ fixed_frame.affine)
        moving_image = moving_frame.image
        if init != "centre":
            moving_image = spatial.warp(moving_image, _homogeneous_ddf(start, shape).float())
        outputs = self.register_tensors(moving_image, fixed_frame.image,
                                        refine_steps=refine_steps)
        ddf = self.to_raw_grid(outputs["ddf"], fixed, moving, fixed_frame, moving_frame, start)
        moving_array = torch.from_numpy(
            np.asarray(moving.spatial_array(ndim), dtype=np.float32))[None, None]
        result: dict[str, Any] = {
            "ddf": ddf[0].numpy(),
            "warped": warp_raw(moving_array, ddf)[0, 0].numpy(),
            "time_s": float(outputs["time_s"]),
        }
        if moving_label is not None:
            result["warped_label"] = warp_label(moving_label.array, ddf, ndim)
        return result

    def to_raw_grid(self, ddf: torch.Tensor, fixed: Volume, moving: Volume,
                    fixed_frame: ModelFrame, moving_frame: ModelFrame, start: np.ndarray
                    ) -> torch.Tensor:
        """Carry a model-frame DDF onto the raw grids (module docstring's meaning).

        Computed in float64, slab by slab (:func:`slabs`), so that beyond the result the memory
        stays bounded whatever the raw grid's size.

        Args:
            ddf: (1, ndim, *shape) DDF on the fixed model grid, into the initialised moving.
            fixed, moving: the raw volumes (their affines and fixed shape).
            fixed_frame, moving_frame: their model frames (affines).
            start: (4, 4) fixed-model voxel -> moving-model voxel initial map.

        Returns:
            (1, ndim, *S_fixed) float32 DDF from raw fixed voxels to raw moving voxels.
        """
        ndim = self.ndim
        raw_shape = tuple(fixed.array.shape[:ndim])
        raw_to_model = np.linalg.inv(fixed_frame.affine) @ fixed.affine
        to_moving = np.linalg.inv(moving.affine) @ moving_frame.affine @ start
        if raw_shape == tuple(ddf.shape[2:]) and _is_identity(raw_to_model) and \
                _is_identity(to_moving):  # raw grids already the model's (e.g. processed data)
            return ddf.float().clone()
        linear = torch.from_numpy(to_moving[:ndim, :ndim])
        shift = torch.from_numpy(to_moving[:ndim, 3]).reshape(1, ndim, *[1] * ndim)
        model_ddf = ddf.double()
        result = torch.empty((1, ndim, *raw_shape), dtype=torch.float32)
        for rows in slabs(raw_shape):
            slab_shape = (rows.stop - rows.start, *raw_shape[1:])
            first_row = np.eye(4)
            first_row[0, 3] = rows.start
            # local voxel x of the slab -> p = x + to_model[x], fixed-model voxels
            to_model = _homogeneous_ddf(raw_to_model @ first_row, slab_shape)
            local = spatial.identity_grid(slab_shape, dtype=torch.float64)[None]
            displaced = local + to_model + spatial.warp(model_ddf, to_model, padding="border")
            local[:, 0] += rows.start  # the slab's voxels as voxels of the whole raw grid
            moved = torch.einsum("ij,bj...->bi...", linear, displaced) + shift
            result[:, :, rows] = (moved - local).float()
        return result


def _is_identity(matrix: np.ndarray, tolerance: float = 1e-9) -> bool:
    """Whether a (4, 4) voxel map is the identity (to rounding: it comes from inverses)."""
    return bool(np.allclose(matrix, np.eye(4), rtol=0, atol=tolerance))


def refine_settings(evaluate: EvaluateConfig | None, steps: int | None = None
                    ) -> RefineConfig:
    """``evaluate.refine`` (defaults without a config), with ``steps`` (``--refine-steps``)
    overriding."""
    settings = evaluate.refine if evaluate is not None else RefineConfig()
    return settings if steps is None else settings.model_copy(update={"steps": steps})


def load_registrar(spec: str, config: Config | None = None, refine_steps: int | None = None,
                   device: torch.device | None = None, own_settings: bool = False) -> Registrar:
    """A Registrar from a checkpoint path, an MLflow model URI or "none".

    Args:
        spec: a ``.pt`` checkpoint, ``models:/NAME@ALIAS`` / ``runs:/...``, or "none" (classical
            registration in the frame of ``config.preprocess``, with ``config.train.loss``).
        config: params; supplies refinement settings, a cascade's test-time passes
            (``evaluate.passes``), a HyperMorph model's loss weight (``evaluate.hyper_weight``),
            the loss for checkpoints that carry none, and the frame for "none".
        refine_steps: overrides ``evaluate.refine.steps``.
        device: where to compute.
        own_settings: a shipped checkpoint's own test-time settings (:mod:`regflow.shipping`)
            instead of ``config.evaluate`` (``regflow predict`` without an explicit config).

    Raises:
        RegflowError: an unknown URI, a corrupt checkpoint or record, "none" without a config,
            ``evaluate.passes`` > 1 for a model that is not "ddf" or "dvf", or
            ``evaluate.hyper_weight`` for a model not conditioned on one or outside its range.
    """
    evaluate = config.evaluate if config is not None else None
    if spec == NO_MODEL:
        settings = refine_settings(evaluate, refine_steps)
        if config is None:
            raise RegflowError("--model none needs a config (params.yaml) for its frame and loss")
        if settings.steps > 0 and settings.affine_steps == 0:
            settings = settings.model_copy(update={"affine_steps": settings.steps})
        return Registrar(None, record_from_config(config), config.train.loss, settings, device)
    checkpoint = checkpoint_path(spec)
    model, extra = RegistrationModel.load(checkpoint, map_location="cpu")
    if own_settings and shipping.EVALUATE_KEY in extra:
        evaluate = EvaluateConfig.model_validate(extra[shipping.EVALUATE_KEY])
    settings = refine_settings(evaluate, refine_steps)
    if evaluate is not None and evaluate.passes is not None:
        model.set_passes(evaluate.passes, key="evaluate.passes")
    if evaluate is not None and evaluate.hyper_weight is not None:
        model.set_hyper_weight(evaluate.hyper_weight)
    record = PreprocessingRecord.from_checkpoint(extra, str(checkpoint))
    if "loss" in extra:
        loss_config = LossConfig.model_validate(extra["loss"])
    elif config is not None:
        loss_config = config.train.loss
    else:
        loss_config = LossConfig(image={"lncc": {"weight": 1.0}})
    if model.hyper is not None:  # refinement regularises as hard as the network was asked to
        loss_config = with_term_weight(loss_config, model.hyper["term"], model.hyper["weight"])
    return Registrar(model, record, loss_config, settings, device)


def with_term_weight(loss_config: LossConfig, term: str, weight: float) -> LossConfig:
    """A copy of ``loss_config`` whose term ``group.name`` has ``weight``."""
    group, _, name = term.partition(".")
    tree = loss_config.model_dump()
    tree[group][name]["weight"] = weight
    return LossConfig.model_validate(tree)


def record_from_config(config: Config) -> PreprocessingRecord:
    """The frame of classical registration: ``preprocess`` of the config (no dataset needed),
    at ``preprocess.spacing`` or, where that is null, 1 mm per axis."""
    settings = PreprocessSettings(**config.preprocess.model_dump(), seed=config.seed)
    shape = list(config.preprocess.shape)
    return PreprocessingRecord(dataset=config.data.dataset, shape=shape,
                               spacing=config.preprocess.spacing or [1.0] * len(shape),
                               preprocessing=settings)


def is_model_uri(spec: str) -> bool:
    """Whether ``spec`` names an MLflow model (``models:/``, ``runs:/`` or any ``scheme://``)
    rather than a local path."""
    return "://" in spec or spec.startswith(("models:/", "runs:/"))


def download_model(spec: str) -> Path:
    """A local copy of an MLflow model URI, from the project's tracking store.

    Raises:
        RegflowError: unknown model/alias or an unreachable store (named, credentials masked).
    """
    import mlflow

    from regflow import tracking

    mlflow.set_tracking_uri(tracking.tracking_uri())
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=spec))
    except Exception as exc:  # MLflow raises several kinds for unknown names and aliases
        raise RegflowError(f"{spec}: cannot load the model ({exc.__class__.__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''})") from None


def checkpoint_path(spec: str) -> Path:
    """A local checkpoint file for a path or an MLflow model URI (downloaded).

    Raises:
        RegflowError: unknown model/alias, an unreachable store, or no checkpoint inside.
    """
    if not is_model_uri(spec):
        return Path(spec)
    local = download_model(spec)
    checkpoints = sorted(local.rglob("*.pt")) if local.is_dir() else [local]
    if not checkpoints:
        raise RegflowError(f"{spec}: no regflow checkpoint inside the model")
    return checkpoints[0]
