"""Tests for regflow.networks: shapes for any input size, initial fields, identity GlobalNet."""

import pytest
import torch

from regflow.errors import ConfigError, RegflowError
from regflow.networks import GlobalNet, LocalNet, UNet, build_backbone
from regflow.networks.layers import (
    InstanceNorm,
    conv,
    crop_to,
    normalisation,
    pad_to_multiple,
)

CHANNELS = [4, 8]
SHAPES = {3: (35, 50, 36), 2: (35, 50)}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("name", ["local", "unet"])
def test_dense_backbones_keep_any_input_size_and_start_near_zero(name, ndim):
    shape = SHAPES[ndim]
    net = build_backbone(name, ndim, in_channels=2, out_channels=ndim, channels=CHANNELS)
    field = net(torch.rand(2, 2, *shape))
    assert field.shape == (2, ndim, *shape)
    assert 0 < field.abs().max().item() < 1e-2  # ~0 voxels, but not dead


@pytest.mark.parametrize("ndim", [2, 3])
def test_dense_backbone_out_channels_follow_argument(ndim):
    net = build_backbone("unet", ndim, in_channels=3, out_channels=5, channels=[4, 8, 8])
    assert net(torch.rand(1, 3, *SHAPES[ndim])).shape == (1, 5, *SHAPES[ndim])


@pytest.mark.parametrize("shape", [(35, 50, 36), (1, 2, 3), (8, 8, 8), (35, 50)])
def test_globalnet_is_exactly_identity_at_init(shape):
    ndim = len(shape)
    net = build_backbone("global", ndim, in_channels=2, out_channels=ndim, channels=CHANNELS)
    theta = net(torch.randn(3, 2, *shape))
    identity = torch.eye(ndim, ndim + 1).expand(3, ndim, ndim + 1)
    assert torch.equal(theta, identity)


@pytest.mark.parametrize("network", [LocalNet, UNet])
def test_samples_in_a_batch_are_independent(network):
    net = network(3, 2, 3, CHANNELS).double()  # instance norm's sums differ in float32 rounding
    images = torch.rand(2, 2, 16, 12, 20, dtype=torch.float64)
    together = net(images)
    alone = net(images[1:])
    torch.testing.assert_close(together[1:], alone, rtol=1e-4, atol=1e-9)


def test_localnet_sums_fields_from_every_level():
    net = LocalNet(3, 2, 3, CHANNELS)
    bottom = str(len(CHANNELS))
    assert list(net.heads) == [str(level) for level in range(len(CHANNELS) + 1)]
    images = torch.rand(1, 2, 16, 16, 16)
    with torch.no_grad():
        for level, head in net.heads.items():
            if level != bottom:
                head.weight.zero_()
        bottom_only = net(images)
        net.heads[bottom].weight.zero_()
        nothing = net(images)
    assert bottom_only.abs().max() > 0
    assert torch.equal(nothing, torch.zeros_like(nothing))


def test_localnet_extract_levels_keep_only_those_heads_and_their_sum():
    torch.manual_seed(0)
    full = LocalNet(3, 2, 3, CHANNELS)
    images = torch.rand(1, 2, 16, 16, 16)
    coarse = LocalNet(3, 2, 3, CHANNELS, extract_levels=[1, 2])
    assert list(coarse.heads) == ["1", "2"]
    unused = {name for name in full.state_dict()
              if name.startswith(("decoders.0.", "ups.0.", "heads.0."))}
    assert unused and set(full.state_dict()) - set(coarse.state_dict()) == unused
    coarse.load_state_dict(full.state_dict(), strict=False)  # same encoder, decoders, heads 1, 2
    with torch.no_grad():
        full.heads["0"].weight.zero_()
        full.heads["0"].bias.zero_()
        expected = full(images)
        got = coarse(images)
    assert got.shape == (1, 3, 16, 16, 16)
    torch.testing.assert_close(got, expected)  # the missing levels add nothing, as zeroed heads
    with pytest.raises(ConfigError, match=r"extract_levels: \[3\] must be levels in 0..2"):
        LocalNet(3, 2, 3, CHANNELS, extract_levels=[3])
    with pytest.raises(ConfigError, match="only the local backbone sums fields over levels"):
        build_backbone("unet", 3, 2, 3, CHANNELS, extract_levels=[0])


