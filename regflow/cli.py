"""The ``regflow`` command line: one command per DVC stage plus predict/warp/request/vis.

Commands only parse options, load the config and call the library; a :class:`RegflowError` or an
``OSError`` (permission denied, disk full, ...) becomes one line on stderr and exit code 2.
Commands that write files check their output locations before they compute anything.
"""

from __future__ import annotations

import functools
import os
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from regflow import __version__
from regflow.config import (
    Config,
    apply_override,
    load_config,
    load_training_config,
    parse_override,
    validate_config,
)
from regflow.errors import RegflowError
from regflow.fileio import check_writable_dir, check_writable_file
from regflow.redact import redact_text, redact_value

MIRROR_ENV = "REGFLOW_DATA_MIRROR"
OUTPUTS_META = "regflow.outputs"


def claim_output(path: str | Path, folder: bool = False,
                 suffixes: Sequence[str] = ()) -> Path:
    """Check an output file (or ``folder``) is writable before any work starts; remember it.

    An OSError that carries no file name (a ``write`` failing with ENOSPC) is then reported
    against the outputs claimed so far.

    Raises:
        RegflowError: see :func:`regflow.fileio.check_writable_file` / ``check_writable_dir``.
    """
    target = check_writable_dir(path) if folder else check_writable_file(path, suffixes)
    click.get_current_context().meta.setdefault(OUTPUTS_META, []).append(str(target))
    return target


def describe_os_error(exc: OSError, outputs: Sequence[str] = ()) -> str:
    """``PATH: reason`` (``SOURCE -> TARGET: reason`` for a rename) of an OSError.

    Args:
        exc: the error.
        outputs: the command's output locations, named when the error itself names no file.
    """
    paths = [str(name) for name in (exc.filename, exc.filename2) if name is not None]
    reason = exc.strerror or str(exc) or exc.__class__.__name__
    if paths:
        return f"{' -> '.join(paths)}: {reason}"
    return f"{reason} (while writing {', '.join(outputs)})" if outputs else reason


class RegflowGroup(click.Group):
    """A click group that turns user errors, bad options and OS errors into one line, exit 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except RegflowError as exc:
            message = str(exc)
        except click.UsageError as exc:
            command = exc.ctx.command_path if exc.ctx else ctx.command_path
            message = f"{exc.format_message()} (see '{command} -h')"
        except OSError as exc:
            message = describe_os_error(exc, ctx.meta.get(OUTPUTS_META, ()))
        click.echo(f"Error: {redact_text(' '.join(message.splitlines()))}", err=True)
        ctx.exit(2)


def config_options(loader: Callable[..., Config] = load_config
                   ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Add ``-c/--config`` and ``-S key=value``; pass the loaded :class:`Config` as ``config``.

    Args:
        loader: how to load it (``load_training_config`` merges tuned best params).
    """

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        @click.option("-c", "--config", "config_path", default="params.yaml", show_default=True,
                      type=click.Path(dir_okay=False), help="params.yaml to read.")
        @click.option("-S", "--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE",
                      help="Override a params key (repeatable), as `dvc exp run -S` does.")
        @functools.wraps(command)
        def wrapper(config_path: str, overrides: tuple[str, ...], **kwargs: Any) -> Any:
            return command(config=loader(config_path, overrides), **kwargs)

        return wrapper

    return decorate


def checkpoint_config(checkpoint: Path, fallback: Config) -> Config:
    """The config a shipped checkpoint carries, with the command's ``-S`` overrides applied;
    ``fallback`` for a checkpoint that carries none."""
    from regflow.models import RegistrationModel
    from regflow.shipping import shipped_config

    _, extra = RegistrationModel.load(checkpoint)
    stored = shipped_config(extra, str(checkpoint))
    if stored is None:
        return fallback
    tree = stored.model_dump(mode="json")
    for text in click.get_current_context().params.get("overrides", ()):
        apply_override(tree, *parse_override(text))
    return validate_config(tree, source=f"{checkpoint} (its stored config)")


