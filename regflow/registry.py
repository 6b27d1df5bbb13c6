"""The register stage: log the trained model as a pyfunc, register it, gate @champion.

Every new version gets ``@challenger``; ``@champion`` moves to it only when its evaluation Dice is
not below the current champion's and its folding is under ``registry.max_folding_pct``. The
decision goes to models/registered.json and to the version's tags.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException

from regflow import fileio, paths, tracking
from regflow.config import Config
from regflow.errors import RegflowError
from regflow.serving import CHECKPOINT_ARTIFACT, RegflowPythonModel, input_example, signature

CHAMPION, CHALLENGER = "champion", "challenger"
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


def register_model(checkpoint: Path, run_id: str | None, metrics: dict[str, float],
                   config: Config, experiment: str) -> dict[str, Any]:
    """Log, register and gate one checkpoint; return the decision record."""
    name = config.registry.model_name
    tracking.configure_mlflow(experiment)
    client = mlflow.MlflowClient()
    with tracking.start_or_resume_run(experiment, run_id=run_id,
                                      run_name=config.train.name) as run:
        info = mlflow.pyfunc.log_model(
            name="model", python_model=RegflowPythonModel(),
            artifacts={CHECKPOINT_ARTIFACT: str(checkpoint)}, signature=signature(),
            input_example=input_example(), pip_requirements=pip_requirements(),
            registered_model_name=name)
        run_id = run.info.run_id
    version = str(info.registered_model_version)
    for key, value in {**{f"eval.{k}": v for k, v in metrics.items()}, "run_id": run_id,
                       **tracking.run_tags()}.items():
        client.set_model_version_tag(name, version, key, str(value))
    previous, champion = champion_metrics(client, name)
    promote, reason = should_promote(metrics, champion, config.registry.max_folding_pct)
    client.set_registered_model_alias(name, CHALLENGER, version)
    if promote:
        client.set_registered_model_alias(name, CHAMPION, version)
    client.set_model_version_tag(name, version, "regflow.decision",
                                 ("promoted: " if promote else "kept champion: ") + reason)
    return {"model_name": name, "version": version, "run_id": run_id,
            "model_uri": f"models:/{name}/{version}", "champion": promote,
            "champion_before": previous, "reason": reason, "metrics": metrics}


def register_stage(config: Config, models_dir: Path = Path("models"),
                   metrics_path: Path = Path("metrics/eval.json")) -> dict[str, Any]:
    """Register models/<name>/best.pt with its evaluation metrics; write models/registered.json."""
    model_dir = models_dir / config.train.name
    checkpoint = model_dir / "best.pt"
    if not checkpoint.exists():
        raise RegflowError(f"{checkpoint}: no trained model; run `regflow train` first")
    metrics = read_json(metrics_path, "evaluation metrics")
    record = model_dir / "run.json"
    run_id = read_json(record, "run record")["run_id"] if record.exists() else None
    decision = register_model(checkpoint, run_id, metrics, config,
                              paths.experiment_name(config.data.dataset))
    fileio.write_json(models_dir / "registered.json", decision)
    return decision
