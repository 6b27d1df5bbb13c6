"""``fetch``: download or mirror-copy a catalogue entry, verify it, and install it into data/raw/.

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
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from regflow import __version__
from regflow.config import Config
from regflow.data.archive import safe_extract
from regflow.data.catalogue import DatasetEntry, get_dataset, pinned_checksums
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
from regflow.errors import DataError, RegflowError
from regflow.fileio import atomic_directory, write_text

MARKER_NAME = ".regflow-complete.json"
DOWNLOADS_DIR = ".downloads"


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
