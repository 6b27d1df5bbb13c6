"""Instance optimisation: refinement lowers its own loss; classical mode recovers known maps."""

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from regflow import spatial
from regflow.config import Config, LossConfig, RefineConfig
from regflow.inference import Registrar, record_from_config, refine_settings
from regflow.models import RegistrationModel
from regflow.refine import (
    SimilarityLoss,
    affine_register,
    refine_ddf,
    regularization_multiplier,
    smooth_field,
)

LNCC_BENDING = LossConfig(image={"lncc": {"weight": 1.0, "options": {"kernel_size": 7}}},
                          regularization={"bending_energy": {"weight": 0.5}})
SHAPE = (24, 28, 20)


def blobs(shape=SHAPE, seed=0) -> torch.Tensor:
    """(1, 1, *shape) smooth random texture in [0, 1]."""
    rng = np.random.default_rng(seed)
    image = gaussian_filter(rng.random(shape), sigma=2.0)
    image = (image - image.min()) / (image.max() - image.min())
    return torch.from_numpy(image.astype(np.float32))[None, None]


def smooth_ddf(shape=SHAPE, magnitude=2.0) -> torch.Tensor:
    """(1, 3, *shape) a smooth, invertible sine displacement of ``magnitude`` voxels."""
    grid = spatial.identity_grid(shape)
    ddf = torch.stack([magnitude * torch.sin(2 * np.pi * grid[(axis + 1) % 3] / shape[(axis + 1)
                                                                                   % 3])
                       for axis in range(3)])
    return ddf[None]


def interior(tensor: torch.Tensor, margin: int = 4) -> torch.Tensor:
    return tensor[..., margin:-margin, margin:-margin, margin:-margin]


def test_refinement_lowers_the_loss_it_optimises():
    moving = blobs(seed=1)
    fixed = spatial.warp(moving, smooth_ddf())
    loss = SimilarityLoss(LNCC_BENDING)
    start = torch.zeros(1, 3, *SHAPE)
    refined = refine_ddf(fixed, moving, start, loss, RefineConfig(steps=40, lr=0.1))
    before = float(loss(fixed, moving, start))
    after = float(loss(fixed, spatial.warp(moving, refined), refined))
    print(f"\nLNCC + bending: {before:.4f} before, {after:.4f} after 40 steps")
    assert after < before - 0.1


def test_zero_refinement_steps_return_the_network_field_exactly():
    torch.manual_seed(0)
    model = RegistrationModel(channels=(4, 8), ndim=3)
    config = Config()
    registrar = Registrar(model, record_from_config(config), LNCC_BENDING,
                          RefineConfig(steps=0), torch.device("cpu"))
    moving, fixed = blobs(seed=2), blobs(seed=3)
    with torch.no_grad():
        expected = model.eval()(moving, fixed)["ddf"]
    outputs = registrar.register_tensors(moving, fixed)
    assert torch.equal(outputs["ddf"], expected)
    assert torch.equal(outputs["network_ddf"], expected)



def test_a_residual_regulariser_keeps_a_start_field_the_images_already_agree_with():
    """The start field aligns the pair exactly but is not smooth: regularising the whole field
    pulls it towards smoothness, regularising only the residual leaves it (Adam's steps on a
    near-zero gradient aside)."""
    moving = blobs(seed=1)
    start = smooth_ddf(magnitude=2.0)
    fixed = spatial.warp(moving, start)
    loss = SimilarityLoss(LNCC_BENDING, regularization_scale=5.0)
    change = {}
    for regularize in ("field", "residual"):
        refined = refine_ddf(fixed, moving, start, loss,
                             RefineConfig(steps=40, lr=0.1, regularize=regularize))
        change[regularize] = float(interior((refined - start).norm(dim=1)).mean())
    print(f"\nmean interior change of an aligning start field (voxels): "
          f"field {change['field']:.3f}, residual {change['residual']:.3f}")
    assert change["residual"] < 0.06
    assert change["field"] > 3 * change["residual"]


def test_a_regularisation_ratio_fixes_the_balance_whatever_the_training_weights():
    settings = RefineConfig(regularization_scale=5.0, regularization_ratio=2.5)
    assert regularization_multiplier(RefineConfig(regularization_scale=5.0), LNCC_BENDING) == 5.0
    assert regularization_multiplier(settings, LNCC_BENDING) == pytest.approx(5.0)  # 2.5 * 1 / 0.5
    tuned = LossConfig(image={"lncc": {"weight": 0.6, "options": {"kernel_size": 7}}},
                       regularization={"bending_energy": {"weight": 0.75}})
    assert regularization_multiplier(settings, tuned) == pytest.approx(2.0)  # 2.5 * 0.6 / 0.75
    no_regulariser = LossConfig(image={"lncc": {"weight": 1.0}})
    assert regularization_multiplier(settings, no_regulariser) == 0.0
    # one ratio, one refined field (Adam ignores the objective's overall scale); one scale, two
    moving = blobs(seed=1)
    fixed = spatial.warp(moving, smooth_ddf())

    def refined(config: LossConfig, settings: RefineConfig) -> torch.Tensor:
        loss = SimilarityLoss(config, regularization_multiplier(settings, config))
        return refine_ddf(fixed, moving, torch.zeros(1, 3, *SHAPE), loss,
                          RefineConfig(steps=20, lr=0.1))

    by_scale = RefineConfig(regularization_scale=5.0)
    ratio_gap = float((refined(LNCC_BENDING, settings) - refined(tuned, settings)).abs().mean())
    scale_gap = float((refined(LNCC_BENDING, by_scale) - refined(tuned, by_scale)).abs().mean())
    print(f"\nmean field difference between two trainings' weights: ratio 2.5 {ratio_gap:.4f}, "
          f"scale x5 {scale_gap:.4f} voxel")
    assert ratio_gap < 0.005
    assert scale_gap > 5 * ratio_gap

