from pathlib import Path

import mlflow
import pytest
import torch

from regflow import spatial
from regflow.config import load_config
from regflow.engine import Trainer
from regflow.errors import ConfigError
from regflow.symmetric import both_directions, inverse_consistency

SHAPE = (10, 12, 8)


def translation(shift: tuple[float, float, float]) -> torch.Tensor:
    field = torch.zeros(1, 3, *SHAPE)
    for axis, amount in enumerate(shift):
        field[:, axis] = amount
    return field


def test_opposite_translations_are_consistent_and_equal_ones_are_not():
    shift = (1.5, 0.0, -0.5)
    assert inverse_consistency(translation(shift), -translation(shift)).item() < 1e-10
    # both round trips move by twice the shift: |2 t|^2 = 4 * (1.5^2 + 0.5^2) = 10
    assert inverse_consistency(translation(shift), translation(shift)).item() == pytest.approx(10)


def test_a_smooth_field_and_its_numerical_inverse_are_nearly_consistent():
    grid = torch.meshgrid(*[torch.linspace(0, 1, n) for n in SHAPE], indexing="ij")
    forward = torch.stack([0.8 * torch.sin(torch.pi * g) for g in grid])[None]
    backward = -forward.clone()
    for _ in range(30):  # fixed point of backward(y) = -forward(y + backward(y))
        backward = -spatial.warp(forward, backward, padding="border")
    assert inverse_consistency(forward, backward).item() < 1e-3
    assert inverse_consistency(forward, -forward).item() > 20 * inverse_consistency(
        forward, backward).item()


def test_both_directions_appends_the_swapped_pairs():
    batch = {"fixed_image": torch.zeros(2, 1, *SHAPE), "moving_image": torch.ones(2, 1, *SHAPE),
             "fixed_label": torch.zeros(2, 2, *SHAPE), "moving_label": torch.ones(2, 2, *SHAPE),
             "fixed_id": ["a", "b"], "moving_id": ["c", "d"],
             "label_index": torch.tensor([-1, -1])}
    doubled = both_directions(batch)
    assert doubled["fixed_image"][:, 0, 0, 0, 0].tolist() == [0, 0, 1, 1]
    assert doubled["moving_label"][:, 0, 0, 0, 0].tolist() == [1, 1, 0, 0]
    assert doubled["fixed_id"] == ["a", "b", "c", "d"]
    assert doubled["moving_id"] == ["c", "d", "a", "b"]
    assert doubled["label_index"].tolist() == [-1, -1, -1, -1]


def test_symmetric_training_logs_the_consistency_of_the_two_directions(tiny_project):
    config = load_config(tiny_project, ["train.steps=2", "train.val_every=2",
                                        "train.symmetric.enabled=true",
                                        "train.symmetric.consistency_weight=0.5"])
    trainer = Trainer(config, Path("data/processed/tiny/manifest.json"), Path("models/tiny"))
    seen = []
    original = trainer.loss.__call__

    def recording_loss(fixed, *args, **kwargs):
        seen.append(fixed.shape[0])
        return original(fixed, *args, **kwargs)

    trainer.loss = recording_loss
    result = trainer.fit()
    assert seen[0] == 4  # a batch of 2 pairs, both directions
    metrics = mlflow.get_run(result.run_id).data.metrics
    assert metrics["train/symmetric/consistency"] > 0


def test_consistency_needs_a_method_with_a_field(tiny_project):
    with pytest.raises(ConfigError, match="symmetric.consistency_weight"):
        load_config(tiny_project, ["train.model.method=conditional",
                                   "train.symmetric.enabled=true",
                                   "train.symmetric.consistency_weight=0.1"])