@pytest.mark.parametrize("name", ["local", "unet", "global"])
def test_gradients_reach_every_parameter(name):
    net = build_backbone(name, 3, in_channels=2, out_channels=3, channels=CHANNELS)
    if name == "global":
        # A zero head blocks the encoder's gradient at init; any trained head lets it through.
        torch.nn.init.normal_(net.head.weight, std=0.1)
    output = net(torch.rand(1, 2, 9, 10, 11))
    output.square().sum().backward()
    for parameter_name, parameter in net.named_parameters():
        assert parameter.grad is not None, parameter_name
        assert parameter.grad.abs().sum() > 0, parameter_name


def test_pad_to_multiple_replicates_and_crop_undoes_it():
    image = torch.arange(2 * 5 * 6, dtype=torch.float32).view(1, 2, 5, 6)
    padded, shape = pad_to_multiple(image, 4)
    assert padded.shape == (1, 2, 8, 8)
    assert shape == (5, 6)
    assert torch.equal(padded[0, 1, 7, 7], image[0, 1, 4, 5])  # far corner copies the edge
    assert torch.equal(padded[0, 0, 2, 6:], image[0, 0, 2, 5].expand(2))
    assert torch.equal(crop_to(padded, shape), image)


def test_pad_to_multiple_is_a_no_op_on_multiples():
    image = torch.rand(1, 1, 8, 16, 4)
    padded, shape = pad_to_multiple(image, 4)
    assert padded is image
    assert shape == (8, 16, 4)


def test_globalnet_depth_follows_channels():
    net = GlobalNet(3, 2, channels=[4, 8, 16])
    assert net.depth == 3
    assert net.head.in_features == 32


def test_unknown_backbone_is_a_config_error_listing_known_names():
    with pytest.raises(ConfigError, match="unknown backbone 'vnet'; known: local, global, unet"):
        build_backbone("vnet", 3, 2, 3, CHANNELS)


def test_unsupported_ndim_is_an_error():
    with pytest.raises(RegflowError, match="ndim must be 2 or 3, got 4"):
        build_backbone("local", 4, 2, 4, CHANNELS)


def test_empty_channels_is_an_error():
    with pytest.raises(RegflowError, match="at least one level"):
        build_backbone("unet", 3, 2, 3, [])


@pytest.mark.parametrize(("norm", "kind"), [("instance", InstanceNorm),
                                            ("batch", torch.nn.BatchNorm3d), ("none", None)])
def test_norm_option_selects_the_feature_normalisation(norm, kind):
    net = LocalNet(3, 2, 3, CHANNELS, norm=norm)
    found = {type(module) for module in net.modules()} & {InstanceNorm, torch.nn.BatchNorm3d}
    assert found == ({kind} if kind else set())


def test_instance_norm_normalises_each_channel_of_each_sample():
    block = normalisation(3, 4, "instance")
    features = 5 + 3 * torch.randn(2, 4, 6, 7, 5)
    normalised = block(features)
    torch.testing.assert_close(normalised.mean(dim=(2, 3, 4)), torch.zeros(2, 4), atol=1e-5,
                               rtol=0)
    torch.testing.assert_close(normalised.std(dim=(2, 3, 4), unbiased=False), torch.ones(2, 4),
                               atol=1e-3, rtol=0)
    torch.testing.assert_close(normalised, torch.nn.InstanceNorm3d(4)(features), atol=1e-5,
                               rtol=0)


def test_unknown_norm_is_a_config_error():
    with pytest.raises(ConfigError, match="train.model.backbone.norm"):
        normalisation(3, 4, "layer")


