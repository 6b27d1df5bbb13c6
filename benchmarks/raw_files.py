"""Held-out pairs scored two ways: as ``regflow evaluate`` sees them and from the raw files.

Run ``python -m benchmarks.raw_files --model PATH_OR_URI [--refine-steps N] [--split test]``.

``evaluate`` registers the processed volumes (the model's frame) and scores Dice there; ``regflow
predict`` and the model server take the raw files (any orientation, voxel size, shape), bring
them into the model's frame, and score on the raw fixed grid. For the same model and pairs the two
must agree: the table prints both mean Dice values, their difference and the seconds per pair of
each path (the raw path includes reading the files).
"""

from __future__ import annotations

import time
from pathlib import Path

import click
import numpy as np

from regflow import metrics
from regflow.cli import config_options
from regflow.config import Config, load_training_config
from regflow.data.catalogue import get_dataset
from regflow.data.layouts import VolumeRef, discover_cases
from regflow.data.loader import build_dataloader, pair_list
from regflow.data.manifest import Manifest
from regflow.evaluation import evaluate_pairs, summarise
from regflow.inference import Registrar, Volume, load_registrar
from regflow.paths import manifest_path


class LazyVolume:
    """A raw volume read when first used (a dataset has hundreds; a split uses a few)."""

    def __init__(self, ref: VolumeRef) -> None:
        self.ref = ref
        self._volume: Volume | None = None

    def get(self) -> Volume:
        """The volume, read on the first call."""
        if self._volume is None:
            array, affine = self.ref.read()
            self._volume = Volume(array, affine, str(self.ref.path))
        return self._volume


def raw_volumes(config: Config) -> dict[tuple[str, str], LazyVolume]:
    """(case id, role) -> the raw volume of every case of the configured dataset."""
    name = config.data.dataset
    entry = get_dataset(name, config)
    cases, _ = discover_cases(Path(config.data.raw_dir) / name, entry.layout, entry.pairing,
                              entry.file_format, entry.subdir)
    volumes = {}
    for case in cases:
        for role, ref in case.volumes.items():
            volumes[(case.case_id, role)] = LazyVolume(ref)
    return volumes


def raw_dice(registrar: Registrar, config: Config, manifest: Manifest, split: str
             ) -> tuple[float, float]:
    """Mean Dice over the evaluation pairs registered from their raw files; seconds per pair."""
    volumes = raw_volumes(config)
    paired = manifest.pairing == "paired"
    scores, started = [], time.perf_counter()
    pairs = pair_list(manifest_path(config), split, config)
    for fixed_id, moving_id in pairs:
        fixed_role, moving_role = ("fixed_image", "moving_image") if paired else ("image", "image")
        fixed = volumes[(fixed_id, fixed_role)].get()
        fixed_label = volumes[(fixed_id, fixed_role.replace("image", "label"))].get()
        moving_label = volumes[(moving_id, moving_role.replace("image", "label"))].get()
        result = registrar.register_volumes(fixed, volumes[(moving_id, moving_role)].get(),
                                            moving_label)
        scores.append(np.mean(metrics.dice(fixed_label.array, result["warped_label"],
                                           labels=manifest.label_values)))
    return float(np.mean(scores)), (time.perf_counter() - started) / len(pairs)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", "model_spec", required=True, help="Checkpoint path or models:/ URI.")
@click.option("--refine-steps", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--split", type=click.Choice(["test", "val"]), default="test", show_default=True)
@config_options(load_training_config)
def main(config: Config, model_spec: str, refine_steps: int, split: str) -> None:
    """Mean Dice of one model on a split: processed volumes (evaluate) against raw files."""
    registrar = load_registrar(model_spec, config, refine_steps)
    manifest = Manifest.read(manifest_path(config))
    loader = build_dataloader(manifest_path(config), split, config, train=False)
    started = time.perf_counter()
    rows = evaluate_pairs(registrar, loader, manifest.voxel_size, manifest.channel_names)
    processed_s = (time.perf_counter() - started) / len(rows)
    processed = summarise(rows)["dice_mean"]
    raw, raw_s = raw_dice(registrar, config, manifest, split)
    click.echo(f"| path ({len(rows)} {split} pairs, refine {refine_steps}) | mean Dice | "
               "s per pair |\n|---|---|---|")
    click.echo(f"| processed volumes (regflow evaluate) | {processed:.4f} | {processed_s:.3f} |")
    click.echo(f"| raw files (regflow predict, serving) | {raw:.4f} | {raw_s:.3f} |")
    click.echo(f"| difference | {raw - processed:+.4f} | |")


if __name__ == "__main__":
    main()
