"""The MLflow run schema: where runs are stored and what every run records.

Store: ``$MLFLOW_TRACKING_URI``, else a SQLite file at the repository root with artifacts in
``<root>/mlartifacts/<experiment>``, both absolute so that DVC's temporary experiment copies
(``dvc exp run --temp/--queue``, run under ``.dvc/tmp/exps/``) log to the same store; DVC passes
the parent repository there as ``$DVC_ROOT``. A run records: flattened params + the config YAML,
tags (git commit and dirty flag, DVC stage/experiment/baseline, data md5 from dvc.lock), the
dataset manifest as an input, figures and metrics. Only rank 0 logs: on other ranks every function
here does nothing and the run context yields None, so training code calls them on every rank.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import torch.distributed as dist
import yaml
from mlflow.exceptions import MlflowException

from regflow import experiment_page
from regflow.config import Config, flatten
from regflow.errors import RegflowError
from regflow.redact import check_unambiguous, redact_value, redact_values

QUIET_ENV = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}
MAX_PARAM_KEY = 250  # mlflow.utils.validation.MAX_ENTITY_KEY_LENGTH
MAX_PARAM_VALUE = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
CONFIG_ARTIFACT = "config/params.yaml"
_UNSAFE_KEY_CHARS = re.compile(r"[^\w\-. :/]")  # MLflow allows alphanumerics and _-. :/


def is_rank_zero() -> bool:
    """True on the process that logs: global rank 0 of the ``torch.distributed`` group, or before
    the group exists, unless ``$RANK`` (else ``$LOCAL_RANK``, as torchrun sets them) is not 0."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    rank = os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))
    return int(rank or 0) == 0


def _git(root: Path, *args: str) -> str | None:
    try:
        result = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                                timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def find_repo_root() -> Path:
    """The repository the store belongs to: ``$DVC_ROOT``, else git's top level, else the cwd."""
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    top = _git(Path.cwd(), "rev-parse", "--show-toplevel")
    return Path(top).resolve() if top else Path.cwd().resolve()


def tracking_uri(repo_root: Path | None = None) -> str:
    """``$MLFLOW_TRACKING_URI``, else ``sqlite:///<absolute repo root>/mlflow.db``.

    Args:
        repo_root: the repository root; None: :func:`find_repo_root`.

    Raises:
        ConfigError: a database URI that SQLAlchemy and RFC 3986 read differently (see
            :func:`regflow.redact.check_unambiguous`).
    """
    if os.environ.get("MLFLOW_TRACKING_URI"):
        uri = os.environ["MLFLOW_TRACKING_URI"]
        check_unambiguous(uri, "MLFLOW_TRACKING_URI")
        return uri
    root = Path(repo_root).resolve() if repo_root is not None else find_repo_root()
    return f"sqlite:///{root / 'mlflow.db'}"


