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

import math
import warnings
from collections.abc import Sequence
from typing import Callable, Optional

import torch
from e3nn import o3

from se3tutor.graph import check_graph_inputs, radius_graph
from se3tutor.multihead import (  # the attention sublayer and its edge data
    EdgeGeometry,
    KeysValues,
    MultiHeadAttention,
    edge_geometry,
)
from se3tutor.norm import EquivariantLayerNorm, gated_nonlinearity
from se3tutor.periodic import (
    cell_offsets,
    check_periodic_inputs,
    num_graphs_of,
    periodic_radius_graph,
)

__all__ = [
    "EdgeGeometry",
    "FeedForward",
    "KeysValues",
    "MultiHeadAttention",
    "SE3Transformer",
    "TransformerBlock",
    "edge_geometry",
    "hidden_irreps",
    "node_layer_norm",
]


def hidden_irreps(multiplicity: int, lmax: int, symmetry: str = "E3") -> o3.Irreps:
    r"""Irreps with ``multiplicity`` channels of every degree up to ``lmax``.

    ``symmetry="E3"``: the natural parity of each degree (``0e + 1o + 2e + ...``), the
    features of a model equivariant to rotations and inversion. ``"SE3"``: both parities of
    every degree. A tensor product only keeps parity-allowed paths, so with natural parities
    alone the cross product ``1o x 1o -> 1e`` has nowhere to go; with both it does, and every
    path of the SE(3)-Transformer's kernels (whose features have no parity) with a harmonic
    of degree at most ``irreps_sh``'s has a place (that model's kernels go up to ``2 lmax``;
    the same paths are not the same layer: book, The original SE(3)-Transformer layer).

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


def _irreps(name: str, value) -> o3.Irreps:
    """``o3.Irreps(value)``, or a ``ValueError`` that names the argument (e3nn's own names
    none: ``"8x0e + 4x1q"`` gets "Invalid irreps_str")."""
    try:
        return o3.Irreps(value)
    except (ValueError, AssertionError, TypeError) as error:
        raise ValueError(f"{name}={value!r} are not irreps ({error})") from None


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


def node_layer_norm(irreps) -> EquivariantLayerNorm:
    """The model's norm: :class:`se3tutor.norm.EquivariantLayerNorm` with ``scope="node"``."""
    return EquivariantLayerNorm(irreps, scope="node")


