"""The training loop: plain PyTorch, checkpoint + resume, validation, early stopping, MLflow.

A run is resumable: ``models/<name>/last.pt`` carries the weights, optimiser, scheduler, step and
MLflow run id, so a restarted ``regflow train`` continues the same run from that step (losing at
most ``train.checkpoint_every`` steps). A checkpoint made under a different config is not resumed.

Under ``torchrun`` (see :mod:`regflow.distributed`) every rank runs the same loop on its own shard
of each epoch, ``loader.batch_size`` pairs per rank and step, so the global batch is
``loader.batch_size x world size``; DDP averages the gradients. Rank 0 alone logs to MLflow,
validates and writes best.pt / last.pt / run.json; every rank resumes from last.pt.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from regflow import distributed, fileio, paths, tracking, viz
from regflow.config import Config
from regflow.data.loader import build_dataloader, steps_per_epoch
from regflow.data.manifest import Manifest
from regflow.errors import RegflowError
from regflow.evaluation import as_device, evaluate_pairs, summarise, validation_score
from regflow.inference import Registrar, checkpoint_path
from regflow.losses import build_loss
from regflow.models import RegistrationModel, select_device
from regflow.redact import redact_text
from regflow.refine import RefineSettings
from regflow.symmetric import both_directions, inverse_consistency

ValidationCallback = Callable[[int, dict[str, float]], None]


@dataclass(frozen=True)
class TrainResult:
    """What a finished training left behind."""

    run_id: str
    steps: int
    best_score: float
    best_checkpoint: Path
    last_checkpoint: Path
    stopped_early: bool


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and PyTorch (CPU and CUDA) from one number."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def model_label_channels(config: Config, manifest: Manifest) -> int:
    """How many label channels a batch carries: all of them when stacked, else one."""
    if config.loader.sample_label != "stack" or not manifest.label_format:
        return 1
    return max(1, len(manifest.channel_names))


# How long a run goes and how often it reports: changing them continues the same run (raising
# train.steps extends a finished one), so they stay out of its digest.
RUN_LENGTH_KEYS = ("steps", "val_every", "checkpoint_every", "early_stopping_patience")


def config_digest(config: Config) -> str:
    """A short hash of everything that defines a training run (not evaluation or registry).

    The run's length and reporting cadence (:data:`RUN_LENGTH_KEYS`) are left out, so that a
    longer ``train.steps`` resumes the finished run and trains on instead of starting again.
    Keys at their default values are left out too, so that a regflow release adding a config
    key (with a default that keeps the old behaviour) still resumes the runs of the last one.
    """
    relevant = config.model_dump(include={"seed", "data", "preprocess", "loader", "train"},
                                 exclude_defaults=True)
    relevant.get("data", {}).pop("local", None)
    for key in RUN_LENGTH_KEYS:
        relevant.get("train", {}).pop(key, None)
    text = json.dumps(relevant, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD,
    "rmsprop": torch.optim.RMSprop,
}


def build_optimizer(model: torch.nn.Module, config: Config
                    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """The optimiser ``train.optimizer.name`` and the learning-rate schedule of ``train.optimizer``.

    Names: "adam", "adamw" (decoupled weight decay), "sgd" and "rmsprop" (both with
    ``momentum``), with PyTorch's defaults otherwise. The rate rises linearly over
    ``warmup_steps`` and then follows ``schedule`` over the remaining steps: "cosine" decays to 1%
    of ``lr``, "step" multiplies it by 0.3 after every third, "constant" keeps it. A finished run
    extended by a larger ``train.steps`` goes on from its step on the schedule of the new length
    (a cosine rate rises again to where the longer schedule stands).
    """
    settings = config.train.optimizer
    extra = {"momentum": settings.momentum} if settings.name in ("sgd", "rmsprop") else {}
    optimizer = OPTIMIZERS[settings.name](model.parameters(), lr=settings.lr,
                                          weight_decay=settings.weight_decay, **extra)
    warmup = settings.warmup_steps
    decay_steps = max(1, config.train.steps - warmup)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / decay_steps)
        if settings.schedule == "cosine":
            return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress))
        if settings.schedule == "step":
            return 0.3 ** min(2, int(3 * progress))
        return 1.0

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def endless_batches(loader: torch.utils.data.DataLoader, first_epoch: int
                    ) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (epoch, batch) forever; every pass over the loader is a new random pairing.

    The loader's EpochSampler (the queue's subject sampler in patch mode) counts the epochs;
    resume sets it to the epoch after the checkpoint's.
    """
    sampler = getattr(loader.dataset, "subject_sampler", None) or loader.sampler
    sampler.epoch = first_epoch
    while True:
        epoch = sampler.epoch
        for batch in loader:
            yield epoch, batch


