"""Shared test set-up: quiet, offline MLflow/DVC and the path to the read-only data mirror."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def mirror() -> Path:
    """The offline dataset mirror ($REGFLOW_DATA_MIRROR, else ../shared/data beside the repo)."""
    path = Path(os.environ.get("REGFLOW_DATA_MIRROR", REPO_ROOT.parent / "shared" / "data"))
    if not (path / "Task04_Hippocampus").is_dir():
        pytest.fail(f"data mirror not found at {path}: set REGFLOW_DATA_MIRROR")
    return path
