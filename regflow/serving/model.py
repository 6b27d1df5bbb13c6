"""The MLflow pyfunc model that ``mlflow models serve`` runs: base64 volumes in, base64 out.

The built-in PyTorch flavour cannot take a fixed and a moving image, so regflow ships a custom
``PythonModel``: the checkpoint travels as an artifact, requests and responses follow
regflow.serving.codec, inputs of any size go through the checkpoint's preprocessing and the
outputs come back on the fixed image's grid (see regflow.inference.Registrar.register_volumes).

The contract is hardened for a server facing untrusted clients. Before anything is decoded, the
file headers are checked: geometry (:mod:`regflow.geometry`), and resource limits
(:mod:`regflow.serving.limits`, read from ``REGFLOW_*`` when the model loads) on the shapes as
stored and as they will be resampled to the model's voxel size; the request's memory is estimated
(:mod:`regflow.serving.footprint`) and reserved from the worker's budget, waiting its turn behind
other requests (:mod:`regflow.serving.budget`). Pairs are then decoded, registered and encoded one
at a time; a label map with too many values is refused once decoded, before it is warped. Errors
become 413 / 422 / 400 / 503 / 500 answers with short bodies that never quote the request
(:mod:`regflow.serving.scoring_errors`), and a request still running when the server's own timeout
(``MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT``, after which the client already got a 504) has passed
stops before its next pair.

A request may ask for ``refine_steps`` (0: the network's field alone) up to
``REGFLOW_MAX_REFINE_STEPS``; its answer then says, per pair, the steps applied and the seconds
spent (``refine_steps``, ``time_s``). A request without it is answered exactly as before.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.environment_variables import MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema

from regflow.config import load_config
from regflow.geometry import min_size
from regflow.inference import Volume, label_values, load_registrar
from regflow.serving.budget import MemoryBudget, tune_allocator
from regflow.serving.codec import (
    RESPONSE_FIELDS,
    EncodedPair,
    encode_result,
    encode_volume,
    join_results,
    read_request,
)
from regflow.serving.footprint import PairPlan, peak_growth, request_bytes
from regflow.serving.limits import COMPUTE_SHARE, ENV_VARS, Limits
from regflow.serving.scoring_errors import ServingError, serving_error

CHECKPOINT_ARTIFACT = "checkpoint"
CONFIG_ARTIFACT = "config"  # the params the model was trained and registered with (refinement)

_logger = logging.getLogger(__name__)


def signature() -> ModelSignature:
    """The model's signature: outputs only (base64 strings per field), no input schema.

    With an input schema MLflow would check requests before ``predict``: it drops unknown
    fields silently, turns a null ``moving_label`` into the string "None", and answers its own
    errors with a body that quotes the whole request. Without one, the request reaches
    :func:`regflow.serving.codec.read_request` as sent, which checks it all.
    """
    return ModelSignature(outputs=Schema([ColSpec("string", field) for field in RESPONSE_FIELDS]))


def input_example(shape: tuple[int, ...] = (8, 8, 8)) -> dict[str, list[str]]:
    """A tiny request (two random volumes as base64 .nii.gz), for the model's metadata."""
    rng = np.random.default_rng(0)
    volume = rng.random(shape, dtype=np.float32)
    return {"fixed": [encode_volume(volume, np.eye(4))],
            "moving": [encode_volume(np.roll(volume, 1, axis=0), np.eye(4))]}


def _volume(array: np.ndarray, affine: np.ndarray | None, source: str) -> Volume:
    return Volume(array, np.eye(4) if affine is None else affine, source)


def _label_volume(label: np.ndarray, affine: np.ndarray | None, source: str) -> Volume:
    """A decoded (C, *S) label as the inference path takes it: (*S) when C is 1, else (*S, C)."""
    array = label[0] if label.shape[0] == 1 else np.moveaxis(label, 0, -1)
    return _volume(array, affine, source)