def test_smoothing_the_start_field_removes_voxel_noise_and_keeps_smooth_motion():
    """A Gaussian of sigma s scales a sine of wavelength L by exp(-2 pi^2 s^2 / L^2) and the
    standard deviation of 3-D white noise by about (2 sqrt(pi) s)^(-3/2)."""
    sigma = 0.75
    constant = torch.full((1, 3, *SHAPE), 1.5)
    assert torch.allclose(smooth_field(constant, sigma), constant, atol=1e-6)  # border included
    sine = smooth_ddf(magnitude=2.0)
    expected = np.exp(-2 * np.pi ** 2 * sigma ** 2 / SHAPE[1] ** 2)  # channel 0 varies along axis 1
    ratio = float((interior(smooth_field(sine, sigma))[:, 0] * interior(sine)[:, 0]).sum()
                  / (interior(sine)[:, 0] ** 2).sum())
    noise = torch.randn(1, 3, *SHAPE, generator=torch.Generator().manual_seed(0))
    noise_ratio = float(interior(smooth_field(noise, sigma)).std() / interior(noise).std())
    print(f"\nsine kept {ratio:.4f} (closed form {expected:.4f}), noise std x{noise_ratio:.3f} "
          f"(white-noise estimate {(2 * np.sqrt(np.pi) * sigma) ** -1.5:.3f})")
    assert ratio == pytest.approx(expected, abs=0.005)
    assert noise_ratio < 0.3
    assert torch.equal(smooth_field(noise, 0.0), noise)


def test_smoothing_belongs_to_refinement_and_comes_from_the_config():
    config = Config.model_validate({"evaluate": {"refine": {"steps": 5, "smooth_sigma": 0.5}}})
    assert refine_settings(config.evaluate).smooth_sigma == 0.5
    start = torch.randn(1, 3, *SHAPE, generator=torch.Generator().manual_seed(1))
    loss = SimilarityLoss(LNCC_BENDING)
    no_steps = RefineConfig(steps=0, smooth_sigma=0.5)
    assert torch.equal(refine_ddf(blobs(seed=3), blobs(seed=2), start, loss, no_steps), start)
    # residual regularisation pulls towards the smoothed start, not the raw one
    smoothed = smooth_field(start, 0.5)
    refined = refine_ddf(blobs(seed=3), blobs(seed=2), start, loss, RefineConfig(
        steps=2, lr=1e-4, levels=1, smooth_sigma=0.5, regularize="residual"))
    assert float((refined - smoothed).abs().max()) < 0.01
    assert float((refined - start).abs().mean()) > 0.1


def test_classical_mode_recovers_a_known_smooth_deformation():
    moving = blobs(seed=4)
    truth = smooth_ddf(magnitude=2.0)
    fixed = spatial.warp(moving, truth)
    registrar = Registrar(None, record_from_config(Config()), LNCC_BENDING,
                          RefineConfig(steps=150, lr=0.1, levels=2), torch.device("cpu"))
    ddf = registrar.register_tensors(moving, fixed)["ddf"]
    error = (interior(ddf) - interior(truth)).norm(dim=1)
    start = interior(truth).norm(dim=1)
    print(f"\nsmooth deformation, interior: mean |error| {error.mean():.3f} voxels (mean "
          f"|displacement| {start.mean():.3f}), 90th percentile {error.quantile(0.9):.3f}")
    assert error.mean() < 0.1 * start.mean()  # measured: 0.13 of 2.62 voxels


def test_classical_affine_stage_recovers_a_known_affine():
    moving = blobs(seed=5)
    theta = torch.tensor([[[1.05, 0.03, 0.0, 1.5],
                           [-0.02, 0.97, 0.02, -1.0],
                           [0.0, 0.04, 1.02, 0.8]]])
    truth = spatial.affine_to_ddf(theta, SHAPE)
    fixed = spatial.warp(moving, truth)
    loss = SimilarityLoss(LossConfig(image={"lncc": {"weight": 1.0,
                                                      "options": {"kernel_size": 9}}}))
    ddf = affine_register(fixed, moving, loss, RefineConfig(affine_steps=300,
                                                              affine_lr=0.01))
    error = (interior(ddf) - interior(truth)).norm(dim=1)
    print(f"\naffine: mean |error| {error.mean():.2e} voxels, max {error.max():.2e} (mean "
          f"|displacement| {interior(truth).norm(dim=1).mean():.3f})")
    assert error.max() < 1e-5  # measured: mean 5e-7, max 1.2e-6 voxel (float32 round-off)


@pytest.mark.parametrize("levels", [1, 3])
def test_refinement_stages_split_the_steps(levels):
    moving, fixed = blobs(seed=6), blobs(seed=7)
    loss = SimilarityLoss(LNCC_BENDING)
    refined = refine_ddf(fixed, moving, torch.zeros(1, 3, *SHAPE), loss,
                         RefineConfig(steps=5, levels=levels))
    assert refined.shape == (1, 3, *SHAPE) and torch.isfinite(refined).all()