def evaluation_settings_given() -> bool:
    """Whether the current command was given a config file (``-c``) or ``-S evaluate.*``: then
    the config's test-time settings apply rather than a shipped checkpoint's own."""
    context = click.get_current_context()
    explicit_file = context.get_parameter_source("config_path") != ParameterSource.DEFAULT
    overrides = context.params.get("overrides", ())
    return explicit_file or any(item.startswith("evaluate.") for item in overrides)


@click.group(cls=RegflowGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="regflow")
def cli() -> None:
    """regflow: deep-learning medical image registration with MLflow tracking and DVC pipelines."""


@cli.command()
def datasets() -> None:
    """List the dataset catalogue with licences and whether each needs the network."""
    from regflow.data.catalogue import CATALOGUE, describe_dataset

    for entry in CATALOGUE.values():
        click.echo(describe_dataset(entry))


@cli.command()
def components() -> None:
    """List the losses and backbones params.yaml can name, built-in or from installed packages."""
    from regflow.components import listing

    rows = listing()
    width = max(len(row["kind"]) for row in rows)
    for row in rows:
        click.echo(f"{row['kind']:<{width}}  {row['name']:<16}  {row['source']}")


class FetchCommand(click.Command):
    """``fetch``, whose help ends with the catalogue read from the code (so it never goes stale)."""

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        from regflow.data.catalogue import CATALOGUE, describe_dataset

        with formatter.section("Datasets ([licence] [real|simulated] [access] description)"):
            formatter.write_dl([(name, describe_dataset(entry).removeprefix(name).strip())
                                for name, entry in CATALOGUE.items()])
        super().format_epilog(ctx, formatter)


@cli.command(cls=FetchCommand)
@click.argument("dataset", required=False)
@config_options()
def fetch(config: Config, dataset: str | None) -> None:
    """Download (or copy from $REGFLOW_DATA_MIRROR) and verify DATASET into data/raw/.

    DATASET defaults to data.dataset in params.yaml, or names a data.local entry (your own folder
    in DeepReg layout). Every file is checked against SHA-256 checksums; data/raw/DATASET is
    written only when all of them match, with a SHA256SUMS listing every file.
    """
    from regflow.stages import fetch_stage

    name = dataset or config.data.dataset
    target = fetch_stage(config, name, mirror=os.environ.get(MIRROR_ENV))
    click.echo(f"{name}: ready in {target}")


@cli.command()
@click.argument("dataset", required=False)
@config_options()
def preprocess(config: Config, dataset: str | None) -> None:
    """Resample, crop/pad and normalise DATASET into data/processed/ with a manifest."""
    from regflow.stages import preprocess_stage

    manifest = preprocess_stage(config, dataset)
    click.echo(f"{dataset or config.data.dataset}: manifest written to {Path(manifest)}")


@cli.command()
@click.option("--resume/--no-resume", default=True, show_default=True,
              help="Continue from models/<name>/last.pt when it was made under the same config.")
@config_options(load_training_config)
def train(config: Config, resume: bool) -> None:
    """Train a RegistrationModel on the processed dataset (merging tuned best params)."""
    from regflow.stages import train_stage

    result = train_stage(config, resume)
    click.echo(f"trained {result.steps} steps; best validation score {result.best_score:.4f}; "
               f"MLflow run {result.run_id}; checkpoint {result.best_checkpoint}")


@cli.command()
@config_options(load_training_config)
def evaluate(config: Config) -> None:
    """Evaluate the trained model and no registration on the test split (metrics/, plots/)."""
    from regflow.paths import METRICS_DIR, PLOTS_DIR

    claim_output(METRICS_DIR, folder=True)
    claim_output(PLOTS_DIR, folder=True)
    from regflow.stages import evaluate_stage  # only now: torch takes seconds

    headline = evaluate_stage(config)
    if headline.get("simulated_data"):
        click.echo("NOTE: this dataset is SIMULATED; these numbers are not clinical accuracy.")
    for key, value in headline.items():
        click.echo(f"{key:>20}: {value:.4f}")


@cli.command()
@click.option("--image", required=True, type=click.Path(dir_okay=False),
              help="Image or label to warp (.nii/.nii.gz).")
