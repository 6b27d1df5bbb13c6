"""Registration losses: image similarity, label overlap, deformation regularisers, and their sum.

Every loss is called as ``loss(fixed_or_target, warped_or_pred)`` (regularisers as ``loss(ddf)``)
and returns a scalar to minimise. :func:`build_loss` turns ``train.loss`` into a
:class:`CompositeLoss`.
"""

from regflow.losses.composite import LOSS_FUNCTIONS, CompositeLoss, build_loss
from regflow.losses.deform import bending_energy, gradient_norm
from regflow.losses.image import gmi, gncc, lncc, local_squared_ncc, ssd
from regflow.losses.label import cross_entropy, dice, jaccard, label_ssd

__all__ = [
    "LOSS_FUNCTIONS",
    "CompositeLoss",
    "bending_energy",
    "build_loss",
    "cross_entropy",
    "dice",
    "gmi",
    "gncc",
    "gradient_norm",
    "jaccard",
    "label_ssd",
    "lncc",
    "local_squared_ncc",
    "ssd",
]
