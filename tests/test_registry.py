import json
import logging
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.store.artifact.utils.models import get_model_name_and_version

from regflow import tracking
from regflow.config import load_config
from regflow.data.fetch import fetch_dataset
from regflow.data.preprocess import preprocess_dataset
from regflow.engine import Trainer
from regflow.errors import RegflowError
from regflow.registry import (
    CHALLENGER,
    CHAMPION,
    DECISION_TAG,
    create_version,
    is_evaluated,
    pip_requirements,
    reconcile,
    should_promote,
)
from regflow.serving.codec import decode_volume
from regflow.serving.model import RegflowPythonModel, input_example
from regflow.stages import evaluate_stage, register_stage
from tests.synthetic import write_params, write_unpaired_dataset

DVC_LOCK = """\
schema: '2.0'
stages:
  train:
    cmd: regflow train
    deps:
    - path: data/processed/tiny
      md5: 0123456789abcdef.dir
    - path: regflow/engine.py
      md5: fedcba9876543210
"""


def test_first_model_is_promoted():
    assert should_promote({"dice_mean": 0.1, "folding_pct": 0.0}, None, 1.0) == (
        True, "no champion yet")
    assert should_promote({"dice_mean": 0.1}, {}, 1.0)[0]


def test_worse_dice_is_not_promoted():
    promote, reason = should_promote({"dice_mean": 0.70, "folding_pct": 0.1},
                                     {"dice_mean": 0.75}, 1.0)
    assert not promote
    assert reason == "Dice 0.7000 below the champion's 0.7500"


def test_folding_above_the_limit_is_not_promoted_even_with_better_dice():
    promote, reason = should_promote({"dice_mean": 0.90, "folding_pct": 1.5},
                                     {"dice_mean": 0.75}, 1.0)
    assert not promote
    assert reason == "folding 1.500% above the 1.0% limit"
    assert not should_promote({"dice_mean": 0.9, "folding_pct": 1.5}, None, 1.0)[0]
    assert should_promote({"dice_mean": 0.9, "folding_pct": 1.0}, {"dice_mean": 0.75}, 1.0)[0]


def test_equal_dice_is_promoted():
    promote, reason = should_promote({"dice_mean": 0.75, "folding_pct": 0.0},
                                     {"dice_mean": 0.75}, 1.0)
    assert promote
    assert reason == "Dice 0.7500 not below the champion's 0.7500"


def test_candidate_without_dice_does_not_replace_a_champion():
    assert not should_promote({"folding_pct": 0.0}, {"dice_mean": 0.2}, 1.0)[0]


def test_pip_requirements_take_the_lock_file_pins(tmp_path):
    lock = tmp_path / "requirements.lock"
    lock.write_text("Torch==2.13.0\nnumpy==2.3.1\n# comment\nMLflow==3.17.2\n")
    requirements = pip_requirements(lock)
    assert requirements[:3] == ["Torch==2.13.0", "numpy==2.3.1", "scipy"]
    assert "MLflow==3.17.2" in requirements
    assert pip_requirements(tmp_path / "absent.lock")[0] == "torch"


def test_register_without_a_trained_model_is_one_line(tiny_project):
    config = load_config(tiny_project)
    with pytest.raises(RegflowError, match=r"models/tiny/best.pt: no trained model"):
        register_stage(config)


def test_register_without_an_evaluation_is_one_line(tiny_project):
    config = load_config(tiny_project)
    Path("models/tiny").mkdir(parents=True)
    Path("models/tiny/best.pt").write_bytes(b"")
    Path("metrics").mkdir()
    Path("metrics/eval.json").write_text('{"folding_pct": 0.0}')
    with pytest.raises(RegflowError, match=r"metrics/eval.json: no dice_mean; run `regflow "
                                           r"evaluate` first"):
        register_stage(config)


def register_with(config, metrics: dict[str, float]) -> dict:
    Path("metrics").mkdir(exist_ok=True)
    Path("metrics/eval.json").write_text(json.dumps(metrics))
    decision = register_stage(config)
    assert json.loads(Path("models/registered.json").read_text()) == decision
    return decision


