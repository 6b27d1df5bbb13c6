"""DeepReg YAML configs -> a regflow params file.

DeepReg runs ``deepreg_train --config_path a.yaml b.yaml``: the files are merged in order, a later
file overriding an earlier one key by key (maps merge recursively, anything else is replaced).
:func:`merge_configs` does the same; :func:`translate` first upgrades DeepReg 0.1.0/0.1.1 trees as
DeepReg does (:mod:`regflow.deepreg.upgrade`), then maps the tree onto regflow's params and picks
the loss options that reproduce DeepReg's formulas. Every DeepReg key is used, reported as not
translated (with the reason), or reported as ignored because DeepReg ignores it too; nothing is
dropped silently.

All translation tables live at the top of this module.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from regflow import fileio
from regflow.components import BUILTIN_BACKBONES
from regflow.config import validate_config
from regflow.data.layouts import discover_cases
from regflow.deepreg.upgrade import leaves, upgrade
from regflow.errors import ConfigError, RegflowError

# the order of the sections in the written params file, as in params.yaml
SECTION_ORDER = ("data", "preprocess", "loader", "train", "tune")

# DeepReg split name -> the folder name regflow reads under the dataset root
SPLIT_FOLDERS = {"train": "train", "valid": "val", "test": "test"}

# DeepReg loss group -> name -> (regflow term, options that give DeepReg's formula)
LOSS_NAMES: dict[str, dict[str, tuple[str, dict[str, Any]]]] = {
    "image": {
        "lncc": ("lncc", {"border": "zero_pad", "smooth_nr": 1e-5, "eps": 1e-5}),
        "ssd": ("ssd", {}),
        "gmi": ("gmi", {"eps": 1e-5}),
        "gncc": ("gncc", {"squared": True, "eps": 1e-5}),
    },
    "label": {
        "dice": ("dice", {"denominator": "linear", "smooth_nr": 1e-5, "smooth_dr": 1e-5,
                          "background_mode": "generalised"}),
        "jaccard": ("jaccard", {"denominator": "linear", "smooth_nr": 1e-5, "smooth_dr": 1e-5,
                                "background_mode": "generalised"}),
        "ssd": ("ssd", {}),
        "cross-entropy": ("cross_entropy", {"smooth": 1e-5, "background_mode": "generalised"}),
    },
    "regularization": {
        "bending": ("bending_energy", {"stencil": "wide"}),
        "gradient": ("gradient_norm", {"norm": "l2"}),
    },
}

# DeepReg loss option -> regflow option, per regflow term (DeepReg's own defaults are above)
OVERLAP_OPTIONS = {"scales": "scales", "binary": "binary", "smooth_nr": "smooth_nr",
                   "smooth_dr": "smooth_dr", "background_weight": "background_weight",
                   "kernel": "kernel"}
LOSS_OPTIONS: dict[str, dict[str, str]] = {
    "lncc": {"kernel_size": "kernel_size", "kernel_type": "kernel", "smooth_nr": "smooth_nr",
             "smooth_dr": "eps"},
    "gmi": {"num_bins": "num_bins", "sigma_ratio": "sigma_ratio"},
    "dice": OVERLAP_OPTIONS,
    "jaccard": OVERLAP_OPTIONS,
    "ssd": {"scales": "scales", "kernel": "kernel"},
    "cross_entropy": {"scales": "scales", "binary": "binary", "smooth": "smooth",
                      "background_weight": "background_weight", "kernel": "kernel"},
}

OPTIMIZER_NAMES = {"adam": "adam", "adamw": "adamw", "sgd": "sgd", "rms": "rmsprop",
                   "rmsprop": "rmsprop"}

AUGMENTATIONS = ("affine", "ddf")

# train.preprocess keys with a reason they are not translated
PREPROCESS_REASONS = {
    "shuffle_buffer_num_batch": "regflow reshuffles the whole training set every epoch",
    "num_parallel_calls": "regflow loads in the main process (loader.num_workers)",
}


@dataclass
class Translation:
    """The result of :func:`translate`.

    Attributes:
        params: the regflow params tree (what params.yaml holds).
        skipped: ``(DeepReg key path, reason)`` for every key that was not translated.
        notes: conversions worth knowing (steps from epochs, renamed methods, ...).
        ignored: ``(DeepReg key path, reason)`` for keys DeepReg itself does not use in this
            config (another optimiser's settings, label losses of unlabelled data).
    """

    params: dict[str, Any]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    ignored: list[tuple[str, str]] = field(default_factory=list)


def merge_configs(trees: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Merge DeepReg config trees in order: later maps merge into earlier ones recursively,
    any other value (lists included) replaces the earlier one.

    Returns:
        a new tree; the inputs are not modified.
    """

    def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
        merged = dict(base)
        for key, value in update.items():
            if isinstance(value, dict):
                earlier = merged.get(key)
                merged[key] = merge(earlier if isinstance(earlier, dict) else {}, value)
            else:
                merged[key] = value
        return merged

    result: dict[str, Any] = {}
    for tree in trees:
        result = merge(result, tree)
    return result


def read_deepreg_configs(paths: Sequence[str | Path]) -> dict[str, Any]:
    """Read and merge DeepReg YAML files in order (see :func:`merge_configs`).

    Raises:
        ConfigError: a missing or unreadable file, invalid YAML, or a file that is not a mapping.
    """
    trees = []
    for path in map(Path, paths):
        try:
            tree = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read ({getattr(exc, 'strerror', None) or exc})"
                              ) from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc.__class__.__name__})") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: a DeepReg config is a mapping with dataset/train sections")
        trees.append(tree)
    return merge_configs(trees)


