"""The real DVC pipeline of this repository on the tiny synthetic dataset: repro, no-op, exp run."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.synthetic import write_params

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[1]
BENDING = "train.loss.regularization.bending_energy.weight"
REFINE_STEPS = "evaluate.refine.steps"


def run(command: list[str], cwd: Path) -> str:
    """Run a command of the project's venv in ``cwd``; its output, or a failure showing it."""
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=600, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{output[-3000:]}"
    return output


@pytest.fixture
def dvc_project(tmp_path, tiny_raw, mlflow_store):
    """A git + DVC repository holding this repo's dvc.yaml and a tiny-data params.yaml."""
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(REPO_ROOT / "dvc.yaml", project / "dvc.yaml")
    # stages depend on source files (e.g. regflow/data/preprocess.py) by relative path
    shutil.copytree(REPO_ROOT / "regflow", project / "regflow",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("requirements.lock", ".dvcignore"):  # register's dep; what DVC hashes
        shutil.copy(REPO_ROOT / name, project / name)
    params = yaml.safe_load(write_params(project, tiny_raw).read_text())
    params["train"]["best_params"] = "models/tuning/best_params.yaml"
    params["data"]["raw_dir"], params["data"]["processed_dir"] = "data/raw", "data/processed"
    params["train"]["optimizer"] = {"lr": 0.001}  # DVC needs every params key a stage names
    params["evaluate"] = {"hd95": False}
    params["tune"] = {"enabled": True, "trials": 2, "max_folding_pct": 100.0,  # test-time sweep
                      "search_space": {REFINE_STEPS: {"type": "int", "low": 0, "high": 2}}}
    params["registry"] = {"model_name": f"tiny-{tmp_path.name[-12:]}"}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copy(REPO_ROOT / ".gitignore", project / ".gitignore")  # what git keeps matters to DVC
    run(["git", "init", "-q"], project)
    run(["git", "config", "user.email", "test@example.com"], project)
    run(["git", "config", "user.name", "test"], project)
    run(["dvc", "init", "-q"], project)
    run(["dvc", "config", "core.analytics", "false"], project)
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "baseline"], project)
    return project


def test_repro_then_noop_then_experiment_with_another_loss_weight(dvc_project):
    output = run(["dvc", "repro"], dvc_project)
    order = [output.index(f"Running stage '{stage}'") for stage in
             ("fetch", "preprocess", "train", "tune", "evaluate", "register")]
    assert order == sorted(order), "tune sweeps the trained model: it runs after train"
    tuned = yaml.safe_load((dvc_project / "models/tuning/best_params.yaml").read_text())
    assert set(tuned) == {REFINE_STEPS}
    headline = json.loads((dvc_project / "metrics/eval.json").read_text())
    assert 0 <= headline["dice_mean"] <= 1
    assert (dvc_project / "models/registered.json").exists()
    assert "up to date" in run(["dvc", "repro"], dvc_project)
    assert "up to date" in run(["dvc", "status"], dvc_project)

    run(["git", "add", "-A"], dvc_project)
    run(["git", "commit", "-qm", "first results"], dvc_project)
    run(["dvc", "exp", "run", "-n", "stiffer", "-S", "tune.enabled=false", "-S", f"{BENDING}=0.5"],
        dvc_project)
    table = run(["dvc", "exp", "show", "--md"], dvc_project)
    assert "stiffer" in table
    assert "dice_mean" in table
    assert BENDING in table
    branch = run(["git", "rev-parse", "--abbrev-ref", "HEAD"], dvc_project).strip()
    rows = table.splitlines()
    stiffer = next(row for row in rows if "stiffer" in row)
    baseline = next(row for row in rows if row.split("|")[1].strip() == branch)
    assert "0.5" in stiffer and "!" not in stiffer
    assert "!" not in baseline, "the baseline's metrics must be in git for DVC to show them"


def test_changing_the_shape_reruns_preprocess_onward_but_not_fetch(dvc_project):
    run(["dvc", "repro"], dvc_project)
    params_path = dvc_project / "params.yaml"
    params = yaml.safe_load(params_path.read_text())
    params["preprocess"]["shape"] = [16, 20, 16]
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    output = run(["dvc", "repro"], dvc_project)
    for stage in ("preprocess", "tune", "train", "evaluate"):
        assert f"Running stage '{stage}'" in output, stage
    assert "Stage 'fetch' didn't change" in output
    manifest = json.loads((dvc_project / "data/processed/tiny/manifest.json").read_text())
    assert manifest["shape"] == [16, 20, 16]


def changed_stages(project: Path) -> dict[str, list]:
    """``dvc status --json``: stage name -> what changed, for the stages that changed."""
    report = json.loads(run(["dvc", "status", "--json"], project))
    return {stage: changes for stage, changes in report.items() if ":" not in stage}


def test_editing_data_code_reruns_preprocess_onward_but_bytecode_does_not(dvc_project):
    run(["dvc", "repro"], dvc_project)
    bytecode = dvc_project / "regflow" / "data" / "__pycache__"
    bytecode.mkdir(exist_ok=True)
    (bytecode / "manifest.cpython-311.pyc").write_bytes(b"written by an import")
    assert changed_stages(dvc_project) == {}, ".dvcignore must keep __pycache__ out of deps"

    with (dvc_project / "regflow" / "data" / "manifest.py").open("a") as source:
        source.write("# an edit to the manifest code\n")
    changed = changed_stages(dvc_project)
    assert set(changed) == {"preprocess", "tune", "train", "evaluate", "register"}
    assert {"changed deps": {"regflow/data": "modified"}} in changed["preprocess"]
    dry_run = run(["dvc", "repro", "--dry"], dvc_project)
    assert "Stage 'fetch' didn't change" in dry_run
    for stage in ("preprocess", "tune", "train", "evaluate", "register"):
        assert f"Running stage '{stage}'" in dry_run, stage
