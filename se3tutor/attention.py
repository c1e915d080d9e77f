r"""Equivariant graph attention of the SE(3)-Transformer (book: Attention).

.. math:: f'_i = \sum_{j \in \partial(i)} \sqrt{\alpha_{ij}}\ v_{ij}, \qquad
          \alpha_{ij} = \frac{c(r_{ij})\, e^{q_i \cdot k_{ij}}}
                             {\sum_{j'} c(r_{ij'})\, e^{q_i \cdot k_{ij'}}}

- queries :math:`q_i = h_Q(f_i)`, an equivariant linear map (``o3.Linear``);
- keys :math:`k_{ij} = f_j \otimes_{w_K(r_{ij})} Y(\hat x_{ij})` and values
  :math:`v_{ij} = f_j \otimes_{w_V(r_{ij})} Y(\hat x_{ij})`, tensor products with the edge's
  spherical harmonics, weighted by MLPs of the embedded edge length;
- :math:`q_i \cdot k_{ij}`: an invariant, learned dot product (a tensor product into ``0e``);
- :math:`c(r)`: the smooth cutoff, so that an edge enters and leaves the softmax smoothly.

This is the formula of e3nn's attention guide (its later version), with one change that does
not alter the value: the softmax subtracts each centre's largest logit before ``exp``
(:func:`se3tutor.graph.segment_softmax`), so it does not overflow in deep stacks.
"""

from __future__ import annotations

from typing import Optional

import torch
from e3nn import o3

from se3tutor.graph import (
    check_graph_inputs,
    edge_vectors,
    radius_graph,
    scatter,
    segment_softmax,
)
from se3tutor.multihead import sqrt_flat_at_zero
from se3tutor.radial import embed_edge_length, log_smooth_cutoff, radial_mlp

__all__ = ["EquivariantAttention"]


