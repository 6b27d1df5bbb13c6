"""DeepReg's predict output, so that scripts written for ``deepreg_predict`` read regflow's.

``regflow predict --split S --layout deepreg --out DIR`` writes, for the i-th evaluation pair:

- ``pair_<i>/``: ``fixed_image``, ``moving_image``, ``pred_fixed_image`` (the warped moving
  image) and ``ddf`` as ``.nii.gz`` on the fixed grid;
- ``pair_<i>/label_<k>/`` (labelled data): ``fixed_label``, ``moving_label`` and
  ``pred_fixed_label`` of label channel k;
- next to every volume a folder of PNG slices along the last axis, ``<name>/depth<d>_<name>.png``
  (images scaled to [0, 1], labels as they are, the DDF as RGB of its three components);

and in ``DIR``:

- ``metrics.csv``: one row per pair and label: ``pair_index``, ``label_index``, the case ids,
  ``image_ssd`` (mean squared difference of fixed and warped images), ``label_binary_dice``
  (labels thresholded at 0.5), ``label_tre`` (distance of the label centroids, in voxels, as
  DeepReg measures it), ``folding_pct`` and ``sdlogj`` of the DDF;
- ``metrics_stats_per_label.csv`` and ``metrics_stats_overall.csv``: mean, std (n - 1), median
  and quartiles of every metric, per label and over all rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from regflow import metrics
from regflow.data.io import write_nifti
from regflow.fileio import write_csv

METRICS = ("image_ssd", "label_binary_dice", "label_tre", "folding_pct", "sdlogj")
STATISTICS = {
    "mean": np.mean,
    "std": lambda values: np.std(values, ddof=1) if len(values) > 1 else float("nan"),
    "median": np.median,
    "q1": lambda values: np.percentile(values, 25),
    "q3": lambda values: np.percentile(values, 75),
}


def pair_rows(pair_index: int, ids: dict[str, str], fixed: np.ndarray, warped: np.ndarray,
              ddf: np.ndarray | None, fixed_label: np.ndarray | None,
              warped_label: np.ndarray | None) -> list[dict[str, Any]]:
    """The ``metrics.csv`` rows of one pair: one per label channel (one, label -1, without).

    Args:
        pair_index, ids: the pair's index and its ``fixed_id``/``moving_id``.
        fixed, warped: (*S) fixed and warped moving images.
        ddf: (ndim, *S) displacement in voxels, or None (conditional method).
        fixed_label, warped_label: (L, *S) label channels, or None.
    """
    common: dict[str, Any] = {"pair_index": pair_index, **ids,
                              "image_ssd": float(np.mean((fixed - warped) ** 2))}
    if ddf is not None:
        common["folding_pct"] = 100.0 * float(metrics.folding_fraction(ddf[None]))
        common["sdlogj"] = float(metrics.sdlogj(ddf[None]))
    if fixed_label is None or warped_label is None:
        return [{"label_index": -1, **common}]
    dice = metrics.dice(fixed_label > 0.5, warped_label > 0.5)
    distances = np.linalg.norm(metrics.label_centroids(fixed_label)
                               - metrics.label_centroids(warped_label), axis=-1)
    return [{**common, "label_index": channel, "label_binary_dice": float(dice[channel]),
             "label_tre": float(distances[channel])} for channel in range(len(dice))]


def statistics_rows(rows: list[dict[str, Any]], by_label: bool) -> list[dict[str, Any]]:
    """Mean, std, median and quartiles of every metric: per ``label_index``, or overall.

    NaNs (an empty label's TRE) are left out; a metric without any value gets NaN.
    """
    groups: dict[Any, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row["label_index"] if by_label else "all", []).append(row)
    table = []
    for key in sorted(groups, key=str):
        entry: dict[str, Any] = {"label_index": key} if by_label else {}
        for name in METRICS:
            values = np.array([row[name] for row in groups[key] if name in row], dtype=float)
            values = values[np.isfinite(values)]
            for statistic, function in STATISTICS.items():
                entry[f"{name}_{statistic}"] = float(function(values)) if len(values) else (
                    float("nan"))
        table.append(entry)
    return table


def save_slices(volume: np.ndarray, folder: Path, name: str, scale: bool, channels: bool
                ) -> None:
    """PNG slices along the last axis: ``folder/<name>/depth<d>_<name>.png`` (one for 2-D).

    Args:
        volume: (*S) grey values, or (C, *S) with ``channels`` (a DDF: RGB of its components).
        scale: stretch to [0, 1] (images, DDF); labels are written as they are.
    """
    import matplotlib.image

    picture = np.moveaxis(volume, 0, -1) if channels else volume
    if channels and picture.shape[-1] == 2:  # a 2-D DDF: blue stays empty
        picture = np.concatenate([picture, np.zeros_like(picture[..., :1])], axis=-1)
    if scale:
        low, high = float(picture.min()), float(picture.max())
        picture = (picture - low) / (high - low) if high > low else np.zeros_like(picture)
    picture = np.clip(picture, 0.0, 1.0)
    spatial = picture.ndim - int(channels)
    slices = [picture] if spatial == 2 else [np.take(picture, depth, axis=2)
                                             for depth in range(picture.shape[2])]
    target = folder / name
    target.mkdir(parents=True, exist_ok=True)
    for depth, image in enumerate(slices):
        matplotlib.image.imsave(target / f"depth{depth}_{name}.png", image, cmap="gray",
                                vmin=0.0, vmax=1.0)


class DeepRegWriter:
    """``on_pair`` callback of :func:`regflow.evaluation.evaluate_pairs` writing DeepReg's tree.

    Args:
        out_dir: the (staging) output folder.
        png: also write PNG slices.
    """

    def __init__(self, out_dir: Path, png: bool = True):
        self.out_dir = out_dir
        self.png = png
        self.rows: list[dict[str, Any]] = []
        self.pairs = 0

    def __call__(self, batch: dict[str, Any], outputs: dict[str, torch.Tensor],
                 index: int) -> None:
        affine = batch["fixed_affine"][index].numpy()
        pair_dir = self.out_dir / f"pair_{self.pairs}"
        pair_dir.mkdir(parents=True)
        fixed = batch["fixed_image"][index, 0].numpy()
        warped = outputs["warped"][index, 0].numpy()
        ddf = outputs["ddf"][index].numpy() if "ddf" in outputs else None
        volumes = {"fixed_image": fixed, "moving_image": batch["moving_image"][index, 0].numpy(),
                   "pred_fixed_image": warped}
        for name, volume in volumes.items():
            self._save(pair_dir, name, volume, affine, scale=True, channels=False)
        if ddf is not None:
            self._save(pair_dir, "ddf", ddf, affine, scale=True, channels=True)
        labels = {name: batch[key][index].numpy() if key in batch else None
                  for name, key in (("fixed_label", "fixed_label"),
                                    ("moving_label", "moving_label"))}
        warped_label = outputs["warped_label"][index].numpy() if "warped_label" in outputs \
            else None
        if labels["fixed_label"] is not None and warped_label is not None:
            labels["pred_fixed_label"] = (warped_label > 0.5).astype(np.float32)
            for channel in range(warped_label.shape[0]):
                label_dir = pair_dir / f"label_{channel}"
                label_dir.mkdir()
                for name, label in labels.items():
                    if label is not None:
                        self._save(label_dir, name, label[channel], affine, scale=False,
                                   channels=False)
        ids = {"fixed_id": batch["fixed_id"][index], "moving_id": batch["moving_id"][index]}
        self.rows += pair_rows(self.pairs, ids, fixed, warped, ddf, labels["fixed_label"],
                               warped_label)
        self.pairs += 1

    def _save(self, folder: Path, name: str, volume: np.ndarray, affine: np.ndarray,
              scale: bool, channels: bool) -> None:
        """One volume as ``<name>.nii.gz`` (channels last) and, with ``png``, its slices."""
        write_nifti(folder / f"{name}.nii.gz", np.moveaxis(volume, 0, -1) if channels else volume,
                    affine)
        if self.png:
            save_slices(volume, folder, name, scale, channels)

    def write_metrics(self) -> None:
        """``metrics.csv`` and the two statistics CSVs, in the output folder."""
        columns = ["pair_index", "label_index", "fixed_id", "moving_id", *METRICS]
        write_csv(self.out_dir / "metrics.csv", self.rows, columns)
        write_csv(self.out_dir / "metrics_stats_per_label.csv",
                  statistics_rows(self.rows, by_label=True))
        write_csv(self.out_dir / "metrics_stats_overall.csv",
                  statistics_rows(self.rows, by_label=False))