def format_duration(seconds: float) -> str:
    """``42s``, ``5m10s`` or ``2h03m``."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class TrainingProgress:
    """Training progress on stderr: a tqdm bar on a terminal; elsewhere (``dvc repro``, CI logs),
    where a bar shows nothing, one plain line after the first step, every ``max(50, 5%)`` steps
    and at the end: ``train step 200/800 (25%) loss 0.1234 1.9 steps/s eta 5m10s``.

    Args:
        total: ``train.steps``.
        initial: the step training starts from (resume).
        enabled: False keeps it silent (every rank but 0).
    """

    def __init__(self, total: int, initial: int, enabled: bool = True):
        self.total, self.initial, self.step, self.shown = total, initial, initial, initial
        self.every = max(50, math.ceil(total / 20))
        self.loss = math.nan
        self.started = time.perf_counter()
        on_terminal = enabled and sys.stderr.isatty()
        self.bar = tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True,
                        file=sys.stderr) if on_terminal else None
        self.lines = enabled and not on_terminal

    def update(self, values: dict[str, float]) -> None:
        """One step done with these loss values (``total`` and every term)."""
        self.step += 1
        self.loss = values["total"]
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix({name: f"{value:.4f}" for name, value in values.items()})
        elif self.lines and (self.step == self.initial + 1 or self.step % self.every == 0):
            self.print_line()

    def print_line(self) -> None:
        """``train step S/T (P%) loss L R steps/s eta D`` on stderr."""
        self.shown = self.step
        rate = (self.step - self.initial) / max(time.perf_counter() - self.started, 1e-9)
        eta = format_duration((self.total - self.step) / rate) if rate > 0 else "?"
        print(f"train step {self.step}/{self.total} ({100 * self.step / self.total:.0f}%) "
              f"loss {self.loss:.4f} {rate:.1f} steps/s eta {eta}", file=sys.stderr, flush=True)

    def close(self) -> None:
        """Close the bar, or print the last step's line (also after an early stop)."""
        if self.bar is not None:
            self.bar.close()
        elif self.lines and self.shown != self.step:
            self.print_line()


