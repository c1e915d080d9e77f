r"""Normalisation: second moments, an equivariant layer norm, the gated nonlinearity
(book: Normalization).

e3nn's ``component`` convention gives every component of a feature a second moment of about 1
(so an irrep of degree :math:`l` has squared norm about :math:`2l + 1`); every operation of the
book is scaled to keep it so. Stacked layers still drift, because neighbouring nodes' features
become correlated; the cure is a residual connection plus an equivariant normalisation, here
:class:`EquivariantLayerNorm`.

An operation on irreps is equivariant when it acts on each irrep only through rotation
invariant quantities: its norm may be rescaled, its direction must be kept. Both layers below
do exactly that.
"""

from __future__ import annotations

import math

import torch
from e3nn import nn, o3

__all__ = [
    "EquivariantLayerNorm",
    "channel_index",
    "gated_nonlinearity",
    "pre_norm_bound",
    "second_moment_deviation",
    "second_moment_per_irrep",
]


def channel_index(irreps) -> torch.Tensor:
    """``[irreps.dim]``: the channel (copy of an irrep, counted over all blocks) that each
    component belongs to, e.g. to sum squares per channel with ``index_add``.

    >>> channel_index(o3.Irreps("2x0e + 1x1o")).tolist()
    [0, 1, 2, 2, 2]
    """
    irreps = o3.Irreps(irreps)
    dims = torch.tensor([ir.dim for mul, ir in irreps for _ in range(mul)], dtype=torch.long)
    return torch.arange(irreps.num_irreps).repeat_interleave(dims)


def second_moment_per_irrep(f: torch.Tensor, irreps) -> dict[str, torch.Tensor]:
    r"""The mean of the squared components of ``f``, grouped by irrep type.

    .. math:: m_{ir} = \frac{1}{N \cdot \mathrm{mul} \cdot (2l+1)} \sum_{n,u,m} f_{n,u,m}^2

    With ``component`` normalisation each entry is about 1. Returns ``{"0e": m, "1o": m, ...}``
    (0-dim tensors, no host sync); irreps of the same type in several places are pooled.

    Shapes: ``f [..., irreps.dim]``.

    >>> irreps = o3.Irreps("8x0e + 4x1o")
    >>> moments = second_moment_per_irrep(irreps.randn(5000, -1), irreps)
    >>> {ir: round(float(m), 1) for ir, m in moments.items()}
    {'0e': 1.0, '1o': 1.0}
    """
    irreps = o3.Irreps(irreps)
    if f.shape[-1] != irreps.dim:
        raise ValueError(f"f has {f.shape[-1]} features, but irreps {irreps} have dim {irreps.dim}")
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    for (_mul, ir), block in zip(irreps, irreps.slices()):
        key = str(ir)
        squares = f[..., block].pow(2).sum()
        sums[key] = sums[key] + squares if key in sums else squares
        counts[key] = counts.get(key, 0) + f[..., block].numel()
    return {key: sums[key] / max(counts[key], 1) for key in sums}


def second_moment_deviation(f: torch.Tensor, irreps=None) -> float:
    r"""By what factor the second moment of ``f`` is away from 1, for its worst irrep type.

    .. math:: \delta = \max_{ir} \max\left(m_{ir}, \frac{1}{m_{ir}}\right) \ \ge 1

    with :math:`m_{ir}` from :func:`second_moment_per_irrep` (or, for ``irreps=None``, the mean
    square of all entries of ``f``). :math:`\delta = 1` is perfect ``component`` normalisation;
    "within a factor 3 of 1" reads ``second_moment_deviation(f, irreps) < 3``. A zero moment
    gives ``inf``, a NaN anywhere gives ``nan`` (which fails every ``<`` check). A check, like
    :func:`se3tutor.checks.equivariance_error`: it returns a Python float (a host sync).

    Shapes: ``f [..., irreps.dim]`` (any shape for ``irreps=None``).

    >>> second_moment_deviation(torch.full((4, 3), 2.0))
    4.0
    >>> second_moment_deviation(torch.full((4, 4), 0.5), "1x0e + 1x1o")
    4.0
    """
    if irreps is None:
        moments = f.detach().pow(2).mean().reshape(1)
    else:
        moments = torch.stack(list(second_moment_per_irrep(f.detach(), irreps).values()))
    return float(torch.maximum(moments, 1 / moments).max())


