"""Training runs' validation curves, copied from an MLflow store into a committed results file.

Run ``python -m benchmarks.training_curves --tracking-uri URI --run NAME=RUN_ID [...] [-o CSV]``.
Each validation of each run becomes one row: the run's name and id, the commit and config digest
it trained from (its ``git.commit`` and ``regflow.config_digest`` tags; ``NAME=RUN_ID@DIGEST``
supplies a digest the run did not record), its start date, the step, and the validation metrics
(Dice per label and mean, SDlogJ, folding %). Rows of the runs named replace their earlier rows
in the file; the other runs' rows stay, so an ablation can be added to the file run by run.
"""

from __future__ import annotations

import csv
import datetime
from pathlib import Path

import click
import mlflow

from regflow.fileio import atomic_open

DEFAULT_OUTPUT = Path(__file__).parent / "results" / "training_curves.csv"
RUN_COLUMNS = ["run_name", "run_id", "commit", "config_digest", "date"]
VALIDATION_PREFIX = "val/"
SKIPPED_METRICS = ("val/time_s", "val/tre_mm")


def run_rows(client: mlflow.MlflowClient, name: str, run_id: str, digest: str | None
             ) -> list[dict[str, str]]:
    """One row per validation step of ``run_id``, labelled ``name``."""
    run = client.get_run(run_id)
    tags = run.data.tags
    base = {"run_name": name, "run_id": run_id, "commit": tags.get("git.commit", "")[:10],
            "config_digest": tags.get("regflow.config_digest", digest or ""),
            "date": datetime.datetime.fromtimestamp(run.info.start_time / 1000, datetime.UTC)
            .strftime("%Y-%m-%d")}
    by_step: dict[int, dict[str, str]] = {}
    for key in sorted(run.data.metrics):
        if not key.startswith(VALIDATION_PREFIX) or key in SKIPPED_METRICS:
            continue
        for point in client.get_metric_history(run_id, key):
            row = by_step.setdefault(point.step, {**base, "step": str(point.step)})
            row[key.removeprefix(VALIDATION_PREFIX).replace("/", "_")] = f"{point.value:.4f}"
    return [by_step[step] for step in sorted(by_step)]


def merge_rows(existing: list[dict[str, str]], new: list[dict[str, str]]
               ) -> list[dict[str, str]]:
    """``existing`` without the runs ``new`` holds, then ``new``."""
    replaced = {row["run_id"] for row in new}
    return [row for row in existing if row["run_id"] not in replaced] + new


def write_rows(path: Path, rows: list[dict[str, str]]) -> None:
    """Write ``rows`` as CSV, the run columns first, then step and the metrics (sorted)."""
    metrics = sorted({key for row in rows for key in row} - set(RUN_COLUMNS) - {"step"})
    with atomic_open(path, newline="") as stream:
        writer = csv.DictWriter(stream, [*RUN_COLUMNS, "step", *metrics], restval="")
        writer.writeheader()
        writer.writerows(rows)


def parse_run(spec: str) -> tuple[str, str, str | None]:
    """``NAME=RUN_ID[@DIGEST]`` -> (name, run id, digest or None)."""
    name, separator, rest = spec.partition("=")
    if not separator or not name or not rest:
        raise click.BadParameter(f"{spec!r}: expected NAME=RUN_ID or NAME=RUN_ID@DIGEST")
    run_id, _, digest = rest.partition("@")
    return name, run_id, digest or None


@click.command()
@click.option("--tracking-uri", required=True, help="The MLflow store holding the runs.")
@click.option("--run", "runs", multiple=True, required=True, help="NAME=RUN_ID[@DIGEST].")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              default=DEFAULT_OUTPUT, show_default=True)
def main(tracking_uri: str, runs: tuple[str, ...], output: Path) -> None:
    """Copy the runs' validation curves into the results file."""
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    new = [row for spec in runs for row in run_rows(client, *parse_run(spec))]
    existing = list(csv.DictReader(output.open())) if output.exists() else []
    write_rows(output, merge_rows(existing, new))
    click.echo(f"{output}: {len(new)} rows from {len(runs)} runs")


if __name__ == "__main__":
    main()
