"""Building blocks shared by the backbones: 2-D/3-D layer choice, conv blocks, encoder, pad/crop.

Design choices (kept here so that every backbone follows them):

- Normalisation after every hidden convolution (not the field heads), chosen by ``norm``:
  "instance" (the default), "batch" or "none". Instance normalisation makes these networks learn
  several times faster: on msd-hippocampus, LocalNet [8, 16, 32] reached validation Dice 0.76 in
  400 steps with it, while without it LocalNet stayed near the unregistered 0.53-0.55 for its
  first 200 steps (the fields are still predicted from the raw image pair; only hidden features
  are normalised).
  It is computed as ``GroupNorm(C, C)`` (the same values), which runs about 1.8x faster on CPU
  than ``InstanceNorm3d``. BatchNorm's statistics are noisy for the 1-4 pairs of a registration
  batch.
- LeakyReLU(0.2) in place, max pooling down (or, with ``pooling=False`` as DeepReg's option, a
  learned kernel-2 stride-2 convolution block), kernel-2 stride-2 transposed convolutions up (cheap
  and free of checkerboard artefacts because kernel == stride).
- 3-D backbones run their features in ``channels_last_3d`` memory order (values, shapes and the
  parameters' layout are unchanged; outputs are contiguous again): oneDNN's CPU convolutions are
  about 1.4x faster in it, forward and backward. Their convolutions always take oneDNN's kernel
  on the CPU (:class:`OneDnnConvolution`): for a single pair PyTorch would pick its reference
  kernel at the coarse levels, and LocalNet [8, 16, 32] at 48x64x48 took 197 ms per pair instead
  of 78.
- Inputs of any size are padded (replicate, at the far end of each axis) to a multiple of
  ``2**depth`` and outputs cropped back, so a 35x50x36 volume works with any depth.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from regflow.errors import ConfigError, RegflowError

NEGATIVE_SLOPE = 0.2
FIELD_INIT_STD = 1e-5
NORMS = ("instance", "batch", "none")
DEFAULT_NORM = "instance"


def check_ndim(ndim: int) -> int:
    """Return ``ndim`` if it is 2 or 3.

    Raises:
        RegflowError: for any other number of spatial dimensions.
    """
    if ndim not in (2, 3):
        raise RegflowError(f"networks: ndim must be 2 or 3, got {ndim}")
    return ndim


def channels_last(image: torch.Tensor) -> torch.Tensor:
    """(B, C, D, H, W) -> the same values in ``channels_last_3d`` order; 2-D inputs unchanged."""
    if image.dim() != 5:
        return image
    return image.contiguous(memory_format=torch.channels_last_3d)


def takes_onednn(image: torch.Tensor) -> bool:
    """Whether a convolution of ``image`` can run oneDNN's kernel: float32 on a CPU with oneDNN."""
    return (image.device.type == "cpu" and image.dtype == torch.float32
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled)


class OneDnnConvolution:
    """Mixin for ``nn.Conv2d``/``nn.Conv3d``: on the CPU, always oneDNN's convolution.

    PyTorch picks its reference ("slow_conv3d") kernel for a batch of one whose
    ``batch x channels x first two sizes`` is under 20480, which covers every coarse level of a
    single pair: a 16-channel 24x32x24 convolution then takes 23.5 ms against 3.5 ms in oneDNN.
    Results agree to float rounding (1e-6 relative) and autograd is the same convolution backward.
    """

    def _conv_forward(self, image: torch.Tensor, weight: torch.Tensor,
                      bias: torch.Tensor | None) -> torch.Tensor:
        if self.padding_mode == "zeros" and takes_onednn(image):
            return torch.ops.aten.mkldnn_convolution(image, weight, bias, self.padding,
                                                     self.stride, self.dilation, self.groups)
        return super()._conv_forward(image, weight, bias)


class Conv2d(OneDnnConvolution, nn.Conv2d):
    """``nn.Conv2d`` that uses oneDNN on the CPU for every batch size."""


class Conv3d(OneDnnConvolution, nn.Conv3d):
    """``nn.Conv3d`` that uses oneDNN on the CPU for every batch size."""


