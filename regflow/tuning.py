"""Optuna sweeps over loss/regulariser weights (any params key), each trial a nested MLflow run.

The objective is the validation score of a shortened training (mean Dice), with folding as a
constraint (single-objective, prunable) or as a second objective (multi-objective, Pareto front,
no pruning). Storage is an RDB URL (default: SQLite under models/tuning/), the study's name
``tune.study_name`` plus a digest of the config; several ``regflow tune`` processes on one
storage share the study, and each returns only when it holds exactly ``tune.trials`` COMPLETE or
PRUNED trials. Heartbeats mark the trial of a killed worker as failed
(its MLflow run too) and queue a retry with the same parameters, so an interrupted study resumes
without repeating finished trials. MLflow: one parent run per study (its id kept in the study's
user attrs), one nested run per trial tagged ``optuna.state``; the parent holds the best trial's
metrics, its params as ``best.<key>`` tags, and pictures of the study. A storage password can
come from the environment (:func:`connection_url`); wherever the storage URL is shown or logged,
its password is masked.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import mlflow
import optuna
import yaml
from optuna.distributions import BaseDistribution
from optuna.exceptions import DuplicatedStudyError, ExperimentalWarning
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

from regflow import fileio, tracking
from regflow.config import Config, SearchParameter, apply_override, validate_config
from regflow.engine import Trainer
from regflow.errors import ConfigError
from regflow.redact import check_unambiguous, redact_url, remember_secret

FOLDING_ATTR = "folding_pct"
PARENT_RUN_ATTR = "mlflow_parent_run_id"
SURPLUS_ATTR = "surplus"
MAX_RETRY = 2  # a trial whose worker keeps dying is given up after this many retries
POLL_S = 1.0  # how often a worker looks at trials RUNNING elsewhere
PARENT_WAIT_S = 60.0  # how long a joining worker waits for the study's creator to start the run
SCHEMA_ATTEMPTS = 3  # tries to open a database that other workers may be creating
STORAGE_PASSWORD_ENV = "REGFLOW_STORAGE_PASSWORD"
STORAGE_PASSWORD_FILE_ENV = "REGFLOW_STORAGE_PASSWORD_FILE"
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED)


class SurplusTrial(Exception):
    """A trial that lost a race with another worker: the study already has all its trials."""


def default_storage(tuning_dir: Path) -> str:
    """SQLite file under the tuning folder, by absolute path (DVC experiment copies share it)."""
    return f"sqlite:///{(tuning_dir / 'optuna.db').resolve()}"


def storage_password() -> str | None:
    """The storage password from ``$REGFLOW_STORAGE_PASSWORD``, else from the file named by
    ``$REGFLOW_STORAGE_PASSWORD_FILE`` (its first line; e.g. a mounted secret); None when neither
    is set (empty values count as unset).

    Raises:
        ConfigError: the password file cannot be read.
    """
    if os.environ.get(STORAGE_PASSWORD_ENV):
        return os.environ[STORAGE_PASSWORD_ENV]
    path = os.environ.get(STORAGE_PASSWORD_FILE_ENV)
    if not path:
        return None
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise ConfigError(f"{STORAGE_PASSWORD_FILE_ENV}: cannot read {path} ({exc.strerror})"
                          ) from None
    return lines[0] if lines else ""


def connection_url(url: str) -> str:
    """The URL to connect to the storage with: ``url`` plus the password of the environment.

    Keep the password out of params.yaml, the command line and every log: give ``tune.storage``
    (or ``regflow tune --storage``) without one, e.g. ``postgresql://optuna@db:5432/optuna``, and
    set ``REGFLOW_STORAGE_PASSWORD`` to it, or ``REGFLOW_STORAGE_PASSWORD_FILE`` to a file that
    holds it (see :func:`storage_password`). The password is percent-encoded into the URL, so any
    character may appear in it. A URL that already carries a password, or has no host (SQLite),
    is used as it is, once SQLAlchemy and RFC 3986 read it alike
    (:func:`regflow.redact.check_unambiguous`). Wherever regflow shows or logs the storage, the
    password is masked.

    Raises:
        ConfigError: a URL the two parsers read differently, a password set but no user in the
            URL, or an unreadable password file.
    """
    check_unambiguous(url, "tune.storage")
    try:
        parsed = make_url(url)
    except Exception:  # not a SQLAlchemy URL: build_storage reports it, masked
        return url
    if not parsed.host or parsed.password is not None:
        return url
    password = storage_password()
    if password is None:
        return url
    if not parsed.username:
        raise ConfigError(f"tune.storage: a password is set in the environment but "
                          f"{redact_url(url)} names no user (write user@host)")
    remember_secret(password)
    placeholder = uuid.uuid4().hex  # SQLAlchemy leaves "%", "#", "{", blanks unencoded
    return parsed.set(password=placeholder).render_as_string(hide_password=False).replace(
        placeholder, quote(password, safe=""))


def study_tags(study_name: str, url: str) -> dict[str, str]:
    """Tags of a study's MLflow parent run: the study and its storage, password masked."""
    return {"optuna.study": study_name, "optuna.storage": redact_url(url)}


