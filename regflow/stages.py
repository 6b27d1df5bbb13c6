"""Every DVC stage of dvc.yaml as one function: config in, files under data/, models/, metrics/,
plots/ and eval/ out. The CLI only parses options and calls these."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import numpy as np

from regflow import evaluation, fileio, paths, registry, tracking, trials, tuning, viz
from regflow.config import Config
from regflow.data.loader import build_dataloader
from regflow.data.manifest import Manifest
from regflow.engine import Trainer, TrainResult
from regflow.errors import ConfigError, RegflowError
from regflow.inference import checkpoint_path, load_registrar
from regflow.models import select_device
from regflow.predict import VolumeWriter
from regflow.redact import redact_text


def fetch_stage(config: Config, dataset: str | None = None, mirror: str | None = None) -> Path:
    """Download (or copy from ``mirror``) and verify a dataset into data/raw/<dataset>/."""
    from regflow.data.fetch import fetch_dataset

    return fetch_dataset(dataset or config.data.dataset, config, mirror=mirror)


def preprocess_stage(config: Config, dataset: str | None = None) -> Path:
    """data/raw/<dataset>/ -> data/processed/<dataset>/ with its manifest; returns the manifest."""
    from regflow.data.preprocess import preprocess_dataset

    return preprocess_dataset(dataset or config.data.dataset, config)


def tune_stage(config: Config, storage_url: str | None = None,
               tuning_dir: Path = paths.TUNING_DIR, model: str | None = None) -> dict[str, Any]:
    """Run (or resume, or join) the Optuna study until it holds ``tune.trials`` finished trials;
    the rule's pick goes to models/tuning/best_params.yaml, the study to one parent MLflow run.

    A search space of ``evaluate.`` keys only is a test-time sweep of one trained model
    (``model``, default models/<train.name>/best.pt); any other is a training sweep.

    Args:
        config: validated params.
        storage_url: an RDB URL overriding ``tune.storage`` (e.g. PostgreSQL for many workers).
        tuning_dir: best_params.yaml and the default SQLite storage.
        model: a checkpoint path or MLflow model URI to sweep the ``evaluate`` settings of.

    Returns:
        The best params written (empty when tuning is disabled or no trial is feasible).

    Raises:
        ConfigError: a search key that is not a params key, keys of both kinds, ``model`` for a
            training sweep, or an unusable storage URL.
        RegflowError: the model to sweep cannot be found or loaded.
    """
    best_path = tuning_dir / paths.BEST_PARAMS_YAML
    settings = config.tune
    if not settings.enabled or settings.trials == 0 or not settings.search_space:
        tuning.write_best_params(best_path, {})
        return {}
    trials.check_search_space(config)
    test_time = tuning.is_test_time(config)
    if model is not None and not test_time:
        raise ConfigError("--model: a test-time sweep needs tune.search_space keys all under "
                          "evaluate.; this search space trains")
    if test_time:
        spec: str | None = model or str(paths.model_dir(config) / paths.BEST_CHECKPOINT)
    else:
        spec = settings.init_from  # every training trial's start, when set
    checkpoint = _sweep_checkpoint(spec) if spec else None
    tuning_dir.mkdir(parents=True, exist_ok=True)
    url = storage_url or settings.storage or tuning.default_storage(tuning_dir)
    study, created = tuning.open_study(
        config, tuning.build_storage(url, settings.heartbeat_s),
        model_digest=tuning.file_digest(checkpoint) if checkpoint else None)
    parent_id = None if created else tuning.wait_for_parent_run(study, tuning.PARENT_WAIT_S)
    with tracking.start_or_resume_run(paths.experiment_name(config.data.dataset),
                                      run_id=parent_id,
                                      run_name=f"tune-{settings.study_name}") as parent:
        if parent_id is None:
            study.set_user_attr(tuning.PARENT_RUN_ATTR, parent.info.run_id)
            mlflow.set_tags({**tuning.study_tags(study.study_name, url),
                             "regflow.sweep": "test-time" if test_time else "training",
                             **({"regflow.model": redact_text(spec)} if spec else {})})
            tracking.log_config(config)
        manifest = paths.manifest_path(config)
        objective = (trials.TestTimeObjective(config, manifest, checkpoint, redact_text(spec))
                     if test_time else trials.TrainingObjective(config, manifest, tuning_dir))
        tuning.run_study(study, objective, settings.trials)
        shutil.rmtree(tuning_dir / "trials", ignore_errors=True)  # left there by killed workers
        params, metrics = tuning.best_values(study, config)
        mlflow.log_metrics(metrics)
        mlflow.set_tags({f"best.{key}": str(value) for key, value in params.items()})
        tuning.log_study_pictures(study, config)
        tuning.write_best_params(best_path, params)
        mlflow.log_artifact(str(best_path), artifact_path="tuning")
    return params


def _sweep_checkpoint(spec: str) -> Path:
    """The local checkpoint of a model a study sweeps or starts from (downloaded for a URI).

    Raises:
        RegflowError: no such file, or the URI cannot be loaded.
    """
    checkpoint = checkpoint_path(spec)
    if not checkpoint.is_file():
        raise RegflowError(f"{checkpoint}: no trained model to tune; run `regflow train` "
                           f"first or give `regflow tune --model PATH|models:/NAME@ALIAS`")
    return checkpoint


def train_stage(config: Config, resume: bool = True) -> TrainResult:
    """Train into models/<train.name>/, resuming from last.pt unless ``resume`` is False."""
    out_dir = paths.model_dir(config)
    if not resume:
        (out_dir / paths.LAST_CHECKPOINT).unlink(missing_ok=True)
        (out_dir / paths.RUN_RECORD).unlink(missing_ok=True)
    return Trainer(config, paths.manifest_path(config), out_dir).fit()


def register_stage(config: Config) -> dict[str, Any]:
    """Register models/<name>/best.pt with its evaluation metrics, gate @champion; write
    models/registered.json.

    Raises:
        RegflowError: no trained model, no evaluation metrics (or no ``dice_mean`` in them).
    """
    out_dir = paths.model_dir(config)
    checkpoint = out_dir / paths.BEST_CHECKPOINT
    if not checkpoint.exists():
        raise RegflowError(f"{checkpoint}: no trained model; run `regflow train` first")
    metrics_path = paths.METRICS_DIR / paths.EVAL_JSON
    metrics = registry.read_json(metrics_path, "evaluation metrics")
    if "dice_mean" not in metrics:  # the gate and reconcile() need an evaluated model
        raise RegflowError(f"{metrics_path}: no dice_mean; run `regflow evaluate` first")
    record = out_dir / paths.RUN_RECORD
    run_id = registry.read_json(record, "run record")["run_id"] if record.exists() else None
    decision = registry.register_model(checkpoint, run_id, metrics, config,
                                       paths.experiment_name(config.data.dataset))
    fileio.write_json(paths.REGISTERED_JSON, decision)
    return decision


def register_checkpoint_stage(config: Config, checkpoint: Path,
                              mirror: str | None = None) -> dict[str, Any]:
    """Register an existing checkpoint (e.g. shipped weights) without training.

    Fetches and preprocesses ``data.dataset`` when it is not processed yet, evaluates the
    checkpoint on ``evaluate.split`` with ``evaluate``'s test-time settings into a new MLflow run
    (its metrics and per-pair table), then logs, registers and gates it like ``register_stage``;
    writes models/registered.json.

    Args:
        config: the config to evaluate and register with (for shipped weights, the one stored in
            the checkpoint).
        checkpoint: the ``.pt`` file.
        mirror: a local dataset mirror for the fetch (``$REGFLOW_DATA_MIRROR``).

    Raises:
        RegflowError: an unreadable checkpoint, a dataset that cannot be fetched, an empty split.
    """
    if not checkpoint.is_file():
        raise RegflowError(f"{checkpoint}: no such checkpoint file")
    if not paths.manifest_path(config, must_exist=False).exists():
        fetch_stage(config, mirror=mirror)
        preprocess_stage(config)
    rows, headline = evaluate_checkpoint(config, checkpoint)
    experiment = paths.experiment_name(config.data.dataset)
    with tracking.start_or_resume_run(experiment, run_name=f"register-{checkpoint.stem}",
                                      tags={"regflow.checkpoint": str(checkpoint)}) as run:
        tracking.log_config(config)
        mlflow.log_metrics({f"eval/{key}": value for key, value in headline.items()
                            if np.isfinite(value)})
        with tempfile.TemporaryDirectory() as scratch:
            table = fileio.write_csv(Path(scratch) / "pairs.csv", rows)
            mlflow.log_artifact(str(table), artifact_path="evaluation/metrics")
        run_id = run.info.run_id
    decision = registry.register_model(checkpoint, run_id, headline, config, experiment)
    fileio.write_json(paths.REGISTERED_JSON, decision)
    return decision


def evaluate_checkpoint(config: Config, checkpoint: Path, on_pair: Any = None
                        ) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Per-pair rows and headline metrics of a checkpoint on ``evaluate.split`` of the processed
    dataset, with ``evaluate``'s test-time settings (and the unregistered baseline per pair).

    Args:
        config: validated params.
        checkpoint: the ``.pt`` file.
        on_pair: called with (batch, outputs, index) for each pair (e.g. a volume writer).

    Raises:
        RegflowError: no processed dataset, an unreadable checkpoint, or an empty split.
    """
    manifest_file = paths.manifest_path(config)
    manifest = Manifest.read(manifest_file)
    registrar = load_registrar(str(checkpoint), config, device=select_device(config.train.device))
    loader = build_dataloader(manifest_file, config.evaluate.split, config, train=False)
    rows = evaluation.evaluate_pairs(registrar, loader, manifest.voxel_size,
                                     manifest.channel_names, with_hd95=config.evaluate.hd95,
                                     baseline=True, on_pair=on_pair)
    if not rows:
        raise RegflowError(f"{manifest_file}: split {config.evaluate.split!r} has no pairs")
    headline = evaluation.headline_metrics(rows, manifest.channel_names)
    if manifest.simulated:
        headline["simulated_data"] = 1.0
    return rows, headline


