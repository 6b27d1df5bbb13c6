"""Downloads over real HTTP (a local server with Range support) and the network path of fetch."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import re
import socket
import tarfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from regflow.data.catalogue import CATALOGUE
from regflow.data.download import download, part_path
from regflow.data.fetch import MARKER_NAME, fetch_entry
from regflow.data.integrity import SUMS_NAME, read_sums
from regflow.errors import DataError, RegflowError

MIB = 1 << 20


class FileServer(ThreadingHTTPServer):
    """Serves ``files`` (path -> bytes); records each request's path and Range header."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), RangeHandler)
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str | None]] = []
        self.honour_ranges = True
        self.cut_after: dict[str, int] = {}  # path -> bytes sent before the connection drops

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"


class RangeHandler(BaseHTTPRequestHandler):
    """GET with single ``bytes=N-`` ranges (206/416), 404 for unknown paths."""

    server: FileServer

    def do_GET(self) -> None:
        body = self.server.files.get(self.path)
        wanted = self.headers.get("Range")
        self.server.requests.append((self.path, wanted))
        if body is None:
            self.send_error(404)
            return
        start = int(re.fullmatch(r"bytes=(\d+)-", wanted).group(1)) if (
            wanted and self.server.honour_ranges) else 0
        if start >= len(body) > 0:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(body)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if wanted and self.server.honour_ranges:
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        payload = body[start:]
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        cut = self.server.cut_after.pop(self.path, None)
        self.wfile.write(payload if cut is None else payload[:cut])
        self.close_connection = cut is not None

    def log_message(self, *args: object) -> None:
        """Keep test output quiet."""


