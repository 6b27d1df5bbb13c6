"""A trained model made ready to ship: one checkpoint file that carries its weights (float16 on
request), the config it was trained with and the test-time settings it was evaluated with, so
that ``regflow predict --model FILE`` and ``regflow register --checkpoint FILE`` use it as it was
measured, whatever params.yaml the working folder holds."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from regflow import __version__
from regflow.config import Config, validate_config
from regflow.fileio import write_json
from regflow.models import RegistrationModel
from regflow.redact import redact_values

# what a shipped checkpoint keeps of the training checkpoint's extra (not the optimiser state)
KEPT_EXTRA = ("preprocessing", "loss")
CONFIG_KEY = "config"
EVALUATE_KEY = "evaluate"


def export_checkpoint(checkpoint: Path, config: Config, output: Path, half: bool = False
                      ) -> dict[str, Any]:
    """Write ``output``: the model of ``checkpoint`` with ``config`` (its ``evaluate`` section
    being the test-time settings) and the training's step and run id.

    Args:
        checkpoint: a training checkpoint (models/<name>/best.pt).
        config: the config it was trained with, its ``evaluate`` section set to the settings it
            is to be used with (passwords are masked before it is stored).
        output: the shipped ``.pt`` file (written atomically).
        half: store the weights as float16.

    Returns:
        ``path``, ``sha256``, ``bytes``, ``parameters`` and ``training`` (step, run id).

    Raises:
        RegflowError: the checkpoint cannot be read.
    """
    model, extra = RegistrationModel.load(checkpoint)
    training = extra.get("training", {})
    shipped = {key: extra[key] for key in KEPT_EXTRA if key in extra}
    shipped[CONFIG_KEY] = redact_values(config.model_dump(mode="json"))
    shipped[EVALUATE_KEY] = config.evaluate.model_dump(mode="json")
    shipped["training"] = {"step": training.get("step"), "run_id": training.get("run_id")}
    model.save(output, extra=shipped, half=half)
    return {"path": str(output), "sha256": file_sha256(output), "bytes": output.stat().st_size,
            "parameters": sum(parameter.numel() for parameter in model.parameters()),
            "training": shipped["training"]}


def record_path(shipped: Path) -> Path:
    """The JSON record beside a shipped checkpoint (``x.pt`` -> ``x.json``)."""
    return shipped.with_suffix(".json")


def write_record(shipped: dict[str, Any], config: Config, half: bool,
                 metrics: dict[str, float] | None) -> Path:
    """Write the shipped checkpoint's record: what :func:`export_checkpoint` returned, the
    weights' dtype, its test-time settings and, when given, its metrics on ``evaluate.split``
    (what the model card cites and the shipped-weights test checks against)."""
    path = Path(shipped["path"])
    record = {**shipped, "path": path.name, "dtype": "float16" if half else "float32",
              "evaluate": config.evaluate.model_dump(mode="json"),
              "regflow_version": __version__,
              "date": datetime.now(UTC).strftime("%Y-%m-%d")}
    if metrics is not None:
        record["metrics"] = {"split": config.evaluate.split, **metrics}
    return write_json(record_path(path), record)


def file_sha256(path: Path) -> str:
    """The hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def shipped_config(extra: dict[str, Any], source: str) -> Config | None:
    """The config a shipped checkpoint carries (None for a plain training checkpoint).

    Raises:
        ConfigError: the stored config does not validate (a checkpoint of another version).
    """
    if CONFIG_KEY not in extra:
        return None
    return validate_config(extra[CONFIG_KEY], source=f"{source} (its stored config)")