def aliases(name: str) -> dict[str, str]:
    model = mlflow.MlflowClient().get_registered_model(name)
    return {alias: str(version) for alias, version in model.aliases.items()}


def test_register_gates_champion_on_evaluation_metrics(tiny_project):
    name = f"regflow-test-{uuid.uuid4().hex[:8]}"
    config = load_config(tiny_project, [f"registry.model_name={name}", "train.steps=2",
                                        "train.val_every=2", "evaluate.hd95=false",
                                        "evaluate.save_volumes=false"])
    Path("dvc.lock").write_text(DVC_LOCK)
    result = Trainer(config, Path("data/processed/tiny/manifest.json"), Path("models/tiny")).fit()
    headline = evaluate_stage(config)
    client = mlflow.MlflowClient()

    first = register_stage(config)
    assert json.loads(Path("models/registered.json").read_text()) == first
    assert (first["version"], first["champion"], first["reason"]) == ("1", True,
                                                                     "no champion yet")
    assert first["run_id"] == result.run_id
    assert first["model_uri"] == f"models:/{name}/1"
    assert aliases(name) == {"champion": "1", "challenger": "1"}
    tags = client.get_model_version(name, "1").tags
    assert float(tags["eval.dice_mean"]) == pytest.approx(headline["dice_mean"])
    assert float(tags["eval.folding_pct"]) == pytest.approx(headline["folding_pct"])
    assert tags["run_id"] == result.run_id
    assert tags["data.md5.data/processed/tiny"] == "0123456789abcdef.dir"
    for key, value in tracking.run_tags().items():  # git tags too, when inside a repository
        assert tags[key] == value
    assert tags["regflow.decision"] == "promoted: no champion yet"
    assert client.get_model_version(name, "1").run_id == result.run_id

    worse = register_with(config, {**headline, "dice_mean": headline["dice_mean"] - 0.1})
    assert (worse["version"], worse["champion"], worse["champion_before"]) == ("2", False, "1")
    assert worse["reason"] == (f"Dice {headline['dice_mean'] - 0.1:.4f} below the champion's "
                               f"{headline['dice_mean']:.4f}")
    assert aliases(name) == {"champion": "1", "challenger": "2"}
    assert client.get_model_version(name, "2").tags["regflow.decision"].startswith(
        "kept champion: Dice")

    folded = register_with(config, {**headline, "dice_mean": headline["dice_mean"] + 0.2,
                                    "folding_pct": 3.0})
    assert (folded["version"], folded["champion"]) == ("3", False)
    assert folded["reason"] == "folding 3.000% above the 1.0% limit"
    assert aliases(name) == {"champion": "1", "challenger": "3"}

    better = register_with(config, {**headline, "dice_mean": headline["dice_mean"] + 0.05,
                                    "folding_pct": 0.0})
    assert (better["version"], better["champion"], better["champion_before"]) == ("4", True, "1")
    assert aliases(name) == {"champion": "4", "challenger": "4"}
    assert float(client.get_model_version(name, "4").tags["eval.dice_mean"]) == pytest.approx(
        headline["dice_mean"] + 0.05)

    served = mlflow.pyfunc.load_model(f"models:/{name}@champion")  # the input example's form
    answer = served.predict(input_example((9, 11, 8)))
    assert sorted(answer) == ["ddf", "warped"]
    ddf, affine, encoding = decode_volume(answer["ddf"][0], "ddf", channels=True)
    warped, _, _ = decode_volume(answer["warped"][0], "warped")
    assert (ddf.shape, warped.shape, encoding) == ((3, 9, 11, 8), (9, 11, 8), "nii.gz")
    np.testing.assert_allclose(affine, np.eye(4))
    assert np.isfinite(ddf).all()


HEADLINE = {"dice_mean": 0.6, "folding_pct": 0.0}


