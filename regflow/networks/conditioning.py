"""Feature-wise conditioning of a backbone on one number (HyperMorph's amortised loss weight).

Every normalisation layer of a backbone is wrapped in :class:`FiLM`: the normalised features are
scaled and shifted per channel by amounts a small network computes from the condition (Perez et
al.'s feature-wise linear modulation). The condition reaches the layers without changing any
backbone's ``forward``: :class:`Conditioner` computes one embedding per sample and hands it to
every FiLM layer before the backbone runs. The modulation starts at zero, so a conditioned
backbone starts out computing what the unconditioned one would.
"""

from __future__ import annotations

import torch
from torch import nn

from regflow.errors import ConfigError
from regflow.networks.layers import NEGATIVE_SLOPE, InstanceNorm

EMBEDDING_WIDTH = 32
NORM_TYPES = (InstanceNorm, nn.GroupNorm, nn.BatchNorm2d, nn.BatchNorm3d)


def norm_channels(norm: nn.Module) -> int:
    """The channels a normalisation layer normalises."""
    return norm.num_channels if isinstance(norm, nn.GroupNorm) else norm.num_features


class FiLM(nn.Module):
    """A normalisation layer followed by a per-channel scale and shift that depend on the
    condition: ``norm(x) * (1 + gamma) + beta``, ``(gamma, beta) = linear(embedding)``.

    Args:
        norm: the wrapped normalisation layer.
        width: the width of the condition's embedding.
    """

    def __init__(self, norm: nn.Module, width: int = EMBEDDING_WIDTH) -> None:
        super().__init__()
        self.norm = norm
        self.modulation = nn.Linear(width, 2 * norm_channels(norm))
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)
        self.embedding: torch.Tensor | None = None

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C, *S) -> (B, C, *S); needs :attr:`embedding` (B, width) set by the Conditioner."""
        if self.embedding is None:
            raise RuntimeError("FiLM: no condition set (call the Conditioner first)")
        normalised = self.norm(features)
        gamma, beta = self.modulation(self.embedding).chunk(2, dim=1)
        shape = (*gamma.shape, *(1,) * (features.dim() - 2))  # (B, C, 1, ..., 1)
        return normalised * (1 + gamma.view(shape)) + beta.view(shape)


class Conditioner(nn.Module):
    """Wraps every normalisation layer of ``backbone`` in :class:`FiLM` and feeds them a learned
    embedding of a condition in [0, 1].

    Args:
        backbone: the network to condition (modified in place).
        width: the embedding's width.

    Raises:
        ConfigError: the backbone has no normalisation layer to modulate (norm "none").
    """

    def __init__(self, backbone: nn.Module, width: int = EMBEDDING_WIDTH) -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(1, width), nn.LeakyReLU(NEGATIVE_SLOPE),
                                   nn.Linear(width, width), nn.LeakyReLU(NEGATIVE_SLOPE))
        targets = [(parent, name, child) for parent in backbone.modules()
                   for name, child in parent.named_children() if isinstance(child, NORM_TYPES)]
        if not targets:
            raise ConfigError("train.model.hyper: the backbone has no normalisation layer to "
                              "condition; use train.model.backbone.norm instance or batch")
        for parent, name, child in targets:
            setattr(parent, name, FiLM(child, width))
        # plain list: the FiLM layers are registered as parameters of the backbone already
        self.layers = [module for module in backbone.modules() if isinstance(module, FiLM)]

    def forward(self, condition: torch.Tensor) -> None:
        """Set the condition, (B, 1) in [0, 1], for the backbone's next forward pass."""
        embedding = self.embed(condition)
        for layer in self.layers:
            layer.embedding = embedding