class TransformerBlock(torch.nn.Module):
    r"""One layer: :math:`f \leftarrow f + A(N_1 f)`, then :math:`f \leftarrow f + F(N_2 f)`.

    Pre-norm residual: each sublayer sees features of second moment 1, and the residual
    stream grows at most linearly with depth (book: Normalization). The norms act per node
    (``scope="node"``), which keeps the model smooth where a neighbour enters the cutoff
    sphere (see :class:`se3tutor.norm.EquivariantLayerNorm`); ``norm`` makes another one
    from the irreps.
    """

    def __init__(
        self,
        irreps_node,
        attention: MultiHeadAttention,
        feed_forward: FeedForward,
        norm: Callable[..., torch.nn.Module] = node_layer_norm,
    ):
        super().__init__()
        self.norm_attention = norm(irreps_node)
        self.attention = attention
        self.norm_feed_forward = norm(irreps_node)
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
        number_of_basis, radial_hidden: radial embedding size and radial MLP width (32 by
            default: the chapters' single layers keep the 16 of e3nn's guides, which they
            reproduce exactly; this model has no such reference).
        max_num_neighbors: keep only the nearest ones per node (``radius_graph``'s cap);
            ``None`` keeps all within ``max_radius``.
        edge_attr_dim: width of the optional invariant edge features ``edge_attr``, which
            enter the radial MLPs.
        attend_self: each node also attends to itself.
        irreps_feed_forward: the feed-forward block's inner irreps; default twice the hidden
            multiplicities.
        attention: the attention class (or a factory with its arguments); the front end
            :mod:`se3tutor.dense` passes combinations of its variants.
        norm: makes every norm of the model from its irreps (default
            :func:`node_layer_norm`).
        stem: factories of layers ``layer(f, edges) -> f`` run between the embedding and the
            blocks, each called as ``factory(irreps_hidden, irreps_sh, number_of_basis +
            edge_attr_dim, radial_hidden)`` (e.g.
            :class:`se3tutor.dense.variants.ConvolutionBlock`).

    Float64: build under ``se3tutor.checks.default_dtype(torch.float64)`` (e3nn computes its
    constants in the default dtype).

    ``forward`` is :meth:`edges` (the graph and its geometry) then :meth:`propagate` (the
    layers); a caller with more to say about the edges (the front end :mod:`se3tutor.dense`)
    calls the two itself.

    Shapes: ``f [num_nodes, irreps_in.dim]``, ``pos [num_nodes, 3]``, ``batch [num_nodes]``
    (PyTorch Geometric convention: the graph of each node), ``edge_index [2, num_edges]``
    (default: ``radius_graph(pos, max_radius, batch)``), ``edge_attr [num_edges,
    edge_attr_dim]`` -> ``[num_nodes, irreps_out.dim]``.

    Crystals (keyword-only): ``cell [3, 3]`` or ``[num_graphs, 3, 3]`` (rows the cell
    vectors), ``pbc`` (default: periodic along all three) and, with your own ``edge_index``,
    ``edge_cell_shift [num_edges, 3]``; the default graph is then
    :func:`se3tutor.periodic.periodic_radius_graph` and every edge vector includes its image.

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
        attention: Callable[..., MultiHeadAttention] = MultiHeadAttention,
        norm: Callable[..., torch.nn.Module] = node_layer_norm,
        stem: Sequence[Callable[..., torch.nn.Module]] = (),
    ) -> None:
        super().__init__()
        if not max_radius > 0 or num_layers < 0 or num_heads < 1:
            raise ValueError(
                f"need max_radius > 0, num_layers >= 0, num_heads >= 1; got {max_radius}, "
                f"{num_layers}, {num_heads}"
            )
        self.irreps_in = _irreps("irreps_in", irreps_in)
        self.irreps_hidden = _irreps("irreps_hidden", irreps_hidden).simplify()
        self.irreps_out = _irreps("irreps_out", irreps_out)
        lmax = max(ir.l for _, ir in self.irreps_hidden)
        self.irreps_sh = _irreps("irreps_sh", irreps_sh or o3.Irreps.spherical_harmonics(lmax))
        if irreps_head is None:
            irreps_head = [(math.ceil(mul / num_heads), ir) for mul, ir in self.irreps_hidden]
        if irreps_feed_forward is None:
            irreps_feed_forward = [(2 * mul, ir) for mul, ir in self.irreps_hidden]
        self.max_radius = max_radius
        self.number_of_basis = number_of_basis
        self.max_num_neighbors = max_num_neighbors
        self.edge_attr_dim = edge_attr_dim

        self.embed = o3.Linear(self.irreps_in, self.irreps_hidden)
        self.stem = torch.nn.ModuleList(
            layer(
                self.irreps_hidden, self.irreps_sh, number_of_basis + edge_attr_dim, radial_hidden
            )
            for layer in stem
        )
        self.blocks = torch.nn.ModuleList(
            TransformerBlock(
                self.irreps_hidden,
                attention(
                    self.irreps_hidden,
                    irreps_head,
                    num_heads,
                    self.irreps_sh,
                    number_of_basis + edge_attr_dim,
                    radial_hidden,
                    attend_self,
                ),
                FeedForward(self.irreps_hidden, irreps_feed_forward),
                norm,
            )
            for _ in range(num_layers)
        )
        self.norm_out = norm(self.irreps_hidden)
        self.readout = o3.Linear(self.irreps_hidden, self.irreps_out)
        ignored = sorted({ir for _, ir in self.irreps_in} - {ir for _, ir in self.irreps_hidden})
        if ignored:
            warnings.warn(
                f"irreps_in has {' + '.join(map(str, ignored))}, which irreps_hidden "
                f"({self.irreps_hidden}) lacks: the embedding maps those inputs to 0, so the "
                "model ignores them (for both parities use hidden_irreps(..., 'SE3'))",
                stacklevel=2,
            )
        unreachable = sorted(
            {ir for _, ir in self.irreps_out} - {ir for _, ir in self.irreps_hidden}
        )
        if unreachable:
            warnings.warn(
                f"irreps_out has {' + '.join(map(str, unreachable))}, which irreps_hidden "
                f"({self.irreps_hidden}) lacks: those outputs are always 0 (for both parities "
                "use hidden_irreps(..., 'SE3'))",
                stacklevel=2,
            )

    def forward(
        self,
        f: torch.Tensor,
        pos: torch.Tensor,
        batch: Optional[torch.Tensor] = None,
        edge_index: Optional[torch.Tensor] = None,
        edge_attr: Optional[torch.Tensor] = None,
        *,
        cell: Optional[torch.Tensor] = None,
        pbc=None,
        edge_cell_shift: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        self.check_inputs(f, pos, batch, edge_index, edge_attr, cell, pbc, edge_cell_shift)
        # The crystal's keywords only for a crystal: a subclass whose edges() predates them
        # (the chapters write some) still runs on open structures.
        crystal = {} if cell is None else dict(cell=cell, pbc=pbc, edge_cell_shift=edge_cell_shift)
        return self.propagate(f, self.edges(pos, batch, edge_index, edge_attr, **crystal))

    # The graph and its geometry stay eager under torch.compile: they read e3nn's Irreps, which
    # dynamo cannot guard on (its __len__ raises on purpose); the layers (propagate) compile.
    @torch.compiler.disable
    def edges(
        self,
        pos: torch.Tensor,
        batch: Optional[torch.Tensor] = None,
        edge_index: Optional[torch.Tensor] = None,
        edge_attr: Optional[torch.Tensor] = None,
        cell: Optional[torch.Tensor] = None,
        pbc=None,
        edge_cell_shift: Optional[torch.Tensor] = None,
    ) -> EdgeGeometry:
        """The graph (``edge_index``, default: the radius graph, or the periodic one when a
        ``cell`` is given) and its geometry, which every layer reads
        (:func:`se3tutor.multihead.edge_geometry`)."""
        edge_offset = None
        if cell is not None:
            if edge_index is None:
                edge_index, edge_cell_shift = periodic_radius_graph(
                    pos,
                    self.max_radius,
                    cell,
                    pbc,
                    batch,
                    num_graphs=num_graphs_of(cell, batch),
                    max_num_neighbors=self.max_num_neighbors,
                )
            edge_offset = cell_offsets(edge_cell_shift, cell, edge_index[1], batch)
        elif edge_index is None:
            edge_index = radius_graph(
                pos, self.max_radius, batch=batch, max_num_neighbors=self.max_num_neighbors
            )
        return edge_geometry(
            pos,
            edge_index,
            self.irreps_sh,
            self.max_radius,
            self.number_of_basis,
            edge_attr,
            edge_offset,
        )

    def propagate(self, f: torch.Tensor, edges: EdgeGeometry) -> torch.Tensor:
        """Embedding, stem, blocks, final norm and readout over the given edges."""
        f = self.embed(f)
        for layer in self.stem:
            f = layer(f, edges)
        f = self.trunk(f, edges)
        return self.readout(self.norm_out(f))

    def trunk(self, f: torch.Tensor, edges: EdgeGeometry) -> torch.Tensor:
        """The blocks, one after the other."""
        for block in self.blocks:
            f = block(f, edges)
        return f

    @torch.compiler.disable  # validation, eager: see edges
    def check_inputs(
        self,
        f,
        pos,
        batch=None,
        edge_index=None,
        edge_attr=None,
        cell=None,
        pbc=None,
        edge_cell_shift=None,
    ) -> None:
        """Raise ``ValueError`` (shapes) or ``TypeError`` (dtype, device) naming the argument."""
        check_graph_inputs(self, self.irreps_in, f, pos, edge_index, batch)
        check_periodic_inputs(pos, batch, edge_index, cell, pbc, edge_cell_shift)
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
