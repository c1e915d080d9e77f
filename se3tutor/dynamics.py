r"""Learning dynamics: the charged N-body system, 1,000 steps ahead (book: Learning dynamics).

The task of EGNN's Table 2 (Satorras, Hoogeboom and Welling 2021; data:
:func:`se3tutor.nbody.charged_nbody`): from the positions :math:`x`, velocities :math:`v` and
charges :math:`q` of five particles, predict the positions 1,000 integration steps later.
Every predictor here returns

.. math:: \hat x_i = x_i + \Delta_i(x, v, q)

with :math:`\Delta` an equivariant vector field: rotate, reflect or translate the input and
the prediction follows (:math:`\Delta` reads positions only through their differences).

- :class:`NBodyTransformer`: :class:`se3tutor.SE3Transformer` on the fully connected graph of
  each system, charges as ``0e`` and velocities as ``1o`` node features, the product of the
  two charges :math:`q_i q_j` and the distance :math:`r_{ij}` as edge features,
  :math:`\Delta` its ``1o`` output.
- :func:`fit`: the training loop every model of ``bench/nbody.py`` shares (Adam, a cosine
  learning rate, batches of systems, mean squared error of the positions, the model of the
  best validation error kept, resumable from a checkpoint), for any
  ``predict(positions, velocities, charges) -> positions``. This module imports only torch
  at the top, so that a peer's environment, which has no e3nn, can load it by its path.

Shapes: ``positions, velocities [S, N, 3]``, ``charges [S, N]`` for ``S`` systems of ``N``
particles; predictions ``[S, N, 3]``.
"""

from __future__ import annotations

import copy
import math
import os
import time
from pathlib import Path
from typing import Callable, Optional, Union

import torch

__all__ = ["NBodyTransformer", "evaluate", "fit", "fully_connected_edges"]

# Longer than any pair distance of the published data (largest: 23.6, in the test split), so
# that every pair of a system interacts; a pair farther apart is cut off smoothly.
MAX_RADIUS = 30.0

Predict = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def fully_connected_edges(num_systems: int, num_particles: int, device=None) -> torch.Tensor:
    """``edge_index [2, S N (N - 1)]``: every ordered pair of distinct particles of each
    system, numbered as the flattened ``[S * N]`` nodes (row 0 the source, row 1 the
    destination, as :func:`se3tutor.radius_graph`).

    >>> fully_connected_edges(1, 3)
    tensor([[1, 2, 0, 2, 0, 1],
            [0, 0, 1, 1, 2, 2]])
    """
    dst, src = (~torch.eye(num_particles, dtype=torch.bool, device=device)).nonzero().T
    offsets = torch.arange(num_systems, device=device).repeat_interleave(len(src))
    offsets = offsets * num_particles
    return torch.stack([src.repeat(num_systems) + offsets, dst.repeat(num_systems) + offsets])