class _Reader:
    """Reads a DeepReg tree by key path and remembers which leaves were used or reported."""

    def __init__(self, tree: dict[str, Any]) -> None:
        self.tree = tree
        self.handled: set[str] = set()
        self.skipped: list[tuple[str, str]] = []
        self.ignored: list[tuple[str, str]] = []

    def node(self, path: str) -> Any:
        """The value at a dotted path (``[i]`` indexes lists), or None."""
        node: Any = self.tree
        for part in re.findall(r"[^.\[\]]+|\[\d+\]", path):
            if part.startswith("["):
                index = int(part[1:-1])
                node = node[index] if isinstance(node, list) and index < len(node) else None
            else:
                node = node.get(part) if isinstance(node, dict) else None
        return node

    def get(self, path: str, default: Any = None) -> Any:
        """The value at ``path`` (``default`` when absent); its leaves count as translated."""
        value = self.node(path)
        self._mark(path)
        return default if value is None else value

    def skip(self, path: str, reason: str, ignored: bool = False) -> None:
        """Report every leaf under ``path`` (if present) with ``reason``: as not translated, or
        as ``ignored`` (DeepReg does not use it either)."""
        if self.node(path) is None:
            return
        report = self.ignored if ignored else self.skipped
        for leaf in leaves(self.node(path), path):
            if leaf not in self.handled:
                report.append((leaf, reason))
        self._mark(path)

    def _mark(self, path: str) -> None:
        if self.node(path) is not None:
            self.handled.update(leaves(self.node(path), path))

    def unhandled(self) -> list[str]:
        """Leaves neither translated nor reported, in file order."""
        return [leaf for leaf in leaves(self.tree) if leaf not in self.handled]


def _split_settings(reader: _Reader) -> dict[str, dict[str, Any]]:
    """{deepreg split: {dir, format, labeled}} of ``dataset.<split>`` (None where absent)."""
    return {split: {key: reader.get(f"dataset.{split}.{key}")
                    for key in ("dir", "format", "labeled")} for split in SPLIT_FOLDERS}


def _dir_list(value: Any) -> list[str]:
    """A split's DeepReg ``dir``: one folder or a list of them, as a list of paths."""
    if value is None:
        return []
    return [str(folder) for folder in (value if isinstance(value, list) else [value])]


