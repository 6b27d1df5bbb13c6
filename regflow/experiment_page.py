"""How a regflow experiment presents itself in the MLflow UI: its kind, description and runs view.

Three experiment tags (and a digest of the description), set by
:func:`regflow.tracking.configure_mlflow` whenever regflow creates or reuses an experiment:

- ``mlflow.experimentKind: custom_model_development``: a model-training experiment, not a GenAI
  one. The MLflow 3.17 UI itself picks its view from the browser's "GenAI / Model training"
  switch (kept per browser, GenAI at first) or from ``workflowType=machine_learning`` in the
  link; :func:`experiment_link` builds a link that opens the training view.
- ``mlflow.note.content``: the description shown on the experiment page (what the runs are, what
  the metrics mean, how to compare runs). A description someone edited in the UI is kept; one
  that regflow wrote follows regflow's current text.
- ``mlflow.sharedViewState.regflow``: a saved view of the runs table (the columns that matter,
  best test Dice first), the view MLflow's "Share" button saves; the link opens it.
"""

from __future__ import annotations

import hashlib
import json
import sys
from urllib.parse import urlencode

KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"
NOTE_TAG = "mlflow.note.content"
NOTE_DIGEST_TAG = "regflow.note.sha256"  # of the description regflow last wrote
VIEW_KEY = "regflow"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"

# The runs table's columns, in order: the evaluation's headline (evaluate logs ``eval/*`` into
# the training run) and the latest validation Dice of the training.
COLUMNS = ("eval/dice_mean", "eval/sdlogj", "eval/folding_pct", "eval/time_ms_per_pair",
           "eval/hd95_mean", "val/dice_mean")
SORT_BY = "eval/dice_mean"

# Markdown; MLflow's UI breaks lines where the text does, so each paragraph or item is one line.
DESCRIPTION = "\n".join((
    "**regflow registration runs on `{dataset}`** (`regflow datasets` describes the data and "
    "its licence).",
    "",
    "Each `regflow train` run holds its params, the loss terms per step (`train/...`), "
    "validation during training (`val/...`) and, once `regflow evaluate` has run, the "
    "evaluation of the `evaluate.split` pairs (`eval/...`). `regflow register` runs and "
    "`regflow tune` studies (one nested run per trial) sit beside them.",
    "",
    "Metrics, means over pairs (`..._before`: the same pairs without registration):",
    "- `eval/dice_mean`: Dice over the labels after registration, 0 to 1, higher is better; "
    "`eval/dice30`: its 30th percentile over pairs (Learn2Reg's robustness figure).",
    "- `eval/sdlogj`: standard deviation of log |Jacobian determinant| of the field "
    "(Learn2Reg's SDlogJ), lower is smoother.",
    "- `eval/folding_pct`: % of voxels where the field folds (Jacobian determinant <= 0), "
    "lower is better.",
    "- `eval/hd95_mean`: 95th-percentile surface distance (mm); `eval/tre_mm`: distance "
    "between label centroids (mm).",
    "- `eval/time_ms_per_pair`: milliseconds per registered pair, test-time refinement "
    "included.",
    "- `val/dice_mean`: Dice on the validation pairs at the latest validation.",
    "",
    "Compare runs: the saved view \"{view}\" (link `?viewStateShareKey={view}`, which "
    "`regflow ui` prints) shows these columns, best Dice first. Tick runs and press "
    "\"Compare\" for their params and metrics side by side; the chart view plots "
    "`val/dice_mean` over steps. Compare evaluations of the same split and pairs only "
    "(params `evaluate.split`, `loader.eval_pairs`).",
))


def description(experiment_name: str) -> str:
    """The experiment's description (markdown) for an experiment named ``regflow-<dataset>``."""
    dataset = experiment_name.removeprefix("regflow-")
    return DESCRIPTION.format(dataset=dataset, view=VIEW_KEY)


def runs_view() -> str:
    """The saved runs-table view: :data:`COLUMNS` in this order after the run's name and start
    (no source, model or dataset column), sorted by :data:`SORT_BY` descending.

    The JSON holds the fields of MLflow's experiment-page state it sets; the UI fills the rest
    with its defaults.
    """
    def metric(key: str) -> str:
        return f"metrics.`{key}`"

    columns = [metric(key) for key in COLUMNS]
    return json.dumps({"selectedColumns": columns, "columnOrder": columns,
                       "orderByKey": metric(SORT_BY), "orderByAsc": False})


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def experiment_tags(experiment_name: str, current: dict[str, str]) -> dict[str, str]:
    """The tags to set on an experiment whose tags are ``current``: the kind and the runs view
    always; the description where there is none or where it is one regflow wrote (its digest in
    :data:`NOTE_DIGEST_TAG`) and nobody has edited since."""
    tags = {KIND_TAG: MODEL_TRAINING, VIEW_TAG: runs_view()}
    note = current.get(NOTE_TAG, "")
    if not note.strip() or current.get(NOTE_DIGEST_TAG) == _digest(note):
        tags[NOTE_TAG] = description(experiment_name)
        tags[NOTE_DIGEST_TAG] = _digest(tags[NOTE_TAG])
    return {key: value for key, value in tags.items() if current.get(key) != value}


def ui_command(store_uri: str, host: str, port: int) -> list[str]:
    """The ``mlflow ui`` command line for a store: run with this Python (no PATH needed), one
    server process (uvicorn's worker health checks kill starved workers on a busy machine)."""
    return [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", store_uri,
            "--host", host, "--port", str(port), "--workers", "1"]


def experiment_link(ui_url: str, experiment_id: str) -> str:
    """The MLflow UI address that opens an experiment's runs in the training view with
    regflow's runs view, e.g. ``http://127.0.0.1:5000/#/experiments/1/runs?...``."""
    query = urlencode({"workflowType": "machine_learning", "viewStateShareKey": VIEW_KEY})
    return f"{ui_url.rstrip('/')}/#/experiments/{experiment_id}/runs?{query}"
