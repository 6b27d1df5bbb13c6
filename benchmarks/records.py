"""Benchmark results as committed data: where each row came from, and the file that keeps them.

A results file (``benchmarks/results/<benchmark>.json``) holds ``{"benchmark": NAME, "rows":
[...]}``. Every row carries its own provenance (:func:`provenance`): the commit of the code that
measured it (``+dirty`` when tracked files other than the results differ from it), the date and a
machine note (threads, cores, load, scheduling class), so rows measured by different runs can sit
side by side. A run updates the rows it measured, matched by :data:`KEY_FIELDS`, and keeps the
others (:func:`upsert`): re-running one method does not discard the rest of the table.
``python -m benchmarks.results`` renders these files into docs/results.md.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from regflow import fileio
from regflow.errors import RegflowError

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "benchmarks" / "results"
# paths the benchmarks themselves write: a change there does not make the measuring code dirty
GENERATED_PATHS = ("benchmarks/results", "docs/results.md")
KEY_FIELDS = ("split", "method", "settings")
FLOAT_DIGITS = 6


def git_commit(root: Path = ROOT) -> str:
    """``git rev-parse --short HEAD`` of ``root``, with ``+dirty`` when a tracked file outside
    :data:`GENERATED_PATHS` differs from it; ``unknown`` outside a git checkout."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        changes = git("status", "--porcelain", "--untracked-files=no", "--", ".",
                      *[f":(exclude){path}" for path in GENERATED_PATHS])
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{commit}+dirty" if changes else commit


class LoadWatch:
    """The machine's 1-minute load average, sampled while a measurement runs.

    Args:
        threads: compute threads the measurement uses (its own share of the load).
    """

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self.loads = [os.getloadavg()[0]]

    def sample(self) -> None:
        """Record the current load (call during and at the end of the measurement)."""
        self.loads.append(os.getloadavg()[0])

    def note(self, extra: str = "") -> str:
        """``<threads> threads, <cores> cores, idle|shared (load a-b)[, SCHED_IDLE][; extra]``:
        shared when the load rose above the measurement's own threads by half a core."""
        shared = max(self.loads) > self.threads + 0.5
        parts = [f"{self.threads} thread{'s' if self.threads != 1 else ''}",
                 f"{os.cpu_count()} cores",
                 f"{'shared' if shared else 'idle'} (load {min(self.loads):.1f}-"
                 f"{max(self.loads):.1f})"]
        if os.sched_getscheduler(0) == getattr(os, "SCHED_IDLE", None):
            parts.append("SCHED_IDLE")
        return ", ".join(parts) + (f"; {extra}" if extra else "")


def provenance(commit: str, machine: str) -> dict[str, str]:
    """``commit`` (:func:`git_commit`, taken when the measuring code was loaded), ``date`` (now,
    UTC, ISO 8601 to the minute) and ``machine`` of a row."""
    date = datetime.now(UTC).strftime("%Y-%m-%dT%H:%MZ")
    return {"commit": commit, "date": date, "machine": machine}


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, FLOAT_DIGITS) if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _rounded(item) for key, item in value.items()}
    return value


def read(path: str | Path) -> dict[str, Any]:
    """A results file (``{"benchmark": ..., "rows": [...]}``); an empty one when it is absent.

    Raises:
        RegflowError: the file is not such a JSON object.
    """
    path = Path(path)
    if not path.exists():
        return {"benchmark": path.stem, "rows": []}
    try:
        payload = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise RegflowError(f"{path}: not a readable results file ({exc})") from exc
    if not isinstance(payload, dict) or not isinstance(payload.get("rows"), list):
        raise RegflowError(f"{path}: a results file is an object with a 'rows' list")
    return payload


def upsert(path: str | Path, rows: Sequence[dict[str, Any]],
           key_fields: Sequence[str] = KEY_FIELDS,
           columns: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Put ``rows`` into the results file at ``path`` (written atomically): a row whose
    ``key_fields`` match an existing one replaces it in place, the others are appended in order.
    Floats are rounded to :data:`FLOAT_DIGITS` digits, NaN stored as null. ``columns`` is kept
    in the file as the order its table shows them in (JSON keys are stored sorted).

    Returns:
        All the file's rows after the update.
    """
    payload = read(path)
    if columns is not None:
        payload["columns"] = list(columns)
    table = payload["rows"]
    for row in rows:
        row = _rounded(dict(row))
        key = tuple(row.get(field) for field in key_fields)
        for index, existing in enumerate(table):
            if tuple(existing.get(field) for field in key_fields) == key:
                table[index] = row
                break
        else:
            table.append(row)
    fileio.write_json(path, payload)
    return table
