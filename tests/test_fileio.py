import hashlib
import json
import multiprocessing
import os
from pathlib import Path

import pytest

from regflow import fileio

RACE_WRITES = 300


def hidden_temporaries(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir() if path.name.endswith(".tmp"))


def test_temporary_names_are_unique_hidden_siblings(tmp_path):
    target = tmp_path / "out" / "metrics.json"
    with fileio.atomic_path(target) as first, fileio.atomic_path(target) as second:
        assert first != second
        assert first.parent == second.parent == target.parent  # same file system: rename is atomic
        for temporary in (first, second):
            assert temporary.name.startswith(".metrics.json.")
            assert temporary.name.endswith(".tmp")
        first.write_text("first")
        second.write_text("second")
    assert target.read_text() == "first"  # the outer block renames last: the last rename wins
    assert hidden_temporaries(target.parent) == []


def test_written_file_gets_the_umask_mode(tmp_path):
    previous = os.umask(0o022)
    try:
        path = fileio.write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o644


def test_failure_keeps_the_old_content_and_leaves_no_temporary(tmp_path):
    path = fileio.write_text(tmp_path / "best_params.yaml", "old\n")
    with pytest.raises(RuntimeError, match="killed"), fileio.atomic_open(path) as handle:
        handle.write("new, half written")
        raise RuntimeError("killed")
    assert path.read_text() == "old\n"
    assert hidden_temporaries(tmp_path) == []


def test_failure_before_the_first_write_leaves_no_file(tmp_path):
    path = tmp_path / "registered.json"
    with pytest.raises(ValueError), fileio.atomic_path(path):
        raise ValueError
    assert list(tmp_path.iterdir()) == []


def test_write_helpers_round_trip(tmp_path):
    assert fileio.write_bytes(tmp_path / "a.bin", b"\x00\x01").read_bytes() == b"\x00\x01"
    fileio.write_json(tmp_path / "a.json", {"b": 1, "a": [1.5]})
    assert (tmp_path / "a.json").read_text() == '{\n  "a": [\n    1.5\n  ],\n  "b": 1\n}\n'
    fileio.write_csv(tmp_path / "a.csv", [{"case": "c1", "dice": 0.5}, {"case": "c2", "hd95": 2}])
    assert (tmp_path / "a.csv").read_text() == "case,dice,hd95\nc1,0.5,\nc2,,2\n"


def test_atomic_directory_replaces_the_folder_whole(tmp_path):
    target = tmp_path / "processed"
    (target / "old").mkdir(parents=True)
    (target / "old" / "case.nii.gz").write_bytes(b"old")
    (target / "manifest.json").write_text("{}")
    with fileio.atomic_directory(target) as staging:
        assert staging.parent == tmp_path and staging != target
        (staging / "manifest.json").write_text('{"cases": []}')
    assert sorted(path.name for path in target.iterdir()) == ["manifest.json"]
    assert (target / "manifest.json").read_text() == '{"cases": []}'
    assert sorted(path.name for path in tmp_path.iterdir()) == ["processed"]


def test_atomic_directory_failure_keeps_the_old_folder(tmp_path):
    target = tmp_path / "raw"
    target.mkdir()
    (target / "SHA256SUMS").write_text("old")
    with pytest.raises(OSError), fileio.atomic_directory(target) as staging:
        (staging / "partial").write_text("half")
        raise OSError("disk full")
    assert [path.name for path in target.iterdir()] == ["SHA256SUMS"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["raw"]


def test_atomic_directory_replaces_a_link_not_its_target(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("keep")
    link = tmp_path / "dataset"
    link.symlink_to(elsewhere)
    with fileio.atomic_directory(link) as staging:
        (staging / "new.txt").write_text("new")
    assert not link.is_symlink() and (link / "new.txt").read_text() == "new"
    assert (elsewhere / "keep.txt").read_text() == "keep"


def test_remove_stale_temporaries_clears_only_hidden_tmp_entries(tmp_path):
    (tmp_path / ".best.pt.k3j2.tmp").write_bytes(b"half a checkpoint")
    (tmp_path / ".processed.x9.tmp").mkdir()
    (tmp_path / ".processed.x9.tmp" / "case.nii.gz").write_bytes(b"")
    (tmp_path / "notes.tmp").write_text("not ours: not hidden")
    (tmp_path / "best.pt").write_bytes(b"whole")
    removed = fileio.remove_stale_temporaries(tmp_path)
    assert sorted(path.name for path in removed) == [".best.pt.k3j2.tmp", ".processed.x9.tmp"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["best.pt", "notes.tmp"]
    assert fileio.remove_stale_temporaries(tmp_path / "absent") == []


def race_payload(writer: int, index: int) -> dict:
    """A payload that checks itself: its values' length varies and their digest is stored."""
    values = [writer * 100_000 + index * 7 + offset for offset in range(1 + (index * 37) % 500)]
    digest = hashlib.sha256(json.dumps(values).encode()).hexdigest()
    return {"writer": writer, "index": index, "values": values, "sha256": digest}


def race_writer(path: str, writer: int, start, errors) -> None:
    start.wait()
    for index in range(RACE_WRITES):
        try:
            fileio.write_json(path, race_payload(writer, index))
        except Exception:  # counted, so that the parent sees every failure
            with errors.get_lock():
                errors.value += 1


def test_two_processes_racing_on_one_path_never_tear_it(tmp_path):
    path = tmp_path / "best_params.json"
    fileio.write_json(path, race_payload(0, 0))
    context = multiprocessing.get_context("fork")
    start, errors = context.Barrier(3), context.Value("i", 0)
    writers = [context.Process(target=race_writer, args=(str(path), writer, start, errors))
               for writer in (1, 2)]
    for process in writers:
        process.start()
    start.wait()
    reads, torn, seen = 0, 0, set()
    while any(process.is_alive() for process in writers) or reads == 0:
        payload = json.loads(path.read_text())  # a torn file would not parse
        reads += 1
        if hashlib.sha256(json.dumps(payload["values"]).encode()).hexdigest() != payload["sha256"]:
            torn += 1
        seen.add(payload["writer"])
    for process in writers:
        process.join()
    assert [process.exitcode for process in writers] == [0, 0]
    assert (errors.value, torn) == (0, 0)
    assert reads > 10 and seen & {1, 2}
    final = json.loads(path.read_text())
    assert final == race_payload(final["writer"], RACE_WRITES - 1)
    assert hidden_temporaries(tmp_path) == []
