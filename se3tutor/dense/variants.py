r"""Variants of the transformer's blocks, each a small class of its own (book: The
SE(3)-Transformer).

The attention variants change one step of :class:`se3tutor.transformer.MultiHeadAttention`
and combine by inheritance: :func:`attention_class` builds the class with all the chosen
behaviours, which :class:`se3tutor.transformer.SE3Transformer` takes as ``attention``.

- :class:`LinearKeys`: keys :math:`k_{ij} = W_K f_j`, a linear map of the neighbour's
  features, instead of a map of the message :math:`m_{ij}`.
- :class:`TiedKeysValues`: keys equal to values, :math:`k_{ij} = v_{ij}`.
- :class:`OneHeadedKeysValues`: one head of keys and values, shared by all query heads.
- :class:`NullKeyValue`: every node may also attend to a learned "null" key and value.
- :class:`GlobalKeysValues`: every node also attends to its graph's global features.
- :class:`ChunkedEdges`: the edges' keys and values computed in chunks, each recomputed in
  the backward pass, for a lower peak memory.

More attention variants: :class:`se3tutor.dense.rotary.RotaryKeys` (rotary embeddings); another
trunk: :class:`se3tutor.dense.egnn.EGNNTransformer` (E(n)-GNN layers).

Other blocks: :class:`GatedScaleLayerNorm` (norm whose gains depend on the node's norms),
:class:`ConvolutionBlock` (a convolution layer, for a stem before the attention blocks) and
:class:`ReversibleSE3Transformer` (reversible residual blocks).

Everything a variant adds acts on irreps through invariant weights, or is a learned
constant of type ``0e`` (a rotation leaves only those unchanged), so every combination stays
equivariant.
"""

from __future__ import annotations

import collections
from typing import NamedTuple, Optional

import torch
import torch.utils.checkpoint
from e3nn import o3

from se3tutor.graph import scatter
from se3tutor.multihead import (
    EdgeGeometry,
    KeysValues,
    MultiHeadAttention,
)
from se3tutor.norm import EquivariantLayerNorm, channel_index
from se3tutor.radial import radial_mlp
from se3tutor.tensor_product import DepthwiseTensorProduct
from se3tutor.transformer import SE3Transformer, node_layer_norm

__all__ = [
    "ChunkedEdges",
    "ConvolutionBlock",
    "DenseEdges",
    "GatedScaleLayerNorm",
    "GlobalKeysValues",
    "GlobalTokens",
    "LinearKeys",
    "NullKeyValue",
    "OneHeadedKeysValues",
    "ReversibleSE3Transformer",
    "TiedKeysValues",
    "attention_class",
    "global_tokens",
]


class GlobalTokens(NamedTuple):
    """Invariant features of each graph as a whole (``m`` tokens per graph), and which node
    sees which token: every node sees all tokens of its own graph."""

    feats: torch.Tensor  # [num_graphs * m, global_feats_dim], graph g's tokens in rows g*m..
    token: torch.Tensor  # [num_nodes * m] row of feats ...
    node: torch.Tensor  # [num_nodes * m] ... that this node sees


def global_tokens(global_feats: torch.Tensor, batch: Optional[torch.Tensor], num_nodes: int):
    """Every node sees the ``m`` tokens of its graph: ``global_feats [num_graphs, m, dim]``."""
    num_graphs, m, _ = global_feats.shape
    if batch is None:
        batch = torch.zeros(num_nodes, dtype=torch.long, device=global_feats.device)
    tokens = batch[:, None] * m + torch.arange(m, device=batch.device)  # [num_nodes, m]
    nodes = torch.arange(num_nodes, device=batch.device).repeat_interleave(m)
    return GlobalTokens(global_feats.reshape(num_graphs * m, -1), tokens.reshape(-1), nodes)


# The core's EdgeGeometry (same fields, same order, so every core layer reads it) and what
# only the front end's variants read: edge_rotary [num_edges, k], the relative positions of
# se3tutor.dense.rotary.RotaryKeys, and global_tokens (a GlobalTokens) of GlobalKeysValues.
DenseEdges = collections.namedtuple(
    "DenseEdges", EdgeGeometry._fields + ("edge_rotary", "global_tokens"), defaults=(None, None)
)


def attention_class(*variants: type) -> type:
    """The attention class with the behaviours of all ``variants`` (subclasses of
    :class:`~se3tutor.transformer.MultiHeadAttention`); none gives the plain one.

    >>> attention_class(NullKeyValue, LinearKeys).__mro__[1:3]
    (<class 'se3tutor.dense.variants.NullKeyValue'>, <class 'se3tutor.dense.variants.LinearKeys'>)
    """
    if not variants:
        return MultiHeadAttention
    if LinearKeys in variants and TiedKeysValues in variants:
        raise ValueError("LinearKeys and TiedKeysValues exclude each other (as in 0.9.0)")
    return type("".join(v.__name__ for v in variants) + "Attention", variants, {})


