"""Arrays from anywhere: numpy arrays, torch tensors (any device) and nested sequences as numpy."""

from __future__ import annotations

from typing import Any

import numpy as np


def to_numpy(array: Any) -> np.ndarray:
    """``array`` as a numpy array, without importing torch.

    Args:
        array: a numpy array, a torch tensor (detached and moved to the CPU; half and bfloat16
            become float32, numpy having no bfloat16) or anything ``np.asarray`` takes.

    Returns:
        The array, same shape; a numpy input is returned as it is (no copy).
    """
    if hasattr(array, "detach"):  # torch.Tensor
        tensor = array.detach().cpu()
        if tensor.is_floating_point() and tensor.element_size() < 4:
            tensor = tensor.float()
        return tensor.numpy()
    return np.asarray(array)
