import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import optuna
import pytest
import yaml
from optuna.trial import TrialState
from sqlalchemy.engine import make_url

from regflow.config import load_config, load_training_config
from regflow.errors import ConfigError
from regflow.stages import tune_stage
from regflow.tuning import (
    DICE_ATTR,
    FOLDING_ATTR,
    PARENT_RUN_ATTR,
    PARETO_PICTURE,
    SDLOGJ_ATTR,
    STORAGE_PASSWORD_ENV,
    STORAGE_PASSWORD_FILE_ENV,
    SURPLUS_ATTR,
    TrialSeededSampler,
    baseline_values,
    best_trial,
    best_values,
    build_pruner,
    build_storage,
    connection_url,
    default_storage,
    is_surplus,
    open_study,
    study_key,
    study_tags,
)

MANIFEST = Path("data/processed/tiny/manifest.json")
TUNING = Path("models/tuning")
SEARCH = {
    "train.loss.regularization.bending_energy.weight": {"type": "float", "low": 0.01,
                                                        "high": 1.0, "log": True},
    "train.loss.label.dice.weight": {"type": "float", "low": 0.5, "high": 2.0},
    "train.optimizer.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
}
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED)


def tune_overrides(trials: int, **settings) -> list[str]:
    """`-S` values for a short study over SEARCH (JSON is YAML)."""
    values = {"enabled": True, "trials": trials, "steps": 4, "val_every": 2,
              "max_folding_pct": 100.0, "search_space": SEARCH, **settings}
    return [f"tune.{key}={json.dumps(value)}" for key, value in values.items()]


def tune_command(overrides: list[str]) -> list[str]:
    command = [sys.executable, "-m", "regflow.cli", "tune"]
    for override in overrides:
        command += ["-S", override]
    return command


def load_study(config) -> optuna.Study:
    return optuna.load_study(study_name=study_key(config), storage=default_storage(TUNING))


def parent_runs() -> list[mlflow.entities.Run]:
    """Parent runs of this test's study (its storage URL is unique to the test's folder)."""
    return mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string=f"tags.`optuna.storage` = '{default_storage(TUNING)}'")


def child_runs(parent_id: str) -> list[mlflow.entities.Run]:
    return mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")


def params_key(trial: optuna.trial.FrozenTrial) -> tuple:
    return tuple(sorted(trial.params.items()))


def test_study_logs_parent_and_nested_trial_runs(tiny_project):
    config = load_config(tiny_project, tune_overrides(3))
    best = tune_stage(config)

    study = load_study(config)
    trials = study.get_trials()
    assert len(trials) == 3 and all(trial.state in COUNTED for trial in trials)
    for trial in trials:
        if trial.state == TrialState.COMPLETE:
            folding = trial.user_attrs[FOLDING_ATTR]
            assert trial.constraints == {FOLDING_ATTR: pytest.approx(folding - 100.0)}
    completed = [trial for trial in trials if trial.state == TrialState.COMPLETE]
    winner = max(completed, key=lambda trial: trial.value)
    assert best == winner.params
    assert yaml.safe_load((TUNING / "best_params.yaml").read_text()) == winner.params
    assert set(best) == set(SEARCH)

    [parent] = parent_runs()
    assert parent.info.run_id == study.user_attrs[PARENT_RUN_ATTR]
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["best_dice"] == pytest.approx(winner.value)
    assert parent.data.metrics["best_trial"] == winner.number
    for key, value in winner.params.items():
        assert float(parent.data.tags[f"best.{key}"]) == value
    pictures = [item.path for item in
                mlflow.MlflowClient().list_artifacts(parent.info.run_id, "tuning")]
    assert "tuning/optimization_history.png" in pictures
    assert "tuning/param_importances.png" in pictures

    children = {int(run.data.tags["optuna.trial_number"]): run
                for run in child_runs(parent.info.run_id)}
    assert sorted(children) == [trial.number for trial in trials]
    client = mlflow.MlflowClient()
    for trial in trials:
        run = children[trial.number]
        assert run.data.tags["optuna.state"] == trial.state.name
        assert run.info.status == "FINISHED"
        for key, value in trial.params.items():
            assert float(run.data.params[key]) == value
        history = client.get_metric_history(run.info.run_id, "val/dice_mean")
        expected = [2, 4] if trial.state == TrialState.COMPLETE else [2]
        assert [point.step for point in history] == expected
        assert [point.value for point in history] == pytest.approx(
            [trial.intermediate_values[step] for step in expected])

    merged = load_training_config(tiny_project)
    assert merged.train.optimizer.lr == best["train.optimizer.lr"]
    assert merged.train.loss.label["dice"].weight == best["train.loss.label.dice.weight"]
    assert (merged.train.loss.regularization["bending_energy"].weight
            == best["train.loss.regularization.bending_energy.weight"])


