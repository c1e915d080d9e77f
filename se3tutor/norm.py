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

import torch
from e3nn import nn, o3

__all__ = ["EquivariantLayerNorm", "gated_nonlinearity", "second_moment_per_irrep"]


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

    Shapes: ``f [..., irreps.dim] -> [..., irreps.dim]``.

    >>> norm = EquivariantLayerNorm("4x0e + 2x1o")
    >>> y = norm(100 * torch.randn(3, 10))
    >>> bool((y[:, 4:].pow(2).mean(dim=1) - 1).abs().max() < 1e-4)
    True
    """

    def __init__(self, irreps, eps: float = 1e-5, affine: bool = True) -> None:
        super().__init__()
        self.irreps = o3.Irreps(irreps)
        self.eps = eps
        self.affine = affine
        num_channels = self.irreps.num_irreps
        num_even_scalars = sum(mul for mul, ir in self.irreps if ir == o3.Irrep("0e"))
        if affine:
            self.weight = torch.nn.Parameter(torch.ones(num_channels))
            self.bias = torch.nn.Parameter(torch.zeros(num_even_scalars))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        if f.shape[-1] != self.irreps.dim:
            raise ValueError(
                f"EquivariantLayerNorm: f has {f.shape[-1]} features, expected irreps "
                f"{self.irreps} of dim {self.irreps.dim}"
            )
        blocks = []
        channel = even_scalar = 0
        for (mul, ir), block in zip(self.irreps, self.irreps.slices()):
            x = f[..., block].reshape(*f.shape[:-1], mul, ir.dim)  # [..., mul, 2l+1]
            mean_square = x.pow(2).mean(dim=(-2, -1), keepdim=True)
            x = x * torch.rsqrt(mean_square + self.eps)
            if self.affine:
                x = x * self.weight[channel : channel + mul, None]
                if ir == o3.Irrep("0e"):
                    x = x + self.bias[even_scalar : even_scalar + mul, None]
                    even_scalar += mul
            channel += mul
            blocks.append(x.reshape(*f.shape[:-1], mul * ir.dim))
        return torch.cat(blocks, dim=-1) if blocks else f

    def extra_repr(self) -> str:
        return f"{self.irreps}, eps={self.eps}, affine={self.affine}"


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
    activations = {1: torch.nn.functional.silu, -1: torch.tanh}
    irreps_gates = o3.Irreps(f"{irreps_gated.num_irreps}x0e") if irreps_gated else o3.Irreps("")
    return nn.Gate(
        irreps_scalars,
        [activations[ir.p] for _, ir in irreps_scalars],
        irreps_gates,
        [torch.sigmoid] * len(irreps_gates),
        irreps_gated,
    )