def pre_norm_bound(depth: int, max_increment: float, initial: float = 1.0) -> float:
    r"""Largest second moment a pre-norm residual stream can reach after ``depth`` blocks.

    .. math:: f_{k+1} = f_k + L_k(\mathrm{norm}(f_k)) \quad\Longrightarrow\quad
              m_L \le \left(\sqrt{m_0} + L \sqrt{c}\right)^2

    The layer only ever sees normalised features, so what it adds has a second moment
    :math:`c_k` of order 1; if every :math:`c_k \le c` (= ``max_increment``), the triangle
    inequality for the root mean square, :math:`\sqrt{m_{k+1}} \le \sqrt{m_k} + \sqrt{c_k}`,
    gives the bound: the RMS grows at most linearly with depth (book: Normalization). Holds
    per irrep type when :math:`m` and :math:`c` are taken per irrep type.

    >>> pre_norm_bound(10, max_increment=4.0)
    441.0
    """
    if depth < 0 or max_increment < 0 or initial < 0:
        raise ValueError(
            f"depth, max_increment and initial must be >= 0, got {depth}, {max_increment}, "
            f"{initial}"
        )
    return (math.sqrt(initial) + depth * math.sqrt(max_increment)) ** 2


class EquivariantLayerNorm(torch.nn.Module):
    r"""Layer norm for irreps: each block of ``mul`` irreps of degree :math:`l` of a node is
    divided by its root mean square, so its directions are kept and its second moment becomes 1.

    .. math:: y_{u,m} = g_u \frac{x_{u,m}}{\sqrt{\frac{1}{\mathrm{mul}(2l+1)}
              \sum_{u',m'} x_{u',m'}^2 + \epsilon}} \ (+\, b_u \text{ for } 0e)

    The root mean square is invariant under rotations (and inversion), so
    :math:`y(D x) = D\, y(x)`. The learned gains :math:`g_u` scale whole irreps (equivariant);
    a bias is allowed only on even scalars ``0e``, which a rotation or inversion leaves
    unchanged. Scalars are not centred (as in RMSNorm): centring a single scalar channel would
    erase it.

    ``scope="node"`` divides all irreps of a node by one root mean square, over all its
    components, instead of each block by its own. The node's second moment becomes 1 and the
    ratios between its degrees are kept. This is what the transformer uses: a block that only
    messages feed (the vectors of an atom whose one neighbour is just entering the cutoff
    sphere) is tiny, and dividing it by its own tiny norm blows it up to size 1 within a
    sliver of distance, a near-jump in the output and a spike in its derivative (the force);
    divided by the node's norm it stays tiny (book: Normalization, Smoothness).

    ``eps`` is absolute: a block (or node) whose mean square is far below ``eps`` stays small
    instead of being scaled up to 1, which is what keeps the layer smooth near zero.

    Shapes: ``f [..., irreps.dim] -> [..., irreps.dim]``.

    >>> norm = EquivariantLayerNorm("4x0e + 2x1o")
    >>> y = norm(100 * torch.randn(3, 10))
    >>> bool((y[:, 4:].pow(2).mean(dim=1) - 1).abs().max() < 1e-4)
    True
    """

    def __init__(
        self, irreps, eps: float = 1e-5, affine: bool = True, scope: str = "irrep"
    ) -> None:
        super().__init__()
        if scope not in ("irrep", "node"):
            raise ValueError(f'scope must be "irrep" or "node", got {scope!r}')
        self.irreps = o3.Irreps(irreps)
        self.eps = eps
        self.affine = affine
        self.scope = scope
        num_channels = self.irreps.num_irreps
        num_even_scalars = sum(mul for mul, ir in self.irreps if ir == o3.Irrep("0e"))
        # The width and the (start, stop, mul, 2l+1, is 0e) of every block, as plain ints: what
        # forward reads, which torch.compile can trace (it cannot guard on e3nn's Irrep objects).
        self.dim = self.irreps.dim
        self.block_layout = tuple(
            (block.start, block.stop, mul, ir.dim, ir == o3.Irrep("0e"))
            for (mul, ir), block in zip(self.irreps, self.irreps.slices())
        )
        if affine:
            self.weight = torch.nn.Parameter(torch.ones(num_channels))
            self.bias = torch.nn.Parameter(torch.zeros(num_even_scalars))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        if f.shape[-1] != self.dim:
            raise ValueError(
                f"EquivariantLayerNorm: f has {f.shape[-1]} features, expected irreps "
                f"{self.irreps} of dim {self.irreps.dim}"
            )
        normalised = []
        channel = even_scalar = 0
        if self.scope == "node":
            node_scale = torch.rsqrt(f.pow(2).mean(dim=-1, keepdim=True) + self.eps)[..., None]
        for start, stop, mul, dim, even_scalars in self.block_layout:
            x = f[..., start:stop].reshape(*f.shape[:-1], mul, dim)  # [..., mul, 2l+1]
            if self.scope == "node":
                x = x * node_scale
            else:
                mean_square = x.pow(2).mean(dim=(-2, -1), keepdim=True)
                x = x * torch.rsqrt(mean_square + self.eps)
            if self.affine:
                x = x * self.weight[channel : channel + mul, None]
                if even_scalars:
                    x = x + self.bias[even_scalar : even_scalar + mul, None]
                    even_scalar += mul
            channel += mul
            normalised.append(x.reshape(*f.shape[:-1], mul * dim))
        return torch.cat(normalised, dim=-1) if normalised else f

    def extra_repr(self) -> str:
        return f"{self.irreps}, eps={self.eps}, affine={self.affine}, scope={self.scope}"


