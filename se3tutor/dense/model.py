r"""The interface of se3-transformer-pytorch 0.9.0 on top of :class:`se3tutor.SE3Transformer`
(book: The SE(3)-Transformer).

::

    from se3tutor.dense import SE3Transformer   # instead of: from se3_transformer_pytorch ...

    model = SE3Transformer(dim=64, heads=8, depth=2, dim_head=16, num_degrees=2,
                           valid_radius=10, num_neighbors=16)
    out = model(feats, coors, mask)              # [b, n, 64] from [b, n, 64], [b, n, 3], [b, n]

The front end turns the dense batch ``[b, n, ...]`` and its ``mask`` into one flat graph
(PyTorch Geometric convention), chooses each node's neighbours as that library does, turns
distances, edge tokens, continuous edge features and adjacency degrees into invariant edge
features, runs the graph-level model, and returns the degrees it asks for in its shapes:
degree 0 as ``[b, n, d]``, degree ``l > 0`` as ``[b, n, d, 2l + 1]`` (``reduce_dim_out``
drops the ``d`` axis). Type-1 features are vectors in ``(x, y, z)`` order.

Symmetry: features of that library have a degree but no parity; it is equivariant to
rotations only (SE(3)). Each hidden degree here has half its channels with each parity, so
that every path with a harmonic of degree ``J <= num_degrees - 1`` has a place (``1 x 1 -> 1``,
the cross product, needs the odd parity product); an output degree is the sum of its two
parities. Exactly equivariant to rotations and translations. Not the same layer: that
library's kernels also use harmonics up to ``J = 2 (num_degrees - 1)``, a radial network per
pair of degrees and one weight per pair of channels (book: The original SE(3)-Transformer
layer).

Where the behaviour differs on purpose:

- the radius shrinks the work: neighbours come from a cell-list radius graph, not from an
  all-pairs distance matrix that is masked afterwards;
- ``differentiable_coors`` is accepted and has no effect: gradients always reach the
  coordinates, through the directions and the distances of the edges (in 0.9.0's
  ``basis.get_basis`` the angular basis is detached whatever the flag: ``False`` detaches
  it, ``True`` computes it under ``torch.no_grad``; gradients reach the coordinates only
  through the distances);
- ``max_sparse_neighbors`` keeps the *nearest* adjacent nodes (0.9.0 samples them at random);
- masked nodes (``mask == False``) are left out of the graph; their outputs are zero;
- outputs of degree ``l > 0`` start at a tenth of e3nn's scale (``READOUT_INIT_SCALE``,
  unless ``norm_out``), so that ``coors + model(...)`` of a fresh model nudges the atoms;
- ``edges`` per node, ``[b, n]`` tokens or ``[b, n, edge_dim]`` values, give the edge
  ``i <- j`` node ``j``'s entry for every ``b`` (0.9.0 does so for ``b = 1``, by
  broadcasting, and fails for ``b > 1``);
- ``use_null_kv``: the null key and value are learned only in their ``0e`` part (0.9.0
  learns them for every degree, which a rotation would change once they are nonzero), and
  start from e3nn's random initialisation, not from zero;
- ``global_feats``: as in 0.9.0, extra ``0e`` keys and values that every node of the graph
  attends to; here every head has one softmax over all its degrees (0.9.0: one per degree,
  and only degree 0 sees the global features), so they reach every degree;
- ``num_conv_layers``: pre-norm residual convolutions (cutoff-weighted mean over the
  neighbours plus a self-interaction, :class:`se3tutor.dense.variants.ConvolutionBlock`);
  0.9.0 applies a norm nonlinearity, then a convolution with self-interaction;
- ``norm_gated_scale``: every norm's output is multiplied per channel by
  ``1 + W |channel norms|`` (:class:`se3tutor.dense.variants.GatedScaleLayerNorm`); 0.9.0's norm
  is a nonlinearity of the norms whose scale becomes such a gate;
- ``splits``: the default 4 leaves the memory to the folded attention, which takes the
  receiving nodes in groups sized by an estimate of their temporaries (``chunk_mb``, 1 GB by
  default; see :class:`se3tutor.multihead.MultiHeadAttention`), recomputed in the backward
  pass when there are several; any other value computes the edges' keys and values (the
  direct form) in that many chunks, recomputed in the backward pass (checkpointing), where
  0.9.0's chunks only bound the temporary of one product;
- ``reversible``: as 0.9.0 (two copies of the features, attention then feed-forward,
  their mean at the end), but the gradients with respect to the coordinates that pass
  through the blocks are outputs of the backward pass; 0.9.0 adds them to ``.grad`` as a
  side effect of ``.backward()``, so ``torch.autograd.grad`` misses them (on one small
  model: 2.14 instead of 2.33). Neither backward pass can itself be differentiated
  (``create_graph``, e.g. for training on forces);
- ``rotary_position``, ``rotary_rel_dist``: rotary embeddings of ``j - i`` and of
  ``100 r_ij`` (:class:`se3tutor.dense.rotary.RotaryKeys`) rotate the ``0e`` channels of each
  edge's key by the relative position (as 0.9.0's rotation of query and key, whose logit
  depends on it alone), so they stay invariant; 0.9.0 rotates all degree-0 channels and the
  values too. Half the ``0e`` channels of a head per keyword: two keywords need
  ``dim_head >= 8``. Not with ``reversible`` yet;
- ``use_egnn``: E(n)-GNN layers (:class:`se3tutor.dense.egnn.EGNNLayer`) replace the attention
  blocks, and return the hidden degrees as 0.9.0 does; every irrep other than ``0e`` is
  updated as 0.9.0 updates its higher degrees, messages are weighted by the smooth cutoff,
  and one :class:`~se3tutor.dense.variants.ConvolutionBlock` before them plays 0.9.0's input
  convolution (the only source of degrees ``l > 0`` from type-0 inputs);
- no Clebsch-Gordan basis cache: e3nn computes its constants when a module is built, so the
  environment variables ``CLEAR_CACHE`` and ``CACHE_PATH`` of that library are not needed and
  are ignored.

(Over 400 lines, on purpose: the docstring above, which says keyword by keyword what maps to
what and what differs, is a fifth of it; the code is the constructor, the forward, and the
conversions between the dense batch and the graph.)
"""

