"""Registration pictures: overlays, checkerboards, deformation grids (matplotlib, no display).

Figures are built with ``matplotlib.figure.Figure`` directly, so they render with the Agg canvas,
never open a window and never accumulate in pyplot's global figure list. Inputs are numpy arrays
or torch tensors, 3-D (D, H, W) or 2-D (H, W); leading batch/channel axes of size 1 are dropped.
"""

from __future__ import annotations

from itertools import cycle
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

from regflow.arrays import to_numpy
from regflow.fileio import atomic_open

LABEL_COLOURS = ("tab:red", "tab:cyan", "tab:orange", "tab:green", "tab:purple", "tab:olive")


def _spatial(image: Any) -> np.ndarray:
    """Drop leading singleton axes of an image: (1, 1, D, H, W) -> (D, H, W); 2-D stays 2-D."""
    image = to_numpy(image)
    while image.ndim > 2 and image.shape[0] == 1:
        image = image[0]
    if image.ndim not in (2, 3):
        raise ValueError(f"expected a 2-D or 3-D image, got shape {image.shape}")
    return image.astype(np.float32)


def _label_masks(label: Any, shape: tuple[int, ...]) -> list[np.ndarray]:
    """Binary masks, one per foreground label, from (L, *shape) channels or a (*shape) map.

    A map holding non-integer values is one soft channel (thresholded at 0.5); otherwise each
    non-zero value is a label. Channels are thresholded at 0.5.
    """
    label = to_numpy(label)
    while label.ndim > len(shape) + 1 and label.shape[0] == 1:
        label = label[0]
    if label.shape == shape and not np.array_equal(label, np.round(label)):
        return [label > 0.5]  # one soft (e.g. sigmoid) channel
    if label.shape == shape:  # integer (or binary) map
        return [label == value for value in np.unique(label) if value != 0]
    if label.ndim == len(shape) + 1 and label.shape[1:] == shape:
        return [channel > 0.5 for channel in label]
    raise ValueError(f"label shape {label.shape} does not match image shape {shape}")


def display_range(*images: Any) -> tuple[float, float]:
    """Grey-scale window of images: their 0.5th and 99.5th percentiles together, so that a few
    bright voxels do not darken the picture (min and max where that range is empty)."""
    values = np.concatenate([to_numpy(image).ravel() for image in images])
    low, high = (float(value) for value in np.percentile(values, [0.5, 99.5]))
    return (low, high) if high > low else (float(values.min()), float(values.max()))


def windowed(image: Any) -> np.ndarray:
    """``image`` scaled to [0, 1] over its own :func:`display_range` (clipped outside it), so
    that images of different intensity scales can share one picture."""
    values = to_numpy(image).astype(np.float32)
    low, high = display_range(values)
    return np.clip((values - low) / max(high - low, 1e-12), 0.0, 1.0)


