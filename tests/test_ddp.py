"""Data-parallel training: the real ``torchrun --nproc_per_node 2 -m regflow train`` on CPU (gloo).

Each launch runs in its own folder with its own SQLite MLflow store, on a tiny synthetic dataset
(16^3 volumes, 8 training cases, so an epoch is 4 pairs: a multiple of the global batch of 2).
"""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import psutil
import pytest

from regflow.config import load_config
from regflow.data.fetch import fetch_dataset
from regflow.data.preprocess import preprocess_dataset
from regflow.distributed import state_checksum
from regflow.models import RegistrationModel
from tests.synthetic import write_params, write_unpaired_dataset

pytestmark = [pytest.mark.slow, pytest.mark.ddp]

TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
STEPS = 6
RUN_TIMEOUT_S = 500
LOSS_TOLERANCE = 1e-5  # absolute, per step: float summation order only (observed 1.2e-7)
RANK_LINE = re.compile(r"regflow train: rank (\d)/2 step (\d+) \((fresh|resumed from step "
                       r"(\d+))\) weights sha256 ([0-9a-f]{64})")
CHECKPOINT_SERIES = {"best.pt", "last.pt", "run.json"}


@pytest.fixture(scope="module")
def params(tmp_path_factory) -> Path:
    """params.yaml of a fetched and preprocessed tiny dataset (absolute data paths)."""
    root = tmp_path_factory.mktemp("ddp")
    raw = write_unpaired_dataset(root / "raw", splits={"train": 8, "val": 2, "test": 2})
    path = write_params(root, raw, preprocess={"shape": [16, 16, 16]},
                        train={"steps": STEPS, "val_every": 3, "checkpoint_every": 2,
                               "device": "cpu"})
    config = load_config(path)
    fetch_dataset("tiny", config)
    preprocess_dataset("tiny", config)
    return path


def launch_env(workdir: Path) -> dict[str, str]:
    """A quiet environment with the folder's own MLflow store and one thread per process;
    faulthandler on, so that SIGABRT makes a worker print its stacks."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(MLFLOW_TRACKING_URI=f"sqlite:///{workdir / 'mlflow.db'}", OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1", MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true",
               MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false", PYTHONFAULTHANDLER="1")
    return env


def torchrun_command(params: Path, *overrides: str) -> list[str]:
    """Two CPU workers, one pair each per step (global batch 2)."""
    settings = ["-S", "loader.batch_size=1", *(arg for item in overrides for arg in ("-S", item))]
    return [TORCHRUN, "--standalone", "--nproc_per_node", "2", "-m", "regflow", "train",
            "-c", str(params), *settings]


def run(command: list[str], workdir: Path) -> subprocess.CompletedProcess:
    """Run a launch to the end; a launch still running after RUN_TIMEOUT_S fails the test with
    every worker's Python stacks (SIGABRT makes faulthandler print them)."""
    workdir.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(command, cwd=workdir, env=launch_env(workdir), text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        for worker in psutil.Process(process.pid).children(recursive=True):
            worker.send_signal(signal.SIGABRT)
        time.sleep(5)
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"launch still running after {RUN_TIMEOUT_S} s; stdout:\n{stdout[-2000:]}\n"
                    f"stderr with the workers' stacks:\n{stderr[-12000:]}")
    assert process.returncode == 0, stderr[-3000:]
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def rank_lines(stderr: str) -> dict[int, tuple[int, str | None, str]]:
    """rank -> (final step, resumed-from step or None, weights sha256) from the workers' lines."""
    return {int(rank): (int(step), resumed, checksum)
            for rank, step, _, resumed, checksum in RANK_LINE.findall(stderr)}


def only_run(workdir: Path) -> mlflow.entities.Run:
    """The one run in the folder's store (asserting that there is exactly one)."""
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    experiments = [experiment.experiment_id for experiment in client.search_experiments()]
    runs = client.search_runs(experiments)
    assert len(runs) == 1, [found.info.run_name for found in runs]
    return runs[0]