def gated_nonlinearity(irreps_out) -> nn.Gate:
    r"""The gated nonlinearity that produces ``irreps_out`` (``e3nn.nn.Gate``).

    Scalars go through a pointwise activation (SiLU for ``0e``; tanh for ``0o``, which must be
    odd to respect parity); every irrep with :math:`l > 0` is multiplied by its own ``0e`` gate
    passed through a sigmoid. A norm-preserving rescaling keeps directions, so the result is
    equivariant; e3nn normalises each activation to keep the second moment at 1.

    The layer before it must produce ``gate.irreps_in``: the scalars, then the gates (here
    merged with them into ``14x0e``), then the gated irreps.

    >>> gate = gated_nonlinearity("8x0e + 4x1o + 2x2e")
    >>> gate.irreps_in, gate.irreps_out
    (14x0e+4x1o+2x2e, 8x0e+4x1o+2x2e)
    """
    irreps_out = o3.Irreps(irreps_out).simplify()
    irreps_scalars = o3.Irreps([(mul, ir) for mul, ir in irreps_out if ir.l == 0])
    irreps_gated = o3.Irreps([(mul, ir) for mul, ir in irreps_out if ir.l > 0])
    if irreps_out.dim == 0:
        raise ValueError("gated_nonlinearity: irreps_out is empty")
    if irreps_scalars + irreps_gated != irreps_out:  # e3nn's Gate puts the scalars first
        raise ValueError(
            f"gated_nonlinearity: irreps_out must list its scalars first, got {irreps_out} "
            f"(use {(irreps_scalars + irreps_gated).simplify()})"
        )
    activations = {1: torch.nn.functional.silu, -1: torch.tanh}
    irreps_gates = o3.Irreps(f"{irreps_gated.num_irreps}x0e") if irreps_gated else o3.Irreps("")
    return nn.Gate(
        irreps_scalars,
        [activations[ir.p] for _, ir in irreps_scalars],
        irreps_gates,
        [torch.sigmoid] * len(irreps_gates),
        irreps_gated,
    )
