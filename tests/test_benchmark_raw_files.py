"""benchmarks.raw_files: the raw-file path scores the evaluation pairs as evaluate does."""

import re
from pathlib import Path

from click.testing import CliRunner

from benchmarks.raw_files import main
from regflow.config import load_config
from regflow.engine import Trainer


def test_raw_files_and_processed_volumes_agree(tiny_project):
    config = load_config(tiny_project, ["train.steps=4", "train.val_every=4"])
    Trainer(config, Path("data/processed/tiny/manifest.json"), Path("models/tiny")).fit()
    result = CliRunner().invoke(main, ["--model", "models/tiny/best.pt", "-c", str(tiny_project)])
    assert result.exit_code == 0, result.output
    processed = float(re.search(r"processed volumes \(regflow evaluate\) \| ([0-9.]+)",
                                result.output)[1])
    raw = float(re.search(r"raw files \(regflow predict, serving\) \| ([0-9.]+)",
                          result.output)[1])
    assert 0 < processed < 1
    assert abs(raw - processed) < 0.02, result.output
