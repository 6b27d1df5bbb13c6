"""The MLflow pyfunc model that ``mlflow models serve`` runs: base64 volumes in, base64 out.

The built-in PyTorch flavour cannot take a fixed and a moving image, so regflow ships a custom
``PythonModel``: the checkpoint travels as an artifact, requests and responses follow
regflow.codec, inputs of any size go through the checkpoint's preprocessing and the outputs come
back on the fixed image's grid (see regflow.predict.register_pair).
"""

from __future__ import annotations

from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import BAD_REQUEST
from mlflow.types import ColSpec, Schema

from regflow.codec import RESPONSE_FIELDS, build_response, encode_volume, parse_request
from regflow.errors import RegflowError
from regflow.models import RegistrationModel
from regflow.predict import RawVolume, register_pair

CHECKPOINT_ARTIFACT = "checkpoint"


def signature() -> ModelSignature:
    """Explicit signature: base64 strings per field; ``moving_label`` optional."""
    inputs = Schema([ColSpec("string", "fixed"), ColSpec("string", "moving"),
                     ColSpec("string", "moving_label", required=False)])
    outputs = Schema([ColSpec("string", field) for field in RESPONSE_FIELDS])
    return ModelSignature(inputs=inputs, outputs=outputs)


def input_example(shape: tuple[int, ...] = (8, 8, 8)) -> dict[str, list[str]]:
    """A tiny request (two random volumes as base64 .nii.gz), for the model's metadata."""
    rng = np.random.default_rng(0)
    volume = rng.random(shape, dtype=np.float32)
    return {"fixed": [encode_volume(volume, np.eye(4))],
            "moving": [encode_volume(np.roll(volume, 1, axis=0), np.eye(4))]}


def _bad_request(exc: Exception) -> MlflowException:
    return MlflowException(str(exc), error_code=BAD_REQUEST)


def _volume(array: np.ndarray, affine: np.ndarray | None, source: str) -> RawVolume:
    return RawVolume(array, np.eye(4) if affine is None else affine, source)


class RegflowPythonModel(mlflow.pyfunc.PythonModel):
    """Registers each requested pair with the checkpoint logged as artifact ``checkpoint``."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        """Load the checkpoint and its preprocessing record once per server worker."""
        self.model, extra = RegistrationModel.load(context.artifacts[CHECKPOINT_ARTIFACT])
        self.model.eval()
        self.record = extra.get("preprocessing") or {}

    def predict(self, context: mlflow.pyfunc.PythonModelContext, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> dict[str, list[str | None]]:
        """Decode, register and encode every pair of the request.

        The DataFrame hint is one MLflow infers no schema from (it does not convert to it); it
        keeps MLflow from warning about type hints (a dict of field lists works too, see
        :func:`regflow.codec.parse_request`).

        Raises:
            MlflowException: BAD_REQUEST (HTTP 400) with the codec's one-line message.
        """
        try:
            pairs = parse_request(model_input)
            results = [self._register(pair, index) for index, pair in enumerate(pairs)]
        except RegflowError as exc:
            raise _bad_request(exc) from None
        return build_response(results, [pair["encoding"] for pair in pairs])

    def _register(self, pair: dict[str, Any], index: int) -> dict[str, Any]:
        label = pair["moving_label"]
        outputs = register_pair(
            self.model, self.record,
            _volume(pair["fixed"], pair["fixed_affine"], f"inputs.fixed[{index}]"),
            _volume(pair["moving"], pair["moving_affine"], f"inputs.moving[{index}]"),
            None if label is None else _volume(np.moveaxis(label, 0, -1).round(),
                                               pair["moving_affine"],
                                               f"inputs.moving_label[{index}]"))
        result = {"ddf": outputs["ddf"], "warped": outputs["warped"],
                  "affine": pair["fixed_affine"]}
        if "warped_label" in outputs:
            result["warped_label"] = np.moveaxis(outputs["warped_label"], -1, 0)
        return result
