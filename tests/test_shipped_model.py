"""The weights that ship in models/shipped/ are the ones their record describes, and they
reproduce the record's test figures on the processed split (slow: fetch, preprocess, 40 pairs)."""

import json
from pathlib import Path

import pytest

from regflow.models import RegistrationModel
from regflow.shipping import file_sha256, record_path, shipped_config
from regflow.stages import evaluate_checkpoint, fetch_stage, preprocess_stage

SHIPPED = Path(__file__).resolve().parents[1] / "models" / "shipped" / "hippocampus-long.pt"
DICE_TOLERANCE = 0.005


def test_the_shipped_file_is_the_one_its_record_describes():
    record = json.loads(record_path(SHIPPED).read_text())
    assert file_sha256(SHIPPED) == record["sha256"]
    assert SHIPPED.stat().st_size == record["bytes"]
    _, extra = RegistrationModel.load(SHIPPED)
    assert extra["evaluate"] == record["evaluate"]
    assert record["metrics"]["split"] == "test" and record["metrics"]["pairs"] == 40


@pytest.mark.slow
def test_the_shipped_weights_reproduce_their_recorded_test_dice(tmp_path, mirror, monkeypatch):
    record = json.loads(record_path(SHIPPED).read_text())
    _, extra = RegistrationModel.load(SHIPPED)
    config = shipped_config(extra, str(SHIPPED))
    monkeypatch.chdir(tmp_path)  # data/raw and data/processed are relative paths
    fetch_stage(config, mirror=str(mirror))
    preprocess_stage(config)
    _, headline = evaluate_checkpoint(config, SHIPPED)
    recorded = record["metrics"]
    assert headline["pairs"] == recorded["pairs"]
    assert abs(headline["dice_mean"] - recorded["dice_mean"]) <= DICE_TOLERANCE
    assert abs(headline["sdlogj"] - recorded["sdlogj"]) <= 0.005