def conv(ndim: int, in_channels: int, out_channels: int, kernel_size: int = 3) -> nn.Module:
    """A same-size ``Conv{ndim}d`` (stride 1, zero padding ``kernel_size // 2``)."""
    conv_class = {2: Conv2d, 3: Conv3d}[check_ndim(ndim)]
    return conv_class(in_channels, out_channels, kernel_size, padding=kernel_size // 2)


def downsample(ndim: int, channels: int, pooling: bool, norm: str) -> nn.Module:
    """Halve the spatial size: 2x max pooling, or (``pooling=False``, DeepReg's strided
    down-sampling block) a kernel-2 stride-2 convolution of ``channels`` features, normalisation
    and LeakyReLU."""
    if pooling:
        return {2: nn.MaxPool2d, 3: nn.MaxPool3d}[check_ndim(ndim)](kernel_size=2)
    conv_class = {2: Conv2d, 3: Conv3d}[check_ndim(ndim)]
    return nn.Sequential(conv_class(channels, channels, kernel_size=2, stride=2),
                         normalisation(ndim, channels, norm),
                         nn.LeakyReLU(NEGATIVE_SLOPE, inplace=True))


def upsample(ndim: int, in_channels: int, out_channels: int) -> nn.Module:
    """Double the spatial size: transposed convolution with kernel 2, stride 2."""
    transpose_class = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[check_ndim(ndim)]
    return transpose_class(in_channels, out_channels, kernel_size=2, stride=2)


def field_head(ndim: int, in_channels: int, out_channels: int) -> nn.Module:
    """Output convolution initialised to ~0 (weights N(0, 1e-5), zero bias).

    A displacement (or velocity) field predicted by this head starts as ~0 voxels, i.e. the
    untrained model is close to the identity transform.
    """
    head = conv(ndim, in_channels, out_channels)
    nn.init.normal_(head.weight, std=FIELD_INIT_STD)
    nn.init.zeros_(head.bias)
    return head


class InstanceNorm(nn.GroupNorm):
    """Instance normalisation as ``GroupNorm(C, C)``, trained in the standard memory order on CPU.

    PyTorch's CPU GroupNorm backward is 3-4x slower on ``channels_last_3d`` features than on
    standard ones (8 channels at 48x64x48, batch 2: 36 ms against 11 ms forward and backward), so
    while gradients are recorded the features are normalised in the standard order and handed
    back in ``channels_last_3d``; one LocalNet [8, 16, 32] training step drops from 0.85 s to
    0.72 s on 2 threads. Inference keeps ``channels_last_3d``: without a backward pass the two
    conversions cost more than they save (85 ms per pair against 75 ms).
    """

    def __init__(self, channels: int) -> None:
        super().__init__(channels, channels)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Normalise each channel of each sample to zero mean and unit variance, then scale."""
        if (features.dim() != 5 or features.device.type != "cpu" or features.is_contiguous()
                or not torch.is_grad_enabled()):
            return super().forward(features)
        normalised = super().forward(features.contiguous())
        return normalised.contiguous(memory_format=torch.channels_last_3d)


def normalisation(ndim: int, channels: int, norm: str) -> nn.Module:
    """The feature normalisation named by ``norm`` (one of :data:`NORMS`) for ``channels``."""
    if norm == "instance":
        return InstanceNorm(channels)
    if norm == "batch":
        return {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[check_ndim(ndim)](channels)
    if norm == "none":
        return nn.Identity()
    raise ConfigError(f"train.model.backbone.norm: unknown norm {norm!r}; "
                      f"known: {', '.join(NORMS)}")


class ConvBlock(nn.Sequential):
    """3^ndim convolution, normalisation, LeakyReLU(0.2): (B, in, *S) -> (B, out, *S)."""

    def __init__(self, ndim: int, in_channels: int, out_channels: int, norm: str) -> None:
        super().__init__(conv(ndim, in_channels, out_channels),
                         normalisation(ndim, out_channels, norm),
                         nn.LeakyReLU(NEGATIVE_SLOPE, inplace=True))


class ResidualBlock(nn.Module):
    """Two 3^ndim convolutions with an identity shortcut: (B, C, *S) -> (B, C, *S)."""

    def __init__(self, ndim: int, channels: int, norm: str) -> None:
        super().__init__()
        self.first = ConvBlock(ndim, channels, channels, norm)
        self.second = nn.Sequential(conv(ndim, channels, channels),
                                    normalisation(ndim, channels, norm))
        self.activation = nn.LeakyReLU(NEGATIVE_SLOPE, inplace=True)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C, *S) -> (B, C, *S)."""
        return self.activation(self.second(self.first(features)) + features)


def level_block(ndim: int, in_channels: int, out_channels: int, residual: bool,
                norm: str) -> nn.Sequential:
    """One resolution level: ConvBlock(in -> out) then a ResidualBlock or a second ConvBlock."""
    second = (ResidualBlock(ndim, out_channels, norm) if residual
              else ConvBlock(ndim, out_channels, out_channels, norm))
    return nn.Sequential(ConvBlock(ndim, in_channels, out_channels, norm), second)


class Encoder(nn.Module):
    """Contracting path shared by LocalNet, GlobalNet and UNet.

    Level ``i`` works at ``1 / 2**i`` of the input size with ``channels[i]`` features and is
    followed by a 2x down-sampling (:func:`downsample`); the bottom level has ``2 * channels[-1]``
    features at ``1 / 2**depth`` of the input size, ``depth = len(channels)``.

    Args:
        ndim: 2 or 3 spatial dimensions.
        in_channels: input channels (2 for a moving/fixed pair).
        channels: features per level, e.g. ``[16, 32, 64]``.
        residual: ResidualBlock (True) or a second plain ConvBlock (False) in each level.
        norm: feature normalisation, one of :data:`NORMS`.
        pooling: down-sample by max pooling (True) or by strided convolutions (False).
    """

    def __init__(self, ndim: int, in_channels: int, channels: Sequence[int],
                 residual: bool, norm: str = DEFAULT_NORM, pooling: bool = True) -> None:
        super().__init__()
        if not channels:
            raise RegflowError("networks: channels must list at least one level")
        widths = [in_channels, *channels]
        self.levels = nn.ModuleList(
            level_block(ndim, widths[i], widths[i + 1], residual, norm)
            for i in range(len(channels))
        )
        self.bottom = level_block(ndim, channels[-1], 2 * channels[-1], residual, norm)
        self.downs = nn.ModuleList(downsample(ndim, width, pooling, norm) for width in channels)

    def forward(self, image: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Encode a padded input.

        Args:
            image: (B, in_channels, *S) with every size in S a multiple of ``2**depth``.

        Returns:
            skips: per level i, (B, channels[i], *S / 2**i).
            bottom: (B, 2 * channels[-1], *S / 2**depth).
        """
        skips = []
        features = image
        for level, down in zip(self.levels, self.downs, strict=True):
            features = level(features)
            skips.append(features)
            features = down(features)
        return skips, self.bottom(features)


def pad_to_multiple(image: torch.Tensor, multiple: int) -> tuple[torch.Tensor, torch.Size]:
    """Replicate-pad the spatial axes at their far end up to a multiple of ``multiple``.

    Args:
        image: (B, C, *S).
        multiple: e.g. ``2**depth``.

    Returns:
        The padded (B, C, *S') tensor and the original spatial size S (for :func:`crop_to`).
    """
    shape = image.shape[2:]
    extra = [-size % multiple for size in shape]
    if not any(extra):
        return image, shape
    # F.pad lists (before, after) pairs starting from the last axis.
    pad = [amount for extra_axis in reversed(extra) for amount in (0, extra_axis)]
    return F.pad(image, pad, mode="replicate"), shape


def crop_to(image: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Undo :func:`pad_to_multiple`: keep the first ``shape`` voxels of each spatial axis.

    Args:
        image: (B, C, *S').
        shape: target spatial size S, S <= S' per axis.

    Returns:
        (B, C, *S).
    """
    return image[(..., *(slice(0, size) for size in shape))]


def resize(field: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Linearly resample (B, C, *S) to (B, C, *shape) (bi/trilinear, align_corners=False)."""
    mode = {2: "bilinear", 3: "trilinear"}[field.dim() - 2]
    return F.interpolate(field, size=tuple(shape), mode=mode, align_corners=False)


class EncoderDecoder(nn.Module):
    """The skeleton LocalNet and the U-Net share: an :class:`Encoder` and one upsampling per level.

    Attributes:
        encoder: the contracting path.
        depth: number of poolings, ``len(channels)``.
        widths: features per level, the bottom's ``2 * channels[-1]`` last.
        ups: ``ups[i]`` takes level ``i + 1``'s features to level ``i``'s size and width.
    """

    def __init__(self, ndim: int, in_channels: int, channels: Sequence[int], residual: bool,
                 norm: str = DEFAULT_NORM, pooling: bool = True) -> None:
        super().__init__()
        self.encoder = Encoder(ndim, in_channels, channels, residual=residual, norm=norm,
                               pooling=pooling)
        self.depth = len(channels)
        self.widths = [*channels, 2 * channels[-1]]
        self.ups = nn.ModuleList(upsample(ndim, self.widths[i + 1], self.widths[i])
                                 for i in range(self.depth))