def evaluate_stage(config: Config, metrics_dir: Path = paths.METRICS_DIR,
                   plots_dir: Path = paths.PLOTS_DIR) -> dict[str, float]:
    """Evaluate models/<name>/<best|last>.pt (with ``evaluate.refine``) on a processed split.

    Writes metrics/eval.json and metrics/pairs.csv, plots/ (CSV for DVC, PNG), and the warped
    volumes under eval/<name>/ (a folder staged and renamed whole, so a killed evaluation leaves
    no partial volumes), then logs all of it into the training's MLflow run.

    Returns:
        The headline metrics written to metrics/eval.json.
    """
    out_dir = paths.model_dir(config)
    run_id = _training_run_id(config, out_dir)
    volumes_dir = paths.volumes_dir(config)
    fileio.remove_stale_temporaries(volumes_dir.parent)
    with fileio.atomic_directory(volumes_dir) as staging:
        writer = VolumeWriter(staging) if config.evaluate.save_volumes else None
        rows, headline = evaluate_checkpoint(
            config, out_dir / f"{config.evaluate.checkpoint}.pt", on_pair=writer)
    manifest = Manifest.read(paths.manifest_path(config))
    fileio.write_json(metrics_dir / paths.EVAL_JSON, headline)
    fileio.write_csv(metrics_dir / "pairs.csv", rows)
    dice_table = evaluation.dice_plot_rows(rows, manifest.channel_names)
    fileio.write_csv(plots_dir / "dice_per_label.csv", dice_table)
    viz.save_figure(viz.dice_bar_figure(dice_table), plots_dir / "dice_per_label.png")
    _log_evaluation(config, run_id, headline, metrics_dir, plots_dir, volumes_dir)
    return headline