class NBodyTransformer(torch.nn.Module):
    r""":math:`\hat x = x + \Delta`, with :math:`\Delta` the ``1o`` output of
    :class:`se3tutor.SE3Transformer` on the fully connected graph of each system.

    Node features ``1x0e + 1x1o`` (:math:`q_i`, :math:`v_i`), edge features
    :math:`(q_i q_j, r_{ij})`, which enter every radial MLP beside the radial basis (as in the
    book's Attention chapter). The distance itself, not only its basis: ten basis functions
    over the 30 units of ``max_radius`` are 3 units apart, coarse for pairs that interact at
    distances of 1 to 5. Each node also attends to itself (``attend_self``), and a head's
    queries, keys and values are ``16x0e + 16x1o`` whatever the number of heads (the
    width of se3-transformer-pytorch's ``dim_head=16``). Test error of ``bench/nbody.py``'s
    model (4 layers, 4 heads) after 6 minutes of training, one run each (seed 0; the spread over
    seeds is about 0.001, so the smaller gains are within it): 0.0122 with neither, 0.0113 with
    the distance, 0.0085 with all three (30 basis functions instead of the distance: 0.0143;
    both parities in the hidden features, at the same width: 0.0168, slower).
    Other keyword arguments go to :class:`~se3tutor.transformer.SE3Transformer`
    (``num_layers``, ``num_heads``, ...).

    >>> model = NBodyTransformer("8x0e + 8x1o", irreps_head="4x0e + 4x1o", num_layers=1)
    >>> x, v, q = torch.randn(4, 5, 3), torch.randn(4, 5, 3), torch.ones(4, 5)
    >>> model(x, v, q).shape
    torch.Size([4, 5, 3])
    """

    def __init__(
        self,
        irreps_hidden="32x0e + 32x1o",
        *,
        irreps_head="16x0e + 16x1o",
        attend_self: bool = True,
        max_radius: float = MAX_RADIUS,
        **kwargs,
    ):
        super().__init__()
        from se3tutor.transformer import SE3Transformer  # not at the top: see the module doc

        self.net = SE3Transformer(
            "1x0e + 1x1o", irreps_hidden, "1x1o", max_radius=max_radius, edge_attr_dim=2,
            irreps_head=irreps_head, attend_self=attend_self, **kwargs,
        )  # fmt: skip

    def forward(
        self, positions: torch.Tensor, velocities: torch.Tensor, charges: torch.Tensor
    ) -> torch.Tensor:
        num_systems, num_particles, _ = positions.shape
        edge_index = fully_connected_edges(num_systems, num_particles, positions.device)
        pos = positions.reshape(-1, 3)
        q = charges.reshape(-1, 1)
        f = torch.cat([q, velocities.reshape(-1, 3)], dim=1)  # 1x0e + 1x1o
        batch = torch.arange(num_systems, device=pos.device).repeat_interleave(num_particles)
        src, dst = edge_index
        distance = (pos[dst] - pos[src]).norm(dim=1, keepdim=True)
        edge_attr = torch.cat([q[src] * q[dst], distance], dim=1)  # [num_edges, 2]
        delta = self.net(f, pos, batch, edge_index, edge_attr)
        return positions + delta.reshape(num_systems, num_particles, 3)


def _as_inputs(split: dict, dtype, device) -> tuple:
    return tuple(
        split[key].to(device=device, dtype=dtype)
        for key in ("positions", "velocities", "charges", "target")
    )


@torch.no_grad()
def evaluate(predict: Predict, split: dict, batch_size: int = 100, dtype=torch.float32,
             device="cpu") -> float:  # fmt: skip
    """Mean squared error of the predicted positions over a split (every coordinate of every
    particle of every system, as EGNN's Table 2), in batches of ``batch_size`` systems."""
    x, v, q, target = _as_inputs(split, dtype, device)
    total = 0.0
    for index in torch.arange(len(x)).split(batch_size):
        error = predict(x[index], v[index], q[index]) - target[index]
        total += error.pow(2).sum().item()
    return total / target.numel()