def test_multi_objective_takes_best_dice_from_pareto_front(tiny_project):
    config = load_config(tiny_project, tune_overrides(2, multi_objective=True))
    best = tune_stage(config)
    study = load_study(config)
    assert isinstance(open_study(config, build_storage(default_storage(TUNING), 10))[0].pruner,
                      optuna.pruners.NopPruner)
    trials = study.get_trials()
    assert [trial.state for trial in trials] == [TrialState.COMPLETE] * 2
    for trial in trials:
        assert trial.values == [trial.user_attrs[DICE_ATTR], trial.user_attrs[SDLOGJ_ATTR]]
        assert trial.constraints == {FOLDING_ATTR: pytest.approx(
            trial.user_attrs[FOLDING_ATTR] - 100.0)}
        assert trial.intermediate_values == {}
    winner = max(study.best_trials, key=lambda trial: trial.values[0])
    assert best == winner.params
    assert yaml.safe_load((TUNING / "best_params.yaml").read_text()) == winner.params
    [parent] = parent_runs()
    pictures = [item.path for item in
                mlflow.MlflowClient().list_artifacts(parent.info.run_id, "tuning")]
    assert PARETO_PICTURE in pictures


@pytest.mark.parametrize("override", ["tune.enabled=false", "tune.trials=0"])
def test_disabled_tuning_writes_empty_best_params(tiny_project, override):
    config = load_config(tiny_project, [*tune_overrides(3), override])
    assert tune_stage(config) == {}
    assert (TUNING / "best_params.yaml").read_text() == "{}\n"
    assert not (TUNING / "optuna.db").exists()
    assert load_training_config(tiny_project) == load_config(tiny_project)


