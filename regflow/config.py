"""params.yaml -> typed, validated configuration.

One section per pipeline stage. Unknown keys, wrong types and out-of-range values are errors that
name the key path and what is allowed. ``-S key.path=value`` overrides work as in
``dvc exp run -S``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from regflow import components
from regflow.errors import ConfigError

PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]
Shape3 = Annotated[list[PositiveInt], Field(min_length=2, max_length=3)]
FolderList = Annotated[list[str], Field(min_length=1)]


def _check_known(kind: str, names: list[str], known: list[str]) -> None:
    """Raise ValueError naming the first of ``names`` not in ``known`` and listing ``known``."""
    for name in names:
        if name not in known:
            raise ValueError(f"unknown {kind} {name!r}; known: {', '.join(map(repr, known))}")


class Section(BaseModel):
    """Base of every config section: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LocalDataset(Section):
    """A user's own dataset in DeepReg's folder layout."""

    path: str
    pairing: Literal["paired", "unpaired", "grouped"]
    format: Literal["nifti", "h5"] = "nifti"
    label_names: list[str] | None = None
    # the folders of each split, relative to path (DeepReg's dir lists); None: path/<split>
    splits: dict[Literal["train", "val", "test"], FolderList] | None = None


class DataConfig(Section):
    """Which dataset and where its files live (relative to the repository root)."""

    dataset: str = "msd-hippocampus"
    raw_dir: str = "data/raw"
    processed_dir: str = "data/processed"
    local: dict[str, LocalDataset] = Field(default_factory=dict)


class PreprocessConfig(Section):
    """Resampling, crop/pad, normalisation and splits."""

    shape: Shape3 = Field(default_factory=lambda: [48, 64, 48])
    spacing: list[Annotated[float, Field(gt=0)]] | None = None
    resize: bool = False  # resample every image to `shape` over its own field of view (DeepReg)
    normalise: Literal["minmax", "percentile", "none"] = "minmax"
    percentiles: Annotated[list[Annotated[float, Field(ge=0, le=100)]], Field(min_length=2,
                                                                             max_length=2)] = (
        Field(default_factory=lambda: [0.5, 99.5])
    )
    one_hot: bool = False
    soft_labels: bool = False  # labels are probabilities in [0, 1], kept as floats
    val_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.1
    test_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.1
    folds: Annotated[int, Field(ge=0)] = 0

    @model_validator(mode="after")
    def _check_fractions(self) -> PreprocessConfig:
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("val_fraction + test_fraction must be below 1")
        if self.percentiles[0] >= self.percentiles[1]:
            raise ValueError("percentiles must be [low, high] with low < high")
        if self.resize and self.spacing is not None:
            raise ValueError("resize (to the shape) and spacing (a voxel size) exclude each "
                             "other; set one")
        return self


class AffineAugment(Section):
    """Random affine augmentation (TorchIO RandomAffine)."""

    enabled: bool = True
    # zoom factor drawn from [1 - scales, 1 + scales], or from [low, high] when given as a pair
    scales: NonNegativeFloat | Annotated[list[NonNegativeFloat],
                                         Field(min_length=2, max_length=2)] = 0.05
    degrees: NonNegativeFloat = 5.0
    translation: NonNegativeFloat = 2.0


class ElasticAugment(Section):
    """Smooth random elastic deformation (TorchIO RandomElasticDeformation)."""

    enabled: bool = True
    control_points: Annotated[int, Field(ge=5)] = 7
    max_displacement: NonNegativeFloat = 3.0


class IntensityAugment(Section):
    """Random gamma / noise on images only."""

    enabled: bool = True
    log_gamma: NonNegativeFloat = 0.2
    noise_std: NonNegativeFloat = 0.0


class FlipAugment(Section):
    """Random mirroring of the whole pair: fixed, moving and their labels flipped alike (TorchIO
    RandomFlip), each listed array axis with probability 0.5."""

    enabled: bool = False
    axes: Annotated[list[Annotated[int, Field(ge=0, le=2)]], Field(min_length=1)] = Field(
        default_factory=lambda: [0, 1, 2])


