r"""Checkers for the exercises of the SE(3)-Transformer chapter (book/exercises/transformer.ipynb):
a pre-norm residual block,

.. math:: f \leftarrow f + \mathrm{Attention}(\mathrm{Norm}_1 f), \qquad
          f \leftarrow f + \mathrm{FeedForward}(\mathrm{Norm}_2 f),

and a model that must be made equivariant,

.. math:: L(D_{in}(R) f,\ R x + t) = D_{out}(R)\, L(f, x)

for every rotation (with or without inversion) :math:`R`, translation :math:`t`, and
permutation of the points. The reference for the block is
:class:`se3tutor.transformer.TransformerBlock`.
"""

from __future__ import annotations

from typing import Callable

import torch
from e3nn import o3

from se3tutor.exercises._common import (
    Device,
    as_device,
    call,
    changed_output_problem,
    check_tensor,
    close,
    equivariance_problem,
    fail,
    largest_difference,
    matching_mistake,
    passed,
    report,
    scale_of,
    seeded,
)
from se3tutor.graph import radius_graph
from se3tutor.transformer import SE3Transformer, edge_geometry, hidden_irreps

__all__ = ["check_equivariant", "check_transformer_block"]


def check_transformer_block(block_forward: Callable, device: Device = None) -> None:
    r"""Check ``block_forward(block, f, edges)``, the forward pass of a
    :class:`se3tutor.transformer.TransformerBlock` written with its submodules
    ``block.norm_attention``, ``block.attention`` (called as ``attention(x, edges)``),
    ``block.norm_feed_forward`` and ``block.feed_forward``, against ``block(f, edges)``.

    Shapes: ``f [num_nodes, irreps_hidden.dim]`` -> ``[num_nodes, irreps_hidden.dim]``.

    >>> check_transformer_block(lambda block, f, edges: block(f, edges))
    ✓ transformer_block is correct: [12, 32], equal to TransformerBlock within 1e-5
    """
    name = "transformer_block"
    device = as_device(device)
    with seeded(8):
        model = SE3Transformer("4x0e", hidden_irreps(8, 1), "1x1o", max_radius=2.0, num_layers=1)
        pos = torch.randn(12, 3)
        f = 3 * model.irreps_hidden.randn(12, -1)  # a residual stream of second moment 9
    block = model.blocks[0].to(device)
    f, pos = f.to(device), pos.to(device)
    edges = edge_geometry(pos, radius_graph(pos, 2.0), model.irreps_sh, 2.0, model.number_of_basis)
    with torch.no_grad():
        got = call(block_forward, name, block, f.clone(), edges)
        expected = block(f, edges)
    check_tensor(name, got, f.shape, "output", f)
    if close(got, expected):
        passed(name, f"[{len(f)}, {f.shape[1]}], equal to TransformerBlock within 1e-5")
        return
    attention, feed_forward = block.attention, block.feed_forward
    norm_1, norm_2 = block.norm_attention, block.norm_feed_forward

    def post_norm():
        x = norm_1(f + attention(f, edges))
        return norm_2(x + feed_forward(x))

    def without_residual():
        x = attention(norm_1(f), edges)
        return feed_forward(norm_2(x))

    def parallel():
        return f + attention(norm_1(f), edges) + feed_forward(norm_2(f))

    def stream_replaced():
        x = norm_1(f)
        x = x + attention(x, edges)
        y = norm_2(x)
        return y + feed_forward(y)

    def without_norms():
        x = f + attention(f, edges)
        return x + feed_forward(x)

    hint = matching_mistake(
        got,
        [
            (
                post_norm,
                "you normalise after adding (post-norm, norm(f + A(f))). Pre-norm normalises "
                "the copy that enters the sublayer and adds the result to the un-normalised "
                "stream: f = f + A(norm(f)).",
            ),
            (
                stream_replaced,
                "the residual stream itself is replaced by its normalised copy; add the "
                "sublayer's output to f, and give only the sublayer the normalised copy.",
            ),
            (
                without_residual,
                "the residual connections are missing: each sublayer's output is added to f.",
            ),
            (
                parallel,
                "both sublayers read the same f; the feed-forward sublayer reads the stream "
                "after the attention's update.",
            ),
            (
                without_norms,
                "the sublayers see the un-normalised stream; give each norm(f), with its own "
                "norm (norm_attention, norm_feed_forward).",
            ),
            (
                lambda: f + attention(norm_1(f), edges),
                "the feed-forward sublayer is missing: f = f + feed_forward(norm_feed_forward(f)).",
            ),
        ],
    )
    raise fail(
        name,
        f"Your output differs from the block's by up to {largest_difference(got, expected):.3g} "
        f"(largest entry {scale_of(expected):.3g}).",
        hint or "two lines: f = f + attention(norm_1(f), edges); f = f + feed_forward(norm_2(f)).",
    )


def check_equivariant(
    model: Callable, irreps_in, irreps_out, num_nodes: int = 12, device: Device = None
) -> None:
    r"""Check that ``model(f, pos)`` is equivariant: under translations, rotations, rotations
    with inversion, and permutations of the points (one at a time, so that the message says
    which one breaks it, and in which block of ``irreps_out``), within :math:`10^{-4}` of the
    largest output in float32. It must also use the geometry: an output that is always 0, or
    that does not change when the points move, is equivariant for free.

    Shapes: ``f [num_nodes, irreps_in.dim]``, ``pos [num_nodes, 3]`` ->
    ``[num_nodes, irreps_out.dim]``.

    >>> model = SE3Transformer("1x0e", "8x0e + 8x1o", "1x1o", max_radius=1.5, num_layers=1)
    >>> check_equivariant(model, "1x0e", "1x1o")  # doctest: +ELLIPSIS
    ✓ SE3Transformer is equivariant: translations, rotations, inversion and
    permutations of 12 points, within 1e-4 of the largest output
    """
    name = getattr(model, "__name__", type(model).__name__)
    device = as_device(device)
    irreps_in, irreps_out = o3.Irreps(irreps_in), o3.Irreps(irreps_out)
    with seeded(9):
        pos = torch.randn(num_nodes, 3).to(device)
        f = irreps_in.randn(num_nodes, -1).to(device)
        moved = pos + 0.3 * torch.randn(num_nodes, 3).to(device)
    with torch.no_grad():
        out = call(model, name, f.clone(), pos.clone())
        check_tensor(
            name,
            out,
            (num_nodes, irreps_out.dim),
            "output",
            pos,
            {(num_nodes, 1): f"one row of {irreps_out.dim} numbers ({irreps_out}) per point."},
        )
        if float(out.abs().max()) == 0:
            raise fail(name, "Its output is always 0, which is equivariant, but useless.")
        out_moved = call(model, name, f.clone(), moved)
        if not (isinstance(out_moved, torch.Tensor) and out_moved.shape == out.shape):
            raise fail(name, changed_output_problem("Moving the points a little", out_moved, out))
        if close(out_moved, out, 1e-6):
            raise fail(
                name,
                "Its output does not change when the points move: it does not use the geometry.",
            )
    with seeded(10):
        problem = equivariance_problem(
            lambda f, pos: call(model, name, f, pos), irreps_in, irreps_out, f, pos
        )
    if problem is not None:
        raise fail(name, problem)
    report(
        f"\u2713 {name} is equivariant: translations, rotations, inversion and permutations of "
        f"{num_nodes} points, within 1e-4 of the largest output"
    )
