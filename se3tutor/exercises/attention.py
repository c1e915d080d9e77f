r"""Checkers for the exercises of the Attention chapter (book/exercises/attention.ipynb): the
softmax over each centre's edges, and the attention layer

.. math:: f'_i = \sum_j \sqrt{\alpha_{ij}}\, v_{ij}, \qquad
          \alpha_{ij} = \frac{c(r_{ij})\, e^{q_i \cdot k_{ij}}}
                             {\sum_{j'} c(r_{ij'})\, e^{q_i \cdot k_{ij'}}}.

The references are :func:`se3tutor.segment_softmax` and :class:`se3tutor.EquivariantAttention`.
"""

from __future__ import annotations

from typing import Callable

import torch
from e3nn import o3

from se3tutor.attention import EquivariantAttention
from se3tutor.exercises._common import (
    Device,
    as_device,
    block_errors,
    call,
    check_tensor,
    close,
    describe_blocks,
    equivariance_problem,
    fail,
    is_finite,
    largest_difference,
    layer_outputs,
    matching_mistake,
    passed,
    scale_of,
    second_moment,
    seeded,
)
from se3tutor.exercises._slips import message_flow_problem, slip_sets, what_slips_give
from se3tutor.graph import radius_graph, scatter, segment_softmax
from se3tutor.radial import embed_edge_length, smooth_cutoff

__all__ = ["check_attention", "check_segment_softmax"]

_SHIFT_HINT = (
    "exp overflows to inf above about 88.7 in float32 (and inf / inf = nan). A softmax does "
    "not change when the same number is subtracted from all the logits of a centre, so "
    "subtract each centre's largest logit first: "
    "scatter(logits, edge_dst, dim=0, dim_size=num_nodes, reduce='max')[edge_dst]."
)


def _centre_sums(alpha, edge_dst, num_nodes):
    return scatter(alpha.detach(), edge_dst, dim=0, dim_size=num_nodes)


