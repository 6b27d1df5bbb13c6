"""A tiny synthetic registration dataset (DeepReg unpaired layout) for fast end-to-end tests.

Each case is a 20x24x20 volume holding two ellipsoid "structures" (labels 1 and 2) at
case-specific offsets, with intensities that follow the labels, so label-driven and image-driven
registration both have something to learn.
"""

from pathlib import Path

import numpy as np
import yaml

from regflow.data.io import write_nifti

SHAPE = (20, 24, 20)
SPLITS = {"train": 6, "val": 2, "test": 2}


def make_case(rng: np.random.Generator, shape=SHAPE) -> tuple[np.ndarray, np.ndarray]:
    """(image float32, label uint8) with two ellipsoids shifted by up to 2 voxels."""
    grid = np.stack(np.meshgrid(*[np.arange(size) for size in shape], indexing="ij"))
    label = np.zeros(shape, np.uint8)
    centres = [np.array([7.0, 9.0, 10.0]), np.array([13.0, 15.0, 10.0])]
    for value, centre in enumerate(centres, start=1):
        centre = centre + rng.uniform(-2, 2, size=3)
        radii = np.array([3.5, 4.5, 4.0]) * rng.uniform(0.9, 1.1)
        inside = (((grid - centre[:, None, None, None]) / radii[:, None, None, None]) ** 2
                  ).sum(0) <= 1
        label[inside] = value
    image = 0.2 + 0.35 * (label == 1) + 0.6 * (label == 2) + rng.normal(0, 0.02, shape)
    return image.astype(np.float32), label


def write_unpaired_dataset(root: Path, seed: int = 0, splits: dict[str, int] = SPLITS) -> Path:
    """Write {train,val,test}/{images,labels}/case_NNN.nii.gz under ``root`` (``splits``: cases
    per split); return root."""
    rng = np.random.default_rng(seed)
    number = 0
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    for split, count in splits.items():
        for folder in ("images", "labels"):
            (root / split / folder).mkdir(parents=True, exist_ok=True)
        for _ in range(count):
            image, label = make_case(rng)
            write_nifti(root / split / "images" / f"case_{number:03d}.nii.gz", image, affine)
            write_nifti(root / split / "labels" / f"case_{number:03d}.nii.gz", label, affine)
            number += 1
    return root


def write_params(workdir: Path, raw_source: Path, **sections) -> Path:
    """A params.yaml for the synthetic dataset with a small, fast model; ``sections`` override."""
    params = {
        "seed": 1,
        "data": {"dataset": "tiny", "raw_dir": str(workdir / "data/raw"),
                 "processed_dir": str(workdir / "data/processed"),
                 "local": {"tiny": {"path": str(raw_source), "pairing": "unpaired",
                                    "label_names": ["first", "second"]}}},
        "preprocess": {"shape": [16, 24, 16]},
        "loader": {"batch_size": 2, "eval_pairs": 2,
                   "augment": {"enabled": False}},
        "train": {"name": "tiny", "steps": 6, "val_every": 3, "checkpoint_every": 2,
                  "amp": False, "device": "cpu",  # keys dvc.yaml's stages list as params
                  "model": {"backbone": {"name": "local", "channels": [4, 8]}},
                  "loss": {"image": {"lncc": {"weight": 1.0, "options": {"kernel_size": 5}}},
                           "label": {"dice": {"weight": 1.0}},
                           "regularization": {"bending_energy": {"weight": 0.1}}},
                  "best_params": str(workdir / "models/tuning/best_params.yaml")},
        "tune": {"trials": 0},
    }
    for section, values in sections.items():
        params[section] = {**params.get(section, {}), **values}
    path = workdir / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path
