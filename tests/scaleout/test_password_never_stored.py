"""A storage URL with a password: the password appears in no output, tag, param, row or file."""

from __future__ import annotations

import subprocess
from pathlib import Path

import mlflow
import psycopg
import pytest

from regflow.redact import redact_url
from tests.scaleout.conftest import PASSWORD, project_env
from tests.scaleout.test_optuna_postgres import tune_command, tune_overrides

pytestmark = pytest.mark.slow


def files_holding(folder: Path, secret: bytes) -> list[Path]:
    """Every file under ``folder`` whose bytes contain ``secret``."""
    return [path for path in folder.rglob("*") if path.is_file() and secret in path.read_bytes()]


def test_tuning_with_a_password_in_the_storage_url_leaks_it_nowhere(postgres, mlflow_server,
                                                                     project):
    with pytest.raises(psycopg.OperationalError, match="password"):  # TCP needs the password
        psycopg.connect(host=postgres.host, port=postgres.port, user=postgres.user,
                        dbname="postgres", connect_timeout=10).close()
    database = postgres.create_database("optuna_secret")
    url = postgres.url(database)
    assert PASSWORD in url
    env = project_env(mlflow_server.url)
    # the password in params (tune.storage, logged with the config) and on the command line
    result = subprocess.run(tune_command(None, tune_overrides(2, steps=4, storage=url)),
                            cwd=project, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    missing = subprocess.run(tune_command(url.replace(database, "no_such_database"),
                                          tune_overrides(2)),
                             cwd=project, env=env, capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and "no_such_database" in missing.stderr

    for output in (result.stdout, result.stderr, missing.stdout, missing.stderr):
        assert PASSWORD not in output
    client = mlflow.MlflowClient(tracking_uri=mlflow_server.url)
    experiments = [experiment.experiment_id for experiment in client.search_experiments()]
    runs = client.search_runs(experiments, f"tags.`optuna.storage` = '{redact_url(url)}'")
    assert runs, "the parent run does not name its (masked) storage"
    every_run = client.search_runs(experiments, max_results=10_000)
    assert len(every_run) >= 3  # parent and two trials
    for run in every_run:
        for key, value in {**run.data.tags, **run.data.params}.items():
            assert PASSWORD not in f"{key}={value}", (run.info.run_id, key)
    for database_name in (database, mlflow_server.database):
        assert PASSWORD not in postgres.dump(database_name), database_name
    assert any(path.is_file() for path in mlflow_server.artifacts.rglob("*")), "no artifacts"
    assert files_holding(mlflow_server.artifacts, PASSWORD.encode()) == []
    assert files_holding(project, PASSWORD.encode()) == []
    assert PASSWORD not in mlflow_server.log.read_text()