def check_segment_softmax(segment_softmax_fn: Callable, device: Device = None) -> None:
    r"""Check ``segment_softmax(logits, edge_dst, num_nodes)``, the softmax over the edges of
    each centre (the edges with the same ``edge_dst``):

    .. math:: \alpha_e = \frac{e^{s_e}}{\sum_{e' \to i} e^{s_{e'}}}

    on random logits, on logits near 100 (where ``exp`` overflows unless each centre's largest
    logit is subtracted first), on centres whose logits differ by hundreds, and its gradient.

    Shapes: ``logits [num_edges]``, ``edge_dst [num_edges]`` -> ``[num_edges]``.

    >>> from se3tutor import segment_softmax
    >>> check_segment_softmax(segment_softmax)  # doctest: +ELLIPSIS
    ✓ segment_softmax is correct: sums to 1 per centre, no overflow for logits near
    100 or -200, gradient equal to the reference
    """
    name = "segment_softmax"
    device = as_device(device)
    num_nodes, num_edges = 6, 20
    with seeded(2):
        edge_dst = torch.cat([torch.arange(5), torch.randint(0, 5, (num_edges - 5,))])
        random_logits = 2 * torch.randn(num_edges)
        probe = torch.randn(num_edges)
    edge_dst, probe = edge_dst.to(device), probe.to(device)
    # Centre 0 and 1: logits near +100 and -200; the others: near 0.
    offset = torch.where(edge_dst == 0, 100.0, torch.where(edge_dst == 1, -200.0, 0.0))
    cases = [
        ("random logits", random_logits.to(device)),
        ("logits near 100", random_logits.to(device) + 100.0),
        (
            "logits near 100 at centre 0 and near -200 at centre 1",
            random_logits.to(device) + offset,
        ),
    ]
    for case, logits in cases:
        given = logits.clone().requires_grad_(True)
        got = call(segment_softmax_fn, name, given, edge_dst.clone(), num_nodes)
        if not torch.equal(given.detach(), logits):
            raise fail(name, "It changed the logits in place.", "compute new tensors instead.")
        expected = segment_softmax(logits, edge_dst, num_nodes)
        if isinstance(got, torch.Tensor) and got.shape == expected.shape:
            non_finite = ~got.detach().isfinite()
            if bool(non_finite.any()):
                centre = int(edge_dst[non_finite.nonzero()[0, 0]])
                hint = _SHIFT_HINT
                if case == "random logits":  # small logits: no overflow
                    hint = (
                        "these logits are small, so exp cannot overflow: NaN comes from 0 / 0 "
                        "(a sum over the wrong edges, or a centre's sum indexed with edge_src "
                        "instead of edge_dst) or from a NaN created in your code."
                    )
                elif case.endswith("centre 1"):
                    hint = (
                        "subtract each centre's own largest logit, not one maximum over all "
                        "edges: after subtracting 100, centre 1's logits are near -300, every "
                        "exp underflows to 0, and 0 / 0 = nan."
                    )
                raise fail(name, f"With {case} it gives NaN or inf at centre {centre}.", hint)
        check_tensor(
            name,
            got,
            (num_edges,),
            "output",
            logits,
            {
                (num_edges, 1): "keep the shape of the logits, [num_edges].",
                (num_nodes,): "a softmax gives one alpha per edge, not one per node.",
            },
        )
        sums = _centre_sums(got, edge_dst, num_nodes)[:5]
        if close(got, expected):
            continue
        if bool((got.detach()[edge_dst == 1] == 0).all()) and case.endswith("centre 1"):
            raise fail(
                name,
                f"With {case}, the alphas of centre 1 are all 0 (they should sum to 1).",
                "subtract each centre's own largest logit, not one maximum over all edges: "
                "after subtracting 100, centre 1's logits are near -300 and every exp underflows.",
            )
        listing = ", ".join(f"{float(s):.3g}" for s in sums)
        hint = matching_mistake(
            got,
            [
                (
                    lambda logits=logits: torch.softmax(logits, dim=0),
                    "you normalised over all edges at once. Divide each edge's exp by the sum "
                    "over the edges of its own centre: scatter(exp, edge_dst, dim=0, "
                    "dim_size=num_nodes)[edge_dst].",
                ),
                (
                    lambda logits=logits: logits.exp(),
                    "the numerators exp(logits) still need dividing by their sum per centre.",
                ),
            ],
        )
        raise fail(
            name,
            f"With {case}, the alphas of each centre should sum to 1; yours sum to {listing} at "
            f"the centres 0-4, and differ from the reference by up to "
            f"{largest_difference(got, expected):.3g}.",
            hint,
        )
    # The gradient, on the random logits: the shift by the maximum must not change it.
    logits = cases[0][1].clone().requires_grad_(True)
    got = call(segment_softmax_fn, name, logits, edge_dst, num_nodes)
    if not got.requires_grad:
        raise fail(
            name,
            "Its output does not depend differentiably on the logits (no gradient reaches them).",
            "do not use torch.no_grad(), .item() or .detach() on the softmax itself (detaching "
            "the maximum that you subtract is fine: alpha does not depend on it).",
        )
    (grad,) = torch.autograd.grad((got * probe).sum(), logits)
    reference = logits.detach().requires_grad_(True)
    (expected_grad,) = torch.autograd.grad(
        (segment_softmax(reference, edge_dst, num_nodes) * probe).sum(), reference
    )
    if not is_finite(grad):
        raise fail(
            name,
            "The values are right, but the gradient with respect to the logits contains NaN or "
            "inf.",
            "torch.where differentiates both branches: a branch that overflows (exp of large "
            "logits) or divides by 0 poisons the gradient even where it is not selected.",
        )
    if not close(grad, expected_grad, 1e-4):
        raise fail(
            name,
            "The values are right, but the gradient with respect to the logits differs from the "
            f"reference by up to {largest_difference(grad, expected_grad):.3g}.",
            "only the subtracted maximum may be detached; the sum z in the denominator depends "
            "on the logits and must stay in the graph.",
        )
    passed(
        name,
        "sums to 1 per centre, no overflow for logits near 100 or -200, gradient equal to the "
        "reference",
    )


# ------------------------------------------------------------------------ the attention layer


