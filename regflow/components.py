"""Named components: the built-in losses and backbones, and those other packages add.

A package adds a component under a Python entry point, without editing regflow:

- group ``regflow.losses``: name ``<loss group>.<term name>`` (loss group ``image``, ``label`` or
  ``regularization``), value a loss function called like the built-ins of that group
  (``f(fixed, warped, **options)``, ``f(fixed_label, warped_label, **options)`` or
  ``f(ddf, **options)``) that returns a scalar to minimise;
- group ``regflow.backbones``: name the backbone's name, value an ``nn.Module`` class called as
  ``cls(ndim, in_channels, out_channels, channels, norm)`` (see regflow.networks).

params.yaml then names them like built-ins (``train.loss.image.<term name>``,
``train.model.backbone.name``). Names are read from the installed packages' metadata without
importing them; a component's module is imported only when it is used.
"""

from __future__ import annotations

from functools import cache
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from regflow.errors import ConfigError

LOSS_ENTRY_POINTS = "regflow.losses"
BACKBONE_ENTRY_POINTS = "regflow.backbones"
BUILTIN_LOSSES: dict[str, tuple[str, ...]] = {
    "image": ("ssd", "lncc", "gncc", "gmi"),
    "label": ("dice", "jaccard", "cross_entropy", "ssd"),
    "regularization": ("bending_energy", "gradient_norm"),
}
# The one list of built-in backbone names: regflow.networks.BACKBONES builds each of them, and
# the DeepReg importer accepts them (DeepReg names its backbones the same way).
BUILTIN_BACKBONES: tuple[str, ...] = ("local", "global", "unet")


@cache
def _installed(group: str) -> tuple[EntryPoint, ...]:
    """The installed packages' entry points of a group (read once per process)."""
    return tuple(entry_points(group=group))


def plugin_losses(group: str) -> dict[str, EntryPoint]:
    """Term name -> entry point of the installed packages' losses in one loss group."""
    prefix = f"{group}."
    return {point.name.removeprefix(prefix): point
            for point in _installed(LOSS_ENTRY_POINTS) if point.name.startswith(prefix)}


def plugin_backbones() -> dict[str, EntryPoint]:
    """Backbone name -> entry point of the installed packages' backbones."""
    return {point.name: point for point in _installed(BACKBONE_ENTRY_POINTS)}


def loss_names(group: str) -> list[str]:
    """Every term name a loss group accepts: the built-ins, then the installed packages'."""
    return [*BUILTIN_LOSSES[group], *(name for name in plugin_losses(group)
                                      if name not in BUILTIN_LOSSES[group])]


def backbone_names() -> list[str]:
    """Every backbone name: the built-ins, then the installed packages'."""
    return [*BUILTIN_BACKBONES, *(name for name in plugin_backbones()
                                  if name not in BUILTIN_BACKBONES)]


def load(point: EntryPoint) -> Any:
    """Import the object an entry point names.

    Raises:
        ConfigError: the package's module or object cannot be imported.
    """
    try:
        return point.load()
    except Exception as exc:  # any error of a third-party import
        raise ConfigError(f"entry point {point.group}:{point.name} = {point.value}: cannot be "
                          f"loaded ({exc.__class__.__name__}: {exc})") from None


def listing() -> list[dict[str, str]]:
    """Rows ``{kind, name, source}`` of every component, built-in or from an installed package."""
    rows = [{"kind": f"loss ({group})", "name": name, "source": "regflow"}
            for group, names in BUILTIN_LOSSES.items() for name in names]
    rows += [{"kind": f"loss ({group})", "name": name, "source": _source(point)}
             for group in BUILTIN_LOSSES for name, point in plugin_losses(group).items()
             if name not in BUILTIN_LOSSES[group]]
    rows += [{"kind": "backbone", "name": name, "source": "regflow"} for name in BUILTIN_BACKBONES]
    rows += [{"kind": "backbone", "name": name, "source": _source(point)}
             for name, point in plugin_backbones().items() if name not in BUILTIN_BACKBONES]
    return rows


def _source(point: EntryPoint) -> str:
    """``<distribution> (<module:object>)`` of an entry point."""
    distribution = point.dist.name if point.dist is not None else "?"
    return f"{distribution} ({point.value})"