class EquivariantAttention(torch.nn.Module):
    r"""Graph attention of the SE(3)-Transformer, one head (book: Attention).

    .. math:: f'_i = \sum_j \sqrt{\alpha_{ij}}\, v_{ij}, \quad
              \alpha_{ij} = \frac{c(r_{ij}) e^{q_i \cdot k_{ij}}}
                                 {\sum_{j'} c(r_{ij'}) e^{q_i \cdot k_{ij'}}}

    Args:
        irreps_in, irreps_query, irreps_key, irreps_out: irreps of the node features,
            queries, keys, and outputs (= values). ``e3nn.o3.Irreps`` or str.
        irreps_sh: irreps of the edge spherical harmonics, e.g.
            ``o3.Irreps.spherical_harmonics(3)``.
        number_of_basis: number of radial basis functions.
        max_radius: cutoff radius of the graph, the basis and the smooth cutoff.
        radial_hidden: width of the hidden layer of the radial MLPs.

    Float64: build the module under ``torch.set_default_dtype(torch.float64)`` (or
    ``se3tutor.checks.default_dtype``); e3nn computes its Clebsch-Gordan constants in the
    default dtype, so ``.double()`` afterwards keeps float32-accurate constants.

    Submodules: ``h_q`` (``o3.Linear``), ``tp_k``/``tp_v`` (``FullyConnectedTensorProduct``,
    ``shared_weights=False``), ``fc_k``/``fc_v`` (``[number_of_basis, radial_hidden,
    weight_numel]`` MLPs with SiLU), ``dot`` (``FullyConnectedTensorProduct`` into ``0e``).

    Shapes: ``f [num_nodes, irreps_in.dim]``, ``pos [num_nodes, 3]``,
    ``edge_index [2, num_edges]`` (default: ``radius_graph(pos, max_radius, batch)``),
    ``batch [num_nodes]`` -> ``[num_nodes, irreps_out.dim]``.

    >>> att = EquivariantAttention("4x0e + 2x1o", "3x0e + 1x1o", "3x0e + 1x1o", "2x0e + 1x1o",
    ...                            "0e + 1o", number_of_basis=5, max_radius=1.5)
    >>> att(att.irreps_in.randn(6, -1), torch.randn(6, 3)).shape
    torch.Size([6, 5])
    """

    def __init__(
        self,
        irreps_in,
        irreps_query,
        irreps_key,
        irreps_out,
        irreps_sh,
        number_of_basis: int,
        max_radius: float,
        radial_hidden: int = 16,
    ) -> None:
        super().__init__()
        self.irreps_in = o3.Irreps(irreps_in)
        self.irreps_query = o3.Irreps(irreps_query)
        self.irreps_key = o3.Irreps(irreps_key)
        self.irreps_out = o3.Irreps(irreps_out)
        self.irreps_sh = o3.Irreps(irreps_sh)
        self.number_of_basis = number_of_basis
        self.max_radius = max_radius
        silu = torch.nn.functional.silu

        self.h_q = o3.Linear(self.irreps_in, self.irreps_query)
        self.tp_k = o3.FullyConnectedTensorProduct(
            self.irreps_in, self.irreps_sh, self.irreps_key, shared_weights=False
        )
        self.fc_k = radial_mlp(number_of_basis, radial_hidden, self.tp_k.weight_numel, silu)
        self.tp_v = o3.FullyConnectedTensorProduct(
            self.irreps_in, self.irreps_sh, self.irreps_out, shared_weights=False
        )
        self.fc_v = radial_mlp(number_of_basis, radial_hidden, self.tp_v.weight_numel, silu)
        self.dot = o3.FullyConnectedTensorProduct(self.irreps_query, self.irreps_key, "0e")

    def edge_embedding(self, edge_length: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r"""The smooth design (book: Smoothness): the radial basis (``cutoff=True``) vanishes
        at 0 and at ``max_radius`` with all its derivatives, and so do the radial MLPs (no
        biases); the softmax weight :math:`c(r)` does too. Returns the embedding and
        :math:`\log c(r)` (``-inf`` beyond the cutoff), the form the softmax takes so that tiny
        weights near the cutoff do not underflow.

        Shapes: ``[num_edges] -> ([num_edges, number_of_basis], [num_edges])``.
        """
        edge_length_embedded = embed_edge_length(
            edge_length, self.max_radius, self.number_of_basis, cutoff=True
        )
        return edge_length_embedded, log_smooth_cutoff(edge_length, self.max_radius)

    def edge_terms(self, f: torch.Tensor, pos: torch.Tensor, edge_index: torch.Tensor):
        r"""What the softmax and the sum read, per edge: the logits :math:`q_i \cdot k_{ij}`
        ``[num_edges, 1]``, :math:`\log c(r_{ij})` ``[num_edges]`` and the values
        :math:`v_{ij}` ``[num_edges, irreps_out.dim]`` (for a caller that weights them otherwise,
        e.g. by :math:`\alpha` to compare with :math:`\sqrt\alpha`)."""
        edge_src, edge_dst = edge_index
        edge_vec = edge_vectors(pos, edge_index)
        edge_length_embedded, edge_log_weight = self.edge_embedding(edge_vec.norm(dim=1))
        edge_sh = o3.spherical_harmonics(
            self.irreps_sh, edge_vec, normalize=True, normalization="component"
        )
        q = self.h_q(f)  # [num_nodes, irreps_query.dim]
        k = self.tp_k(f[edge_src], edge_sh, self.fc_k(edge_length_embedded))  # [num_edges, key]
        v = self.tp_v(f[edge_src], edge_sh, self.fc_v(edge_length_embedded))  # [num_edges, out]
        return self.dot(q[edge_dst], k), edge_log_weight, v

    def forward(
        self,
        f: torch.Tensor,
        pos: torch.Tensor,
        edge_index: Optional[torch.Tensor] = None,
        batch: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        check_graph_inputs(self, self.irreps_in, f, pos, edge_index, batch)
        if edge_index is None:
            edge_index = radius_graph(pos, self.max_radius, batch=batch)
        edge_dst = edge_index[1]
        logits, edge_log_weight, v = self.edge_terms(f, pos, edge_index)
        alpha = segment_softmax(logits, edge_dst, f.shape[0], log_weight=edge_log_weight)
        # sqrt(alpha): the alphas of a centre sum to 1, so sum_j (sqrt(alpha_ij))^2 = 1 and the
        # output keeps the second moment of uncorrelated zero-mean values (book: Attention; n
        # equal values under uniform attention give sqrt(n) times the value). alpha is 0 where
        # c(r) underflows; there sqrt's slope is infinite, so it is evaluated flat at 0 (with
        # relu().sqrt() the first derivative is 0 but the second, for a force loss, is NaN).
        return scatter(sqrt_flat_at_zero(alpha) * v, edge_dst, dim=0, dim_size=f.shape[0])
