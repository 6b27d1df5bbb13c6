"""The weighted sum of loss terms that params.yaml's ``train.loss`` asks for.

``train.loss`` maps group -> term name -> {weight, options}. The groups and the built-in functions
behind the names live in one explicit table, :data:`LOSS_FUNCTIONS`; installed packages add more
through entry points (regflow.components). Options are keyword arguments of the
function and are checked against its signature when the loss is built. A term with weight 0 is
dropped at build time: it is never computed and never reported.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from regflow import components
from regflow.config import LossConfig
from regflow.errors import ConfigError, RegflowError
from regflow.losses.deform import bending_energy, gradient_norm
from regflow.losses.image import gmi, gncc, lncc, ssd
from regflow.losses.label import cross_entropy, dice, jaccard, label_ssd

LOSS_FUNCTIONS: dict[str, dict[str, Callable[..., torch.Tensor]]] = {
    "image": {"ssd": ssd, "lncc": lncc, "gncc": gncc, "gmi": gmi},
    "label": {"dice": dice, "jaccard": jaccard, "cross_entropy": cross_entropy, "ssd": label_ssd},
    "regularization": {"bending_energy": bending_energy, "gradient_norm": gradient_norm},
}

# the CompositeLoss call arguments each group's functions take, in order
GROUP_INPUTS: dict[str, tuple[str, ...]] = {
    "image": ("fixed", "warped"),
    "label": ("fixed_label", "warped_label"),
    "regularization": ("ddf",),
}
GROUP_NEEDS = {"image": "images", "label": "labels", "regularization": "a ddf"}


@dataclass(frozen=True)
class WeightedTerm:
    """One active loss term: ``weight * function(*inputs, **options)``."""

    group: str
    name: str
    function: Callable[..., torch.Tensor]
    weight: float
    options: dict[str, Any]

    @property
    def key(self) -> str:
        """The term's name in logs and in the returned dict, e.g. "image/lncc"."""
        return f"{self.group}/{self.name}"


def loss_function(group: str, name: str) -> Callable[..., torch.Tensor]:
    """The function of a term: a built-in, or one an installed package adds (entry point).

    Raises:
        ConfigError: an unknown name, or a package's loss that cannot be imported.
    """
    if name in LOSS_FUNCTIONS[group]:
        return LOSS_FUNCTIONS[group][name]
    plugins = components.plugin_losses(group)
    if name not in plugins:
        raise ConfigError(f"train.loss.{group}: unknown term {name!r}; known: "
                          f"{', '.join(map(repr, components.loss_names(group)))}")
    return components.load(plugins[name])


def _check_options(group: str, name: str, options: dict[str, Any]) -> None:
    """Raise ConfigError for an option that the term's function does not take."""
    parameters = list(inspect.signature(loss_function(group, name)).parameters)
    allowed = parameters[len(GROUP_INPUTS[group]):]
    for key in options:
        if key not in allowed:
            raise ConfigError(f"train.loss.{group}.{name}.options.{key}: unknown option; "
                              f"allowed: {', '.join(allowed) or 'none'}")


def _full_precision(tensor: torch.Tensor) -> torch.Tensor:
    """Half-precision tensors as float32; others unchanged."""
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


class CompositeLoss:
    """Weighted sum of image, label and regularisation terms.

    Args:
        loss_config: the ``train.loss`` section.

    Raises:
        ConfigError: an unknown option, or no term with a non-zero weight.
    """

    def __init__(self, loss_config: LossConfig) -> None:
        self.terms: list[WeightedTerm] = []
        for group in GROUP_INPUTS:
            for name, term in getattr(loss_config, group).items():
                _check_options(group, name, term.options)
                if term.weight > 0:
                    self.terms.append(WeightedTerm(group, name, loss_function(group, name),
                                                   term.weight, dict(term.options)))
        if not self.terms:
            raise ConfigError("train.loss: no term with a non-zero weight; set e.g. "
                              "train.loss.image.lncc.weight=1")

    @property
    def keys(self) -> list[str]:
        """The active terms' keys, in the order they are computed."""
        return [term.key for term in self.terms]

    def __call__(self, fixed: torch.Tensor | None, warped: torch.Tensor | None,
                 fixed_label: torch.Tensor | None = None,
                 warped_label: torch.Tensor | None = None,
                 ddf: torch.Tensor | None = None, weights: dict[str, float] | None = None
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Compute every active term.

        Args:
            fixed: (B, C, *S) fixed image.
            warped: (B, C, *S) warped moving image.
            fixed_label: (B, L, *S) fixed label, needed by label terms.
            warped_label: (B, L, *S) warped moving label, needed by label terms.
            ddf: (B, ndim, *S) displacement field in voxels, needed by regularisation terms.
            weights: term key ("regularization/bending_energy") -> weight for this call instead
                of the configured one (a HyperMorph draw).

        Every term runs in at least float32 with autocast off, whatever the callers' precision.

        Returns:
            (total, terms): the scalar sum, and each weighted scalar term by key ("image/lncc",
            "label/dice", "regularization/bending_energy", ...).

        Raises:
            RegflowError: a term whose inputs were not given.
        """
        inputs = {"fixed": fixed, "warped": warped, "fixed_label": fixed_label,
                  "warped_label": warped_label, "ddf": ddf}
        values: dict[str, torch.Tensor] = {}
        for term in self.terms:
            names = GROUP_INPUTS[term.group]
            missing = [name for name in names if inputs[name] is None]
            if missing:
                raise RegflowError(f"loss term {term.key} needs {GROUP_NEEDS[term.group]} but "
                                   f"{' and '.join(missing)} not given; set "
                                   f"train.loss.{term.group}.{term.name}.weight to 0 or pass them")
            arguments = [_full_precision(inputs[name]) for name in names]
            # sums over whole volumes (histograms, windows) need float32 even under mixed precision
            with torch.autocast(arguments[0].device.type, enabled=False):
                weight = (weights or {}).get(term.key, term.weight)
                values[term.key] = weight * term.function(*arguments, **term.options)
        return sum(values.values()), values


def build_loss(loss_config: LossConfig) -> CompositeLoss:
    """Build the composite training loss from ``train.loss`` (see :class:`CompositeLoss`)."""
    return CompositeLoss(loss_config)