@pytest.mark.parametrize("ndim", [2, 3])
def test_convolutions_of_a_single_pair_run_onednn_and_match_pytorchs_own(ndim):
    """A batch of one small volume would otherwise take PyTorch's reference kernel (3-7x slower)."""
    reference = {2: torch.nn.Conv2d, 3: torch.nn.Conv3d}[ndim](16, 16, 3, padding=1)
    layer = conv(ndim, 16, 16)
    layer.load_state_dict(reference.state_dict())
    image = torch.rand(1, 16, *[12] * ndim, requires_grad=True)
    with torch.profiler.profile() as profile:
        output = layer(image)
    kernels = {event.key for event in profile.key_averages()}
    assert "aten::mkldnn_convolution" in kernels
    assert not any(kernel.startswith("aten::slow_conv") for kernel in kernels)
    expected = reference(image)
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(output.square().sum(), [image, layer.weight, layer.bias])
    expected_grads = torch.autograd.grad(expected.square().sum(),
                                         [image, reference.weight, reference.bias])
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("grad", [True, False])
def test_instance_norm_of_channels_last_features_matches_group_norm_and_keeps_the_order(grad):
    features = torch.randn(2, 4, 6, 8, 6).contiguous(memory_format=torch.channels_last_3d)
    features.requires_grad_(grad)
    reference = torch.nn.GroupNorm(4, 4)
    with torch.no_grad():
        reference.weight.uniform_(0.5, 1.5)
        reference.bias.uniform_(-0.5, 0.5)
    layer = normalisation(3, 4, "instance")
    layer.load_state_dict(reference.state_dict())
    with torch.set_grad_enabled(grad):
        output, expected = layer(features), reference(features)
    assert output.is_contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(output, expected)
    if grad:
        upstream = torch.randn_like(output)
        grads = torch.autograd.grad(output, [features, layer.weight], upstream)
        expected_grads = torch.autograd.grad(expected, [features, reference.weight], upstream)
        for value, expected_value in zip(grads, expected_grads, strict=True):
            torch.testing.assert_close(value, expected_value)


@pytest.mark.parametrize("ndim", [2, 3])
def test_unet_without_pooling_downsamples_by_strided_convolutions(ndim):
    """DeepReg's ``pooling: false``: each level's down-sampling is a conv block of kernel 2 and
    stride 2 keeping that level's channels (deepreg UNet.build_down_sampling_block)."""
    net = UNet(ndim, 2, ndim, CHANNELS, pooling=False)
    downs = [module for module in net.encoder.downs]
    assert not any(isinstance(m, (torch.nn.MaxPool2d, torch.nn.MaxPool3d)) for m in net.modules())
    for down, width in zip(downs, CHANNELS, strict=True):
        conv_layer = down[0]
        assert (conv_layer.in_channels, conv_layer.out_channels) == (width, width)
        assert conv_layer.kernel_size == (2,) * ndim and conv_layer.stride == (2,) * ndim
    features = torch.rand(1, CHANNELS[0], *[8] * ndim)
    assert downs[0](features).shape == (1, CHANNELS[0], *[4] * ndim)
    pooled = UNet(ndim, 2, ndim, CHANNELS)
    extra = sum(p.numel() for p in net.parameters()) - sum(p.numel() for p in pooled.parameters())
    assert extra == sum(w * w * 2**ndim + w + 2 * w for w in CHANNELS)  # conv + bias + norm
    assert net(torch.rand(1, 2, *SHAPES[ndim])).shape == (1, ndim, *SHAPES[ndim])


def test_unet_adds_skips_when_concat_skip_is_false():
    """DeepReg's ``concat_skip: false`` (its default): tfkl.Add of the up-sampled features and the
    skip, so the decoder block sees ``width`` channels, not ``2 * width``."""
    added, concatenated = (UNet(3, 2, 3, CHANNELS, concat_skip=flag) for flag in (False, True))
    for level, width in enumerate(CHANNELS):
        assert added.decoders[level][0][0].in_channels == width
        assert concatenated.decoders[level][0][0].in_channels == 2 * width
    skips, bottom = added.encoder(torch.rand(1, 2, 8, 8, 8))
    up = added.ups[1](bottom)
    merged = added.decoders[1](up + skips[1])  # what forward feeds the level-1 decoder
    assert merged.shape == (1, CHANNELS[1], 4, 4, 4)
    assert added(torch.rand(1, 2, *SHAPES[3])).shape == (1, 3, *SHAPES[3])
    with pytest.raises(ConfigError, match="concat_skip"):
        build_backbone("local", 3, 2, 3, CHANNELS, concat_skip=False)
