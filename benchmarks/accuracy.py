"""Registration accuracy of regflow against classical baselines on the held-out pairs.

Run ``python -m benchmarks.accuracy [--pairs N] [--split test|val] [--model NAME=PATH_OR_URI ...]``
(or ``make bench-accuracy``). Every method registers the same fixed pairs that ``regflow
evaluate`` uses (``build_dataloader(manifest, split, config, train=False)``, processed volumes),
and every method is measured by the same code (:func:`regflow.evaluation.pair_metrics` on a DDF in
regflow's convention and the moving labels warped by :func:`regflow.spatial.warp`, linear,
thresholded at 0.5). Rows:

- ``no registration``: the identity (zero DDF, the moving labels as they are).
- SimpleITK fast symmetric forces demons after histogram matching of the moving image to the
  fixed one; iterations and smoothing sigma chosen by the best mean Dice on the *validation*
  split's pairs (the grid below), then run on the evaluated split.
- SimpleITK B-spline (mesh of about 8 voxels, mean squares after histogram matching, L-BFGS-B,
  two resolutions; untuned), skipped with a note when its first pair takes too long.
- regflow's classical mode: ``load_registrar("none", config, refine_steps=N)`` (affine stage, then
  coarse-to-fine non-rigid optimisation of the training's image loss and regulariser).
- every ``--model NAME=SPEC``: the network's field (``refine_steps=0``) and the field refined for
  ``--refine-steps`` steps (default: the config's ``evaluate.refine``).

SimpleITK fields: an ITK displacement field is indexed (x, y, z) = reversed numpy axes and holds
physical (mm) displacements along x, y, z; fixed point p maps to moving point p + d(p), the same
direction as regflow's ``warped[x] = moving[x + ddf[x]]``. :func:`sitk_field_to_ddf` reverses the
components and divides by the voxel size; :func:`conversion_dice` checks on one pair that the
converted DDF warps the moving labels as SimpleITK's own resampler does.

Outputs: the table on stdout, and ``benchmarks/results/accuracy_<split>.md`` / ``.csv`` (method
means) plus ``accuracy_<split>_pairs.csv`` (every pair), each written atomically.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch

from regflow import fileio, spatial
from regflow.cli import config_options
from regflow.config import Config, load_training_config
from regflow.data.loader import build_dataloader
from regflow.data.manifest import Manifest
from regflow.errors import RegflowError
from regflow.evaluation import pair_metrics
from regflow.inference import NO_MODEL, Registrar, load_registrar
from regflow.paths import manifest_path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DEMONS_GRID = tuple((iterations, sigma) for iterations in (100, 200) for sigma in (1.0, 1.5, 2.0))
CONVERSION_MIN_DICE = 0.99
BSPLINE_GRID_VOXELS = 8
PUBLISHED = ("published (Learn2Reg 2020 task 4, its own split; not measured here): the "
             "3rd-placed method reported validation Dice 0.839, HD 1.63 mm, SDlogJ 0.093; "
             "test 0.85")


@dataclass(frozen=True)
class Pair:
    """One evaluation pair in the model's frame (processed volumes).

    Attributes:
        fixed_id, moving_id: case ids.
        fixed, moving: (1, *S) float32 images.
        fixed_label, moving_label: (L, *S) float32 binary label channels.
    """

    fixed_id: str
    moving_id: str
    fixed: torch.Tensor
    moving: torch.Tensor
    fixed_label: torch.Tensor
    moving_label: torch.Tensor


@dataclass(frozen=True)
class Registration:
    """A method's result on one pair.

    Attributes:
        ddf: (ndim, *S) float32 displacement in voxels, ``warped[x] = moving[x + ddf[x]]``.
        warped_label: (L, *S) moving labels warped by ``ddf`` (linear, soft values).
        seconds: time the method took for the pair (registration only, not the metrics).
    """

    ddf: np.ndarray
    warped_label: np.ndarray
    seconds: float


Method = Callable[[Pair], Registration]


def load_pairs(manifest_file: str | Path, split: str, config: Config,
               limit: int | None = None) -> list[Pair]:
    """The first ``limit`` (default all) evaluation pairs of ``split``, as ``regflow evaluate``
    iterates them."""
    pairs: list[Pair] = []
    for batch in build_dataloader(manifest_file, split, config, train=False):
        if "fixed_label" not in batch or "moving_label" not in batch:
            raise RegflowError(f"{manifest_file}: split {split!r} has no labels to measure")
        for index in range(batch["fixed_image"].shape[0]):
            if limit is not None and len(pairs) >= limit:
                return pairs
            pairs.append(Pair(batch["fixed_id"][index], batch["moving_id"][index],
                              batch["fixed_image"][index], batch["moving_image"][index],
                              batch["fixed_label"][index], batch["moving_label"][index]))
    return pairs


def warp_label(moving_label: torch.Tensor, ddf: np.ndarray) -> np.ndarray:
    """(L, *S) labels warped linearly by a (ndim, *S) voxel DDF through regflow.spatial.warp."""
    field = torch.from_numpy(np.ascontiguousarray(ddf, dtype=np.float32))[None]
    return spatial.warp(moving_label[None].float(), field)[0].numpy()


def no_registration(pair: Pair) -> Registration:
    """The identity: a zero DDF and the moving labels unchanged."""
    ndim = pair.fixed.ndim - 1
    ddf = np.zeros((ndim, *pair.fixed.shape[1:]), np.float32)
    return Registration(ddf, pair.moving_label.numpy(), 0.0)


def registrar_method(registrar: Registrar) -> Method:
    """A method that runs ``registrar.register_tensors`` on one pair (its own ``time_s``)."""

    def register(pair: Pair) -> Registration:
        outputs = registrar.register_tensors(pair.moving[None], pair.fixed[None],
                                             pair.moving_label[None])
        return Registration(outputs["ddf"][0].numpy(), outputs["warped_label"][0].numpy(),
                            float(outputs["time_s"]))

    return register


# SimpleITK ---------------------------------------------------------------------------------------

def _sitk():
    import SimpleITK as sitk  # imported when used: only the SimpleITK rows need it

    return sitk


def to_sitk_image(array: np.ndarray, spacing: Sequence[float]):
    """A SimpleITK image of a (*S) numpy volume; ITK's (x, y, z) are the reversed array axes."""
    image = _sitk().GetImageFromArray(np.ascontiguousarray(array, dtype=np.float32))
    image.SetSpacing([float(value) for value in reversed(spacing)])
    return image


