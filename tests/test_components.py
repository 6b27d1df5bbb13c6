"""Extension points: a tiny package installed with regflow entry points adds a loss and a backbone
that params.yaml names like built-ins, and `regflow components` lists them."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.synthetic import write_params

PLUGIN_MODULE = '''
"""A doubled SSD and a one-convolution backbone, for regflow's extension-point test."""
import torch
from torch import nn


def doubled_ssd(fixed, warped):
    return 2 * torch.mean((fixed - warped) ** 2)


class OneConv(nn.Module):
    def __init__(self, ndim, in_channels, out_channels, channels, norm):
        super().__init__()
        conv = nn.Conv3d if ndim == 3 else nn.Conv2d
        self.conv = conv(in_channels, out_channels, kernel_size=3, padding=1)

    def forward(self, x):
        return self.conv(x)
'''
PLUGIN_PROJECT = '''
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "regflow-plugin-demo"
version = "0.1"

[project.entry-points."regflow.losses"]
"image.doubled_ssd" = "regflow_plugin_demo:doubled_ssd"

[project.entry-points."regflow.backbones"]
one_conv = "regflow_plugin_demo:OneConv"

[tool.setuptools]
py-modules = ["regflow_plugin_demo"]
'''

CHECKPOINT_PROBE = """
import sys, torch
from regflow.models import RegistrationModel
model, _ = RegistrationModel.load(sys.argv[1])
weights = torch.cat([parameter.flatten() for parameter in model.parameters()])
print(type(model.backbone).__name__, weights.numel(), bool(torch.isfinite(weights).all()))
"""


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory) -> Path:
    """The demo package installed (pip, no network) into a folder for PYTHONPATH."""
    source = tmp_path_factory.mktemp("plugin-source")
    (source / "regflow_plugin_demo.py").write_text(textwrap.dedent(PLUGIN_MODULE))
    (source / "pyproject.toml").write_text(textwrap.dedent(PLUGIN_PROJECT))
    site = tmp_path_factory.mktemp("plugin-site")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                    "--no-build-isolation", "--no-index", "--target", str(site), str(source)],
                   check=True, capture_output=True, timeout=300)
    return site


def regflow(site: Path, workdir: Path, *args: str) -> subprocess.CompletedProcess:
    env = {"PATH": str(Path(sys.executable).parent), "PYTHONPATH": str(site),
           "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}",
           "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "HOME": str(workdir)}
    return subprocess.run([sys.executable, "-m", "regflow.cli", *args], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_an_installed_packages_loss_and_backbone_train_from_params(plugin_site, tmp_path,
                                                                   tiny_raw):
    listed = regflow(plugin_site, tmp_path, "components")
    assert listed.returncode == 0, listed.stderr
    rows = [line.split(None, 3) for line in listed.stdout.splitlines()]
    assert ["loss", "(image)", "doubled_ssd", "regflow-plugin-demo "
            "(regflow_plugin_demo:doubled_ssd)"] in rows
    assert ["backbone", "one_conv", "regflow-plugin-demo", "(regflow_plugin_demo:OneConv)"] in [
        line.split() for line in listed.stdout.splitlines()]

    params = write_params(tmp_path, tiny_raw, train={
        "name": "tiny", "steps": 2, "val_every": 2, "checkpoint_every": 2, "amp": False,
        "device": "cpu", "best_params": None,
        "model": {"backbone": {"name": "one_conv", "channels": [4]}},
        "loss": {"image": {"doubled_ssd": {"weight": 1.0}},
                 "regularization": {"bending_energy": {"weight": 0.1}}}})
    for command in (["fetch"], ["preprocess"], ["train"]):
        result = regflow(plugin_site, tmp_path, *command, "-c", str(params))
        assert result.returncode == 0, result.stderr[-2000:]
    loaded = subprocess.run(  # loading the checkpoint builds the package's backbone again
        [sys.executable, "-c", CHECKPOINT_PROBE, str(tmp_path / "models/tiny/last.pt")],
        env={"PYTHONPATH": str(plugin_site)}, capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert loaded.stdout.split() == ["OneConv", str(2 * 3 * 27 + 3), "True"]

def test_unknown_backbone_lists_the_known_ones(tmp_path):
    from regflow.config import load_config
    from regflow.errors import ConfigError

    with pytest.raises(ConfigError, match=r"train\.model\.backbone\.name: unknown backbone "
                                          r"'resnet'; known: 'local', 'global', 'unet'"):
        load_config(tmp_path / "params.yaml", ["train.model.backbone.name=resnet"])


def test_one_backbone_table_for_the_listing_the_networks_and_the_deepreg_importer():
    from regflow.components import BUILTIN_BACKBONES, listing
    from regflow.deepreg.importer import translate
    from regflow.errors import ConfigError
    from regflow.networks import BACKBONES, build_backbone

    assert tuple(BACKBONES) == BUILTIN_BACKBONES
    listed = [row["name"] for row in listing() if row["kind"] == "backbone"
              and row["source"] == "regflow"]
    assert listed == list(BUILTIN_BACKBONES)
    deepreg = {"dataset": {"dir": {"train": "x/train"}, "format": "nifti", "type": "paired",
                           "labeled": True, "image_shape": [8, 8, 8]}}
    loss = {"loss": {"label": [{"name": "dice", "weight": 1.0}]}}
    for name in BUILTIN_BACKBONES:
        assert isinstance(build_backbone(name, 3, 2, 3, [4, 8]), BACKBONES[name])
        method = "affine" if name == "global" else "ddf"
        tree = {**deepreg, "train": {"method": method, "backbone": {"name": name}, **loss}}
        assert translate(tree, "x").params["train"]["model"]["backbone"]["name"] == name
    tree = {**deepreg, "train": {"method": "ddf", "backbone": {"name": "vanilla"}, **loss}}
    with pytest.raises(ConfigError, match=f"regflow has {', '.join(BUILTIN_BACKBONES)}, not"):
        translate(tree, "x")
