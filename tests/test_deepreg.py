"""Tests for regflow.deepreg.importer: DeepReg's config merge, the translation tables, the
command, and real DeepReg configs (tests/deepreg_configs) trained for two steps on synthetic
data."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torchio as tio
import yaml
from click.testing import CliRunner

from regflow.cli import cli
from regflow.config import load_config, validate_config
from regflow.data.fetch import fetch_dataset
from regflow.data.io import write_nifti
from regflow.data.loader import build_augmentation
from regflow.data.preprocess import preprocess_dataset
from regflow.deepreg.importer import _ddf_augment, merge_configs, read_deepreg_configs, translate
from regflow.engine import Trainer
from regflow.losses import build_loss
from regflow.models import RegistrationModel
from tests.synthetic import make_case

CONFIGS = Path(__file__).parent / "deepreg_configs"


def deepreg_case(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic case with its labels as DeepReg stores them: channels-last, values in [0, 1]."""
    image, label = make_case(rng)
    return image, np.stack([label == 1, label == 2], axis=-1).astype(np.float32)


def write_layout(root: Path, pairing: str, cases: dict[str, int], seed: int = 0) -> None:
    """Synthetic volumes in DeepReg's folder layout: ``cases`` maps split folder -> cases (paired,
    unpaired) or groups of two images (grouped)."""
    rng = np.random.default_rng(seed)
    identity = np.eye(4)
    for folder, count in cases.items():
        for number in range(count):
            if pairing == "paired":
                files = {side: deepreg_case(rng) for side in ("fixed", "moving")}
                for side, (image, label) in files.items():
                    case = f"{folder}{number}.nii.gz"  # case ids are unique across splits
                    write_nifti(root / folder / f"{side}_images" / case, image, identity)
                    write_nifti(root / folder / f"{side}_labels" / case, label, identity)
                continue
            names = ([f"{folder}{number}/image{index}" for index in range(2)]
                     if pairing == "grouped" else [f"{folder}{number}"])
            for name in names:
                image, label = deepreg_case(rng)
                write_nifti(root / folder / "images" / f"{name}.nii.gz", image, identity)
                write_nifti(root / folder / "labels" / f"{name}.nii.gz", label, identity)


def test_merge_overrides_keys_recursively_in_order():
    first = {"dataset": {"type": "paired", "dir": {"train": "a", "test": "b"}},
             "train": {"loss": {"scales": [0, 1]}}}
    second = {"dataset": {"dir": {"train": "c"}}, "train": {"loss": {"scales": [2]}}}
    assert merge_configs([first, second]) == {
        "dataset": {"type": "paired", "dir": {"train": "c", "test": "b"}},
        "train": {"loss": {"scales": [2]}},
    }
    assert first["dataset"]["dir"]["train"] == "a"  # inputs untouched


