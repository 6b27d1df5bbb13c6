"""Tests for regflow.models: method heads, checkpoints, devices, and (slow) fitting one pair."""

import math

import pytest
import torch
import torch.nn.functional as F

from regflow import __version__, spatial
from regflow.config import ModelConfig
from regflow.errors import ConfigError, RegflowError
from regflow.losses.deform import bending_energy
from regflow.losses.image import ssd
from regflow.models import RegistrationModel, select_device

CHANNELS = [4, 8]
SHAPE = (12, 10, 9)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def make_model(method="ddf", backbone="local", ndim=3, **kwargs):
    return RegistrationModel(method=method, backbone=backbone, channels=CHANNELS, ndim=ndim,
                             **kwargs)


def pair(shape=SHAPE, batch=2, label_channels=2):
    moving = torch.rand(batch, 1, *shape)
    fixed = torch.rand(batch, 1, *shape)
    moving_label = (torch.rand(batch, label_channels, *shape) > 0.5).float()
    return moving, fixed, moving_label


def randomise_heads(model, std=0.05):
    """Give the ~0-initialised output heads weights that move voxels by a few voxels."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "head" in name and name.endswith("weight"):
                parameter.normal_(std=std)


def smooth_random_image(size, generator):
    """A (1, 1, size^3) image in [0, 1] with texture at two scales (upsampled noise)."""
    image = sum(weight * F.interpolate(torch.randn(1, 1, control, control, control,
                                                   generator=generator),
                                       size=(size,) * 3, mode="trilinear", align_corners=True)
                for weight, control in ((1.0, size // 3), (0.5, size // 6)))
    return (image - image.min()) / (image.max() - image.min())


@pytest.mark.parametrize("backbone", ["local", "unet"])
@pytest.mark.parametrize("shape", [(35, 50, 36), (35, 50)])
def test_ddf_forward_keeps_shapes_and_starts_near_identity(backbone, shape):
    ndim = len(shape)
    model = make_model(backbone=backbone, ndim=ndim)
    moving, fixed, moving_label = pair(shape, batch=1)
    outputs = model(moving, fixed, moving_label)
    assert set(outputs) == {"ddf", "warped", "warped_label"}
    assert outputs["ddf"].shape == (1, ndim, *shape)
    assert outputs["warped"].shape == moving.shape
    assert outputs["warped_label"].shape == moving_label.shape
    assert outputs["ddf"].abs().max() < 1e-2
    torch.testing.assert_close(outputs["warped"], moving, atol=1e-2, rtol=0)


def test_without_moving_label_there_is_no_warped_label():
    moving, fixed, _ = pair()
    assert set(make_model()(moving, fixed)) == {"ddf", "warped"}


@pytest.mark.parametrize("method", ["ddf", "dvf", "affine"])
def test_warp_false_returns_the_same_field_and_no_warped_images(method):
    model = make_model(method=method, backbone="global" if method == "affine" else "local")
    randomise_heads(model)
    moving, fixed, moving_label = pair()
    full = model(moving, fixed, moving_label)
    field_only = model(moving, fixed, moving_label, warp=False)
    assert set(field_only) == set(full) - {"warped", "warped_label"}
    for key, value in field_only.items():
        torch.testing.assert_close(value, full[key], rtol=0, atol=0)


def test_warped_label_is_the_linearly_warped_moving_label():
    model = make_model()
    randomise_heads(model)
    moving, fixed, moving_label = pair()
    outputs = model(moving, fixed, moving_label)
    assert outputs["ddf"].abs().max() > 0.5
    torch.testing.assert_close(outputs["warped_label"], spatial.warp(moving_label, outputs["ddf"]))
    soft = (outputs["warped_label"] > 0.01) & (outputs["warped_label"] < 0.99)
    assert soft.float().mean() > 0.1  # linear interpolation: soft labels for Dice training


def test_dvf_output_is_integrated():
    model = make_model("dvf", integration_steps=5)
    randomise_heads(model)
    moving, fixed, _ = pair()
    outputs = model(moving, fixed)
    assert set(outputs) == {"dvf", "ddf", "warped"}
    assert outputs["dvf"].shape == outputs["ddf"].shape == (2, 3, *SHAPE)
    torch.testing.assert_close(outputs["ddf"], spatial.integrate_dvf(outputs["dvf"], steps=5))
    assert (outputs["ddf"] - outputs["dvf"]).abs().max() > 1e-2
    torch.testing.assert_close(outputs["warped"], spatial.warp(moving, outputs["ddf"]))


def test_dvf_integration_downsize_is_part_of_the_model():
    model = make_model("dvf", integration_steps=5, integration_downsize=2)
    randomise_heads(model)
    moving, fixed, _ = pair()
    outputs = model(moving, fixed)
    torch.testing.assert_close(outputs["ddf"],
                               spatial.integrate_dvf(outputs["dvf"], steps=5, downsize=2))
    assert RegistrationModel(**model.config).integration_downsize == 2


def test_dvf_with_zero_steps_is_the_ddf():
    model = make_model("dvf", integration_steps=0)
    randomise_heads(model)
    outputs = model(*pair()[:2])
    assert torch.equal(outputs["ddf"], outputs["dvf"])


@pytest.mark.parametrize("shape", [(35, 50, 36), (7, 9)])
def test_affine_is_exactly_identity_at_init(shape):
    ndim = len(shape)
    model = make_model("affine", "global", ndim=ndim)
    moving, fixed, moving_label = pair(shape)
    outputs = model(moving, fixed, moving_label)
    assert set(outputs) == {"theta", "ddf", "warped", "warped_label"}
    assert torch.equal(outputs["theta"], torch.eye(ndim, ndim + 1).expand(2, -1, -1))
    assert torch.equal(outputs["ddf"], torch.zeros(2, ndim, *shape))
    torch.testing.assert_close(outputs["warped"], moving)
    torch.testing.assert_close(outputs["warped_label"], moving_label)


def test_conditional_predicts_the_label_only():
    model = make_model("conditional", label_channels=2)
    moving, fixed, moving_label = pair(label_channels=2)
    outputs = model(moving, fixed, moving_label)
    assert set(outputs) == {"warped_label", "logits"}
    assert outputs["warped_label"].shape == (2, 2, *SHAPE)
    torch.testing.assert_close(outputs["warped_label"], torch.sigmoid(outputs["logits"]))
    torch.testing.assert_close(outputs["warped_label"], torch.full_like(moving_label, 0.5),
                               atol=1e-2, rtol=0)


@pytest.mark.parametrize("moving_label", [None, torch.zeros(2, 3, *SHAPE)])
def test_conditional_needs_a_label_with_label_channels(moving_label):
    moving, fixed, _ = pair()
    with pytest.raises(RegflowError, match="needs a moving label with 2 channel"):
        make_model("conditional", label_channels=2)(moving, fixed, moving_label)


def test_mismatched_images_are_an_error():
    with pytest.raises(RegflowError, match=r"\(2, 1, 12, 10, 9\) and \(2, 1, 12, 10, 8\)"):
        make_model()(torch.rand(2, 1, *SHAPE), torch.rand(2, 1, 12, 10, 8))


@pytest.mark.parametrize(("method", "backbone", "message"), [
    ("affine", "local", "method 'affine' cannot use backbone 'local'"),
    ("ddf", "global", "method 'ddf' cannot use backbone 'global'"),
    ("bspline", "local", "unknown method 'bspline'"),
])
def test_bad_method_backbone_is_a_config_error(method, backbone, message):
    with pytest.raises(ConfigError, match=message):
        RegistrationModel(method=method, backbone=backbone)


@pytest.mark.parametrize(("method", "backbone"), [("ddf", "unet"), ("dvf", "local"),
                                                  ("conditional", "unet")])
def test_gradients_reach_every_parameter(method, backbone):
    model = make_model(method, backbone, label_channels=2)
    moving, fixed, moving_label = pair()
    outputs = model(moving, fixed, moving_label)
    target = moving_label if method == "conditional" else fixed
    ssd(target, outputs["warped_label" if method == "conditional" else "warped"]).backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_from_config_and_config_property():
    model_config = ModelConfig(method="dvf", integration_steps=3,
                               backbone={"name": "unet", "channels": [4, 8, 8], "norm": "batch"})
    model = RegistrationModel.from_config(model_config, ndim=2, label_channels=4)
    assert model.config == {"method": "dvf", "backbone": "unet", "channels": [4, 8, 8],
                            "ndim": 2, "integration_steps": 3, "label_channels": 4,
                            "norm": "batch", "extract_levels": None,
                            "integration_downsize": 1, "passes": 1, "hyper": None, "pooling": True,
                            "concat_skip": True, "control_points": None}
    assert any(isinstance(module, torch.nn.BatchNorm2d) for module in model.modules())
    assert RegistrationModel(**model.config).config == model.config


def test_extract_levels_survive_a_checkpoint(tmp_path):
    model_config = ModelConfig(backbone={"name": "local", "channels": [4, 8],
                                         "extract_levels": [0, 2]})
    model = RegistrationModel.from_config(model_config)
    model.save(tmp_path / "model.pt")
    loaded, _ = RegistrationModel.load(tmp_path / "model.pt")
    assert loaded.config["extract_levels"] == [0, 2]
    assert list(loaded.backbone.heads) == ["0", "2"]


@pytest.mark.parametrize("method", ["ddf", "dvf"])
def test_a_cascade_composes_the_field_of_each_pass(method):
    model = make_model(method, passes=2, integration_steps=3)
    randomise_heads(model)
    moving, fixed, _ = pair()
    outputs = model(moving, fixed)
    single = make_model(method, integration_steps=3)
    single.load_state_dict(model.state_dict())
    first = single(moving, fixed, warp=False)["ddf"]
    then = single(spatial.warp(moving, first), fixed, warp=False)["ddf"]
    torch.testing.assert_close(outputs["ddf"], spatial.compose_ddfs(first, then))
    torch.testing.assert_close(outputs["warped"], spatial.warp(moving, outputs["ddf"]))
    assert (outputs["ddf"] - first).abs().max() > 1e-2


def test_a_cascade_trains_through_both_passes_and_survives_a_checkpoint(tmp_path):
    model = make_model("ddf", passes=2)
    randomise_heads(model)
    moving, fixed, _ = pair()
    model(moving, fixed)["warped"].square().mean().backward()
    assert all(parameter.grad is not None and parameter.grad.abs().sum() > 0
               for parameter in model.parameters())
    model.save(tmp_path / "cascade.pt")
    loaded, _ = RegistrationModel.load(tmp_path / "cascade.pt")
    assert loaded.passes == 2
    torch.testing.assert_close(loaded(moving, fixed)["ddf"], model(moving, fixed)["ddf"])
    assert RegistrationModel.from_config(ModelConfig(passes=3)).passes == 3


@pytest.mark.parametrize(("method", "backbone", "passes"), [("affine", "global", 2),
                                                            ("conditional", "local", 2),
                                                            ("ddf", "local", 0)])
def test_a_cascade_needs_a_field_method_and_a_pass(method, backbone, passes):
    with pytest.raises(ConfigError, match="train.model.passes"):
        make_model(method, backbone, passes=passes)


@pytest.mark.parametrize(("method", "backbone"), [("ddf", "local"), ("affine", "global"),
                                                  ("conditional", "unet")])
def test_save_load_roundtrip(tmp_path, method, backbone):
    model = make_model(method, backbone, label_channels=2)
    randomise_heads(model)
    path = tmp_path / "nested" / "model.pt"
    extra = {"step": 7, "best_score": 0.5, "names": ["a", "b"]}
    model.save(path, extra=extra)
    assert [entry.name for entry in path.parent.iterdir()] == ["model.pt"]  # no temporary left
    loaded, loaded_extra = RegistrationModel.load(path)
    assert loaded_extra == extra
    assert loaded.config == model.config
    inputs = pair()
    model.eval()
    loaded.eval()
    with torch.no_grad():
        expected, actual = model(*inputs), loaded(*inputs)
    assert set(actual) == set(expected)
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key
    stored = torch.load(path, weights_only=True)
    assert stored["regflow_version"] == __version__


def test_load_missing_file_names_it(tmp_path):
    path = tmp_path / "absent.pt"
    with pytest.raises(RegflowError, match=f"{path}: no such checkpoint file"):
        RegistrationModel.load(path)


def test_load_corrupt_file_names_it(tmp_path):
    path = tmp_path / "corrupt.pt"
    path.write_bytes(b"this is not a checkpoint")
    with pytest.raises(RegflowError, match=f"{path}: not a readable checkpoint"):
        RegistrationModel.load(path)


def test_load_foreign_torch_file_is_not_a_regflow_checkpoint(tmp_path):
    path = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(RegflowError, match=f"{path}: not a regflow checkpoint"):
        RegistrationModel.load(path)


def test_load_weights_that_do_not_match_the_config(tmp_path):
    path = tmp_path / "mismatch.pt"
    make_model().save(path)
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["config"]["channels"] = [4, 16]
    torch.save(checkpoint, path)
    with pytest.raises(RegflowError, match=f"{path}: weights do not match the stored model"):
        RegistrationModel.load(path)


def test_select_device():
    assert select_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert select_device("auto").type == expected
    if torch.cuda.is_available():
        assert select_device("cuda").type == "cuda"
    else:
        with pytest.raises(ConfigError, match="train.device: cuda requested"):
            select_device("cuda")
    with pytest.raises(ConfigError, match="expected auto, cpu or cuda"):
        select_device("tpu")


@pytest.mark.slow
def test_ddf_model_recovers_a_known_deformation():
    """LocalNet [8, 16, 32] fitted to one 24^3 pair whose fixed image is the moving image warped
    by a known sinusoidal DDF (2 voxels per axis, mean length ~2.3 voxels): after 150 Adam steps
    (SSD + 0.1 bending energy) the mean displacement error in the interior (3 voxels from each
    face) is below 0.5 voxel."""
    size = 24
    generator = torch.Generator().manual_seed(1)
    moving = smooth_random_image(size, generator)
    angles = spatial.identity_grid((size,) * 3) * (2 * math.pi / (size - 1))
    true_ddf = 2.0 * torch.stack([torch.sin(angles[1]), torch.sin(angles[2] + 1.0),
                                  torch.sin(angles[0] + 2.0)])[None]
    fixed = spatial.warp(moving, true_ddf)
    model = RegistrationModel("ddf", "local", channels=[8, 16, 32])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    interior = (..., slice(3, -3), slice(3, -3), slice(3, -3))

    def error(ddf):
        return (ddf - true_ddf).norm(dim=1)[interior].mean().item()

    assert error(torch.zeros_like(true_ddf)) > 2.0
    for _ in range(150):
        outputs = model(moving, fixed)
        loss = ssd(fixed, outputs["warped"]) + 0.1 * bending_energy(outputs["ddf"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        assert error(model(moving, fixed)["ddf"]) < 0.5


@pytest.mark.slow
def test_affine_model_recovers_a_known_affine():
    """GlobalNet [8, 16, 32] fitted to one 32^3 pair related by a 5-degree rotation about axis 0
    and a (1.5, -1, 0.5)-voxel translation: after 150 Adam steps on SSD every matrix entry is
    within 0.02 and every translation within 0.25 voxel of the truth."""
    size = 32
    moving = smooth_random_image(size, torch.Generator().manual_seed(2))
    cos, sin = math.cos(math.radians(5)), math.sin(math.radians(5))
    true_theta = torch.tensor([[[1.0, 0.0, 0.0, 1.5], [0.0, cos, -sin, -1.0],
                                [0.0, sin, cos, 0.5]]])
    fixed = spatial.warp(moving, spatial.affine_to_ddf(true_theta, (size,) * 3))
    model = RegistrationModel("affine", "global", channels=[8, 16, 32])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(150):
        loss = ssd(fixed, model(moving, fixed)["warped"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        theta = model(moving, fixed)["theta"]
    assert (theta[..., :3] - true_theta[..., :3]).abs().max() < 0.02
    assert (theta[..., 3] - true_theta[..., 3]).abs().max() < 0.25


HYPER = {"term": "regularization.bending_energy", "low": 0.01, "high": 10.0, "weight": 0.1}


def test_a_hyper_model_is_the_plain_model_until_its_modulation_trains(tmp_path):
    torch.manual_seed(0)
    hyper_model = RegistrationModel("ddf", "local", channels=[4, 8], hyper=HYPER)
    torch.manual_seed(0)
    plain = RegistrationModel("ddf", "local", channels=[4, 8])
    plain_state = plain.state_dict()
    # the same backbone weights, each normalisation now inside a FiLM layer
    shared = {key: plain_state[key.replace(".norm.", ".")] for key in hyper_model.state_dict()
              if key.replace(".norm.", ".") in plain_state}
    assert len(shared) == len(plain_state)
    hyper_model.load_state_dict(shared, strict=False)
    moving, fixed = torch.rand(1, 1, 16, 16, 16), torch.rand(1, 1, 16, 16, 16)
    for weight in (0.01, 1.0, 10.0):
        assert torch.allclose(hyper_model(moving, fixed, hyper_weight=weight)["ddf"],
                              plain(moving, fixed)["ddf"], atol=1e-7)
    hyper_model.save(tmp_path / "hyper.pt")
    loaded, _ = RegistrationModel.load(tmp_path / "hyper.pt")
    assert loaded.hyper == HYPER
    assert loaded.hyper_position(0.1) == pytest.approx(1 / 3)  # log scale over 3 decades


def test_hyper_weight_outside_the_range_or_without_hyper_is_an_error():
    model = RegistrationModel("ddf", "local", channels=[4, 8], hyper=HYPER)
    with pytest.raises(ConfigError, match=r"evaluate.hyper_weight: 20.0 is outside .*0.01, 10.0"):
        model.set_hyper_weight(20.0)
    with pytest.raises(ConfigError, match="not conditioned"):
        RegistrationModel("ddf", "local", channels=[4, 8]).set_hyper_weight(1.0)
    with pytest.raises(ConfigError, match="no normalisation layer"):
        RegistrationModel("ddf", "local", channels=[4, 8], norm="none", hyper=HYPER)


@pytest.mark.slow
def test_an_amortised_model_gives_smoother_fields_for_larger_weights():
    """LocalNet [8, 16] conditioned on the bending weight, fitted for 200 Adam steps to one 24^3
    pair related by a sinusoidal DDF, each step at a weight drawn log-uniformly from [0.01, 10]
    (SSD + weight x bending energy): asked for weight 10 its field has less than half the bending
    energy of its field at 0.01, and the field at 0.01 aligns the images better."""
    size = 24
    generator = torch.Generator().manual_seed(2)
    moving = smooth_random_image(size, generator)
    angles = spatial.identity_grid((size,) * 3) * (2 * math.pi / (size - 1))
    true_ddf = 2.0 * torch.stack([torch.sin(angles[1]), torch.sin(angles[2] + 1.0),
                                  torch.sin(angles[0] + 2.0)])[None]
    fixed = spatial.warp(moving, true_ddf)
    torch.manual_seed(0)
    model = RegistrationModel("ddf", "local", channels=[8, 16], hyper=HYPER)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(200):
        weight = 0.01 * 1000 ** torch.rand((), generator=generator).item()
        outputs = model(moving, fixed, hyper_weight=weight)
        loss = ssd(fixed, outputs["warped"]) + weight * bending_energy(outputs["ddf"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        loose, stiff = (model(moving, fixed, hyper_weight=w) for w in (0.01, 10.0))
    assert bending_energy(stiff["ddf"]) < 0.5 * bending_energy(loose["ddf"])
    assert ssd(fixed, loose["warped"]) < ssd(fixed, stiff["warped"])


def test_checkpoints_written_before_the_deepreg_options_still_load(tmp_path):
    """Older checkpoints carry no pooling/concat_skip/control_points: the defaults rebuild them."""
    model = RegistrationModel("ddf", "unet", channels=[2, 4], ndim=2)
    model.save(tmp_path / "model.pt")
    checkpoint = torch.load(tmp_path / "model.pt", weights_only=True)
    for key in ("pooling", "concat_skip", "control_points"):
        del checkpoint["config"][key]
    torch.save(checkpoint, tmp_path / "old.pt")
    loaded, _ = RegistrationModel.load(tmp_path / "old.pt")
    assert (loaded.pooling, loaded.concat_skip, loaded.control_points) == (True, True, None)


def test_control_points_make_the_field_a_bspline_of_the_backbones():
    """DeepReg's control_points: the backbone's dense field, interpolated from its control grid."""
    torch.manual_seed(0)
    model = RegistrationModel("ddf", "local", channels=[4], ndim=3, control_points=4)
    assert model.control_points == [4, 4, 4]
    with torch.no_grad():
        torch.nn.init.normal_(model.backbone.heads["0"].weight, std=0.3)
        moving, fixed = torch.rand(1, 1, 16, 12, 16), torch.rand(1, 1, 16, 12, 16)
        dense = model.backbone(torch.cat([moving, fixed], dim=1))
        ddf = model(moving, fixed, warp=False)["ddf"]
    torch.testing.assert_close(ddf, spatial.bspline_field(dense, [4, 4, 4]))
    # smoother than the dense field: mean squared second difference along every axis
    roughness = [torch.diff(field, n=2, dim=axis).square().mean() for field in (ddf, dense)
                 for axis in (2, 3, 4)]
    assert sum(roughness[:3]) < 0.1 * sum(roughness[3:])
    with pytest.raises(ConfigError, match="control_points"):
        RegistrationModel("affine", "global", control_points=4)