def _problem(device: torch.device):
    """An attention layer, its input, and a directed graph whose last node has no neighbour:
    a radius graph with 15 % of its edges dropped, so that some edges go one way only (on a
    symmetric graph, edge_src and edge_dst swapped everywhere give the same output)."""
    with seeded(3):
        layer = EquivariantAttention(
            "4x0e + 2x1o",
            "3x0e + 2x1o",
            "3x0e + 2x1o",
            "2x0e + 2x1o + 1x1e",
            "0e + 1o + 2e",
            6,
            1.5,
        )
        pos = torch.cat([torch.randn(15, 3), torch.full((1, 3), 10.0)])
        f = layer.irreps_in.randn(len(pos), -1)
        edge_index = radius_graph(pos, 1.5)
        edge_index = edge_index[:, torch.rand(edge_index.shape[1]) >= 0.15]
    return layer.to(device), f.to(device), pos.to(device), edge_index.to(device)


def _variant(
    layer,
    f,
    pos,
    edge_index,
    swap=False,
    sign=1.0,
    sender="src",
    query="dst",
    group="dst",
    onto="dst",
    normalize=True,
    embedding_cutoff=True,
    cutoff_weight=True,
    weight_by="sqrt",
):
    """The chapter's attention with some of its typical slips."""
    edge_src, edge_dst = edge_index.flip(0) if swap else edge_index
    index = {"src": edge_src, "dst": edge_dst}
    edge_vec = sign * (pos[edge_src] - pos[edge_dst])
    edge_length = edge_vec.norm(dim=1)
    embedded = embed_edge_length(
        edge_length, layer.max_radius, layer.number_of_basis, cutoff=embedding_cutoff
    )
    edge_sh = o3.spherical_harmonics(
        layer.irreps_sh, edge_vec, normalize, normalization="component"
    )
    q = layer.h_q(f)
    k = layer.tp_k(f[index[sender]], edge_sh, layer.fc_k(embedded))
    v = layer.tp_v(f[index[sender]], edge_sh, layer.fc_v(embedded))
    logits = layer.dot(q[index[query]], k)
    weight = smooth_cutoff(edge_length, layer.max_radius) if cutoff_weight else None
    alpha = segment_softmax(logits, index[group], len(f), weight=weight)
    alpha = alpha.relu().sqrt() if weight_by == "sqrt" else alpha
    return scatter(alpha * v, index[onto], dim=0, dim_size=len(f))


# The typical slips: the keyword arguments of _variant that make them, and what to say.
_SLIPS = {
    "swap": (
        {"swap": True},
        "edge_src and edge_dst are swapped everywhere. On a radius graph every edge also goes "
        "the other way, so that gives the same output there; this graph has edges that go one "
        "way only. Messages flow from the neighbour edge_src (row 0 of edge_index) to the "
        "centre edge_dst (row 1): edge_src, edge_dst = edge_index.",
    ),
    "sign": (
        {"sign": -1.0},
        "your edge vectors point from the neighbour to the centre; se3tutor's convention "
        "is pos[edge_src] - pos[edge_dst].",
    ),
    "sender": (
        {"sender": "dst"},
        "the keys and values are made from the centre's features f[edge_dst]; they carry the "
        "neighbour's, f[edge_src].",
    ),
    "query": (
        {"query": "src"},
        "the query belongs to the centre that receives the message: q[edge_dst].",
    ),
    "group": (
        {"group": "src"},
        "the softmax is grouped by edge_src, so the alphas of the edges that leave a node sum "
        "to 1. Those that must sum to 1 are the alphas of the edges that arrive at a centre: "
        "segment_softmax(logits, edge_dst, num_nodes, weight=c).",
    ),
    "onto": (
        {"onto": "src"},
        "the values are summed onto edge_src. They belong to the centre that receives them: "
        "scatter(sqrt(alpha) * v, edge_dst, dim=0, dim_size=num_nodes).",
    ),
    "normalize": (
        {"normalize": False},
        "the harmonics are of the raw edge vectors (normalize=False): e3nn then returns "
        "|x|^l Y(x / |x|), still equivariant, but the l >= 1 harmonics grow with the edge "
        "length. Pass normalize=True: the length enters through the radial embedding only.",
    ),
    "embedding": (
        {"embedding_cutoff": False},
        "the lengths are embedded with cutoff=False; the attention layer uses cutoff=True, so "
        "that keys and values fade out at max_radius.",
    ),
    "cutoff weight": (
        {"cutoff_weight": False},
        "the softmax lacks the cutoff weight: multiply each numerator exp(q . k) by "
        "c(r) = se3tutor.radial.smooth_cutoff(edge_length, max_radius), so that an edge "
        "fades in and out of the softmax at the cutoff.",
    ),
    "alpha": (
        {"weight_by": "alpha"},
        "the values are weighted by alpha; weight them by sqrt(alpha). The alphas of a "
        "centre sum to 1, so the sum of the squared weights, sqrt(alpha)^2, is 1 too, "
        "and the output keeps the second moment of the values (with alpha it shrinks "
        "like 1 / (number of neighbours)).",
    ),
}
# swap flips every index at once: with another index slip it is a set of index slips.
_INDEX_FLIPS = [{"swap", other} for other in ("sign", "sender", "query", "group", "onto")]


