"""Model Registry: log the trained model as a pyfunc, register it, gate @champion.

Every new version gets ``@challenger``; ``@champion`` moves to it only when its evaluation Dice is
not below the current champion's and its folding is under ``registry.max_folding_pct``. The
decision goes to models/registered.json and to the version's tags.

Crash consistency: the model is logged from code (regflow/serving/pyfunc_model.py, no pickle),
then the version is created together with its evaluation and decision tags in one call, so no
version is ever visible without them; the aliases follow, ``@challenger`` last, as the mark of a
finished registration. A later run first reconciles what an interrupted one left
(:func:`reconcile`), so ``models:/<name>/latest`` never names an unevaluated model.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import yaml
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from regflow import tracking
from regflow.config import Config
from regflow.errors import RegflowError
from regflow.redact import redact_values
from regflow.serving.model import CHECKPOINT_ARTIFACT, CONFIG_ARTIFACT, input_example, signature

CHAMPION, CHALLENGER = "champion", "challenger"
DECISION_TAG = "regflow.decision"
PROMOTED, KEPT = "promoted: ", "kept champion: "
MODEL_CODE = Path(__file__).parent / "serving" / "pyfunc_model.py"  # MLflow "models from code"
RUNTIME_PACKAGES = ("torch", "numpy", "scipy", "nibabel", "mlflow", "pydantic", "pyyaml",
                    "torchio", "h5py", "click", "tqdm", "matplotlib")


def pip_requirements(lock_path: Path = Path("requirements.lock")) -> list[str]:
    """The runtime packages' pins, taken from the lock file (names compared case-insensitively)."""
    if not lock_path.exists():
        return [f"{name}" for name in RUNTIME_PACKAGES]
    pins = {}
    for line in lock_path.read_text().splitlines():
        name, sep, _ = line.partition("==")
        if sep:
            pins[name.strip().lower()] = line.strip()
    return [pins.get(name, name) for name in RUNTIME_PACKAGES]


def read_json(path: Path, what: str) -> dict[str, Any]:
    """Read a JSON file the stage depends on, with a one-line error when it is missing."""
    if not path.exists():
        raise RegflowError(f"{path}: missing {what}; run the earlier stages first")
    return json.loads(path.read_text())


def champion_metrics(client: mlflow.MlflowClient, name: str) -> tuple[str | None, dict[str, float]]:
    """The current champion's version and its evaluation metrics (from its tags)."""
    try:
        version = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None, {}
    values = {key.removeprefix("eval."): float(value) for key, value in version.tags.items()
              if key.startswith("eval.")}
    return str(version.version), values


def should_promote(candidate: dict[str, float], champion: dict[str, float] | None,
                   max_folding_pct: float) -> tuple[bool, str]:
    """The promotion gate: (decision, reason)."""
    folding = candidate.get("folding_pct", 0.0)
    if folding > max_folding_pct:
        return False, f"folding {folding:.3f}% above the {max_folding_pct}% limit"
    if not champion or "dice_mean" not in champion:
        return True, "no champion yet"
    if candidate.get("dice_mean", float("-inf")) < champion["dice_mean"]:
        return False, (f"Dice {candidate.get('dice_mean', float('nan')):.4f} below the "
                       f"champion's {champion['dice_mean']:.4f}")
    return True, (f"Dice {candidate['dice_mean']:.4f} not below the champion's "
                  f"{champion['dice_mean']:.4f}")


def is_evaluated(version: ModelVersion) -> bool:
    """Whether a model version carries its evaluation metrics and the gate's decision."""
    return DECISION_TAG in version.tags and any(key.startswith("eval.") for key in version.tags)


