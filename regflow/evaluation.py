"""Registration quality of a model on pairs: Dice, HD95, label-centroid distance, folding, SDlogJ
and time per pair.

Used by validation during training (cheap metrics) and by the ``evaluate`` stage (all metrics,
plus "no registration" on the same pairs as the baseline).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch

from regflow import metrics
from regflow.inference import Registrar


def as_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Move every tensor of a batch to ``device`` (float64 affines stay on the CPU)."""
    return {
        key: value.to(device, non_blocking=True)
        if isinstance(value, torch.Tensor) and key != "fixed_affine" else value
        for key, value in batch.items()
    }


def pair_metrics(fixed_label: np.ndarray | None, warped_label: np.ndarray | None,
                 ddf: np.ndarray | None, spacing: Sequence[float], label_names: Sequence[str],
                 with_hd95: bool) -> dict[str, float]:
    """Metrics of one registered pair.

    Args:
        fixed_label: (L, *S) binary fixed labels, or None.
        warped_label: (L, *S) warped moving labels (soft values are thresholded at 0.5).
        ddf: (ndim, *S) displacement in voxels, or None (no registration / conditional).
        spacing: voxel size in mm per array axis.
        label_names: one name per label channel.
        with_hd95: also compute HD95 (mm), the slowest metric.

    Returns:
        A flat dict: ``dice/<name>``, ``dice_mean``, ``hd95/<name>``, ``hd95_mean``,
        ``centroid_distance_mm`` (mean over labels of the distance between the fixed and the
        warped label's centroid: no landmarks, so not a target registration error; runs logged
        before this name called it ``tre_mm``), ``folding_pct``, ``sdlogj``.
    """
    row: dict[str, float] = {}
    if fixed_label is not None and warped_label is not None:
        fixed_mask = fixed_label > 0.5
        warped_mask = warped_label > 0.5
        dice = metrics.dice(fixed_mask, warped_mask)
        for name, value in zip(label_names, dice, strict=True):
            row[f"dice/{name}"] = float(value)
        row["dice_mean"] = float(np.mean(dice))
        if with_hd95:
            distances = [metrics.hd95(fixed_mask[i], warped_mask[i], spacing)
                         for i in range(len(label_names))]
            for name, value in zip(label_names, distances, strict=True):
                row[f"hd95/{name}"] = float(value)
            row["hd95_mean"] = float(np.nanmean(distances)) if not np.all(
                np.isnan(distances)) else float("nan")
        fixed_centroids = metrics.label_centroids(fixed_mask)
        warped_centroids = metrics.label_centroids(warped_mask)
        distances_mm = np.linalg.norm((fixed_centroids - warped_centroids) * np.asarray(spacing),
                                      axis=-1)
        row["centroid_distance_mm"] = float(np.nanmean(distances_mm)) if not np.all(
            np.isnan(distances_mm)) else float("nan")
    if ddf is not None:
        row["folding_pct"] = 100.0 * float(metrics.folding_fraction(ddf[None]))
        row["sdlogj"] = float(metrics.sdlogj(ddf[None]))
    return row


def evaluate_pairs(registrar: Registrar, batches: Iterable[dict[str, Any]],
                   spacing: Sequence[float], label_names: Sequence[str],
                   with_hd95: bool = False, baseline: bool = False,
                   on_pair: Callable[[dict[str, Any], dict[str, torch.Tensor], int], None]
                   | None = None) -> list[dict[str, Any]]:
    """Register every pair of ``batches`` through the inference path and measure it.

    Args:
        registrar: the model (put in eval mode) with its refinement settings.
        batches: loader batches (the model's frame).
        spacing: voxel size in mm.
        label_names: names of the label channels.
        with_hd95: compute HD95 too.
        baseline: also add a ``method="none"`` row per pair (identity transform).
        on_pair: called as ``on_pair(batch, outputs, index_in_batch)`` for every pair (to save
            volumes or pictures).

    Returns:
        One row per pair (and method): ids, ``method``, metrics, ``time_s`` (seconds per pair,
        network and refinement).
    """
    rows: list[dict[str, Any]] = []
    for batch in batches:
        outputs = registrar.register_tensors(batch["moving_image"], batch["fixed_image"],
                                             batch.get("moving_label"))
        seconds = float(outputs.pop("time_s"))
        fixed_labels = batch.get("fixed_label")
        for index in range(batch["fixed_image"].shape[0]):
            fixed_label = None if fixed_labels is None else fixed_labels[index].numpy()
            ids = {"fixed_id": batch["fixed_id"][index], "moving_id": batch["moving_id"][index]}
            if "label_index" in batch and int(batch["label_index"][index]) >= 0:
                ids["label_index"] = int(batch["label_index"][index])
            names = _names_for(label_names, ids.get("label_index"))
            warped_label = outputs.get("warped_label")
            ddf = outputs.get("ddf")
            rows.append({**ids, "method": "regflow", "time_s": seconds, **pair_metrics(
                fixed_label, None if warped_label is None else warped_label[index].numpy(),
                None if ddf is None else ddf[index].numpy(), spacing, names, with_hd95)})
            if baseline:
                moving_label = batch.get("moving_label")
                zero_ddf = np.zeros((len(spacing), *batch["fixed_image"].shape[2:]), np.float32)
                rows.append({**ids, "method": "none", "time_s": 0.0, **pair_metrics(
                    fixed_label, None if moving_label is None else moving_label[index].numpy(),
                    zero_ddf, spacing, names, with_hd95)})
            if on_pair is not None:
                on_pair(batch, outputs, index)
    return rows


