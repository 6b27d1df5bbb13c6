"""Tests for regflow.tracking against a real SQLite MLflow store (one per module: ~1 s each)."""

import hashlib
import json
import subprocess
import threading
from pathlib import Path

import mlflow
import pytest
import yaml
from matplotlib.figure import Figure

from regflow.config import Config, validate_config
from regflow.data.manifest import Case, Manifest, PreprocessSettings
from regflow.errors import RegflowError
from regflow.tracking import (
    configure_mlflow,
    is_rank_zero,
    log_config,
    log_dataset_input,
    log_figure,
    run_tags,
    start_or_resume_run,
    tracking_uri,
)

EXPERIMENT = "tracking-test"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A repository root holding this module's store; MLflow pointed at it via $DVC_ROOT."""
    root = tmp_path_factory.mktemp("store_root")
    with pytest.MonkeyPatch.context() as patch:
        for variable in ("MLFLOW_TRACKING_URI", "RANK", "LOCAL_RANK", "DVC_EXP_NAME",
                         "DVC_EXP_BASELINE_REV", "DVC_STAGE"):
            patch.delenv(variable, raising=False)
        patch.setenv("DVC_ROOT", str(root))
        yield root
        while mlflow.active_run():
            mlflow.end_run()
        mlflow.set_tracking_uri(None)  # also unsets $MLFLOW_TRACKING_URI that MLflow exported


def git(root: Path, *args: str) -> str:
    command = ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args]
    return subprocess.run(command, cwd=root, check=True, capture_output=True,
                          text=True).stdout.strip()


def test_tracking_uri_default_is_absolute_sqlite(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    assert tracking_uri(tmp_path) == "http://tracking:5000"


def test_configure_creates_experiment_with_artifacts_at_root(store):
    experiment_id = configure_mlflow("configure-test")
    assert mlflow.get_tracking_uri() == f"sqlite:///{store.resolve()}/mlflow.db"
    assert (store / "mlflow.db").is_file()
    experiment = mlflow.get_experiment(experiment_id)
    assert experiment.artifact_location == (store / "mlartifacts" / "configure-test").as_uri()
    assert configure_mlflow("configure-test") == experiment_id


def test_deleted_experiment_is_a_clear_error(store):
    mlflow.delete_experiment(configure_mlflow("deleted-test"))
    with pytest.raises(RegflowError, match="'deleted-test' is deleted"):
        configure_mlflow("deleted-test")


def test_run_tags_git_commit_and_dirty_flag(tmp_path, monkeypatch):
    git(tmp_path, "init", "-q")
    (tmp_path / "a.txt").write_text("one")
    git(tmp_path, "add", "a.txt")
    git(tmp_path, "commit", "-q", "-m", "first")
    head = git(tmp_path, "rev-parse", "HEAD")
    monkeypatch.setenv("DVC_EXP_NAME", "brisk-oboe")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "f" * 40)
    monkeypatch.delenv("DVC_STAGE", raising=False)
    tags = run_tags(tmp_path)
    assert len(head) == 40
    assert tags["git.commit"] == tags["mlflow.source.git.commit"] == head
    assert tags["git.dirty"] == "false"
    assert tags["dvc.exp_name"] == "brisk-oboe" and tags["dvc.baseline_rev"] == "f" * 40
    assert "dvc.stage" not in tags
    (tmp_path / "untracked.txt").write_text("not part of the commit")
    assert run_tags(tmp_path)["git.dirty"] == "false"
    (tmp_path / "a.txt").write_text("two")
    assert run_tags(tmp_path)["git.dirty"] == "true"


def test_run_tags_outside_git_has_no_git_tags(tmp_path):
    tags = run_tags(tmp_path)
    assert "git.commit" not in tags and "git.dirty" not in tags


LOCK = {
    "schema": "2.0",
    "stages": {
        "preprocess": {
            "cmd": "regflow preprocess",
            "deps": [{"path": "data/raw/msd", "hash": "md5", "md5": "raw1.dir"}],
            "outs": [{"path": "data/processed/msd", "hash": "md5", "md5": "new2.dir",
                      "size": 10, "nfiles": 3}],
        },
        "train": {
            "cmd": "regflow train",
            "deps": [{"path": "data/processed/msd", "hash": "md5", "md5": "old9.dir"},
                     {"path": "data/extra.csv", "hash": "md5", "md5": "csv5"},
                     {"path": "regflow/engine.py", "hash": "md5", "md5": "code7"}],
        },
    },
}


