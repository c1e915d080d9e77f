r"""Checkers for the exercises of the Convolution chapter (book/exercises/convolution.ipynb); the
layer check is shared with "find the missing normalisation" (book/exercises/normalization.ipynb),
which repairs the same layer.

The layer is the chapter's

.. math:: f'_i = \frac{1}{\sqrt{z}} \sum_{j \in \partial(i)}
          f_j \otimes_{h(e(\|x_{ij}\|))} Y(x_{ij} / \|x_{ij}\|),
          \qquad e(r) = \sqrt{B}\ \mathrm{soft\_one\_hot\_linspace}(r, 0, r_{max}, B),

and the reference is :class:`se3tutor.Convolution`.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from e3nn import o3
from e3nn.math import soft_one_hot_linspace

from se3tutor.conv import Convolution
from se3tutor.exercises._common import (
    Device,
    as_device,
    block_errors,
    call,
    check_tensor,
    close,
    describe_blocks,
    equivariance_problem,
    explain_factor,
    fail,
    largest_difference,
    layer_outputs,
    matching_mistake,
    passed,
    scalar_factor,
    scale_of,
    second_moment,
    seeded,
)
from se3tutor.exercises._slips import message_flow_problem, slip_sets, what_slips_give
from se3tutor.graph import radius_graph, scatter
from se3tutor.norm import second_moment_per_irrep
from se3tutor.radial import embed_edge_length

__all__ = ["check_convolution", "check_radial_embedding"]


def check_radial_embedding(radial_embedding: Callable, device: Device = None) -> None:
    r"""Check ``radial_embedding(edge_length, max_radius, number_of_basis)``, the embedding of
    the Convolution chapter:

    .. math:: e_k(r) = \sqrt{B}\ \mathrm{soft\_one\_hot\_linspace}(r, 0, r_{max}, B,
              \texttt{"smooth\_finite"}, \texttt{cutoff=False})_k

    Shapes: ``edge_length [num_edges]`` -> ``[num_edges, number_of_basis]``.

    >>> from se3tutor.radial import embed_edge_length
    >>> check_radial_embedding(lambda r, r_cut, b: embed_edge_length(r, r_cut, b, cutoff=False))
    ... # doctest: +ELLIPSIS
    ✓ radial_embedding is correct: [num_edges, number_of_basis], equal to the
    reference within 1e-5 for two settings, second moment 0.995
    """
    name = "radial_embedding"
    device = as_device(device)
    moment = _check_radial_setting(radial_embedding, name, 1.8, 10, 400, device)
    # A second setting catches numbers written where the arguments belong.
    _check_radial_setting(radial_embedding, name, 3.0, 6, 300, device)
    passed(
        name,
        "[num_edges, number_of_basis], equal to the reference within 1e-5 for two settings, "
        f"second moment {moment:.3g}",
    )


def _check_radial_setting(
    radial_embedding, name, max_radius, number_of_basis, num_edges, device
) -> float:
    with seeded(0):
        edge_length = torch.rand(num_edges) * max_radius
    edge_length[:2] = torch.tensor([0.0, max_radius * (1 - 1e-6)])
    edge_length = edge_length.to(device)
    got = call(radial_embedding, name, edge_length.clone(), max_radius, number_of_basis)
    check_tensor(
        name,
        got,
        (num_edges, number_of_basis),
        "embedding",
        edge_length,
        {
            (num_edges,): "return all B bump values of every edge, not one number per edge.",
            (num_edges, 10): "right for number_of_basis=10, wrong for 6: did you write a "
            "number where the argument number_of_basis belongs?",
        },
    )
    expected = embed_edge_length(edge_length, max_radius, number_of_basis, cutoff=False)
    if close(got, expected):
        return second_moment(got)
    if max_radius != 1.8:
        raise fail(
            name,
            f"It is right for max_radius=1.8, number_of_basis=10 but not for "
            f"max_radius={max_radius}, number_of_basis={number_of_basis}.",
            "did you write a number where the arguments max_radius or number_of_basis belong?",
        )

    def bumps(basis="smooth_finite", cutoff=False):
        return soft_one_hot_linspace(edge_length, 0.0, max_radius, number_of_basis, basis, cutoff)

    root_b = math.sqrt(number_of_basis)
    measured = (
        f"The second moment of your embedding is {second_moment(got):.3g} over {num_edges} "
        f"lengths in [0, max_radius]; the reference's is {second_moment(expected):.3g}."
    )
    hint = matching_mistake(
        got,
        [
            (
                bumps,
                "soft_one_hot_linspace's bumps have squares that sum to 1 on average over "
                "[0, max_radius] (0.69 to 1.30 at one length, for B = 10), so the mean square "
                "of the B numbers is about 1/B: multiply by sqrt(number_of_basis).",
            ),
            (lambda: bumps() * number_of_basis, "multiply by sqrt(B), not by B."),
            (
                lambda: bumps(cutoff=True) * root_b,
                "cutoff=True squeezes the bumps inside (0, max_radius) so that all vanish "
                "at max_radius; this chapter follows e3nn's convolution guide, cutoff=False.",
            ),
            (
                lambda: bumps(cutoff=True),
                "two things: the chapter uses cutoff=False, and the bumps need the factor "
                "sqrt(number_of_basis) to have a second moment of about 1.",
            ),
        ]
        + [
            (
                lambda basis=basis: bumps(basis) * root_b,
                f"you used basis={basis!r}; the chapter's bumps are 'smooth_finite'.",
            )
            for basis in ("gaussian", "cosine", "fourier", "bessel")
        ],
    )
    if hint is not None:
        raise fail(name, measured, hint)
    edge, bump = divmod(int((got - expected).abs().argmax()), number_of_basis)
    raise fail(
        name,
        f"{measured} The largest difference is at the length r = "
        f"{float(edge_length[edge]):.4g} (row {edge}), bump {bump}: expected "
        f"{float(expected[edge, bump]):.4g}, got {float(got[edge, bump]):.4g}.",
        "soft_one_hot_linspace(edge_length, start=0.0, end=max_radius, "
        'number=number_of_basis, basis="smooth_finite", cutoff=False), times sqrt(B).',
    )


# ----------------------------------------------------------------- the convolution, and its fix


def _problem(device: torch.device):
    """A Convolution that uses the l = 1 harmonics (so that the edge vector's sign matters),
    its input, and a directed graph whose last node has no neighbour.

    The graph is a radius graph with 15 % of its edges dropped, so that some edges go one way
    only (on a symmetric graph, edge_src and edge_dst swapped everywhere give the same sum);
    the layer's z is the mean degree before the drop, so that it differs from the mean degree
    of the graph it is given (7.58 and 6.5), as a z averaged over a data set does.
    """
    with seeded(21):  # a draw whose output has second moments between 0.8 and 1.2
        pos = torch.cat([torch.randn(23, 3), torch.full((1, 3), 10.0)])
        edge_index = radius_graph(pos, 1.6)
        num_neighbors = edge_index.shape[1] / len(pos)
        layer = Convolution(
            "4x0e + 2x1o", "3x0e + 2x1o + 1x1e", "0e + 1o + 2e", 8, 1.6, num_neighbors
        )
        f_in = layer.irreps_in.randn(len(pos), -1)
        edge_index = edge_index[:, torch.rand(edge_index.shape[1]) >= 0.15]
    return layer.to(device), f_in.to(device), pos.to(device), edge_index.to(device)


def _variant(
    layer,
    f_in,
    pos,
    edge_index,
    swap=False,
    sign=1.0,
    sender="src",
    onto="dst",
    normalize=True,
    normalization="component",
    cutoff=False,
):
    """The chapter's convolution with some of its typical slips (those that are not a constant
    factor: :func:`explain_factor` recognises the others)."""
    edge_src, edge_dst = edge_index.flip(0) if swap else edge_index
    edge_vec = sign * (pos[edge_src] - pos[edge_dst])
    edge_sh = o3.spherical_harmonics(
        layer.irreps_sh, edge_vec, normalize=normalize, normalization=normalization
    )
    embedded = soft_one_hot_linspace(
        edge_vec.norm(dim=1), 0.0, layer.max_radius, layer.number_of_basis, "smooth_finite", cutoff
    )
    sender = edge_src if sender == "src" else edge_dst
    summand = layer.tp(f_in[sender], edge_sh, layer.fc(embedded * layer.number_of_basis**0.5))
    f_out = scatter(summand, edge_dst if onto == "dst" else edge_src, dim=0, dim_size=len(pos))
    return f_out / layer.num_neighbors**0.5


# Slips that change the output by more than a constant factor: the keyword arguments of
# _variant that make them, and what to say.
_SLIPS = {
    "swap": (
        {"swap": True},
        "edge_src and edge_dst are swapped everywhere. On a radius graph every edge also goes "
        "the other way, so that gives the same sum there; this graph has edges that go one way "
        "only. Messages flow from the neighbour edge_src (row 0 of edge_index) to the centre "
        "edge_dst (row 1): edge_src, edge_dst = edge_index.",
    ),
    "sign": (
        {"sign": -1.0},
        "your edge vectors point from the neighbour to the centre. se3tutor's convention "
        "is x_ij = x_j - x_i = pos[edge_src] - pos[edge_dst]; the odd harmonics (l = 1) "
        "change sign with it.",
    ),
    "sender": (
        {"sender": "dst"},
        "the message to centre i carries the neighbour's features f_j = f_in[edge_src], "
        "not the centre's own f_in[edge_dst].",
    ),
    "onto": (
        {"onto": "src"},
        "the messages are summed onto edge_src. They belong to the centre that receives them: "
        "scatter(summand, edge_dst, dim=0, dim_size=num_nodes).",
    ),
    "normalize": (
        {"normalize": False},
        "the harmonics are of the raw edge vectors (normalize=False): e3nn then returns "
        "|x|^l Y(x / |x|), still equivariant, but the l >= 1 harmonics grow with the edge "
        "length. Pass normalize=True: the length enters through the radial embedding only.",
    ),
    "cutoff": (
        {"cutoff": True},
        "the embedding should use cutoff=False here, as the Convolution chapter does.",
    ),
    "norm": (
        {"normalization": "norm"},
        'the harmonics are in normalization="norm" (each irrep of norm 1, components '
        '1/(2l+1)); the layers expect normalization="component".',
    ),
}
# Two of these three flips are the third: the pair is the other slip.
_INDEX_FLIPS = [{"swap", "sign", "sender"}, {"swap", "sign", "onto"}, {"swap", "sender", "onto"}]


def _factor_slips(layer, num_edges: int, num_nodes: int) -> tuple[dict, list]:
    """The slips that multiply the output by a constant, with their factors, and the groups
    of slips that exclude each other (one constant got wrong in different ways)."""
    z, number_of_basis = layer.num_neighbors, layer.number_of_basis
    degree = num_edges / num_nodes
    division = {
        "the sum is not divided by sqrt(z): did you divide by sqrt(num_neighbors)? A sum of z "
        "uncorrelated messages of second moment 1 has second moment z": math.sqrt(z),
        "the sum is divided by z, not by sqrt(z) (second moments add, so the root of z is "
        "what brings z messages back to 1)": 1 / math.sqrt(z),
        f"the sum is divided by the square root of this graph's mean degree, num_edges / "
        f"num_nodes = {degree:.3g}; divide by the root of z = layer.num_neighbors = {z:.3g}, "
        "a constant of the layer (an average over the data), not of the graph at "
        "hand": math.sqrt(z / degree),
        f"the sum is divided by this graph's mean degree, num_edges / num_nodes = "
        f"{degree:.3g}; divide by sqrt(layer.num_neighbors) = sqrt({z:.3g})": math.sqrt(z) / degree,
    }
    embedding = {
        "the embedding lacks the factor sqrt(B) = sqrt(number_of_basis), so its second moment is "
        "1/B instead of 1 (the radial MLP, relu and no biases, passes the factor on)": 1
        / math.sqrt(number_of_basis),
        "the embedding is multiplied by B, not sqrt(B)": math.sqrt(number_of_basis),
    }
    harmonics = {
        "the spherical harmonics are in e3nn's default normalization='integral', which is "
        "1/sqrt(4 pi) times 'component': pass normalization='component'": 1
        / math.sqrt(4 * math.pi),
    }
    return {**division, **harmonics, **embedding}, [set(division), set(embedding)]


def _check_convolution_like(function: Callable, name: str, device) -> None:
    layer, f_in, pos, edge_index = _problem(as_device(device))
    num_nodes, dim = len(pos), layer.irreps_out.dim
    got, expected = layer_outputs(
        function, name, layer, f_in, pos, edge_index,
        "add the messages of each centre with "
        "scatter(summand, edge_dst, dim=0, dim_size=num_nodes).",
    )  # fmt: skip
    irreps = layer.irreps_out
    moments = {ir: float(m) for ir, m in second_moment_per_irrep(got, irreps).items()}
    reference_moments = {
        ir: float(m) for ir, m in second_moment_per_irrep(expected, irreps).items()
    }
    measured = (
        "Second moment of your output per irrep type: "
        + ", ".join(f"{ir} {m:.3g}" for ir, m in moments.items())
        + "; the reference layer's: "
        + ", ".join(f"{ir} {m:.3g}" for ir, m in reference_moments.items())
        + "."
    )
    if close(got, expected):
        passed(
            name,
            f"[{num_nodes}, {dim}], equal to se3tutor.Convolution within 1e-5, second moment "
            f"{second_moment(got):.2f}",
        )
        return

    if float(got.abs().max()) == 0:
        raise fail(
            name,
            f"{measured} Your output is all 0.",
            "add the messages onto their centres: scatter(summand, edge_dst, dim=0, "
            "dim_size=num_nodes) returns a new tensor (and index_add_, with the underscore, adds "
            "in place); a torch.zeros(...) that nothing is added to stays 0.",
        )
    args = (layer, f_in, pos, edge_index)
    factors, exclusive = _factor_slips(layer, edge_index.shape[1], num_nodes)
    # The reference and the variants with one or two slips: is the answer one of them, or one
    # of them times a product of the constant factors?
    for slips in [(), *slip_sets(list(_SLIPS), 2, _INDEX_FLIPS)]:
        hints = [_SLIPS[slip][1] for slip in slips]
        if slips:
            with torch.no_grad():
                wrong = _variant(*args, **{k: v for s in slips for k, v in _SLIPS[s][0].items()})
            if close(got, wrong, 1e-4):
                raise fail(name, f"{measured} Your output is exactly what {what_slips_give(hints)}")
        else:
            wrong = expected
        factor = scalar_factor(got, wrong)
        causes = None if factor is None else explain_factor(factor, factors, 3, exclusive)
        if causes is not None and slips:
            raise fail(
                name,
                f"{measured} Your output is exactly what {what_slips_give(hints + causes)}",
            )
        if causes is not None:
            raise fail(
                name,
                f"{measured} Your output is exactly {factor:.4g} times the reference, which is "
                f"what {what_slips_give(causes)}",
            )
    factor = scalar_factor(got, expected)
    if factor is not None:
        raise fail(
            name,
            f"{measured} Your output is {factor:.4g} times the reference: a normalisation "
            "constant is off.",
            "measure the second moment after each step (embedding, harmonics, weights, "
            "messages, sum); each should be about 1.",
        )
    steps = (
        "follow the chapter's steps: edge vectors, harmonics (normalize=True), embedded "
        "lengths, layer.fc, layer.tp(f_in[edge_src], edge_sh, weights), scatter onto edge_dst, "
        "divide by sqrt(z)."
    )
    flow = message_flow_problem(function, name, layer, layer.irreps_in, layer.max_radius, pos)
    if flow is not None:
        raise fail(name, f"{measured} {flow}", steps)
    problem = equivariance_problem(
        lambda f, p: call(function, name, layer, f, p, edge_index),
        layer.irreps_in,
        irreps,
        f_in,
        pos,
        permute=False,
    )
    raise fail(
        name,
        f"{measured} Your output differs from se3tutor.Convolution's by up to "
        f"{largest_difference(got, expected):.3g} (largest entry {scale_of(expected):.3g}); "
        f"{describe_blocks(block_errors(got - expected, irreps))}. "
        + (
            problem
            or "It is equivariant, which does not make it right: no known slip, alone or with "
            "another, gives your output, so compare each step with the chapter's."
        ),
        steps,
    )


def check_convolution(convolution: Callable, device: Device = None) -> None:
    r"""Check ``convolution(layer, f_in, pos, edge_index)``, the forward pass of the Convolution
    chapter written with the submodules and constants of ``layer``, a
    :class:`se3tutor.Convolution` (``layer.tp``, ``layer.fc``, ``layer.irreps_sh``,
    ``layer.max_radius``, ``layer.number_of_basis``, ``layer.num_neighbors``), against
    ``layer(f_in, pos, edge_index)``, on a graph with edges that go one way only and a mean
    degree other than ``layer.num_neighbors`` (so that neither swapping ``edge_src`` and
    ``edge_dst`` nor taking z from the graph goes unnoticed).

    Shapes: ``f_in [num_nodes, irreps_in.dim]``, ``pos [num_nodes, 3]``,
    ``edge_index [2, num_edges]`` -> ``[num_nodes, irreps_out.dim]``.

    >>> check_convolution(lambda layer, f_in, pos, edge_index: layer(f_in, pos, edge_index))
    ... # doctest: +ELLIPSIS
    ✓ convolution is correct: [24, 12], equal to se3tutor.Convolution within 1e-5...
    """
    _check_convolution_like(convolution, "convolution", device)
