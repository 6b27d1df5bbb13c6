"""What one Optuna trial measures, in either kind of sweep (see :mod:`regflow.tuning`).

- Training sweep (:class:`TrainingObjective`): a shortened training (``tune.steps``) of the
  config with the trial's values, from scratch or fine-tuned from ``tune.init_from``; its result
  is the best validation.
- Test-time sweep (:class:`TestTimeObjective`), when every searched key is under ``evaluate.``:
  one trained model, loaded through :func:`regflow.inference.load_registrar` with the trial's
  ``evaluate`` settings, evaluated on the validation pairs. Nothing is trained: any key that
  ``load_registrar`` reads from ``evaluate`` can be searched without changes here.

Common random numbers: every trial of a study sees the same seed (``seed``), so the same
batches and augmentation draws, and the same validation pairs (``tune.val_pairs`` of them, else
``loader.eval_pairs``); evaluation on the CPU is deterministic, so a trial's value is a function
of its parameters alone and two trials differ by their parameters, not by their luck.

Every trial records the same results, whatever its kind: user attributes and unstepped MLflow
metrics ``dice_mean``, ``sdlogj`` and ``folding_pct`` (of the best validation of a training
trial), and its searched keys as MLflow params under their own names, so that the MLflow UI's
compare view (parallel coordinates) works on a study's trial runs.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import mlflow
import optuna
from optuna.trial import TrialState

from regflow import paths, tracking
from regflow.config import Config, SearchParameter, apply_override, validate_config
from regflow.data.loader import build_dataloader
from regflow.data.manifest import Manifest
from regflow.engine import Trainer
from regflow.errors import ConfigError
from regflow.evaluation import evaluate_pairs, summarise, validation_score
from regflow.inference import load_registrar
from regflow.models import select_device
from regflow.tuning import (
    DICE_ATTR,
    FOLDING_ATTR,
    SDLOGJ_ATTR,
    SECONDS_ATTR,
    SURPLUS_ATTR,
    SurplusTrial,
    is_surplus,
    is_test_time,
    mark_trial_run,
)

RESULT_KEYS = (DICE_ATTR, SDLOGJ_ATTR, FOLDING_ATTR)


def suggest(trial: optuna.Trial, key: str, space: SearchParameter) -> Any:
    """Draw one value of a search dimension."""
    if space.type == "categorical":
        return trial.suggest_categorical(key, space.choices)
    if space.type == "int":
        return trial.suggest_int(key, int(space.low), int(space.high), log=space.log)
    return trial.suggest_float(key, space.low, space.high, log=space.log)


def with_values(config: Config, values: dict[str, Any], extra: dict[str, Any] | None = None
                ) -> Config:
    """``config`` with each ``{params key: value}`` of ``values`` (then ``extra``) set.

    Raises:
        ConfigError: a value the config refuses (named under ``tune.search_space``).
    """
    tree = config.model_dump()
    for key, value in {**values, **(extra or {})}.items():
        apply_override(tree, key.split("."), value)
    return validate_config(tree, source="tune.search_space")


def trial_config(config: Config, values: dict[str, Any], trial_number: int) -> Config:
    """The config of one training trial: the sampled values, a shortened training from
    ``tune.init_from`` (when set) with ``tune.val_pairs`` validation pairs, its own name."""
    settings = config.tune
    extra: dict[str, Any] = {
        "train.steps": settings.steps, "train.unit": "steps", "train.val_every": settings.val_every,
        "train.checkpoint_every": settings.steps, "train.early_stopping_patience": 0,
        "train.name": f"{config.train.name}-trial-{trial_number}"}
    if settings.init_from:
        extra["train.init_from"] = settings.init_from
    if settings.val_pairs:
        extra["loader.eval_pairs"] = settings.val_pairs
    return with_values(config, values, extra)


def check_search_space(config: Config) -> None:
    """Every searched key must be a valid params key (checked with its lowest value), and a
    study searches training keys or ``evaluate.`` keys, not both.

    Raises:
        ConfigError: one line naming the search key and why it cannot be searched.
    """
    settings = config.tune
    keys = list(settings.search_space)
    evaluate_keys = [key for key in keys if key.startswith("evaluate.")]
    if evaluate_keys and len(evaluate_keys) < len(keys):
        other = next(key for key in keys if not key.startswith("evaluate."))
        raise ConfigError(f"tune.search_space.{other}: a study searches evaluate.* keys (a "
                          f"test-time sweep of a trained model, e.g. {evaluate_keys[0]}) or "
                          f"training keys, not both")
    if is_test_time(config) and settings.init_from:
        raise ConfigError("tune.init_from: a test-time sweep (evaluate.* keys) trains nothing; "
                          "give the model with `regflow tune --model` instead")
    for key, space in settings.search_space.items():
        probe = space.choices[0] if space.type == "categorical" else space.low
        try:
            trial_config(config, {key: probe}, 0)
        except ConfigError as exc:
            reason = str(exc).removeprefix("tune.search_space: ")
            raise ConfigError(f"tune.search_space.{key}: not a valid params key ({reason})"
                              ) from None


def record_result(trial: optuna.Trial, summary: dict[str, float], config: Config
                  ) -> float | tuple[float, float]:
    """Keep a trial's results as user attributes, set its constraints, return its values.

    Constraints (feasible when <= 0): folding % minus ``tune.max_folding_pct``; in a
    single-objective study also SDlogJ minus ``tune.max_sdlogj`` when that is set.

    Returns:
        ``(Dice, SDlogJ)`` for a multi-objective study, else Dice less ``tune.folding_penalty``
        x folding %. Without labels "Dice" is the validation score, minus the folding %.
    """
    settings = config.tune
    folding = float(summary.get("folding_pct", 0.0))
    sdlogj = float(summary.get("sdlogj", 0.0))
    dice = validation_score(summary)
    for key, value in ((DICE_ATTR, dice), (SDLOGJ_ATTR, sdlogj), (FOLDING_ATTR, folding)):
        trial.set_user_attr(key, value)
    trial.set_constraint(FOLDING_ATTR, folding - settings.max_folding_pct)
    if settings.multi_objective:
        return dice, sdlogj
    if settings.max_sdlogj is not None:
        trial.set_constraint(SDLOGJ_ATTR, sdlogj - settings.max_sdlogj)
    return dice - settings.folding_penalty * folding


def log_trial_results(run_id: str, trial: optuna.Trial, seconds: float) -> None:
    """The trial's results as unstepped metrics of its MLflow run (the compare view's axes)."""
    attributes = trial.user_attrs
    metrics = {key: float(attributes[key]) for key in RESULT_KEYS if key in attributes}
    metrics["trial_time_s"] = seconds
    trial.set_user_attr(SECONDS_ATTR, seconds)
    mlflow.MlflowClient().log_batch(run_id, metrics=[
        mlflow.entities.Metric(key, value, int(time.time() * 1000), 0)
        for key, value in metrics.items()])


def draw_values(trial: optuna.Trial, config: Config) -> dict[str, Any]:
    """The trial's value of every searched key, after making sure the study needs it.

    Raises:
        SurplusTrial: the study already has ``tune.trials`` trials (a race between workers).
    """
    settings = config.tune
    if is_surplus(trial.study, trial, settings.trials):
        trial.set_user_attr(SURPLUS_ATTR, True)
        raise SurplusTrial(f"the study already has {settings.trials} trials")
    return {key: suggest(trial, key, space) for key, space in settings.search_space.items()}


def trial_tags(trial: optuna.Trial) -> dict[str, str]:
    """Tags that tie a trial's MLflow run to its study and number."""
    return {"optuna.trial_number": str(trial.number), "optuna.study": trial.study.study_name}


