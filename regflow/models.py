"""RegistrationModel: a backbone plus the head of one registration method, with self-describing
checkpoints (constructor config + weights + regflow version)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from regflow import __version__, spatial
from regflow.errors import ConfigError, RegflowError
from regflow.fileio import atomic_path
from regflow.networks import build_backbone
from regflow.networks.conditioning import Conditioner
from regflow.networks.layers import DEFAULT_NORM

if TYPE_CHECKING:
    from regflow.config import ModelConfig

METHODS = ("ddf", "dvf", "affine", "conditional")
CASCADE_METHODS = ("ddf", "dvf")
CHECKPOINT_KEYS = ("config", "state_dict", "regflow_version", "extra")


def select_device(preference: str = "auto") -> torch.device:
    """The device to run on (``train.device``).

    Args:
        preference: "auto" (CUDA when available, else CPU), "cpu" or "cuda".

    Returns:
        The torch device.

    Raises:
        ConfigError: "cuda" without a CUDA device, or an unknown preference.
    """
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if preference == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: cuda requested but no CUDA device is available")
    if preference not in ("cpu", "cuda"):
        raise ConfigError(f"train.device: expected auto, cpu or cuda, got {preference!r}")
    return torch.device(preference)


class RegistrationModel(nn.Module):
    """Backbone + method head: predicts how to move ``moving`` onto ``fixed``.

    Methods (all fields in voxels, ``warped[x] = moving[x + ddf[x]]``):

    - "ddf": the backbone's output is the DDF.
    - "dvf": the output is a stationary velocity field, integrated by scaling and squaring
      (:func:`regflow.spatial.integrate_dvf`, ``integration_steps`` squarings) into the DDF, on a
      grid ``integration_downsize`` times coarser than the image's (1: the image's own).
    - "affine": GlobalNet predicts theta (B, ndim, ndim + 1) about the volume centre, turned into
      a DDF by :func:`regflow.spatial.affine_to_ddf`; needs backbone "global".
    - "conditional": the input also holds the moving label; the backbone predicts
      ``label_channels`` logits whose sigmoid is the label in fixed space (no DDF).

    With ``passes`` > 1 ("ddf" and "dvf"), the same backbone is applied again to the moving image
    warped by the field so far, and each new field is composed with it (a recursive cascade with
    shared weights, trained end to end through every pass).

    With ``hyper`` (HyperMorph's amortised loss weight), the backbone's normalisation layers are
    modulated by the weight of one loss term (:mod:`regflow.networks.conditioning`): trained over
    a range of weights, the model answers for any weight in it. ``hyper["weight"]`` is the weight
    used when a call gives none (see :meth:`set_hyper_weight`).

    With ``control_points`` ("ddf" and "dvf", DeepReg's option) the backbone's field is reduced to
    a cubic B-spline control grid of that spacing and interpolated back
    (:func:`regflow.spatial.bspline_field`): a smooth field of few degrees of freedom.

    Args:
        method: one of :data:`METHODS`.
        backbone: "local", "unet" or "global" (the latter only, and always, for "affine").
        channels: features per backbone level, e.g. ``(16, 32, 64)``.
        norm: backbone feature normalisation: "instance", "batch" or "none".
        ndim: 2 or 3 spatial dimensions.
        integration_steps: squarings for "dvf".
        integration_downsize: "dvf": integrate on a grid this many times coarser.
        label_channels: label channels of the "conditional" input and output.
        extract_levels: LocalNet's levels whose fields are summed (None: all).
        passes: backbone passes whose fields are composed (1: a single field).
        hyper: None, or ``{"term": "group.name", "low": float, "high": float, "weight": float}``:
            the loss term whose weight conditions the network, its range and the default weight.
        pooling: backbone down-sampling by max pooling (True) or strided convolutions (False).
        concat_skip: "unet": concatenate (True) or add (False) the encoder skips.
        control_points: "ddf"/"dvf": B-spline control point spacing in voxels (one per axis, or
            one for all), or None for a dense field.

    Raises:
        ConfigError: unknown method, a method/backbone combination that cannot work,
            ``passes`` > 1 or ``control_points`` for a method other than "ddf" or "dvf", or a
            bad ``hyper`` range.
    """

    def __init__(self, method: str = "ddf", backbone: str = "local",
                 channels: Sequence[int] = (16, 32, 64), ndim: int = 3,
                 integration_steps: int = 7, label_channels: int = 1,
                 norm: str = DEFAULT_NORM, extract_levels: Sequence[int] | None = None,
                 integration_downsize: int = 1, passes: int = 1,
                 hyper: dict[str, Any] | None = None, pooling: bool = True,
                 concat_skip: bool = True, control_points: int | Sequence[int] | None = None
                 ) -> None:
        super().__init__()
        if method not in METHODS:
            raise ConfigError(f"train.model.method: unknown method {method!r}; "
                              f"known: {', '.join(METHODS)}")
        if (method == "affine") != (backbone == "global"):
            raise ConfigError(f"train.model: method {method!r} cannot use backbone {backbone!r} "
                              "(method affine goes with backbone global, and only it)")
        self.method = method
        self.passes = 1
        self.set_passes(passes)
        self.backbone_name = backbone
        self.channels = [int(width) for width in channels]
        self.ndim = ndim
        self.integration_steps = integration_steps
        self.integration_downsize = integration_downsize
        self.label_channels = label_channels
        self.norm = norm
        self.extract_levels = None if extract_levels is None else [int(k) for k in extract_levels]
        self.pooling = pooling
        self.concat_skip = concat_skip
        if control_points is not None and method not in CASCADE_METHODS:
            raise ConfigError(f"train.model.control_points: a B-spline grid shapes a ddf or dvf, "
                              f"not method {method!r}")
        self.control_points = (None if control_points is None else
                               [int(control_points)] * ndim if isinstance(control_points, int)
                               else [int(spacing) for spacing in control_points])
        if self.control_points is not None and len(self.control_points) != ndim:
            raise ConfigError(f"train.model.control_points: one spacing or {ndim}, got "
                              f"{self.control_points}")
        conditional = method == "conditional"
        self.backbone = build_backbone(
            backbone, ndim,
            in_channels=2 + label_channels if conditional else 2,
            out_channels=label_channels if conditional else ndim,
            channels=self.channels,
            norm=norm,
            extract_levels=self.extract_levels,
            pooling=pooling,
            concat_skip=concat_skip,
        )
        self.hyper: dict[str, Any] | None = None
        if hyper is not None:
            if not 0 < hyper["low"] < hyper["high"]:
                raise ConfigError(f"train.model.hyper: need 0 < low < high, got {hyper['low']} "
                                  f"and {hyper['high']}")
            self.hyper = {"term": hyper["term"], "low": float(hyper["low"]),
                          "high": float(hyper["high"]), "weight": float(hyper["low"])}
            default = hyper.get("weight") or math.sqrt(hyper["low"] * hyper["high"])
            self.set_hyper_weight(default, key="train.model.hyper")
            self.conditioner = Conditioner(self.backbone)

    @classmethod
    def from_config(cls, model_config: ModelConfig, ndim: int = 3,
                    label_channels: int = 1, hyper_weight: float | None = None
                    ) -> RegistrationModel:
        """Build from ``train.model`` of params.yaml.

        Args:
            model_config: method, backbone name/channels and integration steps.
            ndim: spatial dimensions of the data (len of the manifest's shape).
            label_channels: label channels (used by method "conditional").
            hyper_weight: with ``train.model.hyper``, the default weight (the term's weight in
                ``train.loss``).
        """
        hyper = None
        if model_config.hyper is not None:
            hyper = {**model_config.hyper.model_dump(), "weight": hyper_weight}
        return cls(method=model_config.method, backbone=model_config.backbone.name,
                   channels=model_config.backbone.channels, ndim=ndim,
                   integration_steps=model_config.integration_steps,
                   label_channels=label_channels, norm=model_config.backbone.norm,
                   extract_levels=model_config.backbone.extract_levels,
                   integration_downsize=model_config.integration_downsize,
                   passes=model_config.passes, hyper=hyper,
                   pooling=model_config.backbone.pooling,
                   concat_skip=model_config.backbone.concat_skip,
                   control_points=model_config.control_points)

    @property
    def config(self) -> dict[str, Any]:
        """The constructor arguments: ``RegistrationModel(**model.config)`` rebuilds the model."""
        return {"method": self.method, "backbone": self.backbone_name,
                "channels": list(self.channels), "ndim": self.ndim,
                "integration_steps": self.integration_steps,
                "label_channels": self.label_channels, "norm": self.norm,
                "extract_levels": self.extract_levels,
                "integration_downsize": self.integration_downsize, "passes": self.passes,
                "hyper": None if self.hyper is None else dict(self.hyper),
                "pooling": self.pooling, "concat_skip": self.concat_skip,
                "control_points": self.control_points}

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor,
                moving_label: torch.Tensor | None = None, *, warp: bool = True,
                hyper_weight: float | None = None) -> dict[str, torch.Tensor]:
        """Register ``moving`` to ``fixed``.

        Args:
            moving: (B, 1, *S) moving image.
            fixed: (B, 1, *S) fixed image.
            moving_label: (B, L, *S) binary labels in moving space; required for "conditional".
            warp: False leaves out "warped" and "warped_label", for callers that warp with a
                field of their own (inference refines the field first).
            hyper_weight: a ``hyper`` model's loss weight for this call (None: ``hyper["weight"]``;
                training passes the weight it draws).

        Returns:
            "ddf": (B, ndim, *S) voxels; "warped": (B, 1, *S); "warped_label": (B, L, *S),
            linearly warped (soft, for Dice training) when ``moving_label`` is given; "theta":
            (B, ndim, ndim + 1) for "affine"; "dvf": (B, ndim, *S) for "dvf" (the first pass's
            velocity when ``passes`` > 1; "ddf" is always the composed field). "conditional"
            returns only "warped_label" (sigmoid, in [0, 1]) and "logits".

        Raises:
            RegflowError: images of different shapes or dimensions, or "conditional" without a
                moving label of ``label_channels`` channels.
        """
        if moving.shape != fixed.shape or moving.dim() != self.ndim + 2:
            raise RegflowError(f"model: expected moving and fixed of one shape (B, 1, {self.ndim} "
                               f"sizes), got {tuple(moving.shape)} and {tuple(fixed.shape)}")
        if self.hyper is not None:
            weight = self.hyper["weight"] if hyper_weight is None else hyper_weight
            self.conditioner(torch.full((moving.shape[0], 1), self.hyper_position(weight),
                                        dtype=moving.dtype, device=moving.device))
        if self.method == "conditional":
            if moving_label is None or moving_label.shape[1] != self.label_channels:
                raise RegflowError(f"model: method conditional needs a moving label with "
                                   f"{self.label_channels} channel(s)")
            logits = self.backbone(torch.cat([moving, fixed, moving_label], dim=1))
            return {"warped_label": torch.sigmoid(logits), "logits": logits}

        outputs: dict[str, torch.Tensor] = {}
        ddf = self._pass_field(moving, fixed, outputs)
        for _ in range(self.passes - 1):
            step = self._pass_field(spatial.warp(moving, ddf), fixed, {})
            ddf = spatial.compose_ddfs(ddf, step)
        outputs["ddf"] = ddf
        if not warp:
            return outputs
        outputs["warped"] = spatial.warp(moving, ddf)
        if moving_label is not None:
            outputs["warped_label"] = spatial.warp(moving_label, ddf)
        return outputs

    def set_passes(self, passes: int, key: str = "train.model.passes") -> None:
        """Apply the backbone ``passes`` times from now on (the weights are shared by all passes).

        Args:
            passes: backbone passes whose fields are composed.
            key: the config key named in the error.

        Raises:
            ConfigError: fewer than 1 pass, or more than 1 for a method other than "ddf"/"dvf".
        """
        if passes < 1 or (passes > 1 and self.method not in CASCADE_METHODS):
            raise ConfigError(f"{key}: {passes} passes need a method of "
                              f"{', '.join(CASCADE_METHODS)} and at least 1 pass "
                              f"(method {self.method!r})")
        self.passes = passes

    def set_hyper_weight(self, weight: float, key: str = "evaluate.hyper_weight") -> None:
        """Use this loss weight from now on when a call gives none (a ``hyper`` model only).

        Raises:
            ConfigError: the model is not conditioned, or the weight is outside its range.
        """
        if self.hyper is None:
            raise ConfigError(f"{key}: the model is not conditioned on a loss weight "
                              "(train.model.hyper)")
        low, high = self.hyper["low"], self.hyper["high"]
        if not low <= weight <= high:
            raise ConfigError(f"{key}: {weight} is outside the range the model was trained on, "
                              f"[{low}, {high}] for {self.hyper['term']}")
        self.hyper["weight"] = float(weight)

    def hyper_position(self, weight: float) -> float:
        """Where ``weight`` lies in the ``hyper`` range on a log scale: 0 at low, 1 at high."""
        low, high = self.hyper["low"], self.hyper["high"]
        return math.log(weight / low) / math.log(high / low)

    def _pass_field(self, moving: torch.Tensor, fixed: torch.Tensor,
                    outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """One backbone pass: its DDF, its "theta" or "dvf" stored in ``outputs``."""
        prediction = self.backbone(torch.cat([moving, fixed], dim=1))
        if self.method == "affine":
            outputs["theta"] = prediction
            return spatial.affine_to_ddf(prediction, moving.shape[2:])
        if self.control_points is not None:
            prediction = spatial.bspline_field(prediction, self.control_points)
        if self.method == "dvf":
            outputs["dvf"] = prediction
            return spatial.integrate_dvf(prediction, steps=self.integration_steps,
                                         downsize=self.integration_downsize)
        return prediction

    def save(self, path: str | Path, extra: dict[str, Any] | None = None,
             half: bool = False) -> None:
        """Write a self-describing checkpoint atomically (see :func:`regflow.fileio.atomic_path`).

        Args:
            path: the ``.pt`` file; missing folders are created.
            extra: anything ``torch.load(weights_only=True)`` can read back (plain containers,
                numbers, strings, tensors; e.g. optimiser state and step).
            half: store floating-point weights as float16 (half the size; :meth:`load` turns
                them back into the model's float32).
        """
        state = self.state_dict()
        if half:
            state = {key: value.half() if value.is_floating_point() else value
                     for key, value in state.items()}
        with atomic_path(path) as temporary:
            torch.save({"config": self.config, "state_dict": state,
                        "regflow_version": __version__, "extra": extra or {}}, temporary)

    @classmethod
    def load(cls, path: str | Path, map_location: str | torch.device = "cpu"
             ) -> tuple[RegistrationModel, dict[str, Any]]:
        """Read a checkpoint written by :meth:`save`.

        Args:
            path: the ``.pt`` file.
            map_location: device for the weights and the returned model.

        Returns:
            (model on ``map_location``, the ``extra`` dict given to :meth:`save`).

        Raises:
            RegflowError: the file is missing, unreadable, or not a regflow checkpoint.
        """
        path = Path(path)
        if not path.is_file():
            raise RegflowError(f"{path}: no such checkpoint file")
        try:
            checkpoint = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as exc:  # torch raises many types for a corrupt/foreign file
            raise RegflowError(f"{path}: not a readable checkpoint "
                               f"({exc.__class__.__name__})") from None
        if not isinstance(checkpoint, dict) or not all(key in checkpoint
                                                       for key in CHECKPOINT_KEYS):
            raise RegflowError(f"{path}: not a regflow checkpoint (expected keys "
                               f"{', '.join(CHECKPOINT_KEYS)})")
        try:
            model = cls(**checkpoint["config"])
            model.load_state_dict(checkpoint["state_dict"])
        except (TypeError, RuntimeError, RegflowError) as exc:
            reason = str(exc).splitlines()[0]
            raise RegflowError(f"{path}: weights do not match the stored model config "
                               f"({reason})") from None
        return model.to(map_location), checkpoint["extra"]
