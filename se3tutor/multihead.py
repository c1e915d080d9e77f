r"""Multi-head equivariant attention on a graph, and the edge data it reads
(book: The SE(3)-Transformer).

:func:`edge_geometry` computes once per forward pass what every layer needs about the edges
(:class:`EdgeGeometry`); :class:`MultiHeadAttention` is one attention sublayer of
:class:`se3tutor.SE3Transformer`. The front end for se3-transformer-pytorch users builds
variants of it (tied, linear or one-headed keys, null and global keys, rotary keys) that
override its steps, in :mod:`se3tutor.dense`.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from e3nn import o3

from se3tutor.graph import edge_vectors, scatter, segment_softmax
from se3tutor.radial import embed_edge_length, log_smooth_cutoff, radial_mlp
from se3tutor.tensor_product import DepthwiseTensorProduct

__all__ = [
    "EdgeGeometry",
    "KeysValues",
    "MultiHeadAttention",
    "edge_geometry",
    "sqrt_flat_at_zero",
]


class EdgeGeometry(NamedTuple):
    """What every layer needs to know about the edges, computed once per forward pass."""

    edge_src: torch.Tensor  # [num_edges] sending node j
    edge_dst: torch.Tensor  # [num_edges] receiving node i
    edge_sh: torch.Tensor  # [num_edges, irreps_sh.dim] Y(x_ij / |x_ij|), component norm
    edge_scalars: torch.Tensor  # [num_edges, number_of_basis + edge_attr_dim] radial MLP input
    edge_log_weight: torch.Tensor  # [num_edges] log c(r_ij) of the smooth cutoff


def edge_geometry(
    pos: torch.Tensor,
    edge_index: torch.Tensor,
    irreps_sh,
    max_radius: float,
    number_of_basis: int,
    edge_attr: Optional[torch.Tensor] = None,
    edge_offset: Optional[torch.Tensor] = None,
) -> EdgeGeometry:
    r"""Spherical harmonics, radial MLP input and smooth cutoff of every edge.

    The radial MLP input is :math:`[\sqrt{B}\,\mathrm{basis}(r),\ c(r)\, a_{ij}]`: the
    embedding of the Attention chapter and the edge features :math:`a_{ij}` times the smooth
    cutoff, so that the whole input, and with it every tensor-product weight, vanishes
    smoothly at the cutoff (book: Smoothness). The cutoff itself is kept as
    :math:`\log c(r)`, the form the softmax takes: :math:`c(r)` underflows near the cutoff.

    In a crystal, ``edge_offset`` is what each edge's periodic image adds to the edge vector,
    ``edge_cell_shift @ cell`` (:func:`se3tutor.periodic.cell_offsets`).

    Shapes: ``pos [num_nodes, 3]``, ``edge_index [2, num_edges]``,
    ``edge_attr [num_edges, edge_attr_dim]``, ``edge_offset [num_edges, 3]``.
    """
    edge_src, edge_dst = edge_index
    edge_vec = edge_vectors(pos, edge_index)
    if edge_offset is not None:
        edge_vec = edge_vec + edge_offset
    edge_length = edge_vec.norm(dim=1)
    edge_sh = o3.spherical_harmonics(irreps_sh, edge_vec, normalize=True, normalization="component")
    edge_log_weight = log_smooth_cutoff(edge_length, max_radius)
    edge_scalars = embed_edge_length(edge_length, max_radius, number_of_basis, cutoff=True)
    if edge_attr is not None:
        edge_weight = edge_log_weight.exp()[:, None]  # c(r)
        edge_scalars = torch.cat([edge_scalars, edge_attr * edge_weight], dim=1)
    return EdgeGeometry(edge_src, edge_dst, edge_sh, edge_scalars, edge_log_weight)


class KeysValues(NamedTuple):
    """What the nodes attend to: one key and value per row, and the node that sees it."""

    key: torch.Tensor  # [num_keys, irreps_kv.dim]
    value: torch.Tensor  # [num_keys, irreps_kv.dim]
    dst: torch.Tensor  # [num_keys] the node that attends to this key
    log_weight: torch.Tensor  # [num_keys] added to q . k in the softmax: log c(r) for edges

    def __add__(self, other: KeysValues) -> KeysValues:
        """Both sets of keys, one after the other."""
        return KeysValues(*(torch.cat([a, b]) for a, b in zip(self, other)))


def _heads_side_by_side(irreps_head: o3.Irreps, num_heads: int) -> o3.Irreps:
    return o3.Irreps([(num_heads * mul, ir) for mul, ir in irreps_head])


def sqrt_flat_at_zero(alpha: torch.Tensor) -> torch.Tensor:
    """``sqrt(alpha)`` for ``alpha > 0`` and 0 elsewhere, whose autograd derivatives at
    ``alpha == 0`` are all 0 (book: Attention, *Gradients at the awkward distances*).

    The square root itself is not flat at 0: its slope ``1 / (2 sqrt(alpha))`` grows without
    bound as ``alpha -> 0+``. What is flat is the attention weight near the cutoff,
    ``sqrt(c(r)) = u(2 x)``, a smooth step like ``c`` itself. In floating point ``c``
    underflows, so ``alpha`` is exactly 0 on a thin shell just inside the cutoff, and the
    derivatives there must be 0, the limit of the true ones. This function returns the
    constant 0 where ``alpha <= 0`` and evaluates the root on a harmless input (1) there, so
    autograd differentiates a constant branch: every derivative it computes at ``alpha == 0``
    is 0. ``alpha.relu().sqrt()`` gets the first derivative right (relu's mask), but a force
    loss differentiates twice, and its mixed second derivative with respect to ``alpha`` and
    the value it multiplies is ``0 * inf = nan``.
    """
    positive = alpha > 0
    return torch.where(positive, torch.where(positive, alpha, torch.ones_like(alpha)).sqrt(), 0.0)


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

    The steps are methods, so that a variant (:mod:`se3tutor.dense.variants`) replaces one of them:
    :meth:`edge_keys_values` (keys and values of the edges), :meth:`keys_values` (all that the
    nodes attend to), :meth:`expand_heads` (key/value layout -> one slice per query head).

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
        self.irreps_heads = _heads_side_by_side(self.irreps_head, num_heads)
        # Keys and values: one slice per head here; a variant may share them between heads.
        self.irreps_kv = _heads_side_by_side(self.irreps_head, self.key_value_heads())

        self.h_q = o3.Linear(self.irreps_node, self.irreps_heads)
        self.tp = DepthwiseTensorProduct(self.irreps_node, irreps_sh, irreps_head)
        self.fc = radial_mlp(
            number_of_edge_scalars, radial_hidden, self.tp.weight_numel, torch.nn.functional.silu
        )
        self.irreps_messages = self.tp.irreps_out.simplify()
        self.h_k = o3.Linear(self.irreps_messages, self.irreps_kv)
        self.h_v = o3.Linear(self.irreps_messages, self.irreps_kv)
        if attend_self:
            self.h_k_self = o3.Linear(self.irreps_node, self.irreps_kv)
            self.h_v_self = o3.Linear(self.irreps_node, self.irreps_kv)
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

    def key_value_heads(self) -> int:
        """How many heads of keys and values there are (one per query head)."""
        return self.num_heads

    def forward(self, f: torch.Tensor, edges: EdgeGeometry) -> torch.Tensor:
        num_nodes = f.shape[0]
        q = self.h_q(f)  # [num_nodes, heads * d]
        kv = self.keys_values(f, edges)
        k, v = self.expand_heads(kv.key), self.expand_heads(kv.value)  # [num_keys, heads * d]
        logits = (q[kv.dst] * k) @ self.head_sum  # [num_keys, heads]
        alpha = segment_softmax(logits, kv.dst, num_nodes, log_weight=kv.log_weight)
        # sqrt(alpha) keeps the second moment of uncorrelated zero-mean values (book: Attention).
        weighted = sqrt_flat_at_zero(alpha)[:, self.head_of] * v
        return self.h_o(scatter(weighted, kv.dst, dim=0, dim_size=num_nodes))

    def messages(self, f: torch.Tensor, edges: EdgeGeometry) -> torch.Tensor:
        """:math:`m_{ij}`: ``[num_edges, irreps_messages.dim]``."""
        return self.tp(f[edges.edge_src], edges.edge_sh, self.fc(edges.edge_scalars))

    def edge_keys_values(self, f: torch.Tensor, edges: EdgeGeometry):
        """:math:`(W_K m_{ij}, W_V m_{ij})`, each ``[num_edges, irreps_kv.dim]``."""
        messages = self.messages(f, edges)
        return self.h_k(messages), self.h_v(messages)

    def keys_values(self, f: torch.Tensor, edges: EdgeGeometry) -> KeysValues:
        """The edges' keys and values (weighted by the cutoff), then each node's own."""
        kv = KeysValues(*self.edge_keys_values(f, edges), edges.edge_dst, edges.edge_log_weight)
        if self.attend_self:
            nodes = torch.arange(f.shape[0], device=f.device)
            kv = kv + KeysValues(self.h_k_self(f), self.h_v_self(f), nodes, f.new_zeros(len(f)))
        return kv

    def expand_heads(self, x: torch.Tensor) -> torch.Tensor:
        """``[num_keys, irreps_kv.dim] -> [num_keys, irreps_heads.dim]`` (the same here)."""
        return x