def fit(
    model: torch.nn.Module,
    data: dict,
    *,
    predict: Optional[Predict] = None,
    epochs: int = 100,
    time_limit: Optional[float] = None,
    evaluations: int = 20,
    batch_size: int = 100,
    lr: float = 3e-3,
    weight_decay: float = 1e-12,
    seed: int = 0,
    checkpoint: Union[str, os.PathLike, None] = None,
    log: Optional[Callable[[dict], None]] = None,
    dtype=torch.float32,
    device="cpu",
) -> dict:
    r"""Train ``model`` on ``data["train"]``; return its history and its test error.

    ``predict(positions, velocities, charges) -> positions`` (default: ``model`` itself) is
    what is trained, on the mean squared error of its positions against ``target``. Adam with
    EGNN's weight decay, batches of ``batch_size`` systems in a fresh order every epoch
    (seeded), and a cosine learning rate :math:`\mathrm{lr}\,\tfrac12(1 + \cos \pi p)` over
    the progress :math:`p` of the run: the fraction of the ``epochs`` done or, with
    ``time_limit`` (seconds of training; evaluations do not count), of the time spent, so
    that a run for a given time also completes its schedule.

    The validation error is measured ``evaluations`` times, evenly over the progress (also
    in the middle of an epoch, for a model whose epoch is long), and after the last step; the
    weights with the lowest one give the test error at the end (EGNN's protocol).

    ``checkpoint``: a file written after every evaluation (weights, optimizer, place in the
    epoch, history, random state); a run given the same file continues from it.
    ``log(entry)`` is called after each evaluation with the history entry: ``epoch``
    (fractional), ``seconds`` (training time so far), ``lr``, ``train`` (mean loss since the
    last evaluation), ``valid``.

    Returns ``{"history": [entry, ...], "best_valid", "best_epoch", "test", "epochs",
    "steps", "seconds"}``.
    """
    if epochs < 1 or batch_size < 1 or evaluations < 1:
        raise ValueError(f"need epochs, batch_size, evaluations >= 1; got {epochs}, "
                         f"{batch_size}, {evaluations}")  # fmt: skip
    if time_limit is not None and not time_limit > 0:
        raise ValueError(f"time_limit must be > 0 seconds, got {time_limit}")
    predict = model if predict is None else predict
    model.to(device=device, dtype=dtype)
    x, v, q, target = _as_inputs(data["train"], dtype, device)
    batches_per_epoch = math.ceil(len(x) / batch_size)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    state = dict(steps=0, seconds=0.0, evaluated=0, history=[], losses=[], order=None,
                 best_valid=math.inf, best_epoch=0.0)  # fmt: skip
    best_weights = copy.deepcopy(model.state_dict())
    if checkpoint is not None and Path(checkpoint).exists():
        saved = torch.load(checkpoint, weights_only=False)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        generator.set_state(saved["generator"])
        best_weights, state = saved["best_weights"], saved["state"]

    def progress() -> float:
        if time_limit is not None:
            return min(state["seconds"] / time_limit, 1.0)
        return state["steps"] / (epochs * batches_per_epoch)

    while progress() < 1.0:
        position = state["steps"] % batches_per_epoch
        if position == 0:
            state["order"] = torch.randperm(len(x), generator=generator)
        index = state["order"][position * batch_size : (position + 1) * batch_size]
        rate = lr * 0.5 * (1 + math.cos(math.pi * progress()))
        started = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = rate
        loss = (predict(x[index], v[index], q[index]) - target[index]).pow(2).mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the loss is {loss.item()} at step {state['steps'] + 1}")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        state["seconds"] += time.perf_counter() - started
        state["steps"] += 1
        state["losses"].append(loss.item())
        if progress() < (state["evaluated"] + 1) / evaluations and progress() < 1.0:
            continue
        state["evaluated"] += 1
        model.eval()
        valid = evaluate(predict, data["valid"], batch_size, dtype, device)
        model.train()
        epoch = state["steps"] / batches_per_epoch
        entry = dict(epoch=epoch, seconds=state["seconds"], lr=rate,
                     train=sum(state["losses"]) / len(state["losses"]), valid=valid)  # fmt: skip
        state["history"].append(entry)
        state["losses"] = []
        if valid < state["best_valid"]:
            state.update(best_valid=valid, best_epoch=epoch)
            best_weights = copy.deepcopy(model.state_dict())
        if checkpoint is not None:
            _save(checkpoint, dict(model=model.state_dict(), optimizer=optimizer.state_dict(),
                                   generator=generator.get_state(), best_weights=best_weights,
                                   state=state))  # fmt: skip
        if log is not None:
            log(entry)

    model.load_state_dict(best_weights)
    model.eval()
    test = evaluate(predict, data["test"], batch_size, dtype, device)
    return dict(history=state["history"], best_valid=state["best_valid"],
                best_epoch=state["best_epoch"], test=test,
                epochs=state["steps"] / batches_per_epoch, steps=state["steps"],
                seconds=state["seconds"])  # fmt: skip


def _save(path, payload: dict) -> None:
    """Write to a temporary file, then rename: a crash mid-write leaves the last checkpoint."""
    path = Path(path)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    torch.save(payload, partial)
    os.replace(partial, path)
