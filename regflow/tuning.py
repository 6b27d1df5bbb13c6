"""Optuna sweeps over loss/regulariser weights (any params key), each trial a nested MLflow run.

The objective is validation Dice of a shortened training, with folding as a constraint
(single-objective, prunable) or as a second objective (multi-objective, Pareto front, no pruning).
Storage is an RDB URL (default: SQLite under models/tuning/); several ``regflow tune`` processes on
one storage share the study. Heartbeats mark the trial of a killed worker as failed, and the retry
callback re-runs it with the same parameters, so an interrupted study resumes without repeating
finished trials.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import mlflow
import optuna
import yaml
from optuna.storages import RDBStorage, RetryFailedTrialCallback
from optuna.trial import TrialState

from regflow import tracking
from regflow.config import Config, SearchParameter, apply_override, validate_config
from regflow.engine import Trainer
from regflow.errors import ConfigError

FOLDING_ATTR = "folding_pct"
PARENT_RUN_ATTR = "mlflow_parent_run_id"


def default_storage(tuning_dir: Path) -> str:
    """SQLite file under the tuning folder, by absolute path (DVC experiment copies share it)."""
    return f"sqlite:///{(tuning_dir / 'optuna.db').resolve()}"


def build_storage(url: str, heartbeat_s: int) -> RDBStorage:
    """RDB storage with heartbeats; a stale (killed) trial is failed and retried once more."""
    return RDBStorage(url, heartbeat_interval=heartbeat_s, grace_period=2 * heartbeat_s,
                      failed_trial_callback=RetryFailedTrialCallback(max_retry=2))


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
    apply_override(tree, ["train", "val_every"], settings.val_every)
    apply_override(tree, ["train", "checkpoint_every"], settings.steps)
    apply_override(tree, ["train", "early_stopping_patience"], 0)
    apply_override(tree, ["train", "name"], f"{config.train.name}-trial-{trial_number}")
    return validate_config(tree, source="tune.search_space")


def check_search_space(config: Config) -> None:
    """Every searched key must be a valid params key (validated with a mid-range value)."""
    for key, space in config.tune.search_space.items():
        probe = space.choices[0] if space.type == "categorical" else space.low
        trial_config(config, {key: probe}, 0)


class Objective:
    """Trains one trial and returns its validation Dice (and folding when multi-objective)."""

    def __init__(self, config: Config, manifest_path: Path, tuning_dir: Path):
        self.config = config
        self.manifest_path = manifest_path
        self.tuning_dir = tuning_dir

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, float]:
        values = {key: suggest(trial, key, space)
                  for key, space in self.config.tune.search_space.items()}
        config = trial_config(self.config, values, trial.number)
        multi = self.config.tune.multi_objective
        out_dir = self.tuning_dir / "trials" / f"trial-{trial.number}"

        def report(step: int, summary: dict[str, float]) -> None:
            dice = summary.get("dice_mean", 0.0)
            trial.set_user_attr(FOLDING_ATTR, summary.get("folding_pct", 0.0))
            if multi:
                return
            trial.report(dice, step)
            if trial.should_prune():
                mlflow.set_tag("optuna.state", "PRUNED")
                raise optuna.TrialPruned(f"pruned at step {step} with Dice {dice:.4f}")

        trainer = Trainer(config, self.manifest_path, out_dir, on_validation=report,
                          log_pictures=False)
        try:
            result = trainer.fit(run_name=f"trial-{trial.number}", nested=True, tags={
                "optuna.trial_number": str(trial.number),
                "optuna.study": self.config.tune.study_name})
        finally:
            shutil.rmtree(out_dir, ignore_errors=True)
        mlflow.MlflowClient().set_tag(result.run_id, "optuna.state", "COMPLETE")
        folding = float(trial.user_attrs.get(FOLDING_ATTR, 0.0))
        return (result.best_score, folding) if multi else result.best_score


def folding_constraint(trial: optuna.trial.FrozenTrial, max_folding_pct: float) -> list[float]:
    """Optuna constraint: feasible when folding % <= the threshold (value <= 0)."""
    return [float(trial.user_attrs.get(FOLDING_ATTR, 0.0)) - max_folding_pct]


def create_study(config: Config, storage: RDBStorage) -> optuna.Study:
    """Create or load the study named in params (TPE, seeded, with the folding constraint)."""
    settings = config.tune

    def constraints(trial: optuna.trial.FrozenTrial) -> list[float]:
        return folding_constraint(trial, settings.max_folding_pct)

    sampler = optuna.samplers.TPESampler(
        seed=config.seed, constraints_func=None if settings.multi_objective else constraints)
    if settings.multi_objective or settings.pruner == "none":
        pruner: optuna.pruners.BasePruner = optuna.pruners.NopPruner()
    elif settings.pruner == "hyperband":
        pruner = optuna.pruners.HyperbandPruner(min_resource=settings.val_every,
                                                max_resource=settings.steps)
    else:
        pruner = optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    directions = ["maximize", "minimize"] if settings.multi_objective else ["maximize"]
    return optuna.create_study(study_name=settings.study_name, storage=storage,
                               sampler=sampler, pruner=pruner, directions=directions,
                               load_if_exists=True)


def finished_trials(study: optuna.Study) -> int:
    """Trials that count toward ``tune.trials``: completed or pruned."""
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def best_values(study: optuna.Study, config: Config) -> tuple[dict[str, Any], dict[str, float]]:
    """Best feasible trial's params and metrics (multi-objective: best Dice on the front)."""
    if config.tune.multi_objective:
        front = study.best_trials
        if not front:
            return {}, {}
        best = max(front, key=lambda trial: trial.values[0])
    else:
        feasible = [trial for trial in study.get_trials(states=(TrialState.COMPLETE,))
                    if folding_constraint(trial, config.tune.max_folding_pct)[0] <= 0]
        if not feasible:
            return {}, {}
        best = max(feasible, key=lambda trial: trial.value)
    metrics = {"best_dice": float(best.values[0]),
               "best_folding_pct": float(best.user_attrs.get(FOLDING_ATTR, 0.0)),
               "best_trial": float(best.number)}
    return dict(best.params), metrics