def test_run_tags_data_md5_from_dvc_lock(tmp_path):
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(LOCK))
    data_tags = {k: v for k, v in run_tags(tmp_path).items() if k.startswith("data.md5.")}
    # the producing stage's out md5 (already rewritten by dvc repro) wins over the stale dep md5
    assert data_tags == {"data.md5.data/processed/msd": "new2.dir",
                         "data.md5.data/extra.csv": "csv5"}


def test_run_tags_before_train_is_locked_reports_all_outs(tmp_path):
    lock = {"schema": "2.0", "stages": {"preprocess": LOCK["stages"]["preprocess"]}}
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    data_tags = {k: v for k, v in run_tags(tmp_path).items() if k.startswith("data.md5.")}
    assert data_tags == {"data.md5.data/processed/msd": "new2.dir"}


def long_config() -> Config:
    return validate_config({"train": {"loss": {"image": {"lncc": {
        "weight": 2.5, "options": {"note": "x" * 7000, "k" * 300: 1, "a*b": 2}}}}}})


def test_log_config_flattens_params_and_stores_yaml(store):
    config = long_config()
    with start_or_resume_run(EXPERIMENT, run_name="params") as run:
        log_config(config)
    params = mlflow.get_run(run.info.run_id).data.params
    assert params["train.optimizer.lr"] == "0.001"
    assert params["train.model.backbone.channels"] == "[16, 32, 64]"
    assert params["train.loss.image.lncc.weight"] == "2.5"
    note = params["train.loss.image.lncc.options.note"]
    assert len(note) == 6000 and note.endswith("...") and note.startswith("xxx")
    long_keys = [key for key in params if key.startswith("train.loss.image.lncc.options.kkk")]
    assert len(long_keys) == 1 and len(long_keys[0]) == 250
    assert [k for k in params if k.startswith("train.loss.image.lncc.options.a_b-")] != []
    text = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/config/params.yaml")
    assert yaml.safe_load(text) == config.model_dump()


def test_log_config_masks_url_passwords_in_params_and_yaml(store):
    config = validate_config({
        "tune": {"storage": "postgresql://optuna:secret@db:5432/optuna"},
        "train": {"loss": {"image": {"lncc": {"options": {"source": "http://u:secret@h/x"}}}}}})
    with start_or_resume_run(EXPERIMENT, run_name="masked") as run:
        log_config(config)
    logged = mlflow.get_run(run.info.run_id).data
    assert logged.params["tune.storage"] == "postgresql://optuna:***@db:5432/optuna"
    assert logged.params["train.loss.image.lncc.options.source"] == "http://u:***@h/x"
    text = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/config/params.yaml")
    assert yaml.safe_load(text)["tune"]["storage"] == "postgresql://optuna:***@db:5432/optuna"
    everything = json.dumps([logged.params, logged.tags]) + text
    assert "secret" not in everything


def test_run_is_tagged_and_resume_continues_the_same_run(store):
    with start_or_resume_run(EXPERIMENT, run_name="resume", tags={"purpose": "test"}) as run:
        log_config(Config())
        mlflow.log_metric("loss", 1.0, step=0)
    run_id = run.info.run_id
    assert mlflow.get_run(run_id).info.status == "FINISHED"
    with start_or_resume_run(EXPERIMENT, run_id=run_id) as resumed:
        assert resumed.info.run_id == run_id
        log_config(Config())  # same values again: allowed
        mlflow.log_metric("loss", 0.5, step=1)
        with pytest.raises(RegflowError, match=f"run {run_id}: config differs"):
            log_config(validate_config({"seed": 7}))
    history = mlflow.MlflowClient().get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(0, 1.0), (1, 0.5)]
    tags = mlflow.get_run(run_id).data.tags
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    assert tags["git.commit"] == head.strip() and tags["purpose"] == "test"
    assert tags["mlflow.runName"] == "resume"


def test_resumed_run_keeps_the_stage_it_was_started_by(store, monkeypatch):
    monkeypatch.setenv("DVC_STAGE", "train")
    with start_or_resume_run(EXPERIMENT, run_name="staged") as run:
        pass
    monkeypatch.setenv("DVC_STAGE", "register")
    with start_or_resume_run(EXPERIMENT, run_id=run.info.run_id, tags={"registered": "yes"}):
        pass
    tags = mlflow.get_run(run.info.run_id).data.tags
    assert tags["dvc.stage"] == "train" and tags["registered"] == "yes"