@click.option("--ddf", required=True, type=click.Path(dir_okay=False),
              help="Displacement field: NIfTI (*S, ndim) or .npy/.npz (ndim, *S), voxels.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output .nii.gz.")
@click.option("--nearest", is_flag=True, help="Nearest-neighbour interpolation (labels).")
def warp(image: str, ddf: str, out: str, nearest: bool) -> None:
    """Warp IMAGE with a DDF: warped[x] = image[x + ddf[x]] (DeepReg's deepreg_warp)."""
    from regflow.data.io import NIFTI_SUFFIXES

    claim_output(out, suffixes=NIFTI_SUFFIXES)
    from regflow.predict import warp_file  # only now: importing torch takes seconds

    warp_file(Path(image), Path(ddf), Path(out), nearest=nearest)
    click.echo(f"wrote {out}")


@cli.command("import-deepreg")
@click.argument("configs", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False),
              help="The regflow params file to write, e.g. params.yaml.")
def import_deepreg_command(configs: tuple[str, ...], out: str) -> None:
    """Translate DeepReg CONFIGS (merged in order, like --config_path) into a params file.

    DeepReg 0.1.0/0.1.1 configs are upgraded first, as DeepReg does. Every DeepReg key that has no
    regflow translation is printed with the reason, and so is every key DeepReg itself ignores;
    the losses get the options that reproduce DeepReg's formulas.
    """
    from regflow.deepreg.importer import import_deepreg

    translation = import_deepreg(list(configs), Path(out))
    for note in translation.notes:
        click.echo(f"note: {note}")
    for key, reason in translation.skipped:
        click.echo(f"not translated: {key}: {reason}")
    for key, reason in translation.ignored:
        click.echo(f"ignored: {key}: {reason}")
    click.echo(f"wrote {out} ({len(translation.skipped)} keys not translated, "
               f"{len(translation.ignored)} ignored as DeepReg ignores them)")


def check_predict_options(split: str | None, fixed: str | None, moving: str | None,
                          layout: str, png: bool, nifti: bool) -> None:
    """Reject ``regflow predict`` option combinations it cannot honour, before any work starts.

    Raises:
        RegflowError: neither a pair nor a split, the DeepReg layout without a split, or
            ``--no-png``/``--no-nifti`` outside the DeepReg layout.
    """
    if not split and not (fixed and moving):
        raise RegflowError("predict: give --fixed and --moving, or --split")
    if layout == "deepreg" and not split:
        raise RegflowError("predict: --layout deepreg writes a split's pairs; give --split")
    if layout != "deepreg" and not (png and nifti):
        raise RegflowError("predict: --no-png and --no-nifti shape the --layout deepreg tree; "
                           "add --layout deepreg")


@cli.command()
@click.option("--model", "model_spec", required=True,
              help="Checkpoint path, an MLflow URI such as models:/regflow@champion, or 'none' "
                   "(classical registration: affine, then non-rigid optimisation).")
@click.option("--refine-steps", type=click.IntRange(min=0),
              help="Test-time optimisation steps of the field (overrides evaluate.refine.steps; "
                   "0 returns the network's field unchanged).")
@click.option("--init", type=click.Choice(["centre", "header"]), default="centre",
              show_default=True, help="Initial alignment of a raw pair: image centres aligned "
                                      "in world space (as in training), or the affines alone.")
@click.option("--fixed", type=click.Path(dir_okay=False), help="Fixed image (.nii/.nii.gz).")
@click.option("--moving", type=click.Path(dir_okay=False), help="Moving image.")
@click.option("--moving-label", type=click.Path(dir_okay=False), help="Moving label (optional).")
@click.option("--fixed-label", type=click.Path(dir_okay=False),
              help="Fixed label (optional; with --moving-label writes metrics.csv).")
@click.option("--split", type=click.Choice(["train", "val", "test"]),
              help="Instead of one pair: every evaluation pair of this split of the dataset.")