def sitk_field_to_ddf(field, spacing: Sequence[float]) -> np.ndarray:
    """Convert a SimpleITK displacement field to regflow's DDF.

    Args:
        field: vector image on the fixed grid (identity direction, zero origin); component k is
            the physical displacement (mm) along ITK axis k, i.e. along numpy axis ``ndim-1-k``.
        spacing: voxel size in mm per numpy array axis.

    Returns:
        (ndim, *S) float32 DDF in voxels, channel i along numpy array axis i.
    """
    vectors = _sitk().GetArrayFromImage(field)  # (*S, ndim), components in ITK (x, y, z) order
    ndim = vectors.shape[-1]
    ddf = np.moveaxis(vectors[..., ::-1], -1, 0)  # channel i now along numpy axis i
    return (ddf / np.asarray(spacing, np.float64).reshape(ndim, *[1] * ndim)).astype(np.float32)


def _matched_images(pair: Pair, spacing: Sequence[float]):
    """(fixed, moving) SimpleITK images, the moving histogram-matched to the fixed one."""
    sitk = _sitk()
    fixed = to_sitk_image(pair.fixed[0].numpy(), spacing)
    moving = to_sitk_image(pair.moving[0].numpy(), spacing)
    moving = sitk.HistogramMatching(moving, fixed, numberOfHistogramLevels=1024,
                                    numberOfMatchPoints=7, thresholdAtMeanIntensity=True)
    return fixed, moving


def demons_field(pair: Pair, spacing: Sequence[float], iterations: int, sigma: float):
    """SimpleITK fast symmetric forces demons field (fixed grid) after histogram matching."""
    sitk = _sitk()
    fixed, moving = _matched_images(pair, spacing)
    demons = sitk.FastSymmetricForcesDemonsRegistrationFilter()
    demons.SetNumberOfIterations(iterations)
    demons.SetStandardDeviations(sigma)
    return demons.Execute(fixed, moving)


