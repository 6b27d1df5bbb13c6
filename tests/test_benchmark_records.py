"""Tests for benchmarks.records: the commit of a row (clean, dirty, results-only changes), the
machine note, and updating a results file row by row."""

import subprocess

import pytest

from benchmarks import records
from regflow.errors import RegflowError


def _git(root, *args):
    subprocess.run(["git", *args], cwd=root, check=True, capture_output=True)


@pytest.fixture
def checkout(tmp_path):
    _git(tmp_path, "init", "-q")
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "benchmarks" / "results" / "accuracy.json").write_text("{}\n")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    return tmp_path


def test_commit_is_dirty_only_when_tracked_code_changed(checkout):
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=checkout, check=True,
                          capture_output=True, text=True).stdout.strip()
    assert records.git_commit(checkout) == head
    (checkout / "benchmarks" / "results" / "accuracy.json").write_text('{"rows": []}\n')
    (checkout / "untracked.py").write_text("")
    assert records.git_commit(checkout) == head  # results and untracked files: not the code
    (checkout / "code.py").write_text("x = 2\n")
    assert records.git_commit(checkout) == f"{head}+dirty"


def test_commit_outside_a_checkout_is_unknown(tmp_path):
    assert records.git_commit(tmp_path) == "unknown"


def test_machine_note_says_shared_when_the_load_exceeds_the_threads(monkeypatch):
    loads = iter([0.4, 1.2, 3.6])
    monkeypatch.setattr(records.os, "getloadavg", lambda: (next(loads), 0.0, 0.0))
    watch = records.LoadWatch(threads=2)
    watch.sample()
    assert watch.note().startswith("2 threads, ") and "idle (load 0.4-1.2)" in watch.note()
    watch.sample()
    assert "shared (load 0.4-3.6)" in watch.note("beside a training")
    assert watch.note("beside a training").endswith("; beside a training")


def test_upsert_replaces_rows_by_key_and_keeps_the_others(tmp_path):
    path = tmp_path / "results" / "accuracy.json"
    first = [{"split": "test", "method": "a", "settings": "x", "dice_mean": 0.5},
             {"split": "test", "method": "b", "settings": "x", "dice_mean": 0.6},
             {"split": "val", "method": "a", "settings": "x", "dice_mean": 0.7}]
    records.upsert(path, first)
    rows = records.upsert(path, [{"split": "test", "method": "a", "settings": "x",
                                  "dice_mean": 0.123456789, "hd95_mm": float("nan")},
                                 {"split": "test", "method": "a", "settings": "y",
                                  "dice_mean": 0.9}])
    assert rows == records.read(path)["rows"]
    assert [(row["split"], row["method"], row["settings"], row["dice_mean"]) for row in rows] == [
        ("test", "a", "x", 0.123457), ("test", "b", "x", 0.6), ("val", "a", "x", 0.7),
        ("test", "a", "y", 0.9)]
    assert rows[0]["hd95_mm"] is None
    assert not list(path.parent.glob(".*.tmp"))


def test_read_names_the_file_of_a_damaged_results_file(tmp_path):
    assert records.read(tmp_path / "absent.json") == {"benchmark": "absent", "rows": []}
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(RegflowError, match="broken.json: not a readable results file"):
        records.read(broken)
    broken.write_text('{"rows": 3}')
    with pytest.raises(RegflowError, match="'rows' list"):
        records.read(broken)
