"""configs/demos: one params file per DeepReg demo. Every config validates and names a catalogue
dataset; every network-only demo runs its documented commands (fetch with the layout conversion,
preprocess, 2 training steps, predict) on a miniature synthetic copy of its archive's upstream
layout, served as an offline mirror; bad upstream layouts fail in one line naming the file."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from regflow.cli import MIRROR_ENV, cli
from regflow.config import load_config
from regflow.data.integrity import SUMS_NAME, format_sums, hash_tree
from regflow.data.io import read_volume, write_nifti
from regflow.data.sources import CATALOGUE
from tests.synthetic import make_case

DEMOS_DIR = Path(__file__).resolve().parents[1] / "configs" / "demos"
DEEPREG_DEMOS = (
    "classical_ct_headandneck_affine", "classical_mr_prostate_nonrigid",
    "grouped_mask_prostate_longitudinal", "grouped_mr_heart", "paired_ct_lung",
    "paired_mrus_brain", "paired_mrus_prostate", "unpaired_ct_abdomen", "unpaired_ct_lung",
    "unpaired_mr_brain", "unpaired_us_prostate_cv",
)
OFFLINE = {"unpaired_mr_brain", "paired_mrus_prostate"}  # their datasets are in the mirror
TINY = ["preprocess.shape=[16,16,16]", "train.model.backbone.channels=[4,8]",
        "train.steps=2", "train.val_every=2", "train.checkpoint_every=2", "train.device=cpu",
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


# ---- miniature upstream layouts, as each archive unpacks ------------------------------------

def _case(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    return make_case(rng)  # (20, 24, 20) image with labels 1 and 2


def lung_archive(root: Path, rng: np.random.Generator) -> None:
    """training/{scans,lungMasks}/case_NNN_{insp,exp}.nii.gz, case_020 included."""
    for number in [*range(1, 9), 20]:
        for tag in ("insp", "exp"):
            image, label = _case(rng)
            name = f"case_{number:03d}_{tag}.nii.gz"
            write_nifti(root / "training" / "scans" / name, image, np.eye(4))
            write_nifti(root / "training" / "lungMasks" / name, (label > 0).astype(np.uint8),
                        np.eye(4))


def abdomen_archive(root: Path, rng: np.random.Generator) -> None:
    """datasets_deepreg_demo-abdct/dataset/{images,labels}/<n>.nii.gz, integer organ maps."""
    base = root / "datasets_deepreg_demo-abdct" / "dataset"
    for number in range(1, 21):  # 10% val and 15% test: 2 and 3 images, enough to pair
        image, label = _case(rng)
        write_nifti(base / "images" / f"{number:04d}.nii.gz", image, np.eye(4))
        write_nifti(base / "labels" / f"{number:04d}.nii.gz", label * 6, np.eye(4))  # 6, 12


def heart_archive(root: Path, rng: np.random.Generator) -> None:
    """<repo>/<subject>_<sequence>.nii.gz, three sequences per subject, no labels."""
    for subject in range(1, 7):
        for sequence in ("C0", "DE", "T2"):
            image, _ = _case(rng)
            write_nifti(root / "datasets_deepreg_demo-myops" / "dataset" /
                        f"{subject:03d}_{sequence}.nii.gz", image, np.eye(4))


def longitudinal_archive(root: Path, rng: np.random.Generator) -> None:
    """data.h5 with binary gland masks keyed group-<patient>-<visit>."""
    with h5py.File(root / "data.h5", "w") as handle:
        for patient in range(1, 7):
            for visit in range(1, 4):
                _, label = _case(rng)
                handle.create_dataset(f"group-{patient}-{visit}", data=(label > 0)
                                      .astype(np.uint8))


def resect_archive(root: Path, rng: np.random.Generator) -> None:
    """dataset_resect-master/paired_mr_us_brain/{train,test}/{fixed,moving}_images/, unlabelled."""
    base = root / "dataset_resect-master" / "paired_mr_us_brain"
    for split, count in (("train", 5), ("test", 2)):
        for number in range(count):
            for side in ("fixed", "moving"):
                image, _ = _case(rng)
                write_nifti(base / split / f"{side}_images" / f"{split}{number}.nii.gz", image,
                            np.eye(4))
    (root / "dataset_resect-master" / "README.md").write_text("partial RESECT\n")


def mrus_archive(root: Path, rng: np.random.Generator) -> None:
    """example-data-mrus/{moving,fixed}_{images,labels}/caseNNNNNN.nii.gz, 4-D binary labels;
    moving (MR) and fixed (TRUS) volumes of different shapes."""
    base = root / "example-data-mrus"
    for number in range(8):
        for side, shape in (("moving", (24, 24, 20)), ("fixed", (20, 24, 20))):
            image, label = make_case(rng, shape=shape)
            channels = np.stack([label == 1, label == 2], axis=-1).astype(np.float32)
            write_nifti(base / f"{side}_images" / f"case{number:06d}.nii.gz", image, np.eye(4))
            write_nifti(base / f"{side}_labels" / f"case{number:06d}.nii.gz", channels,
                        np.eye(4))


def trus_archive(root: Path, rng: np.random.Generator) -> None:
    """dataset_trus3d-master/fold<k>/images.h5 with two volumes per fold (same keys in every
    fold), unlabelled."""
    for fold in range(10):
        folder = root / "dataset_trus3d-master" / f"fold{fold}"
        folder.mkdir(parents=True)
        with h5py.File(folder / "images.h5", "w") as handle:
            for number in range(2):
                handle.create_dataset(f"case{number:06d}", data=_case(rng)[0])


def promise12_file(root: Path, rng: np.random.Generator) -> None:
    """demo2.h5: image0/label0 (moving) and image1/label1 (fixed)."""
    root.mkdir(parents=True, exist_ok=True)
    with h5py.File(root / "demo2.h5", "w") as handle:
        for index in range(2):
            image, label = _case(rng)
            handle.create_dataset(f"image{index}", data=image)
            handle.create_dataset(f"label{index}", data=(label > 0).astype(np.uint8))


def hnct_file(root: Path, rng: np.random.Generator) -> None:
    """demo.h5: one image and a 2-channel label, channels last."""
    root.mkdir(parents=True, exist_ok=True)
    image, label = _case(rng)
    with h5py.File(root / "demo.h5", "w") as handle:
        handle.create_dataset("image", data=image)
        handle.create_dataset("label", data=np.stack([label == 1, label == 2], axis=-1)
                              .astype(np.float32))


def write_mirror(mirror: Path, dataset: str, archive: Callable[..., None], seed: int = 0) -> Path:
    """``mirror/<entry.mirror_name>/`` holding the miniature upstream tree and its SHA256SUMS."""
    folder = mirror / CATALOGUE[dataset].mirror_name
    folder.mkdir(parents=True, exist_ok=True)
    archive(folder, np.random.default_rng(seed))
    (folder / SUMS_NAME).write_text(format_sums(hash_tree(folder, exclude=[SUMS_NAME])))
    return mirror


def run(*arguments: str) -> str:
    result = CliRunner().invoke(cli, list(arguments))
    assert result.exit_code == 0, result.output
    return result.output


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

    run("fetch", *options)
    raw = tmp_path / "data" / "raw" / dataset
    assert not (raw / ".upstream").exists()
    run("preprocess", *options)
    manifest = json.loads((tmp_path / "data/processed" / dataset / "manifest.json").read_text())
    assert {row["split"] for row in manifest["cases"]} == {"train", "val", "test"}
    assert "trained 2 steps" in run("train", *options)
    name = load_config(demo_config(demo)).train.name
    run("predict", *options, "--model", f"models/{name}/best.pt", "--split", "test",
        "--layout", "deepreg", "--out", "predictions")

    pair = tmp_path / "predictions" / "pair_0"
    warped, _ = read_volume(pair / "pred_fixed_image.nii.gz")
    ddf, _ = read_volume(pair / "ddf.nii.gz")
    assert warped.shape == (16, 16, 16) and ddf.shape == (16, 16, 16, 3)
    assert np.isfinite(ddf).all()
    assert (tmp_path / "predictions" / "metrics.csv").is_file()


def test_lung_conversions_pair_by_tag_and_leave_case_020_out(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(MIRROR_ENV, str(write_mirror(tmp_path / "mirror", "learn2reg-lung-ct",
                                                    lung_archive)))
    run("fetch", "learn2reg-lung-ct")
    run("fetch", "learn2reg-lung-ct-unpaired")
    paired, unpaired = (tmp_path / "data/raw" / name for name in (
        "learn2reg-lung-ct", "learn2reg-lung-ct-unpaired"))
    cases = [f"case_{number:03d}.nii.gz" for number in range(1, 9)]
    for folder in ("fixed_images", "fixed_labels", "moving_images", "moving_labels"):
        assert sorted(path.name for path in (paired / folder).iterdir()) == cases
    assert sorted(path.name for path in (unpaired / "images").iterdir()) == cases
    source = tmp_path / "mirror/learn2reg_lung_ct/training/scans"
    assert (read_volume(paired / "moving_images" / cases[0])[0] ==
            read_volume(source / "case_001_exp.nii.gz")[0]).all()
    assert (read_volume(unpaired / "images" / cases[0])[0] ==
            read_volume(source / "case_001_exp.nii.gz")[0]).all()


def test_conversions_of_grouped_and_fold_archives(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    mirror = tmp_path / "mirror"
    write_mirror(mirror, "myops-grouped-mr-heart", heart_archive)
    write_mirror(mirror, "deepreg-prostate-longitudinal-masks", longitudinal_archive)
    write_mirror(mirror, "trus3d-prostate", trus_archive)
    monkeypatch.setenv(MIRROR_ENV, str(mirror))
    for dataset in ("myops-grouped-mr-heart", "deepreg-prostate-longitudinal-masks",
                    "trus3d-prostate"):
        run("fetch", dataset)
    raw = tmp_path / "data/raw"
    heart = raw / "myops-grouped-mr-heart" / "images"
    assert sorted(path.name for path in heart.iterdir()) == [f"{n:03d}" for n in range(1, 7)]
    assert sorted(path.name for path in (heart / "001").iterdir()) == [
        "C0.nii.gz", "DE.nii.gz", "T2.nii.gz"]
    masks = raw / "deepreg-prostate-longitudinal-masks"
    with h5py.File(masks / "labels.h5") as labels, h5py.File(masks / "images.h5") as images:
        assert sorted(labels) == sorted(images) and len(labels) == 18
        mask, smooth = labels["group-1-1"][()], images["group-1-1"][()]
        assert set(np.unique(mask)) == {0, 1}
        assert smooth.dtype == np.float32 and 0 < smooth.max() < 1
    trus = raw / "trus3d-prostate"
    with h5py.File(trus / "train/images.h5") as train, h5py.File(trus / "test/images.h5") as test:
        assert len(train) == 16 and sorted(test) == ["fold9-case000000", "fold9-case000001"]
    assert not (trus / "val/labels.h5").exists()


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
    run("fetch", *config)
    raw = tmp_path / "data/raw" / dataset
    volume = {folder: raw / folder / f"{case}.nii.gz" for folder in (
        "fixed_images", "moving_images", "fixed_labels", "moving_labels")}
    run("predict", *config, "--model", "none", *steps,
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


def _missing_mask(root: Path, rng: np.random.Generator) -> None:
    lung_archive(root, rng)
    (root / "training" / "lungMasks" / "case_003_exp.nii.gz").unlink()


def _untagged_heart(root: Path, rng: np.random.Generator) -> None:
    heart_archive(root, rng)
    write_nifti(root / "extra.nii.gz", _case(rng)[0], np.eye(4))


def _bad_h5_key(root: Path, rng: np.random.Generator) -> None:
    longitudinal_archive(root, rng)
    with h5py.File(root / "data.h5", "a") as handle:
        handle.create_dataset("patient7", data=np.zeros((4, 4, 4), np.uint8))


def _no_dataset_folder(root: Path, rng: np.random.Generator) -> None:
    write_nifti(root / "abdct" / "images" / "0001.nii.gz", _case(rng)[0], np.eye(4))


@pytest.mark.parametrize(("dataset", "archive", "message"), [
    ("learn2reg-lung-ct", _missing_mask, r"case_003_exp\.nii\.gz: no label case_003_exp"),
    ("myops-grouped-mr-heart", _untagged_heart,
     r"extra\.nii\.gz: expected a name <group>_<image>\.nii\.gz"),
    ("deepreg-prostate-longitudinal-masks", _bad_h5_key,
     r"data\.h5: key 'patient7' is not of the form"),
    ("learn2reg-abdomen-ct", _no_dataset_folder, r"no dataset/ folder"),
])
def test_bad_upstream_layout_is_one_line_naming_the_file_and_leaves_nothing(
        dataset, archive, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(MIRROR_ENV, str(write_mirror(tmp_path / "mirror", dataset, archive)))
    result = CliRunner().invoke(cli, ["fetch", dataset])
    assert result.exit_code == 2
    error = [line for line in result.stderr.splitlines() if line.startswith("Error")]
    assert len(error) == 1 and error[0].startswith(f"Error: {dataset}: "), result.stderr
    assert re.search(message, error[0]) and ".upstream" not in error[0], error[0]
    assert not (tmp_path / "data/raw" / dataset).exists()
