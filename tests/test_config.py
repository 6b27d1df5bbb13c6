from pathlib import Path

import pytest

from regflow.config import flatten, load_config, load_training_config
from regflow.data.catalogue import CATALOGUE
from regflow.errors import ConfigError


def test_defaults_load_and_flatten(tmp_path):
    config = load_config(tmp_path / "params.yaml")
    flat = flatten(config)
    assert flat["preprocess.shape"] == [48, 64, 48]
    assert flat["seed"] == 42


def test_override_sets_nested_key(tmp_path):
    config = load_config(tmp_path / "params.yaml", ["train.loss.image.lncc.weight=0.5"])
    assert config.train.loss.image["lncc"].weight == 0.5


@pytest.mark.parametrize("text, message", [
    ("preprocess:\n  shpe: [1, 2, 3]\n", r"preprocess\.shpe: unknown key"),
    ("# every key commented out\n", r"params\.yaml: the file is empty"),
])
def test_bad_params_file_is_named_with_its_problem(tmp_path, text, message):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
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


def test_explicit_empty_mapping_means_defaults(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("{}\n")
    assert load_config(path).seed == 42


@pytest.mark.parametrize(("override", "message"), [
    ("train.steps={", r"override 'train\.steps=\{': not valid YAML \(.* line 1, column 2\)"),
    ("train.name=!!python/object:os.system", "not valid YAML"),
    ("train..steps=3", "expected key.path=value"),
    ("train.steps.=3", "expected key.path=value"),
    ("train.steps", "expected key.path=value"),
])
def test_malformed_override_is_one_line(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message) as caught:
        load_config(tmp_path / "params.yaml", [override])
    assert "\n" not in str(caught.value)


def test_override_without_value_sets_null(tmp_path):
    config = load_config(tmp_path / "params.yaml", ["train.best_params="])
    assert config.train.best_params is None


def test_params_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_bytes("train:\n  name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        load_config(path)


def test_malformed_best_params_names_the_file(tmp_path):
    best = tmp_path / "best.yaml"
    best.write_text("train.optimizer.lr: [0.1\n")
    params = tmp_path / "params.yaml"
    params.write_text(f"train:\n  best_params: {best}\n")
    with pytest.raises(ConfigError, match=r"best\.yaml: not valid YAML"):
        load_training_config(params)


@pytest.mark.parametrize("name", ["params.yaml", "configs/hippocampus-long.yaml",
                                  "configs/prostate.yaml"])
def test_the_projects_own_params_files_validate(name):
    root = Path(__file__).resolve().parents[1]
    config = load_config(root / name)
    assert config.train.steps > 0
    assert config.data.dataset in CATALOGUE


HYPER_OVERRIDES = ["train.model.hyper.term=regularization.bending_energy",
                   "train.model.hyper.low=0.1", "train.model.hyper.high=5.0"]


@pytest.mark.parametrize(("extra", "message"), [
    (["train.model.hyper.term=regularization.gradient_norm"],
     r"train.model.hyper.term: 'regularization.gradient_norm' must name a train.loss term"),
    (["train.model.hyper.term=bending_energy"], r"must name a train.loss term \(group.name\)"),
    (["train.loss.regularization.bending_energy.weight=8"], r"weight 8.0 .* \[0.1, 5.0\]"),
    (["train.model.hyper.low=6.0"], r"train.model.hyper: .*low must be below high"),
])
def test_hyper_needs_a_weighted_term_whose_weight_is_in_range(tmp_path, extra, message):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  loss:\n    image: {lncc: {weight: 1.0}}\n"
                    "    regularization: {bending_energy: {weight: 0.5}}\n")
    assert load_config(path, HYPER_OVERRIDES).train.hyper_term().weight == 0.5
    with pytest.raises(ConfigError, match=message):
        load_config(path, HYPER_OVERRIDES + extra)
