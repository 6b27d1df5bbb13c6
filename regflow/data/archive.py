"""Safe extraction of tar and zip archives.

Every member is checked before anything is written: absolute paths, ``..`` components, links
that point outside the destination, and device/FIFO members are refused, so a hostile archive
writes nothing at all. macOS metadata (``__MACOSX/``, ``._*`` files) is skipped: it would
otherwise look like extra images next to the real ones.
"""

from __future__ import annotations

import posixpath
import stat
import tarfile
import zipfile
from pathlib import Path, PurePosixPath

from regflow.errors import DataError


def member_path(name: str, archive: Path) -> str:
    """Check one member name and return it normalised (``./a/b`` -> ``a/b``).

    Raises:
        DataError: the name is absolute, has a drive letter or a ``..`` component.
    """
    posix = name.replace("\\", "/")
    if posix.startswith("/") or (len(posix) > 1 and posix[1] == ":"):
        raise DataError(f"{archive}: refusing member {name!r} with an absolute path")
    parts = [part for part in posix.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise DataError(f"{archive}: refusing member {name!r} with a '..' component")
    return "/".join(parts)


def is_macos_metadata(rel: str) -> bool:
    """True for ``__MACOSX/...`` and AppleDouble ``._name`` files."""
    path = PurePosixPath(rel)
    return path.parts[:1] == ("__MACOSX",) or path.name.startswith("._")


def _check_link(member: tarfile.TarInfo, rel: str, archive: Path) -> None:
    """Refuse a symlink or hardlink whose target leaves the destination folder."""
    target = member.linkname.replace("\\", "/")
    base = posixpath.dirname(rel) if member.issym() else ""
    resolved = posixpath.normpath(posixpath.join(base, target))
    if target.startswith("/") or resolved == ".." or resolved.startswith("../"):
        kind = "symlink" if member.issym() else "hardlink"
        raise DataError(f"{archive}: refusing {kind} {member.name!r} -> {member.linkname!r}, "
                        "which points outside the destination")


def _checked_tar_members(tar: tarfile.TarFile, archive: Path) -> list[tarfile.TarInfo]:
    kept = []
    for member in tar.getmembers():
        rel = member_path(member.name, archive)
        if not rel or is_macos_metadata(rel):
            continue
        if member.issym() or member.islnk():
            _check_link(member, rel, archive)
        elif not (member.isfile() or member.isdir()):
            raise DataError(f"{archive}: refusing member {member.name!r}: not a file, folder or "
                            "link (device, FIFO or other special file)")
        kept.append(member)
    return kept


def _extract_tar(archive: Path, destination: Path) -> list[str]:
    try:
        with tarfile.open(archive) as tar:
            members = _checked_tar_members(tar, archive)
            # The "data" filter re-checks links against the real filesystem while extracting.
            options = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(destination, members=members, **options)
    except (tarfile.TarError, EOFError) as exc:
        raise DataError(f"{archive}: not a readable tar archive ({exc})") from None
    return sorted(member_path(m.name, archive) for m in members if m.isfile())


def _extract_zip(archive: Path, destination: Path) -> list[str]:
    try:
        with zipfile.ZipFile(archive) as bundle:
            members = []
            for info in bundle.infolist():
                rel = member_path(info.filename, archive)
                if not rel or is_macos_metadata(rel) or info.is_dir():
                    continue
                if stat.S_ISLNK(info.external_attr >> 16):
                    raise DataError(f"{archive}: refusing symlink member {info.filename!r}")
                members.append((info, rel))
            for info, rel in members:
                target = destination / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                with bundle.open(info) as reader, open(target, "wb") as writer:
                    while chunk := reader.read(1 << 20):
                        writer.write(chunk)
    except (zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{archive}: not a readable zip archive ({exc})") from None
    return sorted(rel for _, rel in members)


def safe_extract(archive: str | Path, destination: str | Path) -> list[str]:
    """Extract a ``.tar``/``.tar.gz``/``.tgz``/``.zip`` archive into ``destination``.

    Args:
        archive: the archive file; its type is read from its contents, not its name.
        destination: an existing folder; nothing is written outside it.

    Returns:
        The relative POSIX paths of the regular files extracted, sorted.

    Raises:
        DataError: an unreadable archive, or a member that is refused (one line naming the archive
            and the member); in that case nothing has been extracted.
    """
    archive, destination = Path(archive), Path(destination)
    if zipfile.is_zipfile(archive):
        return _extract_zip(archive, destination)
    return _extract_tar(archive, destination)
