"""Registration accuracy of regflow against classical baselines on the held-out pairs.

Run ``python -m benchmarks.accuracy [--pairs N] [--split test|val] [--model NAME=PATH_OR_URI ...]``
(or ``make bench-accuracy``); ``--no-identity --no-demons --no-bspline --classical-steps 0`` to
measure only the models. Every method registers the same fixed pairs that ``regflow
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
  ``--refine-steps`` steps (default: the config's ``evaluate.refine``; with ``--own-settings``, the
  passes and refinement a shipped checkpoint carries, :mod:`regflow.shipping`).

SimpleITK fields: an ITK displacement field is indexed (x, y, z) = reversed numpy axes and holds
physical (mm) displacements along x, y, z; fixed point p maps to moving point p + d(p), the same
direction as regflow's ``warped[x] = moving[x + ddf[x]]``. :func:`sitk_field_to_ddf` reverses the
components and divides by the voxel size; :func:`conversion_dice` checks on one pair that the
converted DDF warps the moving labels as SimpleITK's own resampler does.

Output: each method's row goes into the committed results file ``benchmarks/results/accuracy.json``
as soon as it is measured (:mod:`benchmarks.records`: a row of the same split, method and settings
is replaced, the others kept), with its commit, config digest (the config's, or the checkpoint's
training config's for a model), date, pairs and machine note; the run's table is printed on
stdout. ``python -m benchmarks.results`` renders the file into docs/results.md.
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

from benchmarks import records
from benchmarks.results import accuracy_table
from regflow import fileio, spatial
from regflow.cli import config_options
from regflow.config import Config, RefineConfig, load_training_config
from regflow.data.loader import build_dataloader
from regflow.data.manifest import Manifest
from regflow.engine import config_digest
from regflow.errors import RegflowError
from regflow.evaluation import dice30, pair_metrics
from regflow.inference import NO_MODEL, Registrar, checkpoint_path, load_registrar
from regflow.models import RegistrationModel
from regflow.paths import manifest_path
from regflow.shipping import file_sha256, shipped_config

DEMONS_GRID = tuple((iterations, sigma) for iterations in (100, 200) for sigma in (1.0, 1.5, 2.0))
CONVERSION_MIN_DICE = 0.99
BSPLINE_GRID_VOXELS = 8


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
            label_names: Sequence[str], with_hd95: bool = True,
            watch: records.LoadWatch | None = None) -> list[dict[str, Any]]:
    """Run ``method`` on every pair; one row per pair: ids, ``method``, metrics, ``time_s``.
    ``watch`` samples the machine's load after each pair."""
    rows = []
    for pair in pairs:
        result = method(pair)
        if watch is not None:
            watch.sample()
        rows.append({"method": name, "fixed_id": pair.fixed_id, "moving_id": pair.moving_id,
                     "time_s": result.seconds, **pair_metrics(
                         pair.fixed_label.numpy(), result.warped_label, result.ddf, spacing,
                         label_names, with_hd95)})
    return rows


def _mean(values: Sequence[float]) -> float:
    finite = [value for value in values if math.isfinite(value)]
    return float(np.mean(finite)) if finite else float("nan")


def summarise(rows: Sequence[dict[str, Any]], label_names: Sequence[str]) -> dict[str, Any]:
    """The measured figures of one method over its pairs: ``pairs``, ``dice`` (per label),
    ``dice_mean`` and ``dice_sd`` (over pairs), ``dice30``, ``hd95_mm``, ``sdlogj``,
    ``folding_pct`` and ``seconds_per_pair`` (means; NaN HD95 of an empty label ignored)."""
    def column(key: str) -> list[float]:
        return [float(row.get(key, float("nan"))) for row in rows]

    dice = column("dice_mean")
    return {
        "pairs": len(rows),
        "dice": {name: _mean(column(f"dice/{name}")) for name in label_names},
        "dice_mean": _mean(dice),
        "dice_sd": float(np.std(dice)) if dice else float("nan"),
        "dice30": dice30(dice),
        "hd95_mm": _mean(column("hd95_mean")),
        "sdlogj": _mean(column("sdlogj")),
        "folding_pct": _mean(column("folding_pct")),
        "seconds_per_pair": _mean(column("time_s")),
    }


