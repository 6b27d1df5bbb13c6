"""regflow.data.preprocess (+ splits): raw folders -> processed volumes, splits and manifest."""

import csv
import hashlib
import json
import shutil
from collections import Counter
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from regflow.cli import cli
from regflow.config import PreprocessConfig
from regflow.data.preprocess import preprocess_folder
from regflow.errors import ConfigError, DataError

TASK = "Task04_Hippocampus"
HIPPO_CASES = 12


def copy_hippocampus(mirror: Path, root: Path, count: int = HIPPO_CASES) -> Path:
    """The first ``count`` mirror cases + a dataset.json listing them, in msd layout."""
    meta = json.loads((mirror / TASK / "dataset.json").read_text())
    meta["training"] = meta["training"][:count]
    task = root / TASK
    for folder in ("imagesTr", "labelsTr"):
        (task / folder).mkdir(parents=True)
    for item in meta["training"]:
        for key in ("image", "label"):
            shutil.copy(mirror / TASK / item[key], task / item[key])
    (task / "dataset.json").write_text(json.dumps(meta))
    return root


def run_msd(raw: Path, out: Path, seed: int = 42, **params) -> dict:
    manifest = preprocess_folder(raw, out, layout="msd", pairing="unpaired",
                                 preprocess_config=PreprocessConfig(**params), seed=seed,
                                 dataset_name="msd-hippocampus", subdir=TASK)
    return json.loads(manifest.read_text())


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def hippo_raw(mirror: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_hippocampus(mirror, tmp_path_factory.mktemp("raw") / "msd-hippocampus")


@pytest.fixture(scope="module")
def hippo_out(hippo_raw: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("processed") / "msd-hippocampus"
    run_msd(hippo_raw, out)
    return out


def test_hippocampus_volumes_labels_and_manifest(hippo_out: Path, hippo_raw: Path) -> None:
    manifest = json.loads((hippo_out / "manifest.json").read_text())
    assert manifest["dataset"] == "msd-hippocampus" and manifest["pairing"] == "unpaired"
    assert manifest["shape"] == [48, 64, 48] and manifest["spacing"] == [1.0, 1.0, 1.0]
    assert manifest["label_format"] == "integer" and manifest["label_values"] == [1, 2]
    assert manifest["label_names"] == ["Anterior", "Posterior"]  # from dataset.json
    assert manifest["preprocessing"]["seed"] == 42 and manifest["simulated"] is False
    assert Counter(case["split"] for case in manifest["cases"]) == {"train": 10, "val": 1,
                                                                    "test": 1}
    for case in manifest["cases"]:
        image = nib.load(hippo_out / case["image"])
        label = np.asarray(nib.load(hippo_out / case["label"]).dataobj)
        source = np.asarray(nib.load(hippo_raw / TASK / "labelsTr" /
                                     f"{case['case_id']}.nii.gz").dataobj)
        assert image.shape == (48, 64, 48) and image.get_data_dtype() == np.float32
        assert float(image.get_fdata().min()) == 0.0 and float(image.get_fdata().max()) == 1.0
        assert label.dtype == np.uint8 and set(np.unique(label)) <= {0, 1, 2}
        for value in (1, 2):  # every case fits: pad only, no label voxel lost
            assert np.count_nonzero(label == value) == np.count_nonzero(source == value)
        assert case["image_sha256"] == sha256(hippo_out / case["image"])
        assert case["label_sha256"] == sha256(hippo_out / case["label"])
        assert case["fold"] is None and case["group"] is None
    with open(hippo_out / "manifest.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["case_id"] for row in rows] == [case["case_id"] for case in manifest["cases"]]
    filled = [key for key in manifest["cases"][0]  # the CSV leaves out columns empty everywhere
              if any(case[key] is not None for case in manifest["cases"])]
    assert list(rows[0]) == filled
    assert rows[0]["image_sha256"] == manifest["cases"][0]["image_sha256"]


def test_world_coordinates_survive_crop_and_pad(hippo_out: Path, hippo_raw: Path) -> None:
    source = nib.load(hippo_raw / TASK / "imagesTr/hippocampus_001.nii.gz")
    source_label = np.asarray(nib.load(hippo_raw / TASK / "labelsTr/hippocampus_001.nii.gz")
                              .dataobj)
    output = nib.load(hippo_out / "images/hippocampus_001.nii.gz")
    output_label = np.asarray(nib.load(hippo_out / "labels/hippocampus_001.nii.gz").dataobj)
    data = source.get_fdata()
    for index in [(0, 0, 0), (17, 25, 17), *np.argwhere(source_label == 2)[:3].tolist()]:
        world = source.affine @ [*index, 1]
        mapped = np.linalg.solve(output.affine, world)[:3]
        np.testing.assert_allclose(mapped, np.round(mapped), atol=1e-6)
        target = tuple(np.round(mapped).astype(int))
        expected = (data[tuple(index)] - data.min()) / (data.max() - data.min())
        assert output.get_fdata()[target] == pytest.approx(expected, abs=1e-6)
        assert output_label[target] == source_label[tuple(index)]


def test_same_seed_same_manifest_other_seed_other_split(hippo_raw: Path, hippo_out: Path,
                                                        tmp_path: Path) -> None:
    again = tmp_path / "again" / "msd-hippocampus"
    run_msd(hippo_raw, again, seed=42)
    assert (again / "manifest.json").read_bytes() == (hippo_out / "manifest.json").read_bytes()
    other = run_msd(hippo_raw, tmp_path / "other" / "msd-hippocampus", seed=7)
    first = json.loads((hippo_out / "manifest.json").read_text())
    assert [c["split"] for c in other["cases"]] != [c["split"] for c in first["cases"]]


def test_rerun_replaces_output_atomically(hippo_raw: Path, tmp_path: Path) -> None:
    out = tmp_path / "msd-hippocampus"
    run_msd(hippo_raw, out, shape=[40, 56, 40])
    (out / "stale.txt").write_text("from an older run")
    manifest = run_msd(hippo_raw, out, shape=[32, 32, 32])
    assert not (out / "stale.txt").exists()
    assert nib.load(out / manifest["cases"][0]["image"]).shape == (32, 32, 32)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["msd-hippocampus"]


def test_resampling_in_the_pipeline(hippo_raw: Path, tmp_path: Path) -> None:
    manifest = run_msd(hippo_raw, tmp_path / "out", spacing=[2.0, 2.0, 2.0], shape=[24, 32, 24])
    assert manifest["spacing"] == [2.0, 2.0, 2.0]
    assert manifest["preprocessing"]["source_spacing"]["min"] == [1.0, 1.0, 1.0]
    case = manifest["cases"][0]
    image = nib.load(tmp_path / "out" / case["image"])
    label = np.asarray(nib.load(tmp_path / "out" / case["label"]).dataobj)
    assert image.shape == (24, 32, 24)
    np.testing.assert_allclose(np.abs(image.affine[:3, :3]).sum(axis=0), [2.0, 2.0, 2.0])
    assert set(np.unique(label)) == {0, 1, 2}  # nearest neighbour keeps label values


def test_percentile_normalisation_in_the_pipeline(hippo_raw: Path, tmp_path: Path) -> None:
    manifest = run_msd(hippo_raw, tmp_path / "out", normalise="percentile", percentiles=[5, 95])
    source = nib.load(hippo_raw / TASK / "imagesTr/hippocampus_001.nii.gz").get_fdata()
    case = next(c for c in manifest["cases"] if c["case_id"] == "hippocampus_001")
    image = nib.load(tmp_path / "out" / case["image"]).get_fdata()
    assert image.min() == 0.0 and image.max() == 1.0
    assert np.count_nonzero(image == 1.0) == np.count_nonzero(source >= np.percentile(source, 95))


def test_corrupt_file_is_named_and_leaves_no_output(mirror: Path, tmp_path: Path) -> None:
    raw = copy_hippocampus(mirror, tmp_path / "raw", count=3)
    broken = raw / TASK / "imagesTr/hippocampus_003.nii.gz"
    broken.write_bytes(b"\x1f\x8b garbage bytes" * 10)
    out = tmp_path / "processed" / "msd-hippocampus"
    with pytest.raises(DataError, match=rf"^{broken}: not a readable NIfTI file"):
        run_msd(raw, out)
    assert list((tmp_path / "processed").iterdir()) == []


def test_image_label_shape_mismatch_names_the_case(mirror: Path, tmp_path: Path) -> None:
    raw = copy_hippocampus(mirror, tmp_path / "raw", count=3)
    label = raw / TASK / "labelsTr/hippocampus_004.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((36, 52, 30), np.uint8), np.eye(4)), label)
    with pytest.raises(DataError, match=r"^hippocampus_004: image shape \[36, 52, 38\] and "
                                        r"label shape \[36, 52, 30\] differ"):
        run_msd(raw, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def write_unpaired(root: Path, volumes: dict[str, tuple[np.ndarray, np.ndarray]],
                   splits: dict[str, str], file_format: str) -> None:
    """DeepReg unpaired layout holding ``{case: (image, label)}``, in NIfTI or HDF5 form."""
    for split in set(splits.values()):
        (root / split).mkdir(parents=True, exist_ok=True)
        for index, folder in enumerate(("images", "labels")):
            cases = {c: v[index] for c, v in volumes.items() if splits[c] == split}
            if file_format == "h5":
                with h5py.File(root / split / f"{folder}.h5", "w") as handle:
                    for case_id, array in cases.items():
                        handle[case_id] = array
                continue
            (root / split / folder).mkdir()
            for case_id, array in cases.items():
                nib.save(nib.Nifti1Image(array, np.eye(4)),
                         root / split / folder / f"{case_id}.nii.gz")


def small_volumes(count: int, shape=(10, 12, 8)) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(3)
    return {f"case{k}": (rng.normal(50, 10, shape).astype(np.float32),
                         rng.integers(0, 4, shape).astype(np.uint8)) for k in range(count)}


def test_hdf5_and_nifti_inputs_give_identical_outputs(tmp_path: Path) -> None:
    volumes = small_volumes(5)
    splits = {"case0": "train", "case1": "train", "case2": "train", "case3": "val",
              "case4": "test"}
    manifests = {}
    for file_format in ("nifti", "h5"):
        write_unpaired(tmp_path / file_format, volumes, splits, file_format)
        path = preprocess_folder(tmp_path / file_format, tmp_path / f"out_{file_format}",
                                 layout="deepreg-unpaired", pairing="unpaired",
                                 file_format=file_format, seed=0,
                                 preprocess_config=PreprocessConfig(shape=[12, 12, 12]))
        manifests[file_format] = json.loads(path.read_text())
    assert manifests["h5"]["label_values"] == [1, 2, 3]  # scanned from the label maps
    for nifti_case, h5_case in zip(manifests["nifti"]["cases"], manifests["h5"]["cases"],
                                   strict=True):
        assert nifti_case == h5_case
        assert nifti_case["split"] == splits[nifti_case["case_id"]]
    for case in manifests["nifti"]["cases"]:
        for key in ("image", "label"):
            from_nifti = nib.load(tmp_path / "out_nifti" / case[key])
            from_h5 = nib.load(tmp_path / "out_h5" / case[key])
            np.testing.assert_array_equal(from_nifti.get_fdata(), from_h5.get_fdata())
            np.testing.assert_array_equal(from_nifti.affine, from_h5.affine)


def test_one_hot_writes_channels(tmp_path: Path) -> None:
    volumes = small_volumes(3)
    write_unpaired(tmp_path / "raw", volumes, dict.fromkeys(volumes, "train"), "nifti")
    path = preprocess_folder(tmp_path / "raw", tmp_path / "out", layout="deepreg-unpaired",
                             pairing="unpaired", seed=0, label_names=["a", "b", "c"],
                             preprocess_config=PreprocessConfig(shape=[10, 12, 8], one_hot=True))
    manifest = json.loads(path.read_text())
    assert manifest["label_format"] == "channels" and manifest["label_values"] is None
    assert manifest["label_names"] == ["a", "b", "c"]
    assert Counter(c["split"] for c in manifest["cases"]) == {"train": 1, "val": 1, "test": 1}
    case = manifest["cases"][0]
    label = np.asarray(nib.load(tmp_path / "out" / case["label"]).dataobj)
    assert label.shape == (10, 12, 8, 3) and label.dtype == np.uint8
    source = volumes[case["case_id"]][1]
    for channel, value in enumerate((1, 2, 3)):
        np.testing.assert_array_equal(label[..., channel], source == value)


def test_two_dimensional_images_with_trailing_axis(tmp_path: Path) -> None:
    volumes = {f"case{k}": (np.full((8, 9, 1), k + 1.0, np.float32) + np.arange(9.0)[:, None],
                            np.pad(np.full((2, 2, 1), 2, np.uint8), ((3, 3), (3, 4), (0, 0))))
               for k in range(4)}
    write_unpaired(tmp_path / "raw", volumes, dict.fromkeys(volumes, "train"), "nifti")
    path = preprocess_folder(tmp_path / "raw", tmp_path / "out", layout="deepreg-unpaired",
                             pairing="unpaired", seed=0,
                             preprocess_config=PreprocessConfig(shape=[10, 9]))
    manifest = json.loads(path.read_text())
    assert manifest["label_format"] == "integer" and manifest["label_values"] == [2]
    label = np.asarray(nib.load(tmp_path / "out" / manifest["cases"][0]["label"]).dataobj)
    image = nib.load(tmp_path / "out" / manifest["cases"][0]["image"]).get_fdata()
    assert image.shape == (10, 9) and label.shape == (10, 9)
    np.testing.assert_allclose(image[1], np.arange(9) / 8)  # padded one row above and below
    assert np.count_nonzero(label == 2) == 4 and label[4, 3] == 2


def copy_prostate(mirror: Path, root: Path) -> Path:
    shutil.copytree(mirror / "deepreg_paired_prostate", root,
                    ignore=shutil.ignore_patterns("SHA256SUMS"))
    return root


def test_local_paired_prostate_in_deepreg_layout(mirror: Path, tmp_path: Path) -> None:
    raw = copy_prostate(mirror, tmp_path / "raw" / "prostate")
    path = preprocess_folder(raw, tmp_path / "out", layout="deepreg-paired", pairing="paired",
                             seed=1, simulated=True, dataset_name="prostate",
                             label_names=["gland", "region-1", "region-2"],
                             preprocess_config=PreprocessConfig(shape=[48, 64, 48]))
    manifest = json.loads(path.read_text())
    assert manifest["label_format"] == "channels" and manifest["label_values"] is None
    assert manifest["label_names"] == ["gland", "region-1", "region-2"]
    assert manifest["simulated"] is True and manifest["spacing"] == [0.4, 0.4, 0.4]
    splits = {case["case_id"]: case["split"] for case in manifest["cases"]}
    assert Counter(splits.values()) == {"train": 22, "val": 3, "test": 2}
    assert {c for c, s in splits.items() if s == "test"} == {"case000025", "case000026"}
    case = next(c for c in manifest["cases"] if c["case_id"] == "case000000")
    assert all(case[role] for role in ("fixed_image", "moving_image", "fixed_label",
                                       "moving_label"))
    assert case["image"] is None and case["label"] is None and case["group"] is None
    fixed_label = np.asarray(nib.load(tmp_path / "out" / case["fixed_label"]).dataobj)
    source = np.asarray(nib.load(raw / "train/fixed_labels/case000000.nii.gz").dataobj)
    assert fixed_label.shape == (48, 64, 48, 3) and fixed_label.dtype == np.uint8
    np.testing.assert_array_equal(fixed_label.sum(axis=(0, 1, 2)), source.sum(axis=(0, 1, 2)))
    for key in ("fixed_image", "moving_image"):
        assert nib.load(tmp_path / "out" / case[key]).shape == (48, 64, 48)
        assert case[f"{key}_sha256"] == sha256(tmp_path / "out" / case[key])
    single = next(c for c in manifest["cases"] if c["case_id"] == "case000002")  # one 3-D label
    assert nib.load(tmp_path / "out" / single["moving_label"]).shape == (48, 64, 48, 1)


def test_k_fold_over_train_and_val(hippo_raw: Path, tmp_path: Path) -> None:
    manifest = run_msd(hippo_raw, tmp_path / "out", folds=3)
    folds = Counter(c["fold"] for c in manifest["cases"] if c["split"] != "test")
    assert sorted(folds) == [0, 1, 2] and sorted(folds.values()) == [3, 4, 4]
    assert all(c["fold"] is None for c in manifest["cases"] if c["split"] == "test")
    with pytest.raises(ConfigError, match="preprocess.folds: 20 folds"):
        run_msd(hippo_raw, tmp_path / "too_many", folds=20)


def test_grouped_data_split_by_group(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    with h5py.File(tmp_path / "images.h5", "w") as handle:
        for group in range(6):
            for case in range(3):
                handle[f"group-{group}-{case}"] = rng.random((6, 6, 6)).astype(np.float32)
    path = preprocess_folder(tmp_path, tmp_path / "out", layout="deepreg-grouped",
                             pairing="grouped", file_format="h5", seed=5,
                             preprocess_config=PreprocessConfig(shape=[6, 6, 6],
                                                                val_fraction=0.2,
                                                                test_fraction=0.2))
    manifest = json.loads(path.read_text())
    assert manifest["label_format"] is None and len(manifest["cases"]) == 18
    by_group: dict[str, set] = {}
    for case in manifest["cases"]:
        assert case["case_id"].startswith(f"{case['group']}-") and case["label"] is None
        by_group.setdefault(case["group"], set()).add(case["split"])
    assert all(len(splits) == 1 for splits in by_group.values())
    assert Counter(next(iter(s)) for s in by_group.values()) == {"train": 4, "val": 1, "test": 1}


def test_cli_preprocess_catalogue_dataset(hippo_raw: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, [
        "preprocess", "-c", str(tmp_path / "params.yaml"),
        "-S", f"data.raw_dir={hippo_raw.parent}", "-S", f"data.processed_dir={tmp_path}/proc",
        "-S", "data.dataset=msd-hippocampus", "-S", "preprocess.shape=[40,56,48]"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "proc/msd-hippocampus/manifest.json").read_text())
    assert manifest["label_names"] == ["anterior", "posterior"]  # the catalogue's names
    assert manifest["shape"] == [40, 56, 48] and len(manifest["cases"]) == HIPPO_CASES
    missing = CliRunner().invoke(cli, ["preprocess", "-c", str(tmp_path / "params.yaml"),
                                       "-S", f"data.raw_dir={tmp_path}/none"])
    assert missing.exit_code == 2 and "raw dataset folder not found" in missing.output


def soft_volumes(count: int, shape=(10, 12, 8)) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Images and two-channel soft labels: channel 0 a ramp 0..1 along x, channel 1 constant."""
    ramp = np.broadcast_to(np.linspace(0, 1, shape[0])[:, None, None], shape)
    label = np.stack([ramp, np.full(shape, 0.3)], axis=-1).astype(np.float32)
    rng = np.random.default_rng(4)
    return {f"case{k}": (rng.normal(50, 10, shape).astype(np.float32), label)
            for k in range(count)}


def test_soft_labels_stay_floats_through_preprocessing_and_the_loader(tmp_path: Path) -> None:
    from regflow.config import Config
    from regflow.data.loader import build_dataloader

    volumes = soft_volumes(7)
    write_unpaired(tmp_path / "raw", volumes, {f"case{k}": "train" if k < 5 else "val"
                                               for k in range(7)}, "nifti")
    path = preprocess_folder(tmp_path / "raw", tmp_path / "out", layout="deepreg-unpaired",
                             pairing="unpaired", seed=0,
                             preprocess_config=PreprocessConfig(shape=[10, 12, 8],
                                                                soft_labels=True))
    manifest = json.loads(path.read_text())
    assert manifest["label_format"] == "soft" and manifest["label_values"] is None
    stored = nib.load(tmp_path / "out" / manifest["cases"][0]["label"])
    assert stored.get_data_dtype() == np.float32
    np.testing.assert_allclose(stored.get_fdata(), volumes["case0"][1], atol=1e-6)

    config = Config.model_validate({"loader": {"batch_size": 2, "augment": {"enabled": False}}})
    batch = next(iter(build_dataloader(path, "val", config, train=False)))
    fixed_label = batch["fixed_label"][0].numpy()
    assert fixed_label.shape == (2, 10, 12, 8)
    np.testing.assert_allclose(fixed_label[0, :, 0, 0], np.linspace(0, 1, 10), atol=1e-6)
    np.testing.assert_allclose(fixed_label[1], 0.3, atol=1e-6)  # not thresholded to 0
    augmented = Config.model_validate({"loader": {"batch_size": 2, "augment": {
        "enabled": True, "elastic": {"enabled": False}, "intensity": {"enabled": False}}}})
    label = next(iter(build_dataloader(path, "train", augmented, train=True)))["fixed_label"]
    assert 0 <= float(label.min()) and float(label.max()) <= 1 + 1e-5
    assert bool(((label > 0.05) & (label < 0.95)).any()), "augmentation kept the soft values"


def test_soft_labels_resample_linearly(tmp_path: Path) -> None:
    volumes = soft_volumes(3)
    write_unpaired(tmp_path / "raw", volumes, dict.fromkeys(volumes, "train"), "nifti")
    path = preprocess_folder(tmp_path / "raw", tmp_path / "out", layout="deepreg-unpaired",
                             pairing="unpaired", seed=0,
                             preprocess_config=PreprocessConfig(shape=[20, 12, 8],
                                                                spacing=[0.5, 1.0, 1.0],
                                                                soft_labels=True))
    case = json.loads(path.read_text())["cases"][0]
    label = nib.load(tmp_path / "out" / case["label"]).get_fdata()
    values = np.unique(np.round(label[..., 0], 4))
    assert len(values) > 10, "a nearest-neighbour resampling would keep the 10 source values"
    assert label.min() >= 0 and label.max() <= 1


def test_soft_labels_outside_0_1_name_the_case(tmp_path: Path) -> None:
    volumes = soft_volumes(3)
    volumes["case1"] = (volumes["case1"][0], volumes["case1"][1] * 2)
    write_unpaired(tmp_path / "raw", volumes, dict.fromkeys(volumes, "train"), "nifti")
    with pytest.raises(DataError, match=r"case1: soft label values must lie in \[0, 1\], "
                                        r"found \[0, 2\]"):
        preprocess_folder(tmp_path / "raw", tmp_path / "out", layout="deepreg-unpaired",
                          pairing="unpaired", seed=0,
                          preprocess_config=PreprocessConfig(shape=[10, 12, 8],
                                                             soft_labels=True))
    assert not (tmp_path / "out").exists()
