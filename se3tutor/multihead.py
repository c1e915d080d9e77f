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

import e3nn.nn
import torch
import torch.utils.checkpoint
from e3nn import o3

from se3tutor.graph import edge_vectors, scatter, segment_softmax
from se3tutor.radial import embed_edge_length, log_smooth_cutoff, radial_mlp
from se3tutor.tensor_product import DepthwiseTensorProduct

__all__ = [
    "CHUNK_MB",
    "EdgeGeometry",
    "IncomingEdges",
    "KeysValues",
    "MultiHeadAttention",
    "edge_geometry",
    "incoming_edges",
    "sqrt_flat_at_zero",
]

# The default budget, in MB, for the per-edge temporaries of one attention call (messages,
# their radial weights, the tensor product's own): the folded path takes the receiving nodes
# in groups whose edges fit in it. 1 GB keeps every chapter's model and the potentials in
# one group, and a million-edge graph of bench/transformer.py in a few.
CHUNK_MB = 1024.0


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


class IncomingEdges(NamedTuple):
    """The edges grouped by receiving node: what the folded attention lays out as a
    ``[num_nodes, max_degree]`` table, node by node."""

    order: torch.Tensor  # [num_edges] edge ids sorted by receiving node (stable)
    ptr: torch.Tensor  # [num_nodes + 1] node i's edges are order[ptr[i]:ptr[i + 1]]
    rank: torch.Tensor  # [num_edges] place of order[e] among its node's edges
    max_degree: int  # most edges into one node


