"""The MLflow pyfunc model that ``mlflow models serve`` runs: base64 volumes in, base64 out.

The built-in PyTorch flavour cannot take a fixed and a moving image, so regflow ships a custom
``PythonModel``: the checkpoint travels as an artifact, requests and responses follow
regflow.codec, inputs of any size go through the checkpoint's preprocessing and the outputs come
back on the fixed image's grid (see regflow.inference.Registrar.register_volumes).

The contract is hardened for a server facing untrusted clients: resource limits
(:mod:`regflow.limits`, read from ``REGFLOW_MAX_*`` when the model loads) are checked from the
file headers before anything is decoded; pairs are decoded, registered and encoded one at a time;
errors become 413 / 422 / 400 / 500 answers with short bodies that never quote the request
(:mod:`regflow.scoring_errors`); and a request still running when the server's own timeout
(``MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT``, after which the client already got a 504) has passed
stops before its next pair.
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

from regflow.codec import (
    RESPONSE_FIELDS,
    encode_result,
    encode_volume,
    join_results,
    read_request,
)
from regflow.config import load_config
from regflow.inference import Volume, load_registrar
from regflow.limits import Limits
from regflow.scoring_errors import ServingError, serving_error

CHECKPOINT_ARTIFACT = "checkpoint"
CONFIG_ARTIFACT = "config"  # the params the model was trained and registered with (refinement)

_logger = logging.getLogger(__name__)


def signature() -> ModelSignature:
    """The model's signature: outputs only (base64 strings per field), no input schema.

    With an input schema MLflow would check requests before ``predict``: it drops unknown
    fields silently, turns a null ``moving_label`` into the string "None", and answers its own
    errors with a body that quotes the whole request. Without one, the request reaches
    :func:`regflow.codec.read_request` as sent, which checks it all.
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
        """Load the checkpoint and its preprocessing record once per server worker."""
        config_file = context.artifacts.get(CONFIG_ARTIFACT)
        config = load_config(config_file) if config_file else None
        self.registrar = load_registrar(context.artifacts[CHECKPOINT_ARTIFACT], config,
                                        device=torch.device("cpu"))
        self.limits = Limits.from_env()
        self.timeout_s = (MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.get()
                          if MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.is_set() else None)

    def predict(self, context: mlflow.pyfunc.PythonModelContext, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> dict[str, list[str | None]]:
        """Check the whole request, then decode, register and encode one pair at a time.

        ``model_input`` is what MLflow passes without an input schema: a dict of numpy arrays for
        ``{"inputs": ...}``, a DataFrame for the ``dataframe_*`` formats (see
        :func:`regflow.codec.read_request`). The DataFrame hint is one MLflow infers no schema
        from (it does not convert to it); it keeps MLflow from warning about type hints.

        Raises:
            ServingError: 413 over a limit (``REGFLOW_MAX_VOXELS`` / ``_PAIRS`` / ``_CHANNELS``),
                422 nothing to register, 400 any other request problem, 500 a bug (traceback in
                the server log), 504 past the server's timeout; see
                :func:`regflow.scoring_errors.serving_error`.
        """
        started = time.monotonic()
        try:
            encoded = []
            for pair in read_request(model_input, self.limits):
                self._check_deadline(started, pair.index)
                result = self._register(pair.decode(), pair.index)
                encoded.append(encode_result(result, pair.encoding))
        except ServingError:
            raise
        except Exception as exc:
            raise serving_error(exc) from None
        return join_results(encoded)

    def _check_deadline(self, started: float, index: int) -> None:
        """Stop a request whose client has had its 504: the server's timeout has passed."""
        if self.timeout_s is not None and time.monotonic() - started > self.timeout_s:
            message = (f"inputs: stopped before pair {index}: the request ran past the server's "
                       f"{self.timeout_s} s timeout ({MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.name})")
            _logger.warning(message)
            raise ServingError(message, 504)

    def _register(self, pair: dict[str, Any], index: int) -> dict[str, Any]:
        label = pair["moving_label"]
        outputs = self.registrar.register_volumes(
            _volume(pair["fixed"], pair["fixed_affine"], f"inputs.fixed[{index}]"),
            _volume(pair["moving"], pair["moving_affine"], f"inputs.moving[{index}]"),
            None if label is None else _label_volume(label, pair["moving_affine"],
                                                     f"inputs.moving_label[{index}]"))
        result = {"ddf": outputs["ddf"], "warped": outputs["warped"],
                  "affine": pair["fixed_affine"]}
        if "warped_label" in outputs:
            warped = outputs["warped_label"]
            result["warped_label"] = warped if warped.ndim == self.registrar.ndim else \
                np.moveaxis(warped, -1, 0)
        return result
