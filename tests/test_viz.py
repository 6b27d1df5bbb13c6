"""Tests for regflow.viz: checkerboards, overlays, deformation grids, atomic PNG writes."""

import numpy as np
import pytest
import torch

from regflow.viz import (
    checkerboard,
    checkerboard_figure,
    deformation_grid_figure,
    display_range,
    jacobian_figure,
    overlay_figure,
    save_figure,
    windowed,
)
from tests.test_vis import SHAPE, folding_ddf, ramp

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def blob(shape, centre_shift=0.0):
    grids = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    radius2 = sum((g - (n - 1) / 2 - centre_shift) ** 2 for g, n in zip(grids, shape, strict=True))
    return np.exp(-radius2 / (2 * (min(shape) / 5) ** 2)).astype(np.float32)


def test_checkerboard_alternates_every_tile():
    zeros, ones = np.zeros((8, 8)), np.ones((8, 8))
    board = checkerboard(zeros, ones, tiles=8)
    np.testing.assert_array_equal(board, np.indices((8, 8)).sum(0) % 2)
    board = checkerboard(zeros, ones, tiles=2)  # 4x4 tiles
    np.testing.assert_array_equal(board[:4, :4], 0)
    np.testing.assert_array_equal(board[:4, 4:], 1)
    np.testing.assert_array_equal(board[4:, :4], 1)
    np.testing.assert_array_equal(board[4:, 4:], 0)


def test_checkerboard_3d_torch_takes_values_from_both():
    a, b = torch.arange(64.0).reshape(4, 4, 4), -torch.arange(64.0).reshape(4, 4, 4)
    board = checkerboard(a, b, tiles=4)
    parity = np.indices((4, 4, 4)).sum(0) % 2
    np.testing.assert_array_equal(board, np.where(parity == 0, a.numpy(), b.numpy()))


def test_checkerboard_rejects_unequal_shapes():
    with pytest.raises(ValueError, match="equal shapes"):
        checkerboard(np.zeros((4, 4)), np.zeros((4, 5)))


def test_overlay_3d_with_labels_renders_png(tmp_path):
    shape = (16, 20, 12)
    fixed, moving = blob(shape), blob(shape, centre_shift=2.0)
    warped = torch.from_numpy(moving)[None, None]  # (B, C, D, H, W)
    fixed_label = (fixed > 0.5).astype(np.uint8)  # integer map
    moving_label = torch.from_numpy(moving > 0.5).float()[None, None]  # (B, L, D, H, W)
    figure = overlay_figure(fixed, moving, warped, fixed_label=fixed_label,
                            warped_label=moving_label, moving_label=moving_label)
    assert len(figure.axes) == 12  # 3 planes x (fixed, moving, warped, checkerboard)
    contoured = [ax for ax in figure.axes if ax.collections]
    assert len(contoured) == 12  # every panel shows at least one outline
    warped_panel = figure.axes[2]
    assert {c.get_linestyle()[0][1] is None for c in warped_panel.collections} == {True, False}
    path = save_figure(figure, tmp_path / "plots" / "overlay.png")
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 20_000
    assert [p.name for p in path.parent.iterdir()] == ["overlay.png"]  # no temporary left


def test_overlay_without_labels_has_no_contours(tmp_path):
    shape = (10, 12, 8)
    figure = overlay_figure(blob(shape), blob(shape, 1.0), blob(shape, 0.5))
    assert all(not ax.collections for ax in figure.axes)
    assert len(save_figure(figure, tmp_path / "plain.png").read_bytes()) > 10_000


def test_overlay_2d_multichannel_label(tmp_path):
    fixed = blob((24, 20))
    label = np.stack([fixed > 0.7, fixed > 0.3]).astype(np.float32)  # (L, H, W)
    figure = overlay_figure(fixed[None], fixed, fixed, fixed_label=label, warped_label=label)
    assert len(figure.axes) == 4
    assert len(figure.axes[0].collections) == 2  # one outline per label channel
    assert len(save_figure(figure, tmp_path / "overlay2d.png").read_bytes()) > 5_000


def test_soft_label_map_gives_one_outline():
    fixed = blob((24, 20))
    soft = torch.from_numpy(fixed)  # values in (0, 1], like a sigmoid output
    figure = overlay_figure(fixed, fixed, fixed, warped_label=soft)
    assert len(figure.axes[2].collections) == 1
    (contour,) = figure.axes[2].collections
    assert contour.levels.tolist() == [0.5]


def line_data(ax):
    return [(line.get_xdata(), line.get_ydata()) for line in ax.get_lines()]


