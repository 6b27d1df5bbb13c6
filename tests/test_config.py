import pytest

from regflow.config import flatten, load_config, load_training_config
from regflow.errors import ConfigError


def test_defaults_load_and_flatten(tmp_path):
    config = load_config(tmp_path / "params.yaml")
    flat = flatten(config)
    assert flat["preprocess.shape"] == [48, 64, 48]
    assert flat["seed"] == 42


def test_override_sets_nested_key(tmp_path):
    config = load_config(tmp_path / "params.yaml", ["train.loss.image.lncc.weight=0.5"])
    assert config.train.loss.image["lncc"].weight == 0.5


def test_unknown_key_is_named(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("preprocess:\n  shpe: [1, 2, 3]\n")
    with pytest.raises(ConfigError, match=r"preprocess\.shpe: unknown key"):
        load_config(path)


def test_bad_choice_lists_allowed_values(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.model\.method: .*'ddf'.*'affine'"):
        load_config(tmp_path / "params.yaml", ["train.model.method=spline"])


def test_out_of_range_value(tmp_path):
    with pytest.raises(ConfigError, match=r"preprocess\.val_fraction"):
        load_config(tmp_path / "params.yaml", ["preprocess.val_fraction=1.5"])


def test_missing_named_config_file(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "other.yaml")


def test_training_config_merges_best_params_below_overrides(tmp_path):
    best = tmp_path / "best.yaml"
    best.write_text("train.loss.image.lncc.weight: 0.25\ntrain.optimizer.lr: 0.002\n")
    params = tmp_path / "params.yaml"
    params.write_text(f"train:\n  best_params: {best}\n")
    config = load_training_config(params, ["train.optimizer.lr=0.005"])
    assert config.train.loss.image["lncc"].weight == 0.25
    assert config.train.optimizer.lr == 0.005
