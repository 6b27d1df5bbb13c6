"""DeepReg's predict output, so that scripts written for ``deepreg_predict`` read regflow's.

``regflow predict --split S --layout deepreg --out DIR`` writes, for the i-th evaluation pair
(pairs numbered in the order they first appear):

- ``pair_<i>/``: ``fixed_image``, ``moving_image``, ``pred_fixed_image`` (the warped moving
  image) and ``ddf`` as ``.nii.gz`` on the fixed grid; ``dvf`` (the network's velocity field) for
  method dvf; ``affine.txt`` for method affine: the network's ``theta``, ``ndim`` comma-separated
  rows of ``ndim + 1`` numbers, ``moving voxel = A (x - c) + t + c`` about the volume centre c
  (:func:`regflow.spatial.affine_to_ddf`). A conditional model has no image, DDF or matrix;
- ``pair_<i>/label_<k>/`` (labelled data): ``fixed_label``, ``moving_label`` and
  ``pred_fixed_label`` of label k, k being the label's index in the dataset. With
  ``loader.sample_label: stack`` a pair carries every label at once; with ``sample`` or ``all``
  (evaluation registers each pair once per label, as DeepReg does) each label arrives as its own
  item of the same pair and goes to its own folder;
- next to every volume (unless ``--no-png``) a folder of PNG slices along the last axis,
  ``<name>/depth<d>_<name>.png`` (images scaled to [0, 1], labels as they are, fields as RGB of
  their components); ``--no-nifti`` leaves out the ``.nii.gz`` files;

and in ``DIR``:

- ``metrics.csv``: one row per pair and label: ``pair_index``, ``label_index``, the case ids,
  ``image_ssd`` (mean squared difference of fixed and warped images), ``label_binary_dice``
  (labels thresholded at 0.5), ``label_tre`` (distance of the label centroids, in voxels, as
  DeepReg measures it), ``folding_pct`` and ``sdlogj`` of the DDF;
- ``metrics_stats_per_label.csv``: per ``label_index``, ``<metric>_mean``, ``_median`` and
  ``_std`` (n - 1) columns in alphabetical order, as DeepReg's pandas table;
- ``metrics_stats_overall.csv``: the rows of pandas' ``describe()`` (count, mean, std, min, 25%,
  50%, 75%, max) for every metric over all rows, computed here with numpy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from regflow import metrics
from regflow.data.io import write_nifti
from regflow.fileio import write_csv, write_text

METRICS = ("image_ssd", "label_binary_dice", "label_tre", "folding_pct", "sdlogj")
PER_LABEL = ("mean", "median", "std")
DESCRIBE = ("count", "mean", "std", "min", "25%", "50%", "75%", "max")


def pair_rows(pair_index: int, ids: dict[str, str], fixed: np.ndarray, warped: np.ndarray | None,
              ddf: np.ndarray | None, fixed_label: np.ndarray | None,
              warped_label: np.ndarray | None, label_indices: list[int] | None = None
              ) -> list[dict[str, Any]]:
    """The ``metrics.csv`` rows of one batch item: one per label channel (one, label -1, without).

    Args:
        pair_index, ids: the pair's index and its ``fixed_id``/``moving_id``.
        fixed: (*S) fixed image.
        warped: (*S) warped moving image, or None (conditional method: no image metric).
        ddf: (ndim, *S) displacement in voxels, or None (conditional method).
        fixed_label, warped_label: (L, *S) label channels, or None.
        label_indices: the dataset's label index of each channel (default ``0..L-1``).
    """
    common: dict[str, Any] = {"pair_index": pair_index, **ids}
    if warped is not None:
        common["image_ssd"] = float(np.mean((fixed - warped) ** 2))
    if ddf is not None:
        common["folding_pct"] = 100.0 * float(metrics.folding_fraction(ddf[None]))
        common["sdlogj"] = float(metrics.sdlogj(ddf[None]))
    if fixed_label is None or warped_label is None:
        return [{"label_index": -1, **common}]
    dice = metrics.dice(fixed_label > 0.5, warped_label > 0.5)
    distances = np.linalg.norm(metrics.label_centroids(fixed_label)
                               - metrics.label_centroids(warped_label), axis=-1)
    indices = label_indices if label_indices is not None else list(range(len(dice)))
    return [{**common, "label_index": label, "label_binary_dice": float(dice[channel]),
             "label_tre": float(distances[channel])} for channel, label in enumerate(indices)]


def _metric_values(rows: list[dict[str, Any]], name: str) -> np.ndarray:
    """The finite values of one metric over ``rows`` (missing cells and NaNs left out)."""
    values = np.array([row[name] for row in rows if name in row], dtype=float)
    return values[np.isfinite(values)]


def _std(values: np.ndarray) -> float:
    """Sample standard deviation (n - 1), NaN below two values (pandas' ``std``)."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")


def describe(values: np.ndarray) -> dict[str, float]:
    """pandas' ``Series.describe()`` of numbers: count, mean, std (n - 1), min, the quartiles
    (linear interpolation) and max; NaN for each statistic but the count when there are none."""
    if not len(values):
        return {"count": 0.0, **{key: float("nan") for key in DESCRIBE[1:]}}
    quartiles = np.percentile(values, [25, 50, 75])
    return {"count": float(len(values)), "mean": float(np.mean(values)), "std": _std(values),
            "min": float(np.min(values)), "25%": float(quartiles[0]),
            "50%": float(quartiles[1]), "75%": float(quartiles[2]),
            "max": float(np.max(values))}


def _present_metrics(rows: list[dict[str, Any]]) -> list[str]:
    return [name for name in METRICS if any(name in row for row in rows)]


def statistics_per_label(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean, median and std (n - 1) of every metric per ``label_index`` (DeepReg's table).

    NaNs (an empty label's TRE) are left out; a metric without any value gets NaN.
    """
    names = _present_metrics(rows)
    columns = sorted(f"{name}_{statistic}" for name in names for statistic in PER_LABEL)
    table = []
    for label in sorted({row["label_index"] for row in rows}):
        group = [row for row in rows if row["label_index"] == label]
        entry: dict[str, Any] = {}
        for name in names:
            values = _metric_values(group, name)
            entry[f"{name}_mean"] = float(np.mean(values)) if len(values) else float("nan")
            entry[f"{name}_median"] = float(np.median(values)) if len(values) else float("nan")
            entry[f"{name}_std"] = _std(values)
        table.append({"label_index": label, **{column: entry[column] for column in columns}})
    return table


def statistics_overall(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``describe()`` of every metric over all rows: one row per statistic, first column its
    name (pandas writes the index without a header)."""
    columns = {name: describe(_metric_values(rows, name)) for name in _present_metrics(rows)}
    return [{"": statistic, **{name: column[statistic] for name, column in columns.items()}}
            for statistic in DESCRIBE]


def save_slices(volume: np.ndarray, folder: Path, name: str, scale: bool, channels: bool
                ) -> None:
    """PNG slices along the last axis: ``folder/<name>/depth<d>_<name>.png`` (one for 2-D).

    Args:
        volume: (*S) grey values, or (C, *S) with ``channels`` (a field: RGB of its components).
        scale: stretch to [0, 1] (images, fields); labels are written as they are.
    """
    import matplotlib.image

    picture = np.moveaxis(volume, 0, -1) if channels else volume
    if channels and picture.shape[-1] == 2:  # a 2-D field: blue stays empty
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


def _item(outputs: dict[str, torch.Tensor], key: str, index: int) -> np.ndarray | None:
    """``outputs[key][index]`` as numpy, or None when the model did not produce it."""
    return outputs[key][index].numpy() if key in outputs else None


class DeepRegWriter:
    """``on_pair`` callback of :func:`regflow.evaluation.evaluate_pairs` writing DeepReg's tree.

    Args:
        out_dir: the (staging) output folder.
        png: write PNG slices.
        nifti: write the ``.nii.gz`` volumes.
    """

    def __init__(self, out_dir: Path, png: bool = True, nifti: bool = True):
        self.out_dir = out_dir
        self.png = png
        self.nifti = nifti
        self.rows: list[dict[str, Any]] = []
        self.pair_indices: dict[tuple[str, str], int] = {}

    def __call__(self, batch: dict[str, Any], outputs: dict[str, torch.Tensor],
                 index: int) -> None:
        ids = {"fixed_id": batch["fixed_id"][index], "moving_id": batch["moving_id"][index]}
        key = (ids["fixed_id"], ids["moving_id"])
        first_time = key not in self.pair_indices
        pair_index = self.pair_indices.setdefault(key, len(self.pair_indices))
        pair_dir = self.out_dir / f"pair_{pair_index}"
        affine = batch["fixed_affine"][index].numpy()
        fixed = batch["fixed_image"][index, 0].numpy()
        warped = _item(outputs, "warped", index)
        ddf = _item(outputs, "ddf", index)
        if first_time:
            pair_dir.mkdir(parents=True)
            self._write_pair(pair_dir, batch, outputs, index, affine)
        fixed_label = batch["fixed_label"][index].numpy() if "fixed_label" in batch else None
        warped_label = _item(outputs, "warped_label", index)
        label_indices = None
        if fixed_label is not None and warped_label is not None:
            label_index = int(batch["label_index"][index]) if "label_index" in batch else -1
            label_indices = ([label_index] if label_index >= 0
                             else list(range(warped_label.shape[0])))
            labels = {"fixed_label": fixed_label, "moving_label": batch["moving_label"][index]
                      .numpy(), "pred_fixed_label": (warped_label > 0.5).astype(np.float32)}
            for channel, label in enumerate(label_indices):
                label_dir = pair_dir / f"label_{label}"
                label_dir.mkdir(exist_ok=True)
                for name, volume in labels.items():
                    self._save(label_dir, name, volume[channel], affine, scale=False,
                               channels=False)
        self.rows += pair_rows(pair_index, ids, fixed, warped, ddf, fixed_label, warped_label,
                               label_indices)

    def _write_pair(self, pair_dir: Path, batch: dict[str, Any],
                    outputs: dict[str, torch.Tensor], index: int, affine: np.ndarray) -> None:
        """The pair's own files: images, warped image, fields and affine matrix (as present)."""
        volumes = {"fixed_image": batch["fixed_image"][index, 0].numpy(),
                   "moving_image": batch["moving_image"][index, 0].numpy()}
        if "warped" in outputs:
            volumes["pred_fixed_image"] = outputs["warped"][index, 0].numpy()
        for name, volume in volumes.items():
            self._save(pair_dir, name, volume, affine, scale=True, channels=False)
        for name in ("ddf", "dvf"):
            if name in outputs:
                self._save(pair_dir, name, outputs[name][index].numpy(), affine, scale=True,
                           channels=True)
        if "theta" in outputs:
            theta = outputs["theta"][index].numpy()
            write_text(pair_dir / "affine.txt", "".join(
                ",".join(f"{value:.9g}" for value in row) + "\n" for row in theta))

    def _save(self, folder: Path, name: str, volume: np.ndarray, affine: np.ndarray,
              scale: bool, channels: bool) -> None:
        """One volume as ``<name>.nii.gz`` (channels last) and its PNG slices, as asked."""
        if self.nifti:
            write_nifti(folder / f"{name}.nii.gz",
                        np.moveaxis(volume, 0, -1) if channels else volume, affine)
        if self.png:
            save_slices(volume, folder, name, scale, channels)

    def write_metrics(self) -> None:
        """``metrics.csv`` and the two statistics CSVs, in the output folder."""
        columns = ["pair_index", "label_index", "fixed_id", "moving_id", *METRICS]
        write_csv(self.out_dir / "metrics.csv", self.rows, columns)
        write_csv(self.out_dir / "metrics_stats_per_label.csv", statistics_per_label(self.rows))
        write_csv(self.out_dir / "metrics_stats_overall.csv", statistics_overall(self.rows))
