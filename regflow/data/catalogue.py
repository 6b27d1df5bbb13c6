"""The dataset catalogue: every dataset regflow can fetch, where it comes from, its layout, terms.

A name of ``data.dataset`` is looked up in params.yaml's ``data.local`` (the user's folders), then
in :data:`CATALOGUE`; :mod:`regflow.data.fetch` installs what an entry describes into data/raw/.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from regflow.config import Config, LocalDataset
from regflow.data.integrity import read_sums
from regflow.errors import ConfigError

Kind = Literal["archive", "files", "local"]
Layout = Literal["msd", "deepreg-paired", "deepreg-unpaired", "deepreg-grouped"]
Pairing = Literal["paired", "unpaired", "grouped"]

CHECKSUM_DIR = Path(__file__).parent / "checksums"
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