def test_search_key_that_is_not_a_params_key_is_one_line_exit_2(tiny_project):
    result = subprocess.run(tune_command([
        *tune_overrides(2), "tune.search_space.not.a.key.type=float",
        "tune.search_space.not.a.key.low=0.1", "tune.search_space.not.a.key.high=1"]),
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "tune.search_space.not.a.key: not a valid params key" in result.stderr


SECRET_STORAGE = "postgresql+nosuchdriver://optuna:secret@db.invalid:5432/optuna"


def test_storage_with_a_password_is_masked_in_tags_and_errors():
    assert study_tags("regflow-1a2b3c4d", SECRET_STORAGE) == {
        "optuna.study": "regflow-1a2b3c4d",
        "optuna.storage": "postgresql+nosuchdriver://optuna:***@db.invalid:5432/optuna"}
    with pytest.raises(ConfigError) as error:  # no such driver: fails before any connection
        build_storage(SECRET_STORAGE, 10)
    assert str(error.value) == ("tune.storage: not a usable storage URL: "
                                "postgresql+nosuchdriver://optuna:***@db.invalid:5432/optuna")


def test_cli_tune_never_prints_the_storage_password(tiny_project):
    result = subprocess.run(tune_command([*tune_overrides(2), f"tune.storage={SECRET_STORAGE}"]),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "optuna:***@db.invalid" in result.stderr
    assert "secret" not in result.stderr + result.stdout


@pytest.fixture
def no_storage_password(monkeypatch):
    monkeypatch.delenv(STORAGE_PASSWORD_ENV, raising=False)
    monkeypatch.delenv(STORAGE_PASSWORD_FILE_ENV, raising=False)
    return monkeypatch


def test_storage_password_comes_from_the_environment(no_storage_password, tmp_path):
    url = "postgresql://optuna@db:5432/optuna"
    assert connection_url(url) == url
    secret_file = tmp_path / "storage_password"
    secret_file.write_text("from:file\n")
    no_storage_password.setenv(STORAGE_PASSWORD_FILE_ENV, str(secret_file))
    assert connection_url(url) == "postgresql://optuna:from%3Afile@db:5432/optuna"
    no_storage_password.setenv(STORAGE_PASSWORD_ENV, "p@ss/w:rd %")  # the variable wins
    with_password = connection_url(url)
    assert with_password == "postgresql://optuna:p%40ss%2Fw%3Ard%20%25@db:5432/optuna"
    assert make_url(with_password).password == "p@ss/w:rd %"  # what SQLAlchemy connects with
    assert connection_url("postgresql://optuna:inline@db/optuna") == (
        "postgresql://optuna:inline@db/optuna")
    assert connection_url("sqlite:////abs/optuna.db") == "sqlite:////abs/optuna.db"


def test_storage_password_problems_are_config_errors(no_storage_password, tmp_path):
    no_storage_password.setenv(STORAGE_PASSWORD_FILE_ENV, str(tmp_path / "absent"))
    with pytest.raises(ConfigError, match=rf"^{STORAGE_PASSWORD_FILE_ENV}: cannot read .*absent"
                                          r" \(No such file or directory\)$"):
        connection_url("postgresql://optuna@db/optuna")
    no_storage_password.setenv(STORAGE_PASSWORD_ENV, "secret")
    with pytest.raises(ConfigError, match=r"^tune.storage: a password is set in the environment "
                                          r"but postgresql://db/optuna names no user"):
        connection_url("postgresql://db/optuna")


def in_memory_study(directions: list[str]) -> optuna.Study:
    return optuna.create_study(directions=directions, sampler=TrialSeededSampler(0))


def finished_trial(values: list[float], folding: float, x: float) -> optuna.trial.FrozenTrial:
    return optuna.trial.create_trial(
        values=values, params={"x": x},
        distributions={"x": optuna.distributions.FloatDistribution(0, 1)},
        user_attrs={FOLDING_ATTR: folding})


def test_best_values_skip_trials_that_fold_too_much(tiny_project):
    config = load_config(tiny_project, tune_overrides(3, max_folding_pct=1.0))
    study = in_memory_study(["maximize"])
    for dice, folding, x in ((0.9, 5.0, 0.1), (0.7, 0.5, 0.2), (0.6, 0.0, 0.3)):
        study.add_trial(finished_trial([dice], folding, x))
    assert best_values(study, config) == ({"x": 0.2}, {
        "best_dice": 0.7, "best_sdlogj": 0.0, "best_folding_pct": 0.5, "best_trial": 1.0})


def test_the_rule_picks_the_best_feasible_trial_of_a_hand_made_front(tiny_project):
    multi = load_config(tiny_project, tune_overrides(3, multi_objective=True,
                                                      max_folding_pct=0.5, max_sdlogj=0.10))
    front = in_memory_study(["maximize", "minimize"])
    #        Dice  SDlogJ folding x      what it tests
    rows = ((0.86, 0.090, 0.90, 0.1),  # best Dice, smooth, but folds above the limit
            (0.85, 0.120, 0.10, 0.2),  # second best Dice, too rough
            (0.83, 0.099, 0.30, 0.3),  # tied best feasible Dice, rougher
            (0.83, 0.095, 0.40, 0.4),  # tied best feasible Dice, smoother: the pick
            (0.80, 0.070, 0.00, 0.5),  # feasible, smoothest, lower Dice
            (0.84, 0.100, 0.50, 0.6))  # exactly on both limits: feasible, best Dice
    for dice, sdlogj, folding, x in rows:
        front.add_trial(optuna.trial.create_trial(
            values=[dice, sdlogj], params={"x": x},
            distributions={"x": optuna.distributions.FloatDistribution(0, 1)},
            user_attrs={DICE_ATTR: dice, SDLOGJ_ATTR: sdlogj, FOLDING_ATTR: folding}))
    assert best_values(front, multi) == ({"x": 0.6}, {
        "best_dice": 0.84, "best_sdlogj": 0.10, "best_folding_pct": 0.5, "best_trial": 5.0})
    front.add_trial(optuna.trial.create_trial(state=TrialState.PRUNED))
    without_last = in_memory_study(["maximize", "minimize"])
    for trial in front.get_trials()[:5]:
        without_last.add_trial(trial)
    assert best_trial(without_last, multi).number == 3  # the tie goes to the smoother trial
    strict = multi.model_copy(update={"tune": multi.tune.model_copy(update={
        "max_sdlogj": 0.05})})
    assert best_values(front, strict) == ({}, {})


def test_sampler_draws_depend_on_trial_number_only():
    def draws(study: optuna.Study, count: int) -> list[float]:
        return [study.ask().suggest_float("x", 0, 1) for _ in range(count)]

    first = draws(in_memory_study(["maximize"]), 3)
    assert len(set(first)) == 3
    resumed = in_memory_study(["maximize"])
    resumed.enqueue_trial({"x": 0.5})
    assert draws(resumed, 3)[1:] == first[1:]


def test_a_trial_beyond_the_budget_is_surplus():
    study = in_memory_study(["maximize"])
    study.add_trial(finished_trial([0.5], 0.0, 0.1))
    study.add_trial(optuna.trial.create_trial(state=TrialState.FAIL))
    running = study.ask()
    assert not is_surplus(study, running, 2)
    late = study.ask()
    assert is_surplus(study, late, 2)
    assert not is_surplus(study, late, 3)


def test_study_key_follows_what_trials_depend_on(tiny_project):
    base = study_key(load_config(tiny_project, tune_overrides(3)))
    assert base.startswith("regflow-")
    same = load_config(tiny_project, tune_overrides(8, heartbeat_s=2))
    assert study_key(same) == base
    for changed in (["train.loss.image.lncc.weight=0.5"], ["seed=2"],
                    tune_overrides(3, steps=6)):
        assert study_key(load_config(tiny_project, [*tune_overrides(3), *changed])) != base


def storage_trials(url: str, name: str) -> list[optuna.trial.FrozenTrial]:
    """The study's trials, or none while the worker has not created it (this reader never
    creates tables: it must not race the worker doing so)."""
    try:
        storage = optuna.storages.RDBStorage(url, skip_table_creation=True)
        return optuna.load_study(study_name=name, storage=storage).get_trials()
    except Exception:  # no database, tables or study yet
        return []


@pytest.mark.slow
def test_killed_worker_resumes_without_repeating_finished_trials(tiny_project):
    overrides = tune_overrides(4, steps=6, heartbeat_s=2)
    name = study_key(load_config(tiny_project, overrides))
    command = tune_command(overrides)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    worker = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    url = default_storage(TUNING)
    killed = None
    deadline = time.monotonic() + 240
    while killed is None and time.monotonic() < deadline and worker.poll() is None:
        trials = storage_trials(url, name)
        running = [trial for trial in trials if trial.state == TrialState.RUNNING
                   and trial.intermediate_values]
        if running and any(trial.state == TrialState.COMPLETE for trial in trials):
            worker.send_signal(signal.SIGKILL)
            killed = running[0]
        time.sleep(0.05)
    worker.wait()
    assert killed is not None, "no validated RUNNING trial after a COMPLETE one"
    before = {trial.number: trial for trial in storage_trials(url, name)}
    finished_before = [trial for trial in before.values() if trial.state in COUNTED]
    parent_id = load_study(load_config(tiny_project, overrides)).user_attrs[PARENT_RUN_ATTR]

    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]

    study = load_study(load_config(tiny_project, overrides))
    trials = study.get_trials()
    counted = [trial for trial in trials if trial.state in COUNTED]
    assert len(counted) == 4
    assert len({params_key(trial) for trial in counted}) == 4, "a finished trial was repeated"
    for trial in finished_before:
        assert trials[trial.number].state == trial.state
        assert trials[trial.number].params == trial.params
    assert trials[killed.number].state == TrialState.FAIL
    [retry] = [trial for trial in counted if trial.system_attrs.get("failed_trial")
               == killed.number]
    assert retry.params == killed.params
    assert retry.number > max(before)

    assert study.user_attrs[PARENT_RUN_ATTR] == parent_id
    assert [run.info.run_id for run in parent_runs()] == [parent_id]
    children = {int(run.data.tags["optuna.trial_number"]): run
                for run in child_runs(parent_id)}
    assert children[killed.number].info.status == "FAILED"
    assert children[killed.number].data.tags["optuna.state"] == "FAIL"
    for trial in counted:
        assert children[trial.number].data.tags["optuna.state"] == trial.state.name


@pytest.mark.slow
def test_two_workers_share_one_study(tiny_project):
    overrides = tune_overrides(4, steps=6, heartbeat_s=2)
    command = tune_command(overrides)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    workers = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [worker.communicate(timeout=300) for worker in workers]
    for worker, (_, stderr) in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, stderr[-2000:]
        assert "finished with value" in stderr or " pruned" in stderr, "a worker ran no trial"

    study = load_study(load_config(tiny_project, overrides))
    trials = study.get_trials()
    counted = [trial for trial in trials if trial.state in COUNTED]
    assert len(counted) == 4
    assert len({params_key(trial) for trial in counted}) == 4
    assert all(trial.user_attrs.get(SURPLUS_ATTR) for trial in trials
               if trial.state not in COUNTED)
    [parent] = parent_runs()
    assert parent.info.run_id == study.user_attrs[PARENT_RUN_ATTR]
    children = child_runs(parent.info.run_id)
    assert sorted(int(run.data.tags["optuna.trial_number"]) for run in children) == sorted(
        trial.number for trial in counted)
    best_params = yaml.safe_load((TUNING / "best_params.yaml").read_text())
    completed = [trial for trial in counted if trial.state == TrialState.COMPLETE]
    assert best_params == max(completed, key=lambda trial: trial.value).params



@pytest.mark.parametrize(("settings", "pruner"), [
    ({}, optuna.pruners.MedianPruner),
    ({"pruner": "hyperband"}, optuna.pruners.HyperbandPruner),
    ({"pruner": "successive_halving"}, optuna.pruners.SuccessiveHalvingPruner),
    ({"pruner": "none"}, optuna.pruners.NopPruner),
    ({"pruner": "hyperband", "multi_objective": True}, optuna.pruners.NopPruner),
    ({"pruner": "hyperband", "search_space": {
        "evaluate.refine.steps": {"type": "int", "low": 0, "high": 4}}}, optuna.pruners.NopPruner),
])
def test_pruning_is_over_training_steps_of_single_objective_training_sweeps(tiny_project,
                                                                             settings, pruner):
    config = load_config(tiny_project, tune_overrides(3, **settings))
    assert type(build_pruner(config)) is pruner


def test_baseline_values_are_the_configs_own_values_in_range(tiny_project):
    config = load_config(tiny_project, tune_overrides(3))
    assert baseline_values(config) == {  # tests/synthetic.py's params
        "train.loss.regularization.bending_energy.weight": 0.1,
        "train.loss.label.dice.weight": 1.0, "train.optimizer.lr": 0.001}
    narrow = load_config(tiny_project, [*tune_overrides(3), "tune.search_space.train.optimizer."
                                        "lr={type: float, low: 0.01, high: 0.1}"])
    assert "train.optimizer.lr" not in baseline_values(narrow)
