r"""The graph of a dense batch: which nodes a node attends to, chosen as se3-transformer-pytorch
0.9.0 chooses them, and the invariant features of each edge (book: The SE(3)-Transformer).

The dense front end (:mod:`se3tutor.dense`) flattens a batch ``[b, n, ...]`` into one graph of
``b * n`` nodes; node ``g * n + i`` is node ``i`` of graph ``g``. This module turns that
library's neighbour rules into an ``edge_index`` (row 0 the neighbour ``j``, row 1 the node
``i`` that attends to it, as everywhere in se3tutor):

- :func:`adjacency_degrees`: from bonds ``adj_mat`` to the number of bonds on the shortest
  path, up to ``num_adj_degrees`` (0: not connected);
- :func:`select_neighbors`: the adjacent nodes (all, or the ``max_sparse_neighbors``
  nearest), then the ``num_neighbors`` nearest others within ``valid_radius``, leaving out
  masked nodes, pairs masked by ``neighbor_mask`` and, for ``causal``, later nodes;
- :func:`edge_features`: distance (or its :func:`fourier_encode`), edge tokens or values,
  adjacency degree.

Unlike 0.9.0, which ranks all ``n - 1`` other nodes of every node by distance, the distance
neighbours come from :func:`se3tutor.radius_graph` (a cell list), so a small radius means
little work; and ``max_sparse_neighbors`` keeps the nearest adjacent nodes where 0.9.0 draws
them at random.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from se3tutor.graph import _keep_nearest, radius_graph

__all__ = ["adjacency_degrees", "edge_features", "fourier_encode", "select_neighbors"]


def adjacency_degrees(adj_mat: torch.Tensor, num_adj_degrees: int = 1) -> torch.Tensor:
    """Number of bonds on the shortest path between two nodes, up to ``num_adj_degrees``
    hops; 0 for farther pairs and on the diagonal.

    Shapes: ``adj_mat [b, n, n]`` (nonzero = bonded) -> ``[b, n, n]`` long.

    >>> chain = torch.tensor([[0, 1, 0], [1, 0, 1], [0, 1, 0]])[None]
    >>> adjacency_degrees(chain, 2)[0].tolist()
    [[0, 1, 2], [1, 0, 1], [2, 1, 0]]
    """
    n = adj_mat.shape[-1]
    bonded = adj_mat.bool()
    degree = bonded.long()
    reached = bonded
    for hops in range(2, num_adj_degrees + 1):  # a loop over hops, not over nodes
        reached_next = (reached.float() @ bonded.float() > 0) | reached
        degree = degree.masked_fill(reached_next & ~reached, hops)
        reached = reached_next
    return degree.masked_fill(torch.eye(n, dtype=torch.bool, device=adj_mat.device), 0)


def select_neighbors(
    pos: torch.Tensor,
    batch: torch.Tensor,
    valid: torch.Tensor,
    n: int,
    *,
    valid_radius: float,
    num_neighbors: float,
    adjacency: Optional[torch.Tensor] = None,
    attend_sparse_neighbors: bool = False,
    max_sparse_neighbors: float = float("inf"),
    neighbor_mask: Optional[torch.Tensor] = None,
    causal: bool = False,
):
    """``edge_index`` (``j -> i``) and, per edge, its graph ``g`` and local indices ``i, j``.

    Adjacent nodes first (``attend_sparse_neighbors``: every pair with ``adjacency > 0``, or
    the ``max_sparse_neighbors`` nearest of them), then the ``num_neighbors`` nearest others
    within ``valid_radius``. Masked nodes (``valid == False``), pairs with ``neighbor_mask ==
    False`` (distance neighbours only) and, for ``causal``, pairs with ``j > i`` are left out
    before the nearest are chosen.

    Shapes: ``pos [b * n, 3]``, ``batch [b * n]`` (the graph of each node), ``valid [b * n]``
    bool, ``adjacency`` and ``neighbor_mask [b, n, n]`` indexed ``[g, i, j]`` ->
    ``edge_index [2, num_edges]``, ``g, i, j [num_edges]``.
    """
    num_nodes = pos.shape[0]
    local = torch.arange(n, device=pos.device).repeat(num_nodes // max(n, 1))

    def allowed(edge_index: torch.Tensor) -> torch.Tensor:
        src, dst = edge_index
        both_valid = valid[src] & valid[dst]
        return both_valid & (local[src] < local[dst]) if causal else both_valid

    pieces = []
    if attend_sparse_neighbors:
        graph, i, j = adjacency.nonzero(as_tuple=True)
        sparse = torch.stack([graph * n + j, graph * n + i])
        sparse = sparse[:, allowed(sparse)]
        if math.isfinite(max_sparse_neighbors):
            sparse = _keep_nearest(sparse, pos, int(max_sparse_neighbors), num_nodes)
        pieces.append(sparse)
    if num_neighbors > 0:
        # Masked nodes are left out before the search: their positions may be anything
        # (padding with NaN, as se3-transformer-pytorch's users do, included).
        kept_nodes = valid.nonzero()[:, 0]
        near = kept_nodes[radius_graph(pos[kept_nodes], valid_radius, batch=batch[kept_nodes])]
        keep = allowed(near)
        pair = batch[near[1]], local[near[1]], local[near[0]]  # [g, i, j] of each edge
        if neighbor_mask is not None:
            keep &= neighbor_mask[pair].bool()
        if adjacency is not None and attend_sparse_neighbors:
            keep &= adjacency[pair] == 0  # adjacent pairs are in the first piece already
        near = near[:, keep]
        if math.isfinite(num_neighbors):
            near = _keep_nearest(near, pos, int(num_neighbors), num_nodes)
        pieces.append(near)
    edge_index = torch.cat(pieces, dim=1)
    return edge_index, batch[edge_index[1]], local[edge_index[1]], local[edge_index[0]]


def fourier_encode(
    x: torch.Tensor, num_encodings: int = 4, include_self: bool = True, flatten: bool = True
) -> torch.Tensor:
    r"""Sines and cosines of ``x`` at ``num_encodings`` scales, and ``x`` itself:
    :math:`[\sin(x / 2^k)]_k, [\cos(x / 2^k)]_k, x` along a new last axis (se3-transformer-
    pytorch's helper of the same name, for continuous edge values).

    Shapes: ``[b, n, n, ...] -> [b, n, n, (...) * (2 * num_encodings + 1)]`` with
    ``flatten`` (the axes after the third merged), else ``[..., 2 * num_encodings + 1]``.

    >>> fourier_encode(torch.zeros(1, 4, 4, 2), num_encodings=8).shape
    torch.Size([1, 4, 4, 34])
    """
    x = x.unsqueeze(-1)
    scales = 2 ** torch.arange(num_encodings, device=x.device, dtype=x.dtype)
    encoded = torch.cat([(x / scales).sin(), (x / scales).cos()], dim=-1)
    if include_self:
        encoded = torch.cat([encoded, x], dim=-1)
    return encoded.flatten(start_dim=3) if flatten else encoded


def edge_features(
    pos: torch.Tensor,
    edge_index: torch.Tensor,
    pair: tuple,
    *,
    fourier_features: int = 0,
    edges: Optional[torch.Tensor] = None,
    edge_emb: Optional[torch.nn.Module] = None,
    adjacency: Optional[torch.Tensor] = None,
    adj_emb: Optional[torch.nn.Module] = None,
) -> torch.Tensor:
    """Invariant features of each edge: the distance (raw, or :func:`fourier_encode`-d with
    ``fourier_features`` scales), the edge's token embedding ``edge_emb(edges)`` or its
    continuous values ``edges``, and the embedding of its adjacency degree.

    Shapes: ``pos [b * n, 3]``, ``edge_index [2, num_edges]``, ``pair`` the ``(g, i, j)`` of
    each edge (:func:`select_neighbors`), ``edges [b, n, n]`` tokens or ``[b, n, n,
    edge_dim]`` values, ``adjacency [b, n, n]`` -> ``[num_edges, edge_attr_dim]``.
    """
    distance = (pos[edge_index[0]] - pos[edge_index[1]]).norm(dim=1, keepdim=True)
    if fourier_features:
        distance = fourier_encode(distance, fourier_features, flatten=False)
        distance = distance.reshape(edge_index.shape[1], -1)
    parts = [distance]
    if edges is not None:
        parts.append(edge_emb(edges[pair]) if edge_emb is not None else edges[pair].to(pos.dtype))
    if adj_emb is not None:
        parts.append(adj_emb(adjacency[pair]))
    return torch.cat(parts, dim=1)
