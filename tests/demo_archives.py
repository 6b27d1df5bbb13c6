"""Miniature synthetic copies of the DeepReg demo archives' upstream layouts (a few 20x24x20
volumes each, as the archives unpack), an offline mirror serving them to ``regflow fetch``, and
the command runner the demo tests share."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
from click.testing import CliRunner

from regflow.cli import cli
from regflow.data.catalogue import CATALOGUE
from regflow.data.integrity import SUMS_NAME, format_sums, hash_tree
from regflow.data.io import write_nifti
from tests.synthetic import make_case


def case_volumes(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(image, label) of tests/synthetic.py: (20, 24, 20), labels 1 and 2."""
    return make_case(rng)


def lung_archive(root: Path, rng: np.random.Generator) -> None:
    """training/{scans,lungMasks}/case_NNN_{insp,exp}.nii.gz, case_020 included."""
    for number in [*range(1, 9), 20]:
        for tag in ("insp", "exp"):
            image, label = case_volumes(rng)
            name = f"case_{number:03d}_{tag}.nii.gz"
            write_nifti(root / "training" / "scans" / name, image, np.eye(4))
            write_nifti(root / "training" / "lungMasks" / name, (label > 0).astype(np.uint8),
                        np.eye(4))


def abdomen_archive(root: Path, rng: np.random.Generator) -> None:
    """datasets_deepreg_demo-abdct/dataset/{images,labels}/<n>.nii.gz, integer organ maps."""
    base = root / "datasets_deepreg_demo-abdct" / "dataset"
    for number in range(1, 21):  # 10% val and 15% test: 2 and 3 images, enough to pair
        image, label = case_volumes(rng)
        write_nifti(base / "images" / f"{number:04d}.nii.gz", image, np.eye(4))
        write_nifti(base / "labels" / f"{number:04d}.nii.gz", label * 6, np.eye(4))  # 6, 12


def heart_archive(root: Path, rng: np.random.Generator) -> None:
    """<repo>/<subject>_<sequence>.nii.gz, three sequences per subject, no labels."""
    for subject in range(1, 7):
        for sequence in ("C0", "DE", "T2"):
            image, _ = case_volumes(rng)
            write_nifti(root / "datasets_deepreg_demo-myops" / "dataset" /
                        f"{subject:03d}_{sequence}.nii.gz", image, np.eye(4))


def longitudinal_archive(root: Path, rng: np.random.Generator) -> None:
    """data.h5 with binary gland masks keyed group-<patient>-<visit>."""
    with h5py.File(root / "data.h5", "w") as handle:
        for patient in range(1, 7):
            for visit in range(1, 4):
                _, label = case_volumes(rng)
                handle.create_dataset(f"group-{patient}-{visit}", data=(label > 0)
                                      .astype(np.uint8))


def resect_archive(root: Path, rng: np.random.Generator) -> None:
    """dataset_resect-master/paired_mr_us_brain/{train,test}/{fixed,moving}_images/, unlabelled."""
    base = root / "dataset_resect-master" / "paired_mr_us_brain"
    for split, count in (("train", 5), ("test", 2)):
        for number in range(count):
            for side in ("fixed", "moving"):
                image, _ = case_volumes(rng)
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
                handle.create_dataset(f"case{number:06d}", data=case_volumes(rng)[0])


def promise12_file(root: Path, rng: np.random.Generator) -> None:
    """demo2.h5: image0/label0 (moving) and image1/label1 (fixed)."""
    root.mkdir(parents=True, exist_ok=True)
    with h5py.File(root / "demo2.h5", "w") as handle:
        for index in range(2):
            image, label = case_volumes(rng)
            handle.create_dataset(f"image{index}", data=image)
            handle.create_dataset(f"label{index}", data=(label > 0).astype(np.uint8))


def hnct_file(root: Path, rng: np.random.Generator) -> None:
    """demo.h5: one image and a 2-channel label, channels last."""
    root.mkdir(parents=True, exist_ok=True)
    image, label = case_volumes(rng)
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


def run_regflow(*arguments: str) -> str:
    """Run ``regflow ARGUMENTS`` in this process; assert it succeeds; return its output."""
    result = CliRunner().invoke(cli, list(arguments))
    assert result.exit_code == 0, result.output
    return result.output
