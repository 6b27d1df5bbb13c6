"""Serving: the MLflow pyfunc model, its wire format, resource limits and the `regflow serve` app.

Models registered before this package existed carry a copy of the old ``regflow/pyfunc_model.py``,
which runs ``from regflow.serving import RegflowPythonModel`` when MLflow loads them; the name is
resolved here on first use, so that importing a light module of the package (the client, the
codec) does not load torch and the model.
"""

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "RegflowPythonModel":
        from regflow.serving.model import RegflowPythonModel

        return RegflowPythonModel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
