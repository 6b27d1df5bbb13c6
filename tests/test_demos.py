"""configs/demos: one params file per DeepReg demo. Every config validates and names a catalogue
dataset; every network-only demo runs its documented commands (fetch with the layout conversion,
preprocess, 2 training steps, predict; the classical ones fetch and register their pair) on a
miniature synthetic copy of its archive's upstream layout (tests/demo_archives.py), served as an
offline mirror."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from regflow.cli import MIRROR_ENV
from regflow.config import load_config
from regflow.data.catalogue import CATALOGUE
from regflow.data.io import read_volume
from regflow.deepreg.importer import read_deepreg_configs
from tests.demo_archives import (
    abdomen_archive,
    heart_archive,
    hnct_file,
    longitudinal_archive,
    lung_archive,
    mrus_archive,
    promise12_file,
    resect_archive,
    run_regflow,
    trus_archive,
    write_mirror,
)

DEMOS_DIR = Path(__file__).resolve().parents[1] / "configs" / "demos"
DEEPREG_CONFIGS = Path(__file__).resolve().parent / "deepreg_configs"
DEEPREG_DEMOS = (
    "classical_ct_headandneck_affine", "classical_mr_prostate_nonrigid",
    "grouped_mask_prostate_longitudinal", "grouped_mr_heart", "paired_ct_lung",
    "paired_mrus_brain", "paired_mrus_prostate", "unpaired_ct_abdomen", "unpaired_ct_lung",
    "unpaired_mr_brain", "unpaired_us_prostate_cv",
)
OFFLINE = {"unpaired_mr_brain", "paired_mrus_prostate"}  # their datasets are in the mirror
TINY = ["preprocess.shape=[16,16,16]", "train.model.backbone.channels=[4,8]",
        "train.steps=2", "train.val_every=2", "train.checkpoint_every=2", "train.unit=steps",
        "train.device=cpu",
        "loader.batch_size=2", "loader.eval_pairs=2", "loader.augment.enabled=false"]


def demo_config(demo: str) -> Path:
    return DEMOS_DIR / f"{demo}.yaml"


def test_there_is_one_config_per_deepreg_demo():
    assert sorted(path.stem for path in DEMOS_DIR.glob("*.yaml")) == sorted(DEEPREG_DEMOS)


@pytest.mark.parametrize("demo", DEEPREG_DEMOS)
def test_demo_config_validates_and_documents_source_status_and_commands(demo):
    path = demo_config(demo)
    config = load_config(path)
    entry = CATALOGUE[config.data.dataset]
    assert entry.licence and entry.citation
    header = "".join(line for line in path.read_text().splitlines(keepends=True)
                     if line.startswith("#"))
    assert f"DeepReg demo {demo}:" in header
    assert "Status: runs offline here" in header if demo in OFFLINE else "network only" in header
    assert entry.needs_network is (demo not in OFFLINE)
    if entry.needs_network:  # wrapped lines joined: the download URL is written out whole
        assert entry.urls[0] in "".join(line.lstrip("#").strip() for line in header.splitlines())
    assert f"regflow fetch -c configs/demos/{demo}.yaml" in header
    assert "regflow predict" in header
    assert config.train.best_params is None and not config.tune.enabled  # nothing from elsewhere


# demo -> its DeepReg config (copies in tests/deepreg_configs)
DEEPREG_RECIPES = {
    "grouped_mask_prostate_longitudinal": "demos_grouped_mask_prostate_longitudinal.yaml",
    "grouped_mr_heart": "demos_grouped_mr_heart.yaml",
    "paired_ct_lung": "demos_paired_ct_lung.yaml",
    "paired_mrus_brain": "demos_paired_mrus_brain.yaml",
    "paired_mrus_prostate": "demos_paired_mrus_prostate.yaml",
    "unpaired_ct_abdomen": "demos_unpaired_ct_abdomen_comb.yaml",
    "unpaired_ct_lung": "demos_unpaired_ct_lung.yaml",
    "unpaired_mr_brain": "demos_unpaired_mr_brain.yaml",
    "unpaired_us_prostate_cv": "demos_unpaired_us_prostate_cv.yaml",
}


@pytest.mark.parametrize("demo", list(DEEPREG_RECIPES))
def test_training_length_is_deepregs_epoch_count(demo):
    """DeepReg trains ``epochs`` passes and saves every ``save_period``: a demo counts them in
    epochs, or in steps with the per-epoch step count (above 1) multiplied in."""
    config = load_config(demo_config(demo)).train
    deepreg = read_deepreg_configs([DEEPREG_CONFIGS / DEEPREG_RECIPES[demo]])["train"]
    if config.unit == "epochs":
        assert (config.steps, config.checkpoint_every) == (deepreg["epochs"],
                                                           deepreg["save_period"])
    else:
        per_epoch, rest = divmod(config.steps, deepreg["epochs"])
        assert rest == 0 and per_epoch > 1
        assert config.checkpoint_every == deepreg["save_period"] * per_epoch


# ---- miniature upstream layouts, as each archive unpacks ------------------------------------

# demo -> (dataset, miniature archive, extra overrides)

NETWORK_DEMOS = {
    "paired_ct_lung": ("learn2reg-lung-ct", lung_archive, []),
    "unpaired_ct_lung": ("learn2reg-lung-ct-unpaired", lung_archive, []),
    "unpaired_ct_abdomen": ("learn2reg-abdomen-ct", abdomen_archive, []),
    "grouped_mr_heart": ("myops-grouped-mr-heart", heart_archive, []),
    "grouped_mask_prostate_longitudinal": ("deepreg-prostate-longitudinal-masks",
                                           longitudinal_archive, []),
    "paired_mrus_brain": ("resect-paired-mrus-brain", resect_archive, []),
    "unpaired_us_prostate_cv": ("trus3d-prostate", trus_archive, []),
    # the demo's own archive, named in its config's header as the alternative to the mirror's
    "paired_mrus_prostate": ("deepreg-mrus-prostate", mrus_archive,
                             ["data.dataset=deepreg-mrus-prostate"]),
}


@pytest.mark.parametrize("demo", list(NETWORK_DEMOS))
def test_network_demo_runs_on_a_miniature_copy_of_its_upstream_layout(
        demo, tmp_path, monkeypatch, mlflow_store):
    dataset, archive, extra = NETWORK_DEMOS[demo]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(MIRROR_ENV, str(write_mirror(tmp_path / "mirror", dataset, archive)))
    options = ["-c", str(demo_config(demo))]
    for override in [*TINY, *extra]:
        options += ["-S", override]

    run_regflow("fetch", *options)
    raw = tmp_path / "data" / "raw" / dataset
    assert not (raw / ".upstream").exists()
    run_regflow("preprocess", *options)
    manifest = json.loads((tmp_path / "data/processed" / dataset / "manifest.json").read_text())
    assert {row["split"] for row in manifest["cases"]} == {"train", "val", "test"}
    assert "trained 2 steps" in run_regflow("train", *options)
    name = load_config(demo_config(demo)).train.name
    run_regflow("predict", *options, "--model", f"models/{name}/best.pt", "--split", "test",
        "--layout", "deepreg", "--out", "predictions")

    pair = tmp_path / "predictions" / "pair_0"
    warped, _ = read_volume(pair / "pred_fixed_image.nii.gz")
    ddf, _ = read_volume(pair / "ddf.nii.gz")
    assert warped.shape == (16, 16, 16) and ddf.shape == (16, 16, 16, 3)
    assert np.isfinite(ddf).all()
    assert (tmp_path / "predictions" / "metrics.csv").is_file()


CLASSICAL = {
    "classical_mr_prostate_nonrigid": ("promise12-demo-pair", promise12_file, "demo2",
                                       ["--refine-steps", "4"]),
    "classical_ct_headandneck_affine": ("hnct-demo-volume", hnct_file, "demo",
                                        ["--refine-steps", "0", "-S",
                                         "evaluate.refine.affine_steps=4"]),
}


@pytest.mark.parametrize("demo", list(CLASSICAL))
def test_classical_demo_converts_its_file_and_registers_the_pair(demo, tmp_path, monkeypatch):
    dataset, archive, case, steps = CLASSICAL[demo]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(MIRROR_ENV, str(write_mirror(tmp_path / "mirror", dataset, archive)))
    config = ["-c", str(demo_config(demo)), "-S", "preprocess.shape=[16,16,16]"]
    run_regflow("fetch", *config)
    raw = tmp_path / "data/raw" / dataset
    volume = {folder: raw / folder / f"{case}.nii.gz" for folder in (
        "fixed_images", "moving_images", "fixed_labels", "moving_labels")}
    run_regflow("predict", *config, "--model", "none", *steps,
        "--fixed", str(volume["fixed_images"]), "--moving", str(volume["moving_images"]),
        "--fixed-label", str(volume["fixed_labels"]),
        "--moving-label", str(volume["moving_labels"]), "--out", "predictions")
    fixed, _ = read_volume(volume["fixed_images"])
    ddf, _ = read_volume(tmp_path / "predictions" / "ddf.nii.gz")
    assert ddf.shape == (*fixed.shape, 3) and np.isfinite(ddf).all()
    assert (tmp_path / "predictions" / "metrics.csv").is_file()
    if dataset == "hnct-demo-volume":  # the moving side is the fixed one under a known affine
        truth = json.loads((raw / "simulated_affine.json").read_text())
        assert np.array(truth["matrix"]).shape == (4, 4)
        assert not np.array_equal(fixed, read_volume(volume["moving_images"])[0])


