"""The one way regflow writes a file or a folder: into a uniquely named temporary sibling, then an
atomic rename, so that a reader, DVC or MLflow never sees a half-written output and concurrent
writers of the same path never collide (the last rename wins, whole)."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any

from regflow.errors import RegflowError

TEMPORARY_SUFFIX = ".tmp"
# ".<name>.pid<writer's process id>.<random>.tmp": the process id tells a live writer's temporary
# (another run writing beside this one) from one a killed writer left behind
_WRITER_PID = re.compile(r"\.pid(\d+)\.[^.]+\.tmp$")


def temporary_sibling(path: Path, directory: bool = False) -> Path:
    """A new, uniquely named file (or folder) next to ``path``, hidden, ending in ``.tmp``.

    The name carries the writing process's id, so that :func:`remove_stale_temporaries` leaves
    the temporaries of running writers alone.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix, suffix = f".{path.name}.pid{os.getpid()}.", TEMPORARY_SUFFIX
    if directory:
        folder = tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=path.parent)
        os.chmod(folder, 0o777 & ~_current_umask())  # mkdtemp's 0700 would become the output's
        return Path(folder)
    handle, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=path.parent)
    os.close(handle)
    os.chmod(name, 0o666 & ~_current_umask())  # mkstemp makes 0600; outputs get the usual mode
    return Path(name)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s content to; rename it into place on success.

    The temporary file is removed when the block raises, and ``path`` keeps its old content.
    Writers that take a file name (``torch.save``, ``nibabel.save``, ``figure.savefig``) write to
    the yielded path; its suffix is ``.tmp``, so pass the format explicitly where a writer guesses
    it from the name.
    """
    path = Path(path)
    temporary = temporary_sibling(path)
    try:
        yield temporary
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_open(path: str | Path, mode: str = "w", **kwargs: Any) -> Iterator[IO[Any]]:
    """``open(path, mode)`` whose content appears at ``path`` only when the block completes."""
    with atomic_path(path) as temporary, open(temporary, mode, **kwargs) as handle:
        yield handle


def write_bytes(path: str | Path, payload: bytes) -> Path:
    """Write bytes atomically; returns ``path``."""
    with atomic_open(path, "wb") as handle:
        handle.write(payload)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    """Write text (UTF-8) atomically; returns ``path``."""
    return write_bytes(path, text.encode())


def write_json(path: str | Path, payload: Any) -> Path:
    """Write indented, key-sorted JSON atomically; returns ``path``."""
    return write_text(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def write_csv(path: str | Path, rows: Sequence[dict[str, Any]],
              columns: Sequence[str] | None = None) -> Path:
    """Write dict rows as CSV atomically; returns ``path``.

    Args:
        path: the CSV file.
        rows: one dict per row; missing keys are written as empty cells.
        columns: column order; default the union of the rows' keys in first-seen order.
    """
    if columns is None:
        columns = []
        for row in rows:
            columns.extend(key for key in row if key not in columns)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return write_text(path, buffer.getvalue())


@contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield an empty staging folder; on success it replaces ``path`` whole (old content removed).

    A failure (or a kill) leaves ``path`` as it was; the staging folder is removed on failure and,
    after a kill, is a hidden ``.<name>.*.tmp`` sibling that :func:`remove_stale_temporaries`
    clears.
    """
    path = Path(path)
    staging = temporary_sibling(path, directory=True)
    try:
        yield staging
        retired = None
        if path.exists() or path.is_symlink():  # a link (even a dangling one) is replaced too
            retired = temporary_sibling(path, directory=True)
            retired.rmdir()
            os.replace(path, retired)
        os.replace(staging, path)
        if retired is not None and retired.is_dir() and not retired.is_symlink():
            shutil.rmtree(retired, ignore_errors=True)
        elif retired is not None:
            retired.unlink()
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the hidden ``.*.tmp`` files and folders that killed writers left in ``folder``.

    A temporary whose writer process (named in it) still runs on this machine is kept: two
    evaluations or trainings writing into one folder must not delete each other's staging.
    """
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for stale in folder.glob(f".*{TEMPORARY_SUFFIX}"):
        if _writer_is_running(stale):
            continue
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
        removed.append(stale)
    return removed


def _writer_is_running(temporary: Path) -> bool:
    """Whether the process named in a temporary's name (this one included) is alive."""
    match = _WRITER_PID.search(temporary.name)
    if match is None:
        return False
    pid = int(match.group(1))
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    return True


def check_writable_dir(path: str | Path) -> Path:
    """Make sure files can be written into the folder ``path`` before any work starts.

    The folder is created when missing; writability is probed with a one-byte hidden temporary
    file that is removed again, so a full disk (ENOSPC), a read-only or forbidden location (EROFS,
    EACCES) or a file in the way fails here, in one line, rather than after a long computation.
    When the check fails, the folders it created are removed again.

    Raises:
        RegflowError: ``path`` or a folder above it is a file, or ``path`` cannot be created or
            written to.
    """
    path = Path(path)
    lineage = [path, *path.parents]
    missing = [folder for folder in lineage if not folder.exists()]  # deepest first
    existing = next((folder for folder in lineage if folder.exists()), None)
    if existing is not None and not existing.is_dir():
        raise RegflowError(f"{existing}: exists and is not a folder")
    action = "create the folder"
    try:
        path.mkdir(parents=True, exist_ok=True)
        action = "write into the folder"
        handle, name = tempfile.mkstemp(prefix=".write-probe.", suffix=TEMPORARY_SUFFIX,
                                        dir=path)
        try:
            os.write(handle, b"\0")
        finally:
            os.close(handle)
            os.unlink(name)
    except OSError as exc:
        for folder in missing:
            with suppress(OSError):
                folder.rmdir()
        raise RegflowError(f"{path}: cannot {action} ({exc.strerror})") from None
    return path


def check_writable_file(path: str | Path, suffixes: Sequence[str] = ()) -> Path:
    """Make sure the file ``path`` can be written (atomically, beside it) before any work starts.

    Args:
        path: the output file; it may exist (it will be replaced) but must be a regular file.
        suffixes: allowed endings of its name, e.g. ``(".nii.gz", ".nii")``; empty allows any.

    Raises:
        RegflowError: wrong suffix, a folder or device in the way, or an unwritable folder
            (see :func:`check_writable_dir`).
    """
    path = Path(path)
    if suffixes and not path.name.endswith(tuple(suffixes)):
        raise RegflowError(f"{path}: the file name must end in {' or '.join(suffixes)}")
    if path.exists() and not path.is_file():
        raise RegflowError(f"{path}: exists and is not a regular file")
    try:
        check_writable_dir(path.parent)
    except RegflowError as exc:
        raise RegflowError(f"{path}: {exc}") from None
    return path
