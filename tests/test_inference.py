"""The one inference path: world geometry, label kinds, bad input, and the raw-grid DDF."""

import numpy as np
import pytest
import torch

from regflow import inference
from regflow.config import Config, LossConfig, RefineConfig
from regflow.data.transforms import regrid
from regflow.errors import ConfigError, GeometryError, NothingToRegister
from regflow.inference import (
    Registrar,
    Volume,
    label_values,
    load_registrar,
    record_from_config,
    warp_label,
    warped_channels,
    with_term_weight,
)
from regflow.models import RegistrationModel
from regflow.predict import warp_array
from tests.restorage import assert_registers_alike, mean_dice, restorage_cases, restore
from tests.test_refine import blobs

LNCC_BENDING = LossConfig(image={"lncc": {"weight": 1.0, "options": {"kernel_size": 7}}},
                          regularization={"bending_energy": {"weight": 0.5}})
FRAME = Config.model_validate({"preprocess": {"shape": [24, 28, 20], "spacing": [1, 1, 1]}})


def tiny_registrar() -> Registrar:
    """A random LocalNet 4-8 (the geometry does not depend on what the network learnt)."""
    torch.manual_seed(0)
    model = RegistrationModel(channels=(4, 8), ndim=3)
    return Registrar(model, record_from_config(FRAME), LNCC_BENDING, RefineConfig(),
                     torch.device("cpu"))


def raw_volume(seed: int, shape=(21, 25, 19), origin=(3.0, -2.0, 5.0)) -> Volume:
    image = blobs(shape, seed)[0, 0].numpy()
    affine = np.eye(4)
    affine[:3, 3] = origin
    return Volume(image, affine, f"volume{seed}")


def label_of(volume: Volume) -> Volume:
    label = np.zeros(volume.array.shape, np.int16)
    label[volume.array > 0.6] = 100
    label[volume.array < 0.3] = 200
    return Volume(label, volume.affine, volume.source + "-label")


@pytest.mark.parametrize("flips, order", [((0, 1), (0, 1, 2)), ((), (2, 0, 1)),
                                          ((1,), (1, 2, 0))])
def test_lossless_restorage_of_the_moving_image_changes_nothing(flips, order):
    registrar = tiny_registrar()
    fixed, moving = raw_volume(1), raw_volume(2, shape=(19, 23, 22))
    label = label_of(moving)
    expected = registrar.register_volumes(fixed, moving, label)
    restored = registrar.register_volumes(fixed, restore(moving, flips, order),
                                          restore(label, flips, order))
    np.testing.assert_allclose(restored["warped"], expected["warped"], atol=1e-5)
    np.testing.assert_array_equal(restored["warped_label"], expected["warped_label"])


def test_lossless_restorage_of_the_fixed_image_moves_the_outputs_with_it():
    registrar = tiny_registrar()
    fixed, moving = raw_volume(1), raw_volume(2)
    expected = registrar.register_volumes(fixed, moving)
    restored = registrar.register_volumes(restore(fixed, (0, 2)), moving)
    np.testing.assert_allclose(restored["warped"], expected["warped"][::-1, :, ::-1], atol=1e-5)


def test_raw_ddf_reproduces_warped_through_regflow_warp():
    """The raw-grid DDF points into the moving image's own grid (here another shape)."""
    registrar = tiny_registrar()
    fixed, moving = raw_volume(1), raw_volume(2, shape=(17, 30, 15), origin=(0, 0, 0))
    result = registrar.register_volumes(fixed, moving, init="header")
    ddf = result["ddf"]
    outside = (ddf + np.indices(ddf.shape[1:]) < 0).any(axis=0) | \
        (ddf + np.indices(ddf.shape[1:]) > np.reshape(moving.array.shape, (3, 1, 1, 1)) - 1).any(0)
    assert outside.mean() > 0.05  # part of the fixed grid maps outside the moving volume
    np.testing.assert_allclose(warp_array(moving.array, ddf), result["warped"], atol=1e-5)


def test_integer_label_values_are_kept_and_soft_labels_stay_soft():
    label = np.zeros((10, 12, 8), np.int32)
    label[2:6, 3:9, 2:6] = 100
    label[6:9, 3:9, 2:6] = 200
    ddf = torch.full((1, 3, 10, 12, 8), 0.4, dtype=torch.float64)
    warped = warp_label(label, ddf, 3)
    assert set(np.unique(warped)) == {0, 100, 200} and warped.dtype == label.dtype
    soft = np.clip(label / 200.0, 0, 1).astype(np.float32)
    warped_soft = warp_label(soft, ddf, 3)
    assert ((warped_soft > 0.01) & (warped_soft < 0.99)).any()
    one_hot = np.stack([label == 100, label == 200], axis=-1).astype(np.uint8)
    warped_one_hot = warp_label(one_hot, ddf, 3)
    assert warped_one_hot.shape == (10, 12, 8, 2) and set(np.unique(warped_one_hot)) <= {0, 1}
    np.testing.assert_array_equal(warped_one_hot[..., 0] == 1, warped == 100)


