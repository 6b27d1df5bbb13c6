"""Scale-out test bed: a real PostgreSQL cluster in a temporary folder, MLflow servers on it.

The cluster is Debian's ``postgresql`` package run by its unprivileged ``postgres`` user when the
tests run as root (the server refuses root). It listens on 127.0.0.1 and a socket in its own
folder; TCP connections need the role's password (scram-sha-256), socket connections are trusted
(for createdb and pg_dump in the tests). One cluster serves the whole session; every test makes
its own databases.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.synthetic import write_params

USER = "regflow"
PASSWORD = "S3cretPw"
VENV_BIN = Path(sys.executable).parent
QUIET_ENV = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true",
             "DVC_NO_ANALYTICS": "1", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
             "PYTHONUNBUFFERED": "1"}
SERVER_START_S = 120


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def postgres_bin_dir() -> Path:
    """The newest /usr/lib/postgresql/<version>/bin, else the folder of ``pg_ctl`` on PATH."""
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"),
                      key=lambda path: int(path.parts[-3]) if path.parts[-3].isdigit() else 0)
    if versions:
        return versions[-1].parent
    found = shutil.which("pg_ctl")
    if found is None:
        pytest.fail("PostgreSQL is not installed: apt-get install -y postgresql (.ci/run does)")
    return Path(found).resolve().parent


def as_cluster_owner(command: list[str]) -> list[str]:
    """Run ``command`` as ``postgres`` when we are root (the server refuses to run as root)."""
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


def wait_for_http(url: str, process: subprocess.Popen, log: Path, timeout_s: float) -> None:
    """Poll ``url`` until it answers 200; fail with the log's tail if the process exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as answer:
                if answer.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    pytest.fail(f"{url} not up after {timeout_s} s:\n{log.read_text()[-3000:]}")


def stop_process_group(process: subprocess.Popen, timeout_s: float = 5) -> None:
    """SIGTERM the process group this test started (server and its workers), then SIGKILL."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def project_env(tracking_uri: str | None = None, **extra: str) -> dict[str, str]:
    """Environment of a regflow/mlflow/dvc command: the venv first on PATH, quiet, offline."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("MLFLOW_TRACKING", "PG", "DVC_ROOT"))}
    env.update(QUIET_ENV)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    if tracking_uri is not None:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    env.update(extra)
    return env