def history(workdir: Path, run_id: str, key: str) -> dict[int, float]:
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    return {point.step: point.value for point in client.get_metric_history(run_id, key)}


def checkpoint(path: Path) -> tuple[int, str]:
    """(step, weights sha256) of a checkpoint."""
    model, extra = RegistrationModel.load(path)
    return extra["training"]["step"], state_checksum(model)


def test_two_ranks_train_like_one_process_with_the_same_global_batch(params, tmp_path):
    ddp = run(torchrun_command(params), tmp_path / "ddp")
    run([sys.executable, "-m", "regflow", "train", "-c", str(params),
         "-S", "loader.batch_size=2"], tmp_path / "single")

    ranks = rank_lines(ddp.stderr)
    assert set(ranks) == {0, 1}, ddp.stderr[-3000:]
    assert ranks[0] == ranks[1]  # same step, both fresh, bit-identical weights
    out_dir = tmp_path / "ddp" / "models" / "tiny"
    assert checkpoint(out_dir / "last.pt") == (STEPS, ranks[0][2])
    assert {path.name for path in out_dir.iterdir()} == CHECKPOINT_SERIES

    parallel, single = only_run(tmp_path / "ddp"), only_run(tmp_path / "single")
    assert parallel.info.status == "FINISHED"
    assert parallel.data.metrics["train/steps_done"] == STEPS
    assert (out_dir / "run.json").read_text().count(parallel.info.run_id) == 1
    for key in ("train/total", "val/dice_mean"):
        ours = history(tmp_path / "ddp", parallel.info.run_id, key)
        theirs = history(tmp_path / "single", single.info.run_id, key)
        assert set(ours) == set(theirs) and ours, key
        assert max(abs(ours[step] - theirs[step]) for step in ours) <= LOSS_TOLERANCE, key
    assert set(history(tmp_path / "ddp", parallel.info.run_id, "train/total")) == set(
        range(1, STEPS + 1))


def worker_of_rank(launcher: psutil.Process, rank: int) -> psutil.Process | None:
    for child in launcher.children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank):
                return child
        except psutil.Error:
            continue
    return None


def test_sigkill_of_one_rank_then_relaunch_resumes_every_rank(params, tmp_path):
    steps = 40
    command = torchrun_command(params, f"train.steps={steps}", "train.val_every=20")
    out_dir = tmp_path / "models" / "tiny"
    log = (tmp_path / "first.log").open("w")
    first = subprocess.Popen(command, cwd=tmp_path, env=launch_env(tmp_path), stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while first.poll() is None and time.monotonic() < deadline and not (
                (out_dir / "last.pt").exists() and checkpoint(out_dir / "last.pt")[0] >= 4):
            time.sleep(0.2)
        victim = worker_of_rank(psutil.Process(first.pid), 1)
        assert victim is not None, (tmp_path / "first.log").read_text()[-3000:]
        victim.send_signal(signal.SIGKILL)
        assert first.wait(timeout=120) != 0
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        log.close()
    killed_at = checkpoint(out_dir / "last.pt")[0]
    assert 4 <= killed_at < steps
    run_id = only_run(tmp_path).info.run_id

    relaunch = run(command, tmp_path)
    ranks = rank_lines(relaunch.stderr)
    assert set(ranks) == {0, 1}, relaunch.stderr[-3000:]
    assert ranks[0] == ranks[1] == (steps, str(killed_at), checkpoint(out_dir / "last.pt")[1])
    resumed = only_run(tmp_path)
    assert resumed.info.run_id == run_id
    assert resumed.info.status == "FINISHED"
    assert resumed.data.tags["regflow.resumed_from_step"] == str(killed_at)
    assert resumed.data.metrics["train/steps_done"] == steps
    assert set(history(tmp_path, run_id, "train/total")) == set(range(1, steps + 1))
    assert {path.name for path in out_dir.iterdir()} == CHECKPOINT_SERIES