def configure_mlflow(experiment_name: str) -> str:
    """Point MLflow at the project store and select (creating if needed) an experiment.

    Sets the quiet/offline environment defaults (telemetry off, no progress bars) unless the
    user set them. With the default SQLite store a new experiment keeps its artifacts in
    ``<repo root>/mlartifacts/<experiment_name>``. The experiment, new or not, gets the tags of
    :mod:`regflow.experiment_page` (training view, description, runs view) it lacks.

    Args:
        experiment_name: one experiment per dataset/task, e.g. ``"msd-hippocampus"``.

    Returns:
        The experiment id.

    Raises:
        RegflowError: the experiment exists but is deleted.
    """
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    default_store = not os.environ.get("MLFLOW_TRACKING_URI")
    root = find_repo_root()
    mlflow.set_tracking_uri(tracking_uri(root))
    experiment = mlflow.get_experiment_by_name(experiment_name)
    if experiment is None:
        location = (root / "mlartifacts" / experiment_name).as_uri() if default_store else None
        try:
            return mlflow.create_experiment(
                experiment_name, artifact_location=location,
                tags=experiment_page.experiment_tags(experiment_name, {}))
        except MlflowException:  # created meanwhile by a parallel worker
            experiment = mlflow.get_experiment_by_name(experiment_name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        raise RegflowError(f"MLflow experiment {experiment_name!r} is deleted: restore it with "
                           f"`mlflow experiments restore -x {experiment.experiment_id}` or rename")
    client = mlflow.MlflowClient()
    for key, value in experiment_page.experiment_tags(experiment_name, experiment.tags).items():
        client.set_experiment_tag(experiment.experiment_id, key, value)
    return experiment.experiment_id


def _data_md5(lock_path: Path, stage: str) -> dict[str, str]:
    """md5 per data dependency of ``stage`` in dvc.lock (Python sources are left to git).

    A dependency produced by another stage takes that stage's ``outs`` md5, which ``dvc repro``
    has already rewritten when ``stage`` starts; while ``stage`` is not locked yet (first run)
    every locked ``outs`` entry is reported.
    """
    try:
        stages = (yaml.safe_load(lock_path.read_text()) or {}).get("stages", {})
    except (OSError, yaml.YAMLError):
        return {}
    outs = {entry["path"]: entry["md5"] for locked in stages.values()
            for entry in locked.get("outs", []) if "md5" in entry}
    if stage not in stages:
        return outs
    return {entry["path"]: outs.get(entry["path"], entry.get("md5"))
            for entry in stages[stage].get("deps", [])
            if not entry["path"].endswith(".py") and (entry["path"] in outs or "md5" in entry)}


def run_tags(repo_root: Path | None = None, stage: str = "train") -> dict[str, str]:
    """Provenance tags for a run.

    Args:
        repo_root: the working tree to describe; None: git's top level of the cwd (inside a DVC
            temporary experiment that is the experiment's copy, whose params differ).
        stage: the dvc.yaml stage whose data dependencies are tagged.

    Returns:
        ``git.commit`` (also as ``mlflow.source.git.commit``), ``git.dirty`` ("true"/"false":
        tracked files differ from the commit), ``dvc.stage``, ``dvc.exp_name``,
        ``dvc.baseline_rev`` (from DVC's environment, when set) and
        ``data.md5.<path>`` per data dependency locked in dvc.lock. Absent facts are left out.
    """
    if repo_root is None:
        top = _git(Path.cwd(), "rev-parse", "--show-toplevel")
        repo_root = Path(top) if top else Path.cwd()
    root = Path(repo_root)
    tags: dict[str, str] = {}
    commit = _git(root, "rev-parse", "HEAD")
    if commit:
        tags["git.commit"] = tags["mlflow.source.git.commit"] = commit
        status = _git(root, "status", "--porcelain", "--untracked-files=no")
        if status is not None:
            tags["git.dirty"] = "true" if status else "false"
    for tag, variable in (("dvc.stage", "DVC_STAGE"), ("dvc.exp_name", "DVC_EXP_NAME"),
                          ("dvc.baseline_rev", "DVC_EXP_BASELINE_REV")):
        if os.environ.get(variable):
            tags[tag] = os.environ[variable]
    for path, md5 in _data_md5(root / "dvc.lock", stage).items():
        tags[f"data.md5.{path}"[:MAX_PARAM_KEY]] = str(md5)
    return tags


def _param_key(key: str) -> str:
    """A valid MLflow name: disallowed characters become ``_``, long keys end in a hash."""
    safe = _UNSAFE_KEY_CHARS.sub("_", key)
    if safe == key and len(key) <= MAX_PARAM_KEY:
        return key
    digest = hashlib.sha256(key.encode()).hexdigest()[:8]
    return f"{safe[:MAX_PARAM_KEY - 9]}-{digest}"


def _param_value(value: Any) -> str:
    text = str(value)
    return text if len(text) <= MAX_PARAM_VALUE else text[:MAX_PARAM_VALUE - 3] + "..."


def log_config(config: Config) -> None:
    """Log the flattened config as params and the whole config as ``config/params.yaml``.

    Keys over 250 characters or with characters MLflow refuses are made valid and get a hash
    suffix; values over 6000 characters are cut (MLflow's limits). The YAML artifact always
    holds the full config. URL passwords (``tune.storage``, any ``scheme://user:password@...``
    or ``?password=`` value) are masked as ``***`` in both (:mod:`regflow.redact`).

    Raises:
        RegflowError: the active (resumed) run already holds a param with another value.
    """
    if not is_rank_zero():
        return
    params = {_param_key(key): _param_value(redact_value(str(value)))
              for key, value in flatten(config).items()}
    try:
        mlflow.log_params(params)
    except MlflowException as exc:
        if "Changing param values is not allowed" not in exc.message:
            raise
        run_id = mlflow.active_run().info.run_id
        raise RegflowError(f"MLflow run {run_id}: config differs from the one it was started "
                           "with; resume with the same params or start a new run") from None
    mlflow.log_text(yaml.safe_dump(redact_values(config.model_dump()), sort_keys=False),
                    CONFIG_ARTIFACT)


def log_dataset_input(manifest_path: str | Path, name: str, context: str) -> None:
    """Record a processed dataset (its manifest.json) as an input of the active run.

    The dataset is the manifest's case table (one row per case); its digest is the first 16 hex
    digits of the manifest file's sha256 (which lists every file's sha256), its source the
    manifest's absolute path.

    Args:
        manifest_path: ``data/processed/<dataset>/manifest.json``.
        name: dataset name, e.g. ``"msd-hippocampus"``.
        context: how the run uses it: ``"training"``, ``"validation"``, ``"evaluation"``...

    Raises:
        DataError: the manifest is missing, of another version or invalid (the field named).
    """
    if not is_rank_zero():
        return
    import pandas as pd
    from mlflow.data.sources import LocalArtifactDatasetSource  # registered by mlflow.data

    from regflow.data.manifest import Manifest

    path = Path(manifest_path).resolve()
    manifest = Manifest.read(path)
    cases = pd.DataFrame([case.model_dump(mode="json") for case in manifest.cases])
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    dataset = mlflow.data.from_pandas(cases, source=LocalArtifactDatasetSource(str(path)),
                                      name=name, digest=digest)
    try:
        mlflow.log_input(dataset, context=context)
    except MlflowException:
        # The store checks for the dataset, then inserts it: a parallel worker logging the same
        # dataset between the two makes this insert break the unique key. By now the row exists,
        # so a second call only links it to this run; any other failure raises again.
        mlflow.log_input(dataset, context=context)


def log_figure(figure: Any, artifact_file: str) -> None:
    """Log a matplotlib figure as an artifact of the active run (e.g. ``"overlays/pair0.png"``)."""
    if is_rank_zero():
        mlflow.log_figure(figure, artifact_file)


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    """Log metrics (name -> value) to the active run at ``step``."""
    if is_rank_zero():
        mlflow.log_metrics(metrics, step=step)


def set_tag(key: str, value: str) -> None:
    """Set one tag on the active run."""
    if is_rank_zero():
        mlflow.set_tag(key, value)


def log_artifact(local_path: str | Path, artifact_path: str | None = None) -> None:
    """Copy a local file into the active run's artifacts (under ``artifact_path``)."""
    if is_rank_zero():
        mlflow.log_artifact(str(local_path), artifact_path=artifact_path)


def log_files_to_run(files: Sequence[tuple[Path, str]], run_id: str | None = None) -> None:
    """Copy ``(file, artifact folder)`` pairs into a run's artifacts: the active run's, or (with
    ``run_id``, no run being active) that run's in the project store, left as it is."""
    if run_id is None:
        for path, folder in files:
            mlflow.log_artifact(str(path), artifact_path=folder)
        return
    client = mlflow.MlflowClient(tracking_uri())
    for path, folder in files:
        client.log_artifact(run_id, str(path), artifact_path=folder)


def run_experiment_id(run_id: str) -> str:
    """The experiment of an existing run in the configured store.

    Raises:
        RegflowError: the run is not in the store (the store's URI named, credentials redacted).
    """
    try:
        return mlflow.get_run(run_id).info.experiment_id
    except MlflowException:
        raise RegflowError(f"MLflow run {run_id}: not found in "
                           f"{redact_value(mlflow.get_tracking_uri())}") from None


def run_exists(run_id: str) -> bool:
    """Whether the project store (:func:`tracking_uri`) holds the run ``run_id``."""
    mlflow.set_tracking_uri(tracking_uri())
    try:
        mlflow.get_run(run_id)
    except MlflowException:
        return False
    return True


@contextmanager
def start_or_resume_run(experiment_name: str, run_id: str | None = None,
                        run_name: str | None = None, nested: bool = False,
                        tags: dict[str, str] | None = None,
                        log_system_metrics: bool | None = None
                        ) -> Iterator[mlflow.ActiveRun | None]:
    """Start a run (or resume ``run_id``) in the project store, tagged with :func:`run_tags`.

    A resumed run keeps the provenance tags it was started with (the training's commit, stage and
    data), so that evaluate and register, which log into the training run, do not overwrite them.

    On leaving the block the run ends as FINISHED, or FAILED when an exception escapes.

    Args:
        experiment_name: experiment to select/create (see :func:`configure_mlflow`).
        run_id: an existing run to continue (e.g. from a checkpoint); its metrics history goes on.
        run_name: display name of a new run.
        nested: start as a child of the active run (Optuna trials under the study's run).
        tags: extra tags, set after the provenance tags.
        log_system_metrics: MLflow's CPU/GPU/memory sampling; None follows MLflow's setting.

    Yields:
        The ``mlflow.ActiveRun`` (a ``Run`` snapshot taken at start; use ``mlflow.get_run``
        for fresh data), or None on other ranks.

    Raises:
        RegflowError: ``run_id`` is not in the store.
    """
    if not is_rank_zero():
        yield None
        return
    experiment_id = configure_mlflow(experiment_name)
    if run_id is not None:
        experiment_id = run_experiment_id(run_id)
    # MLflow refuses to resume a run outside the process's active experiment, which an earlier
    # set_experiment (another store, another dataset) may have left pointing elsewhere.
    mlflow.set_experiment(experiment_id=experiment_id)
    with mlflow.start_run(run_id=run_id, experiment_id=None if run_id else experiment_id,
                          run_name=run_name, nested=nested,
                          log_system_metrics=log_system_metrics) as active:
        mlflow.set_tags({**(run_tags() if run_id is None else {}), **(tags or {})})
        yield active