def build_storage(url: str, heartbeat_s: int) -> RDBStorage:
    """RDB storage with heartbeats every ``heartbeat_s`` seconds, connected with
    :func:`connection_url` (the password may come from the environment).

    A RUNNING trial without a heartbeat for ``2 * heartbeat_s`` seconds is stale (its worker died):
    it is failed, its MLflow run is closed as FAILED, and a copy with the same parameters is
    queued (at most ``MAX_RETRY`` times per original trial). Workers starting together on a new
    database race to create its tables; the losers see an integrity, operational or (PostgreSQL:
    "relation already exists") programming error and retry (``SCHEMA_ATTEMPTS`` tries in all).

    Raises:
        ConfigError: the storage cannot be opened (bad URL, no driver, no server); the message
            names the URL with its password masked.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        retry = RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)

    def on_stale_trial(study: optuna.Study, trial: FrozenTrial) -> None:
        close_stale_trial_runs(study, trial)
        retry(study, trial)

    connect_to = connection_url(url)
    attempt = 1
    while True:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ExperimentalWarning)
                return RDBStorage(connect_to, heartbeat_interval=heartbeat_s,
                                  grace_period=2 * heartbeat_s,
                                  heartbeat_stale_trial_callback=on_stale_trial)
        except (IntegrityError, OperationalError, ProgrammingError):
            if attempt < SCHEMA_ATTEMPTS:
                attempt += 1
                time.sleep(0.5)
                continue
            problem = "cannot open"
        except Exception:  # SQLAlchemy raises many kinds for a bad URL or a missing driver
            problem = "not a usable storage URL"
        raise ConfigError(f"tune.storage: {problem}: {redact_url(url)}") from None


def fail_stale_trials(study: optuna.Study) -> None:
    """Fail the heartbeat-stale trials of ``study`` now (running the stale-trial callback)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def mark_trial_run(run_id: str, state: TrialState) -> None:
    """Tag a trial's MLflow run with its Optuna state; a pruned run ends FINISHED, not FAILED."""
    client = mlflow.MlflowClient()
    client.set_tag(run_id, "optuna.state", state.name)
    if state != TrialState.COMPLETE:
        client.set_terminated(run_id, "FAILED" if state == TrialState.FAIL else "FINISHED")