def check_attention(attention: Callable, device: Device = None) -> None:
    r"""Check ``attention(layer, f, pos, edge_index)``, the forward pass of the Attention
    chapter written with the submodules of ``layer``, a :class:`se3tutor.EquivariantAttention`
    (``h_q``, ``tp_k``, ``fc_k``, ``tp_v``, ``fc_v``, ``dot``, and ``irreps_sh``,
    ``max_radius``, ``number_of_basis``), against ``layer(f, pos, edge_index)``, on a graph
    with edges that go one way only.

    Shapes: ``f [num_nodes, irreps_in.dim]``, ``pos [num_nodes, 3]``,
    ``edge_index [2, num_edges]`` -> ``[num_nodes, irreps_out.dim]``.

    >>> check_attention(lambda layer, f, pos, edge_index: layer(f, pos, edge_index))
    ✓ attention is correct: [16, 11], equal to EquivariantAttention within 1e-5
    """
    name = "attention"
    layer, f, pos, edge_index = _problem(as_device(device))
    num_nodes, dim = len(pos), layer.irreps_out.dim
    got, expected = layer_outputs(
        attention, name, layer, f, pos, edge_index,
        "sum sqrt(alpha) * v over the edges of each centre with "
        "scatter(..., edge_dst, dim=0, dim_size=num_nodes).",
    )  # fmt: skip
    if close(got, expected):
        passed(name, f"[{num_nodes}, {dim}], equal to EquivariantAttention within 1e-5")
        return
    measured = (
        f"The second moment of your output is {second_moment(got):.3g}, the reference's "
        f"{second_moment(expected):.3g}."
    )
    args = (layer, f, pos, edge_index)
    for slips in slip_sets(list(_SLIPS), 2, _INDEX_FLIPS):
        with torch.no_grad():
            wrong = _variant(*args, **{k: v for s in slips for k, v in _SLIPS[s][0].items()})
        if close(got, wrong, 1e-4):
            hints = [_SLIPS[slip][1] for slip in slips]
            raise fail(name, f"{measured} Your output is exactly what {what_slips_give(hints)}")
    steps = (
        "the steps: edge vectors, embedded lengths (cutoff=True), harmonics (normalize=True), "
        "q = h_q(f), keys and values from tp_k/tp_v of f[edge_src] with fc_k/fc_v weights, "
        "logits = dot(q[edge_dst], k), softmax over the edges of each centre (edge_dst) with "
        "the cutoff weight, scatter of sqrt(alpha) * v onto edge_dst."
    )
    flow = message_flow_problem(attention, name, layer, layer.irreps_in, layer.max_radius, pos)
    if flow is not None:
        raise fail(name, f"{measured} {flow}", steps)
    problem = equivariance_problem(
        lambda f, p: call(attention, name, layer, f, p, edge_index),
        layer.irreps_in,
        layer.irreps_out,
        f,
        pos,
        permute=False,
    )
    raise fail(
        name,
        f"{measured} Your output differs from se3tutor.EquivariantAttention's by up to "
        f"{largest_difference(got, expected):.3g} (largest entry {scale_of(expected):.3g}); "
        f"{describe_blocks(block_errors(got - expected, layer.irreps_out))}. "
        + (
            problem
            or "It is equivariant, which does not make it right: no known slip, alone or with "
            "another, gives your output, so compare each step with the chapter's."
        ),
        steps,
    )