class AugmentConfig(Section):
    """Training-time augmentation; never applied to validation or test data."""

    enabled: bool = True
    flip: FlipAugment = Field(default_factory=FlipAugment)
    affine: AffineAugment = Field(default_factory=AffineAugment)
    elastic: ElasticAugment = Field(default_factory=ElasticAugment)
    intensity: IntensityAugment = Field(default_factory=IntensityAugment)


class PatchConfig(Section):
    """Optional patch sampling through a tio.Queue for volumes too large for memory."""

    size: Shape3 | None = None
    samples_per_volume: PositiveInt = 4
    queue_length: PositiveInt = 16


class LoaderConfig(Section):
    """Pair sampling and batching."""

    batch_size: PositiveInt = 2
    num_workers: Annotated[int, Field(ge=0)] = 0
    sample_label: Literal["stack", "sample", "all"] = "stack"
    intra_group_prob: Annotated[float, Field(ge=0, le=1)] = 1.0
    intra_group_option: Literal["forward", "backward", "unconstrained"] = "forward"
    group_pairs: Literal["sampled", "all"] = "sampled"  # all: every intra-group pair per epoch
    eval_pairs: PositiveInt = 40
    cache_volumes: bool = True
    fold: NonNegativeInt | None = None  # cross-validation: validate on this fold, train on the rest
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    patch: PatchConfig = Field(default_factory=PatchConfig)


class BackboneConfig(Section):
    """Network backbone (a built-in or one an installed package adds, see regflow.components)."""

    name: str = "local"
    channels: list[PositiveInt] = Field(default_factory=lambda: [16, 32, 64])
    norm: Literal["instance", "batch", "none"] = "instance"
    extract_levels: list[NonNegativeInt] | None = None  # local: levels whose fields are summed
    pooling: bool = True  # down-sample by max pooling (false: stride-2 convolutions, as DeepReg)
    concat_skip: bool = True  # unet: concatenate encoder skips (false: add them, as DeepReg)

    @field_validator("name")
    @classmethod
    def _known_backbone(cls, name: str) -> str:
        _check_known("backbone", [name], components.backbone_names())
        return name


class HyperConfig(Section):
    """Amortised loss weight (HyperMorph): the weight of the ``train.loss`` term ``term``
    (``group.name``) is drawn per batch, log-uniformly from [low, high], and given to the network,
    which then registers for any weight of that range at test time (``evaluate.hyper_weight``)."""

    term: str = "regularization.bending_energy"
    low: Annotated[float, Field(gt=0)] = 0.1
    high: Annotated[float, Field(gt=0)] = 10.0

    @model_validator(mode="after")
    def _check_range(self) -> HyperConfig:
        if self.low >= self.high:
            raise ValueError("low must be below high")
        return self


class ModelConfig(Section):
    """RegistrationModel: method + backbone."""

    method: Literal["ddf", "dvf", "affine", "conditional"] = "ddf"
    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    integration_steps: Annotated[int, Field(ge=0, le=20)] = 7
    integration_downsize: Annotated[int, Field(ge=1, le=8)] = 1  # dvf: integrate on a coarser grid
    passes: Annotated[int, Field(ge=1, le=4)] = 1  # ddf/dvf: backbone passes composed (a cascade)
    hyper: HyperConfig | None = None  # HyperMorph: a loss weight drawn per batch, fed to the net
    # ddf/dvf: the field on a cubic B-spline grid with this control point spacing in voxels (one
    # per axis, or one for all), DeepReg's control_points; None: a dense field
    control_points: PositiveInt | list[PositiveInt] | None = None


LOSS_GROUPS = ("image", "label", "regularization")


class LossTerm(Section):
    """One weighted loss term; weight 0 disables exactly this term."""

    weight: NonNegativeFloat = 1.0
    options: dict[str, Any] = Field(default_factory=dict)


class LossConfig(Section):
    """Loss map: group -> term name -> {weight, options}.

    Term names are the built-ins and those installed packages add (see regflow.components).
    """

    image: dict[str, LossTerm] = Field(default_factory=dict)
    label: dict[str, LossTerm] = Field(default_factory=dict)
    regularization: dict[str, LossTerm] = Field(default_factory=dict)

    @field_validator("image", "label", "regularization")
    @classmethod
    def _known_terms(cls, terms: dict[str, LossTerm], info: ValidationInfo
                     ) -> dict[str, LossTerm]:
        _check_known("term", list(terms), components.loss_names(info.field_name))
        return terms