from __future__ import annotations

import functools
import operator
from typing import Optional, Union

import torch
from e3nn import o3

from se3tutor.dense.egnn import EGNNTransformer
from se3tutor.dense.neighbors import (
    adjacency_degrees,
    edge_features,
    select_neighbors,
)
from se3tutor.dense.rotary import RotaryKeys
from se3tutor.dense.variants import (
    ChunkedEdges,
    ConvolutionBlock,
    DenseEdges,
    GatedScaleLayerNorm,
    GlobalKeysValues,
    LinearKeys,
    NullKeyValue,
    OneHeadedKeysValues,
    ReversibleSE3Transformer,
    TiedKeysValues,
    attention_class,
    global_tokens,
)
from se3tutor.transformer import SE3Transformer as GraphSE3Transformer
from se3tutor.transformer import node_layer_norm

__all__ = ["SE3Transformer"]

# 0.9.0's rotary_rel_dist rotates by 100 r_ij: one unit of length is 100 sequence positions.
ROTARY_DISTANCE_SCALE = 100.0

# The readout's weights into the outputs of degree l > 0 start at this fraction of e3nn's
# initialisation. Type-1 outputs are added to coordinates (``coors + model(...)``): at e3nn's
# scale a fresh model moved the atoms of the README's example by 1.9 units on average, 0.9.0
# by 0.5 (same keywords and inputs, 5 seeds); at a tenth, by 0.19 (tested). Training sets the
# scale from there on; with ``norm_out`` the norm sets it, and the weights are left as they are.
READOUT_INIT_SCALE = 0.1