def test_paired_ddf_translation_selects_deepreg_semantics(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_layout(Path("data/test/nifti/paired"), "paired", {"train": 3, "test": 1})
    merged = read_deepreg_configs([CONFIGS / "config_test_paired_nifti.yaml",
                                   CONFIGS / "config_test_ddf.yaml"])
    result = translate(merged, "paired")
    params = result.params
    assert params["data"]["local"]["paired"] == {"path": "data/test/nifti/paired",
                                                 "pairing": "paired", "format": "nifti"}
    assert params["preprocess"]["shape"] == [8, 8, 8]
    assert params["preprocess"]["resize"] is True  # DeepReg interpolates to the shape
    assert any("moving_image_shape" in note for note in result.notes)
    assert params["loader"]["batch_size"] == 2
    assert params["loader"]["sample_label"] == "sample"
    model = params["train"]["model"]
    assert model["method"] == "ddf"
    assert model["backbone"]["channels"] == [1, 2, 4, 8]  # extract levels 0..4: 4 poolings
    assert "extract_levels" not in model["backbone"]  # every level: regflow's default
    assert params["preprocess"]["soft_labels"] is True  # DeepReg's label values
    loss = params["train"]["loss"]
    assert loss["image"]["lncc"] == {"weight": 0.1, "options": {
        "border": "zero_pad", "smooth_nr": 1e-5, "eps": 1e-5}}
    assert loss["label"]["dice"]["options"]["denominator"] == "linear"
    assert loss["label"]["dice"]["options"]["scales"] == [0, 1, 2, 4, 8, 16, 32]
    assert loss["regularization"]["bending_energy"] == {"weight": 0.5,
                                                        "options": {"stencil": "wide"}}
    assert params["train"]["optimizer"]["name"] == "adam"
    assert params["train"]["optimizer"]["lr"] == 1e-5
    # 3 pairs, batch 2: ceil(3 / 2) = 2 steps per epoch; 2 epochs, saved every 2 epochs
    assert (params["train"]["steps"], params["train"]["checkpoint_every"]) == (4, 4)
    assert set(dict(result.skipped)) == {"dataset.valid.dir",
                                         "train.preprocess.shuffle_buffer_num_batch"}
    ignored = dict(result.ignored)  # the upgrade lifts train.optimizer.adam, drops the others
    assert set(ignored) == {"train.optimizer.sgd.learning_rate", "train.optimizer.sgd.momentum",
                            "train.optimizer.rms.learning_rate", "train.optimizer.rms.momentum"}
    assert "unused by DeepReg too" in ignored["train.optimizer.sgd.momentum"]


def test_unknown_keys_and_old_layouts_are_reported_key_by_key():
    merged = {"dataset": {"dir": {"train": "x/train", "valid": "x/val", "test": "x/test"},
                          "format": "h5", "type": "unpaired", "labeled": True,
                          "image_shape": [8, 8, 8], "magic": 3},
              "train": {"method": "dvf",
                        "loss": {"label": [{"name": "dice", "weight": 1.0, "kernel": "cauchy"},
                                           {"name": "hausdorff", "weight": 1.0}]},
                        "optimizer": {"name": "RMSprop", "learning_rate": 0.1,
                                      "momentum": 0.5}}}
    merged["train"]["backbone"] = {"name": "local", "extract_levels": [3, 1, 2],
                                   "num_channel_initial": 4}
    result = translate(merged, "x")
    assert result.params["train"]["model"]["backbone"] == {
        "name": "local", "channels": [4, 8, 16], "extract_levels": [1, 2, 3], "norm": "batch"}
    skipped = dict(result.skipped)
    assert result.params["train"]["loss"]["label"]["dice"]["options"]["kernel"] == "cauchy"
    assert "hausdorff" in skipped["train.loss.label[1].name"]
    assert skipped["dataset.magic"] == "no regflow equivalent"
    assert result.params["data"]["local"]["x"]["format"] == "h5"
    assert result.params["train"]["optimizer"]["name"] == "rmsprop"
    assert result.params["train"]["optimizer"]["momentum"] == 0.5
    assert any("could not be read" in note for note in result.notes)
    assert result.params["train"]["unit"] == "epochs"  # counted once the data exist


def test_command_writes_a_valid_params_file_and_names_untranslated_keys(tmp_path):
    out = tmp_path / "params.yaml"
    files = ["config_test_grouped_nifti.yaml", "config_test_ddf.yaml", "config_test_dvf.yaml"]
    result = CliRunner().invoke(cli, ["import-deepreg", *[str(CONFIGS / name) for name in files],
                                      "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "not translated: dataset.valid.dir:" in result.output
    config = load_config(out)
    assert config.train.model.method == "dvf"  # the last file wins
    assert config.loader.intra_group_option == "forward"
    assert yaml.safe_load(out.read_text())["train"]["name"] == "config_test_grouped_nifti"


@pytest.mark.parametrize("arguments", [
    ["missing.yaml"],
    [str(CONFIGS / "config_test_ddf.yaml")],  # no dataset section
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, arguments):
    out = tmp_path / "params.yaml"
    result = CliRunner().invoke(cli, ["import-deepreg", *arguments, "-o", str(out)])
    assert result.exit_code == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()


PARTS = {f"part{index:02d}": 1 for index in range(11)}  # DeepReg's paired_mrus_prostate folders


def test_several_folders_per_split_become_the_local_datasets_splits(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_layout(Path("demos/paired_mrus_prostate/dataset"), "paired", {**PARTS, "part03": 3})
    result = translate(read_deepreg_configs([CONFIGS / "demos_paired_mrus_prostate.yaml"]), "p")
    assert result.params["data"]["local"]["p"] == {
        "path": "demos/paired_mrus_prostate/dataset", "pairing": "paired", "format": "nifti",
        "splits": {"train": [f"part{index:02d}" for index in range(8)], "val": ["part08"],
                   "test": ["part09", "part10"]}}
    assert not [key for key, _ in result.skipped if key.startswith("dataset")]
    # 10 training pairs in 8 folders, batch 4: 3 steps per epoch, 5000 epochs
    assert result.params["train"]["steps"] == 15000


SCENARIOS = {
    "paired-ddf": (["config_test_paired_nifti.yaml", "config_test_ddf.yaml"],
                   "data/test/nifti/paired", "paired", []),
    "unpaired-affine": (["config_test_unpaired_nifti.yaml", "config_test_affine.yaml"],
                        "data/test/nifti/unpaired", "unpaired", []),
    "grouped-dvf": (["config_test_grouped_nifti.yaml", "config_test_ddf.yaml",
                     "config_test_dvf.yaml"], "data/test/nifti/grouped", "grouped", []),
    # the demos' full-size volumes and widths are shrunk to test size; losses, method, optimiser
    # and schedule are the translated ones
    "grouped-mr-heart": (["demos_grouped_mr_heart.yaml"], "demos/grouped_mr_heart/dataset",
                         "grouped", ["preprocess.shape=[16,16,16]",
                                     "train.model.backbone.channels=[2,4,8,16]"]),
    "grouped-mr-heart-v011": (["config_test_grouped_mr_heart_v011.yaml"],
                              "demos/grouped_mr_heart/dataset", "grouped",
                              ["preprocess.shape=[16,16,16]",
                               "train.model.backbone.channels=[2,4,8,16]"]),
    "paired-mrus-prostate-v010": (["demos_paired_mrus_prostate_dataset0_v010.yaml",
                                   "demos_paired_mrus_prostate_train_v010.yaml"],
                                  "demos/paired_mrus_prostate/dataset", "paired",
                                  ["preprocess.shape=[16,16,16]",
                                   "train.model.backbone.channels=[2,4,8]"], PARTS),
    "unpaired-ct-abdomen": (["demos_unpaired_ct_abdomen_comb.yaml"],
                            "demos/unpaired_ct_abdomen/dataset", "unpaired",
                            ["preprocess.shape=[16,16,16]",
                             "train.model.backbone.channels=[2,4,8]"]),
}


@pytest.mark.slow  # 9-40 s each on two shared cores (preprocess, MLflow run, validation)
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_real_deepreg_configs_translate_validate_and_train_two_steps(
        scenario, tmp_path, monkeypatch, mlflow_store):
    files, root, pairing, shrink, *layout = SCENARIOS[scenario]
    monkeypatch.chdir(tmp_path)
    folders = {"train": 4, "test": 2}
    if "val" in yaml.safe_dump(read_deepreg_configs([CONFIGS / name for name in files])):
        folders["val"] = 2
    folders = layout[0] if layout else folders
    write_layout(Path(root), pairing, folders)
    result = CliRunner().invoke(cli, ["import-deepreg", *[str(CONFIGS / name) for name in files],
                                      "-o", "params.yaml"])
    assert result.exit_code == 0, result.output
    config = load_config("params.yaml", [*shrink, "train.steps=2", "train.val_every=2",
                                         "train.checkpoint_every=2", "loader.eval_pairs=2"])
    name = config.data.dataset
    fetch_dataset(name, config)
    manifest = preprocess_dataset(name, config)
    outcome = Trainer(config, Path(manifest), Path("models") / name).fit()
    assert outcome.steps == 2
    assert np.isfinite(outcome.best_score)


def test_v011_config_imports_with_its_loss_model_and_backbone(tmp_path):
    """DeepReg 0.1.1's format (train.model, loss.dissimilarity, energy_type, optimizer sections)
    is upgraded as DeepReg 0.1.2 does before it is translated."""
    out = tmp_path / "params.yaml"
    result = CliRunner().invoke(cli, ["import-deepreg",
                                      str(CONFIGS / "config_test_grouped_mr_heart_v011.yaml"),
                                      "-o", str(out)])
    assert result.exit_code == 0, result.output
    train = yaml.safe_load(out.read_text())["train"]
    assert train["loss"] == {
        "image": {"gmi": {"weight": 1.0, "options": {"eps": 1e-5}}},
        "regularization": {"gradient_norm": {"weight": 0.25, "options": {"norm": "l2"}}}}
    assert train["model"]["method"] == "ddf"
    assert train["model"]["backbone"] == {"name": "local", "channels": [32, 64, 128, 256],
                                          "norm": "batch"}
    assert train["optimizer"]["lr"] == 1e-4


def test_v010_demo_config_imports_with_its_loss_model_and_backbone(tmp_path):
    """DeepReg 0.1.0's paired_mrus_prostate demo: a dataset file (several folders per split) and
    a training file in the old format, merged as --config_path does."""
    out = tmp_path / "params.yaml"
    files = ["demos_paired_mrus_prostate_dataset0_v010.yaml",
             "demos_paired_mrus_prostate_train_v010.yaml"]
    result = CliRunner().invoke(cli, ["import-deepreg", *[str(CONFIGS / name) for name in files],
                                      "-o", str(out)])
    assert result.exit_code == 0, result.output
    params = yaml.safe_load(out.read_text())
    loss = params["train"]["loss"]
    assert loss["image"] == {"ssd": {"weight": 0.0, "options": {}}}
    assert loss["label"]["dice"]["weight"] == 1.0
    assert loss["label"]["dice"]["options"]["scales"] == [0, 1, 2, 4, 8, 16]
    assert loss["regularization"] == {"bending_energy": {"weight": 0.5,
                                                         "options": {"stencil": "wide"}}}
    assert params["train"]["model"]["backbone"]["channels"] == [16, 32, 64]
    assert params["train"]["optimizer"]["lr"] == 1e-5
    assert params["loader"]["augment"]["affine"]["enabled"] is True  # DeepReg's default since 0.1.1


REAL_DEMOS = sorted(path.name for path in CONFIGS.glob("demos_*.yaml")
                    if not path.stem.endswith(("_v010", "_v011")))


@pytest.mark.parametrize("name", REAL_DEMOS)
def test_real_demo_configs_translate_all_but_two_deliberate_keys(name):
    """DeepReg's demo configs: only the tf.data shuffle buffer and a test folder doubling as
    validation stay untranslated; everything else is mapped or ignored as DeepReg ignores it."""
    result = translate(read_deepreg_configs([CONFIGS / name]), "demo")
    assert {key for key, _ in result.skipped} <= {"train.preprocess.shuffle_buffer_num_batch",
                                                  "dataset.valid.dir"}
    validate_config(result.params)


def test_deepreg_options_map_onto_regflows(tmp_path):
    deepreg = {
        "dataset": {"type": "unpaired", "train": {"dir": "x/train", "labeled": True}},
        "train": {
            "method": "dvf",
            "backbone": {"name": "unet", "num_channel_initial": 2, "depth": 2,
                         "pooling": False, "control_points": [4, 4, 2]},
            "loss": {"label": [
                {"name": "dice", "weight": 1.0, "background_weight": 0.1, "kernel": "cauchy",
                 "scales": [0, 1]},
                {"name": "cross-entropy", "weight": 0.5, "binary": True, "smooth": 0.01,
                 "background_weight": 0.2}]},
            "preprocess": {"data_augmentation": [
                {"name": "affine", "scale": 0.2},
                {"name": "ddf", "field_strength": 2, "low_res_size": [3, 3, 2]}]},
        },
    }
    result = translate(deepreg, "x")
    assert result.skipped == []
    model = result.params["train"]["model"]
    assert model["backbone"]["pooling"] is False
    assert model["backbone"]["concat_skip"] is False  # DeepReg's UNet adds skips by default
    assert model["control_points"] == [4, 4, 2]
    label = result.params["train"]["loss"]["label"]
    assert label["dice"]["options"] == {
        "denominator": "linear", "smooth_nr": 1e-5, "smooth_dr": 1e-5,
        "background_mode": "generalised", "background_weight": 0.1, "kernel": "cauchy",
        "scales": [0, 1]}
    assert label["cross_entropy"]["options"] == {
        "smooth": 0.01, "background_mode": "generalised", "binary": True,
        "background_weight": 0.2}
    augment = result.params["loader"]["augment"]
    assert augment["affine"] == {"enabled": True, "scales": [1.0, 1.25],
                                 "degrees": pytest.approx(math.degrees(0.1)),
                                 "translation": 0.2}
    assert augment["elastic"] == {"enabled": True, "control_points": 7, "max_displacement": 2.0}
    config = validate_config(result.params)  # and the model and loss build
    RegistrationModel.from_config(config.train.model, ndim=3)
    build_loss(config.train.loss)


def deepreg_affine_draws(scale: float, count: int, rng: np.random.Generator) -> np.ndarray:
    """gen_rand_affine_transform (deepreg/dataset/preprocess.py): four cube corners scaled by
    U(1 - scale, 1) per coordinate, the (4, 3) least-squares map from old to new corners."""
    old = np.array([[-1, -1, -1, 1], [-1, -1, 1, 1], [-1, 1, -1, 1], [1, -1, -1, 1]], float)
    noise = rng.uniform(1 - scale, 1, (count, 4, 3))
    return np.stack([np.linalg.lstsq(old, old[:, :3] * n, rcond=None)[0] for n in noise])


def test_affine_augmentation_spans_deepregs_draws():
    """TorchIO's RandomAffine, as the loader builds it from the translated config, draws the
    zoom, rotation and shift ranges DeepReg's affine augmentation of scale 0.1 draws."""
    thetas = deepreg_affine_draws(0.1, 4000, np.random.default_rng(0))
    linear, shift = thetas[:, :3, :], thetas[:, 3, :]
    zoom = 1 / np.stack([np.diagonal(matrix) for matrix in linear])
    rotation = np.abs(linear - np.transpose(linear, (0, 2, 1))) / 2
    result = translate({"dataset": {"type": "paired", "train": {"dir": "x/train"}},
                        "train": {"loss": {"image": {"name": "ssd"}}}}, "x")
    config = validate_config(result.params)
    transform = next(t for t in build_augmentation(config.loader.augment).transforms
                     if isinstance(t, tio.RandomAffine))
    low, high = transform.scales[:2]
    assert (low, high) == (1.0, pytest.approx(1 / 0.9))
    assert zoom.min() >= low and zoom.max() <= high and zoom.max() > high - 0.01
    assert rotation.max() <= math.radians(transform.degrees[1]) + 1e-12
    assert rotation.max() > 0.85 * math.radians(transform.degrees[1])  # a bound seldom reached
    assert np.abs(shift).max() <= transform.translation[1] + 1e-12


def test_ddf_augmentation_matches_deepregs_displacement_spread():
    """DeepReg's low-resolution displacements U(0, F) x N(0, 1) and TorchIO's elastic control
    displacements U(-F, F) share the standard deviation F / sqrt(3); the control grid leaves
    DeepReg's low_res_size free (TorchIO locks two outer rings on its first two axes)."""
    rng = np.random.default_rng(1)
    strength, low_res = 2.0, (3, 3, 3)
    deepreg = rng.uniform(0, strength, (20000, 1, 1, 1, 3)) * rng.standard_normal(
        (20000, *low_res, 3))
    _, settings = _ddf_augment(strength, low_res)
    torch.manual_seed(0)
    control = tio.RandomElasticDeformation.get_params(
        (settings["control_points"],) * 3, (settings["max_displacement"],) * 3, 2)
    free = control[2:-2, 2:-2]
    assert free.shape[:2] == low_res[:2] and np.all(control[:2] == 0)
    assert deepreg.std() == pytest.approx(strength / math.sqrt(3), rel=0.02)
    assert free.std() == pytest.approx(strength / math.sqrt(3), rel=0.05)
    assert _ddf_augment(strength, (1, 1, 1)) == ("affine", {
        "enabled": True, "scales": 0.0, "degrees": 0.0, "translation": strength})
