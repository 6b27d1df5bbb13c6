"""Safe extraction: hostile tar/zip members are refused before anything is written."""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

import pytest

from regflow.data.archive import member_path, safe_extract
from regflow.errors import DataError


def _add_file(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _add_link(tar: tarfile.TarFile, name: str, target: str, kind: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    tar.addfile(info)


def _tar(path: Path, build, mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode) as tar:
        build(tar)
    return path


@pytest.fixture
def sandbox(tmp_path: Path) -> tuple[Path, Path]:
    """(destination folder, its parent): nothing may appear in the parent but ``dest``."""
    parent = tmp_path / "sandbox"
    destination = parent / "dest"
    destination.mkdir(parents=True)
    return destination, parent


def _everything(parent: Path) -> list[str]:
    return sorted(p.relative_to(parent).as_posix() for p in parent.rglob("*"))


def test_good_tar_extracts_files_and_skips_macos_metadata(tmp_path, sandbox):
    destination, parent = sandbox

    def build(tar):
        _add_file(tar, "./Task/imagesTr/a.nii.gz", b"image-a")
        _add_file(tar, "Task/labelsTr/a.nii.gz", b"label-a")
        _add_file(tar, "Task/imagesTr/._a.nii.gz", b"apple double")
        _add_link(tar, "Task/latest", "imagesTr/a.nii.gz", tarfile.SYMTYPE)

    files = safe_extract(_tar(tmp_path / "good.tar.gz", build), destination)

    assert files == ["Task/imagesTr/a.nii.gz", "Task/labelsTr/a.nii.gz"]
    assert (destination / "Task/imagesTr/a.nii.gz").read_bytes() == b"image-a"
    assert (destination / "Task/labelsTr/a.nii.gz").read_bytes() == b"label-a"
    assert (destination / "Task/latest").read_bytes() == b"image-a"  # an inside link is fine
    assert not (destination / "Task/imagesTr/._a.nii.gz").exists()


@pytest.mark.parametrize(("member", "message"), [
    ("../evil", "'..' component"),
    ("Task/../../evil", "'..' component"),
    ("/tmp/regflow-absolute-evil", "absolute path"),
])
def test_tar_with_escaping_path_is_refused_and_writes_nothing(tmp_path, sandbox, member, message):
    destination, parent = sandbox

    def build(tar):
        _add_file(tar, "Task/first.nii.gz", b"written first in the archive")
        _add_file(tar, member, b"evil")

    archive = _tar(tmp_path / "evil.tar", build, mode="w")
    with pytest.raises(DataError, match=message) as error:
        safe_extract(archive, destination)

    assert str(archive) in str(error.value) and member in str(error.value)
    assert _everything(parent) == ["dest"]
    assert not Path("/tmp/regflow-absolute-evil").exists()


@pytest.mark.parametrize(("kind", "target"), [
    (tarfile.SYMTYPE, "../../outside"),
    (tarfile.SYMTYPE, "/etc/passwd"),
    (tarfile.LNKTYPE, "../outside"),
])
def test_tar_link_pointing_outside_is_refused(tmp_path, sandbox, kind, target):
    destination, parent = sandbox

    def build(tar):
        _add_link(tar, "Task/link", target, kind)
        _add_file(tar, "Task/link/payload", b"through the link")

    with pytest.raises(DataError, match="points outside the destination"):
        safe_extract(_tar(tmp_path / "links.tar", build, mode="w"), destination)
    assert _everything(parent) == ["dest"]


def test_tar_device_member_is_refused(tmp_path, sandbox):
    destination, parent = sandbox

    def build(tar):
        info = tarfile.TarInfo("Task/null")
        info.type = tarfile.CHRTYPE
        info.devmajor, info.devminor = 1, 3
        tar.addfile(info)

    with pytest.raises(DataError, match="device, FIFO"):
        safe_extract(_tar(tmp_path / "device.tar", build, mode="w"), destination)
    assert _everything(parent) == ["dest"]


def test_zip_extracts_and_refuses_escaping_members(tmp_path, sandbox):
    destination, parent = sandbox
    good = tmp_path / "good.zip"
    with zipfile.ZipFile(good, "w") as bundle:
        bundle.writestr("demo/images/1.nii.gz", b"one")
        bundle.writestr("__MACOSX/demo/images/._1.nii.gz", b"metadata")
    assert safe_extract(good, destination) == ["demo/images/1.nii.gz"]
    assert (destination / "demo/images/1.nii.gz").read_bytes() == b"one"

    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as bundle:
        bundle.writestr("demo/ok.nii.gz", b"ok")
        bundle.writestr("../evil.nii.gz", b"evil")
    with pytest.raises(DataError, match="'..' component"):
        safe_extract(evil, destination)
    assert not (destination / "demo/ok.nii.gz").exists()
    assert _everything(parent) == ["dest", "dest/demo", "dest/demo/images",
                                   "dest/demo/images/1.nii.gz"]


def test_not_an_archive_is_a_data_error(tmp_path, sandbox):
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"this is not an archive" * 100)
    with pytest.raises(DataError, match="junk.tar: not a readable tar archive"):
        safe_extract(junk, sandbox[0])


@pytest.mark.parametrize(("name", "expected"), [
    ("./a//b/c.nii.gz", "a/b/c.nii.gz"), ("a\\b", "a/b"), ("./", ""),
])
def test_member_path_normalises(name, expected):
    assert member_path(name, Path("x.tar")) == expected


def test_member_path_refuses_a_drive_letter():
    with pytest.raises(DataError, match="absolute path"):
        member_path("C:/Windows/evil", Path("x.zip"))
