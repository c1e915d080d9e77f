"""What the two layer checkers (convolution, attention) share beyond :mod:`._common`: the
reference run with typical slips, one or two at a time, and a probe of where the answer sends a
message and whose features the message carries.

A slip that keeps the layer equivariant (an index swapped, the harmonics of unnormalised
vectors) passes every symmetry test, so it is named by comparison with the reference computed
with that slip, or by the probe, which works whatever else is wrong.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from typing import Callable, Optional

import torch

from se3tutor.exercises._common import call, close, is_finite, scale_of, seeded


def slip_sets(
    slips: Sequence[str], max_size: int = 2, equivalent: Sequence[set] = ()
) -> Iterator[tuple[str, ...]]:
    """The sets of at most ``max_size`` of ``slips``, the smaller first, leaving out the sets
    with two slips of one group of ``equivalent`` (groups whose pairs equal another set: two of
    three sign flips are the third)."""
    for size in range(1, max_size + 1):
        for names in itertools.combinations(slips, size):
            if not any(len(group.intersection(names)) > 1 for group in equivalent):
                yield names


def what_slips_give(hints: Sequence[str]) -> str:
    """``"this slip gives: ..."`` or ``"these slips give: (1) ...; (2) ..."``."""
    if len(hints) == 1:
        return f"this slip gives: {hints[0].rstrip('.')}."
    listing = "; ".join(f"({n}) {hint.rstrip('.')}" for n, hint in enumerate(hints, 1))
    return f"these slips give: {listing}."


def message_flow_problem(
    function: Callable, name: str, layer, irreps_in, max_radius: float, like: torch.Tensor
) -> Optional[str]:
    """Where ``function(layer, f, pos, edge_index)`` puts the message of a graph with one edge,
    from node 0 to node 1 of three nearby nodes, and whose features it carries: the output must
    be 0 but on node 1 (the centre, ``edge_dst``), and depend on the features of node 0 (the
    neighbour, ``edge_src``), not on those of node 1. A description of the slip, or ``None``
    when the answer gets this right or the probe cannot tell (another shape, no output)."""
    edge_index = torch.tensor([[0], [1]], device=like.device)
    pos = max_radius * torch.tensor(
        [[0.0, 0.0, 0.0], [0.5, 0.2, -0.1], [-0.3, 0.4, 0.2]], dtype=like.dtype
    ).to(like.device)
    with seeded(12, like.dtype):
        f, other = irreps_in.randn(3, -1).to(like.device), irreps_in.randn(3, -1).to(like.device)

    def run(f):
        with torch.no_grad():
            out = call(function, name, layer, f, pos.clone(), edge_index.clone())
        ok = isinstance(out, torch.Tensor) and out.shape == (3, layer.irreps_out.dim)
        return out if ok and is_finite(out) else None

    out = run(f)
    if out is None or float(out.abs().max()) == 0:
        return None
    reached = (out.abs().amax(dim=1) > 1e-6 * scale_of(out)).tolist()

    def depends_on(node):
        changed = f.clone()
        changed[node] = other[node]
        new = run(changed)
        return new is not None and not close(new, out)

    onto_src = reached == [True, False, False]
    reads_dst_only = depends_on(1) and not depends_on(0)
    probe = "On a graph with one edge, from node 0 (edge_src) to node 1 (edge_dst), your output "
    if onto_src and reads_dst_only:
        return (
            f"{probe}is non-zero on node 0 only and depends on the features of node 1 only: "
            "edge_src and edge_dst are swapped everywhere. Messages flow from the neighbour "
            "edge_src (row 0 of edge_index) to the centre edge_dst (row 1)."
        )
    if onto_src:
        return (
            f"{probe}is non-zero on node 0 only: the messages are summed onto edge_src. They "
            "belong to the centre that receives them: scatter(..., edge_dst, dim=0, "
            "dim_size=num_nodes)."
        )
    if reached == [False, True, False] and reads_dst_only:
        return (
            f"{probe}depends on the features of node 1, the centre, and not on those of node "
            "0: the message carries f[edge_dst]; it carries the neighbour's features, "
            "f[edge_src]."
        )
    return None
