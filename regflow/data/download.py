"""HTTP(S) download with resume and SHA-256 verification (standard library ``urllib`` only).

Bytes go to ``<file>.part``; an interrupted download is resumed with an HTTP ``Range`` request on
the next call, and the file is renamed into place only once its checksum matches.
"""

from __future__ import annotations

import http.client
import os
import re
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from regflow import __version__
from regflow.data.integrity import CHUNK_BYTES, mismatch_error, sha256_file
from regflow.errors import RegflowError

TIMEOUT_S = 60.0
OFFLINE_HINT = "no network? set REGFLOW_DATA_MIRROR to an offline mirror"
NETWORK_ERRORS = (urllib.error.URLError, ConnectionError, TimeoutError, http.client.HTTPException)
_CONTENT_RANGE = re.compile(r"bytes (\d+)-\d+/(\d+|\*)")


def part_path(path: Path) -> Path:
    """Where the bytes of an unfinished download of ``path`` are kept."""
    return path.with_name(path.name + ".part")


def _open(url: str, offset: int, timeout: float) -> http.client.HTTPResponse:
    headers = {"User-Agent": f"regflow/{__version__}"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)


def _resume_offset(response: http.client.HTTPResponse, offset: int) -> int:
    """Bytes of the ``.part`` file to keep: ``offset`` on a matching 206 answer, else 0."""
    if response.status != 206:
        return 0
    match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
    return offset if match and int(match.group(1)) == offset else 0


def _stream(url: str, part: Path, timeout: float) -> None:
    """Append the rest of ``url`` to ``part`` (start over when the server ignores Range)."""
    offset = part.stat().st_size if part.exists() else 0
    try:
        response = _open(url, offset, timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:  # the .part already holds every byte
            return
        raise
    with response:
        keep = _resume_offset(response, offset)
        length = response.headers.get("Content-Length")
        total = keep + int(length) if length and length.isdigit() else None
        with open(part, "ab" if keep else "wb") as writer, tqdm(
            total=total, initial=keep, unit="B", unit_scale=True, unit_divisor=1024,
            desc=part.name.removesuffix(".part"),
        ) as progress:
            while chunk := response.read(CHUNK_BYTES):
                writer.write(chunk)
                progress.update(len(chunk))
    # http.client returns a short body without complaint when the connection drops early.
    if total is not None and part.stat().st_size < total:
        raise ConnectionError(f"connection closed after {part.stat().st_size} of {total} bytes")


def download(url: str, path: str | Path, sha256: str | None = None,
             timeout: float = TIMEOUT_S) -> str:
    """Download ``url`` to ``path``, resuming a partial ``path.part`` and verifying its SHA-256.

    Args:
        url: an ``http(s)://`` (or ``file://``) address.
        path: the final file; its folder is created.
        sha256: expected lower-case hex digest; ``None`` accepts any bytes (the digest is returned
            so that the caller can report it for pinning).
        timeout: seconds to wait for the server on each read.

    Returns:
        The file's hex SHA-256.

    Raises:
        DataError: the downloaded bytes do not match ``sha256`` (the ``.part`` file is removed).
        RegflowError: the server cannot be reached or answers with an HTTP error (the ``.part``
            file is kept so that the next call resumes).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    part = part_path(path)
    try:
        _stream(url, part, timeout)
    except urllib.error.HTTPError as exc:
        raise RegflowError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except NETWORK_ERRORS as exc:
        reason = getattr(exc, "reason", exc)
        raise RegflowError(f"cannot download {url}: {reason} ({OFFLINE_HINT})") from None
    actual = sha256_file(part)
    if sha256 is not None and actual != sha256:
        part.unlink()
        raise mismatch_error(url, sha256, actual)
    # Not fileio.atomic_path: the .part file has a fixed name so that the next call resumes
    # it (HTTP Range), and it is only renamed into place once its sha256 is verified.
    os.replace(part, path)
    return actual