def test_resume_unknown_run_is_a_clear_error(store):
    with pytest.raises(RegflowError, match="run 0123abc: not found"):
        with start_or_resume_run(EXPERIMENT, run_id="0123abc"):
            pass


def test_failed_block_marks_run_failed(store):
    with pytest.raises(ZeroDivisionError):
        with start_or_resume_run(EXPERIMENT, run_name="fails") as run:
            _ = 1 / 0
    assert mlflow.get_run(run.info.run_id).info.status == "FAILED"


def test_nested_run_has_parent(store):
    with start_or_resume_run(EXPERIMENT, run_name="study") as parent:
        with start_or_resume_run(EXPERIMENT, run_name="trial-0", nested=True) as child:
            pass
    assert child.info.run_id != parent.info.run_id
    assert mlflow.get_run(child.info.run_id).data.tags["mlflow.parentRunId"] == parent.info.run_id


def tiny_manifest(folder: Path) -> Path:
    """Write a three-case manifest into ``folder``; return its path."""
    manifest = Manifest(
        dataset="tiny", pairing="unpaired", shape=[4, 4, 4], spacing=[1.0, 1.0, 1.0],
        preprocessing=PreprocessSettings(shape=[4, 4, 4], seed=0),
        cases=[Case(case_id=f"c{i}", split="train", image=f"images/c{i}.nii.gz",
                    image_sha256="ab" * 32) for i in range(3)])
    path = folder / "manifest.json"
    manifest.write(path)
    return path


def test_dataset_input_is_recorded(store, tmp_path):
    path = tiny_manifest(tmp_path)
    with start_or_resume_run(EXPERIMENT, run_name="dataset") as run:
        log_dataset_input(path, "tiny", "training")
    (dataset_input,) = mlflow.get_run(run.info.run_id).inputs.dataset_inputs
    assert dataset_input.dataset.name == "tiny"
    assert dataset_input.dataset.digest == hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    assert str(path.resolve()) in dataset_input.dataset.source
    assert json.loads(dataset_input.dataset.profile)["num_rows"] == 3
    assert {t.key: t.value for t in dataset_input.tags}["mlflow.data.context"] == "training"


def test_missing_manifest_is_a_clear_error(store, tmp_path):
    with start_or_resume_run(EXPERIMENT, run_name="no-manifest"):
        with pytest.raises(RegflowError, match="manifest.json: no manifest"):
            log_dataset_input(tmp_path / "manifest.json", "tiny", "training")


def test_log_figure_stores_png(store):
    figure = Figure()
    figure.subplots().plot([0, 1], [1, 0])
    with start_or_resume_run(EXPERIMENT, run_name="figure") as run:
        log_figure(figure, "overlays/pair0.png")
    artifacts = mlflow.MlflowClient().list_artifacts(run.info.run_id, "overlays")
    assert [(a.path, a.file_size > 1000) for a in artifacts] == [("overlays/pair0.png", True)]


def test_other_ranks_log_nothing(store, monkeypatch):
    experiment_id = configure_mlflow(EXPERIMENT)
    before = len(mlflow.search_runs([experiment_id]))
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert not is_rank_zero()
    with start_or_resume_run(EXPERIMENT, run_name="rank1") as run:
        assert run is None
        log_config(Config())
    assert len(mlflow.search_runs([experiment_id])) == before
    monkeypatch.setenv("RANK", "0")  # the global rank decides
    assert is_rank_zero()


def test_parallel_workers_logging_one_dataset_all_succeed(store, tmp_path):
    """The store checks for a dataset, then inserts it: racing between the two must not fail."""
    path = tiny_manifest(tmp_path)
    workers = 4
    barrier = threading.Barrier(workers)
    errors = []

    def log_from_own_run(index: int) -> None:
        try:
            with start_or_resume_run(EXPERIMENT, run_name=f"racer{index}"):
                barrier.wait()
                log_dataset_input(path, "racing", "training")
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=log_from_own_run, args=(i,)) for i in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    runs = mlflow.search_runs(experiment_names=[EXPERIMENT], output_format="list",
                              filter_string="attributes.run_name LIKE 'racer%'")
    assert len(runs) == workers
    assert all(len(run.inputs.dataset_inputs) == 1 for run in runs)
