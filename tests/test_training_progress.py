"""Training progress of regflow/engine.py where stderr is not a terminal (dvc repro, CI logs)."""

import re
from pathlib import Path

from regflow.config import load_config
from regflow.engine import Trainer, TrainingProgress, format_duration

LINE = re.compile(r"^train step (\d+)/(\d+) \((\d+)%\) loss (-?\d+\.\d{4}) (\d+\.\d) steps/s "
                  r"eta (\d+s|\d+m\d\ds|\d+h\d\dm)$")


def progress_lines(text: str) -> list[tuple[int, int, int]]:
    """(step, total, percent) of every progress line in ``text``."""
    found = [LINE.match(line) for line in text.splitlines()]
    return [(int(match[1]), int(match[2]), int(match[3])) for match in found if match]


def test_training_without_a_terminal_prints_plain_progress_lines(tiny_project, capsys):
    config = load_config(tiny_project, ["train.steps=4", "train.val_every=4"])
    Trainer(config, Path("data/processed/tiny/manifest.json"), Path("models/tiny"),
            log_pictures=False).fit()
    captured = capsys.readouterr()
    assert progress_lines(captured.err) == [(1, 4, 25), (4, 4, 100)], captured.err
    assert "train step" not in captured.out


def test_progress_lines_every_fifth_or_fiftieth_step_and_only_on_rank_zero(capsys):
    progress = TrainingProgress(total=2000, initial=300)
    for _ in range(300, 2000):
        progress.update({"total": 0.5})
    progress.close()
    silent = TrainingProgress(total=10, initial=0, enabled=False)
    silent.update({"total": 0.5})
    silent.close()
    steps = [step for step, _, _ in progress_lines(capsys.readouterr().err)]
    assert steps == [301, *range(400, 2001, 100)]


def test_durations_read_as_seconds_minutes_or_hours():
    assert [format_duration(s) for s in (0, 42.4, 310, 7380)] == ["0s", "42s", "5m10s", "2h03m"]