def demons_method(spacing: Sequence[float], iterations: int, sigma: float) -> Method:
    """Demons with ``iterations`` and Gaussian field smoothing ``sigma`` (voxels)."""

    def register(pair: Pair) -> Registration:
        started = time.perf_counter()
        ddf = sitk_field_to_ddf(demons_field(pair, spacing, iterations, sigma), spacing)
        seconds = time.perf_counter() - started
        return Registration(ddf, warp_label(pair.moving_label, ddf), seconds)

    return register


def bspline_field(pair: Pair, spacing: Sequence[float], grid_voxels: int = BSPLINE_GRID_VOXELS):
    """SimpleITK B-spline registration, its transform sampled as a field on the fixed grid."""
    sitk = _sitk()
    fixed, moving = _matched_images(pair, spacing)
    mesh = [max(1, round(size / grid_voxels)) for size in fixed.GetSize()]
    transform = sitk.BSplineTransformInitializer(fixed, mesh)
    registration = sitk.ImageRegistrationMethod()
    registration.SetMetricAsMeanSquares()
    registration.SetMetricSamplingStrategy(registration.NONE)
    registration.SetInterpolator(sitk.sitkLinear)
    registration.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5, numberOfIterations=100)
    registration.SetShrinkFactorsPerLevel([2, 1])
    registration.SetSmoothingSigmasPerLevel([1.0, 0.0])
    registration.SetInitialTransform(transform, inPlace=True)
    registration.Execute(fixed, moving)
    return sitk.TransformToDisplacementField(transform, sitk.sitkVectorFloat64, fixed.GetSize(),
                                             fixed.GetOrigin(), fixed.GetSpacing(),
                                             fixed.GetDirection())


def bspline_method(spacing: Sequence[float]) -> Method:
    """The B-spline baseline as a method."""

    def register(pair: Pair) -> Registration:
        started = time.perf_counter()
        ddf = sitk_field_to_ddf(bspline_field(pair, spacing), spacing)
        seconds = time.perf_counter() - started
        return Registration(ddf, warp_label(pair.moving_label, ddf), seconds)

    return register


def sitk_resampled_label(pair: Pair, field, spacing: Sequence[float]) -> np.ndarray:
    """(L, *S) moving labels resampled by SimpleITK itself through ``field`` (linear, zeros)."""
    sitk = _sitk()
    transform = sitk.DisplacementFieldTransform(sitk.Image(field))  # takes the copy's buffer
    reference = to_sitk_image(pair.fixed[0].numpy(), spacing)
    channels = [sitk.GetArrayFromImage(sitk.Resample(to_sitk_image(channel.numpy(), spacing),
                                                     reference, transform, sitk.sitkLinear, 0.0))
                for channel in pair.moving_label]
    return np.stack(channels)


def conversion_dice(pair: Pair, field, spacing: Sequence[float]) -> np.ndarray:
    """Per-label Dice between the labels warped by regflow with the converted field and the
    labels resampled by SimpleITK with its own field (both thresholded at 0.5); (L,) floats."""
    from regflow import metrics

    ours = warp_label(pair.moving_label, sitk_field_to_ddf(field, spacing))
    theirs = sitk_resampled_label(pair, field, spacing)
    return metrics.dice(ours > 0.5, theirs > 0.5)


# measuring ---------------------------------------------------------------------------------------

def measure(name: str, method: Method, pairs: Iterable[Pair], spacing: Sequence[float],
            label_names: Sequence[str], with_hd95: bool = True) -> list[dict[str, Any]]:
    """Run ``method`` on every pair; one row per pair: ids, ``method``, metrics, ``time_s``."""
    rows = []
    for pair in pairs:
        result = method(pair)
        rows.append({"method": name, "fixed_id": pair.fixed_id, "moving_id": pair.moving_id,
                     "time_s": result.seconds, **pair_metrics(
                         pair.fixed_label.numpy(), result.warped_label, result.ddf, spacing,
                         label_names, with_hd95)})
    return rows


def _mean(values: Sequence[float]) -> float:
    finite = [value for value in values if math.isfinite(value)]
    return float(np.mean(finite)) if finite else float("nan")


