r"""Checks that the book and the tests make of a graph layer (book: every chapter).

A layer :math:`L(f, x)` of node features and positions is *equivariant* when, for every
rotation (or rotation with inversion) :math:`R`, translation :math:`t` and permutation
:math:`P` of the nodes,

.. math:: L(D_{in}(R) f,\ R x + t) = D_{out}(R)\, L(f, x), \qquad L(P f, P x) = P\, L(f, x).

Each check returns the largest absolute deviation, so that a caller states its own tolerance
(about 1e-5 times the output scale in float32, about 1e-9 in float64: torch.matrix_exp, which
e3nn uses for the Wigner matrices, errs by up to about 2.5e-10 on a single matrix for some
angles, pytorch/pytorch#196592; the book's primer measures it).

A layer is *smooth* when its output and the output's derivative with respect to the positions
(a force, in a physics model) change continuously as a node moves, in particular when it
crosses another node's cutoff sphere (book: Smoothness). :func:`response_along_line` traces
both along a line, :func:`largest_jumps` measures the largest change between neighbouring
steps (it shrinks with the step for a smooth layer, and does not for a hard cutoff), and
:func:`gradients_match_finite_differences` compares autograd with finite differences.
:func:`derivatives` differentiates a function of the edge length (a radial basis, a cutoff)
several times, to see which of them vanish at the cutoff together with their derivatives.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch
from e3nn import o3

__all__ = [
    "default_dtype",
    "derivatives",
    "equivariance_difference",
    "equivariance_error",
    "gradients_are_finite",
    "gradients_match_finite_differences",
    "largest_jumps",
    "permutation_error",
    "response_along_line",
]

GraphLayer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def equivariance_error(
    layer: GraphLayer,
    irreps_in,
    irreps_out,
    f: torch.Tensor,
    pos: torch.Tensor,
    rotation: Optional[torch.Tensor] = None,
    inversion: bool = False,
    translation: bool = True,
) -> float:
    r"""Largest :math:`|L(D_{in} f, R x + t) - D_{out} L(f, x)|` over all outputs.

    Args:
        layer: ``layer(f, pos) -> [num_nodes, irreps_out.dim]``.
        f: ``[num_nodes, irreps_in.dim]``; pos: ``[num_nodes, 3]``.
        rotation: a ``[3, 3]`` rotation matrix; default a uniformly random one (``o3.rand_matrix``).
        inversion: compose the rotation with the inversion :math:`x \mapsto -x` (parity).
        translation: also shift the positions by a random vector.

    >>> from se3tutor import Convolution
    >>> conv = Convolution("2x0e + 1x1o", "1x0e + 1x1o", "0e + 1o", 4, 1.5, 2.0)
    >>> f, pos = conv.irreps_in.randn(5, -1), torch.randn(5, 3)
    >>> equivariance_error(conv, conv.irreps_in, conv.irreps_out, f, pos) < 1e-5
    True
    """
    if rotation is None:
        rotation = o3.rand_matrix(dtype=pos.dtype, device=pos.device)
    if inversion:
        rotation = -rotation  # det = -1: e3nn's D_from_matrix applies the parities
    shift = torch.randn(3, dtype=pos.dtype, device=pos.device) if translation else None
    difference = equivariance_difference(layer, irreps_in, irreps_out, f, pos, rotation, shift)
    return float(difference.detach().abs().max())


def equivariance_difference(
    layer: GraphLayer,
    irreps_in,
    irreps_out,
    f: torch.Tensor,
    pos: torch.Tensor,
    rotation: torch.Tensor,
    shift: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    r""":math:`L(D_{in} f, R x + t) - D_{out} L(f, x)`, ``[num_nodes, irreps_out.dim]``, for
    an orthogonal ``rotation`` :math:`R` (with :math:`\det R = -1`, the parities act) and a
    ``shift`` :math:`t` (default 0). ``out``: :math:`L(f, x)`, when already computed.
    """
    irreps_in, irreps_out = o3.Irreps(irreps_in), o3.Irreps(irreps_out)
    with default_dtype(pos.dtype):  # e3nn's Wigner matrices in the precision of the inputs
        d_input = irreps_in.D_from_matrix(rotation.cpu()).to(pos.device)
        d_output = irreps_out.D_from_matrix(rotation.cpu()).to(pos.device)
    moved = pos @ rotation.T if shift is None else pos @ rotation.T + shift
    out = layer(f, pos) if out is None else out
    return layer(f @ d_input.T, moved) - out @ d_output.T


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


def response_along_line(
    layer: Callable[..., torch.Tensor],
    f: torch.Tensor,
    pos: torch.Tensor,
    node: int,
    direction: torch.Tensor,
    t: torch.Tensor,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""A scalar readout of the layer, and its derivative, as ``node`` moves along a line.

    .. math:: y(t) = \sum_{n,c} w_{nc}\, L\big(f, x + t\, d\, e_{node}\big)_{nc}, \qquad
              y'(t) = \nabla_{x_{node}}\, y \cdot d

    with fixed random weights :math:`w` (drawn from ``seed``), so that every output channel
    counts. All ``len(t)`` copies of the graph are evaluated in one call, as one batch
    (``layer(f, pos, batch=batch)``), with one backward pass.

    Shapes: ``f [num_nodes, dim_in]``, ``pos [num_nodes, 3]``, ``direction [3]``, ``t [S]``
    -> ``(y [S], dy_dt [S])``.

    >>> def layer(f, pos, batch):  # f times the distance of each node to node 0 of its graph
    ...     first = torch.zeros_like(batch).scatter_reduce(0, batch, torch.arange(len(batch)),
    ...                                                    "amin", include_self=False)
    ...     return f * (pos - pos[first[batch]]).norm(dim=1, keepdim=True)
    >>> y, dy = response_along_line(layer, torch.ones(2, 1), torch.zeros(2, 3), node=1,
    ...                             direction=torch.tensor([1.0, 0, 0]), t=torch.tensor([1.0, 2.0]))
    >>> torch.allclose(dy, dy[0]), torch.allclose(y[1], 2 * y[0])
    (True, True)
    """
    num_nodes, num_steps = pos.shape[0], t.shape[0]
    if not 0 <= node < num_nodes:
        raise ValueError(f"node must be in [0, {num_nodes}), got {node}")
    if direction.shape != (3,) or t.dim() != 1:
        raise ValueError(
            f"direction must be [3] and t [S], got {tuple(direction.shape)} and {tuple(t.shape)}"
        )
    shift = torch.zeros(num_steps, num_nodes, 3, dtype=pos.dtype, device=pos.device)
    shift[:, node] = t.to(pos.dtype)[:, None] * direction.to(pos.dtype)
    moved = (pos.detach() + shift).reshape(num_steps * num_nodes, 3).requires_grad_(True)
    features = f.detach().repeat(num_steps, 1)
    batch = torch.arange(num_steps, device=pos.device).repeat_interleave(num_nodes)
    out = layer(features, moved, batch=batch).reshape(num_steps, num_nodes, -1)
    generator = torch.Generator().manual_seed(seed)
    weights = torch.randn(out.shape[1:], generator=generator, dtype=out.dtype).to(out.device)
    y = (out * weights).sum(dim=(1, 2))
    if not y.requires_grad:  # the readout does not depend on the positions
        return y, torch.zeros_like(y)
    (grad,) = torch.autograd.grad(y.sum(), moved)
    dy_dt = grad.reshape(num_steps, num_nodes, 3)[:, node] @ direction.to(pos.dtype)
    return y.detach(), dy_dt


