"""Crash consistency: SIGKILL `regflow evaluate` and `regflow register` mid-run, then rerun.

A killed evaluation must leave the last complete eval/<name>/ and metrics/ untouched (its
half-written volumes stay in a hidden staging folder that DVC does not track and the rerun
deletes); a killed registration must leave no model version without its evaluation tags, so
``models:/<name>/latest`` never names an unevaluated model; each rerun finishes cleanly.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import nibabel as nib
import pytest

from regflow.config import load_config
from regflow.data.fetch import fetch_dataset
from regflow.data.preprocess import preprocess_dataset
from regflow.engine import Trainer
from regflow.registry import CHALLENGER, is_evaluated
from tests.synthetic import write_params, write_unpaired_dataset

pytestmark = pytest.mark.slow

EVAL_PAIRS = 40
POLL_S = 0.005


@pytest.fixture
def project(tmp_path, mlflow_store, monkeypatch) -> Path:
    """A trained tiny project (2 steps) with 8 test cases (40 evaluation pairs to kill amid)."""
    raw = write_unpaired_dataset(tmp_path / "source", splits={"train": 4, "val": 2, "test": 8})
    params = write_params(tmp_path, raw, preprocess={"shape": [32, 32, 32]},
                          loader={"batch_size": 2, "eval_pairs": EVAL_PAIRS,
                                  "augment": {"enabled": False}},
                          train={"steps": 2, "val_every": 2, "checkpoint_every": 2},
                          registry={"model_name": f"kills-{tmp_path.name}"})
    monkeypatch.chdir(tmp_path)
    config = load_config(params)
    fetch_dataset("tiny", config)
    preprocess_dataset("tiny", config)
    Trainer(config, Path("data/processed/tiny/manifest.json"), Path("models/tiny")).fit()
    return params


def regflow(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "regflow.cli", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process: subprocess.Popen) -> None:
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output[-3000:]


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """name -> (size, mtime in ns) of every file under ``folder``."""
    return {str(path.relative_to(folder)): (path.stat().st_size, path.stat().st_mtime_ns)
            for path in sorted(folder.rglob("*")) if path.is_file()}


def training_run_id() -> str:
    return json.loads(Path("models/tiny/run.json").read_text())["run_id"]


def staging_folders() -> list[Path]:
    return sorted(Path("eval").glob(".*.tmp"))


def test_killed_evaluate_leaves_the_last_complete_evaluation_and_a_rerun_cleans_up(project):
    finish(regflow("evaluate"))
    volumes, metrics = snapshot(Path("eval/tiny")), snapshot(Path("metrics"))
    assert len(volumes) == 3 * EVAL_PAIRS

    second = regflow("evaluate")
    deadline = time.monotonic() + 120
    while second.poll() is None and time.monotonic() < deadline and not any(
            any(folder.iterdir()) for folder in staging_folders()):
        time.sleep(POLL_S)
    second.send_signal(signal.SIGKILL)
    second.wait()
    assert second.returncode == -signal.SIGKILL, "evaluate finished before it could be killed"
    half_written = [path for folder in staging_folders() for path in folder.iterdir()]
    print(f"\nkilled with {len(half_written)} staged files of {3 * EVAL_PAIRS}")
    assert 0 < len(half_written) < 3 * EVAL_PAIRS
    assert snapshot(Path("eval/tiny")) == volumes, "the complete evaluation was touched"
    assert snapshot(Path("metrics")) == metrics

    finish(regflow("evaluate"))
    assert staging_folders() == [], "the rerun left the killed run's staging folder"
    rerun = snapshot(Path("eval/tiny"))
    assert set(rerun) == set(volumes)
    for name in rerun:
        assert nib.load(Path("eval/tiny") / name).get_fdata().size > 0, name
    artifacts = Path(mlflow.artifacts.download_artifacts(run_id=training_run_id(),
                                                         dst_path="downloaded"))
    logged = [path for path in artifacts.rglob("*") if path.is_file()]
    assert logged and all(path.stat().st_size > 0 for path in logged)
    assert not [path for path in logged if path.name.endswith(".tmp")]


def test_killed_register_leaves_no_unevaluated_version_and_a_rerun_finishes(project):
    config = load_config(project)
    name = config.registry.model_name
    client = mlflow.MlflowClient()
    finish(regflow("evaluate"))

    experiments = [mlflow.get_experiment_by_name("regflow-tiny").experiment_id]
    logged_here = f"source_run_id = '{training_run_id()}'"

    first = regflow("register")  # killed once it has started logging the model
    deadline = time.monotonic() + 120
    while first.poll() is None and time.monotonic() < deadline and not client.search_logged_models(
            experiments, filter_string=logged_here):
        time.sleep(POLL_S)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert first.returncode == -signal.SIGKILL, "register finished before it could be killed"
    versions = client.search_model_versions(f"name = '{name}'")
    print(f"\nkilled with {len(versions)} model versions")
    assert all(is_evaluated(version) for version in versions)
    assert not Path("models/registered.json").exists()

    finish(regflow("register"))
    versions = client.search_model_versions(f"name = '{name}'")
    assert versions and all(is_evaluated(version) for version in versions)
    newest = max(int(version.version) for version in versions)
    assert int(client.get_model_version_by_alias(name, CHALLENGER).version) == newest
    assert os.path.getsize("models/registered.json") > 0
