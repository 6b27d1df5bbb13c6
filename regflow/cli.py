"""The ``regflow`` command line: one command per DVC stage plus predict/warp/request.

Commands only parse options, load the config and call the library; a :class:`RegflowError` becomes
one line on stderr and exit code 2.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from regflow import __version__
from regflow.config import Config, load_config
from regflow.errors import RegflowError

MIRROR_ENV = "REGFLOW_DATA_MIRROR"


class RegflowGroup(click.Group):
    """A click group that turns user errors into one line and exit code 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except RegflowError as exc:
            click.echo(f"Error: {exc}", err=True)
            ctx.exit(2)


def config_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add ``-c/--config`` and ``-S key=value`` and pass the loaded :class:`Config` as ``config``."""

    @click.option("-c", "--config", "config_path", default="params.yaml", show_default=True,
                  type=click.Path(dir_okay=False), help="params.yaml to read.")
    @click.option("-S", "--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE",
                  help="Override a params key (repeatable), as `dvc exp run -S` does.")
    @functools.wraps(command)
    def wrapper(config_path: str, overrides: tuple[str, ...], **kwargs: Any) -> Any:
        return command(config=load_config(config_path, overrides), **kwargs)

    return wrapper


@click.group(cls=RegflowGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="regflow")
def cli() -> None:
    """regflow: deep-learning medical image registration with MLflow tracking and DVC pipelines."""


@cli.command()
def datasets() -> None:
    """List the dataset catalogue with licences and whether each needs the network."""
    from regflow.data.sources import CATALOGUE, describe_dataset

    for entry in CATALOGUE.values():
        click.echo(describe_dataset(entry))


@cli.command()
@click.argument("dataset", required=False)
@config_options
def fetch(config: Config, dataset: str | None) -> None:
    """Download (or copy from $REGFLOW_DATA_MIRROR) and verify DATASET into data/raw/.

    DATASET defaults to data.dataset in params.yaml. Run `regflow datasets` for the catalogue.
    """
    from regflow.data.sources import fetch_dataset

    name = dataset or config.data.dataset
    target = fetch_dataset(name, config, mirror=os.environ.get(MIRROR_ENV))
    click.echo(f"{name}: ready in {target}")


@cli.command()
@click.argument("dataset", required=False)
@config_options
def preprocess(config: Config, dataset: str | None) -> None:
    """Resample, crop/pad and normalise DATASET into data/processed/ with a manifest."""
    from regflow.data.preprocess import preprocess_dataset

    name = dataset or config.data.dataset
    manifest = preprocess_dataset(name, config)
    click.echo(f"{name}: manifest written to {Path(manifest)}")


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="regflow")