def largest_jumps(
    layer: Callable[..., torch.Tensor],
    f: torch.Tensor,
    pos: torch.Tensor,
    node: int,
    direction: torch.Tensor,
    t_start: float,
    t_stop: float,
    step: float,
) -> tuple[float, float]:
    r"""The largest change of the readout :math:`y` and of its slope :math:`y'` between
    neighbouring points of the grid ``t_start, t_start + step, ... < t_stop``
    (see :func:`response_along_line`).

    For a smooth layer both shrink in proportion to ``step``; where the output jumps (a hard
    cutoff inside the window) the first stays at the size of the jump however small the step.

    >>> def layer(f, pos, batch):  # a hard step at x = 0.5, slope 0 elsewhere
    ...     return f * (pos[:, :1] > 0.5)
    >>> args = layer, torch.ones(1, 1), torch.zeros(1, 3), 0, torch.tensor([1.0, 0, 0]), 0.0, 1.0
    >>> largest_jumps(*args, step=1e-2) == largest_jumps(*args, step=1e-4)
    True
    """
    if not step > 0 or not t_stop > t_start:
        raise ValueError(f"need step > 0 and t_stop > t_start, got {step}, [{t_start}, {t_stop})")
    t = torch.arange(t_start, t_stop, step, dtype=pos.dtype, device=pos.device)
    y, dy_dt = response_along_line(layer, f, pos, node, direction, t)
    return float(y.diff().abs().max()), float(dy_dt.diff().abs().max())


