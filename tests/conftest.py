"""Shared test set-up: quiet, offline MLflow/DVC and the path to the read-only data mirror."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")



@pytest.fixture(scope="session")
def mirror() -> Path:
    """The offline dataset mirror: the folder $REGFLOW_DATA_MIRROR names."""
    if not os.environ.get("REGFLOW_DATA_MIRROR"):
        pytest.fail("set REGFLOW_DATA_MIRROR to a local mirror of the datasets (README)")
    path = Path(os.environ["REGFLOW_DATA_MIRROR"])
    if not (path / "Task04_Hippocampus").is_dir():
        pytest.fail(f"REGFLOW_DATA_MIRROR={path}: no Task04_Hippocampus folder there")
    return path


@pytest.fixture(scope="session")
def mlflow_store(tmp_path_factory) -> str:
    """One real SQLite MLflow store for the whole session (creating one costs about a second)."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    return uri


@pytest.fixture(scope="session")
def tiny_raw(tmp_path_factory) -> Path:
    """The synthetic unpaired dataset of tests/synthetic.py, written once per session."""
    from tests.synthetic import write_unpaired_dataset

    return write_unpaired_dataset(tmp_path_factory.mktemp("tiny-raw"))


@pytest.fixture
def tiny_project(tmp_path, tiny_raw, mlflow_store, monkeypatch):
    """A working directory with params.yaml, the tiny dataset fetched and preprocessed.

    Returns the params.yaml path; the test runs inside the directory.
    """
    from regflow.config import load_config
    from regflow.data.fetch import fetch_dataset
    from regflow.data.preprocess import preprocess_dataset
    from tests.synthetic import write_params

    monkeypatch.chdir(tmp_path)
    params = write_params(tmp_path, tiny_raw)
    config = load_config(params)
    fetch_dataset("tiny", config)
    preprocess_dataset("tiny", config)
    return params