def tune_demons(pairs: Sequence[Pair], spacing: Sequence[float], label_names: Sequence[str],
                grid: Sequence[tuple[int, float]] = DEMONS_GRID,
                log: Callable[[str], None] = print
                ) -> tuple[tuple[int, float], list[tuple[tuple[int, float], float]]]:
    """Pick demons' (iterations, sigma) by the best mean Dice on ``pairs`` (validation).

    Returns:
        The best setting and ``((iterations, sigma), mean Dice)`` of every setting; a single
        candidate is returned as it is, with nothing measured.
    """
    if len(grid) == 1:
        return grid[0], []
    if not pairs:
        raise RegflowError("no validation pairs to tune demons on")
    results = []
    for iterations, sigma in grid:
        rows = measure(f"demons {iterations}/{sigma:g}", demons_method(spacing, iterations, sigma),
                       pairs, spacing, label_names, with_hd95=False)
        summary = summarise(rows, label_names)
        results.append(((iterations, sigma), summary["dice_mean"]))
        log(f"  demons {iterations}/{sigma:g} on val: Dice {summary['dice_mean']:.3f}, "
            f"{summary['seconds_per_pair']:.2f} s/pair")
    best = max(results, key=lambda item: item[1])[0]
    return best, results


def describe_refinement(refine: RefineConfig, passes: int | None) -> str:
    """The test-time settings of a registrar in words (the ``settings`` of its row)."""
    parts = [] if passes is None else [f"{passes} pass{'es' if passes != 1 else ''}"]
    if refine.affine_steps:
        parts.append(f"{refine.affine_steps} affine steps (lr {refine.affine_lr:g})")
    if refine.steps == 0:
        return ", ".join(parts + ["network"])
    weight = (f"regulariser ratio {refine.regularization_ratio:g}"
              if refine.regularization_ratio is not None
              else f"regulariser x{refine.regularization_scale:g}")
    smooth = f", start smoothed {refine.smooth_sigma:g} voxel" if refine.smooth_sigma else ""
    parts.append(f"+{refine.steps} refinement steps (lr {refine.lr:g}, {refine.levels} "
                 f"level{'s' if refine.levels != 1 else ''}, "
                 f"{weight} on the {refine.regularize}{smooth})")
    return ", ".join(parts)


def model_provenance(spec: str) -> tuple[str, str]:
    """``(config digest, "<spec> sha256:<12 hex>")`` of a checkpoint: the digest of a shipped
    checkpoint's stored config, or the training digest a training checkpoint records."""
    checkpoint = checkpoint_path(spec)
    _, extra = RegistrationModel.load(checkpoint)
    stored = shipped_config(extra, str(checkpoint))
    digest = (config_digest(stored) if stored is not None
              else str(extra.get("training", {}).get("config_digest", "unknown")))
    return digest, f"{spec} sha256:{file_sha256(checkpoint)[:12]}"


# the run -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Settings:
    """What to run.

    Attributes:
        split: the evaluated split ("test" or "val").
        pairs: how many of its pairs (None: all).
        identity: measure the no-registration row.
        tune_pairs: how many validation pairs tune demons (None: all).
        demons_grid: (iterations, sigma) candidates tuned on val (one: used as given; empty: no
            demons row).
        bspline: run the B-spline row.
        bspline_budget_s: skip B-spline when its first pair takes longer than this.
        bspline_pairs: B-spline on only the first N of the pairs (None: all of them).
        classical_steps: refine steps of regflow's classical mode (0: no such row).
        models: (name, path or URI) of trained models.
        refine_steps: refinement steps of the models' second row (0: no such row; None: the
            config's ``evaluate.refine.steps``, or the checkpoint's own with ``own_settings``).
        own_settings: models use the test-time settings a shipped checkpoint carries.
        machine_note: appended to every row's machine note (e.g. what else ran).
    """

    split: str = "test"
    pairs: int | None = None
    identity: bool = True
    tune_pairs: int | None = None
    demons_grid: tuple[tuple[int, float], ...] = DEMONS_GRID
    bspline: bool = True
    bspline_budget_s: float = 30.0
    bspline_pairs: int | None = None
    classical_steps: int = 150
    models: tuple[tuple[str, str], ...] = ()
    refine_steps: int | None = None
    own_settings: bool = False
    machine_note: str = ""


