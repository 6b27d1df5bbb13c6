"""fetch from the offline mirror and local folders, and the datasets/fetch commands."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from regflow.cli import cli
from regflow.config import load_config
from regflow.data.catalogue import CATALOGUE
from regflow.data.fetch import MARKER_NAME, fetch_dataset, fetch_entry
from regflow.data.integrity import SUMS_NAME, format_sums, hash_tree, read_sums
from regflow.data.manifest import Manifest
from regflow.data.preprocess import preprocess_dataset
from regflow.errors import DataError, RegflowError

FLIPPED = "imagesTr/hippocampus_004.nii.gz"


def _config(tmp_path: Path, *overrides: str):
    return load_config(tmp_path / "params.yaml", [f"data.raw_dir={tmp_path / 'raw'}", *overrides])


def _fake_mirror(mirror: Path, tmp_path: Path, resum: bool) -> Path:
    """A copy of the hippocampus mirror with one byte of one image flipped."""
    fake = tmp_path / "fake-mirror"
    shutil.copytree(mirror / "Task04_Hippocampus", fake / "Task04_Hippocampus")
    image = fake / "Task04_Hippocampus" / FLIPPED
    data = bytearray(image.read_bytes())
    data[100] ^= 0xFF
    image.chmod(0o644)
    image.write_bytes(bytes(data))
    if resum:  # a consistent but wrong mirror: only regflow's pinned list can catch it
        sums = fake / "Task04_Hippocampus" / SUMS_NAME
        sums.chmod(0o644)
        sums.write_text(format_sums(hash_tree(fake / "Task04_Hippocampus", exclude=[SUMS_NAME])))
    return fake


def test_fetch_msd_from_mirror_then_second_fetch_is_a_no_op(mirror, tmp_path):
    config = _config(tmp_path)
    target = fetch_dataset("msd-hippocampus", config, mirror=str(mirror))

    task = target / "Task04_Hippocampus"
    assert target == tmp_path / "raw" / "msd-hippocampus"
    assert len(list(task.glob("imagesTr/*.nii.gz"))) == 260
    assert len(list(task.glob("labelsTr/*.nii.gz"))) == 260
    assert (task / "dataset.json").read_bytes() == (
        mirror / "Task04_Hippocampus" / "dataset.json").read_bytes()
    sums = read_sums(target / SUMS_NAME)
    assert len(sums) == 521 and sums == hash_tree(target, exclude=[SUMS_NAME, MARKER_NAME])
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == ["msd-hippocampus"]

    before = (target / SUMS_NAME).stat().st_mtime_ns, task.stat().st_ino
    again = fetch_dataset("msd-hippocampus", config, mirror=None)  # no mirror, no network needed
    assert again == target and ((target / SUMS_NAME).stat().st_mtime_ns, task.stat().st_ino) == (
        before)


def test_incomplete_copy_is_refetched(mirror, tmp_path):
    config = _config(tmp_path)
    target = fetch_dataset("msd-hippocampus", config, mirror=str(mirror))
    (target / "Task04_Hippocampus" / "labelsTr" / "hippocampus_001.nii.gz").unlink()
    fetch_dataset("msd-hippocampus", config, mirror=str(mirror))
    assert len(list(target.glob("Task04_Hippocampus/labelsTr/*.nii.gz"))) == 260
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == ["msd-hippocampus"]


@pytest.mark.parametrize("resum", [False, True], ids=["stale-mirror-sums", "resummed-mirror"])
def test_corrupt_mirror_file_is_named_and_nothing_is_left(mirror, tmp_path, resum):
    fake = _fake_mirror(mirror, tmp_path, resum)
    with pytest.raises(DataError, match=FLIPPED) as error:
        fetch_dataset("msd-hippocampus", _config(tmp_path), mirror=str(fake))
    assert "\n" not in str(error.value)
    assert "disagrees with regflow's pinned" in str(error.value) if resum else (
        "sha256 mismatch" in str(error.value))
    assert list((tmp_path / "raw").iterdir()) == []


def test_mirror_missing_pinned_files_is_refused(mirror, tmp_path):
    fake = tmp_path / "partial" / "Task04_Hippocampus"
    fake.mkdir(parents=True)
    listed = read_sums(mirror / "Task04_Hippocampus" / SUMS_NAME)
    kept = {rel: digest for rel, digest in listed.items() if "_00" in rel}
    (fake / SUMS_NAME).write_text(format_sums(kept))
    with pytest.raises(DataError, match=r"SHA256SUMS: does not list imagesTr/hippocampus_01"):
        fetch_dataset("msd-hippocampus", _config(tmp_path), mirror=str(fake.parent))
    assert list((tmp_path / "raw").iterdir()) == []


def test_fetch_prostate_from_mirror_keeps_deepreg_layout(mirror, tmp_path):
    target = fetch_dataset("deepreg-paired-prostate", _config(tmp_path), mirror=str(mirror))
    for folder in ("fixed_images", "fixed_labels", "moving_images", "moving_labels"):
        assert len(list((target / "train" / folder).glob("case*.nii.gz"))) == 25
        assert len(list((target / "test" / folder).glob("case*.nii.gz"))) == 2


def _local_unpaired(root: Path, mirror: Path) -> Path:
    source = mirror / "Task04_Hippocampus"
    for split, cases in (("train", ("001", "003")), ("test", ("004",))):
        for kind, folder in (("images", "imagesTr"), ("labels", "labelsTr")):
            (root / split / kind).mkdir(parents=True, exist_ok=True)
            for case in cases:
                name = f"hippocampus_{case}.nii.gz"
                shutil.copyfile(source / folder / name, root / split / kind / name)
    return root


def test_fetch_local_folder_copies_it_with_checksums(mirror, tmp_path):
    root = _local_unpaired(tmp_path / "mine", mirror)
    config = _config(tmp_path, f"data.local.mine.path={root}", "data.local.mine.pairing=unpaired")
    target = fetch_dataset("mine", config, mirror=None)
    assert read_sums(target / SUMS_NAME) == hash_tree(root)
    assert fetch_dataset("mine", config) == target

    changed = root / "test" / "images" / "hippocampus_004.nii.gz"
    changed.write_bytes((root / "train" / "images" / "hippocampus_001.nii.gz").read_bytes())
    fetch_dataset("mine", config)
    assert (target / "test" / "images" / "hippocampus_004.nii.gz").read_bytes() == (
        changed.read_bytes())
    assert read_sums(target / SUMS_NAME) == hash_tree(root)


def test_fetch_local_folder_in_the_wrong_layout_says_what_is_missing(mirror, tmp_path):
    root = _local_unpaired(tmp_path / "mine", mirror)
    paired = _config(tmp_path, f"data.local.mine.path={root}", "data.local.mine.pairing=paired")
    with pytest.raises(DataError, match=r"^data.local.mine: not in deepreg-paired layout: .*/mine:"
                                        r" no paired cases found \(expected \[train\|val\|test/\]"
                                        r"fixed_images/\)$"):
        fetch_dataset("mine", paired)

    (root / "test" / "labels" / "hippocampus_004.nii.gz").unlink()
    (root / "test" / "labels" / "hippocampus_005.nii.gz").write_bytes(b"")
    unpaired = _config(tmp_path, f"data.local.mine.path={root}",
                       "data.local.mine.pairing=unpaired")
    with pytest.raises(DataError, match=r"test/labels: no file for case hippocampus_004"):
        fetch_dataset("mine", unpaired)
    assert not (tmp_path / "raw" / "mine").exists()
    with pytest.raises(DataError, match=r"^data.local.gone: .*/gone is not a folder$"):
        fetch_dataset("gone", _config(tmp_path, f"data.local.gone.path={tmp_path / 'gone'}",
                                      "data.local.gone.pairing=unpaired"))


def test_local_grouped_h5_folder_fetches_only_its_layout_files(tmp_path):
    root = tmp_path / "groups"
    (root / "train").mkdir(parents=True)
    with h5py.File(root / "train" / "images.h5", "w") as images:
        for key in ("group-s1-t0", "group-s1-t1", "group-s2-t0"):
            images[key] = np.zeros((4, 5, 6), np.float32)
    (root / "notes.txt").write_text("not part of the layout")
    config = _config(tmp_path, f"data.local.cmr.path={root}", "data.local.cmr.pairing=grouped",
                     "data.local.cmr.format=h5")
    target = fetch_dataset("cmr", config)
    assert sorted(read_sums(target / SUMS_NAME)) == ["train/images.h5"]


def test_mirror_is_used_before_the_network(tmp_path, mirror):
    entry = dataclasses.replace(CATALOGUE["deepreg-paired-prostate"], urls=(), sha256=(), files=())
    target = fetch_entry(entry, tmp_path / "raw", mirror=str(mirror))
    assert len(read_sums(target / SUMS_NAME)) == 108
    with pytest.raises(RegflowError, match="not in the mirror and no download URL is known"):
        fetch_entry(entry, tmp_path / "elsewhere", mirror=str(tmp_path / "empty-mirror"))


def test_cli_datasets_and_fetch_help_list_the_catalogue():
    runner = CliRunner()
    listing = runner.invoke(cli, ["datasets"])
    assert listing.exit_code == 0
    lines = listing.output.splitlines()
    assert len(lines) == len(CATALOGUE)
    assert "msd-hippocampus" in lines[0] and "CC BY-SA 4.0" in lines[0]
    assert any("deepreg-paired-prostate" in line and "[simulated]" in line for line in lines)

    helped = runner.invoke(cli, ["fetch", "--help"])
    assert helped.exit_code == 0
    flat = " ".join(helped.output.split())
    for name, entry in CATALOGUE.items():
        assert name in flat and " ".join(entry.licence.split()) in flat
    assert "[simulated]" in flat and "REGFLOW_DATA_MIRROR" in flat


def test_cli_fetch_from_mirror_and_unknown_dataset(tmp_path, mirror):
    runner = CliRunner()
    options = ["-c", str(tmp_path / "params.yaml"), "-S", f"data.raw_dir={tmp_path / 'raw'}"]
    done = runner.invoke(cli, ["fetch", "deepreg-paired-prostate", *options],
                         env={"REGFLOW_DATA_MIRROR": str(mirror)})
    assert done.exit_code == 0, done.output
    assert done.stdout == (
        f"deepreg-paired-prostate: ready in {tmp_path / 'raw' / 'deepreg-paired-prostate'}\n")

    unknown = runner.invoke(cli, ["fetch", "nonexistent", *options])
    assert unknown.exit_code == 2
    assert unknown.stderr.count("\n") == 1 and unknown.stdout == ""
    assert unknown.stderr.startswith("Error: unknown dataset 'nonexistent'; known: msd-hippocampus")


def test_local_dataset_with_several_folders_per_split(mirror, tmp_path):
    """data.local.<name>.splits lists each split's folders (DeepReg's dir lists): each lands in
    <split>/<folder>/, and preprocessing reads them all, case ids prefixed by the folder."""
    source = _local_unpaired(tmp_path / "mine", mirror)
    parts = tmp_path / "parts"
    shutil.copytree(source / "train", parts / "part00")
    shutil.copytree(source / "test", parts / "part01")
    shutil.copytree(source / "test", parts / "part02")
    shutil.copytree(source / "test", parts / "part03")
    config = _config(tmp_path, f"data.local.mine.path={parts}", "data.local.mine.pairing=unpaired",
                     "data.local.mine.splits.train=[part00, part01]",
                     "data.local.mine.splits.val=[part03]",
                     "data.local.mine.splits.test=[part02]",
                     f"data.processed_dir={tmp_path / 'processed'}",
                     "preprocess.shape=[8,8,8]")
    target = fetch_dataset("mine", config)
    assert sorted(read_sums(target / SUMS_NAME)) == [
        f"{folder}/{kind}/hippocampus_{case}.nii.gz" for folder, cases in (
            ("test/part02", ["004"]), ("train/part00", ["001", "003"]),
            ("train/part01", ["004"]), ("val/part03", ["004"]))
        for kind in ("images", "labels") for case in cases]
    manifest = Manifest.read(preprocess_dataset("mine", config))
    assert sorted((case.case_id, case.split) for case in manifest.cases) == [
        ("part00-hippocampus_001", "train"), ("part00-hippocampus_003", "train"),
        ("part01-hippocampus_004", "train"), ("part02-hippocampus_004", "test"),
        ("part03-hippocampus_004", "val")]
    clash = _config(tmp_path, f"data.local.bad.path={tmp_path}", "data.local.bad.pairing=unpaired",
                    "data.local.bad.splits.train=[mine/train, parts/part00/../../mine/train]")
    with pytest.raises(DataError, match=r"^data.local.bad.splits.train: the folders of one split "
                                        r"need distinct names"):
        fetch_dataset("bad", clash)
