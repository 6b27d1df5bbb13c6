"""The dataset catalogue: entries, pinned checksums, the one-line descriptions, name lookup."""

from __future__ import annotations

from pathlib import Path

import pytest

from regflow.config import load_config
from regflow.data.catalogue import CATALOGUE, describe_dataset, get_dataset, pinned_checksums
from regflow.errors import ConfigError


def _config(tmp_path: Path, *overrides: str):
    return load_config(tmp_path / "params.yaml", [f"data.raw_dir={tmp_path / 'raw'}", *overrides])


def test_catalogue_entries_and_pinned_checksums():
    msd, prostate = CATALOGUE["msd-hippocampus"], CATALOGUE["deepreg-paired-prostate"]
    assert (msd.layout, msd.pairing, msd.subdir, msd.simulated) == (
        "msd", "unpaired", "Task04_Hippocampus", False)
    assert msd.label_names == ["anterior", "posterior"] and msd.licence == "CC BY-SA 4.0"
    assert "Nature Communications 13, 4128 (2022)" in msd.citation
    assert "1902.09063" in msd.citation
    assert len(pinned_checksums(msd)) == 520

    assert (prostate.layout, prostate.pairing, prostate.simulated) == (
        "deepreg-paired", "paired", True)
    assert "simulated" in prostate.description.lower() and prostate.licence == "Apache-2.0"
    assert len(prostate.urls) == len(prostate.sha256) == len(prostate.files) == 108
    assert prostate.urls[0].startswith("https://raw.githubusercontent.com/DeepRegNet/DeepReg/")
    assert prostate.urls[0].endswith("/data/test/nifti/paired/test/fixed_images/case000025.nii.gz")
    assert dict(zip(prostate.files, prostate.sha256, strict=True)) == pinned_checksums(prostate)

    network = [entry for entry in CATALOGUE.values() if entry.needs_network]
    assert len(network) >= 3
    assert all(entry.urls and entry.licence and entry.citation for entry in network)


def test_describe_dataset_is_one_line_with_licence_and_nature():
    lines = {name: describe_dataset(entry) for name, entry in CATALOGUE.items()}
    assert all("\n" not in line and line.startswith(name) for name, line in lines.items())
    assert "[CC BY-SA 4.0] [real] [network or offline mirror]" in lines["msd-hippocampus"]
    assert "[Apache-2.0] [simulated]" in lines["deepreg-paired-prostate"]
    assert "[needs network]" in lines["learn2reg-lung-ct"]


def test_get_dataset_local_and_unknown(tmp_path):
    config = _config(tmp_path, "data.local.mine.path=/data/mine",
                     "data.local.mine.pairing=grouped", "data.local.mine.format=h5")
    entry = get_dataset("mine", config)
    assert (entry.kind, entry.layout, entry.pairing, entry.file_format, entry.local_path) == (
        "local", "deepreg-grouped", "grouped", "h5", "/data/mine")
    assert get_dataset("msd-hippocampus", config) is CATALOGUE["msd-hippocampus"]
    with pytest.raises(ConfigError, match=r"unknown dataset 'nope'; known: msd-hip.*, mine \("):
        get_dataset("nope", config)
    clash = _config(tmp_path, "data.local.msd-hippocampus.path=x",
                    "data.local.msd-hippocampus.pairing=unpaired")
    with pytest.raises(ConfigError, match=r"data.local.msd-hippocampus: the catalogue already"):
        get_dataset("msd-hippocampus", clash)