def reconcile(client: mlflow.MlflowClient, name: str) -> list[str]:
    """Repair what an interrupted ``regflow register`` left in the registry.

    Versions without evaluation or decision tags (registered elsewhere, or by a registration that
    tagged after creating) are deleted, so that ``models:/<name>/latest`` cannot name them; their
    runs and logged models stay in the tracking store. When ``@challenger`` is missing or older
    than the newest evaluated version, that registration stopped before its aliases: they are
    set as its decision tag says. A champion moved by hand is left alone (``@challenger`` is set
    after ``@champion``, so a finished registration always has it on the newest version).

    Returns:
        The deleted versions, oldest first.
    """
    versions = sorted(client.search_model_versions(f"name = '{name}'"),
                      key=lambda version: int(version.version))
    deleted = []
    for version in versions:
        if not is_evaluated(version):
            client.delete_model_version(name, version.version)
            deleted.append(str(version.version))
    evaluated = [version for version in versions if is_evaluated(version)]
    if evaluated:
        newest = evaluated[-1]
        challenger = alias_version(client, name, CHALLENGER)
        if challenger is None or challenger < int(newest.version):
            set_aliases(client, name, str(newest.version),
                        newest.tags[DECISION_TAG].startswith(PROMOTED))
    return deleted


def alias_version(client: mlflow.MlflowClient, name: str, alias: str) -> int | None:
    """The version number an alias points at; None when the alias (or the model) is absent."""
    try:
        return int(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def set_aliases(client: mlflow.MlflowClient, name: str, version: str, promote: bool) -> None:
    """``@champion`` (when promoted), then ``@challenger``, the mark of a finished registration."""
    if promote:
        client.set_registered_model_alias(name, CHAMPION, version)
    client.set_registered_model_alias(name, CHALLENGER, version)


def create_version(client: mlflow.MlflowClient, name: str, model_id: str, run_id: str,
                   tags: dict[str, str]) -> str:
    """Create the registered model if needed, then a version of the logged model ``model_id``
    with its ``tags`` in one call (one database transaction on an SQL store).

    Returns:
        The new version number.
    """
    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = client.create_model_version(name, source=f"models:/{model_id}", run_id=run_id,
                                          tags=tags, model_id=model_id)
    return str(version.version)


def register_model(checkpoint: Path, run_id: str | None, metrics: dict[str, float],
                   config: Config, experiment: str) -> dict[str, Any]:
    """Reconcile, then log, register and gate one checkpoint; return the decision record.

    Args:
        checkpoint: models/<name>/best.pt.
        run_id: the training run to log the model into (None: a new run).
        metrics: the evaluation headline (``dice_mean``, ``folding_pct``, ...).
        config: validated params (``registry`` section).
        experiment: the MLflow experiment of the dataset.

    Returns:
        ``model_name``, ``version``, ``run_id``, ``model_uri``, ``champion`` (promoted or not),
        ``champion_before``, ``reason``, ``metrics`` and ``reconciled`` (versions deleted by
        :func:`reconcile`).
    """
    name = config.registry.model_name
    tracking.configure_mlflow(experiment)
    client = mlflow.MlflowClient()
    reconciled = reconcile(client, name)
    with tracking.start_or_resume_run(experiment, run_id=run_id,
                                      run_name=config.train.name) as run, \
            tempfile.TemporaryDirectory() as scratch:
        config_file = Path(scratch) / "params.yaml"  # refinement settings for the server
        config_file.write_text(yaml.safe_dump(redact_values(config.model_dump(mode="json")),
                                              sort_keys=False))
        model = mlflow.pyfunc.log_model(
            name="model", python_model=str(MODEL_CODE),
            artifacts={CHECKPOINT_ARTIFACT: str(checkpoint), CONFIG_ARTIFACT: str(config_file)},
            signature=signature(), input_example=input_example(),
            pip_requirements=pip_requirements())
        run_id = run.info.run_id
    previous, champion = champion_metrics(client, name)
    promote, reason = should_promote(metrics, champion, config.registry.max_folding_pct)
    tags = {**{f"eval.{key}": str(value) for key, value in metrics.items()}, "run_id": run_id,
            **tracking.run_tags(),
            DECISION_TAG: (PROMOTED if promote else KEPT) + reason}
    version = create_version(client, name, model.model_id, run_id, tags)
    set_aliases(client, name, version, promote)
    return {"model_name": name, "version": version, "run_id": run_id,
            "model_uri": f"models:/{name}/{version}", "champion": promote,
            "champion_before": previous, "reason": reason, "metrics": metrics,
            "reconciled": reconciled}
