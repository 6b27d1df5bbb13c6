"""The project's own packaging: Dockerfile lint, CLI entry point, DVC config."""

import shutil
import subprocess
import sys
from pathlib import Path

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
