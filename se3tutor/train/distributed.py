r"""Data parallel training in a few functions (used by :mod:`se3tutor.train`).

``torchrun --nproc_per_node W`` starts ``W`` copies of a program and tells each who it is by
environment variables: ``RANK`` (``0 .. WORLD_SIZE - 1`` over all machines), ``LOCAL_RANK``
(on its machine, which picks its GPU), ``WORLD_SIZE``, and ``MASTER_ADDR``/``MASTER_PORT``,
where they meet. Without them, :func:`start` returns a single process and never touches
``torch.distributed``.

How :mod:`se3tutor.train` splits the work, so that ``W`` processes take exactly the steps of
one:

1. Every process holds the whole data set and draws the same seeded order, so every process
   knows every global batch of ``B`` structures, and its counts of structures and atoms.
2. Process ``r`` takes the structures ``r, r + W, r + 2W, ...`` of each global batch
   (:func:`shard`).
3. Its loss is its shard's part of the global batch's loss: sums over its shard divided by
   the global counts (:func:`se3tutor.potential.energy_force_loss`), so that the parts add
   up to the loss of the global batch. ``DistributedDataParallel`` averages the gradients of
   the ``W`` processes, so each backpropagates ``W`` times its part:

   .. math:: \frac{1}{W} \sum_r \nabla (W L_r) = \nabla \sum_r L_r = \nabla L.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["Processes", "all_sum", "from_main", "shard", "start", "stop"]


@dataclass(frozen=True)
class Processes:
    """Who this process is: ``rank`` of ``world_size``, computing on ``device``."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the logs and checkpoints and shows the progress bar."""
        return self.rank == 0


def start(device: str = "auto") -> Processes:
    """Join the other processes if ``torchrun`` started several (gloo on the CPU, NCCL on
    CUDA). ``device``: ``"auto"`` (CUDA if there is a GPU), ``"cpu"`` or ``"cuda"``; each
    process of a machine takes GPU ``LOCAL_RANK``."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f'device must be "auto", "cpu" or "cuda", got {device!r}')
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda asked for, but torch sees no GPU")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Processes(0, 1, torch.device(device))
    if device == "cuda":
        # Every process of the machine sees the same counts, so all refuse alike (one
        # refusing alone would leave the others waiting in init_process_group).
        per_machine = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        if per_machine > torch.cuda.device_count():
            raise ValueError(
                f"{per_machine} processes per machine but {torch.cuda.device_count()} GPU(s): "
                "start at most one process per GPU (torchrun --nproc_per_node), or use --device cpu"
            )
        chosen = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(chosen)
        dist.init_process_group("nccl")
    else:
        chosen = torch.device("cpu")
        dist.init_process_group("gloo")
    return Processes(dist.get_rank(), dist.get_world_size(), chosen)


def stop() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_initialized():
        dist.destroy_process_group()


def shard(global_batch: Sequence, processes: Processes) -> Sequence:
    """This process's part of a global batch (structures, indices): every ``world_size``-th
    one from ``rank``. (Strided rather than contiguous: a sorted data set still spreads evenly.)

    >>> shard(torch.arange(7), Processes(1, 3, torch.device("cpu"))).tolist()
    [1, 4]
    """
    return global_batch[processes.rank :: processes.world_size]


def all_sum(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over the processes (in place); itself when there is one process."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def from_main(value):
    """Rank 0's ``value`` (any picklable object), on every process: what rank 0 decided, for
    the others to follow (the checkpoint to resume from)."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
