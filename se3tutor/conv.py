r"""The equivariant convolution (book: Convolution).

.. math:: f'_i = \frac{1}{\sqrt{z}} \sum_{j \in \partial(i)}
          f_j \otimes_{h(\|x_{ij}\|)} Y(x_{ij} / \|x_{ij}\|)

- :math:`\partial(i)`: the neighbours of :math:`i` closer than ``max_radius``;
  :math:`x_{ij} = x_j - x_i` (see :mod:`se3tutor.graph` for the edge convention);
- :math:`Y`: the spherical harmonics ``irreps_sh`` (``component`` normalisation);
- :math:`h`: an MLP of the embedded edge length, giving the tensor-product weights per edge;
- :math:`\otimes_w`: ``e3nn.o3.FullyConnectedTensorProduct`` with per-edge weights :math:`w`;
- :math:`z`: the typical number of neighbours, a constant, so that the sum of :math:`z` terms of
  second moment 1 has second moment about 1.

With the defaults this reproduces the ``conv`` function of the version of e3nn's convolution
guide the book follows (commit 8f0c21be) exactly: same embedding with ``cutoff=False``, same
``[number_of_basis, 16, weight_numel]`` ReLU MLP, same normalisation. (The current guide
embeds with ``cutoff=True``.)
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from e3nn import o3

from se3tutor.graph import check_graph_inputs, edge_vectors, radius_graph, scatter
from se3tutor.radial import embed_edge_length, radial_mlp

__all__ = ["Convolution"]


class Convolution(torch.nn.Module):
    r"""Equivariant graph convolution (book: Convolution).

    .. math:: f'_i = \frac{1}{\sqrt{z}} \sum_{j \in \partial(i)}
          f_j \otimes_{h(\|x_{ij}\|)} Y(x_{ij} / \|x_{ij}\|)

    Args:
        irreps_in, irreps_out: irreps of the node features (``e3nn.o3.Irreps`` or str).
        irreps_sh: irreps of the edge spherical harmonics, e.g. ``"0e + 1o + 2e"``.
        number_of_basis: number of radial basis functions.
        max_radius: cutoff radius of the graph and of the radial basis.
        num_neighbors: :math:`z`, the typical number of neighbours (normalisation constant).
        radial_hidden: width of the hidden layer of the radial MLP.
        cutoff: embed the edge length on bumps that vanish smoothly at 0 and at
            ``max_radius`` (book: Smoothness). The default ``False`` is the older guide's
            ``conv``: its outputs jump when a neighbour crosses the cutoff sphere.
        radial_activation: activation of the radial MLP. The guide's ``relu`` has kinks, so
            the derivative of the output with respect to the positions (a force) jumps where
            a hidden unit changes sign; a smooth one (``torch.nn.functional.silu``) together
            with ``cutoff=True`` gives a layer that is smooth to every order (book: Smoothness).

    Float64: build the module under ``torch.set_default_dtype(torch.float64)`` (or
    ``se3tutor.checks.default_dtype``); e3nn computes its Clebsch-Gordan constants in the
    default dtype, so ``.double()`` afterwards keeps float32-accurate constants.

    Submodules: ``tp`` (``FullyConnectedTensorProduct``, ``shared_weights=False``) and ``fc``
    (``FullyConnectedNet([number_of_basis, radial_hidden, tp.weight_numel], radial_activation)``).

    Shapes: ``f_in [num_nodes, irreps_in.dim]``, ``pos [num_nodes, 3]``,
    ``edge_index [2, num_edges]`` (default: ``radius_graph(pos, max_radius, batch)``),
    ``batch [num_nodes]`` -> ``[num_nodes, irreps_out.dim]``.

    >>> conv = Convolution("4x0e + 2x1o", "3x0e + 1x1o", "0e + 1o", number_of_basis=5,
    ...                    max_radius=1.5, num_neighbors=3.0)
    >>> conv(conv.irreps_in.randn(6, -1), torch.randn(6, 3)).shape
    torch.Size([6, 6])
    """

    def __init__(
        self,
        irreps_in,
        irreps_out,
        irreps_sh,
        number_of_basis: int,
        max_radius: float,
        num_neighbors: float,
        radial_hidden: int = 16,
        cutoff: bool = False,
        radial_activation: Callable[[torch.Tensor], torch.Tensor] = torch.relu,
    ) -> None:
        super().__init__()
        if num_neighbors <= 0:
            raise ValueError(f"num_neighbors must be > 0, got {num_neighbors}")
        self.irreps_in = o3.Irreps(irreps_in)
        self.irreps_out = o3.Irreps(irreps_out)
        self.irreps_sh = o3.Irreps(irreps_sh)
        self.number_of_basis = number_of_basis
        self.max_radius = max_radius
        self.num_neighbors = num_neighbors
        self.cutoff = cutoff
        self.tp = o3.FullyConnectedTensorProduct(
            self.irreps_in, self.irreps_sh, self.irreps_out, shared_weights=False
        )
        self.fc = radial_mlp(
            number_of_basis, radial_hidden, self.tp.weight_numel, radial_activation
        )

    def forward(
        self,
        f_in: torch.Tensor,
        pos: torch.Tensor,
        edge_index: Optional[torch.Tensor] = None,
        batch: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        check_graph_inputs(self, self.irreps_in, f_in, pos, edge_index, batch)
        if edge_index is None:
            edge_index = radius_graph(pos, self.max_radius, batch=batch)
        edge_src, edge_dst = edge_index
        edge_vec = edge_vectors(pos, edge_index)
        edge_sh = o3.spherical_harmonics(
            self.irreps_sh, edge_vec, normalize=True, normalization="component"
        )
        edge_length_embedded = embed_edge_length(
            edge_vec.norm(dim=1), self.max_radius, self.number_of_basis, cutoff=self.cutoff
        )
        summand = self.tp(f_in[edge_src], edge_sh, self.fc(edge_length_embedded))
        # [num_edges, irreps_out.dim]
        f_out = scatter(summand, edge_dst, dim=0, dim_size=f_in.shape[0])
        # A sum of ~z terms of second moment 1 has second moment ~z (book: Normalization).
        return f_out.div(self.num_neighbors**0.5)