class OptimizerConfig(Section):
    """An optimiser by name with an optional schedule and gradient clipping."""

    name: Literal["adam", "adamw", "sgd", "rmsprop"] = "adam"
    momentum: NonNegativeFloat = 0.0  # sgd and rmsprop only
    lr: Annotated[float, Field(gt=0)] = 1e-3
    weight_decay: NonNegativeFloat = 0.0
    schedule: Literal["constant", "cosine", "step"] = "constant"
    warmup_steps: NonNegativeInt = 0
    clip_grad_norm: NonNegativeFloat = 0.0


class SymmetricConfig(Section):
    """Symmetric training: every pair registered in both directions in the same step (twice the
    registrations per step), with an optional inverse-consistency penalty on the two fields."""

    enabled: bool = False
    consistency_weight: NonNegativeFloat = 0.0


class TrainConfig(Section):
    """Training run."""

    name: str = "hippocampus"
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    symmetric: SymmetricConfig = Field(default_factory=SymmetricConfig)
    steps: PositiveInt = 1000
    val_every: PositiveInt = 100
    checkpoint_every: PositiveInt = 50
    # what steps, val_every and checkpoint_every count: optimiser steps, or epochs (DeepReg's
    # unit: passes over the training pairs, each ceil(pairs / batch) steps once data exist)
    unit: Literal["steps", "epochs"] = "steps"
    early_stopping_patience: Annotated[int, Field(ge=0)] = 0
    amp: bool = True
    device: Literal["auto", "cpu", "cuda"] = "auto"
    best_params: str | None = "models/tuning/best_params.yaml"
    init_from: str | None = None  # checkpoint path or models:/ URI: fine-tune from its weights

    def hyper_term(self) -> LossTerm | None:
        """The ``train.loss`` term of ``model.hyper`` (None without one)."""
        if self.model.hyper is None:
            return None
        group, _, name = self.model.hyper.term.partition(".")
        return getattr(self.loss, group, {}).get(name) if group in LOSS_GROUPS else None

    @model_validator(mode="after")
    def _check_hyper(self) -> TrainConfig:
        hyper = self.model.hyper
        if hyper is None:
            return self
        term = self.hyper_term()
        if term is None or term.weight <= 0:
            raise ValueError(f"model.hyper.term: {hyper.term!r} must name a train.loss term "
                             "(group.name) with a non-zero weight")
        if not hyper.low <= term.weight <= hyper.high:
            raise ValueError(f"model.hyper: the term's weight {term.weight} (the default at test "
                             f"time) must lie in [low, high] = [{hyper.low}, {hyper.high}]")
        return self

    @model_validator(mode="after")
    def _check_symmetric(self) -> TrainConfig:
        if (self.symmetric.enabled and self.symmetric.consistency_weight > 0
                and self.model.method == "conditional"):
            raise ValueError("symmetric.consistency_weight: method conditional predicts labels, "
                             "not a field; set it to 0 or use ddf, dvf or affine")
        return self


class RefineConfig(Section):
    """Test-time instance optimisation of the DDF (no labels): the training's image similarity
    and regulariser, coarse to fine (see regflow.refine). Used by evaluate, predict and serving;
    regflow.refine takes this section as it is.

    Attributes:
        steps: non-rigid optimisation steps in total (0: the starting field is returned as is).
        lr: Adam learning rate on the residual field, in voxels per step.
        levels: coarse-to-fine stages the steps are split over (1: full resolution only).
        regularization_scale: multiplies the training's regulariser weights.
        regularization_ratio: if set, replaces the scale: regulariser weight sum over image weight
            sum, whatever the training's (see regflow.refine.regularization_multiplier).
        regularize: ``field`` (the refined field) or ``residual`` (refined minus starting field).
        smooth_sigma: Gaussian smoothing of the starting field in voxels (0: none).
        affine_steps: steps of the affine stage of classical registration (model "none").
        affine_lr: Adam learning rate of the affine stage.
    """

    steps: NonNegativeInt = 0
    lr: Annotated[float, Field(gt=0)] = 0.1
    levels: Annotated[int, Field(ge=1, le=4)] = 2
    regularization_scale: NonNegativeFloat = 1.0
    regularization_ratio: NonNegativeFloat | None = None
    regularize: Literal["field", "residual"] = "field"
    smooth_sigma: NonNegativeFloat = 0.0
    affine_steps: NonNegativeInt = 0
    affine_lr: Annotated[float, Field(gt=0)] = 0.01


