"""Optuna studies over any params keys, each trial a nested MLflow run.

Two kinds of sweep (:mod:`regflow.trials` says what a trial measures): a training sweep, each
trial a shortened training (optionally fine-tuned from one shared start, ``tune.init_from``);
and, when every searched key is under ``evaluate.``, a test-time sweep of one trained model
(``regflow tune --model``), each trial an evaluation on the validation pairs, nothing trained.

Objectives: validation Dice with folding as a constraint (single-objective, prunable over
training steps), or (Dice, SDlogJ) on a Pareto front (``tune.multi_objective``; folding a
constraint, no pruning). One rule picks the result whatever the study (:func:`best_trial`): the
best Dice within ``tune.max_folding_pct`` and ``tune.max_sdlogj``; its params go to
best_params.yaml. The sampler is TPE seeded from ``seed`` and the trial number, so the same
study draws the same params; a new study's first trial runs the config's own values of the
searched keys (``tune.baseline_trial``).

Storage is an RDB URL (default: SQLite under models/tuning/), the study's name
``tune.study_name`` plus a digest of the config and of the model it starts from or sweeps;
several ``regflow tune`` processes on one storage share the study, and each returns only when
it holds exactly ``tune.trials`` COMPLETE or PRUNED trials. Heartbeats mark the trial of a
killed worker as failed (its MLflow run too) and queue a retry with the same parameters, so an
interrupted study resumes without repeating finished trials. MLflow: one parent run per study
(its id kept in the study's user attrs), one nested run per trial tagged ``optuna.state``; the
parent holds the pick's metrics, its params as ``best.<key>`` tags, and pictures of the study
(with two objectives, the Pareto front). A storage password can come from the environment
(:func:`connection_url`); wherever the storage URL is shown or logged, its password is masked.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import mlflow
import optuna
import yaml
from matplotlib.figure import Figure
from optuna.distributions import BaseDistribution
from optuna.exceptions import DuplicatedStudyError, ExperimentalWarning
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

from regflow import fileio, tracking, viz
from regflow.config import Config
from regflow.errors import ConfigError
from regflow.redact import check_unambiguous, redact_url, remember_secret

# a trial's results (user attributes; its MLflow run's metrics carry the same names)
DICE_ATTR = "dice_mean"
SDLOGJ_ATTR = "sdlogj"
FOLDING_ATTR = "folding_pct"
SECONDS_ATTR = "trial_time_s"
BASELINE_ATTR = "baseline"  # the trial that runs the config's own values
TEST_TIME_PREFIX = "evaluate."
PARETO_PICTURE = "tuning/pareto_front.png"
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


def is_test_time(config: Config) -> bool:
    """True when every searched key is under ``evaluate.``: a test-time sweep of one model."""
    keys = config.tune.search_space
    return bool(keys) and all(key.startswith(TEST_TIME_PREFIX) for key in keys)


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes (a model that a study starts from or sweeps)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def study_key(config: Config, model_digest: str | None = None) -> str:
    """The study's name in the storage: ``tune.study_name`` and a digest of what trials depend on.

    That is the config (not ``tune.trials``, the storage or heartbeat; ``evaluate`` only for a
    test-time sweep, whose trials it drives) and, when given, the digest of the model the trials
    start from (``tune.init_from``) or evaluate (a test-time sweep). So a changed config or
    model (a DVC experiment, a retrained model) starts its own study, while the same config
    resumes or joins it, also with more trials.
    """
    exclude: dict[str, Any] = {"registry": True, "tune": {
        "enabled", "trials", "storage", "heartbeat_s", "study_name"}}
    if not is_test_time(config):
        exclude["evaluate"] = True
    relevant = config.model_dump(exclude=exclude)
    if model_digest is not None:
        relevant["model_digest"] = model_digest
    text = json.dumps(relevant, sort_keys=True, default=str)
    return f"{config.tune.study_name}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


def baseline_values(config: Config) -> dict[str, Any]:
    """The config's own value of every searched key that lies in its search range."""
    tree = config.model_dump()
    values = {}
    for key, space in config.tune.search_space.items():
        node: Any = tree
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if space.type == "categorical":
            inside = node in space.choices
        else:
            inside = (isinstance(node, int | float) and not isinstance(node, bool)
                      and space.low <= node <= space.high
                      and (space.type == "float" or float(node).is_integer()))
        if inside:
            values[key] = node
    return values


def build_pruner(config: Config) -> optuna.pruners.BasePruner:
    """Multi-fidelity over training steps for a single-objective training sweep: median,
    Hyperband or successive halving (from ``tune.val_every`` steps up to ``tune.steps``);
    none for multi-objective studies and test-time sweeps (a trial there is one evaluation)."""
    settings = config.tune
    if settings.multi_objective or settings.pruner == "none" or is_test_time(config):
        return optuna.pruners.NopPruner()
    if settings.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=settings.val_every,
                                              max_resource=settings.steps)
    if settings.pruner == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=settings.val_every)
    return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)


