r"""The SE(3)-Transformer: multi-head equivariant attention, stacked (book: The SE(3)-Transformer).

Each layer is a pre-norm residual block, as in the Normalization chapter:

.. math:: f \leftarrow f + \mathrm{Attention}(\mathrm{Norm}(f)), \qquad
          f \leftarrow f + \mathrm{FeedForward}(\mathrm{Norm}(f))

- Attention (:class:`MultiHeadAttention`): head :math:`h` of node :math:`i` attends to its
  neighbours :math:`j` with
  :math:`\alpha^h_{ij} \propto c(r_{ij}) \exp(q^h_i \cdot k^h_{ij} / \sqrt{d})` and returns
  :math:`\sum_j \sqrt{\alpha^h_{ij}}\, v^h_{ij}`, as in the Attention chapter. Keys and values
  come from one tensor product of the neighbour's features with the edge's spherical
  harmonics, weighted per edge by an MLP of the smoothly embedded edge length (and of the
  edge features, if any), followed by a linear map to all heads' keys and values.
- FeedForward (:class:`FeedForward`): linear, gated nonlinearity, linear, per node.
- Norm: :class:`se3tutor.norm.EquivariantLayerNorm`.

Every operation acts on irreps through rotation-invariant weights, so the model is
equivariant to rotations, inversion (for the parities of its irreps) and translations, and
invariant to the order of the nodes.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from e3nn import o3

from se3tutor.graph import (
    check_graph_inputs,
    edge_vectors,
    radius_graph,
    scatter,
    segment_softmax,
)
from se3tutor.norm import EquivariantLayerNorm, gated_nonlinearity
from se3tutor.radial import embed_edge_length, radial_mlp, smooth_cutoff

__all__ = [
    "EdgeGeometry",
    "FeedForward",
    "MultiHeadAttention",
    "SE3Transformer",
    "TransformerBlock",
    "edge_geometry",
    "hidden_irreps",
]


def hidden_irreps(multiplicity: int, lmax: int, symmetry: str = "E3") -> o3.Irreps:
    r"""Irreps with ``multiplicity`` channels of every degree up to ``lmax``.

    ``symmetry="E3"``: the natural parity of each degree (``0e + 1o + 2e + ...``), the
    features of a model equivariant to rotations and inversion. ``"SE3"``: both parities of
    every degree. A tensor product only keeps parity-allowed paths, so with natural parities
    alone the cross product ``1o x 1o -> 1e`` has nowhere to go; with both it does, and the
    model is as expressive as the SE(3)-Transformer, whose features have no parity.

    >>> hidden_irreps(8, 2), hidden_irreps(8, 1, "SE3")
    (8x0e+8x1o+8x2e, 8x0e+8x0o+8x1o+8x1e)
    """
    if symmetry == "E3":
        parities = lambda l: [(-1) ** l]  # noqa: E731
    elif symmetry == "SE3":
        parities = lambda l: [(-1) ** l, -((-1) ** l)]  # noqa: E731
    else:
        raise ValueError(f'symmetry must be "E3" or "SE3", got {symmetry!r}')
    return o3.Irreps([(multiplicity, (l, p)) for l in range(lmax + 1) for p in parities(l)])


class EdgeGeometry(NamedTuple):
    """What every layer needs to know about the edges, computed once per forward pass."""

    edge_src: torch.Tensor  # [num_edges] sending node j
    edge_dst: torch.Tensor  # [num_edges] receiving node i
    edge_sh: torch.Tensor  # [num_edges, irreps_sh.dim] Y(x_ij / |x_ij|), component norm
    edge_scalars: torch.Tensor  # [num_edges, number_of_basis + edge_attr_dim] radial MLP input
    edge_weight: torch.Tensor  # [num_edges] smooth cutoff c(r_ij)


def edge_geometry(
    pos: torch.Tensor,
    edge_index: torch.Tensor,
    irreps_sh,
    max_radius: float,
    number_of_basis: int,
    edge_attr: Optional[torch.Tensor] = None,
) -> EdgeGeometry:
    r"""Spherical harmonics, radial MLP input and smooth cutoff of every edge.

    The radial MLP input is :math:`[\sqrt{B}\,\mathrm{basis}(r),\ c(r)\, a_{ij}]`: the
    embedding of the Attention chapter and the edge features :math:`a_{ij}` times the smooth
    cutoff, so that the whole input, and with it every tensor-product weight, vanishes
    smoothly at the cutoff (book: Smoothness).

    Shapes: ``pos [num_nodes, 3]``, ``edge_index [2, num_edges]``,
    ``edge_attr [num_edges, edge_attr_dim]``.
    """
    edge_src, edge_dst = edge_index
    edge_vec = edge_vectors(pos, edge_index)
    edge_length = edge_vec.norm(dim=1)
    edge_sh = o3.spherical_harmonics(irreps_sh, edge_vec, normalize=True, normalization="component")
    edge_weight = smooth_cutoff(edge_length, max_radius)
    edge_scalars = embed_edge_length(edge_length, max_radius, number_of_basis, cutoff=True)
    if edge_attr is not None:
        edge_scalars = torch.cat([edge_scalars, edge_attr * edge_weight[:, None]], dim=1)
    return EdgeGeometry(edge_src, edge_dst, edge_sh, edge_scalars, edge_weight)


def _depthwise_tensor_product(irreps_node, irreps_sh, irreps_targets) -> o3.TensorProduct:
    """``f_j (x) Y`` channel by channel ("uvu"): every channel u of every irrep of ``f_j`` times
    every harmonic, kept where the product's irrep appears in ``irreps_targets``; one weight
    per (channel, path) and edge. Far fewer per-edge weights than a fully connected product,
    whose (channel in, channel out) weights per edge are what make large graphs run out of
    memory; the channels are mixed afterwards by a linear map shared by all edges.
    """
    wanted = {ir for _, ir in o3.Irreps(irreps_targets)}
    paths = [
        (ir_out, i_in, i_sh, mul)
        for i_in, (mul, ir_in) in enumerate(irreps_node)
        for i_sh, (_, ir_sh) in enumerate(irreps_sh)
        for ir_out in ir_in * ir_sh
        if ir_out in wanted
    ]
    # Outputs of equal irreps side by side: their concatenation is one block of
    # ``irreps_out.simplify()``, and a linear map on few large blocks is much faster.
    paths.sort(key=lambda path: path[0])
    irreps_mid = [(mul, ir_out) for ir_out, _, _, mul in paths]
    instructions = [(i_in, i_sh, k, "uvu", True) for k, (_, i_in, i_sh, _) in enumerate(paths)]
    return o3.TensorProduct(
        irreps_node,
        irreps_sh,
        o3.Irreps(irreps_mid),
        instructions,
        shared_weights=False,
        internal_weights=False,
    )


class MultiHeadAttention(torch.nn.Module):
    r"""Multi-head equivariant graph attention (book: The SE(3)-Transformer).

    .. math:: f'_i = W_O \bigoplus_h \sum_{j} \sqrt{\alpha^h_{ij}}\, v^h_{ij}, \qquad
              \alpha^h_{ij} = \frac{c(r_{ij})\, e^{q^h_i \cdot k^h_{ij} / \sqrt{d}}}
                                   {\sum_{j'} c(r_{ij'})\, e^{q^h_i \cdot k^h_{ij'} / \sqrt{d}}}

    with :math:`q_i = W_Q f_i`, :math:`k_{ij} = W_K m_{ij}`, :math:`v_{ij} = W_V m_{ij}`,
    messages :math:`m_{ij} = f_j \otimes_{w(r_{ij}, a_{ij})} Y(\hat x_{ij})` and :math:`d` =
    ``irreps_head.dim``. The dot product pairs equal irreps, so it is invariant. With
    ``attend_self`` each node also attends to itself, with key :math:`W_K^{self} f_i`, value
    :math:`W_V^{self} f_i` and weight 1.

    Shapes: ``f [num_nodes, irreps_node.dim]`` -> ``[num_nodes, irreps_node.dim]``.
    """

    def __init__(
        self,
        irreps_node,
        irreps_head,
        num_heads: int,
        irreps_sh,
        number_of_edge_scalars: int,
        radial_hidden: int = 32,
        attend_self: bool = False,
    ) -> None:
        super().__init__()
        self.irreps_node = o3.Irreps(irreps_node)
        self.irreps_head = o3.Irreps(irreps_head).simplify()
        self.num_heads = num_heads
        self.attend_self = attend_self
        # All heads side by side: head h owns the h-th slice of every block.
        self.irreps_heads = o3.Irreps([(num_heads * mul, ir) for mul, ir in self.irreps_head])

        self.h_q = o3.Linear(self.irreps_node, self.irreps_heads)
        self.tp = _depthwise_tensor_product(self.irreps_node, o3.Irreps(irreps_sh), irreps_head)
        self.fc = radial_mlp(
            number_of_edge_scalars, radial_hidden, self.tp.weight_numel, torch.nn.functional.silu
        )
        irreps_messages = self.tp.irreps_out.simplify()
        self.h_k = o3.Linear(irreps_messages, self.irreps_heads)
        self.h_v = o3.Linear(irreps_messages, self.irreps_heads)
        if attend_self:
            self.h_k_self = o3.Linear(self.irreps_node, self.irreps_heads)
            self.h_v_self = o3.Linear(self.irreps_node, self.irreps_heads)
        self.h_o = o3.Linear(self.irreps_heads, self.irreps_node)

        # head_of[c]: the head that owns component c of irreps_heads.
        head_of = [
            torch.arange(num_heads).repeat_interleave(mul * ir.dim) for mul, ir in self.irreps_head
        ]
        head_of = torch.cat(head_of)
        self.register_buffer("head_of", head_of, persistent=False)
        # Summing q * k over a head's components, divided by sqrt(d): a [dim, heads] matrix.
        head_sum = torch.nn.functional.one_hot(head_of, num_heads) / self.irreps_head.dim**0.5
        self.register_buffer("head_sum", head_sum.to(torch.get_default_dtype()), persistent=False)

    def forward(self, f: torch.Tensor, edges: EdgeGeometry) -> torch.Tensor:
        num_nodes = f.shape[0]
        q = self.h_q(f)  # [num_nodes, heads * d]
        messages = self.tp(f[edges.edge_src], edges.edge_sh, self.fc(edges.edge_scalars))
        k, v = self.h_k(messages), self.h_v(messages)  # [num_edges, heads * d]
        edge_dst, edge_weight = edges.edge_dst, edges.edge_weight
        if self.attend_self:
            k = torch.cat([k, self.h_k_self(f)])
            v = torch.cat([v, self.h_v_self(f)])
            edge_dst = torch.cat([edge_dst, torch.arange(num_nodes, device=f.device)])
            edge_weight = torch.cat([edge_weight, torch.ones_like(f[:, 0])])

        logits = (q[edge_dst] * k) @ self.head_sum  # [num_edges, heads]
        alpha = segment_softmax(logits, edge_dst, num_nodes, weight=edge_weight)
        # sqrt(alpha) keeps the second moment of the values (book: Attention); relu stops
        # sqrt's infinite slope at alpha = 0 (edges at the cutoff).
        weighted = alpha.relu().sqrt()[:, self.head_of] * v
        return self.h_o(scatter(weighted, edge_dst, dim=0, dim_size=num_nodes))


class FeedForward(torch.nn.Module):
    r"""Per-node equivariant feed-forward block: :math:`W_2\, \mathrm{Gate}(W_1 f)`.

    The gate (:func:`se3tutor.norm.gated_nonlinearity`) applies SiLU to scalars and scales
    every :math:`l > 0` irrep by a sigmoid of its own scalar, which keeps directions.

    Shapes: ``[num_nodes, irreps_node.dim] -> [num_nodes, irreps_node.dim]``.
    """

    def __init__(self, irreps_node, irreps_inner) -> None:
        super().__init__()
        self.gate = gated_nonlinearity(irreps_inner)
        self.linear_in = o3.Linear(irreps_node, self.gate.irreps_in)
        self.linear_out = o3.Linear(self.gate.irreps_out, irreps_node)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.linear_out(self.gate(self.linear_in(f)))


class TransformerBlock(torch.nn.Module):
    r"""One layer: :math:`f \leftarrow f + A(N_1 f)`, then :math:`f \leftarrow f + F(N_2 f)`.

    Pre-norm residual: each sublayer sees features of second moment 1, and the residual
    stream grows at most linearly with depth (book: Normalization). The norms act per node
    (``scope="node"``), which keeps the model smooth where a neighbour enters the cutoff
    sphere (see :class:`se3tutor.norm.EquivariantLayerNorm`).
    """

    def __init__(self, irreps_node, attention: MultiHeadAttention, feed_forward: FeedForward):
        super().__init__()
        self.norm_attention = EquivariantLayerNorm(irreps_node, scope="node")
        self.attention = attention
        self.norm_feed_forward = EquivariantLayerNorm(irreps_node, scope="node")
        self.feed_forward = feed_forward

    def forward(self, f: torch.Tensor, edges: EdgeGeometry) -> torch.Tensor:
        f = f + self.attention(self.norm_attention(f), edges)
        return f + self.feed_forward(self.norm_feed_forward(f))


class SE3Transformer(torch.nn.Module):
    r"""The SE(3)-Transformer on a batch of point clouds (book: The SE(3)-Transformer).

    .. math:: f^{(0)} = W_{in} f, \quad f^{(t+1)} = \mathrm{Block}_t(f^{(t)}), \quad
              y = W_{out}\, \mathrm{Norm}(f^{(T)})

    Args:
        irreps_in, irreps_hidden, irreps_out: irreps of the input, hidden and output node
            features (``o3.Irreps`` or str). :func:`hidden_irreps` makes hidden irreps for
            E(3) (natural parities) or SE(3) (both parities).
        max_radius: cutoff of the graph and of the smooth edge weights.
        num_layers, num_heads: depth and number of attention heads.
        irreps_head: irreps of one head's queries, keys and values; default: the hidden
            multiplicities divided by ``num_heads`` (at least 1).
        irreps_sh: edge spherical harmonics; default up to the largest degree of the hidden
            irreps.
        number_of_basis, radial_hidden: radial embedding size and radial MLP width.
        max_num_neighbors: keep only the nearest ones per node (``radius_graph``'s cap);
            ``None`` keeps all within ``max_radius``.
        edge_attr_dim: width of the optional invariant edge features ``edge_attr``, which
            enter the radial MLPs.
        attend_self: each node also attends to itself.
        irreps_feed_forward: the feed-forward block's inner irreps; default twice the hidden
            multiplicities.

    Float64: build under ``se3tutor.checks.default_dtype(torch.float64)`` (e3nn computes its
    constants in the default dtype).

    Shapes: ``f [num_nodes, irreps_in.dim]``, ``pos [num_nodes, 3]``, ``batch [num_nodes]``
    (PyTorch Geometric convention: the graph of each node), ``edge_index [2, num_edges]``
    (default: ``radius_graph(pos, max_radius, batch)``), ``edge_attr [num_edges,
    edge_attr_dim]`` -> ``[num_nodes, irreps_out.dim]``.

    >>> model = SE3Transformer("4x0e", hidden_irreps(8, 1), "1x1o", max_radius=2.0,
    ...                        num_layers=2, num_heads=2)
    >>> model(torch.randn(10, 4), torch.randn(10, 3)).shape
    torch.Size([10, 3])
    """

    def __init__(
        self,
        irreps_in,
        irreps_hidden,
        irreps_out,
        *,
        max_radius: float,
        num_layers: int = 2,
        num_heads: int = 4,
        irreps_head=None,
        irreps_sh=None,
        number_of_basis: int = 10,
        radial_hidden: int = 32,
        max_num_neighbors: Optional[int] = None,
        edge_attr_dim: int = 0,
        attend_self: bool = False,
        irreps_feed_forward=None,
    ) -> None:
        super().__init__()
        if not max_radius > 0 or num_layers < 0 or num_heads < 1:
            raise ValueError(
                f"need max_radius > 0, num_layers >= 0, num_heads >= 1; got {max_radius}, "
                f"{num_layers}, {num_heads}"
            )
        self.irreps_in = o3.Irreps(irreps_in)
        self.irreps_hidden = o3.Irreps(irreps_hidden).simplify()
        self.irreps_out = o3.Irreps(irreps_out)
        lmax = max(ir.l for _, ir in self.irreps_hidden)
        self.irreps_sh = o3.Irreps(irreps_sh or o3.Irreps.spherical_harmonics(lmax))
        if irreps_head is None:
            irreps_head = [(-(-mul // num_heads), ir) for mul, ir in self.irreps_hidden]
        if irreps_feed_forward is None:
            irreps_feed_forward = [(2 * mul, ir) for mul, ir in self.irreps_hidden]
        self.max_radius = max_radius
        self.number_of_basis = number_of_basis
        self.max_num_neighbors = max_num_neighbors
        self.edge_attr_dim = edge_attr_dim

        self.embed = o3.Linear(self.irreps_in, self.irreps_hidden)
        self.blocks = torch.nn.ModuleList(
            TransformerBlock(
                self.irreps_hidden,
                MultiHeadAttention(
                    self.irreps_hidden,
                    irreps_head,
                    num_heads,
                    self.irreps_sh,
                    number_of_basis + edge_attr_dim,
                    radial_hidden,
                    attend_self,
                ),
                FeedForward(self.irreps_hidden, irreps_feed_forward),
            )
            for _ in range(num_layers)
        )
        self.norm_out = EquivariantLayerNorm(self.irreps_hidden, scope="node")
        self.readout = o3.Linear(self.irreps_hidden, self.irreps_out)

    def forward(
        self,
        f: torch.Tensor,
        pos: torch.Tensor,
        batch: Optional[torch.Tensor] = None,
        edge_index: Optional[torch.Tensor] = None,
        edge_attr: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        check_graph_inputs(self, self.irreps_in, f, pos, edge_index, batch)
        self._check_edge_attr(edge_attr, edge_index, f)
        if edge_index is None:
            edge_index = radius_graph(
                pos, self.max_radius, batch=batch, max_num_neighbors=self.max_num_neighbors
            )
        edges = edge_geometry(
            pos, edge_index, self.irreps_sh, self.max_radius, self.number_of_basis, edge_attr
        )
        f = self.embed(f)
        for block in self.blocks:
            f = block(f, edges)
        return self.readout(self.norm_out(f))

    def _check_edge_attr(self, edge_attr, edge_index, f) -> None:
        if self.edge_attr_dim == 0:
            if edge_attr is not None:
                raise ValueError("edge_attr given, but the model was built with edge_attr_dim=0")
            return
        if edge_attr is None:
            raise ValueError(
                f"the model was built with edge_attr_dim={self.edge_attr_dim}: pass edge_attr"
            )
        if edge_index is None:
            raise ValueError("edge_attr needs the edge_index its rows belong to")
        expected = (edge_index.shape[1], self.edge_attr_dim)
        if edge_attr.shape != expected:
            raise ValueError(
                f"edge_attr must have shape [num_edges, edge_attr_dim] = {list(expected)}, "
                f"got {tuple(edge_attr.shape)}"
            )
        if edge_attr.dtype != f.dtype or edge_attr.device != f.device:
            raise TypeError(f"edge_attr must be {f.dtype} on {f.device}")