class EvaluateConfig(Section):
    """Evaluation of the trained model (and of no registration) on a split."""

    refine: RefineConfig = Field(default_factory=RefineConfig)
    # cascades: backbone passes at test time (None: as trained, train.model.passes)
    passes: Annotated[int, Field(ge=1, le=4)] | None = None
    # train.model.hyper models: the loss weight asked for (None: the term's weight in train.loss)
    hyper_weight: Annotated[float, Field(gt=0)] | None = None
    split: Literal["val", "test"] = "test"
    checkpoint: Literal["best", "last"] = "best"
    hd95: bool = True
    save_volumes: bool = True


class SearchParameter(Section):
    """One Optuna search dimension, addressed by its params key path."""

    type: Literal["float", "int", "categorical"] = "float"
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: list[Any] | None = None

    @model_validator(mode="after")
    def _check_range(self) -> SearchParameter:
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("categorical parameters need choices")
        elif self.low is None or self.high is None or self.low >= self.high:
            raise ValueError("numeric parameters need low < high")
        elif self.log and self.low <= 0:
            raise ValueError("log-uniform parameters need low > 0")
        return self


class TuneConfig(Section):
    """Optuna study over any params keys: a training sweep (shortened trainings), or, when every
    searched key is under ``evaluate.``, a test-time sweep of one trained model (see
    regflow.tuning)."""

    enabled: bool = True
    trials: Annotated[int, Field(ge=0)] = 4
    steps: PositiveInt = 100  # training sweeps: steps per trial
    val_every: PositiveInt = 50
    val_pairs: PositiveInt | None = None  # validation pairs per trial (None: loader.eval_pairs)
    init_from: str | None = None  # training sweeps: every trial fine-tunes from this checkpoint
    baseline_trial: bool = True  # trial 0 runs the config's own values of the searched keys
    pruner: Literal["median", "hyperband", "successive_halving", "none"] = "median"
    multi_objective: bool = False  # (Dice, SDlogJ) on a Pareto front; folding a constraint
    max_folding_pct: NonNegativeFloat = 1.0
    max_sdlogj: NonNegativeFloat | None = None  # the rule's SDlogJ limit (None: none)
    folding_penalty: NonNegativeFloat = 0.0  # Dice per folding %, subtracted from the objective
    study_name: str = "regflow"
    storage: str | None = None
    heartbeat_s: Annotated[int, Field(ge=1)] = 10
    search_space: dict[str, SearchParameter] = Field(default_factory=dict)

    @field_validator("search_space", mode="before")
    @classmethod
    def _flatten_search_space(cls, value: Any) -> Any:
        """Join nested maps into dotted keys: ``-S tune.search_space.train.optimizer.lr.low=0.1``
        splits the key at its dots. A map holding a SearchParameter field is one dimension."""
        if not isinstance(value, dict):
            return value
        flat: dict[str, Any] = {}

        def walk(prefix: str, node: dict[str, Any]) -> None:
            for key, child in node.items():
                path = f"{prefix}.{key}" if prefix else str(key)
                if isinstance(child, dict) and child and not (
                        child.keys() & SearchParameter.model_fields):
                    walk(path, child)
                elif isinstance(child, dict) and isinstance(flat.get(path), dict):
                    flat[path] = {**flat[path], **child}
                else:
                    flat[path] = child

        walk("", value)
        return flat


class RegistryConfig(Section):
    """Model Registry: name, aliases and the promotion gate."""

    model_name: str = "regflow"
    max_folding_pct: NonNegativeFloat = 1.0


class Config(Section):
    """The whole params.yaml."""

    seed: Annotated[int, Field(ge=0)] = 42
    data: DataConfig = Field(default_factory=DataConfig)
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    loader: LoaderConfig = Field(default_factory=LoaderConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)

    def in_steps(self, steps_per_epoch: int) -> Config:
        """This config with ``train.unit`` "epochs" turned into steps: ``steps``, ``val_every``
        and ``checkpoint_every`` multiplied by ``steps_per_epoch``; a config in steps comes back
        as it is."""
        if self.train.unit == "steps":
            return self
        train = self.train.model_copy(update={
            "unit": "steps", **{key: getattr(self.train, key) * steps_per_epoch
                                for key in ("steps", "val_every", "checkpoint_every")}})
        return self.model_copy(update={"train": train})


