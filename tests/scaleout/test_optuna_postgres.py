"""Two `regflow tune` workers on one PostgreSQL study, one of them killed mid-trial."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import mlflow
import optuna
import pytest
import yaml
from optuna.trial import TrialState

from regflow.config import load_config
from regflow.tuning import PARENT_RUN_ATTR, SURPLUS_ATTR, study_key
from tests.scaleout.conftest import project_env, write_project

pytestmark = pytest.mark.slow

SEARCH = {
    "train.loss.regularization.bending_energy.weight": {"type": "float", "low": 0.01,
                                                        "high": 1.0, "log": True},
    "train.optimizer.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
}
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED)
TRIALS = 3
KILL_DEADLINE_S = 300
FINISH_TIMEOUT_S = 420
FINISHED_LINE = ("finished with value", " pruned ")


def tune_overrides(trials: int, **settings) -> list[str]:
    """`-S` values of a short study over SEARCH (JSON is YAML); no pruning, so that a trial
    killed after a validation was still running."""
    values = {"enabled": True, "trials": trials, "steps": 4, "val_every": 2, "pruner": "none",
              "max_folding_pct": 100.0, "heartbeat_s": 2, "search_space": SEARCH, **settings}
    return [f"tune.{key}={json.dumps(value)}" for key, value in values.items()]


def tune_command(storage: str | None, overrides: list[str]) -> list[str]:
    """`regflow tune [--storage URL] -S ...`."""
    command = ["regflow", "tune", *(["--storage", storage] if storage else [])]
    for override in overrides:
        command += ["-S", override]
    return command


class StudyReader:
    """Reads the study's trials without ever creating tables (it must not race the workers)."""

    def __init__(self, url: str, name: str):
        self.url, self.name, self.study = url, name, None

    def trials(self) -> list[optuna.trial.FrozenTrial]:
        """The trials, or none while no worker has created the study yet."""
        if self.study is None:
            try:
                storage = optuna.storages.RDBStorage(self.url, skip_table_creation=True)
                self.study = optuna.load_study(study_name=self.name, storage=storage)
            except Exception:  # no tables or no study yet
                return []
        return self.study.get_trials()


def running_here(folder: Path) -> set[int]:
    """Numbers of the trials a worker is training in ``folder`` (its trial folders)."""
    trials = folder / "models/tuning/trials"
    return {int(path.name.removeprefix("trial-")) for path in trials.glob("trial-*")}


def test_workers_share_a_study_and_a_killed_worker_trial_is_retried(postgres, mlflow_server,
                                                                     tmp_path, tiny_raw):
    # two clones of the project, as on two machines, sharing the study through PostgreSQL
    folders = [write_project(tmp_path / f"machine-{index}", tiny_raw) for index in range(2)]
    url = postgres.url(postgres.create_database("optuna_share"))
    overrides = tune_overrides(TRIALS)
    name = study_key(load_config(folders[0] / "params.yaml", overrides))
    env = project_env(mlflow_server.url)
    logs = [folder / "tune.log" for folder in folders]
    workers = []
    for folder, log in zip(folders, logs, strict=True):
        with open(log, "wb") as handle:
            workers.append(subprocess.Popen(tune_command(url, overrides), cwd=folder, env=env,
                                            stdout=handle, stderr=subprocess.STDOUT))
    reader = StudyReader(url, name)
    killed_number = doomed = None
    deadline = time.monotonic() + KILL_DEADLINE_S
    try:
        # kill the first worker found halfway through its second trial: validated, unfinished
        while (doomed is None and time.monotonic() < deadline
               and any(worker.poll() is None for worker in workers)):
            running = {trial.number for trial in reader.trials()
                       if trial.state == TrialState.RUNNING and trial.intermediate_values}
            for index, (worker, folder, log) in enumerate(zip(workers, folders, logs,
                                                              strict=True)):
                finished_one = any(line in log.read_text() for line in FINISHED_LINE)
                validated = sorted(running & running_here(folder))
                if worker.poll() is None and finished_one and validated:
                    worker.send_signal(signal.SIGKILL)
                    doomed, killed_number = index, validated[0]
                    break
            time.sleep(0.25)
        assert doomed is not None, "no worker ran a second trial:\n" + "\n".join(
            log.read_text()[-2000:] for log in logs)
        survivor = 1 - doomed
        workers[doomed].wait()
        assert workers[survivor].wait(timeout=FINISH_TIMEOUT_S) == 0, \
            logs[survivor].read_text()[-3000:]
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    assert any(line in logs[survivor].read_text() for line in FINISHED_LINE), "one worker only"

    trials = reader.trials()
    counted = [trial for trial in trials if trial.state in COUNTED]
    assert len(counted) == TRIALS
    assert len({tuple(sorted(trial.params.items())) for trial in counted}) == TRIALS
    [killed] = [trial for trial in trials
                if trial.state == TrialState.FAIL and not trial.user_attrs.get(SURPLUS_ATTR)]
    assert killed.number == killed_number
    [retry] = [trial for trial in counted
               if trial.system_attrs.get("failed_trial") == killed.number]
    assert retry.params == killed.params

    completed = [trial for trial in counted if trial.state == TrialState.COMPLETE]
    best = max(completed, key=lambda trial: trial.value)
    tuning = folders[survivor] / "models/tuning"
    assert yaml.safe_load((tuning / "best_params.yaml").read_text()) == best.params
    assert sorted(path.name for path in tuning.iterdir()) == ["best_params.yaml"]
    assert not (folders[doomed] / "models/tuning/best_params.yaml").exists()

    client = mlflow.MlflowClient(tracking_uri=mlflow_server.url)
    parent_id = reader.study.user_attrs[PARENT_RUN_ATTR]
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    # written once: only the surviving worker reached the end, and logged the best once
    assert len(client.get_metric_history(parent_id, "best_dice")) == 1
    assert parent.data.metrics["best_trial"] == best.number
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{parent_id}'")
    by_trial = {int(run.data.tags["optuna.trial_number"]): run for run in children}
    assert by_trial[killed.number].info.status == "FAILED"
    assert by_trial[killed.number].data.tags["optuna.state"] == "FAIL"
    for trial in counted:
        assert by_trial[trial.number].data.tags["optuna.state"] == trial.state.name
    for folder in folders:
        for store in ("mlflow.db", "mlruns", "mlartifacts", "models/tuning/optuna.db"):
            assert not (folder / store).exists(), f"{store} written in {folder}"
