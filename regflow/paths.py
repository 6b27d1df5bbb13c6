"""Where things live and what they are called: one place for every project path and MLflow name."""

from __future__ import annotations

from pathlib import Path

from regflow.config import Config
from regflow.errors import RegflowError

MANIFEST_JSON = "manifest.json"
MANIFEST_CSV = "manifest.csv"
MODELS_DIR = Path("models")
BEST_CHECKPOINT, LAST_CHECKPOINT = "best.pt", "last.pt"  # in models/<train.name>/
RUN_RECORD = "run.json"  # models/<train.name>/run.json: the training's MLflow run id
TUNING_DIR = MODELS_DIR / "tuning"
BEST_PARAMS_YAML = "best_params.yaml"  # in models/tuning/
REGISTERED_JSON = MODELS_DIR / "registered.json"
METRICS_DIR = Path("metrics")
EVAL_JSON = "eval.json"  # in metrics/: the evaluation's headline metrics
PLOTS_DIR = Path("plots")
EVAL_DIR = Path("eval")


def experiment_name(dataset: str) -> str:
    """The MLflow experiment of a dataset: ``regflow-<dataset>``."""
    return f"regflow-{dataset}"


def processed_dir(config: Config, dataset: str | None = None) -> Path:
    """data/processed/<dataset>."""
    return Path(config.data.processed_dir) / (dataset or config.data.dataset)


def manifest_path(config: Config, must_exist: bool = True) -> Path:
    """data/processed/<dataset>/manifest.json (checked to exist unless ``must_exist`` is False).

    Raises:
        RegflowError: no processed dataset yet.
    """
    path = processed_dir(config) / MANIFEST_JSON
    if must_exist and not path.exists():
        raise RegflowError(f"{path}: no processed dataset; run `regflow preprocess` first")
    return path


def model_dir(config: Config) -> Path:
    """models/<train.name>: best.pt, last.pt, run.json."""
    return MODELS_DIR / config.train.name


def volumes_dir(config: Config) -> Path:
    """eval/<train.name>: warped images, labels and DDFs of the evaluation."""
    return EVAL_DIR / config.train.name
