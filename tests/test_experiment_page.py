"""The MLflow UI page of a regflow experiment: tags set through a real SQLite store."""

import hashlib
import json
import subprocess
import urllib.request

import mlflow
import pytest

from regflow import experiment_page
from regflow.experiment_page import KIND_TAG, NOTE_DIGEST_TAG, NOTE_TAG, VIEW_TAG
from regflow.tracking import configure_mlflow
from tests.scaleout.conftest import free_port, project_env, stop_process_group, wait_for_http
from tests.synthetic import write_params


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A fresh store at a repository root given by $DVC_ROOT."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    yield tmp_path
    mlflow.set_tracking_uri(None)


def test_new_experiment_is_model_training_with_description_and_runs_view(store):
    experiment = mlflow.get_experiment(configure_mlflow("regflow-msd-hippocampus"))
    tags = experiment.tags
    assert tags[KIND_TAG] == "custom_model_development"
    note = tags[NOTE_TAG]
    assert note.startswith("**regflow registration runs on `msd-hippocampus`**")
    for metric in ("eval/dice_mean", "eval/sdlogj", "eval/folding_pct", "eval/time_ms_per_pair"):
        assert f"`{metric}`" in note, metric
    view = json.loads(tags[VIEW_TAG])
    assert view["selectedColumns"] == [
        "metrics.`eval/dice_mean`", "metrics.`eval/sdlogj`", "metrics.`eval/folding_pct`",
        "metrics.`eval/time_ms_per_pair`", "metrics.`eval/hd95_mean`", "metrics.`val/dice_mean`"]
    assert (view["orderByKey"], view["orderByAsc"]) == ("metrics.`eval/dice_mean`", False)


def test_existing_experiment_gets_the_tags_and_keeps_its_own_description(store):
    configure_mlflow("warm-up")  # points MLflow at the store
    bare = mlflow.create_experiment("regflow-old")
    assert NOTE_TAG not in mlflow.get_experiment(bare).tags
    assert configure_mlflow("regflow-old") == bare
    assert "`old`" in mlflow.get_experiment(bare).tags[NOTE_TAG]

    client = mlflow.MlflowClient()
    client.set_experiment_tag(bare, NOTE_TAG, "my notes")
    client.set_experiment_tag(bare, KIND_TAG, "genai_development")
    configure_mlflow("regflow-old")
    tags = mlflow.get_experiment(bare).tags
    assert tags[NOTE_TAG] == "my notes"
    assert tags[KIND_TAG] == "custom_model_development"


def test_tags_to_set_leave_out_what_is_already_there():
    written = experiment_page.experiment_tags("regflow-x", {})
    assert set(written) == {KIND_TAG, VIEW_TAG, NOTE_TAG, NOTE_DIGEST_TAG}
    assert experiment_page.experiment_tags("regflow-x", written) == {}
    assert experiment_page.experiment_tags("regflow-x", {**written, NOTE_TAG: "edited"}) == {}
    assert set(experiment_page.experiment_tags("regflow-x", {NOTE_TAG: "  "})) == {
        KIND_TAG, VIEW_TAG, NOTE_TAG, NOTE_DIGEST_TAG}


def test_a_description_regflow_wrote_follows_its_current_text():
    old_text = "**regflow registration runs on `x`** (an older release's words)"
    current = {NOTE_TAG: old_text, NOTE_DIGEST_TAG: hashlib.sha256(old_text.encode()).hexdigest()}
    assert experiment_page.experiment_tags("regflow-x", current)[NOTE_TAG] == (
        experiment_page.description("regflow-x"))


def test_link_opens_the_training_view_with_the_runs_view():
    assert experiment_page.experiment_link("http://127.0.0.1:5000/", "7") == (
        "http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning"
        "&viewStateShareKey=regflow")


@pytest.mark.slow
def test_regflow_ui_prints_the_link_and_serves_the_experiment(tmp_path):
    """`regflow ui` on a fresh project store: the link it prints names the experiment that the
    started MLflow UI serves, with regflow's tags."""
    params = write_params(tmp_path, tmp_path / "raw")
    port = free_port()
    log = tmp_path / "ui.log"
    env = project_env(DVC_ROOT=str(tmp_path))
    with open(log, "wb") as handle:
        process = subprocess.Popen(["regflow", "ui", "-c", str(params), "--port", str(port)],
                                   cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=handle,
                                   start_new_session=True)
    try:
        link = process.stdout.readline().decode().strip()
        base = f"http://127.0.0.1:{port}"
        wait_for_http(f"{base}/health", process, log, 180)
        experiment_id = link.split("/#/experiments/")[1].split("/")[0]
        assert link == experiment_page.experiment_link(base, experiment_id)
        with urllib.request.urlopen(f"{base}/ajax-api/2.0/mlflow/experiments/get?"
                                    f"experiment_id={experiment_id}", timeout=30) as answer:
            experiment = json.load(answer)["experiment"]
        assert experiment["name"] == "regflow-tiny"
        tags = {tag["key"]: tag["value"] for tag in experiment["tags"]}
        assert tags[KIND_TAG] == "custom_model_development"
        assert json.loads(tags[VIEW_TAG]) == json.loads(experiment_page.runs_view())
    finally:
        stop_process_group(process)
        process.stdout.close()
