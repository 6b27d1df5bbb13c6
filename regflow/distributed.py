"""Data-parallel training under ``torchrun``: the process group, the DDP wrapper, rank-0 decisions.

``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in
every worker (on every node). When they are there, :func:`process_group` joins the group with the
``env://`` rendezvous: gloo on CPU, NCCL on CUDA (each worker on GPU ``LOCAL_RANK``). Without
them every function here is the single-process identity, so the same training code runs both ways.

Rank 0 owns MLflow, checkpoints and validation; the others learn its decisions through
:func:`broadcast_from_main`, which also makes them wait for it.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# How long the caller gives up the GIL after the last collective, before the group can be torn
# down. gloo's worker thread frees a finished collective after the caller has moved on, and
# freeing tensors Python has seen needs the GIL. If the caller reaches the group's destructor
# (DDP's reducer going out of scope) first, it holds the GIL while joining that worker and both
# wait forever: a rank hung so in CI, within a few ms of its last barrier. There is no handle on
# the worker to wait for, hence a pause far longer than its few microseconds of work.
GLOO_RELEASE_S = 0.5


def launched_by_torchrun() -> bool:
    """True when the environment carries the variables torchrun sets for each worker."""
    return all(name in os.environ for name in TORCHRUN_ENV)


def launch_world_size() -> int:
    """The number of processes this run trains with, known before the group is joined:
    torchrun's ``WORLD_SIZE``, else 1."""
    return int(os.environ["WORLD_SIZE"]) if launched_by_torchrun() else 1


def is_active() -> bool:
    """True inside an initialised process group."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's global rank (0 outside a process group)."""
    return dist.get_rank() if is_active() else 0


def world_size() -> int:
    """The number of processes training together (1 outside a process group)."""
    return dist.get_world_size() if is_active() else 1


def is_main_process() -> bool:
    """True on rank 0, the process that logs, checkpoints and validates."""
    return rank() == 0


def worker_device(device: torch.device) -> torch.device:
    """The device of this worker: ``cuda:$LOCAL_RANK`` for CUDA under torchrun, else ``device``.

    Also makes it the current CUDA device, which NCCL collectives use.
    """
    if device.type != "cuda" or not launched_by_torchrun():
        return device
    local = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    torch.cuda.set_device(local)
    return local


@contextmanager
def process_group(device: torch.device) -> Iterator[None]:
    """Join torchrun's process group for the block (NCCL on CUDA, gloo on CPU), then leave it.

    Does nothing outside torchrun, or when a group is already initialised (its owner destroys it).
    A block that ends normally meets the other ranks at a barrier first, so that no rank destroys
    the group while another still waits on a message from it.

    Args:
        device: the worker's device (see :func:`worker_device`); picks the backend.
    """
    owner = launched_by_torchrun() and not is_active()
    if owner:
        cuda = device.type == "cuda"
        dist.init_process_group(backend="nccl" if cuda else "gloo", init_method="env://",
                                device_id=device if cuda else None)
    try:
        yield
        if owner:
            dist.barrier()  # every rank is done with the group before any rank tears it down
            time.sleep(GLOO_RELEASE_S)
    finally:
        if owner and is_active():
            dist.destroy_process_group()


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``model`` in DistributedDataParallel inside a process group, else ``model`` itself.

    DDP copies rank 0's parameters to every rank here and averages gradients in ``backward``, so a
    step on ``B`` samples per rank equals one step on the ``B x world_size`` samples together when
    the loss is a mean over samples. Keep the unwrapped ``model`` for evaluation and saving: the
    wrapper's forward is a collective that only rank 0 would reach.
    """
    if not is_active():
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                   else None)


def mean_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average named numbers over all ranks (one all-reduce); unchanged outside a group.

    Used for the logged training losses, which then describe the whole global batch.
    """
    if not is_active() or not values:
        return values
    names = sorted(values)
    tensor = torch.tensor([values[name] for name in names], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    tensor /= dist.get_world_size()
    return dict(zip(names, tensor.tolist(), strict=True))


def broadcast_from_main(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (any picklable object); the others wait for it."""
    if not is_active():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def state_checksum(module: torch.nn.Module) -> str:
    """sha256 of a module's state: every tensor's name, dtype, shape and bytes, in name order.

    Equal on two ranks exactly when their weights are bit-identical.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{data.dtype}:{tuple(data.shape)};".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