class RegflowPythonModel(mlflow.pyfunc.PythonModel):
    """Registers each requested pair with the checkpoint logged as artifact ``checkpoint``."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        """Load the checkpoint and its preprocessing record once per server worker, read the
        limits, and measure what the network and refinement allocate on the model's grid."""
        tune_allocator()
        config_file = context.artifacts.get(CONFIG_ARTIFACT)
        config = load_config(config_file) if config_file else None
        self.registrar = load_registrar(context.artifacts[CHECKPOINT_ARTIFACT], config,
                                        device=torch.device("cpu"))
        self.limits = Limits.from_env()
        self.min_size = min_size()
        self.budget = MemoryBudget(int(COMPUTE_SHARE * self.limits.max_memory),
                                   self.limits.queue_timeout_s, ENV_VARS["max_memory"])
        self.timeout_s = (MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.get()
                          if MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.is_set() else None)
        self.model_bytes = {steps: self._measure_model(steps) for steps in (0, 1)}

    def _measure_model(self, refine_steps: int) -> int:
        """Bytes one registration on the model's grid allocates (random images; one refinement
        step costs what every step costs); 0 for a conditional model, which serves no pair."""
        if self.registrar.conditional:
            return 0
        shape = (1, 1, *self.registrar.record.shape)
        generator = torch.Generator().manual_seed(0)
        moving, fixed = torch.rand(shape, generator=generator), torch.rand(shape,
                                                                          generator=generator)
        return peak_growth(lambda: self.registrar.register_tensors(moving, fixed,
                                                                   refine_steps=refine_steps))

    def predict(self, context: mlflow.pyfunc.PythonModelContext, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> dict[str, list[Any]]:
        """Check the whole request, reserve its memory, then decode, register and encode one pair
        at a time.

        ``model_input`` is what MLflow passes without an input schema: a dict of numpy arrays for
        ``{"inputs": ...}``, a DataFrame for the ``dataframe_*`` formats (see
        :func:`regflow.serving.codec.read_request`). The DataFrame hint is one MLflow infers no
        schema from (it does not convert to it); it keeps MLflow from warning about type hints.

        Raises:
            ServingError: 413 over a limit (``REGFLOW_MAX_VOXELS`` / ``_PAIRS`` / ``_CHANNELS`` /
                ``_REFINE_STEPS`` / ``_MEMORY``), 422 nothing to register, 400 any other request
                problem (bad geometry included), 503 no memory free in time, 500 a bug
                (traceback in the server log), 504 past the server's timeout; see
                :func:`regflow.serving.scoring_errors.serving_error`.
        """
        started = time.monotonic()
        try:
            plans = [self._plan(pair) for pair in read_request(model_input, self.limits,
                                                               self.min_size)]
            report = any(plan.pair.refine_steps is not None for plan in plans)
            reservation = self.budget.reserve(
                request_bytes(plans, lambda steps: self.model_bytes[min(steps, 1)]), "inputs")
            try:
                encoded = []
                for plan in plans:
                    self._check_deadline(started, plan.pair.index)
                    encoded.append(self._answer(plan, report))
            finally:
                reservation.release_when_answered()
        except ServingError:
            raise
        except Exception as exc:
            raise serving_error(exc) from None
        return join_results(encoded)

    def _plan(self, pair: EncodedPair) -> PairPlan:
        """The pair's refinement steps and resampled shapes, checked against the limits."""
        model_steps = self.registrar.refine.steps
        if pair.refine_steps is not None:
            self.limits.check_refine_steps("inputs.refine_steps", pair.refine_steps, model_steps)
        frames = []
        for volume in (pair.fixed, pair.moving):
            affine = np.eye(4) if volume.affine is None else volume.affine
            frames.append(self.registrar.frame_shape(volume.spatial_shape, affine))
            self.limits.check_resampled(volume.name, frames[-1], self.registrar.record.spacing)
        steps = model_steps if pair.refine_steps is None else pair.refine_steps
        return PairPlan(pair, frames[0], frames[1], steps)

    def _check_deadline(self, started: float, index: int) -> None:
        """Stop a request whose client has had its 504: the server's timeout has passed."""
        if self.timeout_s is not None and time.monotonic() - started > self.timeout_s:
            message = (f"inputs: stopped before pair {index}: the request ran past the server's "
                       f"{self.timeout_s} s timeout ({MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.name})")
            _logger.warning(message)
            raise ServingError(message, 504)

    def _answer(self, plan: PairPlan, report: bool) -> dict[str, Any]:
        """Decode, register and encode one pair; with ``report``, the steps and seconds too."""
        started = time.perf_counter()
        pair, index, ndim = plan.pair.decode(), plan.pair.index, self.registrar.ndim
        label = None
        if pair["moving_label"] is not None:
            label = _label_volume(pair["moving_label"], pair["moving_affine"],
                                  f"inputs.moving_label[{index}]")
            values = label_values(label.array, ndim)
            if values is not None:
                self.limits.check_channels(label.source, len(values),
                                           "distinct non-zero label values")
        outputs = self.registrar.register_volumes(
            _volume(pair["fixed"], pair["fixed_affine"], f"inputs.fixed[{index}]"),
            _volume(pair["moving"], pair["moving_affine"], f"inputs.moving[{index}]"),
            label, refine_steps=plan.refine_steps, smallest=self.min_size)
        result = {"ddf": outputs["ddf"], "warped": outputs["warped"],
                  "affine": pair["fixed_affine"]}
        if "warped_label" in outputs:
            warped = outputs["warped_label"]
            result["warped_label"] = warped if warped.ndim == ndim else np.moveaxis(warped, -1, 0)
        answer: dict[str, Any] = encode_result(result, pair["encoding"])
        if report:
            answer.update(refine_steps=plan.refine_steps,
                          time_s=round(time.perf_counter() - started, 4))
        return answer
