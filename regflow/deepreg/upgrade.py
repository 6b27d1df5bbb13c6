"""DeepReg 0.1.0 / 0.1.1 config trees -> the format ``regflow import-deepreg`` translates.

DeepReg 0.1.2 and later upgrade every merged config they load (``deepreg/config/v011.py``, run by
its config parser); :func:`upgrade` makes the same changes, so an old config means here what it
means to DeepReg:

- ``dataset.dir.<split>`` with one shared ``format``/``labeled`` -> ``dataset.<split>:
  {dir, format, labeled}``;
- ``train.model: {method, backbone: NAME, NAME: {...}}`` -> ``train.method`` and
  ``train.backbone: {name: NAME, ...}`` (global: ``extract_levels`` -> ``depth``, their maximum);
- ``train.loss.dissimilarity.{image,label}`` move up a level; ``image: {name: N, N: {...}}`` is
  flattened; a label loss ``single_scale``/``multi_scale`` becomes ``{name: loss_type,
  scales: loss_scales}``; ``mean-squared`` is ``ssd``, ``dice_generalized`` is ``dice``,
  ``neg_weight`` is ``background_weight``; ``regularization.energy_type`` bending /
  gradient-l1 / gradient-l2 becomes ``name`` (and ``l1``);
- ``train.preprocess.data_augmentation`` defaults to ``{name: affine}`` (DeepReg augments every
  config that names none);
- ``train.optimizer: {name: adam, adam: {...}}`` -> ``{name: Adam, ...}``.

What the upgrade drops because DeepReg never reads it (another optimiser's section, the label
loss form not chosen) is returned with the reason, so that the importer can report it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from regflow.errors import ConfigError

SPLITS = ("train", "valid", "test")
OPTIMIZER_NAMES = {"adam": "Adam", "sgd": "SGD", "rms": "RMSprop"}
LABEL_RENAMES = {"mean-squared": "ssd", "dice_generalized": "dice"}
ENERGY_TYPES: dict[str, dict[str, Any]] = {
    "bending": {"name": "bending"},
    "gradient-l2": {"name": "gradient", "l1": False},
    "gradient-l1": {"name": "gradient", "l1": True},
}


def leaves(node: Any, prefix: str = "") -> list[str]:
    """Key paths of every leaf; maps and lists of maps are walked (list items as ``key[i]``)."""
    if isinstance(node, dict) and node:
        return [leaf for key, child in node.items()
                for leaf in leaves(child, f"{prefix}.{key}" if prefix else str(key))]
    if isinstance(node, list) and node and all(isinstance(item, dict) for item in node):
        return [leaf for index, item in enumerate(node)
                for leaf in leaves(item, f"{prefix}[{index}]")]
    return [prefix]


@dataclass
class Upgrade:
    """The result of :func:`upgrade`.

    Attributes:
        tree: the config in DeepReg 0.1.2's format (a new tree; the input is not modified).
        changes: one line per change made.
        ignored: ``(old key path, reason)`` for every leaf dropped because DeepReg ignores it.
    """

    tree: dict[str, Any]
    changes: list[str] = field(default_factory=list)
    ignored: list[tuple[str, str]] = field(default_factory=list)

    def drop(self, node: dict[str, Any], keys: list[str], path: str, reason: str) -> None:
        """Remove ``keys`` of ``node`` (found at ``path``) and record their leaves."""
        for key in keys:
            self.ignored += [(leaf, reason) for leaf in leaves(node.pop(key), f"{path}.{key}")]


def upgrade(deepreg: dict[str, Any]) -> Upgrade:
    """Bring a merged DeepReg config to 0.1.2's format, as DeepReg itself does on loading.

    A config already in that format comes back unchanged, with its augmentation default.

    Raises:
        ConfigError: an old-format entry DeepReg's upgrade cannot read either (an unknown
            ``energy_type``, a backbone without its section, a label loss form without its map).
    """
    result = Upgrade(copy.deepcopy(deepreg))
    tree = result.tree
    if isinstance(tree.get("dataset"), dict):
        _dataset(tree["dataset"], result)
    train = tree.get("train")
    if not isinstance(train, dict):
        return result
    if isinstance(train.get("model"), dict):
        _model(train, result)
    if isinstance(train.get("loss"), dict):
        _loss(train["loss"], result)
    preprocess = train.setdefault("preprocess", {})
    if isinstance(preprocess, dict) and "data_augmentation" not in preprocess:
        preprocess["data_augmentation"] = {"name": "affine"}
        result.changes.append("train.preprocess.data_augmentation: none named, DeepReg's default "
                              "{name: affine}")
    if isinstance(train.get("optimizer"), dict):
        _optimizer(train["optimizer"], result)
    return result


def _dataset(dataset: dict[str, Any], result: Upgrade) -> None:
    """``dir.<split>`` with shared ``format``/``labeled`` -> one map per split."""
    folders = dataset.get("dir")
    if not isinstance(folders, dict):
        return
    dataset.pop("dir")
    shared = {key: dataset.pop(key) for key in ("format", "labeled") if key in dataset}
    for split in SPLITS:
        if split in folders:
            dataset[split] = {"dir": folders[split], **shared}
    result.drop(folders, [key for key in folders if key not in SPLITS], "dataset.dir",
                "not a DeepReg split (train, valid, test)")
    result.changes.append("dataset.dir.<split>, format, labeled -> dataset.<split>.{dir, format, "
                          "labeled}")


def _model(train: dict[str, Any], result: Upgrade) -> None:
    """``train.model`` -> ``train.method`` and a ``train.backbone`` map."""
    model = train.pop("model")
    if isinstance(model.get("model"), dict):  # an extra level some configs carry
        model = model["model"]
    backbone = model.get("backbone")
    if isinstance(backbone, str):
        settings = model.get(backbone)
        if not isinstance(settings, dict):
            raise ConfigError(f"train.model.backbone {backbone!r}: DeepReg 0.1.1 configs give "
                              f"its settings in train.model.{backbone}")
        model.pop(backbone)
        backbone = {"name": backbone, **settings}
        if backbone["name"] == "global" and "extract_levels" in backbone:
            backbone["depth"] = max(backbone.pop("extract_levels"))
        result.drop(model, [key for key in model if key not in ("method", "backbone")],
                    "train.model", f"unused by DeepReg too (backbone is {backbone['name']})")
    train.update({key: value for key, value in (("method", model.get("method")),
                                                 ("backbone", backbone)) if value is not None})
    result.changes.append("train.model.{method, backbone, <backbone>} -> train.method, "
                          "train.backbone")


def _loss(loss: dict[str, Any], result: Upgrade) -> None:
    """``dissimilarity`` moved up; old image, label and regularisation entries rewritten."""
    if isinstance(loss.get("dissimilarity"), dict):
        loss.update(loss.pop("dissimilarity"))
        result.changes.append("train.loss.dissimilarity.{image, label} -> train.loss.{image, "
                              "label}")
    image = loss.get("image")
    if isinstance(image, dict) and isinstance(image.get(image.get("name")), dict):
        name = image["name"]
        entry = {"name": name, "weight": image.get("weight", 1.0), **image[name]}
        result.drop(image, [key for key in image if key not in ("name", "weight", name)],
                    "train.loss.image", f"unused by DeepReg too (image loss is {name})")
        loss["image"] = entry
        result.changes.append(f"train.loss.image.{name} -> train.loss.image")
    label = loss.get("label")
    if isinstance(label, dict):
        loss["label"] = _label(label, result)
    regularization = loss.get("regularization")
    if isinstance(regularization, dict) and "energy_type" in regularization:
        energy = regularization["energy_type"]
        if energy not in ENERGY_TYPES:
            raise ConfigError(f"train.loss.regularization.energy_type: DeepReg knows "
                              f"{', '.join(ENERGY_TYPES)}, not {energy!r}")
        loss["regularization"] = {"weight": regularization.get("weight", 1.0),
                                  **ENERGY_TYPES[energy]}
        result.changes.append(f"train.loss.regularization.energy_type {energy} -> name "
                              f"{ENERGY_TYPES[energy]['name']}")


def _label(label: dict[str, Any], result: Upgrade) -> dict[str, Any]:
    """A 0.1.x label loss entry in 0.1.2's form."""
    form = label.get("name")
    if form in ("single_scale", "multi_scale"):
        settings = label.get(form)
        if not isinstance(settings, dict) or "loss_type" not in settings:
            raise ConfigError(f"train.loss.label.{form}: DeepReg 0.1.1 configs give loss_type "
                              "there")
        entry = {"name": settings.pop("loss_type"), "weight": label.get("weight", 1.0)}
        if form == "multi_scale" and "loss_scales" in settings:
            entry["scales"] = settings.pop("loss_scales")
        result.drop(settings, list(settings), f"train.loss.label.{form}",
                    "dropped by DeepReg's own upgrade")
        label.pop(form)
        result.drop(label, [key for key in label if key not in ("name", "weight")],
                    "train.loss.label", f"unused by DeepReg too (label loss is {form})")
        result.changes.append(f"train.loss.label.{form} -> train.loss.label.name "
                              f"{entry['name']}")
        label = entry
    if label.get("name") in LABEL_RENAMES:
        result.changes.append(f"train.loss.label.name {label['name']} -> "
                              f"{LABEL_RENAMES[label['name']]}")
        label["name"] = LABEL_RENAMES[label["name"]]
    if "neg_weight" in label:
        label["background_weight"] = label.pop("neg_weight")
        result.changes.append("train.loss.label.neg_weight -> background_weight")
    return label


def _optimizer(optimizer: dict[str, Any], result: Upgrade) -> None:
    """``{name: adam, adam: {...}}`` -> ``{name: Adam, ...}``; other sections dropped."""
    name = optimizer.get("name")
    if name not in OPTIMIZER_NAMES or not isinstance(optimizer.get(name), dict):
        return
    settings = optimizer.pop(name)
    result.drop(optimizer, [key for key in optimizer if key != "name"], "train.optimizer",
                f"unused by DeepReg too (optimizer is {name})")
    optimizer.update({"name": OPTIMIZER_NAMES[name], **settings})
    result.changes.append(f"train.optimizer.{name} -> train.optimizer (name "
                          f"{OPTIMIZER_NAMES[name]})")