def write_best_params(path: Path, params: dict[str, Any]) -> None:
    """models/tuning/best_params.yaml: ``{params key: value}``, merged by the train stage."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(yaml.safe_dump(params, sort_keys=True) if params else "{}\n")
    temporary.replace(path)


def log_study_pictures(study: optuna.Study, config: Config) -> None:
    """Optimisation history and parameter importances, as pictures on the parent run."""
    import optuna.visualization.matplotlib as optuna_plots

    completed = study.get_trials(states=(TrialState.COMPLETE,))
    if not completed:
        return
    target = (lambda trial: trial.values[0]) if config.tune.multi_objective else None
    name = "validation Dice"
    history = optuna_plots.plot_optimization_history(study, target=target, target_name=name)
    tracking.log_figure(history.figure, "tuning/optimization_history.png")
    if len(completed) >= 2 and len(config.tune.search_space) >= 2:
        importances = optuna_plots.plot_param_importances(study, target=target, target_name=name)
        tracking.log_figure(importances.figure, "tuning/param_importances.png")


def tune_stage(config: Config, manifest_path: Path, tuning_dir: Path = Path("models/tuning"),
               storage_url: str | None = None) -> dict[str, Any]:
    """Run (or resume, or join) the study until ``tune.trials`` trials finished.

    Args:
        config: validated params.
        manifest_path: the processed dataset's manifest.json.
        tuning_dir: models/tuning (best_params.yaml, default SQLite storage).
        storage_url: an RDB URL overriding ``tune.storage`` (e.g. PostgreSQL for many workers).

    Returns:
        The best params written to best_params.yaml (empty when tuning is disabled).
    """
    best_path = tuning_dir / "best_params.yaml"
    settings = config.tune
    if not settings.enabled or settings.trials == 0 or not settings.search_space:
        write_best_params(best_path, {})
        return {}
    check_search_space(config)
    tuning_dir.mkdir(parents=True, exist_ok=True)
    url = storage_url or settings.storage or default_storage(tuning_dir)
    try:
        storage = build_storage(url, settings.heartbeat_s)
    except Exception as exc:  # SQLAlchemy raises many kinds for a bad URL
        raise ConfigError(f"tune.storage: cannot open {url!r} ({exc.__class__.__name__})") from None
    study = create_study(config, storage)
    parent_id = study.user_attrs.get(PARENT_RUN_ATTR)
    objective = Objective(config, manifest_path, tuning_dir)
    with tracking.start_or_resume_run(f"regflow-{config.data.dataset}", run_id=parent_id,
                                      run_name=f"tune-{settings.study_name}") as parent:
        if parent_id is None:
            study.set_user_attr(PARENT_RUN_ATTR, parent.info.run_id)
            mlflow.set_tags({"optuna.study": settings.study_name, "optuna.storage": url})
            tracking.log_config(config)
        remaining = settings.trials - finished_trials(study)
        if remaining > 0:
            study.optimize(objective, n_trials=remaining, catch=(),
                           callbacks=[optuna.study.MaxTrialsCallback(
                               settings.trials, states=(TrialState.COMPLETE, TrialState.PRUNED))])
        params, metrics = best_values(study, config)
        mlflow.log_metrics(metrics)
        mlflow.log_params({f"best.{key}": value for key, value in params.items()})
        log_study_pictures(study, config)
        write_best_params(best_path, params)
        mlflow.log_artifact(str(best_path), artifact_path="tuning")
    return params
