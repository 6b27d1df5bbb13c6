"""Tests for regflow.losses.composite: weighted sums built from train.loss."""

import pytest
import torch

from regflow.components import BUILTIN_LOSSES
from regflow.config import LossConfig, load_config, validate_config
from regflow.errors import ConfigError, RegflowError
from regflow.losses import LOSS_FUNCTIONS, build_loss
from regflow.losses.deform import bending_energy
from regflow.losses.image import lncc
from regflow.losses.label import dice


def loss_config(tree):
    """Validate a train.loss tree through the real config schema."""
    return validate_config({"train": {"loss": tree}}).train.loss


@pytest.fixture
def batch():
    generator = torch.Generator().manual_seed(0)
    fixed = torch.rand(2, 1, 8, 9, 10, generator=generator)
    warped = 0.5 * fixed + 0.5 * torch.rand(2, 1, 8, 9, 10, generator=generator)
    fixed_label = (fixed > 0.5).float()
    warped_label = (warped > 0.5).float()
    ddf = torch.randn(2, 3, 8, 9, 10, generator=generator)
    return {"fixed": fixed, "warped": warped, "fixed_label": fixed_label,
            "warped_label": warped_label, "ddf": ddf}


def test_total_is_the_weighted_sum_of_terms(batch):
    loss = build_loss(loss_config({
        "image": {"lncc": {"weight": 1.0, "options": {"kernel_size": 3}}},
        "label": {"dice": {"weight": 0.5, "options": {"scales": [0, 1]}}},
        "regularization": {"bending_energy": {"weight": 0.25}},
    }))
    total, terms = loss(**batch)
    expected = {
        "image/lncc": lncc(batch["fixed"], batch["warped"], kernel_size=3),
        "label/dice": 0.5 * dice(batch["fixed_label"], batch["warped_label"], scales=[0, 1]),
        "regularization/bending_energy": 0.25 * bending_energy(batch["ddf"]),
    }
    assert list(terms) == list(expected) == loss.keys
    for key, value in expected.items():
        assert terms[key].item() == pytest.approx(value.item(), rel=1e-6)
    assert total.item() == pytest.approx(sum(value.item() for value in expected.values()),
                                         rel=1e-6)


def test_gradients_flow_to_the_prediction(batch):
    loss = build_loss(loss_config({"image": {"ssd": {}}, "regularization": {"gradient_norm": {
        "weight": 0.1, "options": {"norm": "l2"}}}}))
    warped = batch["warped"].requires_grad_(True)
    ddf = batch["ddf"].requires_grad_(True)
    total, _ = loss(batch["fixed"], warped, ddf=ddf)
    total.backward()
    assert warped.grad.abs().sum() > 0 and ddf.grad.abs().sum() > 0


def test_terms_run_in_full_precision_under_autocast(batch):
    loss = build_loss(loss_config({"image": {"gmi": {}, "lncc": {}}}))
    expected, _ = loss(batch["fixed"], batch["warped"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, terms = loss(batch["fixed"].bfloat16(), batch["warped"].bfloat16())
    assert total.dtype == torch.float32 and terms["image/gmi"].dtype == torch.float32
    # only the inputs' rounding to bfloat16 (8 bits) remains
    assert total.item() == pytest.approx(expected.item(), abs=0.02)


def test_zero_weight_term_is_neither_computed_nor_reported(batch):
    loss = build_loss(loss_config({
        "image": {"gncc": {"weight": 1.0}, "lncc": {"weight": 0.0}},
        "label": {"dice": {"weight": 0.0}},
    }))
    # without labels a dice term would raise: it does not, so it was not computed
    total, terms = loss(batch["fixed"], batch["warped"])
    assert list(terms) == ["image/gncc"]
    assert total.item() == pytest.approx(terms["image/gncc"].item())


def test_label_term_without_labels_is_an_error(batch):
    loss = build_loss(loss_config({"image": {"ssd": {}}, "label": {"dice": {"weight": 1.0}}}))
    with pytest.raises(RegflowError, match="loss term label/dice needs labels"):
        loss(batch["fixed"], batch["warped"], ddf=batch["ddf"])


def test_regulariser_without_ddf_is_an_error(batch):
    loss = build_loss(loss_config({"regularization": {"bending_energy": {}}}))
    with pytest.raises(RegflowError, match="regularization/bending_energy needs a ddf"):
        loss(batch["fixed"], batch["warped"])


def test_unknown_option_names_the_key_path():
    config = loss_config({"image": {"lncc": {"weight": 0.0, "options": {"kernal_size": 5}}}})
    with pytest.raises(ConfigError, match=r"train\.loss\.image\.lncc\.options\.kernal_size"):
        build_loss(config)
    with pytest.raises(ConfigError, match=r"train\.loss\.label\.dice\.options\.target"):
        build_loss(loss_config({"label": {"dice": {"options": {"target": 1}}}}))


def test_no_active_term_is_an_error():
    with pytest.raises(ConfigError, match="train.loss: no term with a non-zero weight"):
        build_loss(LossConfig())
    with pytest.raises(ConfigError, match="non-zero weight"):
        build_loss(loss_config({"image": {"ssd": {"weight": 0}}}))


def test_table_covers_exactly_the_config_names():
    for group, names in LOSS_FUNCTIONS.items():
        assert tuple(names) == BUILTIN_LOSSES[group]
    assert set(LOSS_FUNCTIONS) == set(LossConfig.model_fields) == set(BUILTIN_LOSSES)


def test_unknown_term_lists_the_known_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.loss\.image: unknown term 'ncc'; known: 'ssd', "
                                          r"'lncc', 'gncc', 'gmi'"):
        load_config(tmp_path / "params.yaml", ["train.loss.image.ncc.weight=1"])