def run_benchmark(config: Config, settings: Settings, log: Callable[[str], None] = print,
                  on_row: Callable[[dict[str, Any]], None] = lambda _row: None
                  ) -> list[dict[str, Any]]:
    """Register the pairs with every method and measure them.

    Args:
        on_row: called with each row as soon as it is measured (to save it before the next).

    Returns:
        One row per method, in table order: ``split``, ``method``, ``settings``, the measured
        figures (:func:`summarise`), ``split_pairs`` (pairs the split has), ``model``,
        ``config_digest``, ``notes`` and the provenance (:func:`records.provenance`).
    """
    manifest_file = manifest_path(config)
    manifest = Manifest.read(manifest_file)
    spacing, label_names = manifest.voxel_size, manifest.channel_names
    all_pairs = load_pairs(manifest_file, settings.split, config)
    pairs = all_pairs[:settings.pairs]
    if not pairs:
        raise RegflowError(f"{manifest_file}: split {settings.split!r} has no pairs")
    log(f"{len(pairs)} of {len(all_pairs)} {settings.split} pairs of {manifest.dataset}, "
        f"shape {manifest.shape}")
    digest = config_digest(config)
    commit = records.git_commit()  # the code as it is now, before any row is measured
    threads = torch.get_num_threads()
    rows: list[dict[str, Any]] = []

    def add(method: str, description: str, register: Method, on: Sequence[Pair] = pairs,
            model: str = "", model_digest: str = digest, notes: str = "") -> None:
        watch = records.LoadWatch(threads)
        measured = summarise(measure(method, register, on, spacing, label_names, watch=watch),
                             label_names)
        rows.append({"split": settings.split, "method": method, "settings": description,
                     **measured, "split_pairs": len(all_pairs), "model": model,
                     "config_digest": model_digest, "notes": notes,
                     **records.provenance(commit, watch.note(settings.machine_note))})
        on_row(rows[-1])
        log(f"  {method} ({description}): Dice {measured['dice_mean']:.3f}, Dice30 "
            f"{measured['dice30']:.3f}, SDlogJ {measured['sdlogj']:.3f}, folding "
            f"{measured['folding_pct']:.3f} %, {measured['seconds_per_pair']:.2f} s/pair")

    if settings.identity:
        add("no registration", "identity (zero field)", no_registration)

    if settings.demons_grid:
        tuned = len(settings.demons_grid) > 1
        val_pairs = load_pairs(manifest_file, "val", config, settings.tune_pairs) if tuned else []
        log(f"tuning demons on {len(val_pairs)} val pairs over {len(settings.demons_grid)} "
            f"settings" if tuned else "demons with the one setting given")
        (iterations, sigma), tuning = tune_demons(val_pairs, spacing, label_names,
                                                  settings.demons_grid, log)
        check = conversion_dice(pairs[0], demons_field(pairs[0], spacing, iterations, sigma),
                                spacing)
        if check.min() < CONVERSION_MIN_DICE:
            raise RegflowError(f"SimpleITK field conversion check failed: Dice {check} between "
                               f"regflow's and SimpleITK's warped labels (want > "
                               f"{CONVERSION_MIN_DICE})")
        chosen = (f"chosen {iterations} iterations, sigma {sigma:g} voxel by mean Dice on "
                  f"{len(val_pairs)} val pairs (" + ", ".join(
                      f"{it}/{sd:g}: {dice:.3f}" for (it, sd), dice in tuning) + ")"
                  if tuned else "the setting given by --demons-grid, not tuned in this run")
        add("SimpleITK demons", "fast symmetric forces after histogram matching; " + (
                "iterations and smoothing sigma tuned on val" if tuned
                else f"{iterations} iterations, sigma {sigma:g} (given)"),
            demons_method(spacing, iterations, sigma),
            notes=chosen + "; field conversion checked against SimpleITK's resampler (Dice "
                  + ", ".join(f"{value:.4f}" for value in check) + ")")

    if settings.bspline:
        first = measure("bspline", bspline_method(spacing), pairs[:1], spacing, label_names,
                        with_hd95=False)[0]
        if first["time_s"] > settings.bspline_budget_s:
            log(f"SimpleITK B-spline skipped: {first['time_s']:.1f} s on the first pair "
                f"(budget {settings.bspline_budget_s:g} s/pair)")
        else:
            add("SimpleITK B-spline", f"mesh ~{BSPLINE_GRID_VOXELS} voxels, mean squares after "
                "histogram matching, L-BFGS-B, 2 levels, untuned", bspline_method(spacing),
                on=pairs[:settings.bspline_pairs])

    if settings.classical_steps > 0:
        registrar = load_registrar(NO_MODEL, config, refine_steps=settings.classical_steps)
        add("regflow classical", "model none, " + describe_refinement(registrar.refine, None),
            registrar_method(registrar))

    for name, spec in settings.models:
        model_digest, model = model_provenance(spec)
        network = load_registrar(spec, config, refine_steps=0,
                                 own_settings=settings.own_settings)
        refined = load_registrar(spec, config, refine_steps=settings.refine_steps,
                                 own_settings=settings.own_settings)
        for registrar in (network, refined) if refined.refine.steps > 0 else (network,):
            assert registrar.model is not None
            add(name, describe_refinement(registrar.refine, registrar.model.passes),
                registrar_method(registrar), model=model, model_digest=model_digest,
                notes="the checkpoint's own test-time settings" if settings.own_settings
                else "")
    return rows


