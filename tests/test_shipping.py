import json
import subprocess
import sys
from pathlib import Path

import mlflow
import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from regflow.config import load_config
from regflow.engine import Trainer
from regflow.inference import load_registrar
from regflow.models import RegistrationModel
from regflow.shipping import export_checkpoint, file_sha256
from regflow.stages import evaluate_checkpoint


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "regflow.cli", *args], capture_output=True,
                          text=True, timeout=600)


@pytest.fixture
def shipped(tiny_project):
    """A 2-pass cascade trained 2 steps and shipped with its own test-time settings: 3 passes,
    no refinement (the project's params.yaml says 1 pass and 5 refinement steps)."""
    config = load_config(tiny_project, ["train.steps=2", "train.val_every=2",
                                        "train.model.passes=2"])
    Trainer(config, Path("data/processed/tiny/manifest.json"), Path("models/tiny")).fit()
    ship_config = load_config(tiny_project, ["train.model.passes=2", "evaluate.passes=3",
                                             "evaluate.refine.steps=0"])
    params = yaml.safe_load(Path(tiny_project).read_text())
    params["evaluate"] = {"passes": 1, "refine": {"steps": 5}}
    Path(tiny_project).write_text(yaml.safe_dump(params))
    path = Path("shipped/tiny.pt")
    path.parent.mkdir()
    export_checkpoint(Path("models/tiny/best.pt"), ship_config, path, half=True)
    return path


def test_a_shipped_checkpoint_is_half_the_size_and_registers_alike(shipped):
    model, extra = RegistrationModel.load("models/tiny/best.pt")
    half_model, half_extra = RegistrationModel.load(shipped)
    assert next(half_model.parameters()).dtype == torch.float32
    assert shipped.stat().st_size < 0.6 * Path("models/tiny/best.pt").stat().st_size
    assert "optimizer" not in str(half_extra.get("training"))
    assert half_extra["evaluate"]["passes"] == 3 and half_extra["config"]["train"]["name"] == "tiny"
    moving, fixed = torch.rand(1, 1, 16, 24, 16), torch.rand(1, 1, 16, 24, 16)
    with torch.no_grad():
        difference = (model(moving, fixed)["ddf"] - half_model(moving, fixed)["ddf"]).abs()
    assert difference.max() < 1e-3 * max(1e-6, model(moving, fixed)["ddf"].abs().max().item())


def test_a_shipped_checkpoint_brings_its_own_test_time_settings(shipped):
    config = load_config("params.yaml")
    own = load_registrar(str(shipped), config, own_settings=True)
    assert own.model.passes == 3 and own.refine.steps == 0
    theirs = load_registrar(str(shipped), config)
    assert theirs.model.passes == 1 and theirs.refine.steps == 5


def test_predict_uses_the_shipped_settings_unless_the_command_asks_for_others(shipped, tiny_raw):
    pair = [next(tiny_raw.glob(f"*/images/case_{n:03d}.nii.gz")) for n in (8, 9)]
    fields = {}
    for name, extra in {"own": [], "explicit": ["-c", "params.yaml"],
                        "override": ["-S", "evaluate.passes=3", "-S",
                                     "evaluate.refine.steps=0"]}.items():
        result = run_cli("predict", "--model", str(shipped), "--fixed", str(pair[0]),
                         "--moving", str(pair[1]), "--out", name, *extra)
        assert result.returncode == 0, result.stderr
        fields[name] = np.asarray(nib.load(f"{name}/ddf.nii.gz").dataobj)
    np.testing.assert_array_equal(fields["own"], fields["override"])  # 3 passes, no refinement
    assert not np.allclose(fields["own"], fields["explicit"])  # params.yaml's 1 pass, refined


def test_register_checkpoint_evaluates_and_registers_without_training(shipped):
    import shutil

    shutil.rmtree("data/processed")  # a fresh clone: register fetches and preprocesses itself
    result = run_cli("register", "--checkpoint", str(shipped), "-S",
                     "registry.model_name=shipped-tiny")
    assert result.returncode == 0, result.stderr
    assert "is now @champion" in result.stdout
    decision = json.loads(Path("models/registered.json").read_text())
    assert decision["model_name"] == "shipped-tiny" and decision["champion"]
    version = mlflow.MlflowClient().get_model_version_by_alias("shipped-tiny", "champion")
    assert 0 < float(version.tags["eval.dice_mean"]) <= 1
    run = mlflow.get_run(decision["run_id"])
    assert run.data.params["evaluate.passes"] == "3"  # the checkpoint's own settings
    assert "train/total" not in run.data.metrics  # nothing was trained


def test_export_prints_the_sha256_of_the_file_it_wrote(tiny_project):
    config = load_config(tiny_project, ["train.steps=1", "train.val_every=1"])
    Trainer(config, Path("data/processed/tiny/manifest.json"), Path("models/tiny")).fit()
    result = run_cli("export", "--checkpoint", "models/tiny/best.pt", "-o", "tiny.pt", "--half")
    assert result.returncode == 0, result.stderr
    assert file_sha256(Path("tiny.pt")) in result.stdout


def test_export_evaluate_records_the_files_metrics_beside_it(tiny_project):
    config = load_config(tiny_project, ["train.steps=1", "train.val_every=1"])
    Trainer(config, Path("data/processed/tiny/manifest.json"), Path("models/tiny")).fit()
    result = run_cli("export", "--checkpoint", "models/tiny/best.pt", "-o", "tiny.pt", "--half",
                     "--evaluate", "-S", "evaluate.split=val")
    assert result.returncode == 0, result.stderr
    record = json.loads(Path("tiny.json").read_text())
    assert record["sha256"] == file_sha256(Path("tiny.pt")) and record["dtype"] == "float16"
    assert record["path"] == "tiny.pt" and record["evaluate"]["split"] == "val"
    _, headline = evaluate_checkpoint(load_config(tiny_project, ["evaluate.split=val"]),
                                      Path("tiny.pt"))
    metrics = record["metrics"]
    assert metrics["split"] == "val" and metrics["pairs"] == headline["pairs"] > 0
    assert metrics["dice_mean"] == pytest.approx(headline["dice_mean"], abs=1e-9)
