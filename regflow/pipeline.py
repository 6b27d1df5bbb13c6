"""The train and evaluate stages: config -> library -> files under models/, metrics/ and plots/."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch

from regflow import tracking, viz
from regflow.config import Config
from regflow.data.io import write_nifti
from regflow.data.loader import build_dataloader, read_manifest
from regflow.engine import Trainer, TrainResult, label_names_of
from regflow.errors import RegflowError
from regflow.evaluation import evaluate_pairs, summarise
from regflow.models import RegistrationModel, select_device


def manifest_path(config: Config) -> Path:
    """data/processed/<dataset>/manifest.json, checked to exist."""
    path = Path(config.data.processed_dir) / config.data.dataset / "manifest.json"
    if not path.exists():
        raise RegflowError(f"{path}: no processed dataset; run `regflow preprocess` first")
    return path


def model_dir(config: Config) -> Path:
    """models/<train.name>."""
    return Path("models") / config.train.name


def train_stage(config: Config) -> TrainResult:
    """Train (resuming when possible) into models/<train.name>/."""
    return Trainer(config, manifest_path(config), model_dir(config)).fit()


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write JSON atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    temporary.replace(path)


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Write dict rows as CSV atomically (columns: the union of keys, in first-seen order)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    columns: list[str] = []
    for row in rows:
        columns.extend(key for key in row if key not in columns)
    temporary = path.with_name(path.name + ".tmp")
    with temporary.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    temporary.replace(path)


def ddf_to_nifti_array(ddf: np.ndarray) -> np.ndarray:
    """(ndim, *S) channel-first DDF -> (*S, ndim) channel-last, as NIfTI vector images store it."""
    return np.moveaxis(ddf, 0, -1).astype(np.float32)


class VolumeWriter:
    """Writes warped image, warped label and DDF of each evaluated pair as NIfTI (fixed affine)."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        out_dir.mkdir(parents=True, exist_ok=True)

    def __call__(self, batch: dict[str, Any], outputs: dict[str, torch.Tensor],
                 index: int) -> None:
        affine = batch["fixed_affine"][index].numpy()
        stem = f"{batch['fixed_id'][index]}__{batch['moving_id'][index]}"
        if "label_index" in batch and int(batch["label_index"][index]) >= 0:
            stem += f"__label{int(batch['label_index'][index])}"
        if "warped" in outputs:
            write_nifti(self.out_dir / f"{stem}_warped.nii.gz",
                        outputs["warped"][index, 0].numpy(), affine)
        if "warped_label" in outputs:
            label = (outputs["warped_label"][index].numpy() > 0.5).astype(np.uint8)
            write_nifti(self.out_dir / f"{stem}_warped_label.nii.gz",
                        np.moveaxis(label, 0, -1), affine)
        if "ddf" in outputs:
            write_nifti(self.out_dir / f"{stem}_ddf.nii.gz",
                        ddf_to_nifti_array(outputs["ddf"][index].numpy()), affine)


def dice_plot_rows(rows: list[dict[str, Any]], label_names: Sequence[str]
                   ) -> list[dict[str, Any]]:
    """Mean Dice per label and method, for the DVC bar plot."""
    table = []
    for method in ("none", "regflow"):
        selected = [row for row in rows if row["method"] == method]
        for name in label_names:
            values = [row[f"dice/{name}"] for row in selected if f"dice/{name}" in row]
            if values:
                table.append({"label": name, "method": method, "dice": float(np.mean(values))})
    return table


def training_curve_rows(run_id: str) -> list[dict[str, Any]]:
    """Training total loss and validation Dice per step, from the MLflow run."""
    client = mlflow.MlflowClient()
    rows: dict[int, dict[str, Any]] = {}
    for key, column in (("train/total", "train_loss"), ("val/dice_mean", "val_dice")):
        for point in client.get_metric_history(run_id, key):
            rows.setdefault(point.step, {"step": point.step})[column] = point.value
    return [rows[step] for step in sorted(rows)]