def close_stale_trial_runs(study: optuna.Study, trial: FrozenTrial) -> None:
    """Mark the MLflow runs of a trial whose worker died as FAILED, tagged ``optuna.state`` FAIL.

    Whatever state the run reached (a worker killed while pruning has ended it and tagged it
    PRUNED, but never told Optuna), Optuna's FAIL is the trial's final state.
    """
    parent_id = study.user_attrs.get(PARENT_RUN_ATTR)
    if parent_id is None:
        return
    experiment_id = mlflow.get_run(parent_id).info.experiment_id
    runs = mlflow.MlflowClient().search_runs(
        [experiment_id], filter_string=(f"tags.`mlflow.parentRunId` = '{parent_id}' and "
                                        f"tags.`optuna.trial_number` = '{trial.number}'"))
    for run in runs:
        mark_trial_run(run.info.run_id, TrialState.FAIL)


def suggest(trial: optuna.Trial, key: str, space: SearchParameter) -> Any:
    """Draw one value of a search dimension."""
    if space.type == "categorical":
        return trial.suggest_categorical(key, space.choices)
    if space.type == "int":
        return trial.suggest_int(key, int(space.low), int(space.high), log=space.log)
    return trial.suggest_float(key, space.low, space.high, log=space.log)


def trial_config(config: Config, values: dict[str, Any], trial_number: int) -> Config:
    """The config of one trial: the sampled values, a shortened training, its own folder name."""
    tree = config.model_dump()
    for key, value in values.items():
        apply_override(tree, key.split("."), value)
    settings = config.tune
    apply_override(tree, ["train", "steps"], settings.steps)
    apply_override(tree, ["train", "unit"], "steps")
    apply_override(tree, ["train", "val_every"], settings.val_every)
    apply_override(tree, ["train", "checkpoint_every"], settings.steps)
    apply_override(tree, ["train", "early_stopping_patience"], 0)
    apply_override(tree, ["train", "name"], f"{config.train.name}-trial-{trial_number}")
    return validate_config(tree, source="tune.search_space")


def check_search_space(config: Config) -> None:
    """Every searched key must be a valid params key (checked with its lowest value).

    Raises:
        ConfigError: one line naming the search key and why it is not a params key.
    """
    for key, space in config.tune.search_space.items():
        probe = space.choices[0] if space.type == "categorical" else space.low
        try:
            trial_config(config, {key: probe}, 0)
        except ConfigError as exc:
            reason = str(exc).removeprefix("tune.search_space: ")
            raise ConfigError(f"tune.search_space.{key}: not a valid params key ({reason})"
                              ) from None


class TrialSeededSampler(optuna.samplers.BaseSampler):
    """TPE whose random draws depend on the seed and the trial number only.

    A plain seeded TPESampler replays one random sequence per process: two workers would draw
    the same parameters, and a resumed study would draw those of its finished trials again.
    Trial numbers are unique in a study, so seeding by them keeps a one-worker study
    reproducible and every worker's draws distinct.
    """

    def __init__(self, seed: int):
        self.seed = seed
        self.tpe = optuna.samplers.TPESampler(seed=seed)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.tpe = optuna.samplers.TPESampler(seed=self.seed + trial.number)
        self.tpe.before_trial(study, trial)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial
                                    ) -> dict[str, BaseDistribution]:
        return self.tpe.infer_relative_search_space(study, trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        return self.tpe.sample_relative(study, trial, search_space)

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        return self.tpe.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState,
                    values: Sequence[float] | None) -> None:
        self.tpe.after_trial(study, trial, state, values)


def is_surplus(study: optuna.Study, trial: optuna.Trial, trials: int) -> bool:
    """True when ``trials`` earlier trials are finished, running or queued.

    Two workers may start a trial at the same moment when one more is needed; trial numbers
    order them, so exactly one of the two goes ahead.
    """
    live = (*COUNTED, TrialState.RUNNING, TrialState.WAITING)
    earlier = [other for other in study.get_trials(deepcopy=False, states=live)
               if other.number < trial.number]
    return len(earlier) >= trials


