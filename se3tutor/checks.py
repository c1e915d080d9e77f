r"""Checks that the book and the tests make of a graph layer (book: every chapter).

A layer :math:`L(f, x)` of node features and positions is *equivariant* when, for every
rotation (or rotation with inversion) :math:`R`, translation :math:`t` and permutation
:math:`P` of the nodes,

.. math:: L(D_{in}(R) f,\ R x + t) = D_{out}(R)\, L(f, x), \qquad L(P f, P x) = P\, L(f, x).

Each check returns the largest absolute deviation, so that a caller states its own tolerance
(about 1e-5 times the output scale in float32, 1e-12 to 1e-10 in float64: torch.matrix_exp,
which e3nn uses for the Wigner matrices, is accurate to only ~1e-11 for some angles).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch
from e3nn import o3

__all__ = [
    "default_dtype",
    "equivariance_error",
    "gradients_are_finite",
    "permutation_error",
]

GraphLayer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def equivariance_error(
    layer: GraphLayer,
    irreps_input,
    irreps_output,
    f: torch.Tensor,
    pos: torch.Tensor,
    rotation: Optional[torch.Tensor] = None,
    inversion: bool = False,
    translation: bool = True,
) -> float:
    r"""Largest :math:`|L(D_{in} f, R x + t) - D_{out} L(f, x)|` over all outputs.

    Args:
        layer: ``layer(f, pos) -> [num_nodes, irreps_output.dim]``.
        f: ``[num_nodes, irreps_input.dim]``; pos: ``[num_nodes, 3]``.
        rotation: a ``[3, 3]`` rotation matrix; default a uniformly random one (``o3.rand_matrix``).
        inversion: compose the rotation with the inversion :math:`x \mapsto -x` (parity).
        translation: also shift the positions by a random vector.

    >>> from se3tutor import Convolution
    >>> conv = Convolution("2x0e + 1x1o", "1x0e + 1x1o", "0e + 1o", 4, 1.5, 2.0)
    >>> f, pos = conv.irreps_input.randn(5, -1), torch.randn(5, 3)
    >>> equivariance_error(conv, conv.irreps_input, conv.irreps_output, f, pos) < 1e-5
    True
    """
    irreps_input, irreps_output = o3.Irreps(irreps_input), o3.Irreps(irreps_output)
    if rotation is None:
        rotation = o3.rand_matrix(dtype=pos.dtype, device=pos.device)
    if inversion:
        rotation = -rotation  # det = -1: e3nn's D_from_matrix applies the parities
    shift = torch.randn(3, dtype=pos.dtype, device=pos.device) if translation else 0.0
    with default_dtype(rotation.dtype):
        d_input = irreps_input.D_from_matrix(rotation)
        d_output = irreps_output.D_from_matrix(rotation)
    transform_first = layer(f @ d_input.T, pos @ rotation.T + shift)
    transform_last = layer(f, pos) @ d_output.T
    return float((transform_first - transform_last).detach().abs().max())


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """Temporarily set torch's default dtype.

    e3nn builds its constants (Clebsch-Gordan coefficients in tensor products, generators in
    ``Irreps.D_from_matrix``) in the default dtype. Under float32 they are accurate to ~1e-7
    even when the inputs are float64, so build float64 modules and Wigner matrices inside
    ``with default_dtype(torch.float64):``.

    >>> with default_dtype(torch.float64):
    ...     torch.zeros(1).dtype
    torch.float64
    """
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def permutation_error(layer: GraphLayer, f: torch.Tensor, pos: torch.Tensor) -> float:
    r"""Largest :math:`|L(P f, P x) - P L(f, x)|` for a random permutation :math:`P` of the nodes.

    >>> permutation_error(lambda f, pos: f * pos.norm(dim=1, keepdim=True),
    ...                   torch.randn(4, 2), torch.randn(4, 3))
    0.0
    """
    perm = torch.randperm(f.shape[0], device=f.device)
    return float((layer(f[perm], pos[perm]) - layer(f, pos)[perm]).detach().abs().max())


def gradients_are_finite(layer: GraphLayer, f: torch.Tensor, pos: torch.Tensor) -> bool:
    """Whether ``layer(f, pos).sum()`` has finite gradients with respect to ``f``, ``pos`` and
    every parameter of ``layer`` (if it is a module). Used at the awkward places: coincident
    points, points exactly at the cutoff.

    >>> gradients_are_finite(lambda f, pos: f * pos.norm(dim=1, keepdim=True),
    ...                      torch.randn(2, 1), torch.zeros(2, 3))
    True
    """
    f = f.detach().requires_grad_(True)
    pos = pos.detach().requires_grad_(True)
    parameters = list(layer.parameters()) if isinstance(layer, torch.nn.Module) else []
    inputs = [f, pos, *parameters]
    grads = torch.autograd.grad(layer(f, pos).sum(), inputs, allow_unused=True)
    return all(g is None or bool(torch.isfinite(g).all()) for g in grads)