class LinearKeys(MultiHeadAttention):
    r"""Keys from the neighbour's features alone: :math:`k_{ij} = W_K f_j` (no tensor product
    with the edge, so no dependence on its direction or length); values as before. The key
    map acts on ``irreps_node`` instead of the larger ``irreps_messages``: fewer parameters,
    and no per-edge key computation beyond a gather."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.h_k = o3.Linear(self.irreps_node, self.irreps_kv)

    def edge_keys_values(self, f: torch.Tensor, edges: EdgeGeometry):
        return self.h_k(f)[edges.edge_src], self.h_v(self.messages(f, edges))


class TiedKeysValues(MultiHeadAttention):
    r"""Keys equal to values, :math:`k_{ij} = v_{ij} = W_V m_{ij}`: no key map."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        del self.h_k

    def edge_keys_values(self, f: torch.Tensor, edges: EdgeGeometry):
        values = self.h_v(self.messages(f, edges))
        return values, values


class OneHeadedKeysValues(MultiHeadAttention):
    r"""One head of keys and values, shared by all query heads (Shazeer 2019, "Fast
    Transformer Decoding: One Write-Head is All You Need"): every key and value map produces
    ``irreps_head`` instead of ``num_heads`` copies of it, and head :math:`h` reads
    :math:`q^h_i \cdot k_{ij}` and :math:`v_{ij}`."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # shared[c]: the component of the one key/value head under component c of irreps_heads.
        shared = [
            torch.arange(s.start, s.stop).repeat(self.num_heads) for s in self.irreps_head.slices()
        ]
        self.register_buffer("shared", torch.cat(shared), persistent=False)

    def key_value_heads(self) -> int:
        return 1

    def expand_heads(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, self.shared]


class NullKeyValue(MultiHeadAttention):
    r"""Each node may also attend to a learned null key and value, with weight 1: a place for
    attention to go when no neighbour fits, and the output of a node without neighbours.

    A learned constant is equivariant only where a rotation leaves it unchanged, in its
    ``0e`` part; so the null key and value are linear maps of the constant 1 (type ``0e``),
    whose outputs of every other irrep are zero."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.h_k_null = o3.Linear("0e", self.irreps_kv)
        self.h_v_null = o3.Linear("0e", self.irreps_kv)

    def keys_values(self, f: torch.Tensor, edges: EdgeGeometry) -> KeysValues:
        one = f.new_ones(len(f), 1)  # [num_nodes, 1]: the constant, once per node
        nodes = torch.arange(len(f), device=f.device)
        null = KeysValues(self.h_k_null(one), self.h_v_null(one), nodes, 0 * one[:, 0])
        return super().keys_values(f, edges) + null


