"""Tests for regflow.deepreg.upgrade: DeepReg 0.1.x trees rewritten as deepreg/config/v011.py
rewrites them (each mapping checked against the tree DeepReg's upgrade produces)."""

import pytest

from regflow.deepreg.upgrade import upgrade
from regflow.errors import ConfigError


def test_old_format_tree_becomes_deepregs_new_format():
    old = {
        "dataset": {"dir": {"train": "a", "valid": "b", "test": "c"}, "format": "h5",
                    "labeled": True, "type": "paired"},
        "train": {
            "model": {"method": "dvf", "backbone": "global",
                      "global": {"num_channel_initial": 4, "extract_levels": [0, 1, 3]},
                      "local": {"num_channel_initial": 8}},
            "loss": {"dissimilarity": {
                "image": {"name": "lncc", "weight": 0.5, "lncc": {"kernel_size": 7},
                          "ssd": {}},
                "label": {"name": "single_scale", "weight": 2.0, "neg_weight": 0.1,
                          "single_scale": {"loss_type": "dice_generalized"},
                          "multi_scale": {"loss_type": "dice", "loss_scales": [0, 1]}}},
                "regularization": {"weight": 0.3, "energy_type": "gradient-l1"}},
            "optimizer": {"name": "sgd", "sgd": {"learning_rate": 0.1, "momentum": 0.9},
                          "adam": {"learning_rate": 1e-3}},
            "preprocess": {"batch_size": 2},
        },
    }
    result = upgrade(old)
    assert result.tree == {
        "dataset": {"type": "paired",
                    "train": {"dir": "a", "format": "h5", "labeled": True},
                    "valid": {"dir": "b", "format": "h5", "labeled": True},
                    "test": {"dir": "c", "format": "h5", "labeled": True}},
        "train": {
            "method": "dvf",
            "backbone": {"name": "global", "num_channel_initial": 4, "depth": 3},
            "loss": {"image": {"name": "lncc", "weight": 0.5, "kernel_size": 7},
                     "label": {"name": "dice", "weight": 2.0},
                     "regularization": {"weight": 0.3, "name": "gradient", "l1": True}},
            "optimizer": {"name": "SGD", "learning_rate": 0.1, "momentum": 0.9},
            "preprocess": {"batch_size": 2, "data_augmentation": {"name": "affine"}},
        },
    }
    assert dict(result.ignored) == {
        "train.model.local.num_channel_initial": "unused by DeepReg too (backbone is global)",
        "train.loss.image.ssd": "unused by DeepReg too (image loss is lncc)",
        # DeepReg's upgrade replaces the whole map of a single_scale loss: neg_weight is lost
        "train.loss.label.neg_weight": "unused by DeepReg too (label loss is single_scale)",
        "train.loss.label.multi_scale.loss_type":
            "unused by DeepReg too (label loss is single_scale)",
        "train.loss.label.multi_scale.loss_scales":
            "unused by DeepReg too (label loss is single_scale)",
        "train.optimizer.adam.learning_rate": "unused by DeepReg too (optimizer is sgd)"}
    assert old["train"]["model"]["backbone"] == "global"  # the input is left alone


@pytest.mark.parametrize(("label", "expected"), [
    ({"name": "multi_scale", "multi_scale": {"loss_type": "mean-squared",
                                             "loss_scales": [0, 2]}},
     {"name": "ssd", "weight": 1.0, "scales": [0, 2]}),
    ({"name": "dice_generalized", "weight": 0.5, "neg_weight": 0.2},
     {"name": "dice", "weight": 0.5, "background_weight": 0.2}),
    ({"name": "dice", "weight": 0.5, "scales": [1]}, {"name": "dice", "weight": 0.5,
                                                      "scales": [1]}),
])
def test_label_loss_forms(label, expected):
    tree = upgrade({"train": {"loss": {"label": label}}}).tree
    assert tree["train"]["loss"]["label"] == expected


@pytest.mark.parametrize(("energy", "expected"), [
    ("bending", {"weight": 1.0, "name": "bending"}),
    ("gradient-l2", {"weight": 1.0, "name": "gradient", "l1": False}),
])
def test_energy_types(energy, expected):
    tree = upgrade({"train": {"loss": {"regularization": {"energy_type": energy}}}}).tree
    assert tree["train"]["loss"]["regularization"] == expected


def test_new_format_is_left_as_it_is_but_for_the_augmentation_default():
    new = {"dataset": {"train": {"dir": "a"}}, "train": {
        "method": "ddf", "backbone": {"name": "local"}, "optimizer": {"name": "Adam"},
        "loss": {"image": [{"name": "ssd"}]},
        "preprocess": {"data_augmentation": {"name": "ddf"}}}}
    result = upgrade(new)
    assert result.tree == new and result.changes == [] and result.ignored == []
    del new["train"]["preprocess"]
    assert upgrade(new).tree["train"]["preprocess"] == {"data_augmentation": {"name": "affine"}}


@pytest.mark.parametrize("tree", [
    {"train": {"loss": {"regularization": {"energy_type": "curvature"}}}},
    {"train": {"model": {"method": "ddf", "backbone": "unet"}}},
    {"train": {"loss": {"label": {"name": "multi_scale"}}}},
])
def test_what_deepregs_upgrade_cannot_read_is_a_config_error(tree):
    with pytest.raises(ConfigError):
        upgrade(tree)