def _irreps_of_degrees(channels: dict[int, int], both_parities: bool) -> o3.Irreps:
    """``{degree: channels}`` -> irreps: natural parity, or the channels split over both."""
    irreps = []
    for l, mul in sorted(channels.items()):
        natural = (l, (-1) ** l)
        if not both_parities:
            irreps.append((mul, natural))
            continue
        irreps += [(m, ir) for m, ir in [((mul + 1) // 2, natural), (mul // 2, (l, -natural[1]))]]
    return o3.Irreps([(mul, ir) for mul, ir in irreps if mul > 0])


# se3-transformer-pytorch's default number of edge chunks: with it, keys and values are
# computed in one piece (bitwise as before `splits` had an effect); any other value chunks them.
DEFAULT_SPLITS = 4


def _check_keywords(
    *, num_degrees, hidden_fiber_dict, num_edge_tokens, edge_dim, num_adj_degrees, causal,
    attend_self, num_neighbors, attend_sparse_neighbors, reversible, global_feats_dim,
    use_egnn, rotary, splits, num_conv_layers,
) -> None:  # fmt: skip
    """Refuse keywords that cannot work, alone or together, naming them."""
    if num_degrees is None and hidden_fiber_dict is None:
        raise ValueError("either num_degrees or hidden_fiber_dict must be given")
    if num_edge_tokens is not None and edge_dim is None:
        raise ValueError("edge tokens (num_edge_tokens) need edge_dim, their embedding size")
    if num_adj_degrees is not None and num_adj_degrees < 1:
        raise ValueError(f"num_adj_degrees must be >= 1, got {num_adj_degrees}")
    if causal and not attend_self:
        raise ValueError("causal needs attend_self=True (the first node has only itself)")
    if not attend_sparse_neighbors and not num_neighbors > 0:
        raise ValueError("num_neighbors must be > 0 unless attend_sparse_neighbors is set")
    if reversible and global_feats_dim is not None:
        raise ValueError("reversible and global_feats_dim exclude each other (as in 0.9.0)")
    if use_egnn and (reversible or global_feats_dim is not None):
        raise ValueError("use_egnn replaces the attention: no reversible, global_feats_dim")
    if use_egnn and rotary:
        raise ValueError("use_egnn replaces the attention, which the rotary embeddings act on")
    if reversible and rotary:
        raise NotImplementedError("reversible with rotary embeddings is not implemented yet")
    if splits < 1 or num_conv_layers < 0:
        raise ValueError(f"need splits >= 1, num_conv_layers >= 0; got {splits}, {num_conv_layers}")


def _is_count(value, minimum: int = 1) -> bool:
    """``value`` is an integer (Python's or numpy's, not a bool) of at least ``minimum``."""
    try:
        return not isinstance(value, bool) and operator.index(value) >= minimum
    except TypeError:
        return False


def _check_sizes(
    *, dim, heads, dim_head, depth, input_degrees, num_degrees, output_degrees, dim_in, dim_out,
    hidden_fiber_dict, out_fiber_dict,
) -> None:  # fmt: skip
    """Refuse sizes and degrees that are not counts, naming the keyword (e3nn's and Python's
    own errors, raised later from deep inside, name none)."""
    counts = dict(
        dim=dim, heads=heads, dim_head=dim_head, input_degrees=input_degrees,
        num_degrees=num_degrees, output_degrees=output_degrees, dim_out=dim_out,
    )  # fmt: skip
    for name, value in counts.items():
        if value is not None and not _is_count(value):
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if not _is_count(depth, 0):
        raise ValueError(f"depth must be an integer >= 0, got {depth!r}")
    if dim_in is not None and not (
        _is_count(dim_in)
        or (isinstance(dim_in, tuple) and dim_in and all(_is_count(d) for d in dim_in))
    ):
        raise ValueError(
            f"dim_in must be an integer >= 1, or a tuple of them (one per input degree), got "
            f"{dim_in!r}"
        )
    for name, fiber in (
        ("hidden_fiber_dict", hidden_fiber_dict),
        ("out_fiber_dict", out_fiber_dict),
    ):
        if fiber is not None and not (
            isinstance(fiber, dict)
            and fiber
            and all(_is_count(l, 0) and _is_count(mul) for l, mul in fiber.items())
        ):
            raise ValueError(
                f"{name} must map degrees (integers >= 0) to channels (integers >= 1), such as "
                f"{{0: 16, 1: 8}}, got {fiber!r}"
            )


@torch.no_grad()
def _scale_readout(readout: o3.Linear, scale: float) -> None:
    """Multiply the weights of ``readout`` into its outputs of degree ``l > 0`` by ``scale``."""
    for _, instruction, weight in readout.weight_views(yield_instruction=True):
        if readout.irreps_out[instruction.i_out].ir.l > 0:
            weight.mul_(scale)  # a view of readout.weight


def _output_channels(hidden, out_fiber_dict, output_degrees, dim_out, reduce_dim_out) -> dict:
    """``{degree: channels}`` of the output: ``out_fiber_dict``, else ``output_degrees``
    degrees of ``dim_out`` channels, else (``None``) the hidden degrees; one channel each with
    ``reduce_dim_out``."""
    if out_fiber_dict is not None:
        outputs = dict(out_fiber_dict)
    elif output_degrees is not None:
        outputs = {l: dim_out for l in range(output_degrees)}
    else:
        outputs = dict(hidden)
    return {l: 1 for l in outputs} if reduce_dim_out else outputs


def _attention(
    *, linear_proj_keys, tie_key_values, one_headed_key_values, use_null_kv, global_feats_dim,
    rotary_positions, splits,
):  # fmt: skip
    """The attention class these keywords ask for (a combination of the variants), with its
    own arguments bound."""
    chosen = {
        LinearKeys: linear_proj_keys,
        TiedKeysValues: tie_key_values,
        OneHeadedKeysValues: one_headed_key_values,
        NullKeyValue: use_null_kv,
    }
    variants, options = [variant for variant, used in chosen.items() if used], {}
    if global_feats_dim is not None:
        variants.append(GlobalKeysValues)
        options["global_feats_dim"] = global_feats_dim
    if rotary_positions:  # first: it rotates what the others compute
        variants.insert(0, RotaryKeys)
        options["rotary_positions"] = rotary_positions
    if splits != DEFAULT_SPLITS:
        variants.append(ChunkedEdges)
        options["edge_chunks"] = splits
    return functools.partial(attention_class(*variants), **options)


class SE3Transformer(torch.nn.Module):
    """se3-transformer-pytorch 0.9.0's ``SE3Transformer``, computed by se3tutor's graph-level
    model (see the module docstring for what maps to what and what differs).

    Every constructor keyword of 0.9.0 is accepted. Implemented: ``dim, heads, dim_head,
    depth, input_degrees, num_degrees, output_degrees, hidden_fiber_dict, out_fiber_dict,
    dim_in, dim_out, valid_radius, num_neighbors, attend_self, num_tokens, num_positions,
    num_edge_tokens, edge_dim, fourier_encode_dist, rel_dist_num_fourier_features,
    attend_sparse_neighbors, max_sparse_neighbors, num_adj_degrees, adj_dim, causal,
    reduce_dim_out, norm_out, differentiable_coors, linear_proj_keys, tie_key_values,
    one_headed_key_values, use_null_kv, global_feats_dim, num_conv_layers, norm_gated_scale,
    splits, reversible, rotary_position, rotary_rel_dist, use_egnn, egnn_hidden_dim,
    egnn_weights_clamp_value, egnn_feedforward``, each by a variant of
    :mod:`se3tutor.dense.variants`, :mod:`se3tutor.dense.rotary` or :mod:`se3tutor.dense.egnn`.

    >>> model = SE3Transformer(dim=8, heads=2, dim_head=4, depth=1, num_degrees=2,
    ...                        valid_radius=10)
    >>> feats, coors = torch.randn(1, 12, 8), torch.randn(1, 12, 3)
    >>> model(feats, coors, torch.ones(1, 12, dtype=torch.bool)).shape
    torch.Size([1, 12, 8])
    """

    def __init__(
        self,
        *,
        dim: int,
        heads: int = 8,
        dim_head: int = 24,
        depth: int = 2,
        input_degrees: int = 1,
        num_degrees: Optional[int] = None,
        output_degrees: Optional[int] = 1,
        valid_radius: float = 1e5,
        reduce_dim_out: bool = False,
        num_tokens: Optional[int] = None,
        num_positions: Optional[int] = None,
        num_edge_tokens: Optional[int] = None,
        edge_dim: Optional[int] = None,
        attend_self: bool = True,
        differentiable_coors: bool = False,
        fourier_encode_dist: bool = False,
        rel_dist_num_fourier_features: int = 4,
        num_neighbors: float = float("inf"),
        attend_sparse_neighbors: bool = False,
        num_adj_degrees: Optional[int] = None,
        adj_dim: int = 0,
        max_sparse_neighbors: float = float("inf"),
        dim_in: Union[int, tuple, None] = None,
        dim_out: Optional[int] = None,
        norm_out: bool = False,
        causal: bool = False,
        splits: int = DEFAULT_SPLITS,
        reversible: bool = False,
        use_null_kv: bool = False,
        num_conv_layers: int = 0,
        global_feats_dim: Optional[int] = None,
        linear_proj_keys: bool = False,
        one_headed_key_values: bool = False,
        tie_key_values: bool = False,
        norm_gated_scale: bool = False,
        rotary_position: bool = False,
        rotary_rel_dist: bool = False,
        use_egnn: bool = False,
        egnn_hidden_dim: int = 32,
        egnn_weights_clamp_value: Optional[float] = None,
        egnn_feedforward: bool = False,
        hidden_fiber_dict: Optional[dict] = None,
        out_fiber_dict: Optional[dict] = None,
    ) -> None:
        super().__init__()
        _check_keywords(
            num_degrees=num_degrees, hidden_fiber_dict=hidden_fiber_dict,
            num_edge_tokens=num_edge_tokens, edge_dim=edge_dim, num_adj_degrees=num_adj_degrees,
            causal=causal, attend_self=attend_self, num_neighbors=num_neighbors,
            attend_sparse_neighbors=attend_sparse_neighbors, reversible=reversible,
            global_feats_dim=global_feats_dim, use_egnn=use_egnn,
            rotary=rotary_position or rotary_rel_dist, splits=splits,
            num_conv_layers=num_conv_layers,
        )  # fmt: skip
        _check_sizes(
            dim=dim, heads=heads, dim_head=dim_head, depth=depth, input_degrees=input_degrees,
            num_degrees=num_degrees, output_degrees=output_degrees, dim_in=dim_in,
            dim_out=dim_out, hidden_fiber_dict=hidden_fiber_dict, out_fiber_dict=out_fiber_dict,
        )  # fmt: skip
        dims_in = dim_in if isinstance(dim_in, tuple) else (dim_in or dim,) * input_degrees
        self.dims_in = dims_in
        self.dim = dim
        hidden = hidden_fiber_dict or {l: dim for l in range(num_degrees)}
        self.num_degrees = max(hidden) + 1
        if use_egnn:
            output_degrees = None  # 0.9.0 returns the hidden degrees
        outputs = _output_channels(
            hidden, out_fiber_dict, output_degrees, dim_out or dim, reduce_dim_out
        )
        self.output_degrees = max(outputs) + 1
        self.reduce_dim_out = reduce_dim_out

        self.valid_radius = valid_radius
        self.num_neighbors = num_neighbors
        self.attend_sparse_neighbors = attend_sparse_neighbors
        self.max_sparse_neighbors = max_sparse_neighbors
        self.num_adj_degrees = num_adj_degrees
        self.causal = causal
        self.fourier_features = rel_dist_num_fourier_features if fourier_encode_dist else 0
        self.rotary = {"position": rotary_position, "distance": rotary_rel_dist}
        self.global_feats_dim = global_feats_dim

        self.token_emb = torch.nn.Embedding(num_tokens, dim) if num_tokens else None
        self.pos_emb = torch.nn.Embedding(num_positions, dim) if num_positions else None
        self.num_positions = num_positions
        self.edge_emb = torch.nn.Embedding(num_edge_tokens, edge_dim) if num_edge_tokens else None
        self.edge_dim = edge_dim or 0
        use_adj = num_adj_degrees is not None and adj_dim > 0
        self.adj_emb = torch.nn.Embedding(num_adj_degrees + 1, adj_dim) if use_adj else None
        distance_dim = 2 * self.fourier_features + 1 if fourier_encode_dist else 1
        edge_attr_dim = distance_dim + self.edge_dim + (adj_dim if use_adj else 0)

        self.irreps_in = _irreps_of_degrees(dict(enumerate(dims_in)), both_parities=False)
        # Each output degree twice, natural parity first, then the other: their sum is the
        # SE(3) output of that degree.
        self.irreps_degrees = _irreps_of_degrees(outputs, both_parities=False)
        self.irreps_out = self.irreps_degrees + o3.Irreps(
            [(mul, (ir.l, -ir.p)) for mul, ir in self.irreps_degrees]
        )
        norm = GatedScaleLayerNorm if norm_gated_scale else node_layer_norm
        attention = _attention(
            linear_proj_keys=linear_proj_keys, tie_key_values=tie_key_values,
            one_headed_key_values=one_headed_key_values, use_null_kv=use_null_kv,
            global_feats_dim=global_feats_dim, rotary_positions=rotary_position + rotary_rel_dist,
            splits=splits,
        )  # fmt: skip
        model_class = ReversibleSE3Transformer if reversible else GraphSE3Transformer
        if use_egnn:
            model_class = functools.partial(
                EGNNTransformer, hidden_dim=egnn_hidden_dim, feed_forward=egnn_feedforward,
                weights_clamp_value=egnn_weights_clamp_value,
            )  # fmt: skip
        self.net = model_class(
            self.irreps_in,
            _irreps_of_degrees(hidden, both_parities=True),
            self.irreps_out,
            max_radius=valid_radius,
            num_layers=depth,
            num_heads=heads,
            irreps_head=_irreps_of_degrees(
                {l: dim_head for l in range(self.num_degrees)}, both_parities=True
            ),
            edge_attr_dim=edge_attr_dim,
            attend_self=attend_self,
            attention=attention,
            norm=norm,
            # with use_egnn, one more: 0.9.0's conv_in, the only source of degrees l > 0 there
            stem=[functools.partial(ConvolutionBlock, norm=norm)] * (num_conv_layers + use_egnn),
        )
        self.norm = norm(self.irreps_degrees) if norm_out else None
        if not norm_out:
            _scale_readout(self.net.readout, READOUT_INIT_SCALE)

    def forward(
        self,
        feats,
        coors: torch.Tensor,
        mask: Optional[torch.Tensor] = None,
        adj_mat: Optional[torch.Tensor] = None,
        edges: Optional[torch.Tensor] = None,
        return_type: Optional[int] = None,
        return_pooled: bool = False,
        neighbor_mask: Optional[torch.Tensor] = None,
        global_feats=None,
    ):
        """``feats``: ``[b, n, dim]`` type-0 features, ``[b, n]`` token ids (``num_tokens``),
        or ``{"0": [b, n, d, 1], "1": [b, n, d, 3], ...}``; ``coors [b, n, 3]``;
        ``mask [b, n]`` (``True`` = a real node); ``adj_mat [b, n, n]`` or ``[n, n]``;
        ``edges [b, n, n]`` tokens or ``[b, n, n, edge_dim]`` values, or per node ``[b, n]``
        or ``[b, n, edge_dim]`` (the edge ``i <- j`` gets node ``j``'s); ``neighbor_mask [b, n, n]``
        (``False`` = may not attend). Pair tensors are indexed ``[b, i, j]``: node ``i``
        attends to node ``j``.

        Returns the degree ``return_type`` (always 0 when ``output_degrees == 1``), or a dict
        of all output degrees: ``[b, n, d]`` for degree 0 and ``[b, n, d, 2l + 1]`` for
        ``l > 0``, without the ``d`` axis for ``reduce_dim_out``, and without the ``n`` axis
        (a masked mean over nodes) for ``return_pooled``.
        """
        if self.output_degrees == 1:
            return_type = 0
        if not isinstance(coors, torch.Tensor) or coors.dim() != 3 or coors.shape[-1] != 3:
            raise ValueError(f"coors must be [b, n, 3], got {getattr(coors, 'shape', coors)}")
        global_feats = self._global_feats(global_feats, coors)
        b, n, _ = coors.shape
        f = self._node_features(feats, b, n)
        mask = torch.ones(b, n, dtype=torch.bool, device=coors.device) if mask is None else mask
        if mask.shape != (b, n):
            raise ValueError(f"mask must be [b, n] = [{b}, {n}], got {tuple(mask.shape)}")

        pos = coors.reshape(b * n, 3)
        batch = torch.arange(b, device=pos.device).repeat_interleave(n)
        adjacency = self._adjacency(adj_mat, b, n, pos.device)
        edges = self._pair_edges(edges, b, n)
        if neighbor_mask is not None and neighbor_mask.shape != (b, n, n):
            raise ValueError(f"neighbor_mask must be [b, n, n], got {tuple(neighbor_mask.shape)}")
        edge_index, graph, i, j = select_neighbors(
            pos, batch, mask.reshape(-1), n, valid_radius=self.valid_radius,
            num_neighbors=self.num_neighbors, adjacency=adjacency,
            attend_sparse_neighbors=self.attend_sparse_neighbors,
            max_sparse_neighbors=self.max_sparse_neighbors, neighbor_mask=neighbor_mask,
            causal=self.causal,
        )  # fmt: skip
        edge_attr = edge_features(
            pos, edge_index, (graph, i, j), edges=edges, edge_emb=self.edge_emb,
            adjacency=adjacency, adj_emb=self.adj_emb,
            fourier_features=self.fourier_features,
        )  # fmt: skip

        self.net.check_inputs(f, pos, batch, edge_index, edge_attr)
        edges = DenseEdges(
            *self.net.edges(pos, batch, edge_index, edge_attr),
            edge_rotary=self._edge_rotary(pos, edge_index, i, j),
            global_tokens=None
            if global_feats is None
            else global_tokens(global_feats, batch, len(f)),
        )
        out = self.net.propagate(f, edges)
        # Each degree's two parities added: [b * n, irreps_degrees.dim]
        natural, other = out.split(self.irreps_degrees.dim, dim=1)
        out = natural + other
        if self.norm is not None:
            out = self.norm(out)
        out = torch.where(mask.reshape(-1, 1), out, 0.0)  # masked nodes are not in the graph
        result = self._degrees(out.reshape(b, n, -1))
        if return_pooled:
            weights = mask / mask.sum(dim=1, keepdim=True).clamp(min=1)
            result = {
                key: torch.einsum("bn,bn...->b...", weights.to(value.dtype), value)
                for key, value in result.items()
            }
        return result[str(return_type)] if return_type is not None else result

    def _global_feats(self, global_feats, coors) -> Optional[torch.Tensor]:
        """``[b, m, global_feats_dim]`` (or a dict ``{"0": [b, m, d, 1]}``, as node features)."""
        if self.global_feats_dim is None:
            if global_feats is not None:
                raise ValueError("global_feats given, but global_feats_dim was not set at init")
            return None
        if isinstance(global_feats, dict) and set(global_feats) == {"0"}:
            global_feats = global_feats["0"].squeeze(-1)
        expected = (coors.shape[0], self.global_feats_dim)
        if not isinstance(global_feats, torch.Tensor) or global_feats.dim() != 3 or (
            global_feats.shape[0], global_feats.shape[2]) != expected:  # fmt: skip
            raise ValueError(
                f"global_feats must be [b, m, global_feats_dim] = [{expected[0]}, m, "
                f"{expected[1]}], got {getattr(global_feats, 'shape', global_feats)}"
            )
        return global_feats.to(coors.dtype)

    def _node_features(self, feats, b: int, n: int) -> torch.Tensor:
        """``[b * n, irreps_in.dim]`` in e3nn's layout (channel-major within each degree)."""
        if self.token_emb is not None:
            if not isinstance(feats, torch.Tensor) or feats.dtype not in (torch.int32, torch.int64):
                raise TypeError("with num_tokens, feats must be integer token ids of shape [b, n]")
            feats = self.token_emb(feats)
        if self.pos_emb is not None:
            if n > self.num_positions:
                raise ValueError(f"{n} nodes, but num_positions={self.num_positions}")
            feats = feats + self.pos_emb(torch.arange(n, device=feats.device))
        if isinstance(feats, torch.Tensor):
            feats = {"0": feats[..., None]}
        expected = {str(l) for l in range(len(self.dims_in))}
        if set(feats) != expected:
            raise ValueError(f"feats must have the degrees {sorted(expected)}, got {sorted(feats)}")
        blocks = []
        for l, d in enumerate(self.dims_in):
            value = feats[str(l)]
            if value.shape != (b, n, d, 2 * l + 1):
                raise ValueError(
                    f"degree {l} features must be [b, n, {d}, {2 * l + 1}] = "
                    f"{[b, n, d, 2 * l + 1]}, got {list(value.shape)}"
                )
            blocks.append(value.reshape(b * n, d * (2 * l + 1)))
        return torch.cat(blocks, dim=1)

    def _adjacency(self, adj_mat, b: int, n: int, device) -> Optional[torch.Tensor]:
        """``[b, n, n]`` long: 0 for no bond, else the number of bonds to the nearest path
        (up to ``num_adj_degrees``); ``None`` without ``adj_mat``."""
        if adj_mat is None:
            if self.attend_sparse_neighbors or self.num_adj_degrees is not None:
                raise ValueError("attend_sparse_neighbors / num_adj_degrees need adj_mat")
            return None
        if adj_mat.dim() == 2:
            adj_mat = adj_mat.expand(b, n, n)
        if adj_mat.shape != (b, n, n):
            raise ValueError(f"adj_mat must be [b, n, n] or [n, n], got {tuple(adj_mat.shape)}")
        return adjacency_degrees(adj_mat.to(device), self.num_adj_degrees or 1)

    def _pair_edges(self, edges, b: int, n: int) -> Optional[torch.Tensor]:
        """``edges`` per pair: ``[b, n, n]`` tokens or ``[b, n, n, edge_dim]`` values. Given
        per node (``[b, n]`` tokens, ``[b, n, edge_dim]`` values), the edge ``i <- j`` gets
        node ``j``'s entry, as 0.9.0 reads ``[1, n]`` by broadcasting (it fails for ``b > 1``).
        """
        if self.edge_dim and edges is None:
            raise ValueError("the model was built with edge_dim: pass edges")
        if not self.edge_dim and edges is not None:
            raise ValueError("edges given, but the model was built without edge_dim")
        if edges is None:
            return None
        if not isinstance(edges, torch.Tensor):
            raise TypeError(f"edges must be a torch.Tensor, got {type(edges).__name__}")
        if self.edge_emb is not None:
            if edges.dtype not in (torch.int32, torch.int64):
                raise TypeError(
                    f"edges must be integer token ids (the model has num_edge_tokens), got "
                    f"{edges.dtype}"
                )
            pair, node, names = (b, n, n), (b, n), ("[b, n, n]", "[b, n]")
        else:
            pair, node = (b, n, n, self.edge_dim), (b, n, self.edge_dim)
            names = (f"[b, n, n, {self.edge_dim}]", f"[b, n, {self.edge_dim}]")
        if edges.shape == node:
            edges = edges.unsqueeze(1).expand(pair)  # a view: node j's entry for every i
        if edges.shape != pair:
            raise ValueError(
                f"edges must be {names[0]} = {list(pair)} or, per node, {names[1]} = "
                f"{list(node)}; got {list(edges.shape)}"
            )
        return edges

    def _edge_rotary(self, pos, edge_index, i, j) -> Optional[torch.Tensor]:
        """``[num_edges, k]``: the relative positions of the rotary embeddings, ``j - i`` and
        ``ROTARY_DISTANCE_SCALE * r_ij`` (as 0.9.0), those the model uses."""
        parts = []
        if self.rotary["position"]:
            parts.append((j - i).to(pos.dtype))
        if self.rotary["distance"]:
            distance = (pos[edge_index[0]] - pos[edge_index[1]]).norm(dim=1)
            parts.append(ROTARY_DISTANCE_SCALE * distance)
        return torch.stack(parts, dim=1) if parts else None

    def _degrees(self, out: torch.Tensor) -> dict:
        """Split ``[b, n, irreps_degrees.dim]`` into ``{"l": [b, n, d, 2l + 1]}`` (degree 0
        and ``reduce_dim_out`` squeezed as in 0.9.0)."""
        b, n, _ = out.shape
        result = {}
        for (mul, ir), block in zip(self.irreps_degrees, self.irreps_degrees.slices()):
            value = out[..., block].reshape(b, n, mul, ir.dim)
            if self.reduce_dim_out:
                value = value.squeeze(2)
            result[str(ir.l)] = value.squeeze(-1) if ir.l == 0 else value
        return result