def test_a_constant_image_is_nothing_to_register():
    registrar = tiny_registrar()
    blank = Volume(np.full((10, 10, 10), 3.0, np.float32), np.eye(4), "blank.nii.gz")
    with pytest.raises(NothingToRegister, match="blank.nii.gz: nothing to register"):
        registrar.register_volumes(raw_volume(1), blank)


@pytest.mark.slow
@pytest.mark.timeout(1800)  # 3 min on 2 idle cores; >10 min when another pipeline shares them
def test_the_same_physical_pair_stored_differently_registers_alike(mirror):
    """Classical registration of a real hippocampus pair, re-stored five ways (issue matrix)."""
    folder = mirror / "Task04_Hippocampus"
    read = lambda kind, case: Volume.read(folder / kind / f"hippocampus_{case}.nii.gz")  # noqa
    fixed, moving = read("imagesTr", "001"), read("imagesTr", "004")
    fixed_label, moving_label = read("labelsTr", "001"), read("labelsTr", "004")
    config = Config.model_validate({"preprocess": {"shape": [48, 64, 48]},
                                    "train": {"loss": LNCC_BENDING.model_dump()}})
    registrar = Registrar(None, record_from_config(config), config.train.loss,
                          RefineConfig(steps=60, affine_steps=40, lr=0.2),
                          torch.device("cpu"))
    cases = restorage_cases(fixed, fixed_label, moving, moving_label)
    dice = {name: mean_dice(case.fixed_label.array, registrar.register_volumes(
        case.fixed, case.moving, case.moving_label)["warped_label"])
        for name, case in cases.items()}
    print()
    for name, case in cases.items():
        assert_registers_alike(name, case, dice[name], dice["as stored"])


def save_with_record(model: RegistrationModel, path) -> str:
    model.save(path, extra={"preprocessing": record_from_config(FRAME).model_dump()})
    return str(path)


@pytest.mark.parametrize(("passes", "expected"), [(None, 2), (3, 3), (1, 1)])
def test_evaluate_passes_sets_a_cascades_passes_at_test_time(tmp_path, passes, expected):
    torch.manual_seed(0)
    checkpoint = save_with_record(RegistrationModel(channels=(4, 8), passes=2),
                                  tmp_path / "cascade.pt")
    config = FRAME.model_validate({**FRAME.model_dump(), "evaluate": {"passes": passes}})
    assert load_registrar(checkpoint, config).model.passes == expected
    assert load_registrar(checkpoint).model.passes == 2


def test_evaluate_passes_on_an_affine_model_is_a_config_error(tmp_path):
    checkpoint = save_with_record(RegistrationModel("affine", "global", channels=(4, 8)),
                                  tmp_path / "affine.pt")
    config = FRAME.model_validate({**FRAME.model_dump(), "evaluate": {"passes": 2}})
    with pytest.raises(ConfigError, match="evaluate.passes"):
        load_registrar(checkpoint, config)


def test_evaluate_hyper_weight_conditions_the_model_and_its_refinement(tmp_path):
    hyper = {"term": "regularization.bending_energy", "low": 0.1, "high": 5.0, "weight": 0.5}
    model = RegistrationModel(channels=(4, 8), hyper=hyper)
    model.save(tmp_path / "hyper.pt", extra={
        "preprocessing": record_from_config(FRAME).model_dump(),
        "loss": {"image": {"lncc": {"weight": 1.0}},
                 "regularization": {"bending_energy": {"weight": 0.5}}}})
    default = load_registrar(str(tmp_path / "hyper.pt"), FRAME)
    assert default.model.hyper["weight"] == 0.5
    config = FRAME.model_validate({**FRAME.model_dump(), "evaluate": {"hyper_weight": 2.0}})
    asked = load_registrar(str(tmp_path / "hyper.pt"), config)
    assert asked.model.hyper["weight"] == 2.0
    loss = LossConfig.model_validate({"image": {"lncc": {"weight": 1.0}},
                                      "regularization": {"bending_energy": {"weight": 0.5}}})
    reweighted = with_term_weight(loss, "regularization.bending_energy", 2.0)
    assert reweighted.regularization["bending_energy"].weight == 2.0
    assert reweighted.image["lncc"].weight == 1.0
    plain = save_with_record(RegistrationModel(channels=(4, 8)), tmp_path / "plain.pt")
    with pytest.raises(ConfigError, match="evaluate.hyper_weight: the model is not conditioned"):
        load_registrar(plain, config)