class TrainingObjective:
    """Trains one trial and returns its values (see :func:`record_result`).

    The results are those of the trial's best validation. Single-objective trials report every
    validation's score for pruning (median, Hyperband or successive halving over steps).
    """

    def __init__(self, config: Config, manifest_path: Path, tuning_dir: Path):
        self.config = config
        self.manifest_path = manifest_path
        self.tuning_dir = tuning_dir

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, float]:
        settings = self.config.tune
        values = draw_values(trial, self.config)
        config = trial_config(self.config, values, trial.number)
        out_dir = self.tuning_dir / "trials" / f"trial-{trial.number}"
        best: dict[str, float] = {}
        started = time.perf_counter()

        def report(step: int, summary: dict[str, float]) -> None:
            score = trainer.score(summary)
            if score >= trainer.best_score:
                best.clear()
                best.update(summary)
            if settings.multi_objective:
                return
            trial.report(score, step)
            if trial.should_prune():
                record_result(trial, best, self.config)
                raise optuna.TrialPruned(f"pruned at step {step} with score {score:.4f}")

        trainer = Trainer(config, self.manifest_path, out_dir, on_validation=report,
                          log_pictures=False)
        try:
            result = trainer.fit(run_name=f"trial-{trial.number}", nested=True,
                                 tags=trial_tags(trial))
        except optuna.TrialPruned:
            log_trial_results(trainer.run_id, trial, time.perf_counter() - started)
            mark_trial_run(trainer.run_id, TrialState.PRUNED)
            raise
        except Exception:
            if trainer.run_id is not None:
                mark_trial_run(trainer.run_id, TrialState.FAIL)
            raise
        finally:
            shutil.rmtree(out_dir, ignore_errors=True)
        values_out = record_result(trial, best, self.config)
        log_trial_results(result.run_id, trial, time.perf_counter() - started)
        mark_trial_run(result.run_id, TrialState.COMPLETE)
        return values_out