def _training_run_id(config: Config, out_dir: Path) -> str | None:
    """The training's MLflow run (models/<name>/run.json), checked before any evaluation work.

    Raises:
        RegflowError: run.json names a run the configured store does not have.
    """
    record = out_dir / paths.RUN_RECORD
    if not record.exists():
        return None
    run_id = json.loads(record.read_text())["run_id"]
    tracking.configure_mlflow(paths.experiment_name(config.data.dataset))
    tracking.run_experiment_id(run_id)
    return run_id


def _training_curve_rows(run_id: str) -> list[dict[str, Any]]:
    """Training total loss and validation Dice per step, from the MLflow run."""
    client = mlflow.MlflowClient()
    rows: dict[int, dict[str, Any]] = {}
    for key, column in (("train/total", "train_loss"), ("val/dice_mean", "val_dice")):
        for point in client.get_metric_history(run_id, key):
            rows.setdefault(point.step, {"step": point.step})[column] = point.value
    return [rows[step] for step in sorted(rows)]


def _log_evaluation(config: Config, run_id: str | None, headline: dict[str, float],
                    metrics_dir: Path, plots_dir: Path, volumes_dir: Path) -> None:
    """Log the evaluation into the training run (a new run without one) and write the curves."""
    with tracking.start_or_resume_run(paths.experiment_name(config.data.dataset), run_id=run_id,
                                      run_name=config.train.name):
        if run_id:
            curve = _training_curve_rows(run_id)
            fileio.write_csv(plots_dir / "training_curve.csv", curve)
            viz.save_figure(viz.training_curve_figure(curve), plots_dir / "training_curve.png")
        mlflow.log_metrics({f"eval/{key}": value for key, value in headline.items()
                            if np.isfinite(value)})
        mlflow.log_artifacts(str(metrics_dir), artifact_path="evaluation/metrics")
        mlflow.log_artifacts(str(plots_dir), artifact_path="evaluation/plots")
        if volumes_dir.is_dir():
            mlflow.log_artifacts(str(volumes_dir), artifact_path="evaluation/volumes")
