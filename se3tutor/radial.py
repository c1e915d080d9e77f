r"""Functions of the edge length: radial embedding, smooth cutoff, radial MLP (book: Convolution,
Attention; Smoothness).

The tensor-product weights of an edge depend on its length :math:`r = \|x_{ij}\|` through

.. math:: w(r) = \mathrm{MLP}\big(\sqrt{B}\,\mathrm{basis}(r)\big),

where ``basis`` maps :math:`r` onto :math:`B` smooth bumps on :math:`[0, r_{max}]`
(``e3nn.math.soft_one_hot_linspace``) and :math:`\sqrt{B}` gives the embedding a second moment
of 1 on average: the squares of the bumps sum to 1 on average over :math:`[0, r_{max}]` (one or
two bumps are on at every length, and the sum ripples between about 0.69 and 1.30 for
:math:`B = 10`; book: Convolution), so each of the :math:`B` numbers has a mean square of
about :math:`1/B`. The MLP is ``e3nn.nn.FullyConnectedNet``, which has no biases: with an
activation that maps 0 to 0 (SiLU, ReLU, tanh; not sigmoid), an all-zero embedding (an edge at
or beyond the cutoff, for the ``cutoff=True`` basis) gives zero weights (book: Smoothness).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from e3nn import nn
from e3nn.math import soft_one_hot_linspace, soft_unit_step

__all__ = [
    "embed_edge_length",
    "log_smooth_cutoff",
    "radial_mlp",
    "smooth_cutoff",
    "CUTOFF_SHARPNESS",
]

# soft_unit_step(CUTOFF_SHARPNESS * (1 - r / max_radius)) rises from 0 at r = max_radius to
# exp(-1/CUTOFF_SHARPNESS) ~ 0.905 at r = 0: a sharper step wastes less of the sphere but has
# larger derivatives near the cutoff. 10 is the value of e3nn's attention guide.
CUTOFF_SHARPNESS = 10.0


def embed_edge_length(
    edge_length: torch.Tensor,
    max_radius: float,
    number_of_basis: int,
    basis: str = "smooth_finite",
    cutoff: bool = True,
) -> torch.Tensor:
    r"""Embed edge lengths on ``number_of_basis`` smooth bumps, scaled to second moment ~1.

    .. math:: e(r) = \sqrt{B}\ \mathrm{soft\_one\_hot\_linspace}(r, 0, r_{max}, B)

    ``cutoff=True`` makes every bump vanish (smoothly) at 0 and at ``max_radius``; the
    Convolution chapter (after e3nn's convolution guide) uses ``cutoff=False``, the Attention
    chapter ``cutoff=True``.

    Shapes: ``edge_length [num_edges] -> [num_edges, number_of_basis]``.

    >>> embed_edge_length(torch.tensor([0.5, 2.0]), max_radius=1.0, number_of_basis=4).shape
    torch.Size([2, 4])
    """
    embedded = soft_one_hot_linspace(
        edge_length, start=0.0, end=max_radius, number=number_of_basis, basis=basis, cutoff=cutoff
    )
    return embedded.mul(number_of_basis**0.5)


def smooth_cutoff(edge_length: torch.Tensor, max_radius: float) -> torch.Tensor:
    r"""Smooth weight that is 0 for :math:`r \ge r_{max}` and rises smoothly inside:
    :math:`u(\kappa (1 - r / r_{max}))` with ``e3nn.math.soft_unit_step`` :math:`u` and
    :math:`\kappa` = ``CUTOFF_SHARPNESS``. Every derivative is 0 at the cutoff.

    Shapes: ``[num_edges] -> [num_edges]``.

    >>> smooth_cutoff(torch.tensor([1.0, 2.0]), max_radius=1.0)
    tensor([0., 0.])
    """
    return soft_unit_step(CUTOFF_SHARPNESS * (1 - edge_length / max_radius))


def log_smooth_cutoff(edge_length: torch.Tensor, max_radius: float) -> torch.Tensor:
    r"""The logarithm of :func:`smooth_cutoff`, in closed form:
    :math:`\log c(r) = -1 / (\kappa (1 - r / r_{max}))` inside the sphere, :math:`-\infty` at
    and beyond it, with a finite gradient everywhere.

    The attention softmax takes the cutoff in this form (``segment_softmax(...,
    log_weight=...)``): :math:`c(r)` itself underflows near the cutoff (below ~1e-38, float32's
    smallest normal number, for :math:`r > 0.9988\, r_{max}`), and a softmax over such tiny
    weights divides by their tiny sum in its backward pass (NaN gradients; book: Attention,
    *A softmax that cannot overflow*).

    Shapes: ``[num_edges] -> [num_edges]``.

    >>> log_smooth_cutoff(torch.tensor([0.0, 0.5, 1.0, 2.0]), max_radius=1.0)
    tensor([-0.1000, -0.2000,    -inf,    -inf])
    """
    distance_to_cutoff = 1 - edge_length / max_radius
    inside = distance_to_cutoff > 0
    # Evaluate -1/x only where x > 0, so that neither value nor gradient of the unused branch
    # is infinite (torch.where differentiates both branches).
    safe = torch.where(inside, distance_to_cutoff, torch.ones_like(distance_to_cutoff))
    return torch.where(inside, -1 / (CUTOFF_SHARPNESS * safe), torch.full_like(safe, -math.inf))


def radial_mlp(
    number_of_basis: int, radial_hidden: int, weight_numel: int, act: Callable
) -> nn.FullyConnectedNet:
    """The MLP :math:`h` from the embedded length to ``weight_numel`` tensor-product weights:
    ``FullyConnectedNet([number_of_basis, radial_hidden, weight_numel], act)``, bias-free and
    initialised so that its outputs have second moment ~1 (book: Normalization). It maps 0 to
    0, as the smooth cutoff needs, when ``act(0) == 0`` (book: Smoothness).
    """
    return nn.FullyConnectedNet([number_of_basis, radial_hidden, weight_numel], act)