def gradients_match_finite_differences(
    layer: GraphLayer, f: torch.Tensor, pos: torch.Tensor, eps: float = 1e-6, atol: float = 1e-5
) -> bool:
    r"""Whether the autograd gradients of ``layer(f, pos)`` with respect to ``f`` and ``pos``
    agree with central finite differences (``torch.autograd.gradcheck``, float64 only).

    At a point where the layer is not differentiable (a hard cutoff, or the direction of an
    edge of length 0 with a non-zero weight) the two disagree and this returns ``False``.

    >>> f, pos = torch.ones(2, 1, dtype=torch.float64), torch.zeros(2, 3, dtype=torch.float64)
    >>> gradients_match_finite_differences(lambda f, pos: f * pos.norm(dim=1, keepdim=True), f, pos)
    True
    >>> gradients_match_finite_differences(lambda f, pos: f * (pos[:, :1] > 0), f, pos)
    False
    """
    if f.dtype != torch.float64 or pos.dtype != torch.float64:
        raise TypeError(
            f"finite differences need float64 inputs (and a float64 layer), got {f.dtype}, "
            f"{pos.dtype}"
        )
    inputs = (f.detach().requires_grad_(True), pos.detach().requires_grad_(True))
    return torch.autograd.gradcheck(layer, inputs, eps=eps, atol=atol, raise_exception=False)


def derivatives(
    function: Callable[[torch.Tensor], torch.Tensor], r: torch.Tensor, order: int = 2
) -> torch.Tensor:
    r"""The values and the first ``order`` derivatives, by autograd, of a function that acts on
    each entry of ``r`` separately (a radial basis, a cutoff, a radial MLP of the embedding):

    .. math:: D_{k, n, b} = \frac{d^k y_b}{d r^k}(r_n), \qquad k = 0, \dots, \text{order}.

    Autograd differentiates the branch that the code takes: at a kink (where a mask such as
    ``(x < 1)`` switches) it reports one side only, so evaluate a one-sided limit just beside
    the kink rather than on it (book: Smoothness).

    Shapes: ``r [N]``, ``function(r) [N]`` or ``[N, B]`` -> ``[order + 1, N]`` or
    ``[order + 1, N, B]``.

    >>> derivatives(lambda r: r**3, torch.tensor([1.0, 2.0]), order=3)
    tensor([[ 1.,  8.],
            [ 3., 12.],
            [ 6., 12.],
            [ 6.,  6.]])
    """
    if r.dim() != 1:
        raise ValueError(f"r must be [N], got {tuple(r.shape)}")
    r = r.detach().requires_grad_(True)
    y = function(r)
    if y.shape[:1] != r.shape or y.dim() > 2:
        raise ValueError(f"function(r) must be [N] or [N, B] for r [N], got {tuple(y.shape)}")
    columns = []
    for column in y.reshape(len(r), -1).unbind(dim=1):  # y_b depends on r_n only: one pass each
        orders = [column]
        for _ in range(order):
            previous = orders[-1]
            if not previous.requires_grad:  # constant in r (e.g. masked to 0): derivative 0
                orders.append(torch.zeros_like(previous))
                continue
            (grad,) = torch.autograd.grad(previous.sum(), r, create_graph=True, allow_unused=True)
            orders.append(torch.zeros_like(previous) if grad is None else grad)
        columns.append(torch.stack(orders))
    return torch.stack(columns, dim=-1).reshape(order + 1, *y.shape).detach()