@dataclass
class PostgresCluster:
    """A running cluster: role ``USER`` with ``PASSWORD`` on 127.0.0.1:``port``."""

    bin_dir: Path
    root: Path
    port: int
    host: str = "127.0.0.1"
    user: str = USER
    password: str = PASSWORD

    @property
    def socket_dir(self) -> Path:
        return self.root / "socket"

    def url(self, database: str, driver: str = "postgresql+psycopg",
            with_password: bool = True) -> str:
        """SQLAlchemy URL of ``database`` over TCP (the password in it unless told otherwise)."""
        credentials = f"{self.user}:{self.password}" if with_password else self.user
        return f"{driver}://{credentials}@{self.host}:{self.port}/{database}"

    def client(self, tool: str, *args: str) -> list[str]:
        """A client tool (createdb, pg_dump, psql) talking to the cluster through its socket."""
        return [str(self.bin_dir / tool), "-h", str(self.socket_dir), "-p", str(self.port),
                "-U", self.user, *args]

    def create_database(self, name: str) -> str:
        """Create an empty database; returns its name."""
        subprocess.run(self.client("createdb", name), check=True, capture_output=True)
        return name

    def dump(self, database: str) -> str:
        """Schema and every row of ``database`` as SQL text."""
        result = subprocess.run(self.client("pg_dump", "--no-owner", database), check=True,
                                capture_output=True, text=True)
        return result.stdout


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    """A PostgreSQL cluster for the session, in a temporary folder owned by its server user."""
    bin_dir = postgres_bin_dir()
    root = Path(tempfile.mkdtemp(prefix="regflow-pg-"))  # /tmp: the postgres user can reach it
    (root / "socket").mkdir()
    password_file = root / "password"
    password_file.write_text(PASSWORD + "\n")
    if os.geteuid() == 0:
        subprocess.run(["chown", "-R", "postgres:postgres", str(root)], check=True)
    cluster = PostgresCluster(bin_dir, root, free_port())
    data, log = root / "data", root / "server.log"
    subprocess.run(as_cluster_owner([
        str(bin_dir / "initdb"), "-D", str(data), "-U", USER, f"--pwfile={password_file}",
        "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--no-sync"]),
        check=True, capture_output=True)
    password_file.unlink()
    options = (f"-k {cluster.socket_dir} -p {cluster.port} -c listen_addresses={cluster.host} "
               "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
               "-c max_connections=200")
    subprocess.run(as_cluster_owner([str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log),
                                     "-o", options, "-w", "-t", "60", "start"]),
                   check=True, capture_output=True)
    try:
        yield cluster
    finally:
        subprocess.run(as_cluster_owner([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast",
                                         "-w", "stop"]), capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@dataclass
class MlflowServer:
    """A running ``mlflow server`` on PostgreSQL that proxies artifacts into ``artifacts``."""

    url: str
    artifacts: Path
    database: str
    log: Path


def start_mlflow_server(backend_uri: str, folder: Path, env: dict[str, str]
                        ) -> tuple[subprocess.Popen, MlflowServer]:
    """Start ``mlflow server`` (its own process group, cwd ``folder``) and wait for /health."""
    port = free_port()
    artifacts, log = folder / "artifacts", folder / "server.log"
    artifacts.mkdir(parents=True, exist_ok=True)
    command = ["mlflow", "server", "--backend-store-uri", backend_uri, "--serve-artifacts",
               "--artifacts-destination", str(artifacts), "--host", "127.0.0.1",
               "--port", str(port), "--workers", "1"]
    with open(log, "wb") as handle:
        process = subprocess.Popen(command, cwd=folder, env=env, stdout=handle,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    server = MlflowServer(f"http://127.0.0.1:{port}", artifacts, backend_uri.rsplit("/", 1)[1],
                          log)
    try:
        wait_for_http(f"{server.url}/health", process, log, SERVER_START_S)
    except BaseException:
        stop_process_group(process)
        raise
    return process, server


@pytest.fixture(scope="session")
def mlflow_server(postgres, tmp_path_factory) -> Iterator[MlflowServer]:
    """``mlflow server`` on a PostgreSQL database of the session cluster, artifacts proxied."""
    database = postgres.create_database("mlflow_session")
    folder = tmp_path_factory.mktemp("mlflow-server")
    process, server = start_mlflow_server(postgres.url(database, "postgresql"), folder,
                                          project_env())
    try:
        yield server
    finally:
        stop_process_group(process)


def write_project(folder: Path, raw_source: Path) -> Path:
    """A project folder as a clone of the repository would be: params.yaml for the tiny dataset
    with relative paths (so that every clone's config, and so its Optuna study, is the same),
    the data fetched and preprocessed. Returns the folder."""
    from regflow.config import load_config
    from regflow.data.fetch import fetch_dataset
    from regflow.data.preprocess import preprocess_dataset

    folder.mkdir(parents=True)
    params_path = write_params(folder, raw_source)
    params = yaml.safe_load(params_path.read_text())
    params["data"]["raw_dir"], params["data"]["processed_dir"] = "data/raw", "data/processed"
    params["train"]["best_params"] = "models/tuning/best_params.yaml"
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        config = load_config(params_path)
        fetch_dataset("tiny", config)
        preprocess_dataset("tiny", config)
    return folder


@pytest.fixture
def project(tmp_path, tiny_raw) -> Path:
    """A project folder with the tiny dataset fetched and preprocessed (:func:`write_project`)."""
    return write_project(tmp_path / "project", tiny_raw)


def run_checked(command: list[str], cwd: Path, env: dict[str, str]) -> str:
    """Run a command to its end; its output, or a test failure that shows the output's tail."""
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{output[-3000:]}"
    return output