@pytest.fixture
def server() -> Iterator[FileServer]:
    """A real HTTP server on 127.0.0.1 in a background thread."""
    httpd = FileServer()
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def blob() -> bytes:
    """3 MiB of non-repeating bytes (several read chunks)."""
    return b"".join(hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(3 * MIB // 32))


def _closed_port_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/training.zip"


def test_download_verifies_and_renames(server, blob, tmp_path):
    server.files["/blob.bin"] = blob
    path = tmp_path / "dl" / "blob.bin"
    digest = download(server.url("/blob.bin"), path, hashlib.sha256(blob).hexdigest())
    assert path.read_bytes() == blob and digest == hashlib.sha256(blob).hexdigest()
    assert not part_path(path).exists()
    assert server.requests == [("/blob.bin", None)]


def test_interrupted_download_keeps_part_and_resumes_with_range(server, blob, tmp_path):
    server.files["/blob.bin"] = blob
    server.cut_after["/blob.bin"] = MIB + MIB // 2
    path = tmp_path / "blob.bin"
    with pytest.raises(RegflowError, match=r"cannot download http://127\.0\.0\.1:\d+/blob\.bin"):
        download(server.url("/blob.bin"), path, hashlib.sha256(blob).hexdigest())
    cut = MIB + MIB // 2
    assert part_path(path).stat().st_size == cut and not path.exists()

    download(server.url("/blob.bin"), path, hashlib.sha256(blob).hexdigest())
    assert path.read_bytes() == blob
    assert server.requests[-1] == ("/blob.bin", f"bytes={cut}-")


def test_resume_from_an_existing_part_file(server, blob, tmp_path):
    server.files["/blob.bin"] = blob
    path = tmp_path / "blob.bin"
    part_path(path).write_bytes(blob[:12345])
    download(server.url("/blob.bin"), path, hashlib.sha256(blob).hexdigest())
    assert path.read_bytes() == blob
    assert server.requests == [("/blob.bin", "bytes=12345-")]


def test_server_ignoring_range_restarts_from_zero(server, blob, tmp_path):
    server.files["/blob.bin"] = blob
    server.honour_ranges = False
    path = tmp_path / "blob.bin"
    part_path(path).write_bytes(b"stale bytes that must not stay in front")
    download(server.url("/blob.bin"), path, hashlib.sha256(blob).hexdigest())
    assert path.read_bytes() == blob


def test_complete_part_file_gets_416_and_is_accepted(server, blob, tmp_path):
    server.files["/blob.bin"] = blob
    path = tmp_path / "blob.bin"
    part_path(path).write_bytes(blob)
    download(server.url("/blob.bin"), path, hashlib.sha256(blob).hexdigest())
    assert path.read_bytes() == blob and server.requests == [("/blob.bin", f"bytes={len(blob)}-")]


def test_checksum_mismatch_removes_the_part_file(server, blob, tmp_path):
    server.files["/blob.bin"] = blob
    path = tmp_path / "blob.bin"
    with pytest.raises(DataError, match=r"/blob\.bin: sha256 mismatch \(expected 0000000000000000"):
        download(server.url("/blob.bin"), path, "0" * 64)
    assert list(tmp_path.iterdir()) == []


def test_http_error_and_unreachable_server_are_one_line_errors(server, tmp_path):
    with pytest.raises(RegflowError, match=r"/missing\.tar: HTTP 404"):
        download(server.url("/missing.tar"), tmp_path / "missing.tar")
    with pytest.raises(RegflowError, match=r"REGFLOW_DATA_MIRROR") as error:
        download(_closed_port_url(), tmp_path / "training.zip")
    assert "\n" not in str(error.value)


def _tar_of(folder: Path, arcname: str, flip: str | None = None) -> bytes:
    """A tar of ``folder`` under ``arcname`` (+ an AppleDouble file); ``flip``: corrupt one file."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        tar.add(folder, arcname=arcname, filter=lambda info: None if info.name.endswith(
            SUMS_NAME) else info)
        for name, data in ((f"{arcname}/imagesTr/._hippocampus_001.nii.gz", b"mac"),
                           *(((f"{arcname}/{flip}", b"corrupted"),) if flip else ())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_fetch_msd_archive_over_http(server, mirror, tmp_path):
    server.files["/Task04_Hippocampus.tar"] = _tar_of(mirror / "Task04_Hippocampus",
                                                      "Task04_Hippocampus")
    entry = dataclasses.replace(CATALOGUE["msd-hippocampus"],
                                urls=(server.url("/Task04_Hippocampus.tar"),))
    target = fetch_entry(entry, tmp_path / "raw")

    task = target / "Task04_Hippocampus"
    assert len(list(task.glob("imagesTr/*.nii.gz"))) == 260
    assert len(list(task.glob("labelsTr/*.nii.gz"))) == 260
    assert not (task / "imagesTr/._hippocampus_001.nii.gz").exists()
    assert len(read_sums(target / SUMS_NAME)) == 521  # 520 volumes + dataset.json
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == ["msd-hippocampus"]


def test_fetch_archive_with_a_corrupt_member_leaves_nothing(server, mirror, tmp_path):
    bad = "labelsTr/hippocampus_007.nii.gz"
    server.files["/Task04_Hippocampus.tar"] = _tar_of(mirror / "Task04_Hippocampus",
                                                      "Task04_Hippocampus", flip=bad)
    entry = dataclasses.replace(CATALOGUE["msd-hippocampus"],
                                urls=(server.url("/Task04_Hippocampus.tar"),))
    with pytest.raises(DataError, match=re.escape(bad) + ": sha256 mismatch"):
        fetch_entry(entry, tmp_path / "raw")
    assert list((tmp_path / "raw").iterdir()) == []


def test_fetch_prostate_files_over_http(server, mirror, tmp_path):
    entry = CATALOGUE["deepreg-paired-prostate"]
    for rel in entry.files:
        server.files[f"/paired/{rel}"] = (mirror / "deepreg_paired_prostate" / rel).read_bytes()
    local = dataclasses.replace(entry, urls=tuple(server.url(f"/paired/{rel}")
                                                  for rel in entry.files))
    target = fetch_entry(local, tmp_path / "raw")

    assert len(list(target.glob("train/fixed_images/*.nii.gz"))) == 25
    assert len(list(target.glob("test/moving_labels/*.nii.gz"))) == 2
    assert (target / MARKER_NAME).is_file()
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == ["deepreg-paired-prostate"]


def test_fetch_files_with_a_wrong_file_leaves_nothing(server, mirror, tmp_path):
    entry = CATALOGUE["deepreg-paired-prostate"]
    for rel in entry.files:
        server.files[f"/paired/{rel}"] = (mirror / "deepreg_paired_prostate" / rel).read_bytes()
    server.files["/paired/train/moving_images/case000003.nii.gz"] += b"\0"
    local = dataclasses.replace(entry, urls=tuple(server.url(f"/paired/{rel}")
                                                  for rel in entry.files))
    with pytest.raises(DataError, match=r"moving_images/case000003\.nii\.gz: sha256 mismatch"):
        fetch_entry(local, tmp_path / "raw")
    assert list((tmp_path / "raw").iterdir()) == []


def test_network_only_dataset_without_network_is_a_clear_error(tmp_path):
    entry = dataclasses.replace(CATALOGUE["learn2reg-lung-ct"], urls=(_closed_port_url(),))
    assert entry.needs_network
    with pytest.raises(RegflowError, match=r"^cannot download http://127\.0\.0\.1:\d+/training"):
        fetch_entry(entry, tmp_path / "raw", mirror=str(tmp_path / "empty-mirror"))
    assert not (tmp_path / "raw" / "learn2reg-lung-ct").exists()
