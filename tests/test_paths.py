"""regflow.paths is the one place for project paths: dvc.yaml's outputs and the config's default
for tuned params name the same files."""

from pathlib import Path

import yaml

from regflow import paths
from regflow.config import Config

ROOT = Path(__file__).resolve().parents[1]


def outputs(spec: dict) -> set[str]:
    """Every path a dvc.yaml stage declares under outs and metrics."""
    entries = [*spec.get("outs", []), *spec.get("metrics", [])]
    return {next(iter(entry)) if isinstance(entry, dict) else entry for entry in entries}


def test_dvc_yaml_and_the_config_name_the_paths_of_paths_py():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    model = paths.MODELS_DIR / "${train.name}"
    assert outputs(stages["train"]) == {(model / name).as_posix() for name in (
        paths.BEST_CHECKPOINT, paths.LAST_CHECKPOINT, paths.RUN_RECORD)}
    best_params = (paths.TUNING_DIR / paths.BEST_PARAMS_YAML).as_posix()
    assert outputs(stages["tune"]) == {best_params}
    assert Config().train.best_params == best_params
    assert (paths.METRICS_DIR / paths.EVAL_JSON).as_posix() in outputs(stages["evaluate"])
    assert (paths.EVAL_DIR / "${train.name}").as_posix() in outputs(stages["evaluate"])
    assert outputs(stages["register"]) == {paths.REGISTERED_JSON.as_posix()}
