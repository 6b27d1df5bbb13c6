import hashlib
import json
import multiprocessing
import os
import stat
import subprocess
import sys
import threading

import pytest

from regflow import fileio

WRITES_PER_PROCESS = 300


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_temporary_siblings_are_unique_hidden_and_beside_the_target(tmp_path):
    target = tmp_path / "out" / "metrics.json"
    first, second = fileio.temporary_sibling(target), fileio.temporary_sibling(target)
    assert first != second
    for temporary in (first, second):
        assert temporary.parent == target.parent
        assert temporary.name.startswith(".metrics.json.") and temporary.name.endswith(".tmp")
        assert stat.S_IMODE(temporary.stat().st_mode) == 0o666 & ~_umask()
    folder = fileio.temporary_sibling(target, directory=True)
    assert folder.is_dir() and folder.name.endswith(".tmp")
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~_umask()


def test_two_open_writers_of_one_path_get_different_temporaries(tmp_path):
    target = tmp_path / "best_params.yaml"
    with fileio.atomic_path(target) as first, fileio.atomic_path(target) as second:
        assert first != second
        first.write_text("a: 1\n")
        second.write_text("a: 2\n")
    assert target.read_text() == "a: 1\n"  # the outer block renames last: its content wins whole
    assert sorted(path.name for path in tmp_path.iterdir()) == ["best_params.yaml"]


def test_a_failed_write_keeps_the_old_content_and_leaves_no_temporary(tmp_path):
    target = fileio.write_text(tmp_path / "run.json", '{"run_id": "old"}')
    with pytest.raises(RuntimeError, match="disk full"):
        with fileio.atomic_open(target) as handle:
            handle.write('{"run_id": "ne')
            raise RuntimeError("disk full")
    assert target.read_text() == '{"run_id": "old"}'
    assert [path.name for path in tmp_path.iterdir()] == ["run.json"]


def test_write_json_and_csv_give_the_documented_text(tmp_path):
    fileio.write_json(tmp_path / "a.json", {"b": 1, "a": [2]})
    assert (tmp_path / "a.json").read_text() == '{\n  "a": [\n    2\n  ],\n  "b": 1\n}\n'
    fileio.write_csv(tmp_path / "a.csv", [{"case": "x", "dice": 0.5}, {"case": "y", "hd95": 2}])
    assert (tmp_path / "a.csv").read_text() == "case,dice,hd95\nx,0.5,\ny,,2\n"


def test_atomic_directory_replaces_the_old_folder_whole(tmp_path):
    target = tmp_path / "processed"
    (target / "images").mkdir(parents=True)
    (target / "images" / "old.nii.gz").write_bytes(b"old")
    (target / "manifest.json").write_text("{}")
    with fileio.atomic_directory(target) as staging:
        assert not (staging / "manifest.json").exists()  # starts empty, not as a copy
        (staging / "manifest.json").write_text('{"cases": []}')
    assert sorted(path.name for path in target.iterdir()) == ["manifest.json"]
    assert (target / "manifest.json").read_text() == '{"cases": []}'
    assert stat.S_IMODE(target.stat().st_mode) == 0o777 & ~_umask()
    assert [path.name for path in tmp_path.iterdir()] == ["processed"]


def test_a_failed_atomic_directory_leaves_the_old_folder(tmp_path):
    target = tmp_path / "raw"
    target.mkdir()
    (target / "SHA256SUMS").write_text("abc  x\n")
    with pytest.raises(ValueError, match="checksum"):
        with fileio.atomic_directory(target) as staging:
            (staging / "half.nii.gz").write_bytes(b"\x1f")
            raise ValueError("checksum mismatch")
    assert [path.name for path in target.iterdir()] == ["SHA256SUMS"]
    assert [path.name for path in tmp_path.iterdir()] == ["raw"]


def test_atomic_directory_replaces_a_link(tmp_path):
    elsewhere = tmp_path / "mirror"
    elsewhere.mkdir()
    (elsewhere / "kept").write_text("mirror file")
    target = tmp_path / "dataset"
    target.symlink_to(elsewhere)
    with fileio.atomic_directory(target) as staging:
        (staging / "new").write_text("fetched")
    assert not target.is_symlink() and [p.name for p in target.iterdir()] == ["new"]
    assert (elsewhere / "kept").read_text() == "mirror file"  # the link's target is untouched


def _payload(writer: int, count: int) -> dict:
    """A self-checking document of about 40 kB: ``digest`` is the sha256 of its ``body``."""
    body = f"{writer}:{count}:" + "x" * (40_000 + 997 * writer + count)
    return {"writer": writer, "count": count, "body": body,
            "digest": hashlib.sha256(body.encode()).hexdigest()}


def _write_many(path: str, writer: int) -> None:
    for count in range(WRITES_PER_PROCESS):
        fileio.write_json(path, _payload(writer, count))


def _check(text: str) -> bool:
    try:
        document = json.loads(text)
    except ValueError:
        return False
    return hashlib.sha256(document["body"].encode()).hexdigest() == document["digest"]


def test_two_processes_racing_on_one_path_never_show_a_torn_file(tmp_path):
    target = tmp_path / "metrics.json"
    fileio.write_json(target, _payload(9, 0))
    reads, torn = [0], []
    done = threading.Event()

    def read_until_done() -> None:
        while not done.is_set():
            text = target.read_text()
            reads[0] += 1
            if not _check(text):
                torn.append(text[:80])

    reader = threading.Thread(target=read_until_done)
    reader.start()
    context = multiprocessing.get_context("spawn")
    writers = [context.Process(target=_write_many, args=(str(target), writer))
               for writer in (0, 1)]
    for process in writers:
        process.start()
    for process in writers:
        process.join(timeout=120)
    done.set()
    reader.join()
    assert [process.exitcode for process in writers] == [0, 0]
    assert torn == []
    assert reads[0] > 0
    final = json.loads(target.read_text())
    assert (final["writer"], final["count"]) in {(0, WRITES_PER_PROCESS - 1),
                                                 (1, WRITES_PER_PROCESS - 1)}
    assert _check(target.read_text())
    assert [path.name for path in tmp_path.iterdir()] == ["metrics.json"]


def _finished_process_id() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_remove_stale_temporaries_clears_only_hidden_tmp_entries_of_dead_writers(tmp_path):
    dead = _finished_process_id()
    stale_file = tmp_path / f".best.pt.pid{dead}.x1y2z3.tmp"
    stale_file.write_text("half a checkpoint")
    stale_folder = tmp_path / f".processed.pid{dead}.a1b2c3.tmp"
    (stale_folder / "images").mkdir(parents=True)
    untagged = tmp_path / ".eval.abc123.tmp"  # written before temporaries named their writer
    untagged.write_text("old")
    live = fileio.temporary_sibling(tmp_path / "eval", directory=True)  # this process writes it
    kept = [tmp_path / "notes.tmp", tmp_path / ".hidden", tmp_path / "best.pt", live]
    for path in kept[:3]:
        path.write_text("keep")
    removed = fileio.remove_stale_temporaries(tmp_path)
    assert sorted(removed) == sorted([stale_file, stale_folder, untagged])
    assert sorted(tmp_path.iterdir()) == sorted(kept)
    assert fileio.remove_stale_temporaries(tmp_path / "absent") == []