def trained_project(tiny_project) -> tuple[str, list[str]]:
    """Train the tiny model for 2 steps and write its evaluation; (model name, overrides)."""
    name = f"regflow-test-{uuid.uuid4().hex[:8]}"
    overrides = [f"registry.model_name={name}", "train.steps=2", "train.val_every=2"]
    config = load_config(tiny_project, overrides)
    Trainer(config, Path("data/processed/tiny/manifest.json"), Path("models/tiny")).fit()
    Path("metrics").mkdir(exist_ok=True)
    Path("metrics/eval.json").write_text(json.dumps(HEADLINE))
    return name, overrides


def latest_version(name: str) -> str:
    """The version ``models:/<name>/latest`` resolves to, as MLflow resolves it."""
    return get_model_name_and_version(mlflow.MlflowClient(), f"models:/{name}/latest")[1]


def test_the_served_model_code_imports_without_warnings():
    result = subprocess.run([sys.executable, "-W", "default", "-c",
                             "import regflow.serving.pyfunc_model"],
                            capture_output=True, text=True, timeout=120, check=False)
    assert (result.returncode, result.stderr) == (0, "")


@pytest.mark.slow
def test_register_prints_no_warning_and_never_shows_an_unevaluated_version(tiny_project,
                                                                           tmp_path):
    name, overrides = trained_project(tiny_project)
    log = tmp_path / "register.log"
    command = [sys.executable, "-c", "from regflow.cli import main; main()", "register",
               "-c", str(tiny_project), *[item for key in overrides for item in ("-S", key)]]
    client = mlflow.MlflowClient()
    first_sight = {}
    with open(log, "w") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT,
                                   env=os.environ.copy())
        while process.poll() is None:  # every version, the moment it becomes visible
            for version in client.search_model_versions(f"name = '{name}'"):
                first_sight.setdefault(str(version.version), is_evaluated(version))
            time.sleep(0.02)
    text = log.read_text()
    assert process.returncode == 0, text
    assert "warning" not in text.lower(), text
    assert text.strip().splitlines()[-1].startswith(f"{name} version 1 is now @champion")
    assert first_sight == {"1": True}
    assert aliases(name) == {CHAMPION: "1", CHALLENGER: "1"}


def test_next_register_deletes_an_orphan_and_finishes_an_interrupted_one(tiny_project, recwarn,
                                                                         caplog):
    name, overrides = trained_project(tiny_project)
    config = load_config(tiny_project, overrides)
    client = mlflow.MlflowClient()
    recwarn.clear()
    caplog.clear()
    first = register_stage(config)
    assert [str(w.message) for w in recwarn
            if not issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning))] == []
    assert [record.getMessage() for record in caplog.records
            if record.levelno >= logging.WARNING] == []
    assert (first["version"], first["reconciled"]) == ("1", [])
    model_id = client.get_model_version(name, "1").source.removeprefix("models:/")
    run_id = first["run_id"]

    # A crash of a register that created the version first and tagged it afterwards:
    orphan = client.create_model_version(name, source=f"models:/{model_id}", run_id=run_id)
    assert (orphan.version, orphan.tags) == (2, {})
    assert latest_version(name) == "2"  # the hazard: latest names an unevaluated model
    assert reconcile(client, name) == ["2"]
    assert latest_version(name) == "1"
    assert [str(v.version) for v in client.search_model_versions(f"name = '{name}'")] == ["1"]

    # A crash after the version (with its tags) but before the aliases: the next run sets them.
    interrupted = create_version(client, name, model_id, run_id, {
        "eval.dice_mean": "0.7", DECISION_TAG: "promoted: Dice 0.7000 not below the champion's"})
    assert interrupted == "3"
    assert aliases(name) == {CHAMPION: "1", CHALLENGER: "1"}
    assert reconcile(client, name) == []
    assert aliases(name) == {CHAMPION: "3", CHALLENGER: "3"}

    # A champion rolled back by hand stays where it was put.
    client.set_registered_model_alias(name, CHAMPION, "1")
    assert reconcile(client, name) == []
    assert aliases(name) == {CHAMPION: "1", CHALLENGER: "3"}
    client.set_registered_model_alias(name, CHAMPION, "3")

    # An interrupted registration that kept the champion only becomes the challenger.
    kept = create_version(client, name, model_id, run_id, {
        "eval.dice_mean": "0.1", DECISION_TAG: "kept champion: Dice 0.1000 below ..."})
    orphan = client.create_model_version(name, source=f"models:/{model_id}", run_id=run_id)
    second = register_stage(config)  # reconciles first: deletes 5, sets @challenger on 4
    assert second["reconciled"] == [str(orphan.version)] == ["5"]
    assert kept == "4"
    assert (second["version"], second["champion"], second["champion_before"]) == ("6", False, "3")
    assert aliases(name) == {CHAMPION: "3", CHALLENGER: "6"}
    versions = client.search_model_versions(f"name = '{name}'")
    assert sorted(int(v.version) for v in versions) == [1, 3, 4, 6]
    assert all(is_evaluated(version) for version in versions)
    assert latest_version(name) == "6"
    latest = client.get_model_version(name, "6")
    assert latest.tags["eval.dice_mean"] == str(HEADLINE["dice_mean"])
    assert latest.tags[DECISION_TAG] == "kept champion: Dice 0.6000 below the champion's 0.7000"
    for key, value in tracking.run_tags().items():
        assert latest.tags[key] == value