def _planes(shape: tuple[int, ...]) -> list[tuple[int | None, int]]:
    """(axis, index) of the middle slice of each orthogonal plane; (None, 0) for 2-D."""
    if len(shape) == 2:
        return [(None, 0)]
    return [(axis, shape[axis] // 2) for axis in range(3)]


def _slice(array: np.ndarray, axis: int | None, index: int) -> np.ndarray:
    return array if axis is None else np.take(array, index, axis=axis)


def checkerboard(a: Any, b: Any, tiles: int = 8) -> np.ndarray:
    """Interleave two same-shape images in a checkerboard of tiles.

    Args:
        a, b: images of the same shape, any number of dimensions (numpy or torch).
        tiles: tiles along each axis; axis of size n is cut at ``floor(i * tiles / n)``.

    Returns:
        Array of that shape: ``a`` on tiles whose index sum is even, ``b`` on odd ones.
    """
    a, b = to_numpy(a), to_numpy(b)
    if a.shape != b.shape:
        raise ValueError(f"checkerboard needs equal shapes, got {a.shape} and {b.shape}")
    parity = np.zeros(a.shape, dtype=int)
    for axis, size in enumerate(a.shape):
        tile = np.arange(size) * tiles // size
        parity = parity + tile.reshape([-1 if i == axis else 1 for i in range(a.ndim)])
    return np.where(parity % 2 == 0, a, b)


def overlay_figure(fixed: Any, moving: Any, warped: Any, fixed_label: Any = None,
                   warped_label: Any = None, moving_label: Any = None) -> Figure:
    """Middle slices of fixed / moving / warped / checkerboard(fixed, warped) with label contours.

    One row per orthogonal plane (3 for 3-D, 1 for 2-D), one column per image. Contours: the
    moving label on moving, the warped label on warped, the fixed label on fixed and dashed on
    warped and on the checkerboard (so misalignment shows as a gap between the two outlines).

    Args:
        fixed, moving, warped: (D, H, W) or (H, W) images (leading singleton axes allowed).
        fixed_label, warped_label, moving_label: optional (L, *S) binary channels or (*S) maps.

    Returns:
        The figure (not shown; save it with :func:`save_figure` or ``mlflow.log_figure``).
    """
    images = [_spatial(fixed), _spatial(moving), _spatial(warped)]
    shape = images[0].shape
    images.append(checkerboard(images[0], images[2]))
    masks = {name: _label_masks(label, shape) if label is not None else []
             for name, label in (("fixed", fixed_label), ("moving", moving_label),
                                 ("warped", warped_label))}
    contours = ([("fixed", "solid")], [("moving", "solid")],
                [("warped", "solid"), ("fixed", "dashed")], [("fixed", "dashed")])
    vmin = min(float(image.min()) for image in images[:3])
    vmax = max(float(image.max()) for image in images[:3])

    planes = _planes(shape)
    figure = Figure(figsize=(12, 3 * len(planes)), layout="constrained")
    axes = figure.subplots(len(planes), 4, squeeze=False)
    titles = ("fixed", "moving", "warped", "checkerboard")
    for row, (axis, index) in enumerate(planes):
        for column, image in enumerate(images):
            ax = axes[row, column]
            ax.imshow(_slice(image, axis, index), cmap="gray", vmin=vmin, vmax=vmax)
            for name, style in contours[column]:
                for colour, mask in zip(cycle(LABEL_COLOURS), masks[name]):
                    plane = _slice(mask, axis, index).astype(np.float32)
                    if plane.min() != plane.max():
                        ax.contour(plane, levels=[0.5], colors=colour, linestyles=style,
                                   linewidths=1.0)
            ax.set_axis_off()
            title = titles[column] if axis is None else f"{titles[column]}, axis {axis}={index}"
            ax.set_title(title, fontsize=9)
    return figure


def deformation_grid_figure(ddf: Any, step: int = 4) -> Figure:
    """Deformed grid lines on the middle slice of each orthogonal plane.

    The grid point at voxel x is drawn at x + ddf(x), projected on the plane; lines run every
    ``step`` voxels. Axes are in voxels with the first in-plane axis downwards (as ``imshow``).

    Args:
        ddf: (ndim, *S) or (1, ndim, *S) displacement in voxels, channel i along array axis i;
            ndim 3 ((3, D, H, W)) or 2 ((2, H, W)).
        step: grid spacing in voxels.

    Returns:
        One panel per plane (3 for 3-D, 1 for 2-D).
    """
    ddf = to_numpy(ddf).astype(np.float32)
    if ddf.ndim in (4, 5) and ddf.shape[0] == 1 and ddf.shape[1] == ddf.ndim - 2:
        ddf = ddf[0]
    if ddf.ndim not in (3, 4) or ddf.shape[0] != ddf.ndim - 1:
        raise ValueError(f"expected a ddf of shape (ndim, *spatial), got {ddf.shape}")
    shape = ddf.shape[1:]
    planes = _planes(shape)
    figure = Figure(figsize=(4 * len(planes), 4), layout="constrained")
    axes = figure.subplots(1, len(planes), squeeze=False)[0]
    for ax, (axis, index) in zip(axes, planes, strict=True):
        rows, cols = [i for i in range(len(shape)) if i != axis]
        row_disp = _slice(ddf[rows], axis, index)  # (n_rows, n_cols) along the row axis
        col_disp = _slice(ddf[cols], axis, index)
        grid_rows, grid_cols = np.indices(row_disp.shape, dtype=np.float32)
        y, x = grid_rows + row_disp, grid_cols + col_disp
        for i in range(0, y.shape[0], step):
            ax.plot(x[i, :], y[i, :], color="tab:blue", linewidth=0.8)
        for j in range(0, y.shape[1], step):
            ax.plot(x[:, j], y[:, j], color="tab:blue", linewidth=0.8)
        ax.invert_yaxis()
        ax.set_aspect("equal")
        ax.set_title("ddf grid" if axis is None else f"ddf grid, axis {axis}={index}", fontsize=9)
    return figure


def checkerboard_figure(fixed: Any, warped: Any, moving: Any = None, tiles: int = 8) -> Figure:
    """Checkerboards of the fixed image with the moving one (before) and the warped one (after).

    One row per orthogonal plane's middle slice (3 for 3-D, 1 for 2-D). Where registration
    worked, edges run on across tile borders in the "after" column; misalignment shows as steps.

    Args:
        fixed, warped: (D, H, W) or (H, W) images (leading singleton axes allowed).
        moving: the moving image on the same grid, for the "before" column; None leaves it out.
        tiles: tiles along each axis.
    """
    fixed, warped = windowed(_spatial(fixed)), windowed(_spatial(warped))
    boards = [("after: fixed / warped", checkerboard(fixed, warped, tiles))]
    if moving is not None:
        boards.insert(0, ("before: fixed / moving",
                          checkerboard(fixed, windowed(_spatial(moving)), tiles)))
    vmin, vmax = 0.0, 1.0  # each image in its own window: raw scans differ in scale
    planes = _planes(fixed.shape)
    figure = Figure(figsize=(4 * len(boards), 3.6 * len(planes)), layout="constrained")
    axes = figure.subplots(len(planes), len(boards), squeeze=False)
    for row, (axis, index) in enumerate(planes):
        for column, (title, board) in enumerate(boards):
            ax = axes[row, column]
            ax.imshow(_slice(board, axis, index), cmap="gray", vmin=vmin, vmax=vmax)
            ax.set_axis_off()
            ax.set_title(title if axis is None else f"{title}, axis {axis}={index}", fontsize=9)
    return figure


def jacobian_figure(ddf: Any) -> Figure:
    """The Jacobian determinant of ``x -> x + ddf(x)`` on the middle slice of each plane, with
    folding (determinant <= 0) marked in black.

    Colours: blue where the transform shrinks volume (det < 1), white where it keeps it, red
    where it expands (det > 1), clipped to [0, 2]; the title gives the folded fraction.

    Args:
        ddf: (ndim, *S) or (1, ndim, *S) displacement in voxels.
    """
    import torch

    from regflow.spatial import jacobian_determinant

    field = to_numpy(ddf).astype(np.float32)
    if field.ndim in (4, 5) and field.shape[0] == 1 and field.shape[1] == field.ndim - 2:
        field = field[0]
    determinant = jacobian_determinant(torch.from_numpy(field)[None])[0].numpy()
    folded = determinant <= 0
    planes = _planes(determinant.shape)
    figure = Figure(figsize=(4 * len(planes) + 1, 4), layout="constrained")
    axes = figure.subplots(1, len(planes), squeeze=False)[0]
    image = None
    for ax, (axis, index) in zip(axes, planes, strict=True):
        image = ax.imshow(_slice(determinant, axis, index), cmap="RdBu_r", vmin=0.0, vmax=2.0)
        mask = _slice(folded, axis, index)
        ax.imshow(np.ma.masked_where(~mask, mask), cmap=ListedColormap(["black"]),
                  interpolation="nearest")
        ax.set_axis_off()
        ax.set_title("det J" if axis is None else f"det J, axis {axis}={index}", fontsize=9)
    figure.colorbar(image, ax=list(axes), shrink=0.8, label="Jacobian determinant")
    figure.suptitle(f"folding (det J <= 0, black): {100 * folded.mean():.3f} % of "
                    f"{folded.size} voxels; det J in [{determinant.min():.2f}, "
                    f"{determinant.max():.2f}]", fontsize=10)
    return figure


def mosaic_figure(volumes: list[Any], titles: list[str], slices: list[int], axis: int = 2
                  ) -> Figure:
    """Slices of several volumes side by side: one row per slice index, one column per volume.

    Args:
        volumes: same-shape (D, H, W) images; each is shown on its own grey scale.
        titles: one column title per volume.
        slices: slice indices along ``axis``.
        axis: the array axis slices are taken along (DeepReg's ``deepreg_vis`` takes the last).
    """
    images = [_spatial(volume) for volume in volumes]
    figure = Figure(figsize=(2.4 * len(images), 2.4 * len(slices)), layout="constrained")
    axes = figure.subplots(len(slices), len(images), squeeze=False)
    for column, (image, title) in enumerate(zip(images, titles, strict=True)):
        low, high = display_range(image)
        for row, index in enumerate(slices):
            ax = axes[row, column]
            ax.imshow(_slice(image, axis if image.ndim == 3 else None, index), cmap="gray",
                      vmin=low, vmax=high)
            ax.set_axis_off()
            ax.set_title(f"{title}, slice {index}" if row == 0 else f"slice {index}",
                         fontsize=8)
    return figure


def dice_bar_figure(table: list[dict[str, Any]]) -> Figure:
    """Grouped bars of mean Dice per label, before ("none") and after ("regflow") registration.

    Args:
        table: rows ``{"label", "method", "dice"}``.
    """
    labels = sorted({row["label"] for row in table})
    figure = Figure(figsize=(5, 3))
    axes = figure.add_subplot()
    width = 0.38
    for offset, method in ((-width / 2, "none"), (width / 2, "regflow")):
        values = [next((row["dice"] for row in table
                        if row["label"] == label and row["method"] == method), 0.0)
                  for label in labels]
        axes.bar(np.arange(len(labels)) + offset, values, width, label=method)
    axes.set_xticks(np.arange(len(labels)), labels)
    axes.set_ylim(0, 1)
    axes.set_ylabel("Dice")
    axes.legend()
    figure.tight_layout()
    return figure


def training_curve_figure(rows: list[dict[str, Any]]) -> Figure:
    """Training loss and validation Dice against step.

    Args:
        rows: ``{"step", "train_loss"?, "val_dice"?}`` per logged step.
    """
    figure = Figure(figsize=(6, 3))
    loss_axes = figure.add_subplot()
    losses = [row for row in rows if "train_loss" in row]
    loss_axes.plot([row["step"] for row in losses], [row["train_loss"] for row in losses],
                   lw=0.8)
    loss_axes.set_xlabel("step")
    loss_axes.set_ylabel("train loss")
    validation = [row for row in rows if "val_dice" in row]
    if validation:
        dice_axes = loss_axes.twinx()
        dice_axes.plot([row["step"] for row in validation],
                       [row["val_dice"] for row in validation], "o-", color="C1")
        dice_axes.set_ylabel("val Dice")
    figure.tight_layout()
    return figure


def pareto_front_figure(trials: list[dict[str, Any]], max_sdlogj: float | None,
                        pick: int | None, baseline: int | None = None) -> Figure:
    """A two-objective study: validation Dice against SDlogJ of every finished trial.

    Args:
        trials: one row per trial: ``number``, ``dice``, ``sdlogj``, ``feasible`` (within the
            folding limit) and ``front`` (on the Pareto front of the feasible trials).
        max_sdlogj: the rule's SDlogJ limit, drawn as a dashed line (None: no limit).
        pick: number of the trial the rule picked (a star), or None.
        baseline: number of the trial that ran the config's own values (a square), or None.
    """
    figure = Figure(figsize=(6, 4))
    axes = figure.add_subplot()
    for feasible, style in ((True, {"marker": "o", "color": "tab:blue",
                                    "label": "trial (folding within the limit)"}),
                            (False, {"marker": "x", "color": "tab:gray",
                                     "label": "trial folding above the limit"})):
        rows = [row for row in trials if row["feasible"] == feasible]
        if rows:
            axes.scatter([row["sdlogj"] for row in rows], [row["dice"] for row in rows], s=18,
                         alpha=0.7, **style)
    front = sorted((row for row in trials if row["front"]), key=lambda row: row["sdlogj"])
    if front:
        axes.step([row["sdlogj"] for row in front], [row["dice"] for row in front],
                  where="post", color="tab:orange", label="Pareto front")
        for row in front:
            axes.annotate(str(row["number"]), (row["sdlogj"], row["dice"]), fontsize=7,
                          xytext=(3, -9), textcoords="offset points")
    marks = ((baseline, "s", "none", "config's own values"), (pick, "*", "tab:red", "rule's pick"))
    for number, marker, face, label in marks:
        row = next((row for row in trials if row["number"] == number), None)
        if row is not None:
            axes.scatter([row["sdlogj"]], [row["dice"]], marker=marker, s=160,
                         facecolors=face, edgecolors="tab:red", label=f"{label} ({number})")
    if max_sdlogj is not None:
        axes.axvline(max_sdlogj, color="tab:red", linestyle="--", linewidth=0.8,
                     label=f"SDlogJ limit {max_sdlogj:g}")
    axes.set_xlabel("SDlogJ (lower is smoother)")
    axes.set_ylabel("validation Dice")
    axes.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    return figure


def save_figure(figure: Figure, path: str | Path, dpi: int = 100) -> Path:
    """Write the figure as a PNG atomically (temporary file in the same folder, then rename).

    Args:
        figure: a matplotlib figure.
        path: destination ``.png``; missing parent folders are created.
        dpi: resolution in dots per inch.

    Returns:
        The destination path.
    """
    with atomic_open(path, "wb") as stream:
        figure.savefig(stream, format="png", dpi=dpi)
    return Path(path)
