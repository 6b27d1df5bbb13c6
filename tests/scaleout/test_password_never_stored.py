"""A storage URL with a password: the password appears in no output, tag, param, row or file."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from urllib.parse import quote

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


SPECIAL_USER = "special"
SPECIAL_PASSWORD = "SECRET/PW @#%:x"  # every character a URL treats specially, and a blank
SPECIAL_FORMS = (SPECIAL_PASSWORD, quote(SPECIAL_PASSWORD, safe=""), quote(SPECIAL_PASSWORD),
                 "SECRET/PW", "SECRET%2FPW")


def special_role_database(postgres, name: str) -> str:
    """A database owned by a role whose password is SPECIAL_PASSWORD (created through the
    trusted socket); returns the database's name."""
    sql = (f"DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{SPECIAL_USER}') "
           f"THEN CREATE ROLE {SPECIAL_USER} LOGIN PASSWORD "
           f"'{SPECIAL_PASSWORD.replace(chr(39), chr(39) * 2)}'; END IF; END $$;")
    subprocess.run(postgres.client("psql", "-d", "postgres", "-v", "ON_ERROR_STOP=1", "-c", sql),
                   check=True, capture_output=True)
    subprocess.run(postgres.client("createdb", "-O", SPECIAL_USER, name), check=True,
                   capture_output=True)
    return name


def test_passwords_with_url_characters_connect_and_leak_nowhere(postgres, mlflow_server,
                                                                 project):
    database = special_role_database(postgres, "optuna_special")
    host = f"{postgres.host}:{postgres.port}/{database}"
    encoded = f"postgresql+psycopg://{SPECIAL_USER}:{quote(SPECIAL_PASSWORD, safe='')}@{host}"
    psycopg.connect(host=postgres.host, port=postgres.port, user=SPECIAL_USER,
                    password=SPECIAL_PASSWORD, dbname=database, connect_timeout=10).close()
    env = project_env(mlflow_server.url)
    runs = {
        # percent-encoded in the URL (params, so logged with the config and as MLflow params)
        "encoded": (tune_command(None, tune_overrides(1, steps=4, storage=encoded)), env),
        # the password from the environment, the URL without it (on the command line)
        "environment": (tune_command(f"postgresql+psycopg://{SPECIAL_USER}@{host}",
                                     tune_overrides(2, steps=4)),
                        {**env, "REGFLOW_STORAGE_PASSWORD": SPECIAL_PASSWORD}),
        # as typed, unencoded: SQLAlchemy and RFC 3986 read it differently: refused
        "raw": (tune_command(None, tune_overrides(
            2, storage=f"postgresql+psycopg://{SPECIAL_USER}:{SPECIAL_PASSWORD}@{host}")), env),
    }
    results = {name: subprocess.run(command, cwd=project, env=environment, capture_output=True,
                                    text=True, timeout=600)
               for name, (command, environment) in runs.items()}
    assert results["encoded"].returncode == 0, results["encoded"].stderr[-3000:]
    assert results["environment"].returncode == 0, results["environment"].stderr[-3000:]
    refused = results["raw"]
    assert refused.returncode == 2 and refused.stderr.strip().count("\n") == 0
    assert refused.stderr.startswith(
        f"Error: tune.storage: postgresql+psycopg://{SPECIAL_USER}:***@{host}: SQLAlchemy and "
        "RFC 3986 read the user, password or host of this URL differently")
    with psycopg.connect(host=postgres.host, port=postgres.port, user=SPECIAL_USER,
                         password=SPECIAL_PASSWORD, dbname=database) as connection:
        complete = connection.execute(
            "SELECT count(*) FROM trials WHERE state = 'COMPLETE'").fetchone()[0]
    assert complete == 2  # both runs connected and completed the study's two trials

    texts = {f"{name} {stream}": getattr(result, stream) for name, result in results.items()
             for stream in ("stdout", "stderr")}
    client = mlflow.MlflowClient(tracking_uri=mlflow_server.url)
    experiments = [experiment.experiment_id for experiment in client.search_experiments()]
    for run in client.search_runs(experiments, max_results=10_000):
        texts[f"run {run.info.run_id}"] = json.dumps({**run.data.tags, **run.data.params})
    for database_name in (database, mlflow_server.database):
        texts[f"dump of {database_name}"] = postgres.dump(database_name)
    texts["mlflow server log"] = mlflow_server.log.read_text()
    found = {(name, form) for name, text in texts.items() for form in SPECIAL_FORMS
             if form in text}
    assert found == set(), found
    for form in SPECIAL_FORMS:
        assert files_holding(mlflow_server.artifacts, form.encode()) == []
        assert files_holding(project, form.encode()) == []
    logged = [path for path in mlflow_server.artifacts.rglob("params.yaml")]
    assert any(f"{SPECIAL_USER}:***@" in path.read_text() for path in logged), \
        "the logged config does not show the storage, masked"
    print(f"\n{len(texts)} outputs, runs, dumps and logs and every file searched for "
          f"{len(SPECIAL_FORMS)} forms of the password: none found")
