"""The dataset catalogue and ``fetch``: download or mirror-copy, verify, and install into data/raw/.

Every fetch builds the dataset in a hidden temporary folder beside the target
(``data/raw/.<name>.*.tmp``), verifies it, writes ``SHA256SUMS`` (every file, ``sha256sum -c``
compatible) and a completion marker, and only then renames it to ``data/raw/<name>``. Any failure
removes the temporary folder, so ``data/raw/<name>`` is either complete and verified or absent.
Downloads in progress live in ``data/raw/.downloads/`` so that an interrupted fetch resumes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tqdm import tqdm

from regflow import __version__
from regflow.config import Config, LocalDataset
from regflow.data.archive import safe_extract
from regflow.data.conversions import convert
from regflow.data.download import download
from regflow.data.integrity import (
    SUMS_NAME,
    copy_verified,
    format_sums,
    hash_tree,
    parse_sums,
    read_sums,
    sha256_file,
    verify_files,
)
from regflow.errors import ConfigError, DataError, RegflowError
from regflow.fileio import atomic_directory, write_text

Kind = Literal["archive", "files", "local"]
Layout = Literal["msd", "deepreg-paired", "deepreg-unpaired", "deepreg-grouped"]
Pairing = Literal["paired", "unpaired", "grouped"]

CHECKSUM_DIR = Path(__file__).parent / "checksums"
MARKER_NAME = ".regflow-complete.json"
DOWNLOADS_DIR = ".downloads"
# A commit of DeepReg's main branch holding data/test/nifti/paired/; the shipped per-file
# checksums (checksums/deepreg-paired-prostate.sha256) pin the bytes whatever the URL serves.
DEEPREG_COMMIT = "01dfab753b035ebdf9798a88f4056afb03471d7e"
DEEPREG_PAIRED_URL = (
    f"https://raw.githubusercontent.com/DeepRegNet/DeepReg/{DEEPREG_COMMIT}/data/test/nifti/paired"
)
DEEPREG_DEMO_DATA = "https://github.com/ucl-candi/datasets_deepreg_demo/archive"


@dataclass(frozen=True)
class DatasetEntry:
    """One dataset: where it comes from, how it is laid out, and the terms it comes under.

    Attributes:
        name: catalogue key and folder name under data/raw/.
        kind: "archive" (one archive to download and extract), "files" (one URL per file) or
            "local" (a folder on this machine, from ``data.local`` in params.yaml).
        layout: folder layout after fetch (see the data contracts).
        pairing: how images pair up for registration.
        description: one sentence; says "simulated" for simulated data.
        licence: the data licence (or the terms to check, where no licence is stated).
        citation: what to cite when using the data.
        file_format: "nifti" or "h5".
        label_names: foreground label names in label-value/channel order, or None.
        simulated: True when the images are simulated rather than acquired from patients.
        needs_network: True when the offline mirror does not carry it.
        urls: the archive URL (kind "archive") or one URL per file (kind "files").
        sha256: the expected SHA-256 per URL; None where no digest is known offline (the
            per-file list in ``checksums`` then does the verifying).
        files: kind "files": where each URL's file lands, relative to ``data/raw/<name>/``.
        subdir: the folder inside ``data/raw/<name>/`` that holds the data (MSD task folder).
        mirror_name: the dataset's folder in the offline mirror, upstream layout inside.
        checksums: the shipped per-file list, a file name under regflow/data/checksums/ (or an
            absolute path), paths relative to ``data/raw/<name>/<subdir>/``; or None.
        local_path: kind "local": the user's folder.
        local_splits: kind "local": the folders of each split, relative to ``local_path``
            (several per split allowed), or None for ``<local_path>/<split>``.
        conversion: the :mod:`regflow.data.conversions` function that turns the upstream tree
            into ``layout`` after fetching (None: it is in that layout already).
        conversion_options: that function's keyword arguments.
    """

    name: str
    kind: Kind
    layout: Layout
    pairing: Pairing
    description: str
    licence: str
    citation: str
    file_format: Literal["nifti", "h5"] = "nifti"
    label_names: list[str] | None = None
    simulated: bool = False
    needs_network: bool = False
    urls: tuple[str, ...] = ()
    sha256: tuple[str | None, ...] = ()
    files: tuple[str, ...] = ()
    subdir: str | None = None
    mirror_name: str | None = None
    checksums: str | None = None
    local_path: str | None = None
    local_splits: Mapping[str, tuple[str, ...]] | None = None
    conversion: str | None = None
    conversion_options: Mapping[str, Any] = field(default_factory=dict)


def pinned_checksums(entry: DatasetEntry) -> dict[str, str]:
    """The shipped per-file checksums of ``entry`` (``{path under subdir: sha256}``), or {}."""
    if entry.checksums is None:
        return {}
    return read_sums(CHECKSUM_DIR / entry.checksums)


def _deepreg_paired_prostate() -> DatasetEntry:
    sums = read_sums(CHECKSUM_DIR / "deepreg-paired-prostate.sha256")
    files = tuple(sorted(sums))
    return DatasetEntry(
        name="deepreg-paired-prostate",
        kind="files",
        layout="deepreg-paired",
        pairing="paired",
        description="SIMULATED paired MR->TRUS prostate volumes with 3 corresponding labels "
                    "(DeepReg's test data, 25 train + 2 test pairs): simulated, not clinical",
        licence="Apache-2.0",
        citation="Fu et al., DeepReg: a deep learning toolkit for medical image registration, "
                 "JOSS 5(55), 2648 (2020)",
        label_names=["gland", "region-1", "region-2"],
        simulated=True,
        urls=tuple(f"{DEEPREG_PAIRED_URL}/{rel}" for rel in files),
        sha256=tuple(sums[rel] for rel in files),
        files=files,
        mirror_name="deepreg_paired_prostate",
        checksums="deepreg-paired-prostate.sha256",
    )


LEARN2REG_2020 = ("Dalca, Hu, Vercauteren, Heinrich, Hansen, Modat et al., Learn2Reg - The "
                  "Challenge (2020), Zenodo, doi:10.5281/zenodo.3715652")
LEARN2REG_LUNG = ("Hering, Murphy and van Ginneken, Learn2Reg Challenge: CT Lung Registration - "
                  "Training Data (2020), Zenodo, doi:10.5281/zenodo.3835682")
LUNG_URL = "https://zenodo.org/record/3835682/files/training.zip"
LUNG_LICENCE = "CC BY 4.0 (Zenodo record 3835682; check upstream)"
YIPENG_EXAMPLE_DATA = "https://github.com/YipengHu/example-data"
NO_LICENCE_STATED = "no licence stated upstream (DeepReg demo data); check before reuse"
# DeepReg's demo reads these scans as insp -> fixed, exp -> moving and leaves case_020 out
# ("did not load correctly" upstream)
LUNG_EXCLUDE = ("case_020",)


def _network_entry(name: str, pairing: Pairing, url: str, mirror_name: str,
                   conversion: str, options: Mapping[str, Any], kind: Kind = "archive",
                   **details: Any) -> DatasetEntry:
    """A catalogue entry for DeepReg demo data that only the network has (no digest known
    offline): an archive (or one file, kind "files") converted into DeepReg's layout of its
    pairing by ``conversion``."""
    files = (url.rsplit("/", 1)[-1],) if kind == "files" else ()
    return DatasetEntry(name=name, kind=kind, layout=f"deepreg-{pairing}", pairing=pairing,
                        needs_network=True, urls=(url,), sha256=(None,), files=files,
                        mirror_name=mirror_name, conversion=conversion,
                        conversion_options=options, **details)


CATALOGUE: dict[str, DatasetEntry] = {entry.name: entry for entry in (
    DatasetEntry(
        name="msd-hippocampus",
        kind="archive",
        layout="msd",
        pairing="unpaired",
        description="MSD Task04 hippocampus: 260 labelled T1 MRI crops, 1 mm (Learn2Reg 2020 "
                    "Task 4); default",
        licence="CC BY-SA 4.0",
        citation="Antonelli et al., The Medical Segmentation Decathlon, Nature Communications 13, "
                 "4128 (2022); Simpson et al., arXiv:1902.09063 (2019)",
        label_names=["anterior", "posterior"],
        urls=("https://msd-for-monai.s3-us-west-2.amazonaws.com/Task04_Hippocampus.tar",),
        sha256=(None,),
        subdir="Task04_Hippocampus",
        mirror_name="Task04_Hippocampus",
        checksums="msd-hippocampus.sha256",
    ),
    _deepreg_paired_prostate(),
    _network_entry(
        "learn2reg-lung-ct", "paired", LUNG_URL, "learn2reg_lung_ct", "tagged_scans",
        {"images": "scans", "labels": "lungMasks", "sides": {"insp": "fixed_", "exp": "moving_"},
         "exclude": LUNG_EXCLUDE},
        description="Learn2Reg 2020 Task 2 lung CT, inspiration (fixed) and expiration "
                    "(moving) of each patient with lung masks (DeepReg paired_ct_lung demo)",
        licence=LUNG_LICENCE, citation=LEARN2REG_LUNG, label_names=["lung"],
    ),
    _network_entry(
        "learn2reg-lung-ct-unpaired", "unpaired", LUNG_URL, "learn2reg_lung_ct",
        "tagged_scans",
        {"images": "scans", "labels": "lungMasks", "sides": {"exp": ""},
         "exclude": LUNG_EXCLUDE},
        description="Learn2Reg 2020 Task 2 lung CT, the expiration scans only, registered "
                    "between patients (DeepReg unpaired_ct_lung demo)",
        licence=LUNG_LICENCE, citation=LEARN2REG_LUNG, label_names=["lung"],
    ),
    _network_entry(
        "learn2reg-abdomen-ct", "unpaired", f"{DEEPREG_DEMO_DATA}/abdct.zip", "deepreg_abdct",
        "subfolder", {"path": "dataset"},
        description="Learn2Reg 2020 Task 3 inter-patient abdominal CT, 13 organ labels "
                    "(DeepReg unpaired_ct_abdomen demo)",
        licence="Learn2Reg 2020 Task 3 terms (BTCV data, research use; check upstream)",
        citation=LEARN2REG_2020,
        label_names=["spleen", "right kidney", "left kidney", "gall bladder", "esophagus",
                     "liver", "stomach", "aorta", "inferior vena cava",
                     "portal and splenic vein", "pancreas", "left adrenal gland",
                     "right adrenal gland"],
    ),
    _network_entry(
        "myops-grouped-mr-heart", "grouped", f"{DEEPREG_DEMO_DATA}/myops.zip", "deepreg_myops",
        "grouped_by_prefix", {"separator": "_"},
        description="MyoPS 2020 multi-sequence cardiac MR, unlabelled, one group per subject "
                    "(DeepReg grouped_mr_heart demo)",
        licence="MyoPS 2020 challenge terms (research use; check upstream)",
        citation="Zhuang, Multivariate mixture model for myocardial segmentation combining "
                 "multi-source images, IEEE TPAMI 41(12), 2933-2946 (2019)",
    ),
    _network_entry(
        "deepreg-prostate-longitudinal-masks", "grouped",
        f"{YIPENG_EXAMPLE_DATA}/raw/master/longi-masks/data.zip", "deepreg_longi_masks",
        "h5_masks_as_images", {"sigma": 3.0}, file_format="h5",
        description="SIMULATED longitudinal prostate gland masks, one group per patient; images "
                    "are the masks smoothed (DeepReg grouped_mask_prostate_longitudinal demo)",
        licence=NO_LICENCE_STATED,
        citation="Fu et al., DeepReg, JOSS 5(55), 2648 (2020); the method: Morphological "
                 "change forecasting for prostate glands using feature-based registration and "
                 "kernel density extrapolation, arXiv:2101.06425",
        label_names=["gland"], simulated=True,
    ),
    _network_entry(
        "resect-paired-mrus-brain", "paired", "https://github.com/ucl-candi/dataset_resect/"
        "archive/master.zip", "dataset_resect", "subfolder", {"path": "paired_mr_us_brain"},
        description="RESECT brain MR (fixed) and intra-operative ultrasound (moving), "
                    "unlabelled, DeepReg's partial copy (DeepReg paired_mrus_brain demo)",
        licence="RESECT database terms (check upstream: archive.sigma2.no, "
                "doi:10.11582/2020.00025)",
        citation="Xiao et al., REtroSpective Evaluation of Cerebral Tumors (RESECT), Medical "
                 "Physics 44(7), 3875-3882 (2017)",
    ),
    _network_entry(
        "deepreg-mrus-prostate", "paired", f"{YIPENG_EXAMPLE_DATA}/archive/mrus.zip",
        "deepreg_mrus_prostate", "subfolder", {"path": "example-data-mrus"},
        description="SIMULATED paired MR (moving) -> TRUS (fixed) prostate images with "
                    "corresponding labels (the DeepReg paired_mrus_prostate demo's own archive)",
        licence=NO_LICENCE_STATED,
        citation="Hu et al., Weakly-supervised convolutional neural networks for multimodal "
                 "image registration, Medical Image Analysis (2018), "
                 "doi:10.1016/j.media.2018.07.002",
        simulated=True,
    ),
    _network_entry(
        "trus3d-prostate", "unpaired", "https://github.com/ucl-candi/dataset_trus3d/archive/"
        "master.zip", "dataset_trus3d", "h5_folds",
        {"splits": {"train": [f"fold{index}" for index in range(8)], "val": ["fold8"],
                    "test": ["fold9"]}}, file_format="h5",
        description="3-D transrectal ultrasound of the prostate in 10 folds (train 0-7, val 8, "
                    "test 9), unlabelled (DeepReg unpaired_us_prostate_cv demo)",
        licence="derived from TCIA Prostate-MRI-US-Biopsy; TCIA data usage policy (check "
                "upstream)",
        citation="Prostate-MRI-US-Biopsy collection, The Cancer Imaging Archive (cite as TCIA "
                 "asks); Fu et al., DeepReg, JOSS 5(55), 2648 (2020)",
    ),
    _network_entry(
        "promise12-demo-pair", "paired", f"{YIPENG_EXAMPLE_DATA}/raw/master/promise12/demo2.h5",
        "promise12_demo_pair", "h5_pair",
        {"roles": {"moving_image": "image0", "fixed_image": "image1", "moving_label": "label0",
                   "fixed_label": "label1"}}, kind="files",
        description="two prostate MR volumes of two patients with gland labels, one HDF5 file "
                    "(DeepReg classical_mr_prostate_nonrigid demo)",
        licence="PROMISE12 challenge data terms (check upstream)",
        citation="Litjens et al., Evaluation of prostate segmentation algorithms for MRI: the "
                 "PROMISE12 challenge, Medical Image Analysis 18(2), 359-373 (2014)",
        label_names=["gland"],
    ),
    _network_entry(
        "hnct-demo-volume", "paired", f"{YIPENG_EXAMPLE_DATA}/raw/master/hnct/demo.h5",
        "hnct_demo_volume", "h5_affine_pair",
        {"image": "image", "label": "label", "scale": 0.2, "seed": 0}, kind="files",
        description="one head-and-neck CT with two labels; the moving image is the same volume "
                    "under a random affine, made at fetch with a fixed seed (DeepReg "
                    "classical_ct_headandneck_affine demo)",
        licence="TCIA Head-Neck-PET-CT; TCIA data usage policy (check upstream)",
        citation="Vallieres et al., Radiomics strategies for risk assessment of tumour failure "
                 "in head-and-neck cancer, Scientific Reports 7, 10117 (2017)",
    ),
)}


def local_entry(name: str, local: LocalDataset) -> DatasetEntry:
    """A ``kind="local"`` entry for ``data.local[name]`` of params.yaml."""
    return DatasetEntry(
        name=name,
        kind="local",
        layout=f"deepreg-{local.pairing}",
        pairing=local.pairing,
        description=f"user dataset at {local.path} ({local.pairing}, {local.format})",
        licence="user-provided",
        citation="user-provided",
        file_format=local.format,
        label_names=local.label_names,
        local_path=local.path,
        local_splits=None if local.splits is None else {
            split: tuple(folders) for split, folders in local.splits.items()},
    )


def get_dataset(name: str, config: Config) -> DatasetEntry:
    """Look ``name`` up in ``config.data.local``, then in :data:`CATALOGUE`.

    Raises:
        ConfigError: unknown name (lists the known ones), or a local name that shadows the
            catalogue.
    """
    if name in config.data.local:
        if name in CATALOGUE:
            raise ConfigError(f"data.local.{name}: the catalogue already has a dataset of that "
                              "name; pick another")
        return local_entry(name, config.data.local[name])
    if name in CATALOGUE:
        return CATALOGUE[name]
    known = ", ".join([*CATALOGUE, *config.data.local])
    raise ConfigError(f"unknown dataset {name!r}; known: {known} (or add it under data.local)")


def describe_dataset(entry: DatasetEntry) -> str:
    """One line for ``regflow datasets``: name, licence, simulated/real, network, description."""
    nature = "simulated" if entry.simulated else "real"
    if entry.kind == "local":
        access = "local folder"
    else:
        access = "needs network" if entry.needs_network else "network or offline mirror"
    return f"{entry.name:<24} [{entry.licence}] [{nature}] [{access}] {entry.description}"


def _notice(message: str) -> None:
    tqdm.write(message, file=sys.stderr)


def _local_root(entry: DatasetEntry) -> Path:
    root = Path(entry.local_path or "")
    if not root.is_dir():
        raise DataError(f"data.local.{entry.name}: {root} is not a folder")
    return root


def _local_folders(entry: DatasetEntry) -> list[tuple[Path, str]]:
    """``(folder, where it goes under data/raw/<name>/)`` of a ``data.local`` entry: the folder
    itself, or each split folder to ``<split>/<folder name>`` (the case ids then start with the
    folder name, so that folders may reuse file names).

    Raises:
        DataError: a missing folder, or two folders of one split with the same name.
    """
    root = _local_root(entry)
    if entry.local_splits is None:
        return [(root, "")]
    placed = []
    for split, folders in entry.local_splits.items():
        names = [Path(folder).name for folder in folders]
        if len(set(names)) < len(names):
            raise DataError(f"data.local.{entry.name}.splits.{split}: the folders of one split "
                            f"need distinct names, got {list(folders)}")
        for folder, name in zip(folders, names, strict=True):
            if not (root / folder).is_dir():
                raise DataError(f"data.local.{entry.name}.splits.{split}: {root / folder} is "
                                "not a folder")
            placed.append((root / folder, f"{split}/{name}"))
    return placed


def local_files(entry: DatasetEntry) -> list[tuple[Path, str]]:
    """The files of a ``data.local`` dataset that its DeepReg layout uses: ``(file, its path
    under data/raw/<name>/)``, sorted by the latter.

    Every folder is read by :func:`regflow.data.layouts.discover_cases`, the same reader that
    preprocessing uses, so a folder that fetches also preprocesses; listed split folders land in
    ``<split>/<folder name>/``, which preprocessing reads as that split's parts.

    Raises:
        DataError: a folder is missing or not in the entry's layout (says what is missing).
    """
    from regflow.data.layouts import discover_cases

    files = {}
    for folder, target in _local_folders(entry):
        try:
            cases, _ = discover_cases(folder, entry.layout, entry.pairing, entry.file_format)
        except DataError as exc:
            raise DataError(f"data.local.{entry.name}: not in {entry.layout} layout: {exc}"
                            ) from None
        for ref in {ref.path for case in cases for ref in case.volumes.values()}:
            files[(Path(target) / ref.relative_to(folder)).as_posix()] = ref
    return [(files[rel], rel) for rel in sorted(files)]


def _local_fingerprint(entry: DatasetEntry) -> str:
    stats = [(rel, source.stat().st_size, source.stat().st_mtime_ns)
             for source, rel in local_files(entry)]
    return hashlib.sha256(json.dumps(stats).encode()).hexdigest()


def source_fingerprint(entry: DatasetEntry) -> str:
    """A digest that changes when what ``entry`` would fetch changes (URLs, pins, local files)."""
    if entry.kind == "local":
        return _local_fingerprint(entry)
    pinned = format_sums(pinned_checksums(entry))
    source = [list(entry.urls), list(entry.sha256), list(entry.files), pinned]
    if entry.conversion:  # only then, so that fetches made before conversions stay complete
        source.append([entry.conversion, entry.conversion_options])
    text = json.dumps(source)
    return hashlib.sha256(text.encode()).hexdigest()


def is_complete(target: Path, name: str, fingerprint: str) -> bool:
    """True when ``target`` holds a finished fetch of ``name`` with this ``fingerprint``.

    Cheap: reads the marker and ``SHA256SUMS`` and checks that every listed file exists; it does
    not re-hash the data (``cd target && sha256sum -c SHA256SUMS`` does).
    """
    try:
        marker = json.loads((target / MARKER_NAME).read_text(encoding="utf-8"))
        sums_path = target / SUMS_NAME
        if (marker.get("dataset"), marker.get("fingerprint")) != (name, fingerprint) or \
                sha256_file(sums_path) != marker.get("sums_sha256"):
            return False
        sums = parse_sums(sums_path.read_text(encoding="utf-8"), str(sums_path))
    except (OSError, ValueError, AttributeError, DataError):
        return False
    return all((target / rel).is_file() for rel in sums)


def _seal(folder: Path, name: str, fingerprint: str, source: str) -> None:
    """Write ``SHA256SUMS`` of every file and the completion marker into ``folder``."""
    sums_path = folder / SUMS_NAME
    write_text(sums_path, format_sums(hash_tree(folder, exclude=(SUMS_NAME, MARKER_NAME))))
    marker = {"dataset": name, "source": source, "fingerprint": fingerprint,
              "sums_sha256": sha256_file(sums_path), "regflow_version": __version__}
    write_text(folder / MARKER_NAME, json.dumps(marker, indent=1) + "\n")


def _from_mirror(entry: DatasetEntry, source: Path, staged: Path) -> None:
    """Copy ``source`` (the mirror's folder) into ``staged``, checking every byte."""
    listed = read_sums(source / SUMS_NAME)
    pinned = pinned_checksums(entry)
    for rel in sorted(set(pinned) & set(listed)):
        if listed[rel] != pinned[rel]:
            raise DataError(f"{source / rel}: the mirror's {SUMS_NAME} disagrees with regflow's "
                            f"pinned checksum (checksums/{entry.checksums})")
    missing = sorted(set(pinned) - set(listed))
    if missing:
        raise DataError(f"{source / SUMS_NAME}: does not list {missing[0]} "
                        f"({len(missing)} of {len(pinned)} pinned files absent)")
    copy_verified(source, staged / (entry.subdir or ""), listed, desc=f"{entry.name} (mirror)")


def _downloads(raw_dir: Path) -> Path:
    return raw_dir / DOWNLOADS_DIR


def _tidy_downloads(raw_dir: Path) -> None:
    """Remove the downloads folder and its per-dataset folders where they are empty."""
    folder = _downloads(raw_dir)
    if not folder.is_dir():
        return
    for child in folder.iterdir():
        if child.is_dir() and not any(child.iterdir()):
            child.rmdir()
    if not any(folder.iterdir()):
        folder.rmdir()


def _from_archive(entry: DatasetEntry, raw_dir: Path, staged: Path) -> None:
    """Download ``entry.urls[0]``, extract it safely into ``staged`` and verify the pinned files."""
    url, expected = entry.urls[0], entry.sha256[0]
    # one folder per dataset: two archives of one name (GitHub's master.zip) never share a part
    archive = _downloads(raw_dir) / entry.name / url.rsplit("/", 1)[-1]
    digest = download(url, archive, expected)
    if expected is None:
        _notice(f"{entry.name}: {archive.name} has sha256 {digest} (not pinned in the catalogue;"
                " the per-file checksums verify its contents)")
    try:
        safe_extract(archive, staged)
        root = staged / (entry.subdir or "")
        if entry.subdir and not root.is_dir():
            raise DataError(f"{url}: archive has no {entry.subdir}/ folder")
        verify_files(root, pinned_checksums(entry), desc=f"{entry.name} (verify)")
    except DataError:
        archive.unlink()
        raise
    archive.unlink()


def _from_files(entry: DatasetEntry, raw_dir: Path, staged: Path) -> None:
    """Download every file of ``entry`` (resuming, each verified), then move them to ``staged``."""
    folder = _downloads(raw_dir) / entry.name
    try:
        for url, expected, rel in zip(entry.urls, entry.sha256, entry.files, strict=True):
            if not (folder / rel).is_file():
                download(url, folder / rel, expected)
        verify_files(folder, pinned_checksums(entry), desc=f"{entry.name} (verify)")
    except DataError:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    for rel in entry.files:
        (staged / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.move(folder / rel, staged / rel)
    shutil.rmtree(folder)


def _from_local(entry: DatasetEntry, staged: Path) -> None:
    """Copy the files of the user's folders that their layout uses (contents only, no modes)."""
    for source, rel in tqdm(local_files(entry), desc=f"{entry.name} (copy)", unit="file"):
        (staged / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, staged / rel)


def _convert(entry: DatasetEntry, staged: Path) -> None:
    """Run the entry's layout conversion in ``staged`` and check the result reads as its layout.

    Raises:
        DataError: the upstream tree does not fit the conversion, or the converted folder is not
            in the entry's layout (one line naming the dataset and the problem).
    """
    from regflow.data.layouts import discover_cases

    if entry.conversion is None:
        return
    try:
        convert(staged, entry.conversion, entry.conversion_options)
        discover_cases(staged, entry.layout, entry.pairing, entry.file_format)
    except DataError as exc:
        raise DataError(f"{entry.name}: not in the upstream layout the {entry.conversion} "
                        f"conversion expects: {exc}") from None


def _plan(entry: DatasetEntry, raw_dir: Path, mirror: str | None
          ) -> tuple[str, Callable[[Path], None]]:
    """Choose the source: local folder, mirror folder, or the network."""
    if entry.kind == "local":
        return f"local:{entry.local_path}", lambda staged: _from_local(entry, staged)
    if mirror and entry.mirror_name:
        source = Path(mirror) / entry.mirror_name
        if source.is_dir():
            return f"mirror:{entry.mirror_name}", lambda staged: _from_mirror(entry, source, staged)
        _notice(f"{entry.name}: mirror {mirror} has no {entry.mirror_name}/; using the network")
    if not entry.urls:
        raise RegflowError(f"{entry.name}: not in the mirror and no download URL is known")
    if entry.kind == "files":
        source = os.path.commonprefix(list(entry.urls))
        return source, lambda staged: _from_files(entry, raw_dir, staged)
    return entry.urls[0], lambda staged: _from_archive(entry, raw_dir, staged)


def fetch_entry(entry: DatasetEntry, raw_dir: str | Path, mirror: str | None = None) -> Path:
    """Fetch ``entry`` into ``raw_dir/<entry.name>`` (see :func:`fetch_dataset`)."""
    raw_dir = Path(raw_dir)
    target = raw_dir / entry.name
    fingerprint = source_fingerprint(entry)
    if is_complete(target, entry.name, fingerprint):
        return target
    raw_dir.mkdir(parents=True, exist_ok=True)
    source, build = _plan(entry, raw_dir, mirror)
    try:
        with atomic_directory(target) as staged:  # replaces an earlier incomplete copy whole
            build(staged)
            _convert(entry, staged)
            _seal(staged, entry.name, fingerprint, source)
    finally:
        _tidy_downloads(raw_dir)
    return target


def fetch_dataset(name: str, config: Config, mirror: str | None = None) -> Path:
    """Fetch dataset ``name`` into ``Path(config.data.raw_dir) / name``, verified.

    Sources, in order: a ``data.local`` folder (layout checked, copied); ``<mirror>/<mirror_name>/``
    when ``mirror`` is given and holds it (every file checked against the mirror's ``SHA256SUMS``
    and regflow's pinned list); else the upstream URLs (resumable download, safe extraction,
    per-file verification). A target that already holds a finished fetch is returned as is.

    Args:
        name: catalogue name or a ``data.local`` name.
        config: the loaded params.yaml (``data.raw_dir``, ``data.local``).
        mirror: folder of an offline mirror (``$REGFLOW_DATA_MIRROR``), or None.

    Returns:
        The dataset folder, holding ``SHA256SUMS`` of every file.

    Raises:
        ConfigError: unknown dataset name.
        DataError: a checksum mismatch or missing file (names it), a bad archive member, or a
            local folder not in DeepReg layout; nothing is left at the target.
        RegflowError: the network is needed and unreachable.
    """
    return fetch_entry(get_dataset(name, config), config.data.raw_dir, mirror)