def _model_spec(_ctx: click.Context, _param: click.Parameter, values: tuple[str, ...]
                ) -> tuple[tuple[str, str], ...]:
    specs = []
    for value in values:
        name, separator, spec = value.partition("=")
        if not separator or not name or not spec:
            raise click.BadParameter(f"{value!r}: expected NAME=PATH_OR_URI")
        specs.append((name, spec))
    return tuple(specs)


def _demons_setting(_ctx: click.Context, _param: click.Parameter, values: tuple[str, ...]
                    ) -> tuple[tuple[int, float], ...]:
    settings = []
    for value in values:
        iterations, _, sigma = value.partition("/")
        try:
            setting = (int(iterations), float(sigma))
        except ValueError:
            setting = (0, 0.0)
        if setting[0] < 1 or not setting[1] > 0:
            raise click.BadParameter(f"{value!r}: expected ITERATIONS/SIGMA, e.g. 200/1.5")
        settings.append(setting)
    return tuple(settings)


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
@click.option("--own-settings", is_flag=True,
              help="Models use the test-time settings (passes, refinement) their shipped "
                   "checkpoint carries instead of the config's evaluate section.")
@click.option("--classical-steps", type=click.IntRange(min=0), default=150, show_default=True,
              help="Steps of regflow's classical mode (model none; 0: skip the row).")
@click.option("--identity/--no-identity", default=True, show_default=True,
              help="The no-registration row.")
@click.option("--demons/--no-demons", default=True, show_default=True)
@click.option("--demons-grid", multiple=True, callback=_demons_setting, metavar="IT/SIGMA",
              help="Demons candidates to tune on val (repeatable; one: used without tuning) "
                   "[100 and 200 iterations x sigma 1, 1.5, 2].")
@click.option("--bspline/--no-bspline", default=True, show_default=True)
@click.option("--bspline-budget", type=float, default=30.0, show_default=True,
              help="Skip B-spline when its first pair takes longer (seconds).")
@click.option("--bspline-pairs", type=click.IntRange(min=1),
              help="B-spline on only the first N of the pairs [all].")
@click.option("--threads", type=click.IntRange(min=1),
              help="Compute threads of PyTorch and SimpleITK [PyTorch's default].")
@click.option("--machine-note", default="", help="Added to every row's machine note.")
@click.option("--results", "results_file", type=click.Path(dir_okay=False),
              default=str(records.RESULTS_DIR / "accuracy.json"), show_default=True,
              help="Results file whose rows (by split, method and settings) are updated.")
@config_options(load_training_config)
def main(config: Config, split: str, pairs: int | None, tune_pairs: int | None,
         models: tuple[tuple[str, str], ...], refine_steps: int | None, own_settings: bool,
         classical_steps: int, identity: bool, demons: bool,
         demons_grid: tuple[tuple[int, float], ...], bspline: bool,
         bspline_budget: float, bspline_pairs: int | None, threads: int | None, machine_note: str,
         results_file: str) -> None:
    """Accuracy table: no registration, SimpleITK, regflow classical and trained models."""
    fileio.check_writable_file(results_file, suffixes=(".json",))
    records.read(results_file)  # a damaged file fails now, not after an hour of measuring
    if threads is not None:
        torch.set_num_threads(threads)
    _sitk().ProcessObject.SetGlobalDefaultNumberOfThreads(torch.get_num_threads())
    settings = Settings(split=split, pairs=pairs, identity=identity,
                        tune_pairs=tune_pairs or pairs,
                        demons_grid=(demons_grid or DEMONS_GRID) if demons else (),
                        bspline=bspline,
                        bspline_budget_s=bspline_budget, bspline_pairs=bspline_pairs,
                        classical_steps=classical_steps, models=models,
                        refine_steps=refine_steps, own_settings=own_settings,
                        machine_note=machine_note)
    rows = run_benchmark(config, settings, log=lambda line: click.echo(line, err=True),
                         on_row=lambda row: records.upsert(results_file, [row]))
    click.echo("\n".join(accuracy_table(rows)))
    click.echo(f"updated {len(rows)} rows of {results_file}", err=True)


if __name__ == "__main__":
    main()