class Trainer:
    """One training run of a RegistrationModel on a processed dataset.

    Args:
        config: the validated params.
        manifest_path: data/processed/<dataset>/manifest.json.
        out_dir: where best.pt / last.pt go (models/<train.name>).
        on_validation: called with (step, validation metrics) after each validation (Optuna
            uses it to report and prune; it may raise optuna.TrialPruned).
        log_pictures: log overlay and deformation-grid pictures at every validation.
    """

    def __init__(self, config: Config, manifest_path: Path, out_dir: Path,
                 on_validation: ValidationCallback | None = None, log_pictures: bool = True):
        if config.train.unit == "epochs":  # the run in steps from here on
            config = config.in_steps(steps_per_epoch(manifest_path, config,
                                                     distributed.launch_world_size()))
        self.config = config
        self.manifest_path = Path(manifest_path)
        self.manifest = Manifest.read(self.manifest_path)
        self.out_dir = Path(out_dir)
        self.on_validation = on_validation
        self.log_pictures = log_pictures
        self.device = distributed.worker_device(select_device(config.train.device))
        self.label_names = self.manifest.channel_names
        self.spacing = self.manifest.voxel_size
        self.digest = config_digest(config)
        seed_everything(config.seed)
        hyper_term = config.train.hyper_term()
        self.model = RegistrationModel.from_config(
            config.train.model, ndim=len(self.manifest.shape),
            label_channels=model_label_channels(config, self.manifest),
            hyper_weight=None if hyper_term is None else hyper_term.weight).to(self.device)
        self.loss = build_loss(config.train.loss)
        self.network: torch.nn.Module = self.model  # what trains: the model or its DDP wrapper
        self.optimizer, self.scheduler = build_optimizer(self.model, config)
        self.use_amp = config.train.amp and self.device.type == "cuda"
        self.step = 0
        self.epoch = 0
        self.best_score = -math.inf
        self.bad_validations = 0
        self.run_id: str | None = None

    @property
    def last_path(self) -> Path:
        """The checkpoint that resume reads."""
        return self.out_dir / "last.pt"

    @property
    def best_path(self) -> Path:
        """The checkpoint with the best validation Dice (or lowest loss without labels)."""
        return self.out_dir / "best.pt"

    @property
    def run_record_path(self) -> Path:
        """run.json: the MLflow run id of this model folder (evaluate and register log to it)."""
        return self.out_dir / "run.json"

    def write_run_record(self) -> None:
        """Record the run id as soon as the run starts, so a crash before any checkpoint
        still resumes into the same MLflow run."""
        fileio.write_json(self.run_record_path,
                          {"run_id": self.run_id, "config_digest": self.digest})

    def resume_if_possible(self) -> bool:
        """Load last.pt when it was written under the same config; True when resumed.

        Without a usable checkpoint, a run.json of the same config still names the run to
        continue (its steps start again from zero).
        """
        if self.run_record_path.exists():
            record = json.loads(self.run_record_path.read_text())
            if record.get("config_digest") == self.digest:
                self.run_id = record.get("run_id")
        if not self.last_path.exists():
            return False
        model, extra = RegistrationModel.load(self.last_path, map_location=self.device)
        state = extra.get("training", {})
        if state.get("config_digest") != self.digest:
            return False
        self.model.load_state_dict(model.state_dict())
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.epoch = state["step"], state["epoch"] + 1
        self.best_score, self.bad_validations = state["best_score"], state["bad_validations"]
        self.run_id = state["run_id"]
        seed_everything(self.config.seed + self.step)
        return True

    def initialise_from(self, spec: str) -> None:
        """Start from the weights of a checkpoint path or an MLflow model URI (fine-tuning).

        Only the network's weights are taken: the optimiser, schedule and step start afresh.

        Raises:
            RegflowError: the model cannot be loaded, or its network differs from train.model.
        """
        source, _ = RegistrationModel.load(checkpoint_path(spec), map_location=self.device)
        try:
            self.model.load_state_dict(source.state_dict())
        except RuntimeError as exc:
            raise RegflowError(f"train.init_from {redact_text(spec)}: its network does not match "
                               f"train.model ({str(exc).splitlines()[0]})") from None

    def save(self, path: Path) -> None:
        """Write a self-describing checkpoint with everything resume needs."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.model.save(path, extra={
            "preprocessing": self.manifest.record().model_dump(mode="json"),
            "loss": self.config.train.loss.model_dump(mode="json"),
            "training": {
                "config_digest": self.digest, "step": self.step, "epoch": self.epoch,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "best_score": self.best_score, "bad_validations": self.bad_validations,
                "run_id": self.run_id,
            },
        })

    def train_step(self, batch: dict[str, Any]) -> dict[str, float]:
        """One optimisation step; returns the total and every weighted term as floats.

        Under ``train.symmetric`` the batch holds every pair in both directions, and the
        inverse-consistency penalty of the two fields joins the loss as ``symmetric/consistency``.
        Under ``train.model.hyper`` the term's weight is drawn for this batch
        (:meth:`draw_hyper_weight`), given to the network and used in the loss; it is returned as
        ``hyper_weight``.
        """
        batch = as_device(batch, self.device)
        symmetric = self.config.train.symmetric
        if symmetric.enabled:
            batch = both_directions(batch)
        hyper_weight = self.draw_hyper_weight()
        self.network.train()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_amp):
            outputs = self.network(batch["moving_image"], batch["fixed_image"],
                                   batch.get("moving_label"), hyper_weight=hyper_weight)
        outputs = {key: value.float() for key, value in outputs.items()}
        weights = None
        if hyper_weight is not None:
            weights = {self.config.train.model.hyper.term.replace(".", "/"): hyper_weight}
        total, terms = self.loss(batch["fixed_image"], outputs.get("warped"),
                                 fixed_label=batch.get("fixed_label"),
                                 warped_label=outputs.get("warped_label"),
                                 ddf=outputs.get("ddf"), weights=weights)
        if symmetric.enabled and symmetric.consistency_weight > 0:
            terms["symmetric/consistency"] = (symmetric.consistency_weight
                                              * inverse_consistency(*outputs["ddf"].chunk(2)))
            total = total + terms["symmetric/consistency"]
        total.backward()
        if self.config.train.optimizer.clip_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(),
                                           self.config.train.optimizer.clip_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        values = {"total": total.item(), **{name: value.item() for name, value in terms.items()}}
        if hyper_weight is not None:
            values["hyper_weight"] = hyper_weight
        return values

    def draw_hyper_weight(self) -> float | None:
        """This step's ``train.model.hyper`` weight, log-uniform in [low, high] (None without
        hyper). Drawn from (seed, step), so a resumed run draws what the uninterrupted one would,
        and every DDP rank draws the same weight."""
        hyper = self.config.train.model.hyper
        if hyper is None:
            return None
        generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + self.step)
        position = torch.rand((), generator=generator).item()
        return hyper.low * (hyper.high / hyper.low) ** position

    def validate(self) -> dict[str, float]:
        """Dice per label and folding on the validation pairs; logs pictures of the first."""
        loader = build_dataloader(self.manifest_path, "val", self.config, train=False)
        pictures: list[tuple[dict[str, Any], dict[str, torch.Tensor]]] = []

        def keep_first(batch: dict[str, Any], outputs: dict[str, torch.Tensor],
                       index: int) -> None:
            if not pictures and index == 0:
                pictures.append((batch, outputs))

        registrar = Registrar(self.model, self.manifest.record(), self.config.train.loss,
                              RefineSettings(), self.device)
        rows = evaluate_pairs(registrar, loader, self.spacing, self.label_names,
                              on_pair=keep_first)
        summary = summarise(rows)
        if self.log_pictures and pictures:
            self.log_validation_pictures(*pictures[0])
        return summary

    def log_validation_pictures(self, batch: dict[str, Any],
                                outputs: dict[str, torch.Tensor]) -> None:
        """Overlay (fixed / moving / warped / checkerboard) and deformation grid to MLflow."""
        prefix = f"validation/step_{self.step:06d}"
        label = batch.get("fixed_label")
        moving_label = batch.get("moving_label")
        warped_label = outputs.get("warped_label")
        warped = outputs.get("warped", batch["moving_image"])
        figure = viz.overlay_figure(
            batch["fixed_image"][0, 0], batch["moving_image"][0, 0], warped[0, 0],
            fixed_label=None if label is None else label[0, 0],
            warped_label=None if warped_label is None else warped_label[0, 0],
            moving_label=None if moving_label is None else moving_label[0, 0])
        tracking.log_figure(figure, f"{prefix}_overlay.png")
        if "ddf" in outputs:
            tracking.log_figure(viz.deformation_grid_figure(outputs["ddf"][0]),
                                f"{prefix}_grid.png")

    def score(self, summary: dict[str, float]) -> float:
        """Higher is better: mean Dice when labels exist, else minus the folding percentage."""
        return validation_score(summary)

    def after_validation(self, summary: dict[str, float]) -> bool:
        """Log, checkpoint the best, update early stopping; True when training should stop."""
        tracking.log_metrics({f"val/{key}": value for key, value in summary.items()
                              if math.isfinite(value)}, step=self.step)
        current = self.score(summary)
        if current > self.best_score:
            self.best_score, self.bad_validations = current, 0
            self.save(self.best_path)
        else:
            self.bad_validations += 1
        if self.on_validation is not None:
            self.on_validation(self.step, summary)
        patience = self.config.train.early_stopping_patience
        return patience > 0 and self.bad_validations >= patience

    def fit(self, run_name: str | None = None, nested: bool = False,
            tags: dict[str, str] | None = None) -> TrainResult:
        """Train to ``train.steps`` (or early stop), resuming from last.pt when possible.

        Under torchrun this joins the process group for the run and leaves it at the end; each
        rank trains on its shard with ``loader.batch_size`` pairs per step (global batch
        ``batch_size x world size``), rank 0 logs, validates and checkpoints, and the other ranks
        wait for its early-stopping decision at every validation and for its final checkpoint.
        Every rank returns the same result.

        Args:
            run_name: MLflow run name (default ``train.name``).
            nested: start the run nested under the active run (Optuna trials).
            tags: extra MLflow tags for the run.
        """
        with distributed.process_group(self.device):
            return self._fit(run_name, nested, tags)

    def _fit(self, run_name: str | None, nested: bool, tags: dict[str, str] | None
             ) -> TrainResult:
        settings = self.config.train
        main = distributed.is_main_process()
        resumed = self.resume_if_possible()
        if main and self.run_id is not None and not tracking.run_exists(self.run_id):
            print(f"regflow train: MLflow run {self.run_id} (recorded in {self.run_record_path}) "
                  f"is not in the tracking store {redact_text(tracking.tracking_uri())}; "
                  f"{'continuing from step ' + str(self.step) if resumed else 'starting'} "
                  "in a new run", file=sys.stderr, flush=True)
            self.run_id = None
        resumed_from = self.step
        if not resumed and settings.init_from:
            self.initialise_from(settings.init_from)
        if main:
            fileio.remove_stale_temporaries(self.out_dir)  # left by a killed save
        self.network = distributed.wrap(self.model, self.device)
        experiment = paths.experiment_name(self.manifest.dataset)
        loader = build_dataloader(self.manifest_path, "train", self.config, train=True)
        stopped_early = False
        new_run = self.run_id is None
        with tracking.start_or_resume_run(experiment, run_id=self.run_id,
                                          run_name=run_name or settings.name,
                                          nested=nested, tags=tags,
                                          log_system_metrics=not nested) as run:
            self.run_id = distributed.broadcast_from_main(run.info.run_id if main else None)
            if new_run:
                tracking.log_config(self.config)
                tracking.set_tag("regflow.config_digest", self.digest)
                tracking.log_dataset_input(self.manifest_path, self.manifest.dataset,
                                           "training")
            if resumed:
                tracking.set_tag("regflow.resumed_from_step", str(self.step))
            if main:
                self.write_run_record()
            batches = endless_batches(loader, self.epoch)
            progress = TrainingProgress(settings.steps, self.step, enabled=main)
            while self.step < settings.steps:
                self.epoch, batch = next(batches)
                started = time.perf_counter()
                values = self.train_step(batch)
                elapsed = time.perf_counter() - started
                values = distributed.mean_over_ranks(values, self.device)  # the global batch's
                self.step += 1
                metrics = {f"train/{name}": value for name, value in values.items()}
                metrics["train/lr"] = self.scheduler.get_last_lr()[0]
                metrics["train/step_time_s"] = elapsed
                tracking.log_metrics(metrics, step=self.step)
                progress.update(values)
                if self.step % settings.val_every == 0 or self.step == settings.steps:
                    stopped_early = distributed.broadcast_from_main(
                        main and self.after_validation(self.validate()))
                if main and (self.step % settings.checkpoint_every == 0 or stopped_early):
                    self.save(self.last_path)
                if stopped_early:
                    break
            progress.close()
            if main:
                self.save(self.last_path)
                if not self.best_path.exists():
                    self.save(self.best_path)
            tracking.log_artifact(self.best_path, artifact_path="checkpoints")
            tracking.log_metrics({"train/steps_done": self.step})
            self.best_score = distributed.broadcast_from_main(self.best_score)
        self.report_rank(resumed_from if resumed else None)
        return TrainResult(self.run_id, self.step, self.best_score, self.best_path,
                           self.last_path, stopped_early)

    def report_rank(self, resumed_from: int | None) -> None:
        """Under DDP, one line per rank on stderr: its step, where it resumed, its weights' hash.

        The hashes agree on every rank when DDP kept the replicas in step.
        """
        if not distributed.is_active():
            return
        start = "fresh" if resumed_from is None else f"resumed from step {resumed_from}"
        print(f"regflow train: rank {distributed.rank()}/{distributed.world_size()} "
              f"step {self.step} ({start}) weights sha256 {distributed.state_checksum(self.model)}",
              file=sys.stderr, flush=True)