def summarise(rows: Sequence[dict[str, Any]], label_names: Sequence[str]) -> dict[str, Any]:
    """The table row of one method: means over its pairs (NaN HD95 of an empty label ignored)."""
    def column(key: str) -> list[float]:
        return [float(row.get(key, float("nan"))) for row in rows]

    dice = column("dice_mean")
    summary: dict[str, Any] = {"method": rows[0]["method"], "pairs": len(rows)}
    for name in label_names:
        summary[f"dice_{name}"] = _mean(column(f"dice/{name}"))
    summary.update({
        "dice_mean": _mean(dice),
        "dice_mean_sd": float(np.std(dice)) if dice else float("nan"),
        "hd95_mm": _mean(column("hd95_mean")),
        "sdlogj": _mean(column("sdlogj")),
        "folding_pct": _mean(column("folding_pct")),
        "seconds_per_pair": _mean(column("time_s")),
    })
    return summary


def tune_demons(pairs: Sequence[Pair], spacing: Sequence[float], label_names: Sequence[str],
                grid: Sequence[tuple[int, float]] = DEMONS_GRID,
                log: Callable[[str], None] = print
                ) -> tuple[tuple[int, float], list[dict[str, Any]]]:
    """Pick demons' (iterations, sigma) by the best mean Dice on ``pairs`` (validation).

    Returns:
        The best setting and one summary row per setting (``method`` ``demons <it>/<sigma>``).
    """
    if not pairs:
        raise RegflowError("no validation pairs to tune demons on")
    results = []
    for iterations, sigma in grid:
        rows = measure(f"demons {iterations}/{sigma:g}", demons_method(spacing, iterations, sigma),
                       pairs, spacing, label_names, with_hd95=False)
        results.append(((iterations, sigma), summarise(rows, label_names)))
        log(f"  demons {iterations}/{sigma:g} on val: Dice {results[-1][1]['dice_mean']:.3f}, "
            f"{results[-1][1]['seconds_per_pair']:.2f} s/pair")
    best = max(results, key=lambda item: item[1]["dice_mean"])[0]
    return best, [summary for _, summary in results]


# the table ---------------------------------------------------------------------------------------

def _cell(value: Any, digits: int) -> str:
    if isinstance(value, float):
        return "n/a" if not math.isfinite(value) else f"{value:.{digits}f}"
    return str(value)


def table_columns(label_names: Sequence[str]) -> list[str]:
    """CSV columns of the summary table."""
    return ["method", "pairs", *[f"dice_{name}" for name in label_names], "dice_mean",
            "dice_mean_sd", "hd95_mm", "sdlogj", "folding_pct", "seconds_per_pair"]


