"""Mixed precision on CUDA (``train.amp``): bf16 autocast in the step, float32 weights and losses.

Marked ``gpu``: the default run and CI (no CUDA) skip it; run it with ``pytest -m gpu`` on a
machine with a GPU.
"""

import math
from pathlib import Path

import pytest
import torch

from regflow.config import load_config
from regflow.engine import Trainer

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_amp_training_steps_run_in_bf16_and_keep_float32_weights(tiny_project):
    config = load_config(tiny_project, ["train.steps=3", "train.val_every=3", "train.amp=true",
                                        "train.device=cuda"])
    trainer = Trainer(config, Path("data/processed/tiny/manifest.json"), Path("models/tiny"))
    assert trainer.use_amp
    seen = []
    hook = trainer.model.backbone.register_forward_hook(
        lambda module, inputs, output: seen.append(output.dtype))
    result = trainer.fit()
    hook.remove()
    assert torch.bfloat16 in seen  # the backbone ran under autocast
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    assert math.isfinite(result.best_score)
