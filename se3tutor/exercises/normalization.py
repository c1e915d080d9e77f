r"""Checkers for the exercises of the Normalization chapter (book/exercises/normalization.ipynb):
measuring the second moment per irrep type, finding the missing normalisation constants of a
convolution, and an equivariant layer norm

.. math:: y_{u,m} = \frac{x_{u,m}}{\sqrt{\frac{1}{\mathrm{mul}(2l+1)}
          \sum_{u',m'} x_{u',m'}^2 + \epsilon}}.

The references are :func:`se3tutor.norm.second_moment_per_irrep`, :class:`se3tutor.Convolution`
and :class:`se3tutor.norm.EquivariantLayerNorm` (``affine=False``).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from e3nn import o3

from se3tutor.exercises._common import (
    Device,
    as_device,
    call,
    check_tensor,
    close,
    equivariance_problem,
    fail,
    largest_difference,
    matching_mistake,
    passed,
    seeded,
)
from se3tutor.exercises.convolution import _check_convolution_like
from se3tutor.norm import EquivariantLayerNorm, second_moment_per_irrep

__all__ = ["check_layer_norm", "check_normalization", "check_second_moment_per_irrep"]

# The 0e scalars come in two blocks, so that an answer must pool blocks of the same type.
_IRREPS = o3.Irreps("3x0e + 2x1o + 1x2e + 2x0e")
_BLOCK_SCALES = (1.0, 0.5, 2.0, 3.0)


def _features(device, num_nodes=50, seed=4):
    with seeded(seed):
        f = _IRREPS.randn(num_nodes, -1)
    for scale, block in zip(_BLOCK_SCALES, _IRREPS.slices()):
        f[:, block] *= scale
    return f.to(device)


def check_second_moment_per_irrep(moments_fn: Callable, device: Device = None) -> None:
    r"""Check ``second_moment_per_irrep(f, irreps)``, the mean of the squared components of
    ``f`` for each irrep type, pooled over the blocks of that type:

    .. math:: m_{ir} = \frac{1}{N \cdot \mathrm{mul} \cdot (2l+1)} \sum_{n,u,m} f_{n,u,m}^2

    Returns ``{"0e": m, "1o": m, ...}`` (keys ``str(ir)``, values numbers or 0-dim tensors).

    >>> from se3tutor.norm import second_moment_per_irrep
    >>> check_second_moment_per_irrep(second_moment_per_irrep)  # doctest: +ELLIPSIS
    ✓ second_moment_per_irrep is correct: 0e 4.7, 1o 0.279, 2e 3.95 on features of
    irreps 3x0e+2x1o+1x2e+2x0e
    """
    name = "second_moment_per_irrep"
    f = _features(as_device(device))
    got = call(moments_fn, name, f.clone(), _IRREPS)
    expected = {ir: float(m) for ir, m in second_moment_per_irrep(f, _IRREPS).items()}
    if not isinstance(got, dict):
        raise fail(name, f"It returned a {type(got).__name__}; return a dict such as {{'0e': m}}.")
    keys = [str(key) for key in got]
    if sorted(keys) != sorted(expected):
        hint = "one entry per irrep type, with the key str(ir) (ir of `for mul, ir in irreps`)."
        if any("x" in key for key in keys):
            hint = (
                "the keys are irrep types such as '0e', not blocks such as '3x0e': blocks of "
                "the same type are pooled into one entry."
            )
        raise fail(name, f"Its keys are {keys}; expected {sorted(expected)}.", hint)
    try:
        values = {str(key): float(value) for key, value in got.items()}
    except (TypeError, ValueError, RuntimeError):
        raise fail(name, "Its values must be numbers (or tensors with one element).") from None
    for ir in expected:  # a NaN would pass any comparison below (nan > tolerance is False)
        if not math.isfinite(values[ir]):
            raise fail(
                name,
                f"The second moment is {'NaN' if math.isnan(values[ir]) else values[ir]} for "
                f"{ir} (expected {expected[ir]:.4g}); "
                f"it should be a finite number. Blocks of type {ir} in {_IRREPS}: "
                + ", ".join(f"{mul}x{i}" for mul, i in _IRREPS if str(i) == ir)
                + ".",
                "NaN comes from 0 / 0, e.g. dividing by a count of entries that is still 0 "
                "(count the entries of every block of the type), or from the mean of an empty "
                "tensor; inf from dividing by 0.",
            )
    wrong = {ir: values[ir] for ir in expected if not abs(values[ir] / expected[ir] - 1) <= 1e-4}
    if not wrong:
        listing = ", ".join(f"{ir} {m:.3g}" for ir, m in expected.items())
        passed(name, f"{listing} on features of irreps {_IRREPS}")
        return
    listing = ", ".join(f"{ir}: {values[ir]:.4g} (expected {expected[ir]:.4g})" for ir in wrong)
    blocks = [(ir, f[:, block].pow(2)) for (_, ir), block in zip(_IRREPS, _IRREPS.slices())]
    first_0e, last_0e = blocks[0][1].mean(), blocks[3][1].mean()
    mistakes = {
        "you computed the mean squared *norm* of each irrep, which is 2l + 1 times the mean "
        "square of a component in e3nn's component normalisation: average over the 2l + 1 "
        "components too": {
            ir: m * ir.dim for ir, m in ((o3.Irrep(k), v) for k, v in expected.items())
        },
        "that is the root mean square; the second moment is the mean square, without the root": {
            ir: m**0.5 for ir, m in expected.items()
        },
        "the irreps list 0e twice (3x0e at the start, 2x0e at the end), and your value is the "
        "mean of the last block only: pool the squares of both blocks": {"0e": float(last_0e)},
        "the irreps list 0e twice and your value is the mean of the first block only: pool the "
        "squares of both blocks": {"0e": float(first_0e)},
        "you averaged the means of the two 0e blocks; they have 3 and 2 channels, so pool the "
        "squares (sum of squares / number of entries) instead": {
            "0e": float((first_0e + last_0e) / 2)
        },
    }
    for hint, mistake in mistakes.items():
        mistake = {str(ir): float(m) for ir, m in mistake.items()}
        if all(abs(values[ir] / mistake.get(ir, expected[ir]) - 1) < 1e-4 for ir in expected):
            raise fail(name, f"Wrong values: {listing}.", hint + ".")
    raise fail(
        name,
        f"Wrong values: {listing}.",
        "for each (mul, ir) block, f[:, block].pow(2) holds mul * (2l + 1) squares per node; add "
        "the squares of all blocks of one type, divide by their number of entries.",
    )


def check_normalization(normalized_convolution: Callable, device: Device = None) -> None:
    """Check the reader's repair of the convolution whose normalisation constants are missing:
    ``normalized_convolution(layer, f_in, pos, edge_index)`` must keep the second moment at
    about 1 and equal ``layer(f_in, pos, edge_index)`` (a :class:`se3tutor.Convolution`). When
    its output is a multiple of the reference, the message names the missing constants that
    explain the factor.

    >>> check_normalization(lambda layer, f_in, pos, edge_index: layer(f_in, pos, edge_index))
    ... # doctest: +ELLIPSIS
    ✓ normalized_convolution is correct: [24, 12], equal to se3tutor.Convolution...
    """
    _check_convolution_like(normalized_convolution, "normalized_convolution", device)


def check_layer_norm(layer_norm: Callable, device: Device = None) -> None:
    r"""Check ``layer_norm(f, irreps)``: every block of ``mul`` irreps of one node divided by the
    root mean square of its ``mul * (2l + 1)`` components (plus ``eps = 1e-5`` under the root),
    without learned gains or biases; the reference is
    ``EquivariantLayerNorm(irreps, affine=False)``. Also checks that it is equivariant.

    Shapes: ``f [num_nodes, irreps.dim]`` -> ``[num_nodes, irreps.dim]``.

    >>> from se3tutor.norm import EquivariantLayerNorm
    >>> check_layer_norm(lambda f, irreps: EquivariantLayerNorm(irreps, affine=False)(f))
    ... # doctest: +ELLIPSIS
    ✓ layer_norm is correct: every block of every node has second moment 1,
    equivariant, equal to EquivariantLayerNorm(affine=False) within 1e-5
    """
    name = "layer_norm"
    device = as_device(device)
    f = _features(device, num_nodes=30, seed=5)
    f[::3] *= 100.0  # nodes of very different sizes
    reference = EquivariantLayerNorm(_IRREPS, affine=False).to(device)
    got = call(layer_norm, name, f.clone(), _IRREPS)
    expected = reference(f)
    check_tensor(name, got, f.shape, "output", f)
    if close(got, expected):
        with seeded(6):
            pos = torch.randn(len(f), 3).to(device)
            problem = equivariance_problem(
                lambda f, pos: call(layer_norm, name, f, _IRREPS), _IRREPS, _IRREPS, f, pos
            )
        if problem is None:
            passed(
                name,
                "every block of every node has second moment 1, equivariant, equal to "
                "EquivariantLayerNorm(affine=False) within 1e-5",
            )
            return
        raise fail(name, f"Its values are right on these inputs, but: {problem}")

    def per_component():
        return f / (f.pow(2) + 1e-5).sqrt()

    def per_irrep():
        blocks = []
        for (mul, ir), block in zip(_IRREPS, _IRREPS.slices()):
            x = f[:, block].reshape(len(f), mul, ir.dim)
            x = x / (x.pow(2).mean(dim=-1, keepdim=True) + 1e-5).sqrt()
            blocks.append(x.reshape(len(f), -1))
        return torch.cat(blocks, dim=1)

    def sum_not_mean():
        blocks = []
        for block in _IRREPS.slices():
            x = f[:, block]
            blocks.append(x / (x.pow(2).sum(dim=1, keepdim=True) + 1e-5).sqrt())
        return torch.cat(blocks, dim=1)

    hint = matching_mistake(
        got,
        [
            (
                lambda: torch.nn.functional.layer_norm(f, f.shape[1:]),
                "torch's layer norm subtracts the mean of all the numbers of a node, which mixes "
                "the components of vectors with the scalars (the mean of a vector's components "
                "depends on its orientation), so it is not equivariant. Divide each block by "
                "its root mean square, and subtract nothing.",
            ),
            (
                per_component,
                "you divided every component by its own size, which turns every vector into "
                "(+-1, +-1, +-1) and changes its direction. Divide each block by one number.",
            ),
            (
                lambda: EquivariantLayerNorm(_IRREPS, affine=False, scope="node").to(device)(f),
                "that is one root mean square per node, over all its components "
                "(scope='node'); this exercise asks for one per block of irreps of a type.",
            ),
            (
                per_irrep,
                "you divided each irrep by its own root mean square; the layer divides the "
                "whole block of mul irreps by one number, which keeps the ratios between the "
                "channels of the block.",
            ),
            (
                sum_not_mean,
                "you divided by the root of the *sum* of squares; with the root of the *mean* "
                "(sum / (mul * (2l + 1))) every block gets second moment 1.",
            ),
        ],
    )
    moments = [
        float(got[:, block].detach().pow(2).mean(dim=1).mean()) for block in _IRREPS.slices()
    ]
    raise fail(
        name,
        "Second moment of each block of your output, averaged over the nodes: "
        + ", ".join(f"{mul}x{ir} {m:.3g}" for (mul, ir), m in zip(_IRREPS, moments))
        + f" (each should be 1); largest difference from the reference "
        f"{largest_difference(got, expected):.3g}.",
        hint
        or "x = f[:, block].reshape(num_nodes, mul, 2l + 1); divide x by "
        "sqrt(x.pow(2).mean(dim=(1, 2), keepdim=True) + eps).",
    )
