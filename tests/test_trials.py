import hashlib
import json
import subprocess
import sys
from pathlib import Path

import mlflow
import optuna
import pytest
import torch
import yaml
from optuna.trial import TrialState

from regflow.config import load_config, load_training_config
from regflow.data.loader import build_dataloader
from regflow.data.manifest import Manifest
from regflow.engine import Trainer
from regflow.evaluation import evaluate_pairs, summarise
from regflow.inference import load_registrar
from regflow.stages import train_stage, tune_stage
from regflow.trials import TestTimeObjective, TrainingObjective
from regflow.tuning import (
    BASELINE_ATTR,
    DICE_ATTR,
    FOLDING_ATTR,
    PARENT_RUN_ATTR,
    PARETO_PICTURE,
    SDLOGJ_ATTR,
    TrialSeededSampler,
    default_storage,
    file_digest,
    study_key,
)

MANIFEST = Path("data/processed/tiny/manifest.json")
TUNING = Path("models/tuning")
CHECKPOINT = Path("models/tiny/best.pt")
TRAINING_SPACE = {
    "train.loss.regularization.bending_energy.weight": {"type": "float", "low": 0.01,
                                                        "high": 1.0, "log": True},
    "train.optimizer.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
}
TEST_TIME_SPACE = {
    "evaluate.refine.steps": {"type": "int", "low": 0, "high": 4},
    "evaluate.refine.regularization_ratio": {"type": "float", "low": 0.5, "high": 5.0,
                                             "log": True},
    "evaluate.refine.regularize": {"type": "categorical", "choices": ["field", "residual"]},
}
RESULTS = {"dice_mean", "sdlogj", "folding_pct", "trial_time_s"}


def tune_overrides(trials: int, search_space: dict, **settings) -> list[str]:
    """`-S` values for a short study (JSON is YAML)."""
    values = {"enabled": True, "trials": trials, "steps": 4, "val_every": 2,
              "max_folding_pct": 100.0, "search_space": search_space, **settings}
    return [f"tune.{key}={json.dumps(value)}" for key, value in values.items()]


@pytest.fixture
def tiny_model(tiny_project) -> Path:
    """The tiny project with a model trained by the train stage (6 steps)."""
    train_stage(load_config(tiny_project))
    return tiny_project


def study_of(config, checkpoint: Path | None = None) -> optuna.Study:
    digest = file_digest(checkpoint) if checkpoint else None
    return optuna.load_study(study_name=study_key(config, digest),
                             storage=default_storage(TUNING))


def trial_runs(parent_id: str) -> list[mlflow.entities.Run]:
    return mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")


class OptimiserSpy:
    """Counts Adam steps on network weights (nn.Parameter) and on anything else (fields)."""

    def __init__(self, monkeypatch):
        self.on_weights = 0
        self.on_fields = 0
        original = torch.optim.Adam.step

        def step(optimizer, *args, **kwargs):
            tensors = [tensor for group in optimizer.param_groups for tensor in group["params"]]
            if any(isinstance(tensor, torch.nn.Parameter) for tensor in tensors):
                self.on_weights += 1
            else:
                self.on_fields += 1
            return original(optimizer, *args, **kwargs)

        monkeypatch.setattr(torch.optim.Adam, "step", step)


def test_a_test_time_sweep_never_trains(tiny_model, monkeypatch):
    before = hashlib.sha256(CHECKPOINT.read_bytes()).hexdigest()
    spy = OptimiserSpy(monkeypatch)

    def no_training(*args, **kwargs):
        raise AssertionError("a test-time sweep trained")

    monkeypatch.setattr(Trainer, "train_step", no_training)
    config = load_config(tiny_model, tune_overrides(5, TEST_TIME_SPACE, multi_objective=True))
    best = tune_stage(config)

    assert hashlib.sha256(CHECKPOINT.read_bytes()).hexdigest() == before
    assert spy.on_weights == 0
    assert spy.on_fields > 0, "no trial refined: the spy saw nothing"
    study = study_of(config, CHECKPOINT)
    trials = study.get_trials()
    assert [trial.state for trial in trials] == [TrialState.COMPLETE] * 5
    assert set(best) == set(TEST_TIME_SPACE)
    assert trials[0].user_attrs[BASELINE_ATTR]
    assert trials[0].params["evaluate.refine.steps"] == config.evaluate.refine.steps
    assert trials[0].params["evaluate.refine.regularize"] == config.evaluate.refine.regularize
    assert yaml.safe_load((TUNING / "best_params.yaml").read_text()) == best
    merged = load_training_config(tiny_model)  # what evaluate and register then use
    assert merged.evaluate.refine.steps == best["evaluate.refine.steps"]

    # a trial's values are those of evaluating the model with its settings on the val pairs
    refined = max(trials, key=lambda trial: trial.params["evaluate.refine.steps"])
    settings = [f"{key}={value}" for key, value in refined.params.items()]
    direct_config = load_config(tiny_model, settings)
    manifest = Manifest.read(MANIFEST)
    rows = evaluate_pairs(load_registrar(str(CHECKPOINT), direct_config),
                          build_dataloader(MANIFEST, "val", direct_config, train=False),
                          manifest.voxel_size, manifest.channel_names)
    direct = summarise(rows)
    assert refined.values == [direct["dice_mean"], direct["sdlogj"]]
    assert refined.user_attrs[FOLDING_ATTR] == direct["folding_pct"]

    parent = mlflow.get_run(study.user_attrs[PARENT_RUN_ATTR])
    assert parent.data.tags["regflow.sweep"] == "test-time"
    assert parent.data.tags["regflow.model"] == str(CHECKPOINT)
    assert PARETO_PICTURE in [item.path for item in
                              mlflow.MlflowClient().list_artifacts(parent.info.run_id, "tuning")]
    runs = trial_runs(parent.info.run_id)
    assert len(runs) == 5
    for run in runs:  # the compare view: the same params and metrics on every trial
        assert set(run.data.params) == set(TEST_TIME_SPACE)
        assert set(run.data.metrics) == RESULTS
        assert run.data.tags["optuna.state"] == "COMPLETE"