@click.option("--learn2reg", is_flag=True, help="Also write disp_FFFF_MMMM.npz (float16).")
@click.option("--layout", type=click.Choice(["regflow", "deepreg"]), default="regflow",
              show_default=True, help="With --split: deepreg writes deepreg_predict's pair_<i>/ "
                                      "folders (NIfTI and PNG) and its metrics CSVs.")
@click.option("--no-png", "no_png", is_flag=True, help="--layout deepreg: no PNG slices.")
@click.option("--no-nifti", "no_nifti", is_flag=True,
              help="--layout deepreg: no NIfTI volumes (metrics and PNG only).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@config_options()
def predict(config: Config, model_spec: str, refine_steps: int | None, init: str,
            fixed: str | None, moving: str | None, moving_label: str | None,
            fixed_label: str | None, split: str | None, learn2reg: bool, layout: str,
            no_png: bool, no_nifti: bool, out: str) -> None:
    """Register a raw pair (any size/spacing) or a dataset split with a trained model.

    A shipped checkpoint (models/shipped/) registers with the test-time settings it was evaluated
    with, unless -c or -S evaluate.* asks for others.
    """
    check_predict_options(split, fixed, moving, layout, not no_png, not no_nifti)
    claim_output(out, folder=True)
    from regflow.predict import predict_command  # only now: torch takes seconds

    def optional(path: str | None) -> Path | None:
        return Path(path) if path else None

    written = predict_command(config, model_spec, Path(out), refine_steps=refine_steps,
                              fixed=optional(fixed), moving=optional(moving),
                              moving_label=optional(moving_label),
                              fixed_label=optional(fixed_label), split=split,
                              learn2reg=learn2reg, init=init, layout=layout,
                              own_settings=not evaluation_settings_given(),
                              png=not no_png, nifti=not no_nifti)
    click.echo(f"wrote {len(written)} files to {out}")


@cli.group(cls=RegflowGroup)
def vis() -> None:
    """Pictures of volumes, fields and predict outputs (DeepReg's deepreg_vis, and more).

    GIFs and PNGs go to files; inside an MLflow run (an active one, or MLFLOW_RUN_ID) they are
    also logged to it under vis/.
    """


AXIS_OPTION = click.option("--axis", type=click.IntRange(0, 2), default=2, show_default=True,
                           help="Array axis the slices are taken along.")
INTERVAL_OPTION = click.option("--interval", type=click.IntRange(min=10), default=100,
                               show_default=True, help="Milliseconds per GIF frame.")
ZOOM_OPTION = click.option("--zoom", type=click.IntRange(1, 32),
                           help="Pixels per voxel (default: a panel of about 256 pixels).")


def finish_pictures(written: Sequence[Path], root: Path) -> None:
    """Log the pictures to the current MLflow run (if any) and name them."""
    from regflow.vis import log_to_mlflow

    run_id = log_to_mlflow(written, root)
    for path in written:
        click.echo(f"wrote {path}")
    if run_id:
        click.echo(f"logged {len(written)} pictures to MLflow run {run_id}")


@vis.command("slices")
@click.argument("images", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output .gif.")
@AXIS_OPTION
@INTERVAL_OPTION
@ZOOM_OPTION
def vis_slices(images: tuple[str, ...], out: str, axis: int, interval: int,
               zoom: int | None) -> None:
    """A GIF stepping through the slices of IMAGES (several: side by side)."""
    claim_output(out, suffixes=(".gif",))
    from regflow.data.io import nifti_stem
    from regflow.vis import read_image, slices_gif

    written = slices_gif([read_image(path) for path in images], out,
                         [nifti_stem(path) for path in images], axis, interval, zoom)
    finish_pictures([written], written.parent)


@vis.command("warp")
@click.option("--moving", required=True, type=click.Path(dir_okay=False), help="Moving image.")
@click.option("--ddf", required=True, type=click.Path(dir_okay=False),
              help="DDF on the moving image's grid (NIfTI, .npy, .npz), voxels.")
@click.option("--fixed", type=click.Path(dir_okay=False), help="Fixed image, shown beside.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output .gif.")
@AXIS_OPTION
@click.option("--slice", "index", type=click.IntRange(min=0), help="Slice (default: middle).")
@click.option("--frames", type=click.IntRange(min=2), default=20, show_default=True)
@click.option("--grid-step", type=click.IntRange(min=1), default=4, show_default=True,
              help="Deformation grid spacing in voxels.")
@INTERVAL_OPTION
@ZOOM_OPTION
def vis_warp(moving: str, ddf: str, fixed: str | None, out: str, axis: int, index: int | None,
             frames: int, grid_step: int, interval: int, zoom: int | None) -> None:
    """A GIF of MOVING warping by 0 to 1 times the DDF, its deformation grid drawn over it."""
    claim_output(out, suffixes=(".gif",))
    from regflow.vis import read_field, read_image, warp_gif

    written = warp_gif(read_image(moving), read_field(ddf), out,
                       read_image(fixed) if fixed else None, axis, index, frames, interval,
                       grid_step, zoom)
    finish_pictures([written], written.parent)


@vis.command("mosaic")
@click.argument("images", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output .png.")
@click.option("--slices", help="Comma-separated slice indices (default: five interior ones).")
@AXIS_OPTION
def vis_mosaic(images: tuple[str, ...], out: str, slices: str | None, axis: int) -> None:
    """A PNG of slices (rows) across IMAGES (columns)."""
    try:
        chosen = [int(value) for value in slices.split(",")] if slices else None
    except ValueError:
        raise RegflowError(f"--slices {slices!r}: expected comma-separated integers") from None
    claim_output(out, suffixes=(".png",))
    from regflow.data.io import nifti_stem
    from regflow.vis import mosaic_png, read_image

    written = mosaic_png([read_image(path) for path in images],
                         [nifti_stem(path) for path in images], out, chosen, axis)
    finish_pictures([written], written.parent)


@vis.command("checkerboard")
@click.option("--fixed", required=True, type=click.Path(dir_okay=False), help="Fixed image.")
@click.option("--warped", required=True, type=click.Path(dir_okay=False),
              help="Warped moving image on the fixed grid.")
@click.option("--moving", type=click.Path(dir_okay=False),
              help="Moving image on the fixed grid, for the 'before' column.")
@click.option("--tiles", type=click.IntRange(min=2), default=8, show_default=True)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output .png.")
def vis_checkerboard(fixed: str, warped: str, moving: str | None, tiles: int, out: str) -> None:
    """A PNG interleaving fixed and warped (and fixed and moving) in a checkerboard."""
    claim_output(out, suffixes=(".png",))
    from regflow.vis import checkerboard_png, read_image

    written = checkerboard_png(read_image(fixed), read_image(warped), out,
                               read_image(moving) if moving else None, tiles)
    finish_pictures([written], written.parent)


@vis.command("jacobian")
@click.option("--ddf", required=True, type=click.Path(dir_okay=False),
              help="DDF (NIfTI, .npy, .npz), voxels.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output .png.")
def vis_jacobian(ddf: str, out: str) -> None:
    """A PNG of the DDF's Jacobian determinant, folding (det <= 0) marked."""
    claim_output(out, suffixes=(".png",))
    from regflow.vis import jacobian_png, read_field

    written = jacobian_png(read_field(ddf), out)
    finish_pictures([written], written.parent)


@vis.command("predicted")
@click.argument("folder", type=click.Path(file_okay=False, exists=True))
@click.option("--out", type=click.Path(file_okay=False),
              help="Output folder (default: FOLDER/vis).")
@AXIS_OPTION
@click.option("--frames", type=click.IntRange(min=2), default=20, show_default=True)
def vis_predicted(folder: str, out: str | None, axis: int, frames: int) -> None:
    """Every picture for each pair_<i>/ of a `regflow predict --layout deepreg` FOLDER."""
    from regflow.vis import predicted_pairs, predicted_pictures

    predicted_pairs(folder)
    target = Path(out) if out else Path(folder) / "vis"
    claim_output(target, folder=True)

    finish_pictures(predicted_pictures(folder, target, axis, frames), target)


@cli.command()
@click.option("--storage", help="Optuna RDB URL (overrides tune.storage), e.g. "
              "postgresql://user:pass@host/db to share the study between machines.")
@click.option("--model", "model_spec", metavar="PATH|models:/NAME@ALIAS",
              help="The trained model a test-time sweep (search keys all under evaluate.) "
                   "evaluates [default: models/<train.name>/best.pt].")
@config_options()
def tune(config: Config, storage: str | None, model_spec: str | None) -> None:
    """Optuna study over tune.search_space; the rule's pick -> models/tuning/best_params.yaml.

    Training keys: each trial a short training (from tune.init_from when set). Keys all under
    evaluate.: each trial evaluates one trained model's settings on validation pairs.
    """
    from regflow.stages import tune_stage

    best = tune_stage(config, storage_url=storage, model=model_spec)
    click.echo(f"best params: {best}" if best else "tuning disabled or no feasible trial")


@cli.command()
@click.option("--checkpoint", type=click.Path(dir_okay=False),
              help="Register this checkpoint (e.g. the shipped weights in models/shipped/) "
                   "without training: evaluate it on evaluate.split first (fetching and "
                   "preprocessing the dataset when needed). A shipped checkpoint brings its own "
                   "config unless -c is given.")
@config_options(load_training_config)
def register(config: Config, checkpoint: str | None) -> None:
    """Log the trained model as a pyfunc, register it and gate the @champion alias."""
    from regflow.stages import register_checkpoint_stage, register_stage

    if checkpoint:
        if not evaluation_settings_given():
            config = checkpoint_config(Path(checkpoint), config)
        decision = register_checkpoint_stage(config, Path(checkpoint),
                                             mirror=os.environ.get(MIRROR_ENV))
    else:
        decision = register_stage(config)
    state = "is now @champion" if decision["champion"] else "is @challenger only"
    click.echo(f"{decision['model_name']} version {decision['version']} {state}: "
               f"{decision['reason']}")


@cli.command()
@click.option("--checkpoint", required=True, type=click.Path(dir_okay=False),
              help="The trained checkpoint, e.g. models/<name>/best.pt.")
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False),
              help="The shipped .pt file to write.")
@click.option("--half", is_flag=True, help="Store the weights as float16 (half the size).")
@click.option("--evaluate", "measure", is_flag=True,
              help="Evaluate the written file on evaluate.split with its own settings and put "
                   "the metrics in its JSON record.")
@config_options(load_training_config)
def export(config: Config, checkpoint: str, out: str, half: bool, measure: bool) -> None:
    """Package a checkpoint to ship: weights, the config it was trained with, and the config's
    evaluate section as its own test-time settings (used by predict and register --checkpoint).
    A JSON record beside it (OUT with .json) holds its sha256, size, settings and metrics."""
    claim_output(out, suffixes=(".pt",))
    from regflow.shipping import export_checkpoint, write_record

    shipped = export_checkpoint(Path(checkpoint), config, Path(out), half=half)
    metrics = None
    if measure:
        from regflow.stages import evaluate_checkpoint

        metrics = evaluate_checkpoint(config, Path(out))[1]
        click.echo(f"{config.evaluate.split}: " + ", ".join(
            f"{key} {value:.4g}" for key, value in metrics.items()))
    record = write_record(shipped, config, half, metrics)
    click.echo(f"wrote {out}: {shipped['bytes']} bytes, {shipped['parameters']} parameters, "
               f"sha256 {shipped['sha256']}; record {record}")


@cli.command()
@click.argument("url")
@click.option("--fixed", required=True, type=click.Path(dir_okay=False), help="Fixed image.")
@click.option("--moving", required=True, type=click.Path(dir_okay=False), help="Moving image.")
@click.option("--moving-label", type=click.Path(dir_okay=False), help="Moving label (optional).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--timeout", default=120.0, show_default=True, help="Seconds to wait.")
@click.option("--refine-steps", type=click.IntRange(min=0),
              help="Refinement steps to ask for (0: the network alone; default: the server's).")
def request(url: str, fixed: str, moving: str, moving_label: str | None, out: str,
            timeout: float, refine_steps: int | None) -> None:
    """Send a pair to a running model server (URL) and write the answer as NIfTI."""
    from regflow.serving.client import invocations_endpoint, request_registration

    invocations_endpoint(url)
    claim_output(out, folder=True)
    answer = request_registration(url, Path(fixed), Path(moving),
                                  Path(moving_label) if moving_label else None, Path(out),
                                  timeout, refine_steps)
    applied = ("" if answer.refine_steps is None else
               f" ({answer.refine_steps} refinement steps, {answer.time_s:.3f} s on the server)")
    click.echo(f"wrote {', '.join(str(path) for path in answer.written)}{applied}")


def serve_command(model_uri: str, host: str, port: int, workers: int
                  ) -> tuple[list[str], dict[str, str]]:
    """The uvicorn command line and the variables ``regflow serve`` runs the server with.

    The variables name the model and the project's store (:func:`regflow.tracking.tracking_uri`)
    and keep MLflow quiet and offline; see :mod:`regflow.serving.app`.
    """
    from regflow.serving.app import APP, GRACE_S, HEALTHCHECK_S, MODEL_ENV
    from regflow.tracking import QUIET_ENV, tracking_uri

    env = {**QUIET_ENV, MODEL_ENV: model_uri, "MLFLOW_TRACKING_URI": tracking_uri()}
    command = [sys.executable, "-m", "uvicorn", "--factory", APP, "--host", host,
               "--port", str(port), "--workers", str(workers),
               "--timeout-graceful-shutdown", str(GRACE_S),
               "--timeout-worker-healthcheck", str(HEALTHCHECK_S)]
    return command, env


@cli.command()
@click.option("--model", "model_uri", default="models:/regflow@champion", show_default=True,
              help="MLflow model URI: models:/NAME@ALIAS, models:/NAME/VERSION or runs:/ID/model.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=5001, show_default=True, type=click.IntRange(1, 65535))
@click.option("--workers", default=2, show_default=True, type=click.IntRange(min=1),
              help="Server worker processes.")
@click.option("--print-command", is_flag=True,
              help="Print the equivalent uvicorn command and its variables instead of serving.")
def serve(model_uri: str, host: str, port: int, workers: int, print_command: bool) -> None:
    """Serve a registered model: MLflow's scoring server (POST /invocations, GET /ping) run by
    uvicorn in this process, its workers ending with it.

    Works from an unactivated venv; the model store is the project's (or $MLFLOW_TRACKING_URI).
    """
    from regflow.serving.app import MODEL_ENV, serve_model

    command, env = serve_command(model_uri, host, port, workers)
    if print_command:
        click.echo(shlex.join(command))
        for name in (MODEL_ENV, "MLFLOW_TRACKING_URI"):
            click.echo(f"{name}={redact_value(env[name])}")
        return
    for name, value in env.items():
        os.environ.setdefault(name, value)
    serve_model(model_uri, host, port, workers)


@cli.command()
@config_options()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=5000, show_default=True, type=click.IntRange(1, 65535))
def ui(config: Config, host: str, port: int) -> None:
    """MLflow's UI on the project's store: prints the link that opens the dataset's experiment
    in the model-training view with regflow's runs view, then serves until stopped.

    With $MLFLOW_TRACKING_URI=http(s)://... it prints the link at that server and exits.
    """
    import subprocess

    from regflow import experiment_page, paths
    from regflow.tracking import configure_mlflow, tracking_uri

    store = tracking_uri()
    experiment_id = configure_mlflow(paths.experiment_name(config.data.dataset))
    remote = store.startswith(("http://", "https://"))
    base = redact_value(store) if remote else f"http://{host}:{port}"
    click.echo(experiment_page.experiment_link(base, experiment_id))
    if remote:
        return
    try:
        sys.exit(subprocess.call(experiment_page.ui_command(store, host, port)))
    except KeyboardInterrupt:  # Ctrl-C reached mlflow ui too, which has ended
        sys.exit(130)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="regflow")


if __name__ == "__main__":
    main()
