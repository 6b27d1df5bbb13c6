"""SHA-256 checksum lists (``sha256sum`` format) and copying files with verification.

A checksum list maps a POSIX path relative to a dataset folder to its lower-case hex SHA-256, one
``<hash>  <path>`` line per file, exactly as ``sha256sum`` writes and ``sha256sum -c`` reads it.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from pathlib import Path

from tqdm import tqdm

from regflow.errors import DataError

SUMS_NAME = "SHA256SUMS"
CHUNK_BYTES = 1 << 20
_LINE = re.compile(r"^([0-9a-fA-F]{64}) [ *](.+)$")


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def normalise_relpath(text: str) -> str:
    """``./a//b`` -> ``a/b``; the form every checksum list in regflow uses."""
    return "/".join(part for part in text.strip().split("/") if part not in ("", "."))


def parse_sums(text: str, source: str) -> dict[str, str]:
    """Parse ``sha256sum`` output into ``{relative path: hex digest}``.

    Args:
        text: the list's contents; blank lines and ``#`` comments are ignored.
        source: the list's name, for error messages.

    Raises:
        DataError: a malformed line, naming the source and line number.
    """
    sums: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = _LINE.match(line.rstrip("\r\n"))
        if match is None:
            raise DataError(f"{source}:{number}: not a '<sha256>  <path>' checksum line")
        sums[normalise_relpath(match.group(2))] = match.group(1).lower()
    return sums


def read_sums(path: str | Path) -> dict[str, str]:
    """Read a ``SHA256SUMS``-style file (see :func:`parse_sums`).

    Raises:
        DataError: the file is missing or malformed.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: checksum list missing")
    return parse_sums(path.read_text(encoding="utf-8"), str(path))


def format_sums(sums: dict[str, str]) -> str:
    """``{path: digest}`` -> ``sha256sum`` text, sorted by path."""
    return "".join(f"{digest}  {rel}\n" for rel, digest in sorted(sums.items()))


def mismatch_error(name: str | Path, expected: str, actual: str) -> DataError:
    """The one-line error every checksum mismatch raises."""
    return DataError(f"{name}: sha256 mismatch (expected {expected[:16]}..., got {actual[:16]}...)")


def copy_verified(source_root: Path, target_root: Path, sums: dict[str, str],
                  desc: str = "copy") -> None:
    """Copy every file listed in ``sums`` and check the bytes written against their digest.

    Hashing happens while copying, so the check covers exactly the bytes that land in the target.

    Args:
        source_root: folder the relative paths start from.
        target_root: folder to copy into (subfolders are created).
        sums: ``{relative path: expected hex sha256}``.
        desc: progress-bar label.

    Raises:
        DataError: a listed file is missing, or its bytes do not match (names the source file).
    """
    for rel in tqdm(sorted(sums), desc=desc, unit="file"):
        source, target = source_root / rel, target_root / rel
        if not source.is_file():
            raise DataError(f"{source}: listed in the checksums but missing")
        target.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        with open(source, "rb") as reader, open(target, "wb") as writer:
            for chunk in iter(lambda: reader.read(CHUNK_BYTES), b""):
                digest.update(chunk)
                writer.write(chunk)
        if digest.hexdigest() != sums[rel]:
            raise mismatch_error(source, sums[rel], digest.hexdigest())


def verify_files(root: Path, sums: dict[str, str], desc: str = "verify") -> None:
    """Check every file in ``sums`` exists under ``root`` with the listed digest.

    Raises:
        DataError: naming the first missing or mismatching file.
    """
    for rel in tqdm(sorted(sums), desc=desc, unit="file"):
        path = root / rel
        if not path.is_file():
            raise DataError(f"{path}: missing (listed in the checksums)")
        actual = sha256_file(path)
        if actual != sums[rel]:
            raise mismatch_error(path, sums[rel], actual)


def list_files(root: Path, exclude: Iterable[str] = ()) -> list[str]:
    """Relative POSIX paths of every regular file under ``root``, sorted, minus ``exclude``."""
    skipped = set(exclude)
    found = (path.relative_to(root).as_posix() for path in root.rglob("*") if path.is_file())
    return sorted(rel for rel in found if rel not in skipped)


def hash_tree(root: Path, exclude: Iterable[str] = ()) -> dict[str, str]:
    """``{relative path: sha256}`` of every regular file under ``root`` except ``exclude``."""
    return {rel: sha256_file(root / rel) for rel in list_files(root, exclude)}
