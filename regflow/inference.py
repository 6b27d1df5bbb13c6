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

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from regflow import shipping, spatial
from regflow.config import Config, EvaluateConfig, LossConfig, PreprocessConfig
from regflow.data.io import read_volume
from regflow.data.manifest import PreprocessingRecord, PreprocessSettings
from regflow.data.preprocess import process_image
from regflow.errors import NothingToRegister, RegflowError
from regflow.models import RegistrationModel, select_device
from regflow.refine import RefineSettings, SimilarityLoss, affine_register, refine_ddf

INITIALISATIONS = ("centre", "header")
NO_MODEL = "none"


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


def warp_label(label: np.ndarray, ddf: torch.Tensor, ndim: int) -> np.ndarray:
    """Warp a raw label by a raw-grid DDF, keeping its kind.

    An integer map comes back with its own values: each value is warped as a mask (linearly) and
    every voxel takes the value whose mask is largest there, or 0 where none reaches 0.5. Soft or
    multi-channel labels (``(*S, C)``, one-hot included) are warped linearly, channel by channel,
    binary channels thresholded at 0.5.

    Args:
        label: (*S_moving) map or (*S_moving, C) channels, any dtype.
        ddf: (1, ndim, *S_fixed) DDF into the label's grid.
        ndim: spatial dimensions.

    Returns:
        The warped label on the fixed grid, in the input's dtype.
    """
    channels_last = label.ndim == ndim + 1
    values = np.unique(label)
    integer_map = not channels_last and np.array_equal(values, np.round(values))
    if integer_map:
        foreground = values[values != 0]
        masks = np.stack([label == value for value in foreground]) if len(foreground) else \
            np.zeros((0, *label.shape), bool)
    else:
        masks = np.moveaxis(label, -1, 0) if channels_last else label[None]
    source = torch.from_numpy(masks.astype(np.float32))[None]
    warped = spatial.warp(source, ddf.float())[0].numpy() if len(masks) else \
        np.zeros((0, *ddf.shape[2:]), np.float32)
    if integer_map:
        result = np.zeros(ddf.shape[2:], dtype=label.dtype)
        if len(foreground):
            best = warped.argmax(axis=0)
            chosen = np.take_along_axis(warped, best[None], axis=0)[0] >= 0.5
            result[chosen] = foreground[best[chosen]]
        return result
    binary = np.isin(values, (0, 1)).all()
    warped = (warped >= 0.5) if binary else warped
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
                 loss_config: LossConfig, refine: RefineSettings,
                 device: torch.device | None = None) -> None:
        if model is None and refine.steps + refine.affine_steps <= 0:
            raise RegflowError("--model none registers by optimisation alone: give "
                               "--refine-steps N (N > 0)")
        self.device = device or select_device("auto")
        self.model = model.to(self.device).eval() if model is not None else None
        self.record = record
        self.refine = refine
        self.similarity = (
            SimilarityLoss(loss_config, refine.regularization_multiplier(loss_config))
            if refine.steps + refine.affine_steps > 0 else None)

    @property
    def ndim(self) -> int:
        """Spatial dimensions of the model's frame."""
        return self.record.ndim

    def register_tensors(self, moving: torch.Tensor, fixed: torch.Tensor,
                         moving_label: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Register a batch in the model's frame: network, then refinement.

        Args:
            moving: (B, 1, *S) moving images.
            fixed: (B, 1, *S) fixed images.
            moving_label: optional (B, L, *S) labels of the moving images (warped linearly).

        Returns:
            On the CPU: "ddf" (B, ndim, *S) voxels, "warped" (B, 1, *S), "warped_label" when a
            label is given, "network_ddf" (the field before refinement), the network's "theta"
            (B, ndim, ndim + 1) of method affine or "dvf" (B, ndim, *S) of method dvf, and
            "time_s" (a 0-d tensor: seconds per pair, network and refinement).
        """
        moving, fixed = moving.to(self.device), fixed.to(self.device)
        if self.conditional:
            return self._predict_labels(moving, fixed, moving_label)
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
            if self.refine.affine_steps > 0:
                network_ddf = affine_register(fixed, moving, self.similarity, self.refine)
        ddf = network_ddf
        if self.refine.steps > 0:
            with torch.enable_grad():
                ddf = refine_ddf(fixed, moving, network_ddf, self.similarity, self.refine)
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

    def _preprocess_params(self) -> PreprocessConfig:
        """The record's preprocessing, resampling to the model's voxel size when it has one
        (a model trained on resized images resizes instead)."""
        settings = self.record.preprocessing
        fields = {key: getattr(settings, key) for key in PreprocessConfig.model_fields}
        fields["spacing"] = None if settings.resize else self.record.spacing
        return PreprocessConfig.model_validate(fields)

    def register_volumes(self, fixed: Volume, moving: Volume, moving_label: Volume | None = None,
                         init: str = "centre") -> dict[str, Any]:
        """Register one raw pair; every output on the raw fixed image's grid.

        Args:
            fixed: the fixed image, any orientation, voxel size and shape.
            moving: the moving image, likewise (its own grid).
            moving_label: optional label on the moving image's grid: an integer map (values kept)
                or (*S, C) channels (one-hot or soft).
            init: initial alignment of moving to fixed, "centre" or "header" (module docstring).

        Returns:
            "ddf" (ndim, *S_fixed) float32 voxels (module docstring), "warped" (*S_fixed) float32
            moving intensities, "warped_label" when a label is given, "time_s" the seconds spent
            in the network and refinement.

        Raises:
            RegflowError: unknown ``init``, wrong dimensionality, a label whose grid differs from
                its image; NothingToRegister: a constant image.
        """
        if self.conditional:
            raise RegflowError("a conditional model predicts labels, not a DDF; use "
                               "`regflow evaluate` for it")
        if init not in INITIALISATIONS:
            raise RegflowError(f"init: expected one of {', '.join(INITIALISATIONS)}, got {init!r}")
        ndim = self.ndim
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
        outputs = self.register_tensors(moving_image, fixed_frame.image)
        ddf = self.to_raw_grid(outputs["ddf"], fixed, moving, fixed_frame, moving_frame, start)
        moving_array = torch.from_numpy(
            np.asarray(moving.spatial_array(ndim), dtype=np.float32))[None, None]
        result: dict[str, Any] = {
            "ddf": ddf[0].numpy().astype(np.float32),
            "warped": spatial.warp(moving_array, ddf.float())[0, 0].numpy(),
            "time_s": float(outputs["time_s"]),
        }
        if moving_label is not None:
            result["warped_label"] = warp_label(moving_label.array, ddf, ndim)
        return result

    def to_raw_grid(self, ddf: torch.Tensor, fixed: Volume, moving: Volume,
                    fixed_frame: ModelFrame, moving_frame: ModelFrame, start: np.ndarray
                    ) -> torch.Tensor:
        """Carry a model-frame DDF onto the raw grids (module docstring's meaning).

        Args:
            ddf: (1, ndim, *shape) DDF on the fixed model grid, into the initialised moving.
            fixed, moving: the raw volumes (their affines and fixed shape).
            fixed_frame, moving_frame: their model frames (affines).
            start: (4, 4) fixed-model voxel -> moving-model voxel initial map.

        Returns:
            (1, ndim, *S_fixed) float64 DDF from raw fixed voxels to raw moving voxels.
        """
        ndim = self.ndim
        raw_shape = tuple(fixed.array.shape[:ndim])
        raw_to_model = np.linalg.inv(fixed_frame.affine) @ fixed.affine
        to_model = _homogeneous_ddf(raw_to_model, raw_shape)  # x -> p = x + to_model[x]
        model_ddf = spatial.warp(ddf.double(), to_model, padding="border")  # ddf at p
        voxels = spatial.identity_grid(raw_shape, dtype=torch.float64)[None]
        displaced = voxels + to_model + model_ddf  # q = p + ddf(p), fixed-model voxels
        to_moving = np.linalg.inv(moving.affine) @ moving_frame.affine @ start
        linear = torch.from_numpy(to_moving[:ndim, :ndim])
        shift = torch.from_numpy(to_moving[:ndim, 3]).reshape(1, ndim, *[1] * ndim)
        return torch.einsum("ij,bj...->bi...", linear, displaced) + shift - voxels


def refine_settings(evaluate: EvaluateConfig | None, steps: int | None = None
                    ) -> RefineSettings:
    """``evaluate.refine``, with ``steps`` (``--refine-steps``) overriding."""
    section = evaluate.refine if evaluate is not None else None
    settings = RefineSettings(**section.model_dump()) if section is not None else RefineSettings()
    if steps is not None:
        settings = RefineSettings(**{**settings.__dict__, "steps": steps})
    return settings


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
            settings = RefineSettings(**{**settings.__dict__, "affine_steps": settings.steps})
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


def checkpoint_path(spec: str) -> Path:
    """A local checkpoint file for a path or an MLflow model URI (downloaded).

    Raises:
        RegflowError: unknown model/alias, an unreachable store, or no checkpoint inside.
    """
    if "://" not in spec and not spec.startswith(("models:/", "runs:/")):
        return Path(spec)
    import mlflow

    from regflow import tracking

    mlflow.set_tracking_uri(tracking.tracking_uri())
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=spec))
    except Exception as exc:  # MLflow raises several kinds for unknown names and aliases
        raise RegflowError(f"{spec}: cannot load the model ({exc.__class__.__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    checkpoints = sorted(local.rglob("*.pt")) if local.is_dir() else [local]
    if not checkpoints:
        raise RegflowError(f"{spec}: no regflow checkpoint inside the model")
    return checkpoints[0]