class GlobalKeysValues(MultiHeadAttention):
    r"""Every node also attends to the global features of its graph (invariant, ``m`` tokens
    of ``global_feats_dim`` scalars per graph), with keys :math:`W_K^{g} g_t` and values
    :math:`W_V^{g} g_t` and weight 1. Maps from scalars ``0e`` produce only ``0e`` outputs, so
    these keys and values are invariant. The tokens come with the edges
    (:class:`DenseEdges`, ``global_tokens``)."""

    def __init__(self, *args, global_feats_dim: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        irreps_global = o3.Irreps(f"{global_feats_dim}x0e")
        self.h_k_global = o3.Linear(irreps_global, self.irreps_kv)
        self.h_v_global = o3.Linear(irreps_global, self.irreps_kv)

    def keys_values(self, f: torch.Tensor, edges: EdgeGeometry) -> KeysValues:
        tokens = edges.global_tokens
        if tokens is None:
            raise ValueError("this attention attends to global features: pass global_feats")
        keys = self.h_k_global(tokens.feats)[tokens.token]  # [num_nodes * m, irreps_kv.dim]
        values = self.h_v_global(tokens.feats)[tokens.token]
        log_weight = tokens.feats.new_zeros(len(tokens.node))  # weight 1
        return super().keys_values(f, edges) + KeysValues(keys, values, tokens.node, log_weight)


class ChunkedEdges(MultiHeadAttention):
    r"""The edges' keys and values in ``edge_chunks`` chunks of edges, each computed under
    activation checkpointing: the per-edge radial weights and messages, the largest tensors
    of a layer, exist for one chunk at a time, in the forward and in the backward pass (which
    recomputes them). Same result, up to rounding; lower peak memory, more compute."""

    def __init__(self, *args, edge_chunks: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if edge_chunks < 1:
            raise ValueError(f"edge_chunks must be >= 1, got {edge_chunks}")
        self.edge_chunks = edge_chunks

    def edge_keys_values(self, f: torch.Tensor, edges: EdgeGeometry):
        n = self.edge_chunks  # the per-edge tensors in chunks; the rest (None, tokens) as they are
        pieces = zip(*(t.tensor_split(n) if torch.is_tensor(t) else [t] * n for t in edges))
        keys, values = zip(*(self._chunk(f, type(edges)(*piece)) for piece in pieces))
        return torch.cat(keys), torch.cat(values)

    def _chunk(self, f: torch.Tensor, edges: EdgeGeometry):
        parent = super().edge_keys_values
        if not torch.is_grad_enabled():
            return parent(f, edges)
        return torch.utils.checkpoint.checkpoint(parent, f, edges, use_reentrant=False)


class GatedScaleLayerNorm(EquivariantLayerNorm):
    r"""Layer norm (per node) whose gains depend on the input: the plain norm's output
    :math:`y` (:class:`~se3tutor.norm.EquivariantLayerNorm`, ``scope="node"``) times

    .. math:: 1 + \sum_{u'} W_{uu'} \sqrt{\|y_{u'}\|^2 + \epsilon}

    for channel :math:`u`, with the norms of all channels of the node: invariant, so the
    scale keeps directions (se3-transformer-pytorch's ``norm_gated_scale``, a gate computed
    from the norms). :math:`W` starts small (uniform in :math:`\pm 10^{-3}`, as there), so
    the layer starts close to the plain norm.

    Shapes: ``f [..., irreps.dim] -> [..., irreps.dim]``.
    """

    GATE_INIT = 1e-3

    def __init__(self, irreps, eps: float = 1e-5) -> None:
        super().__init__(irreps, eps=eps, affine=True, scope="node")
        num_channels = self.irreps.num_irreps
        gate = torch.empty(num_channels, num_channels).uniform_(-self.GATE_INIT, self.GATE_INIT)
        self.gate = torch.nn.Parameter(gate)
        # channel_of[c]: the channel (copy of an irrep) that component c belongs to.
        self.register_buffer("channel_of", channel_index(self.irreps), persistent=False)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        y = super().forward(f)
        squares = torch.zeros(*f.shape[:-1], self.irreps.num_irreps, dtype=f.dtype, device=f.device)
        squares = squares.index_add(-1, self.channel_of, y.pow(2))  # [..., num_channels]
        # eps keeps the norm's derivative finite at a zero channel.
        scale = 1 + (squares + self.eps).sqrt() @ self.gate.T
        return y * scale[..., self.channel_of]


class ConvolutionBlock(torch.nn.Module):
    r"""A pre-norm residual convolution layer (book: Convolution):

    .. math:: f_i \leftarrow f_i + W_{self} \hat f_i
              + W \sum_{j} \frac{c(r_{ij})}{\max(1, \sum_{j'} c(r_{ij'}))}\,
              \hat f_j \otimes_{w(r_{ij})} Y(\hat x_{ij}), \qquad \hat f = \mathrm{Norm}(f)

    a cutoff-weighted mean over the neighbours (se3-transformer-pytorch pools convolutions by
    their mean; the ``max`` keeps a node with few, distant neighbours from dividing by
    almost 0) plus a self-interaction, with the attention's depthwise tensor product.
    se3-transformer-pytorch's ``num_conv_layers`` runs such layers before the attention.

    Shapes: ``f [num_nodes, irreps_node.dim] -> [num_nodes, irreps_node.dim]``.
    """

    def __init__(
        self, irreps_node, irreps_sh, number_of_edge_scalars: int, radial_hidden: int = 32,
        norm=node_layer_norm,
    ) -> None:  # fmt: skip
        super().__init__()
        self.irreps_node = o3.Irreps(irreps_node)
        self.norm = norm(self.irreps_node)
        self.tp = DepthwiseTensorProduct(self.irreps_node, irreps_sh, irreps_node)
        self.fc = radial_mlp(
            number_of_edge_scalars, radial_hidden, self.tp.weight_numel, torch.nn.functional.silu
        )
        self.linear = o3.Linear(self.tp.irreps_out.simplify(), self.irreps_node)
        self.self_interaction = o3.Linear(self.irreps_node, self.irreps_node)

    def forward(self, f: torch.Tensor, edges: EdgeGeometry) -> torch.Tensor:
        normed = self.norm(f)
        messages = self.tp(normed[edges.edge_src], edges.edge_sh, self.fc(edges.edge_scalars))
        weight = edges.edge_log_weight.exp()[:, None]  # c(r)
        total = scatter(weight * messages, edges.edge_dst, dim=0, dim_size=len(f))
        count = scatter(weight, edges.edge_dst, dim=0, dim_size=len(f))
        mean = total / count.clamp(min=1.0)  # a node without neighbours gets 0, not 0 / 0
        return f + self.self_interaction(normed) + self.linear(mean)


def reversible_step(block, x1: torch.Tensor, x2: torch.Tensor, edges: EdgeGeometry):
    r"""One reversible block: :math:`y_1 = x_1 + A(N_1 x_2)`, :math:`y_2 = x_2 + F(N_2 y_1)`,
    with the attention :math:`A` and feed-forward :math:`F` of a
    :class:`~se3tutor.transformer.TransformerBlock`."""
    y1 = x1 + block.attention(block.norm_attention(x2), edges)
    y2 = x2 + block.feed_forward(block.norm_feed_forward(y1))
    return y1, y2


class _ReversibleBlocks(torch.autograd.Function):
    """Runs the blocks without storing activations; the backward pass recomputes each block's
    inputs from its outputs, :math:`x_2 = y_2 - F(N_2 y_1)`, :math:`x_1 = y_1 - A(N_1 x_2)`,
    and backpropagates through one block at a time. Inputs: the blocks, the edges' index
    tensors, the two streams, the edges' float tensors (gradients reach the coordinates
    through them) and every parameter of the blocks (their gradients are returned)."""

    @staticmethod
    def forward(ctx, blocks, edge_index, x1, x2, edge_sh, edge_scalars, edge_log_weight, *params):
        edges = EdgeGeometry(*edge_index, edge_sh, edge_scalars, edge_log_weight)
        with torch.no_grad():
            for block in blocks:
                x1, x2 = reversible_step(block, x1, x2, edges)
        ctx.blocks, ctx.params = blocks, params
        ctx.save_for_backward(x1, x2, *edge_index, edge_sh, edge_scalars, edge_log_weight)
        return x1, x2

    @staticmethod
    def backward(ctx, dy1, dy2):
        y1, y2, edge_src, edge_dst, *floats = ctx.saved_tensors
        floats = [t.detach().requires_grad_() for t in floats]
        edges = EdgeGeometry(edge_src, edge_dst, *floats)
        d_floats = [torch.zeros_like(t) for t in floats]
        d_params = []  # per block, last block first

        for block in reversed(ctx.blocks):
            params = list(block.parameters())
            with torch.enable_grad():
                y1 = y1.detach().requires_grad_()
                feed_forward = block.feed_forward(block.norm_feed_forward(y1))
                d_y1, *d_block = _grad(feed_forward, [y1, *params], dy2)
            dy1 = dy1 + d_y1  # d loss / d y1, which is also d loss / d x1
            with torch.no_grad():
                x2 = y2 - feed_forward
            with torch.enable_grad():
                x2 = x2.detach().requires_grad_()
                attention = block.attention(block.norm_attention(x2), edges)
                d_x2, *d_rest = _grad(attention, [x2, *floats, *params], dy1)
            dy2 = dy2 + d_x2
            d_floats = [a + b for a, b in zip(d_floats, d_rest)]
            d_params.append([a + b for a, b in zip(d_block, d_rest[len(floats) :])])
            with torch.no_grad():
                y1, y2 = y1 - attention, x2
        d_params = [g for block_grads in reversed(d_params) for g in block_grads]
        return (None, None, dy1, dy2, *d_floats, *d_params)


def _grad(outputs, inputs, grad_outputs):
    """Gradients of ``(outputs * grad_outputs).sum()``; zeros for inputs it does not use."""
    found = torch.autograd.grad(outputs, inputs, grad_outputs, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(found, inputs)]


class ReversibleSE3Transformer(SE3Transformer):
    r"""The transformer with reversible residual blocks (Gomez et al. 2017, "The Reversible
    Residual Network"), as se3-transformer-pytorch's ``reversible``: two copies of the
    features, :math:`(x_1, x_2) = (f, f)`, go through

    .. math:: y_1 = x_1 + A(N_1 x_2), \qquad y_2 = x_2 + F(N_2 y_1)

    in every block, and the trunk returns :math:`(x_1 + x_2) / 2`. A block's inputs follow
    from its outputs, so the backward pass recomputes them instead of storing every block's
    activations: the trunk's memory does not grow with depth. Same arguments as
    :class:`~se3tutor.transformer.SE3Transformer`; global features are not supported, and
    the backward pass cannot itself be differentiated (no ``create_graph``).
    """

    def trunk(self, f: torch.Tensor, edges: EdgeGeometry) -> torch.Tensor:
        params = list(self.blocks.parameters())
        x1, x2 = _ReversibleBlocks.apply(self.blocks, edges[:2], f, f, *edges[2:5], *params)
        return (x1 + x2) / 2
