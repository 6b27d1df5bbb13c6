import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch

from regflow.config import load_config, validate_config
from regflow.data.loader import steps_per_epoch
from regflow.engine import Trainer, build_optimizer, config_digest
from regflow.models import RegistrationModel


def checkpoint_step(path: Path) -> int:
    _, extra = RegistrationModel.load(path)
    return extra["training"]["step"]


def test_training_logs_every_loss_term_and_validation(tiny_project):
    config = load_config(tiny_project)
    result = Trainer(config, Path("data/processed/tiny/manifest.json"), Path("models/tiny")).fit()
    assert result.steps == 6
    run = mlflow.get_run(result.run_id)
    for key in ("train/total", "train/image/lncc", "train/label/dice",
                "train/regularization/bending_energy", "train/lr", "train/step_time_s",
                "val/dice_mean", "val/dice/first", "val/dice/second", "val/folding_pct"):
        assert key in run.data.metrics, key
    history = mlflow.MlflowClient().get_metric_history(result.run_id, "train/total")
    assert [point.step for point in history] == [1, 2, 3, 4, 5, 6]
    assert run.data.params["train.loss.image.lncc.weight"] == "1.0"
    artifacts = [item.path for item in mlflow.MlflowClient().list_artifacts(result.run_id,
                                                                            "validation")]
    assert any(path.endswith("_overlay.png") for path in artifacts)
    assert any(path.endswith("_grid.png") for path in artifacts)
    assert run.inputs.dataset_inputs, "the dataset is logged as an MLflow input"
    assert checkpoint_step(result.last_checkpoint) == 6


def test_same_seed_gives_same_weights(tiny_project):
    config = load_config(tiny_project, ["train.steps=3", "train.val_every=3"])
    weights = []
    for name in ("first", "second"):
        Trainer(config, Path("data/processed/tiny/manifest.json"), Path(name)).fit()
        model, _ = RegistrationModel.load(Path(name) / "last.pt")
        weights.append(torch.cat([p.flatten() for p in model.parameters()]))
    assert torch.equal(weights[0], weights[1])


def test_changed_config_does_not_resume(tiny_project):
    manifest = Path("data/processed/tiny/manifest.json")
    config = load_config(tiny_project, ["train.steps=2", "train.val_every=2"])
    Trainer(config, manifest, Path("models/tiny")).fit()
    other = load_config(tiny_project, ["train.steps=2", "train.val_every=2",
                                       "train.optimizer.lr=0.01"])
    assert config_digest(other) != config_digest(config)
    assert not Trainer(other, manifest, Path("models/tiny")).resume_if_possible()
    assert Trainer(config, manifest, Path("models/tiny")).resume_if_possible()



def test_keys_at_their_defaults_leave_the_digest_alone(tiny_project):
    """A key a later release adds (here: one written out at its default) resumes old runs."""
    config = load_config(tiny_project)
    spelled_out = load_config(tiny_project, ["train.model.hyper=null",
                                             "loader.augment.flip.enabled=false"])
    assert config_digest(spelled_out) == config_digest(config)
    assert config_digest(load_config(tiny_project, ["loader.augment.flip.enabled=true"])) \
        != config_digest(config)


def test_raising_the_steps_extends_the_finished_run(tiny_project):
    manifest, out_dir = Path("data/processed/tiny/manifest.json"), Path("models/tiny")
    short = load_config(tiny_project, ["train.steps=2", "train.val_every=2"])
    first = Trainer(short, manifest, out_dir).fit()
    longer = load_config(tiny_project, ["train.steps=4", "train.val_every=1",
                                        "train.checkpoint_every=1"])
    assert config_digest(longer) == config_digest(short)
    extended = Trainer(longer, manifest, out_dir).fit()
    assert (extended.run_id, extended.steps) == (first.run_id, 4)
    assert checkpoint_step(out_dir / "last.pt") == 4
    run = mlflow.get_run(first.run_id)
    assert run.data.tags["regflow.resumed_from_step"] == "2"
    assert {point.step for point in mlflow.MlflowClient().get_metric_history(
        first.run_id, "train/total")} == {1, 2, 3, 4}

def test_sigkill_then_restart_resumes_the_same_run(tiny_project):
    command = [sys.executable, "-m", "regflow.cli", "train", "-S", "train.steps=60",
               "-S", "train.checkpoint_every=5", "-S", "train.val_every=30"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    last = Path("models/tiny/last.pt")
    deadline = time.monotonic() + 120
    while not last.exists() and time.monotonic() < deadline and first.poll() is None:
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert last.exists(), "no checkpoint before the kill"
    killed_at = checkpoint_step(last)
    assert 0 < killed_at < 60
    run_id = json.loads(Path("models/tiny/run.json").read_text())["run_id"]

    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert checkpoint_step(last) == 60
    assert json.loads(Path("models/tiny/run.json").read_text())["run_id"] == run_id
    run = mlflow.get_run(run_id)
    assert int(run.data.tags["regflow.resumed_from_step"]) >= killed_at
    steps = {point.step for point in
             mlflow.MlflowClient().get_metric_history(run_id, "train/total")}
    assert steps == set(range(1, 61))
    assert run.data.metrics["train/steps_done"] == 60


@pytest.mark.parametrize("override", ["train.steps=0", "train.model.method=spline"])
def test_bad_training_config_is_one_line_exit_2(tiny_project, override):
    result = subprocess.run([sys.executable, "-m", "regflow.cli", "train", "-S", override],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert override.split("=")[0] in result.stderr


@pytest.mark.parametrize(("schedule", "last_factor"), [
    ("cosine", 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 19 / 20))),  # last of 20 decay steps
    ("step", 0.09), ("constant", 1.0)])