@pytest.mark.slow
def test_fine_tuning_from_the_registered_champion_beats_training_from_scratch(
        tiny_project, tmp_path, monkeypatch):
    """train.init_from=models:/<name>@champion on a fresh dataset, against the same steps from
    scratch (validation Dice after 10 steps; measured 0.60 against 0.41 on this synthetic data)."""
    name = f"regflow-test-{uuid.uuid4().hex[:8]}"
    source = load_config(tiny_project, [f"registry.model_name={name}", "train.steps=60",
                                        "train.val_every=60", "evaluate.hd95=false",
                                        "evaluate.save_volumes=false",
                                        "registry.max_folding_pct=100"])  # not the gate's test
    Trainer(source, Path("data/processed/tiny/manifest.json"), Path("models/tiny")).fit()
    evaluate_stage(source)
    decision = register_stage(source)
    assert decision["champion"], decision["reason"]

    fresh = tmp_path / "fresh"
    fresh.mkdir()
    params = write_params(fresh, write_unpaired_dataset(tmp_path / "fresh-raw", seed=1))
    monkeypatch.chdir(fresh)
    config = load_config(params, ["train.steps=10", "train.val_every=10"])
    fetch_dataset("tiny", config)
    preprocess_dataset("tiny", config)
    manifest = Path("data/processed/tiny/manifest.json")
    scratch = Trainer(config, manifest, Path("models/scratch")).fit()
    tuned_config = load_config(params, ["train.steps=10", "train.val_every=10",
                                        f"train.init_from=models:/{name}@champion"])
    tuned = Trainer(tuned_config, manifest, Path("models/tuned")).fit()
    print(f"\nvalidation Dice after 10 steps: from scratch {scratch.best_score:.3f}, "
          f"fine-tuned from the champion {tuned.best_score:.3f}")
    assert tuned.best_score > scratch.best_score + 0.1


def test_init_from_a_different_network_is_one_line(tiny_project):
    config = load_config(tiny_project, ["train.steps=1", "train.val_every=1"])
    Trainer(config, Path("data/processed/tiny/manifest.json"), Path("models/tiny")).fit()
    wider = load_config(tiny_project, ["train.steps=1", "train.model.backbone.channels=[8, 16]",
                                       "train.init_from=models/tiny/best.pt"])
    with pytest.raises(RegflowError, match=r"^train.init_from models/tiny/best.pt: its network "
                                           r"does not match train.model \("):
        Trainer(wider, Path("data/processed/tiny/manifest.json"), Path("models/wider")).fit()


def test_a_model_registered_before_the_serving_package_finds_its_class():
    # A model logged before regflow/serving/ existed carries the old pyfunc_model.py, which runs
    # this import when MLflow loads it.
    from regflow.serving import RegflowPythonModel as OldPath

    assert OldPath is RegflowPythonModel