class Objective:
    """Trains one trial and returns its validation score (and folding when multi-objective).

    The score is the Trainer's best validation score (mean Dice); the folding percentage is the
    one of that best validation. Single-objective trials report every validation for pruning,
    carry the constraint folding % <= ``tune.max_folding_pct`` and return the score less
    ``tune.folding_penalty`` x folding %, so that a short trial's folding (higher than a finished
    model's) weighs against it without making every trial infeasible.
    """

    def __init__(self, config: Config, manifest_path: Path, tuning_dir: Path):
        self.config = config
        self.manifest_path = manifest_path
        self.tuning_dir = tuning_dir

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, float]:
        settings = self.config.tune
        if is_surplus(trial.study, trial, settings.trials):
            trial.set_user_attr(SURPLUS_ATTR, True)
            raise SurplusTrial(f"the study already has {settings.trials} trials")
        values = {key: suggest(trial, key, space) for key, space in settings.search_space.items()}
        config = trial_config(self.config, values, trial.number)
        out_dir = self.tuning_dir / "trials" / f"trial-{trial.number}"

        def report(step: int, summary: dict[str, float]) -> None:
            score = trainer.score(summary)
            if score >= trainer.best_score:
                trial.set_user_attr(FOLDING_ATTR, summary.get("folding_pct", 0.0))
            if settings.multi_objective:
                return
            trial.report(score, step)
            if trial.should_prune():
                self.set_constraint(trial)
                raise optuna.TrialPruned(f"pruned at step {step} with score {score:.4f}")

        trainer = Trainer(config, self.manifest_path, out_dir, on_validation=report,
                          log_pictures=False)
        try:
            result = trainer.fit(run_name=f"trial-{trial.number}", nested=True, tags={
                "optuna.trial_number": str(trial.number), "optuna.study": trial.study.study_name})
        except optuna.TrialPruned:
            mark_trial_run(trainer.run_id, TrialState.PRUNED)
            raise
        except Exception:
            if trainer.run_id is not None:
                mark_trial_run(trainer.run_id, TrialState.FAIL)
            raise
        finally:
            shutil.rmtree(out_dir, ignore_errors=True)
        mark_trial_run(result.run_id, TrialState.COMPLETE)
        if settings.multi_objective:
            return result.best_score, float(trial.user_attrs.get(FOLDING_ATTR, 0.0))
        self.set_constraint(trial)
        folding = float(trial.user_attrs.get(FOLDING_ATTR, 0.0))
        return result.best_score - settings.folding_penalty * folding

    def set_constraint(self, trial: optuna.Trial) -> None:
        """Feasible when the folding % of the trial's best validation is within the threshold."""
        folding = float(trial.user_attrs.get(FOLDING_ATTR, 0.0))
        trial.set_constraint(FOLDING_ATTR, folding - self.config.tune.max_folding_pct)


def study_key(config: Config) -> str:
    """The study's name in the storage: ``tune.study_name`` and a digest of the config.

    Every key a trial's result depends on is in the digest (not ``tune.trials``, the storage or
    heartbeat), so a changed config (a DVC experiment) starts its own study, while the same
    config resumes or joins it, also with more trials.
    """
    relevant = config.model_dump(exclude={"evaluate": True, "registry": True, "tune": {
        "enabled", "trials", "storage", "heartbeat_s", "study_name"}})
    text = json.dumps(relevant, sort_keys=True, default=str)
    return f"{config.tune.study_name}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


def open_study(config: Config, storage: RDBStorage) -> tuple[optuna.Study, bool]:
    """Create the study of this config (:func:`study_key`), or load it; True when this call
    created it."""
    settings = config.tune
    directions = [StudyDirection.MAXIMIZE]
    if settings.multi_objective:
        directions.append(StudyDirection.MINIMIZE)
    name = study_key(config)
    try:
        storage.create_new_study(directions, name)
        created = True
    except DuplicatedStudyError:
        created = False
    if settings.multi_objective or settings.pruner == "none":
        pruner: optuna.pruners.BasePruner = optuna.pruners.NopPruner()
    elif settings.pruner == "hyperband":
        pruner = optuna.pruners.HyperbandPruner(min_resource=settings.val_every,
                                                max_resource=settings.steps)
    else:
        pruner = optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    study = optuna.load_study(study_name=name, storage=storage,
                              sampler=TrialSeededSampler(config.seed), pruner=pruner)
    return study, created