def _names_for(label_names: Sequence[str], label_index: int | None) -> list[str]:
    """The label names of one item: all of them, or the one sampled channel."""
    return list(label_names) if label_index is None else [label_names[label_index]]


def validation_score(summary: dict[str, float]) -> float:
    """Higher is better: mean Dice when labels exist, else minus the folding percentage."""
    if "dice_mean" in summary:
        return summary["dice_mean"]
    return -summary.get("folding_pct", 0.0)


def summarise(rows: list[dict[str, Any]], method: str = "regflow") -> dict[str, float]:
    """Mean of every numeric metric over the rows of one method (NaNs ignored)."""
    selected = [row for row in rows if row["method"] == method]
    keys = sorted({key for row in selected for key, value in row.items()
                   if isinstance(value, float) and key != "label_index"})
    summary = {}
    for key in keys:
        values = np.array([row.get(key, np.nan) for row in selected], dtype=float)
        summary[key] = float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
    return summary


def dice_plot_rows(rows: list[dict[str, Any]], label_names: Sequence[str]
                   ) -> list[dict[str, Any]]:
    """Mean Dice per label and method ("none", "regflow"), for the DVC bar plot."""
    table = []
    for method in ("none", "regflow"):
        selected = [row for row in rows if row["method"] == method]
        for name in label_names:
            values = [row[f"dice/{name}"] for row in selected if f"dice/{name}" in row]
            if values:  # NaNs left out, as in summarise()
                mean = float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
                table.append({"label": name, "method": method, "dice": mean})
    return table


def dice30(pair_dice: Sequence[float]) -> float:
    """Learn2Reg's robustness figure: the 30th percentile of the pairs' mean Dice (NaN skipped;
    NaN when no pair has one)."""
    finite = [value for value in pair_dice if np.isfinite(value)]
    return float(np.percentile(finite, 30)) if finite else float("nan")


def headline_metrics(rows: list[dict[str, Any]], label_names: Sequence[str]
                     ) -> dict[str, float]:
    """metrics/eval.json: means over pairs after registration, and before where it means
    something (Dice, HD95, centroid distance; folding and SDlogJ of no registration are 0);
    ``dice30``, the 30th percentile of the pairs' mean Dice (Learn2Reg's Dice30)."""
    after, before = summarise(rows, "regflow"), summarise(rows, "none")
    headline = {"pairs": float(len([row for row in rows if row["method"] == "regflow"]))}
    for key in ("dice_mean", "hd95_mean", "centroid_distance_mm", "folding_pct", "sdlogj"):
        if key in after:
            headline[key] = after[key]
        if key in before and key not in ("folding_pct", "sdlogj"):
            headline[f"{key}_before"] = before[key]
    for name in label_names:
        if f"dice/{name}" in after:
            headline[f"dice_{name}"] = after[f"dice/{name}"]
    pair_dice = [row["dice_mean"] for row in rows
                 if row["method"] == "regflow" and np.isfinite(row.get("dice_mean", np.nan))]
    if pair_dice:
        headline["dice30"] = dice30(pair_dice)
    headline["time_ms_per_pair"] = 1000.0 * after.get("time_s", float("nan"))
    return {key: round(value, 6) for key, value in headline.items()}