def _train_samples(folders: Sequence[Path], pairing: str, file_format: str,
                   sample_image_in_group: bool) -> int | None:
    """Training samples per DeepReg epoch over the training folders: pairs (paired), images // 2
    (unpaired), groups (grouped, one pair per group) or images (grouped without sampling); None
    if a folder is unreadable."""
    try:
        found = [discover_cases(folder, f"deepreg-{pairing}", pairing, file_format)[0]
                 for folder in folders]
    except RegflowError:
        return None
    if pairing == "unpaired":
        return max(1, sum(map(len, found)) // 2)
    if pairing == "grouped" and sample_image_in_group:
        return sum(len({case.group for case in cases}) for cases in found)
    return sum(map(len, found))


def _split_folders(reader: _Reader, dirs: dict[str, list[str]]
                   ) -> tuple[str, dict[str, list[str]] | None]:
    """The data.local root and, unless they are ``<root>/{train,val,test}``, the folders of each
    regflow split relative to it (DeepReg's ``valid`` is regflow's ``val``)."""
    if dirs["valid"] and dirs["valid"] == dirs["test"]:
        reader.skipped.append(("dataset.valid.dir", "the test folder doubles as validation in "
                               "DeepReg; regflow never validates on test data and carves val out "
                               "of train (preprocess.val_fraction)"))
        dirs = {**dirs, "valid": []}
    used = {folder: split for split, folder in SPLIT_FOLDERS.items() if dirs[split]}
    try:
        root = os.path.commonpath([str(Path(path).parent) for split in used.values()
                                   for path in dirs[split]])
    except ValueError:
        raise ConfigError("dataset: the split folders mix absolute and relative paths; use one "
                          "kind") from None
    splits = {folder: [os.path.relpath(path, root) for path in dirs[split]]
              for folder, split in used.items()}
    standard = all(folders == [folder] for folder, folders in splits.items())
    return root or ".", None if standard else splits


def _translate_data(reader: _Reader, name: str, params: dict[str, Any], notes: list[str]
                    ) -> tuple[str, bool, str, list[Path]]:
    """Fill data, preprocess and loader; return (pairing, labeled, file format, train folders)."""
    pairing = reader.get("dataset.type")
    if pairing not in ("paired", "unpaired", "grouped"):
        raise ConfigError(f"dataset.type: expected paired, unpaired or grouped, got {pairing!r}")
    splits = _split_settings(reader)
    dirs = {split: _dir_list(values["dir"]) for split, values in splits.items()}
    if not dirs["train"]:
        raise ConfigError("dataset.train.dir: DeepReg configs need a training folder")
    file_format = splits["train"]["format"] or "nifti"
    labeled = splits["train"]["labeled"]
    labeled = True if labeled is None else bool(labeled)
    for split in ("valid", "test"):
        for key, value in (("format", file_format), ("labeled", labeled)):
            other = splits[split][key]
            if other is not None and other != value:
                reader.skipped.append((f"dataset.{split}.{key}", f"regflow uses the train "
                                       f"split's {key} ({value}) for every split"))
    root, folders = _split_folders(reader, dirs)
    local: dict[str, Any] = {"path": root, "pairing": pairing, "format": file_format}
    if folders is not None:
        local["splits"] = folders
    params["data"] = {"dataset": name, "local": {name: local}}
    shape = (reader.get("dataset.fixed_image_shape") if pairing == "paired"
             else reader.get("dataset.image_shape"))
    if pairing == "paired":
        moving_shape = reader.get("dataset.moving_image_shape")
        reader.skip("dataset.image_shape", "paired data use fixed_image_shape")
        if moving_shape is not None and moving_shape != shape:
            notes.append(f"dataset.moving_image_shape {moving_shape}: moving images are resized "
                         f"to the fixed shape {shape} (their field of view kept), which is what "
                         "DeepReg's network sees")
    # DeepReg reads labels as probabilities in [0, 1] and refuses other values
    params["preprocess"] = {"normalise": "minmax", "soft_labels": labeled}
    if shape is not None:  # DeepReg resizes (interpolates) every image to its shape
        params["preprocess"].update(shape=list(shape), resize=True)
    loader: dict[str, Any] = {"sample_label": reader.get("dataset.sample_label", "sample")}
    if pairing == "grouped":
        loader["intra_group_prob"] = reader.get("dataset.intra_group_prob", 1.0)
        loader["intra_group_option"] = reader.get("dataset.intra_group_option", "forward")
        if reader.get("dataset.sample_image_in_group", True) is False:
            loader["group_pairs"] = "all"
    params["loader"] = loader
    return pairing, labeled, file_format, [Path(folder) for folder in dirs["train"]]


def _backbone(reader: _Reader, backbone: str) -> dict[str, Any]:
    """Backbone name, widths and levels: num_channel_initial doubling per level; DeepReg's depth
    (or the deepest extract level for local) is the number of poolings, as regflow's
    ``len(channels)``; LocalNet's extract levels carry over when they are not all levels."""
    initial = int(reader.get("train.backbone.num_channel_initial", 16))
    settings: dict[str, Any] = {"name": backbone}
    if backbone == "local":
        levels = sorted(set(reader.get("train.backbone.extract_levels", [0, 1, 2, 3])))
        depth = max(levels)
        reader.skip("train.backbone.depth", "local uses extract_levels")
    else:
        depth = int(reader.get("train.backbone.depth", 3))
        reader.skip("train.backbone.extract_levels", f"{backbone} uses depth")
    settings["channels"] = [initial * 2**level for level in range(max(1, depth))]
    if backbone == "local" and levels != list(range(len(settings["channels"]) + 1)):
        settings["extract_levels"] = levels
    return settings


def _translate_model(reader: _Reader, params: dict[str, Any], notes: list[str]) -> str:
    """Fill train.model; return the regflow method."""
    method = reader.get("train.method", "ddf")
    if method not in ("ddf", "dvf", "conditional", "affine"):
        raise ConfigError(f"train.method: expected ddf, dvf or conditional, got {method!r}")
    backbone = reader.get("train.backbone.name", "local")
    if backbone not in BUILTIN_BACKBONES:
        raise ConfigError(f"train.backbone.name: regflow has {', '.join(BUILTIN_BACKBONES)}, "
                          f"not {backbone!r}")
    if backbone == "global" and method != "affine":
        notes.append(f"train.method {method} with backbone global -> regflow method affine "
                     "(GlobalNet's affine turned into a DDF, as in DeepReg)")
        method = "affine"
    for key in ("encode_kernel_sizes", "decode_kernel_sizes", "strides", "padding",
                "out_kernel_initializer", "out_activation", "encode_num_channels",
                "decode_num_channels"):
        reader.skip(f"train.backbone.{key}", "no regflow equivalent (fixed by the backbone)")
    model: dict[str, Any] = {"method": method, "backbone": {**_backbone(reader, backbone),
                                                            "norm": "batch"}}
    model["backbone"].update(_skips_and_pooling(reader, backbone))
    control_points = reader.node("train.backbone.control_points")
    if control_points and method in ("ddf", "dvf"):
        model["control_points"] = reader.get("train.backbone.control_points")
    else:
        reader.skip("train.backbone.control_points", f"DeepReg's B-spline grid shapes a ddf or "
                    f"dvf, not method {method}")
    params["train"]["model"] = model
    notes.append("train.model.backbone.norm batch: DeepReg's conv blocks use batch norm")
    return method


def _skips_and_pooling(reader: _Reader, backbone: str) -> dict[str, Any]:
    """``pooling`` as given (DeepReg's default true is regflow's); ``concat_skip`` for unet,
    whose skips DeepReg adds unless told to concatenate (regflow concatenates by default)."""
    settings = {}
    if reader.node("train.backbone.pooling") is not None:
        settings["pooling"] = bool(reader.get("train.backbone.pooling"))
    concat = reader.node("train.backbone.concat_skip")
    if backbone == "unet":
        settings["concat_skip"] = bool(reader.get("train.backbone.concat_skip", False))
    elif concat:
        reader.skip("train.backbone.concat_skip", f"regflow's {backbone} backbone adds its skips")
    else:
        reader.get("train.backbone.concat_skip")  # false: what the backbone does anyway
    return settings


def _loss_entries(reader: _Reader, group: str) -> list[tuple[str, dict[str, Any]]]:
    """(key path, entry) for a DeepReg loss group: one ``{name, weight, ...}`` map or a list."""
    path = f"train.loss.{group}"
    node = reader.node(path)
    if node is None:
        return []
    if isinstance(node, dict):
        return [(path, node)]
    if isinstance(node, list):
        return [(f"{path}[{index}]", entry) for index, entry in enumerate(node)
                if isinstance(entry, dict)]
    raise ConfigError(f"{path}: expected a loss map or a list of them")


def _translate_loss(reader: _Reader, params: dict[str, Any], labeled: bool) -> None:
    """Fill train.loss with the DeepReg-compatible options of every term."""
    loss: dict[str, dict[str, Any]] = {}
    for group in ("image", "label", "regularization"):
        for path, entry in _loss_entries(reader, group):
            name = reader.node(f"{path}.name")
            if name not in LOSS_NAMES[group]:
                reader.skip(path, f"unknown DeepReg {group} loss {name!r}; regflow has "
                            f"{', '.join(LOSS_NAMES[group])}")
                continue
            if group == "label" and not labeled:
                reader.skip(path, "the data are unlabeled: DeepReg builds no label loss",
                            ignored=True)
                continue
            reader.get(f"{path}.name")
            term, options = LOSS_NAMES[group][name]
            options = dict(options)
            weight = float(reader.get(f"{path}.weight", 1.0))
            for key in entry:
                if key in ("name", "weight"):
                    continue
                if term == "gradient_norm" and key == "l1":
                    options["norm"] = "l1" if reader.get(f"{path}.l1") else "l2"
                elif key in LOSS_OPTIONS.get(term, {}):
                    value = reader.get(f"{path}.{key}")
                    if key == "scales" and not isinstance(value, list):
                        value = [value]
                    options[LOSS_OPTIONS[term][key]] = value
                else:
                    reader.skip(f"{path}.{key}", f"{term} has no such option in regflow")
            terms = loss.setdefault(group, {})
            if term in terms and terms[term]["options"] != options:
                reader.skip(path, f"a second {term} term with other options; regflow keeps one "
                            "term per name")
                continue
            if term in terms:
                terms[term]["weight"] += weight
            else:
                terms[term] = {"weight": weight, "options": options}
    params["train"]["loss"] = loss


def _translate_optimizer(reader: _Reader, params: dict[str, Any]) -> None:
    """Fill train.optimizer: name, learning rate, momentum, DeepReg's constant schedule."""
    given = str(reader.get("train.optimizer.name", "adam"))
    name = OPTIMIZER_NAMES.get(given.lower())
    if name is None:
        raise ConfigError(f"train.optimizer.name: regflow has adam, adamw, sgd and rmsprop, "
                          f"not {given!r}")
    settings = reader.node("train.optimizer") or {}
    optimizer: dict[str, Any] = {"name": name, "schedule": "constant", "warmup_steps": 0,
                                 "clip_grad_norm": 0.0, "weight_decay": 0.0}
    if reader.node("train.optimizer.learning_rate") is not None:
        optimizer["lr"] = float(reader.get("train.optimizer.learning_rate"))
    if reader.node("train.optimizer.momentum") is not None:
        if name in ("sgd", "rmsprop"):
            optimizer["momentum"] = float(reader.get("train.optimizer.momentum"))
        else:
            reader.skip("train.optimizer.momentum", f"{name} takes no momentum")
    for key, value in settings.items():
        if isinstance(value, dict):
            reader.skip(f"train.optimizer.{key}", f"unused by DeepReg too (optimizer is {given})",
                        ignored=True)
    params["train"]["optimizer"] = optimizer


def _translate_schedule(reader: _Reader, params: dict[str, Any], notes: list[str],
                        samples: int | None) -> None:
    """Fill loader.batch_size, train.steps/checkpoint_every/val_every from epochs."""
    batch = int(reader.get("train.preprocess.batch_size", 1))
    params["loader"]["batch_size"] = batch
    epochs = int(reader.get("train.epochs", 1))
    save_period = int(reader.get("train.save_period", epochs))
    if samples is None:
        per_epoch = 1
        params["train"]["unit"] = "epochs"
        notes.append("train.unit epochs: the training folders could not be read to count their "
                     "samples, so train.steps and the cadences count DeepReg's epochs "
                     "(ceil(samples / batch) steps each, counted when training starts)")
    else:
        per_epoch = math.ceil(samples / batch)
        notes.append(f"train.steps = epochs x ceil(train samples / batch) = {epochs} x "
                     f"ceil({samples} / {batch}) = {epochs * per_epoch}; checkpoint_every = "
                     f"save_period x {per_epoch} = {save_period * per_epoch}")
    params["train"]["steps"] = epochs * per_epoch
    params["train"]["checkpoint_every"] = max(1, save_period * per_epoch)
    params["train"]["val_every"] = params["train"]["checkpoint_every"]
    notes.append("train.val_every = checkpoint_every: DeepReg validates every epoch")
    for key, reason in PREPROCESS_REASONS.items():
        reader.skip(f"train.preprocess.{key}", reason)


def _affine_augment(scale: float) -> dict[str, Any]:
    """TorchIO RandomAffine settings spanning DeepReg's ``affine`` augmentation of ``scale``.

    DeepReg samples at ``x A + b``, x in voxels from the first voxel, with A and b fitted to four
    cube corners each scaled by factors drawn from [1 - scale, 1]: per axis a zoom of
    1 / A_ii in [1, 1 / (1 - scale)], off-diagonal terms within +-scale / 2 (a rotation of up to
    scale / 2 radians and a shear) and a shift within +-scale voxels. TorchIO draws the same zoom
    range, rotations up to that angle and shifts in mm, about the image centre, without shear.
    """
    return {"enabled": True, "scales": [1.0, round(1 / (1 - scale), 6)],
            "degrees": round(math.degrees(scale / 2), 6), "translation": float(scale)}


def _ddf_augment(strength: float, low_res_size: Sequence[int]) -> tuple[str, dict[str, Any]]:
    """(section, settings) of TorchIO's transform for DeepReg's ``ddf`` augmentation.

    DeepReg draws a ``low_res_size`` grid of displacements ``U(0, strength) x N(0, 1)`` voxels
    (standard deviation ``strength / sqrt(3)``) and resizes it linearly to the image. TorchIO's
    elastic deformation draws ``U(-d, d)`` (the same deviation for ``d = strength``) on a cubic
    B-spline grid whose outer two rings are held at zero: ``max(low_res_size) + 4`` control points
    leave DeepReg's number free per axis. A 1x1x1 grid is one random translation: TorchIO's
    RandomAffine translation of the same deviation.
    """
    if max(low_res_size) == 1:
        return "affine", {"enabled": True, "scales": 0.0, "degrees": 0.0,
                          "translation": float(strength)}
    return "elastic", {"enabled": True, "control_points": max(5, max(low_res_size) + 4),
                       "max_displacement": float(strength)}


def _translate_augmentation(reader: _Reader, params: dict[str, Any]) -> None:
    """DeepReg's data_augmentation entries -> loader.augment: TorchIO transforms spanning what
    DeepReg's draw (see :func:`_affine_augment` and :func:`_ddf_augment`)."""
    path = "train.preprocess.data_augmentation"
    node = reader.node(path)
    entries = node if isinstance(node, list) else [node] if isinstance(node, dict) else []
    augment: dict[str, Any] = {"affine": {"enabled": False}, "elastic": {"enabled": False}}
    for index, entry in enumerate(entries):
        entry_path = f"{path}[{index}]" if isinstance(node, list) else path
        name = entry.get("name")
        if name not in AUGMENTATIONS:
            reader.skip(entry_path, f"unknown augmentation {name!r}")
            continue
        reader.get(f"{entry_path}.name")
        if name == "affine":
            section, settings = "affine", _affine_augment(
                float(reader.get(f"{entry_path}.scale", 0.1)))
        else:
            size = reader.get(f"{entry_path}.low_res_size", [1, 1, 1])
            section, settings = _ddf_augment(float(reader.get(f"{entry_path}.field_strength", 1)),
                                             [int(value) for value in size])
        if augment[section]["enabled"]:
            reader.skip(entry_path, f"a second transform for TorchIO's {section} augmentation")
            continue
        augment[section] = settings
        for key in entry:
            if key not in ("name", "scale", "field_strength", "low_res_size"):
                reader.skip(f"{entry_path}.{key}", f"DeepReg's {name} augmentation has no such "
                            "option")
    params["loader"]["augment"] = {
        "enabled": augment["affine"]["enabled"] or augment["elastic"]["enabled"],
        **augment, "intensity": {"enabled": False}}


def translate(deepreg: dict[str, Any], name: str) -> Translation:
    """Translate a merged DeepReg config into a regflow params tree.

    Args:
        deepreg: the merged DeepReg tree (:func:`read_deepreg_configs`).
        name: the dataset and training name to use (data.local key, train.name).

    Returns:
        the params tree, every DeepReg key that was not translated with its reason, and notes.

    Raises:
        ConfigError: the config lacks what any DeepReg run needs (dataset.type, a train folder)
            or names a method, backbone or optimiser regflow does not have.
    """
    upgraded = upgrade(deepreg)
    reader = _Reader(upgraded.tree)
    reader.ignored += upgraded.ignored
    notes = [f"DeepReg's upgrade of older configs: {change}" for change in upgraded.changes]
    params: dict[str, Any] = {"train": {"name": name, "amp": False, "best_params": None},
                              "tune": {"enabled": False}}
    pairing, labeled, file_format, train_folders = _translate_data(reader, name, params, notes)
    method = _translate_model(reader, params, notes)
    if method == "conditional" and not labeled:
        raise ConfigError("train.method conditional needs labeled data")
    _translate_loss(reader, params, labeled)
    if not any(term["weight"] > 0 for terms in params["train"]["loss"].values()
               for term in terms.values()):
        raise ConfigError("train.loss: no DeepReg loss term with a non-zero weight could be "
                          "translated; the config's loss section is empty or unknown")
    _translate_optimizer(reader, params)
    samples = _train_samples(train_folders, pairing, file_format,
                             reader.node("dataset.sample_image_in_group") is not False)
    _translate_schedule(reader, params, notes, samples)
    _translate_augmentation(reader, params)
    notes.append("train.amp false (DeepReg trains in float32); train.best_params null and "
                 "tune.enabled false (no tuned weights from another experiment)")
    skipped = reader.skipped + [(leaf, "no regflow equivalent") for leaf in reader.unhandled()]
    ordered = {section: params[section] for section in SECTION_ORDER if section in params}
    return Translation(ordered, skipped, notes, reader.ignored)


def dataset_name(path: str | Path) -> str:
    """A dataset/training name from a config file name: ``demos/x/paired_ct.yaml`` -> paired_ct."""
    return re.sub(r"[^A-Za-z0-9_-]+", "-", Path(path).stem).strip("-") or "deepreg"


def import_deepreg(paths: Sequence[str | Path], out: str | Path) -> Translation:
    """Merge DeepReg configs, translate, validate and write a regflow params file atomically.

    The file starts with a comment naming the sources, the conversions and every key that was
    not translated.

    Raises:
        ConfigError: unreadable input, a config DeepReg itself would reject, or a translation
            that regflow's schema rejects (nothing is written then).
    """
    if not paths:
        raise ConfigError("import-deepreg: give at least one DeepReg config file")
    translation = translate(read_deepreg_configs(paths), dataset_name(paths[0]))
    validate_config(translation.params, source="translated DeepReg config")
    header = [f"# regflow params translated from DeepReg: {' + '.join(map(str, paths))}"]
    header += [f"# note: {note}" for note in translation.notes]
    header += [f"# not translated: {key}: {reason}" for key, reason in translation.skipped]
    header += [f"# ignored: {key}: {reason}" for key, reason in translation.ignored]
    body = yaml.safe_dump(translation.params, sort_keys=False)
    fileio.write_text(out, "\n".join(header) + "\n" + body)
    return translation
