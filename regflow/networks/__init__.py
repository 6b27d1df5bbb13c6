"""Registration backbones and the one place that maps config names to them."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from regflow import components
from regflow.errors import ConfigError
from regflow.networks.global_ import GlobalNet
from regflow.networks.layers import DEFAULT_NORM
from regflow.networks.local import LocalNet
from regflow.networks.unet import UNet

__all__ = ["BACKBONES", "GlobalNet", "LocalNet", "UNet", "build_backbone"]

# The class of each name of components.BUILTIN_BACKBONES (tests/test_components.py ties the two).
BACKBONES: dict[str, type[nn.Module]] = {"local": LocalNet, "global": GlobalNet, "unet": UNet}


def build_backbone(name: str, ndim: int, in_channels: int, out_channels: int,
                   channels: Sequence[int], norm: str = DEFAULT_NORM,
                   extract_levels: Sequence[int] | None = None, pooling: bool = True,
                   concat_skip: bool = True) -> nn.Module:
    """Build a backbone by its config name (``train.model.backbone.name``).

    Args:
        name: "local" (LocalNet), "global" (GlobalNet), "unet" (UNet), or a backbone an installed
            package adds under the ``regflow.backbones`` entry point (regflow.components).
        ndim: 2 or 3 spatial dimensions.
        in_channels: input channels, e.g. 2 for concat(moving, fixed).
        out_channels: output channels of a dense backbone (``ndim`` for a DDF/DVF). Ignored by
            "global", whose output is always theta (B, ndim, ndim + 1).
        channels: features per level, e.g. ``[16, 32, 64]``.
        norm: feature normalisation: "instance", "batch" or "none".
        extract_levels: "local" only: the levels whose fields are summed (None: all).
        pooling: built-in backbones: max pooling down (True) or strided convolutions (False).
        concat_skip: "unet" only: concatenate (True) or add (False) the encoder skips.

    Returns:
        The network: (B, in_channels, *S) -> (B, out_channels, *S), or theta for "global".

    Raises:
        ConfigError: unknown name (the message lists the known ones), extract levels for a
            backbone other than "local", added skips for one other than "unet", or strided
            down-sampling for a package's backbone.
    """
    if extract_levels is not None and name != "local":
        raise ConfigError(f"train.model.backbone.extract_levels: only the local backbone sums "
                          f"fields over levels, not {name!r}")
    if not concat_skip and name != "unet":
        raise ConfigError(f"train.model.backbone.concat_skip: only the unet backbone chooses "
                          f"how it joins skips, not {name!r}")
    if name == "local":
        return LocalNet(ndim, in_channels, out_channels, channels, norm, extract_levels, pooling)
    if name == "global":
        return GlobalNet(ndim, in_channels, channels, norm, pooling)
    if name == "unet":
        return UNet(ndim, in_channels, out_channels, channels, norm, pooling, concat_skip)
    plugins = components.plugin_backbones()
    if name not in plugins:
        raise ConfigError(f"train.model.backbone.name: unknown backbone {name!r}; "
                          f"known: {', '.join(components.backbone_names())}")
    if not pooling:
        raise ConfigError(f"train.model.backbone.pooling: false is for the built-in backbones, "
                          f"not {name!r}")
    return components.load(plugins[name])(ndim, in_channels, out_channels, channels, norm)
