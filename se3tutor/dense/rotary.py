r"""Rotary embeddings of relative positions in equivariant attention (book: The
SE(3)-Transformer).

Rotary embeddings (Su et al. 2021, "RoFormer: Enhanced Transformer with Rotary Position
Embedding") rotate pairs of query and key channels by angles proportional to positions,
:math:`q_i \to R(\theta p_i) q_i`, :math:`k_j \to R(\theta p_j) k_j`, so that the logit

.. math:: R(\theta p_i) q_i \cdot R(\theta p_j) k_j = q_i \cdot R(\theta (p_j - p_i)) k_j

depends on the relative position :math:`p_j - p_i` only. The right-hand side is what
:class:`RotaryKeys` computes: it rotates each edge's key by the relative position of the
edge, and leaves the queries alone. The rotations mix channels of one irrep with invariant
angles; applied to the ``0e`` channels they keep the attention equivariant.

The relative positions come with the edges (``edge_rotary`` of
:class:`se3tutor.dense.variants.DenseEdges`): se3-transformer-pytorch's ``rotary_position``
uses :math:`j - i` (order in the sequence), ``rotary_rel_dist`` uses :math:`100\, r_{ij}`
(see :mod:`se3tutor.dense`).
"""

from __future__ import annotations

import torch
from e3nn import o3

from se3tutor.multihead import EdgeGeometry, MultiHeadAttention

__all__ = ["RotaryKeys", "rotary_frequencies"]

# RoFormer's wavelengths grow geometrically from 2 pi up to 2 pi * BASE.
BASE = 10_000


def rotary_frequencies(num_pairs: int) -> torch.Tensor:
    r""":math:`\theta_p = \mathrm{BASE}^{-p / P}` for the ``num_pairs`` channel pairs
    :math:`p < P` (RoFormer's :math:`10000^{-2p/d}` with :math:`d = 2P`).

    >>> rotary_frequencies(2)
    tensor([1.0000, 0.0100])
    """
    return BASE ** (-torch.arange(num_pairs, dtype=torch.get_default_dtype()) / num_pairs)


class RotaryKeys(MultiHeadAttention):
    r"""Attention whose logits depend on ``rotary_positions`` relative positions per edge
    (module docstring): each key head's ``0e`` channels ``(2p, 2p + 1)`` are rotated by the
    angle :math:`\theta_p\, \Delta_{ij}`, the channels split evenly between the relative
    positions :math:`\Delta_{ij}` (``edge_rotary[:, 0]`` for the first part, and so on).
    Keys that are not edges (a node's own key, null and global keys) have relative position
    0: no rotation. Values are not rotated.

    Shapes: ``edges.edge_rotary [num_edges, rotary_positions]`` (the edges are
    :class:`se3tutor.dense.variants.DenseEdges`).
    """

    def __init__(self, *args, rotary_positions: int = 1, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        scalar_blocks = [i for i, (_, ir) in enumerate(self.irreps_head) if ir == o3.Irrep("0e")]
        num_scalars = self.irreps_head.count("0e")  # per head
        num_pairs = num_scalars // 2 // rotary_positions  # per relative position
        if len(scalar_blocks) != 1 or num_pairs == 0:
            raise ValueError(
                f"rotary embeddings need one 0e block of at least {2 * rotary_positions} "
                f"channels per head, got irreps_head = {self.irreps_head}"
            )
        self.rotary_positions = rotary_positions
        self.register_buffer("frequencies", rotary_frequencies(num_pairs), persistent=False)
        # first[h, p]: the component of irreps_kv that is channel 2p of key head h's 0e block.
        mul = self.irreps_head[scalar_blocks[0]].mul
        block = self.irreps_kv.slices()[scalar_blocks[0]]
        heads = torch.arange(self.key_value_heads())[:, None]
        pairs = torch.arange(rotary_positions * num_pairs)[None, :]
        self.register_buffer("first", block.start + heads * mul + 2 * pairs, persistent=False)

    def edge_keys_values(self, f: torch.Tensor, edges: EdgeGeometry):
        keys, values = super().edge_keys_values(f, edges)
        if edges.edge_rotary is None:
            raise ValueError("this attention rotates the keys: pass edge_rotary")
        # [num_edges, 1, rotary_positions * num_pairs]: each position's angles, side by side
        angle = (edges.edge_rotary[:, :, None] * self.frequencies).flatten(1)[:, None]
        x, y = keys[:, self.first], keys[:, self.first + 1]  # [num_edges, heads, pairs]
        rotated_x = (x * angle.cos() - y * angle.sin()).flatten(1)
        rotated_y = (y * angle.cos() + x * angle.sin()).flatten(1)
        keys = keys.index_copy(1, self.first.flatten(), rotated_x)
        return keys.index_copy(1, self.first.flatten() + 1, rotated_y), values