def parse_yaml(text: str, source: str) -> Any:
    """Parse YAML text; a syntax error becomes one line naming ``source`` and the problem.

    Raises:
        ConfigError: not valid YAML.
    """
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or exc.__class__.__name__
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{source}: not valid YAML ({problem}{where})") from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``key.path=value`` into its key path and YAML-parsed value.

    Raises:
        ConfigError: no ``=``, an empty key or key segment, or a value that is not valid YAML.
    """
    key, sep, raw_value = text.partition("=")
    keys = key.strip().split(".")
    if not sep or not all(part.strip() for part in keys):
        raise ConfigError(f"override {text!r}: expected key.path=value")
    return keys, parse_yaml(raw_value, f"override {text!r}") if raw_value else None


def apply_override(tree: dict[str, Any], keys: list[str], value: Any) -> None:
    """Set ``tree[k1][k2]...[kn] = value``, creating intermediate maps as needed."""
    node = tree
    for key in keys[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = {}
            node[key] = child
        node = child
    node[keys[-1]] = value


def _describe(error: dict[str, Any]) -> str:
    location = ".".join(str(part) for part in error["loc"])
    if error["type"] == "extra_forbidden":
        return f"{location}: unknown key"
    message = error["msg"].removeprefix("Value error, ")
    if location and re.match(r"[a-z_]+(\.[a-z_]+)*: ", message):  # a key below the location
        return f"{location}.{message}"
    return f"{location}: {message}" if location else message


def validate_config(tree: dict[str, Any], source: str = "params.yaml") -> Config:
    """Validate a plain dict into a :class:`Config`.

    Raises:
        ConfigError: one line naming the source, the first bad key path and what is allowed.
    """
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {_describe(exc.errors()[0])}") from None


def read_config_text(path: Path) -> str:
    """The UTF-8 text of a config file.

    Raises:
        ConfigError: the file cannot be read or is not UTF-8 text.
    """
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None


def load_config(path: str | Path = "params.yaml", overrides: list[str] | tuple[str, ...] = (),
                presets: dict[str, Any] | None = None) -> Config:
    """Read params.yaml (missing -> all defaults; empty -> error), apply presets and overrides.

    Args:
        path: the YAML file.
        overrides: ``key.path=value`` strings, as ``dvc exp run -S`` takes them.
        presets: ``{"key.path": value}`` applied before the overrides (tuned parameters).

    Raises:
        ConfigError: unreadable or empty file, bad YAML, bad override, unknown key or bad value.
    """
    path = Path(path)
    tree: dict[str, Any] = {}
    if path.exists():
        tree = parse_yaml(read_config_text(path), str(path))
        if tree is None:
            raise ConfigError(f"{path}: the file is empty (give at least one section, or remove "
                              f"the file to use the defaults)")
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
    elif path.name != "params.yaml":
        raise ConfigError(f"{path}: no such config file")
    for key_path, value in (presets or {}).items():
        apply_override(tree, key_path.split("."), value)
    for text in overrides:
        keys, value = parse_override(text)
        apply_override(tree, keys, value)
    return validate_config(tree, source=str(path))


def load_training_config(path: str | Path = "params.yaml",
                         overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Like :func:`load_config`, with the tuned ``train.best_params`` file merged in.

    Precedence: params.yaml < best params (``{"train.loss...weight": value}``) < overrides.
    """
    config = load_config(path, overrides)
    best_path = config.train.best_params
    if not best_path or not Path(best_path).exists():
        return config
    best = parse_yaml(read_config_text(Path(best_path)), best_path) or {}
    if not isinstance(best, dict):
        raise ConfigError(f"{best_path}: expected a mapping of params key -> value")
    return load_config(path, overrides, presets=best)


def flatten(config: Config) -> dict[str, Any]:
    """Flatten the config into ``{"a.b.c": value}`` (for MLflow params)."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict) and node:
            for key, child in node.items():
                walk(f"{prefix}.{key}" if prefix else str(key), child)
        else:
            flat[prefix] = node

    walk("", config.model_dump())
    return flat
