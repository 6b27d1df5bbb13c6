"""Checksum lists in sha256sum format and verified copying."""

from __future__ import annotations

import hashlib
import subprocess

import pytest

from regflow.data.integrity import (
    copy_verified,
    format_sums,
    hash_tree,
    parse_sums,
    sha256_file,
    verify_files,
)
from regflow.errors import DataError

EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def test_sha256_file_matches_hashlib_and_known_digest(tmp_path):
    (tmp_path / "empty").write_bytes(b"")
    data = bytes(range(256)) * 5000  # > one 1 MiB chunk
    (tmp_path / "data").write_bytes(data)
    assert sha256_file(tmp_path / "empty") == EMPTY_SHA256
    assert sha256_file(tmp_path / "data") == hashlib.sha256(data).hexdigest()


def test_parse_sums_reads_sha256sum_text_and_binary_mode_lines():
    text = (f"# comment\n{'A' * 64}  ./test/fixed_images/case1.nii.gz\n\n"
            f"{'b' * 64} *imagesTr/x y.nii.gz\n")
    assert parse_sums(text, "SUMS") == {"test/fixed_images/case1.nii.gz": "a" * 64,
                                        "imagesTr/x y.nii.gz": "b" * 64}


def test_parse_sums_names_a_bad_line():
    with pytest.raises(DataError, match=r"^SUMS:2: not a"):
        parse_sums(f"{'a' * 64}  ok\nnot-a-hash  file\n", "SUMS")


def test_format_sums_round_trips_and_sha256sum_accepts_it(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub/b.bin").write_bytes(b"bee")
    (tmp_path / "a.bin").write_bytes(b"ay")
    sums = hash_tree(tmp_path)
    text = format_sums(sums)
    assert text.splitlines()[0].endswith("  a.bin") and parse_sums(text, "x") == sums
    (tmp_path / "SHA256SUMS").write_text(text)
    checked = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=tmp_path,
                             capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout


def test_copy_verified_copies_bytes_and_names_a_mismatching_file(tmp_path):
    source, target = tmp_path / "source", tmp_path / "target"
    (source / "d").mkdir(parents=True)
    (source / "d/one").write_bytes(b"1")
    (source / "two").write_bytes(b"2")
    sums = hash_tree(source)
    copy_verified(source, target, sums)
    assert (target / "d/one").read_bytes() == b"1" and (target / "two").read_bytes() == b"2"

    (source / "two").write_bytes(b"3")
    with pytest.raises(DataError, match=r"source/two: sha256 mismatch"):
        copy_verified(source, tmp_path / "again", sums)
    with pytest.raises(DataError, match=r"nope: listed in the checksums but missing"):
        copy_verified(source, tmp_path / "again", {"nope": EMPTY_SHA256})


def test_verify_files_reports_missing_and_changed(tmp_path):
    (tmp_path / "f").write_bytes(b"")
    verify_files(tmp_path, {"f": EMPTY_SHA256})
    with pytest.raises(DataError, match=r"/g: missing"):
        verify_files(tmp_path, {"g": EMPTY_SHA256})
    (tmp_path / "f").write_bytes(b"x")
    with pytest.raises(DataError, match=r"/f: sha256 mismatch \(expected e3b0c44298fc1c14"):
        verify_files(tmp_path, {"f": EMPTY_SHA256})
