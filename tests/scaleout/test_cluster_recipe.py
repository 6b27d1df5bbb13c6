"""The multi-machine recipe of docs/operations.md, every command of it, on one machine.

Two clones of a project stand for two machines ("head" and "worker"); they share a PostgreSQL
server (the session cluster, reached through libpq's PG* variables), an MLflow tracking server on
it with proxied artifacts, an Optuna study, a torchrun rendezvous and a DVC remote that is a plain
directory. A third clone checks that `dvc pull` brings back the data and the checkpoints.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import mlflow
import optuna
import pytest
import yaml
from optuna.trial import TrialState

from regflow.config import load_config
from regflow.tuning import study_key
from tests.scaleout.conftest import (
    free_port,
    project_env,
    run_checked,
    start_mlflow_server,
    stop_process_group,
)
from tests.scaleout.test_optuna_postgres import SEARCH
from tests.synthetic import write_params

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]
TRIALS = 2
CHECKPOINTS = ("models/tiny/best.pt", "models/tiny/last.pt")
DATA = ("data/processed/tiny/manifest.json", "data/raw/tiny/SHA256SUMS")


def run_together(commands: list[tuple[list[str], Path]], env: dict[str, str]) -> list[str]:
    """Start commands at once (one per "machine"), wait for all; their outputs."""
    processes = [subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
                 for command, cwd in commands]
    try:
        outputs = [process.communicate(timeout=600)[0] for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    for (command, _), process, output in zip(commands, processes, outputs, strict=True):
        assert process.returncode == 0, f"{' '.join(command)} failed:\n{output[-3000:]}"
    return outputs


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def head_repository(folder: Path, raw_source: Path, optuna_url: str) -> Path:
    """A git + DVC repository like this one: dvc.yaml, the sources its stages depend on, and a
    params.yaml for the tiny dataset whose study lives in PostgreSQL (no password in it)."""
    folder.mkdir()
    for name in ("dvc.yaml", ".gitignore", ".dvcignore", "requirements.lock"):
        shutil.copy(REPO_ROOT / name, folder / name)  # the stages' deps and what DVC hashes
    shutil.copytree(REPO_ROOT / "regflow", folder / "regflow",
                    ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load(write_params(folder, raw_source).read_text())
    params["data"]["raw_dir"], params["data"]["processed_dir"] = "data/raw", "data/processed"
    params["loader"]["batch_size"] = 1  # per rank: a global batch of 2 on two nodes
    params["train"].update(best_params="models/tuning/best_params.yaml", device="cpu",
                           optimizer={"lr": 0.001})
    params["evaluate"], params["registry"] = {"hd95": False}, {"model_name": "regflow"}
    params["tune"] = {"enabled": True, "trials": TRIALS, "steps": 4, "val_every": 2,
                      "pruner": "none", "max_folding_pct": 100.0, "heartbeat_s": 2,
                      "storage": optuna_url, "search_space": SEARCH}
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return folder


def test_cluster_recipe_on_one_machine(postgres, tmp_path, tiny_raw):
    env = project_env(PGHOST=postgres.host, PGPORT=str(postgres.port), PGUSER=postgres.user,
                      PGPASSWORD=postgres.password, OMP_NUM_THREADS="1",
                      GIT_AUTHOR_NAME="test", GIT_AUTHOR_EMAIL="test@example.com",
                      GIT_COMMITTER_NAME="test", GIT_COMMITTER_EMAIL="test@example.com")
    optuna_url = f"postgresql://{postgres.user}@{postgres.host}:{postgres.port}/regflow_optuna"
    mlflow_url = f"postgresql://{postgres.user}@{postgres.host}:{postgres.port}/regflow_mlflow"
    head = head_repository(tmp_path / "head", tiny_raw, optuna_url)
    store = tmp_path / "dvc-store"

    # 1. the database server: one database for MLflow, one for Optuna
    run_checked(["createdb", "regflow_mlflow"], tmp_path, env)
    run_checked(["createdb", "regflow_optuna"], tmp_path, env)
    # 2. the tracking server, artifacts proxied into a folder of its machine
    server_dir = tmp_path / "tracking"
    server_dir.mkdir()
    server_process, server = start_mlflow_server(mlflow_url, server_dir, env)
    try:
        env["MLFLOW_TRACKING_URI"] = server.url
        # 3. head: the repository, data into the DVC remote
        for command in (["git", "init", "-q"], ["dvc", "init", "-q"],
                        ["dvc", "remote", "add", "-d", "local", str(store)],
                        ["git", "add", "-A"], ["git", "commit", "-qm", "project"],
                        ["dvc", "repro", "preprocess"], ["dvc", "push"],
                        ["git", "add", "dvc.lock"], ["git", "commit", "-qm", "data"]):
            run_checked(command, head, env)
        # 4. worker: clone, pull the data
        run_checked(["git", "clone", "-q", str(head), "worker"], tmp_path, env)
        worker = tmp_path / "worker"
        run_checked(["dvc", "pull", "preprocess"], worker, env)
        assert digest(worker / DATA[0]) == digest(head / DATA[0])
        # 5. one study, a worker on each machine
        run_together([(["regflow", "tune"], head), (["regflow", "tune"], worker)], env)
        # 6. one training across both machines (rank 0 on head owns checkpoints and MLflow)
        port = str(free_port())
        trained = run_together([(["torchrun", "--nnodes", "2", "--node_rank", str(rank),
                        "--nproc_per_node", "1", "--master_addr", "127.0.0.1",
                        "--master_port", port, "-m", "regflow", "train"], folder)
                      for rank, folder in enumerate((head, worker))], env)
        for rank, output in enumerate(trained):
            assert f"regflow train: rank {rank}/2 " in output, output[-2000:]
        # 7. head: record the training, evaluate, register, push the checkpoints
        for command in (["dvc", "commit", "-f", "train"], ["dvc", "repro"], ["dvc", "push"],
                        ["git", "add", "-A"], ["git", "commit", "-qm", "trained"]):
            run_checked(command, head, env)
        # 8. anywhere: clone and pull data and checkpoints
        run_checked(["git", "clone", "-q", str(head), "fresh"], tmp_path, env)
        fresh = tmp_path / "fresh"
        run_checked(["dvc", "pull"], fresh, env)
        for path in (*DATA, *CHECKPOINTS):
            assert digest(fresh / path) == digest(head / path), path
        assert "up to date" in run_checked(["dvc", "status"], fresh, env)

        client = mlflow.MlflowClient(tracking_uri=server.url)
        champion = client.get_model_version_by_alias("regflow", "champion")
        assert client.get_run(champion.run_id).info.status == "FINISHED"
    finally:
        stop_process_group(server_process)

    name = study_key(load_config(head / "params.yaml"))
    study = optuna.load_study(study_name=name, storage=postgres.url("regflow_optuna"))
    counted = [trial for trial in study.get_trials() if trial.state == TrialState.COMPLETE]
    assert len(counted) == TRIALS
    best = (head / "models/tuning/best_params.yaml").read_text()
    assert best == (worker / "models/tuning/best_params.yaml").read_text() != "{}\n"
    assert not (worker / "models/tiny/best.pt").exists(), "rank 1 wrote a checkpoint"
    assert any(path.name == "MLmodel" for path in server.artifacts.rglob("*"))
    for folder in (head, worker):
        for local_store in ("mlflow.db", "mlruns", "mlartifacts", "models/tuning/optuna.db"):
            assert not (folder / local_store).exists(), f"{local_store} in {folder.name}"