def test_learning_rate_warms_up_linearly_then_follows_the_schedule(tmp_path, schedule,
                                                                   last_factor):
    params = tmp_path / "params.yaml"
    params.write_text("seed: 0\n")
    config = load_config(params, ["train.steps=30", "train.optimizer.lr=0.01",
                                  "train.optimizer.warmup_steps=10",
                                  f"train.optimizer.schedule={schedule}"])
    optimizer, scheduler = build_optimizer(torch.nn.Linear(2, 2), config)
    rates = []
    for _ in range(30):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert rates[:10] == pytest.approx([0.001 * (step + 1) for step in range(10)])
    assert rates[10] == pytest.approx(0.01)
    assert rates[-1] == pytest.approx(0.01 * last_factor)


@pytest.mark.parametrize(("name", "settings", "expected"), [
    # loss 3 w, so the gradient is 3 everywhere: every Adam step is lr * m_hat / sqrt(v_hat) = lr
    ("adam", {"lr": 0.1}, [1.9, 1.8]),
    # AdamW: w * (1 - lr * wd) first, then the Adam step: 2 * 0.95 - 0.1 = 1.8
    ("adamw", {"lr": 0.1, "weight_decay": 0.5}, [1.8, 1.61]),
    # SGD with momentum: buffer g, then 0.9 * 3 + 3 = 5.7
    ("sgd", {"lr": 0.1, "momentum": 0.9}, [1.7, 1.13]),
    # RMSprop: v = 0.01 g^2, step lr * g / sqrt(v) = 0.1; then v = 0.0199 g^2
    ("rmsprop", {"lr": 0.01}, [1.9, 1.9 - 0.03 / math.sqrt(0.0199 * 9)]),
])
def test_optimizers_by_name_take_their_closed_form_steps(name, settings, expected):
    config = validate_config({"train": {"optimizer": {"name": name, **settings}}})
    model = torch.nn.Linear(1, 1, bias=False).double()
    with torch.no_grad():
        model.weight.fill_(2.0)
    optimizer, _ = build_optimizer(model, config)
    assert type(optimizer).__name__.lower() == name
    weights = []
    for _ in expected:
        optimizer.zero_grad()
        model(torch.tensor([[3.0]], dtype=torch.float64)).sum().backward()
        optimizer.step()
        weights.append(model.weight.item())
    assert weights == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("with_checkpoint", [False, True])
def test_a_run_record_naming_a_run_missing_from_the_store_starts_a_new_run(tiny_project,
                                                                          with_checkpoint):
    """A fresh clone carries models/<name>/run.json from a store it does not have: training
    says so in one line and goes on in a new run (from the checkpoint's step when there is one)."""
    config = load_config(tiny_project, ["train.steps=2", "train.val_every=2"])
    if with_checkpoint:
        Trainer(config, Path("data/processed/tiny/manifest.json"), Path("models/tiny")).fit()
        config = load_config(tiny_project, ["train.steps=4", "train.val_every=2"])
    record = Path("models/tiny/run.json")
    record.parent.mkdir(parents=True, exist_ok=True)
    digest = config_digest(config)
    record.write_text(json.dumps({"run_id": "77804727c24448c3aeca65222f55b8de",
                                  "config_digest": digest}))
    if with_checkpoint:  # the checkpoint names the missing run too
        model, extra = RegistrationModel.load("models/tiny/last.pt")
        extra["training"]["run_id"] = "77804727c24448c3aeca65222f55b8de"
        model.save("models/tiny/last.pt", extra=extra)
    result = subprocess.run([sys.executable, "-m", "regflow.cli", "train", "-S",
                             f"train.steps={config.train.steps}", "-S", "train.val_every=2"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    notes = [line for line in result.stderr.splitlines() if "77804727" in line]
    assert len(notes) == 1 and "not in the tracking store" in notes[0]
    assert ("continuing from step 2" in notes[0]) == with_checkpoint
    new_id = json.loads(record.read_text())["run_id"]
    assert new_id != "77804727c24448c3aeca65222f55b8de"
    run = mlflow.get_run(new_id)
    assert run.data.params["train.steps"] == str(config.train.steps)
    assert run.data.metrics["train/steps_done"] == config.train.steps


def test_run_length_in_epochs_is_epochs_times_steps_per_epoch(tiny_project):
    """train.unit epochs (DeepReg's unit): 6 training cases pair up into 3 unpaired pairs per
    epoch, batch 2: 2 steps per epoch, so 3 epochs are 6 steps, validated every 2."""
    config = load_config(tiny_project, ["train.unit=epochs", "train.steps=3",
                                        "train.val_every=1", "train.checkpoint_every=3"])
    manifest = Path("data/processed/tiny/manifest.json")
    assert steps_per_epoch(manifest, config) == 2
    trainer = Trainer(config, manifest, Path("models/tiny"))
    assert (trainer.config.train.unit, trainer.config.train.steps,
            trainer.config.train.val_every) == ("steps", 6, 2)
    outcome = trainer.fit()
    assert outcome.steps == 6
    validated = mlflow.MlflowClient().get_metric_history(outcome.run_id, "val/dice_mean")
    assert [metric.step for metric in validated] == [2, 4, 6]