@torch.compiler.disable  # data-dependent sizes (.item()): eager
def incoming_edges(edge_dst: torch.Tensor, num_nodes: int) -> IncomingEdges:
    """Sort the edges by receiving node and number each node's edges 0, 1, ...

    >>> incoming_edges(torch.tensor([2, 0, 2]), 3)
    IncomingEdges(order=tensor([1, 0, 2]), ptr=tensor([0, 1, 1, 3]), rank=tensor([0, 0, 1]), max_degree=2)
    """  # noqa: E501
    order = torch.argsort(edge_dst, stable=True)
    degree = torch.bincount(edge_dst, minlength=num_nodes)
    ptr = torch.cat([degree.new_zeros(1), degree.cumsum(0)])
    rank = torch.arange(len(order), device=order.device) - ptr[edge_dst[order]]
    max_degree = int(degree.max()) if num_nodes > 0 else 0
    return IncomingEdges(order, ptr, rank, max_degree)


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

    **Folded** (``fold=True``, the default): the key and value maps are linear, so per head

    .. math:: q^h_i \cdot W^h_K m_{ij} = (W^{h\top}_K q^h_i) \cdot m_{ij}, \qquad
              \sum_j \sqrt{\alpha^h_{ij}}\, W^h_V m_{ij}
              = W^h_V \sum_j \sqrt{\alpha^h_{ij}}\, m_{ij}:

    the maps act once per node instead of once per edge, and no edge has a key or a value;
    what is left per edge is a dot product and a weighted sum per head, ``2 H M``
    multiply-adds for messages of ``M`` components: the factor of a head's multiplicity is
    gone. The receiving nodes go in groups sized by an estimate of their edges' temporaries
    (``chunk_mb``; a budget, not a bound: a group holds at least one node, and the sorted edge
    geometry, queries, outputs and gradients are not counted). With several groups and
    gradients on, each group is recomputed in the backward pass rather than stored (once more
    per differentiation: a force loss, differentiated twice, keeps every group's recomputed
    tensors until its second backward pass). ``fold=False`` computes the keys and values of
    every edge (the direct form, the reference of the tests), as does every variant that
    changes the messages, keys or values, and ``torch.compile`` (the folded form has
    data-dependent shapes; ``chunk_mb`` then does not apply).

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
        *,
        fold: bool = True,
        chunk_mb: float = CHUNK_MB,
    ) -> None:
        super().__init__()
        if not chunk_mb > 0:
            raise ValueError(f"chunk_mb must be > 0, got {chunk_mb}")
        self.fold = fold
        self.chunk_mb = chunk_mb
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
        if self.takes_folded_path():
            return self.folded_forward(f, edges)
        return self.direct_forward(f, edges)

    def takes_folded_path(self) -> bool:
        """Folded unless asked not to, compiling, a variant changes the messages, keys or
        values, or the radial MLP is not e3nn's (the folded form permutes its last layer)."""
        steps = ("messages", "edge_keys_values", "keys_values", "expand_heads", "key_value_heads")
        plain = all(
            getattr(type(self), step) is getattr(MultiHeadAttention, step) for step in steps
        )
        plain = plain and isinstance(self.fc, e3nn.nn.FullyConnectedNet)
        return self.fold and plain and not torch.compiler.is_compiling()

    def direct_forward(self, f: torch.Tensor, edges: EdgeGeometry) -> torch.Tensor:
        """Keys and values of every edge, then the softmax and the weighted sum."""
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

    # The folded form: the same outputs, with W_K and W_V moved from the edges to the nodes.

    def folded_forward(self, f: torch.Tensor, edges: EdgeGeometry) -> torch.Tensor:
        """Groups of receiving nodes, each with all its incoming edges (see the class)."""
        num_nodes = f.shape[0]
        q = self.h_q(f)  # [num_nodes, heads * d]
        incoming = incoming_edges(edges.edge_dst, num_nodes)
        src, dst, sh, scalars, log_weight = (x[incoming.order] for x in edges[:5])
        ptr = incoming.ptr.tolist()
        groups = self.node_groups(num_nodes, incoming.max_degree, f.element_size())
        recompute = len(groups) > 1 and torch.is_grad_enabled()
        outputs = []
        for first, last in groups:
            e0, e1 = ptr[first], ptr[last]
            max_degree = max(b - a for a, b in zip(ptr[first:last], ptr[first + 1 : last + 1]))
            args = (
                f, q[first:last], src[e0:e1], dst[e0:e1] - first, incoming.rank[e0:e1],
                sh[e0:e1], scalars[e0:e1], log_weight[e0:e1], first, max_degree,
            )  # fmt: skip
            if recompute:
                outputs.append(
                    torch.utils.checkpoint.checkpoint(
                        self.attend, *args, use_reentrant=False, preserve_rng_state=False
                    )
                )
            else:
                outputs.append(self.attend(*args))
        return self.h_o(torch.cat(outputs) if outputs else q.new_zeros(0, q.shape[1]))

    def node_groups(self, num_nodes: int, max_degree: int, itemsize: int) -> list:
        """``[(first, last), ...]``: ranges of receiving nodes whose temporaries fit in
        ``chunk_mb``. Per edge slot: the radial MLP's output, the message and its copy in the
        ``[nodes, max_degree]`` table, and the tensor product's own temporaries (about two
        messages); per node: the folded query and the weighted sum of messages, per head."""
        width = self.irreps_messages.dim
        per_node = itemsize * (
            max_degree * (sum(self.fc.hs[1:]) + 4 * width) + 2 * self.num_heads * width
        )
        size = max(1, int(self.chunk_mb * 2**20 // per_node))
        return [(first, min(first + size, num_nodes)) for first in range(0, num_nodes, size)]

    def attend(self, f, q, src, dst, rank, sh, scalars, log_weight, first, max_degree):
        """The outputs (before ``h_o``) of the nodes ``first, first + 1, ...`` (``q [n, heads *
        d]``) from their incoming edges: ``src``, ``dst`` (counted from ``first``) and ``rank``
        (place among the node's edges) per edge, and the edges' ``sh``, ``scalars`` and
        ``log_weight``. A node's softmax needs only its own edges, so groups are independent.

        The messages stay in the tensor product's blocks (one per irrep of ``f``, see
        :meth:`~se3tutor.tensor_product.DepthwiseTensorProduct.forward_blocks`), each laid
        out as a ``[n, max_degree, width]`` table; the folded queries are reordered to match,
        per node."""
        n, heads = len(q), self.num_heads
        x = f[src]
        if self.tp.uses_cuequivariance(x):  # the fused kernel, in e3nn's layout
            blocks = self.tp.to_blocks(self.tp(x, sh, self.fc(scalars)))
        else:
            blocks = self.tp.forward_blocks(x, sh, self.radial_weights_in_blocks(scalars))
        slot = dst * max_degree + rank  # the edge's cell in the [n, max_degree] table
        tables = [self._table(block, slot, n, max_degree) for block in blocks]
        folded = self.tp.to_blocks(self.folded_queries(q))  # [n, H, width] each
        logits = sum(
            torch.bmm(table, part.transpose(1, 2))  # [n, max_degree, H]
            for table, part in zip(tables, folded)
        )
        logits = logits.reshape(n * max_degree, heads)[slot]
        keys_dst, keys_log_weight = dst, log_weight
        if self.attend_self:
            f_self = f[first : first + n]
            self_logits = (q * self.h_k_self(f_self)) @ self.head_sum  # [n, heads]
            logits = torch.cat([logits, self_logits])
            keys_dst = torch.cat([dst, torch.arange(n, device=dst.device)])
            keys_log_weight = torch.cat([log_weight, log_weight.new_zeros(n)])
        weight = sqrt_flat_at_zero(segment_softmax(logits, keys_dst, n, log_weight=keys_log_weight))
        edge_weight = weight[: len(dst)]
        weight_table = self._table(edge_weight, slot, n, max_degree).transpose(1, 2)
        summed = self.tp.from_blocks([torch.bmm(weight_table, table) for table in tables])
        out = self.folded_values(summed)  # [n, heads * d]
        if self.attend_self:
            out = out + weight[len(dst) :][:, self.head_of] * self.h_v_self(f_self)
        return out

    def radial_weights_in_blocks(self, scalars: torch.Tensor) -> torch.Tensor:
        """``self.fc(scalars)[:, tp.block_weight_order]``, with the permutation applied to the
        columns of the MLP's last layer rather than to every edge's output."""
        *hidden_layers, last = self.fc
        for layer in hidden_layers:
            scalars = layer(scalars)
        permuted = {"weight": last.weight[:, self.tp.block_weight_order]}
        return torch.func.functional_call(last, permuted, (scalars,))

    @staticmethod
    def _table(rows: torch.Tensor, slot: torch.Tensor, n: int, max_degree: int) -> torch.Tensor:
        """``rows [E, width]`` at their ``slot`` of a ``[n, max_degree, width]`` table, zero
        in the gaps (a view when there are none: every node has ``max_degree`` edges)."""
        shape = (n, max_degree, rows.shape[1])
        if len(rows) == n * max_degree:
            return rows.view(shape)
        return rows.new_zeros(n * max_degree, shape[2]).index_copy(0, slot, rows).view(shape)

    def folded_queries(self, q: torch.Tensor) -> torch.Tensor:
        r""":math:`W_K^{h\top} q^h / \sqrt{d}`: ``[n, heads * d] -> [n, heads, M]``, so that
        ``folded[:, h] @ m`` is head h's logit of a message ``m``."""
        q = q / self.irreps_head.dim**0.5  # before the map: on the narrow side
        blocks = [None] * len(self.irreps_messages)
        for i_in, i_out, weight, path_weight in self._head_blocks(self.h_k):
            mul_in, ir = self.irreps_messages[i_in]
            q_block = q[:, self.irreps_kv.slices()[i_out]].view(len(q), self.num_heads, -1, ir.dim)
            block = torch.einsum("whv,nhvm->nhwm", weight, q_block) * path_weight
            block = block.reshape(len(q), self.num_heads, mul_in * ir.dim)
            # several instructions from one message irrep when irreps_head repeats an irrep
            blocks[i_in] = block if blocks[i_in] is None else blocks[i_in] + block
        blocks = [
            q.new_zeros(len(q), self.num_heads, mul_ir.dim) if block is None else block
            for block, mul_ir in zip(blocks, self.irreps_messages)
        ]
        return torch.cat(blocks, dim=2)

    def folded_values(self, summed: torch.Tensor) -> torch.Tensor:
        """:math:`W_V^h` applied to each head's weighted sum of messages:
        ``[n, heads, M] -> [n, heads * d]`` (the layout of ``irreps_heads``)."""
        n = len(summed)
        blocks = [None] * len(self.irreps_kv)
        message_slices = self.irreps_messages.slices()
        for i_in, i_out, weight, path_weight in self._head_blocks(self.h_v):
            ir = self.irreps_messages[i_in].ir
            block = summed[:, :, message_slices[i_in]].view(n, self.num_heads, -1, ir.dim)
            block = (torch.einsum("whv,nhwm->nhvm", weight, block) * path_weight).reshape(n, -1)
            blocks[i_out] = block if blocks[i_out] is None else blocks[i_out] + block
        blocks = [
            summed.new_zeros(n, mul_ir.dim) if block is None else block
            for block, mul_ir in zip(blocks, self.irreps_kv)
        ]
        return torch.cat(blocks, dim=1)

    def _head_blocks(self, linear: o3.Linear):
        """Per instruction of a map messages -> keys or values: ``(i_in, i_out, weight
        [mul_in, heads, mul_head], path_weight)``."""
        for _, instruction, weight in linear.weight_views(yield_instruction=True):
            mul_in, mul_out = instruction.path_shape
            yield (
                instruction.i_in,
                instruction.i_out,
                weight.view(mul_in, self.num_heads, mul_out // self.num_heads),
                instruction.path_weight,
            )