def test_zero_ddf_draws_the_regular_grid():
    shape = (9, 12, 6)
    figure = deformation_grid_figure(torch.zeros(1, 3, *shape), step=4)
    assert len(figure.axes) == 3
    for ax, (rows, cols) in zip(figure.axes, [(12, 6), (9, 6), (9, 12)], strict=True):
        lines = line_data(ax)
        row_starts, col_starts = range(0, rows, 4), range(0, cols, 4)
        assert len(lines) == len(row_starts) + len(col_starts)
        for (x, y), i in zip(lines, row_starts, strict=False):  # constant-row lines first
            np.testing.assert_array_equal(x, np.arange(cols))
            np.testing.assert_array_equal(y, np.full(cols, i))
        for (x, y), j in zip(lines[len(row_starts):], col_starts, strict=True):
            np.testing.assert_array_equal(x, np.full(rows, j))
            np.testing.assert_array_equal(y, np.arange(rows))


def test_ddf_moves_grid_lines_by_the_displacement(tmp_path):
    ddf = np.zeros((2, 8, 10), np.float32)
    ddf[0] = 1.5  # down the rows
    ddf[1, :, 5:] = -0.5  # right half shifted left
    figure = deformation_grid_figure(ddf, step=4)
    (x, y), *_ = line_data(figure.axes[0])  # row 0
    np.testing.assert_allclose(y, np.full(10, 1.5))
    np.testing.assert_allclose(x, np.arange(10) - np.r_[np.zeros(5), np.full(5, 0.5)])
    assert len(save_figure(figure, tmp_path / "grid.png").read_bytes()) > 5_000


def test_ddf_with_wrong_channel_count_is_rejected():
    with pytest.raises(ValueError, match="ddf of shape"):
        deformation_grid_figure(np.zeros((2, 4, 4, 4)))


def test_dice_bar_figure_draws_one_bar_per_label_and_method():
    from regflow.viz import dice_bar_figure

    table = [{"label": "a", "method": "none", "dice": 0.5},
             {"label": "a", "method": "regflow", "dice": 0.8},
             {"label": "b", "method": "none", "dice": 0.4},
             {"label": "b", "method": "regflow", "dice": 0.9}]
    heights = sorted(round(bar.get_height(), 3) for bar in dice_bar_figure(table).axes[0].patches)
    assert heights == [0.4, 0.5, 0.8, 0.9]


def test_training_curve_figure_plots_loss_and_dice():
    from regflow.viz import training_curve_figure

    rows = [{"step": 1, "train_loss": 1.0}, {"step": 2, "train_loss": 0.5, "val_dice": 0.7}]
    figure = training_curve_figure(rows)
    assert list(figure.axes[0].lines[0].get_ydata()) == [1.0, 0.5]
    assert list(figure.axes[1].lines[0].get_ydata()) == [0.7]


def test_jacobian_and_checkerboard_figures():
    """The Jacobian map names the folded fraction (det J <= 0); the checkerboards come in a
    before and an after column."""
    figure = jacobian_figure(folding_ddf())
    assert "folding (det J <= 0, black): 16.667 % of 960 voxels" in figure._suptitle.get_text()
    assert len(figure.axes) == 4  # three planes and the colour bar
    board = checkerboard_figure(ramp(), ramp() + 1, moving=np.zeros(SHAPE))
    assert [ax.get_title() for ax in board.axes[:2]] == [
        "before: fixed / moving, axis 0=6", "after: fixed / warped, axis 0=6"]


def test_display_range_ignores_a_few_bright_voxels():
    image = np.zeros((10, 10, 10), np.float32)
    image[:5] = 1.0
    image[0, 0, 0] = 1000.0
    assert display_range(image) == (0.0, 1.0)
    assert display_range(np.ones((3, 3))) == (1.0, 1.0)


def test_checkerboard_shows_images_of_different_scales_in_their_own_windows():
    """A raw moving scan stored at 10x the fixed one's scale: after perfect registration the
    picture is seamless, not dark tiles beside bright ones."""
    ramp = np.linspace(0.0, 1.0, 16 * 16 * 16, dtype=np.float32).reshape(16, 16, 16)
    figure = checkerboard_figure(ramp, 10.0 * ramp)
    shown = np.asarray(figure.axes[0].images[0].get_array())
    assert np.allclose(shown, windowed(ramp)[8], atol=1e-6)
    assert windowed(10.0 * ramp).max() == 1.0 and windowed(10.0 * ramp).min() == 0.0