class TestTimeObjective:
    """Evaluates one trained model with the trial's ``evaluate`` settings on the validation
    pairs (no HD95, no volumes) and returns its values (see :func:`record_result`).

    The checkpoint file is only read; the network's weights are never optimised (refinement,
    if the settings ask for it, optimises each pair's field).

    Args:
        config: params (the study's; each trial sets its searched ``evaluate.`` keys).
        manifest_path: the processed dataset whose validation pairs are used.
        checkpoint: the local checkpoint file of the model.
        model_spec: how the user named the model (a path or a ``models:/`` URI), for the runs.
    """

    __test__ = False  # not a pytest class, whatever its name

    def __init__(self, config: Config, manifest_path: Path, checkpoint: Path, model_spec: str):
        self.config = config
        self.checkpoint = checkpoint
        self.model_spec = model_spec
        self.manifest = Manifest.read(manifest_path)
        pairs = config.tune.val_pairs or config.loader.eval_pairs
        self.loader = build_dataloader(
            manifest_path, "val", with_values(config, {"loader.eval_pairs": pairs}), train=False)
        self.device = select_device(config.train.device)

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, float]:
        values = draw_values(trial, self.config)
        config = with_values(self.config, values)
        started = time.perf_counter()
        with tracking.start_or_resume_run(
                paths.experiment_name(self.manifest.dataset), run_name=f"trial-{trial.number}",
                nested=True, log_system_metrics=False,
                tags={**trial_tags(trial), "regflow.model": self.model_spec}) as run:
            mlflow.log_params(values)
            try:
                registrar = load_registrar(str(self.checkpoint), config, device=self.device)
                rows = evaluate_pairs(registrar, self.loader, self.manifest.voxel_size,
                                      self.manifest.channel_names)
            except Exception:
                mark_trial_run(run.info.run_id, TrialState.FAIL)
                raise
            result = record_result(trial, summarise(rows), self.config)
            log_trial_results(run.info.run_id, trial, time.perf_counter() - started)
        mark_trial_run(run.info.run_id, TrialState.COMPLETE)
        return result