def headline_metrics(rows: list[dict[str, Any]], label_names: Sequence[str]
                     ) -> dict[str, float]:
    """metrics/eval.json: the DVC metrics (means over pairs, before and after)."""
    after, before = summarise(rows, "regflow"), summarise(rows, "none")
    headline = {"pairs": float(len([row for row in rows if row["method"] == "regflow"]))}
    for key in ("dice_mean", "hd95_mean", "tre_mm", "folding_pct", "sdlogj"):
        if key in after:
            headline[key] = after[key]
        if key in before and key not in ("folding_pct", "sdlogj"):
            headline[f"{key}_before"] = before[key]
    for name in label_names:
        if f"dice/{name}" in after:
            headline[f"dice_{name}"] = after[f"dice/{name}"]
    headline["time_ms_per_pair"] = 1000.0 * after.get("time_s", float("nan"))
    return {key: round(value, 6) for key, value in headline.items()}


def evaluate_stage(config: Config, metrics_dir: Path = Path("metrics"),
                   plots_dir: Path = Path("plots")) -> dict[str, float]:
    """Evaluate models/<name>/<best|last>.pt on a split, write metrics/plots/volumes, log them.

    Returns:
        The headline metrics written to metrics/eval.json.
    """
    manifest_file = manifest_path(config)
    manifest = read_manifest(manifest_file)
    out_dir = model_dir(config)
    checkpoint = out_dir / f"{config.evaluate.checkpoint}.pt"
    model, _ = RegistrationModel.load(checkpoint)
    device = select_device(config.train.device)
    model.to(device)
    label_names = label_names_of(manifest)
    spacing = manifest.get("spacing") or [1.0] * len(manifest["shape"])
    loader = build_dataloader(manifest_file, config.evaluate.split, config, train=False)
    volumes_dir = Path("eval") / config.train.name
    writer = VolumeWriter(volumes_dir) if config.evaluate.save_volumes else None
    rows = evaluate_pairs(model, loader, device, spacing, label_names,
                          with_hd95=config.evaluate.hd95, baseline=True, on_pair=writer)
    if not rows:
        raise RegflowError(f"{manifest_file}: split {config.evaluate.split!r} has no pairs")
    headline = headline_metrics(rows, label_names)
    if manifest.get("simulated"):
        headline["simulated_data"] = 1.0
    write_json(metrics_dir / "eval.json", headline)
    write_csv(metrics_dir / "pairs.csv", rows)
    dice_table = dice_plot_rows(rows, label_names)
    write_csv(plots_dir / "dice_per_label.csv", dice_table)
    viz.save_figure(viz.dice_bar_figure(dice_table), plots_dir / "dice_per_label.png")
    log_evaluation(config, out_dir, headline, metrics_dir, plots_dir, volumes_dir)
    return headline


def log_evaluation(config: Config, out_dir: Path, headline: dict[str, float],
                   metrics_dir: Path, plots_dir: Path, volumes_dir: Path) -> None:
    """Log the evaluation into the training run (models/<name>/run.json) and write the curves."""
    record = out_dir / "run.json"
    run_id = json.loads(record.read_text())["run_id"] if record.exists() else None
    experiment = f"regflow-{config.data.dataset}"
    with tracking.start_or_resume_run(experiment, run_id=run_id, run_name=config.train.name):
        if run_id:
            curve = training_curve_rows(run_id)
            write_csv(plots_dir / "training_curve.csv", curve)
            viz.save_figure(viz.training_curve_figure(curve), plots_dir / "training_curve.png")
        mlflow.log_metrics({f"eval/{key}": value for key, value in headline.items()
                            if np.isfinite(value)})
        mlflow.log_artifacts(str(metrics_dir), artifact_path="evaluation/metrics")
        mlflow.log_artifacts(str(plots_dir), artifact_path="evaluation/plots")
        if volumes_dir.is_dir():
            mlflow.log_artifacts(str(volumes_dir), artifact_path="evaluation/volumes")