def format_markdown(summaries: Sequence[dict[str, Any]], label_names: Sequence[str],
                    notes: Sequence[str] = ()) -> str:
    """The summary table as GitHub markdown, with ``notes`` as lines below it."""
    header = ["method", "pairs", *[f"Dice {name}" for name in label_names], "Dice mean",
              "HD95 (mm)", "SDlogJ", "folding %", "s/pair"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in summaries:
        cells = [row["method"], str(row["pairs"]),
                 *[_cell(row[f"dice_{name}"], 3) for name in label_names],
                 f"{_cell(row['dice_mean'], 3)} ± {_cell(row['dice_mean_sd'], 3)}",
                 _cell(row["hd95_mm"], 2), _cell(row["sdlogj"], 3),
                 _cell(row["folding_pct"], 3), _cell(row["seconds_per_pair"], 2)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines + [""] + [f"- {note}" for note in notes]) + "\n"


@dataclass(frozen=True)
class Settings:
    """What to run.

    Attributes:
        split: the evaluated split ("test" or "val").
        pairs: how many of its pairs (None: all).
        tune_pairs: how many validation pairs tune demons (None: all).
        demons_grid: (iterations, sigma) candidates.
        bspline: run the B-spline row.
        bspline_budget_s: skip B-spline when its first pair takes longer than this.
        classical_steps: refine steps of regflow's classical mode (0: no such row).
        models: (name, path or URI) of trained models.
        refine_steps: refinement steps of the models' second row (0: no such row; None: the
            config's ``evaluate.refine.steps``).
    """

    split: str = "test"
    pairs: int | None = None
    tune_pairs: int | None = None
    demons_grid: tuple[tuple[int, float], ...] = DEMONS_GRID
    bspline: bool = True
    bspline_budget_s: float = 30.0
    classical_steps: int = 150
    models: tuple[tuple[str, str], ...] = ()
    refine_steps: int | None = None


def run_benchmark(config: Config, settings: Settings, log: Callable[[str], None] = print
                  ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[str]]:
    """Register the pairs with every method and measure them.

    Returns:
        ``(summaries, pair_rows, notes)``: one summary row per method (table order), every pair's
        metrics, and the notes printed below the table.
    """
    manifest_file = manifest_path(config)
    manifest = Manifest.read(manifest_file)
    spacing, label_names = manifest.voxel_size, manifest.channel_names
    pairs = load_pairs(manifest_file, settings.split, config, settings.pairs)
    if not pairs:
        raise RegflowError(f"{manifest_file}: split {settings.split!r} has no pairs")
    log(f"{len(pairs)} {settings.split} pairs of {manifest.dataset}, shape {manifest.shape}")
    notes: list[str] = []
    all_rows: list[dict[str, Any]] = []
    summaries: list[dict[str, Any]] = []

    def add(name: str, method: Method) -> None:
        rows = measure(name, method, pairs, spacing, label_names)
        all_rows.extend(rows)
        summaries.append(summarise(rows, label_names))
        log(f"  {name}: " + ", ".join(f"{key} {_cell(value, 3)}"
                                       for key, value in summaries[-1].items()
                                       if key not in ("method", "pairs")))

    add("no registration", no_registration)

    if settings.demons_grid:
        val_pairs = load_pairs(manifest_file, "val", config, settings.tune_pairs)
        log(f"tuning demons on {len(val_pairs)} val pairs over {len(settings.demons_grid)} "
            f"settings")
        (iterations, sigma), tuning = tune_demons(val_pairs, spacing, label_names,
                                                  settings.demons_grid, log)
        notes.append(f"demons tuned on {len(val_pairs)} val pairs (mean Dice per iterations/"
                     f"sigma): " + ", ".join(f"{row['method'].split()[1]}: "
                                            f"{row['dice_mean']:.3f}" for row in tuning)
                     + f"; chosen {iterations}/{sigma:g}")
        dice = conversion_dice(pairs[0], demons_field(pairs[0], spacing, iterations, sigma),
                               spacing)
        if dice.min() < CONVERSION_MIN_DICE:
            raise RegflowError(f"SimpleITK field conversion check failed: Dice {dice} between "
                               f"regflow's and SimpleITK's warped labels (want > "
                               f"{CONVERSION_MIN_DICE})")
        notes.append(f"SimpleITK field -> regflow DDF check on {pairs[0].fixed_id}<-"
                     f"{pairs[0].moving_id}: Dice of regflow-warped vs SimpleITK-resampled "
                     f"labels " + ", ".join(f"{value:.4f}" for value in dice))
        add(f"SimpleITK demons (fast symmetric forces, histogram matching; "
            f"{iterations} it, sigma {sigma:g}, tuned on val)",
            demons_method(spacing, iterations, sigma))

    if settings.bspline:
        first = measure("bspline", bspline_method(spacing), pairs[:1], spacing, label_names,
                        with_hd95=False)[0]
        if first["time_s"] > settings.bspline_budget_s:
            notes.append(f"SimpleITK B-spline skipped: {first['time_s']:.1f} s on the first pair "
                         f"(budget {settings.bspline_budget_s:g} s/pair)")
        else:
            add(f"SimpleITK B-spline (mesh ~{BSPLINE_GRID_VOXELS} voxels, mean squares, "
                f"L-BFGS-B, untuned)", bspline_method(spacing))

    if settings.classical_steps > 0:
        registrar = load_registrar(NO_MODEL, config, refine_steps=settings.classical_steps)
        add(f"regflow classical (model none, {settings.classical_steps} affine + "
            f"{settings.classical_steps} non-rigid steps)", registrar_method(registrar))

    refine_steps = (config.evaluate.refine.steps if settings.refine_steps is None
                    else settings.refine_steps)
    for name, spec in settings.models:
        add(f"{name} (network)", registrar_method(load_registrar(spec, config, refine_steps=0)))
        if refine_steps > 0:
            registrar = load_registrar(spec, config, refine_steps=refine_steps)
            add(f"{name} (+{refine_steps} refinement steps)", registrar_method(registrar))

    notes.append(PUBLISHED)
    return summaries, all_rows, notes


def write_results(out_dir: Path, split: str, summaries: Sequence[dict[str, Any]],
                  pair_rows: Sequence[dict[str, Any]], label_names: Sequence[str],
                  markdown: str) -> list[Path]:
    """Write ``accuracy_<split>.md``, ``.csv`` and ``accuracy_<split>_pairs.csv`` atomically."""
    stem = out_dir / f"accuracy_{split}"
    return [fileio.write_text(stem.with_suffix(".md"), markdown),
            fileio.write_csv(stem.with_suffix(".csv"), summaries, table_columns(label_names)),
            fileio.write_csv(out_dir / f"accuracy_{split}_pairs.csv", pair_rows)]


def _model_spec(_ctx: click.Context, _param: click.Parameter, values: tuple[str, ...]
                ) -> tuple[tuple[str, str], ...]:
    specs = []
    for value in values:
        name, separator, spec = value.partition("=")
        if not separator or not name or not spec:
            raise click.BadParameter(f"{value!r}: expected NAME=PATH_OR_URI")
        specs.append((name, spec))
    return tuple(specs)


class _Command(click.Command):
    """A user error (bad config, missing data, failed check) is one line and exit code 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except RegflowError as exc:
            click.echo(f"Error: {exc}", err=True)
            ctx.exit(2)


@click.command(cls=_Command, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--split", type=click.Choice(["test", "val"]), default="test", show_default=True,
              help="Split to evaluate on (demons is always tuned on val).")
@click.option("--pairs", type=click.IntRange(min=1), help="Only the first N pairs [all].")
@click.option("--tune-pairs", type=click.IntRange(min=1),
              help="Validation pairs that tune demons [same as --pairs].")
@click.option("--model", "models", multiple=True, callback=_model_spec,
              metavar="NAME=PATH_OR_URI", help="A trained model (repeatable).")
@click.option("--refine-steps", type=click.IntRange(min=0),
              help="Test-time refinement steps of the models' second row (0: none) "
                   "[evaluate.refine.steps].")
@click.option("--classical-steps", type=click.IntRange(min=0), default=150, show_default=True,
              help="Steps of regflow's classical mode (model none; 0: skip the row).")
@click.option("--demons/--no-demons", default=True, show_default=True)
@click.option("--bspline/--no-bspline", default=True, show_default=True)
@click.option("--bspline-budget", type=float, default=30.0, show_default=True,
              help="Skip B-spline when its first pair takes longer (seconds).")
@click.option("--out-dir", type=click.Path(file_okay=False), default=str(RESULTS_DIR),
              show_default=True, help="Where the markdown and CSV go.")
@config_options(load_training_config)
def main(config: Config, split: str, pairs: int | None, tune_pairs: int | None,
         models: tuple[tuple[str, str], ...], refine_steps: int | None, classical_steps: int,
         demons: bool, bspline: bool, bspline_budget: float, out_dir: str) -> None:
    """Accuracy table: no registration, SimpleITK, regflow classical and trained models."""
    fileio.check_writable_dir(out_dir)
    settings = Settings(split=split, pairs=pairs, tune_pairs=tune_pairs or pairs,
                        demons_grid=DEMONS_GRID if demons else (), bspline=bspline,
                        bspline_budget_s=bspline_budget, classical_steps=classical_steps,
                        models=models, refine_steps=refine_steps)
    summaries, pair_rows, notes = run_benchmark(
        config, settings, log=lambda line: click.echo(line, err=True))
    label_names = Manifest.read(manifest_path(config)).channel_names
    markdown = format_markdown(summaries, label_names, notes)
    click.echo(markdown, nl=False)
    for path in write_results(Path(out_dir), split, summaries, pair_rows, label_names,
                              markdown):
        click.echo(f"wrote {path}", err=True)


if __name__ == "__main__":
    main()