def open_study(config: Config, storage: RDBStorage, model_digest: str | None = None
               ) -> tuple[optuna.Study, bool]:
    """Create the study of this config and model (:func:`study_key`), or load it; True when
    this call created it. A new study's first trial is the config's own values of the searched
    keys (``tune.baseline_trial``), so that what the sweep finds is measured against them."""
    settings = config.tune
    directions = [StudyDirection.MAXIMIZE]
    if settings.multi_objective:
        directions.append(StudyDirection.MINIMIZE)
    name = study_key(config, model_digest)
    try:
        storage.create_new_study(directions, name)
        created = True
    except DuplicatedStudyError:
        created = False
    study = optuna.load_study(study_name=name, storage=storage,
                              sampler=TrialSeededSampler(config.seed), pruner=build_pruner(config))
    baseline = baseline_values(config) if settings.baseline_trial else {}
    if created and baseline:
        study.enqueue_trial(baseline, user_attrs={BASELINE_ATTR: True})
    return study, created


def wait_for_parent_run(study: optuna.Study, timeout_s: float) -> str | None:
    """The study's MLflow parent run id, waiting up to ``timeout_s`` for the study's creator
    (another worker started at the same time) to record it; None when it never does."""
    deadline = time.monotonic() + timeout_s
    while PARENT_RUN_ATTR not in study.user_attrs and time.monotonic() < deadline:
        time.sleep(0.2)
    return study.user_attrs.get(PARENT_RUN_ATTR)


def run_study(study: optuna.Study, objective: Callable[[optuna.Trial], Any], trials: int) -> None:
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


def feasible(trial: FrozenTrial, config: Config) -> bool:
    """Whether a trial's results are within ``tune.max_folding_pct`` and ``tune.max_sdlogj``."""
    settings = config.tune
    folding = float(trial.user_attrs.get(FOLDING_ATTR, 0.0))
    sdlogj = float(trial.user_attrs.get(SDLOGJ_ATTR, 0.0))
    return folding <= settings.max_folding_pct and (
        settings.max_sdlogj is None or sdlogj <= settings.max_sdlogj)


def best_trial(study: optuna.Study, config: Config) -> FrozenTrial | None:
    """The rule: among COMPLETE trials within both limits (:func:`feasible`), the highest Dice
    (a single-objective study: the highest value, Dice less the folding penalty); a tie goes to
    the lower SDlogJ, then the earlier trial. None when no trial qualifies.

    In a multi-objective study the pick lies on the Pareto front of the trials within the
    folding limit: a trial dominating it would be within the SDlogJ limit too, with at least
    its Dice and a lower SDlogJ.
    """
    candidates = [trial for trial in study.get_trials(deepcopy=False,
                                                      states=(TrialState.COMPLETE,))
                  if feasible(trial, config)]
    if not candidates:
        return None
    return max(candidates, key=lambda trial: (
        trial.values[0], -float(trial.user_attrs.get(SDLOGJ_ATTR, 0.0)), -trial.number))


def best_values(study: optuna.Study, config: Config) -> tuple[dict[str, Any], dict[str, float]]:
    """Params and metrics of the rule's pick (:func:`best_trial`); empty dicts when none."""
    best = best_trial(study, config)
    if best is None:
        return {}, {}
    folding = float(best.user_attrs.get(FOLDING_ATTR, 0.0))
    penalty = 0.0 if config.tune.multi_objective else config.tune.folding_penalty * folding
    metrics = {"best_dice": float(best.user_attrs.get(DICE_ATTR, best.values[0] + penalty)),
               "best_sdlogj": float(best.user_attrs.get(SDLOGJ_ATTR, 0.0)),
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
    if multi:
        tracking.log_figure(pareto_figure(study, config), PARETO_PICTURE)


def pareto_figure(study: optuna.Study, config: Config) -> Figure:
    """The Pareto front of a two-objective study (Dice, SDlogJ) with the rule's pick."""
    completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    front = {trial.number for trial in study.best_trials}
    folding_limit = config.tune.max_folding_pct
    rows = [{"number": trial.number, "dice": trial.values[0], "sdlogj": trial.values[1],
             "feasible": float(trial.user_attrs.get(FOLDING_ATTR, 0.0)) <= folding_limit,
             "front": trial.number in front} for trial in completed]
    pick = best_trial(study, config)
    baseline = next((trial.number for trial in completed
                     if trial.user_attrs.get(BASELINE_ATTR)), None)
    return viz.pareto_front_figure(rows, config.tune.max_sdlogj,
                                   None if pick is None else pick.number, baseline)