@pytest.mark.parametrize("affine", [
    np.diag([1.0, 1.0, 1.0, 1.0]),
    np.diag([0.7, 2.5, 10.0, 1.0]),
    np.array([[0.0, 0.0, -3.0, 1.0], [1.5, 0.0, 0.0, 2.0], [0.0, 0.8, 0.0, 3.0],
              [0.0, 0.0, 0.0, 1.0]]),  # permuted and flipped axes
])
def test_frame_shape_is_the_shape_preprocessing_resamples_to(affine, monkeypatch):
    registrar = tiny_registrar()
    shapes = []
    original = inference.process_image

    def spy(image, image_affine, params):
        shapes.append(regrid(image, image_affine, params, order=1)[0].shape)
        return original(image, image_affine, params)

    monkeypatch.setattr(inference, "process_image", spy)
    volume = Volume(blobs((21, 25, 19), 3)[0, 0].numpy(), affine, "v")
    registrar.to_model_frame(volume)
    assert registrar.frame_shape((21, 25, 19), affine) == shapes[0]


def test_the_raw_grid_work_in_small_slabs_gives_the_same_answer(monkeypatch):
    registrar = tiny_registrar()
    fixed, moving = raw_volume(1), raw_volume(2, shape=(19, 23, 22))
    label = label_of(moving)
    whole = registrar.register_volumes(fixed, moving, label)
    monkeypatch.setattr(inference, "RAW_SLAB_VOXELS", 3 * 25 * 19)  # 3 rows per slab, 7 slabs
    sliced = registrar.register_volumes(fixed, moving, label)
    assert list(inference.slabs((21, 25, 19)))[-1] == slice(18, 21)
    np.testing.assert_allclose(sliced["ddf"], whole["ddf"], atol=1e-5)
    np.testing.assert_allclose(sliced["warped"], whole["warped"], atol=1e-5)
    np.testing.assert_array_equal(sliced["warped_label"], whole["warped_label"])


def test_volumes_on_the_models_grid_skip_the_raw_grid_work_with_the_same_answer(monkeypatch):
    registrar = tiny_registrar()
    on_grid = [raw_volume(seed, shape=(24, 28, 20)) for seed in (1, 2)]  # FRAME's shape, 1 mm
    assert registrar.to_model_frame(on_grid[0]).affine.tolist() == on_grid[0].affine.tolist()
    fast = registrar.register_volumes(*on_grid)
    monkeypatch.setattr(inference, "_is_identity", lambda matrix: False)
    slow = registrar.register_volumes(*on_grid)
    np.testing.assert_allclose(fast["ddf"], slow["ddf"], atol=1e-6)
    np.testing.assert_allclose(fast["warped"], slow["warped"], atol=1e-6)
    assert np.abs(fast["ddf"]).max() > 1e-3  # a real field, not zeros


def test_refinement_steps_per_call():
    registrar = Registrar(tiny_registrar().model, record_from_config(FRAME), LNCC_BENDING,
                          RefineConfig(steps=3, levels=1), torch.device("cpu"))
    fixed, moving = raw_volume(1), raw_volume(2)
    network = registrar.register_volumes(fixed, moving, refine_steps=0)
    refined = registrar.register_volumes(fixed, moving)
    again = registrar.register_volumes(fixed, moving, refine_steps=3)
    assert np.abs(refined["ddf"] - network["ddf"]).max() > 1e-3
    np.testing.assert_allclose(again["ddf"], refined["ddf"], atol=1e-5)


def test_bad_geometry_is_refused_before_any_work():
    registrar = tiny_registrar()
    singular = raw_volume(2)
    singular.affine[:3, 1] = 0.0
    with pytest.raises(GeometryError, match="^volume2: zero voxel size along axis 1"):
        registrar.register_volumes(raw_volume(1), singular)
    tiny = Volume(blobs((2, 2, 2), 1)[0, 0].numpy(), np.eye(4), "tiny.nii.gz")
    with pytest.raises(GeometryError, match=r"^tiny.nii.gz: shape \(2, 2, 2\) is below the "):
        registrar.register_volumes(tiny, raw_volume(2))
    with pytest.raises(GeometryError, match="below the minimum of 3 voxels"):
        registrar.register_volumes(tiny, raw_volume(2), smallest=3)


def test_label_values_count_the_masks_a_label_map_is_warped_as():
    label = np.zeros((10, 12, 8), np.int32)
    label[:5] = 7
    label[5:, :3] = 9
    assert list(label_values(label, 3)) == [7, 9] and warped_channels(label, 3) == 2
    assert label_values(label / 10.0, 3) is None and warped_channels(label / 10.0, 3) == 1
    one_hot = np.stack([label == 7, label == 9, label == 0], axis=-1)
    assert label_values(one_hot, 3) is None and warped_channels(one_hot, 3) == 3
