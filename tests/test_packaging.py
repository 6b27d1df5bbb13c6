"""The project's own packaging: Dockerfile lint, CLI entry point, DVC config."""

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from click.testing import CliRunner

from regflow import __version__
from regflow.cli import cli

ROOT = Path(__file__).resolve().parents[1]


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    result = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_version_and_help_list_commands():
    runner = CliRunner()
    assert __version__ in runner.invoke(cli, ["--version"]).output
    help_text = runner.invoke(cli, ["--help"]).output
    for command in ("fetch", "preprocess", "datasets"):
        assert command in help_text


def test_every_command_has_help():
    runner = CliRunner()
    for name in cli.commands:
        result = runner.invoke(cli, [name, "--help"])
        assert result.exit_code == 0, name
        assert "Usage:" in result.output


def test_dvc_config_is_quiet_and_offline():
    text = (ROOT / ".dvc" / "config").read_text()
    assert "analytics = false" in text
    assert "check_update = false" in text


# What a stage's code deps in dvc.yaml may leave out: the version string and exception classes
# (rerunning the pipeline for them is waste) and the dispatch module that every stage goes through.
UNLISTED_CODE = {"regflow/__init__.py", "regflow/errors.py", "regflow/stages.py"}
# Code a stage runs without importing it: MLflow runs the model file that `register` logs.
RUN_AS_FILES = {"register": {"regflow.serving.pyfunc_model"}}


def module_path(name: str) -> Path | None:
    """regflow/<...>.py or regflow/<...>/__init__.py of a dotted module name, if there is one."""
    path = ROOT / Path(*name.split("."))
    for candidate in (path / "__init__.py", path.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def regflow_imports(tree: ast.AST) -> set[str]:
    """Every regflow module (or module attribute) that ``tree`` imports, at any depth."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in names if name.split(".")[0] == "regflow"}


def import_closure(modules: set[str]) -> set[str]:
    """The files of ``modules`` and of everything they import (function-level imports too),
    relative to the repository root."""
    files: set[Path] = set()
    pending = list(modules)
    while pending:
        parts = pending.pop().split(".")
        for depth in range(1, len(parts) + 1):  # importing a.b.c runs a and a.b first
            path = module_path(".".join(parts[:depth]))
            if path is not None and path not in files:
                files.add(path)
                pending.extend(regflow_imports(ast.parse(path.read_text())))
    return {path.relative_to(ROOT).as_posix() for path in files}


def stage_modules(stage: str) -> set[str]:
    """The regflow modules that ``<stage>_stage`` in regflow/stages.py uses (and its helpers)."""
    tree = ast.parse((ROOT / "regflow" / "stages.py").read_text())
    bound: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("regflow"):
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                bound[alias.asname or alias.name] = full if module_path(full) else node.module
    functions = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}
    modules: set[str] = set()
    pending, seen = [f"{stage}_stage"], set()
    while pending:
        function = functions[pending.pop()]
        seen.add(function.name)
        modules |= regflow_imports(function)
        for node in ast.walk(function):
            if isinstance(node, ast.Name) and node.id in bound:
                modules.add(bound[node.id])
            elif isinstance(node, ast.Name) and node.id in functions and node.id not in seen:
                pending.append(node.id)
    return modules | RUN_AS_FILES.get(stage, set())


def test_dvc_stages_depend_on_the_code_they_run():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for stage, spec in stages.items():
        code = import_closure(stage_modules(stage))
        deps = [dep for dep in spec.get("deps", []) if dep.startswith("regflow/")]
        covered = {path for path in code
                   if any(path == dep or path.startswith(f"{dep}/") for dep in deps)}
        missing = sorted(code - covered - UNLISTED_CODE)
        assert not missing, f"dvc.yaml stage {stage} runs {missing} without depending on them"
        for dep in deps:
            assert (ROOT / dep).exists(), f"{stage}: {dep} does not exist"
            python = [dep] if dep.endswith(".py") else [
                path.relative_to(ROOT).as_posix() for path in (ROOT / dep).rglob("*.py")]
            unused = [path for path in python if path not in code | {"regflow/stages.py"}]
            assert len(unused) < len(python) or not python, (
                f"dvc.yaml stage {stage} depends on {dep}, which it does not run")


def make_dry_run(*args: str) -> str:
    """What ``make -n -B ARGS`` would run (every target, even when up to date)."""
    environment = {key: value for key, value in os.environ.items() if key != "TORCH_INDEX"}
    result = subprocess.run(["make", "-n", "-B", *args], cwd=ROOT, capture_output=True,
                            text=True, check=True, env=environment)
    return result.stdout


def test_make_setup_takes_torch_from_pytorchs_cpu_index_unless_told_otherwise():
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in make_dry_run("setup")
    cuda = "https://download.pytorch.org/whl/cu124"
    assert f"--extra-index-url {cuda}" in make_dry_run("setup", f"TORCH_INDEX={cuda}")
    assert "--extra-index-url" not in make_dry_run("setup", "TORCH_INDEX=")  # as .ci/run sets it


def test_make_repro_and_serve_put_the_venv_first_on_path():
    bin_dir = ROOT / ".venv" / "bin"
    commands = make_dry_run("repro", "serve", "PORT=5123").splitlines()
    repro = next(line for line in commands if "dvc repro" in line)
    serve = next(line for line in commands if " serve " in line)
    assert repro.startswith(f"PATH={bin_dir}:")
    assert serve.startswith(f"PATH={bin_dir}:")
    assert "--model models:/regflow@champion" in serve and "--port 5123" in serve


def test_serve_prints_the_uvicorn_command_of_this_interpreter():
    bin_dir = Path(sys.executable).parent
    result = subprocess.run(
        [str(bin_dir / "regflow"), "serve", "--model", "runs:/abc/model", "--port", "5123",
         "--print-command"], env={"PATH": "/usr/bin:/bin", "HOME": str(Path.home()),
                                  "PYTHONPATH": os.environ.get("PYTHONPATH", "")},
        capture_output=True, text=True, check=True)
    command, model, uri = result.stdout.splitlines()
    interpreter, rest = command.split(" ", 1)
    assert Path(interpreter).parent == bin_dir  # runs from an unactivated venv
    assert rest.startswith("-m uvicorn --factory regflow.serving.app:create_app --host 127.0.0.1 "
                           "--port 5123 ")
    assert "--workers 2" in command
    assert model == "REGFLOW_SERVE_MODEL=runs:/abc/model"
    assert uri.startswith("MLFLOW_TRACKING_URI=sqlite:///")