def test_tune_cli_sweeps_the_model_it_is_given(tiny_model):
    elsewhere = Path("elsewhere.pt")
    CHECKPOINT.rename(elsewhere)
    overrides = tune_overrides(2, TEST_TIME_SPACE)
    command = [sys.executable, "-m", "regflow.cli", "tune"]
    for override in overrides:
        command += ["-S", override]
    missing = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2
    assert missing.stderr.strip().count("\n") == 0
    assert f"{CHECKPOINT}: no trained model to tune" in missing.stderr

    given = subprocess.run([*command, "--model", str(elsewhere)], capture_output=True, text=True,
                           timeout=300)
    assert given.returncode == 0, given.stderr[-2000:]
    config = load_config(tiny_model, overrides)
    trials = study_of(config, elsewhere).get_trials()
    assert [trial.state for trial in trials] == [TrialState.COMPLETE] * 2

    training = subprocess.run([sys.executable, "-m", "regflow.cli", "tune", "--model",
                               str(elsewhere), *sum((["-S", item] for item in tune_overrides(
                                   2, TRAINING_SPACE)), [])],
                              capture_output=True, text=True, timeout=300)
    assert training.returncode == 2
    assert "--model: a test-time sweep needs tune.search_space keys all under evaluate." in (
        training.stderr)


def test_a_study_searches_one_kind_of_key(tiny_project):
    mixed = load_config(tiny_project, tune_overrides(2, {**TRAINING_SPACE, **TEST_TIME_SPACE}))
    with pytest.raises(Exception, match=r"^tune.search_space.train.loss.regularization."
                                        r"bending_energy.weight: a study searches evaluate.\* "
                                        r"keys .* or training keys, not both$"):
        tune_stage(mixed)
    warm = load_config(tiny_project, tune_overrides(2, TEST_TIME_SPACE, init_from="x.pt"))
    with pytest.raises(Exception, match=r"^tune.init_from: a test-time sweep"):
        tune_stage(warm)


def run_twice(objective, params: dict) -> list[optuna.trial.FrozenTrial]:
    """Two trials of one in-memory study with the same params."""
    study = optuna.create_study(directions=["maximize"], sampler=TrialSeededSampler(0))
    study.enqueue_trial(params)
    study.enqueue_trial(params)
    study.optimize(objective, n_trials=2)
    return study.get_trials()


RESULT_ATTRS = (DICE_ATTR, SDLOGJ_ATTR, FOLDING_ATTR)


@pytest.mark.parametrize("warm_start", [False, True])
def test_identical_params_give_identical_training_trials(tiny_model, warm_start):
    settings = {"init_from": str(CHECKPOINT)} if warm_start else {}
    config = load_config(tiny_model, tune_overrides(2, TRAINING_SPACE, **settings))
    params = {"train.loss.regularization.bending_energy.weight": 0.3,
              "train.optimizer.lr": 0.002}
    first, second = run_twice(TrainingObjective(config, MANIFEST, TUNING), params)
    assert first.state == second.state == TrialState.COMPLETE
    assert first.value == second.value  # bit for bit: same batches, same pairs, same arithmetic
    assert first.intermediate_values == second.intermediate_values
    for key in RESULT_ATTRS:
        assert first.user_attrs[key] == second.user_attrs[key]
    if warm_start:  # fine-tuned from the trained model: not the from-scratch result
        cold = load_config(tiny_model, tune_overrides(2, TRAINING_SPACE))
        [scratch, _] = run_twice(TrainingObjective(cold, MANIFEST, TUNING), params)
        assert scratch.value != first.value


def test_identical_params_give_identical_test_time_trials(tiny_model):
    config = load_config(tiny_model, tune_overrides(2, TEST_TIME_SPACE))
    objective = TestTimeObjective(config, MANIFEST, CHECKPOINT, str(CHECKPOINT))
    params = {"evaluate.refine.steps": 3, "evaluate.refine.regularization_ratio": 1.0,
              "evaluate.refine.regularize": "residual"}
    first, second = run_twice(objective, params)
    assert first.value == second.value
    for key in RESULT_ATTRS:
        assert first.user_attrs[key] == second.user_attrs[key]