def wait_for_parent_run(study: optuna.Study, timeout_s: float) -> str | None:
    """The study's MLflow parent run id, waiting up to ``timeout_s`` for the study's creator
    (another worker started at the same time) to record it; None when it never does."""
    deadline = time.monotonic() + timeout_s
    while PARENT_RUN_ATTR not in study.user_attrs and time.monotonic() < deadline:
        time.sleep(0.2)
    return study.user_attrs.get(PARENT_RUN_ATTR)


def run_study(study: optuna.Study, objective: Objective, trials: int) -> None:
    """Run trials until the study holds ``trials`` COMPLETE or PRUNED ones.

    Trials RUNNING elsewhere count as work under way. When they alone would complete the
    study this worker waits: they finish, or their worker died, they turn stale, are failed,
    and their queued retry is run here. So every worker returns with the study complete, and a
    rerun after a crash retries the killed trial rather than drawing a new one.
    """
    while True:
        fail_stale_trials(study)
        states = Counter(trial.state for trial in study.get_trials(deepcopy=False))
        finished = sum(states[state] for state in COUNTED)
        if finished >= trials:
            return
        if finished + states[TrialState.RUNNING] < trials:
            study.optimize(objective, n_trials=1, catch=(SurplusTrial,))
        else:
            time.sleep(POLL_S)


def best_values(study: optuna.Study, config: Config) -> tuple[dict[str, Any], dict[str, float]]:
    """Params and metrics of the best feasible trial (folding % <= ``tune.max_folding_pct``).

    Single-objective: the highest score among COMPLETE trials. Multi-objective: the highest
    Dice on the Pareto front. Empty dicts when no trial qualifies.
    """
    settings = config.tune
    candidates = (study.best_trials if settings.multi_objective
                  else study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    feasible = [trial for trial in candidates
                if float(trial.user_attrs.get(FOLDING_ATTR, 0.0)) <= settings.max_folding_pct]
    if not feasible:
        return {}, {}
    best = max(feasible, key=lambda trial: trial.values[0])
    folding = float(best.user_attrs.get(FOLDING_ATTR, 0.0))
    penalty = 0.0 if settings.multi_objective else settings.folding_penalty * folding
    metrics = {"best_dice": float(best.values[0]) + penalty,
               "best_folding_pct": folding,
               "best_trial": float(best.number)}
    return dict(best.params), metrics


def write_best_params(path: Path, params: dict[str, Any]) -> None:
    """models/tuning/best_params.yaml: ``{params key: value}`` (``{}`` when none), merged by the
    train stage; written atomically (workers finishing together each use their own temp file)."""
    fileio.write_text(path, yaml.safe_dump(params, sort_keys=True) if params else "{}\n")


def log_study_pictures(study: optuna.Study, config: Config) -> None:
    """Optimisation history and parameter importances, as pictures on the parent run."""
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as optuna_plots

    completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not completed:
        return
    multi = config.tune.multi_objective
    name = "validation Dice"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        history = optuna_plots.plot_optimization_history(
            study, target=(lambda trial: trial.values[0]) if multi else None, target_name=name)
        tracking.log_figure(history.figure, "tuning/optimization_history.png")
        plt.close(history.figure)
        if len(completed) >= 2 and len(config.tune.search_space) >= 2:
            # With a target the evaluator takes lower as better (and says so): negate the Dice.
            warnings.filterwarnings("ignore", "PedAnovaImportanceEvaluator", UserWarning)
            importances = optuna_plots.plot_param_importances(
                study, target=(lambda trial: -trial.values[0]) if multi else None,
                target_name=name)
            tracking.log_figure(importances.figure, "tuning/param_importances.png")
            plt.close(importances.figure)
