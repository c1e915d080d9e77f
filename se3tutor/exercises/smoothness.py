r"""Checkers for the exercises of the Smoothness chapter (book/exercises/smoothness.ipynb): a
smooth cutoff weight, and a convolution whose output and force are continuous when a neighbour
crosses the cutoff sphere.

Both are checked in float64, where a derivative that should vanish is distinguishable from
rounding.
"""

from __future__ import annotations

from typing import Callable

import torch
from e3nn import o3

from se3tutor.checks import default_dtype, derivatives, largest_jumps
from se3tutor.exercises._common import (
    Device,
    as_device,
    call,
    check_tensor,
    fail,
    is_finite,
    passed,
    seeded,
)
from se3tutor.radial import smooth_cutoff

__all__ = ["check_smooth_cutoff", "check_smooth_layer"]

_DTYPE = torch.float64


def _nan_gradient_at(function: Callable, r: torch.Tensor):
    """The first length at which the gradient of ``function`` is not finite, or ``None``."""
    r = r.detach().clone().requires_grad_(True)
    out = function(r)
    if not out.requires_grad:  # piecewise constant: its gradient is 0 wherever it exists
        return None
    (grad,) = torch.autograd.grad(out.sum(), r, allow_unused=True)
    if grad is None:
        return None
    bad = ~grad.isfinite()
    return float(r.detach()[bad][0]) if bool(bad.any()) else None


def check_smooth_cutoff(cutoff: Callable, device: Device = None) -> None:
    r"""Check ``cutoff(edge_length, max_radius)``, a weight :math:`c(r)` for the attention
    softmax that lets an edge fade out at the cutoff:

    - :math:`c(r) = 0` for :math:`r \ge r_{max}`, :math:`0 \le c \le 1`, close to 1 well inside;
    - :math:`c` and :math:`c'` go to 0 as :math:`r \to r_{max}` from inside (no jump, no kink),
      and :math:`c'` is continuous inside the sphere;
    - the gradient is finite at every length, at and beyond :math:`r_{max}` too.

    The book's :math:`c(r) = u(10 (1 - r / r_{max}))`, :math:`u(x) = e^{-1/x}` for
    :math:`x > 0`, has every derivative vanish at :math:`r_{max}`; a cutoff that is only
    :math:`C^1` there passes, with a remark.

    Shapes: ``edge_length [num_edges]`` -> ``[num_edges]``.

    >>> from se3tutor.radial import smooth_cutoff
    >>> check_smooth_cutoff(smooth_cutoff)  # doctest: +ELLIPSIS
    ✓ smooth_cutoff is correct: 0 at and beyond max_radius, value and every
    derivative checked (up to the 2nd) vanish there, finite gradients; it is the
    book's c(r)
    """
    name = "smooth_cutoff"
    device = as_device(device)
    max_radius = 1.3

    def c(r):
        return call(cutoff, name, r, max_radius)

    r = torch.linspace(0.0, 2 * max_radius, 2001, dtype=_DTYPE, device=device)
    values = c(r.clone())
    check_tensor(
        name,
        values,
        r.shape,
        "weight",
        r,
        {(len(r), 1): "return one weight per edge, [num_edges]."},
    )
    nan_at = _nan_gradient_at(c, r)
    if nan_at is not None:
        raise fail(
            name,
            f"Its gradient is NaN (or inf) at r = {nan_at:.4g} (max_radius = {max_radius}).",
            "torch.where computes and differentiates *both* branches, and exp(-1/x) has an "
            "infinite derivative where x <= 0 (and is inf itself for small negative x); 0 * inf "
            "= nan. Make the unused branch harmless: x_safe = torch.where(x > 0, x, "
            "torch.ones_like(x)), then torch.where(x > 0, torch.exp(-1 / x_safe), 0.0).",
        )
    values = values.detach()
    outside = r >= max_radius
    if float(values[outside].abs().max()) > 1e-12:
        where = float(r[outside][values[outside].abs().argmax()])
        raise fail(
            name,
            f"c(r) must be 0 at and beyond max_radius; c({where:.4g}) = "
            f"{float(c(torch.tensor([where], dtype=_DTYPE, device=device))[0]):.3g}.",
            "the formula may go on beyond the cutoff (a cosine rises again): set it to 0 there, "
            "e.g. with torch.where(r < max_radius, ..., 0.0).",
        )
    if float(values.min()) < 0 or float(values.max()) > 1 + 1e-9:
        raise fail(
            name,
            f"c(r) ranges over [{float(values.min()):.3g}, {float(values.max()):.3g}]; "
            "a weight in the softmax should be between 0 and 1.",
        )
    if float(values[0]) < 0.5:
        raise fail(
            name,
            f"c(0) = {float(values[0]):.3g}: a cutoff should leave near neighbours nearly "
            "untouched (the book's c(0) = exp(-1/10) = 0.905).",
        )
    just_inside = torch.tensor([max_radius * (1 - 1e-7)], dtype=_DTYPE, device=device)
    orders = derivatives(lambda r: c(r), just_inside, order=2)[:, 0]
    value, slope, curvature = (float(x) for x in orders)
    if not is_finite(orders):
        raise fail(
            name,
            f"Just inside the cutoff, at r = max_radius - 1e-7, c and its first two derivatives "
            f"are {value:.3g}, {slope:.3g}, {curvature:.3g}: NaN or inf, where they should go "
            "to 0.",
            "NaN comes from 0 / 0, inf - inf or 0 * inf (exp(-1/x) as x -> 0, say): write c "
            "so that it and its derivatives stay finite as r approaches max_radius.",
        )
    if not abs(value) <= 1e-4:
        raise fail(
            name,
            f"Just inside the cutoff, c(max_radius - 1e-7) = {value:.3g}, but c is 0 beyond it: "
            "the weight jumps at max_radius, a hard cutoff.",
            "the weight must fall to 0 continuously as r approaches max_radius.",
        )
    if not abs(slope) <= 1e-3:
        raise fail(
            name,
            f"The value goes to 0 at max_radius, but the derivative does not: c'(max_radius - "
            f"1e-7) = {slope:.3g}, while beyond the cutoff it is 0. A kink: forces, the "
            "derivatives of the energy, would jump there.",
            "use a function whose slope also vanishes at the cutoff, such as the book's "
            "u(10 (1 - r / max_radius)) with u(x) = exp(-1/x) for x > 0 and 0 otherwise.",
        )
    # c' continuous inside: its largest change between neighbouring grid points shrinks with
    # the grid step (about 10x per decade) unless it jumps somewhere.
    inside = [
        torch.arange(0.0, max_radius, step, dtype=_DTYPE, device=device)
        for step in (max_radius / 1000, max_radius / 10000)
    ]
    slope_changes = [derivatives(c, grid, order=1)[1].diff().abs() for grid in inside]
    for grid, changes in zip(inside, slope_changes):
        if not is_finite(changes):
            where = float(grid[1:][~changes.isfinite()][0])
            raise fail(
                name,
                f"Its derivative is NaN or inf inside the sphere, near r = {where:.4g}.",
                "build c from pieces whose derivatives are finite wherever they are used.",
            )
    coarse, fine = float(slope_changes[0].max()), float(slope_changes[1].max())
    if not coarse >= 3 * fine:
        where = float(inside[1][slope_changes[1].argmax()])
        raise fail(
            name,
            f"Its derivative jumps inside the sphere, near r = {where:.4g}: a kink (for "
            "instance where a clamp or relu switches).",
            "build c from smooth pieces only.",
        )
    orders_note = "value and every derivative checked (up to the 2nd) vanish there"
    if not abs(curvature) <= 1e-3:
        orders_note = (
            f"value and first derivative vanish there (the second does not, c'' = "
            f"{curvature:.3g}: forces are continuous, their derivatives jump; the book's c(r) "
            "has every derivative vanish)"
        )
    same = torch.allclose(values, smooth_cutoff(r, max_radius), rtol=1e-9, atol=1e-12)
    passed(
        name,
        f"0 at and beyond max_radius, {orders_note}, finite gradients"
        + ("; it is the book's c(r)" if same else ""),
    )


def check_smooth_layer(make_layer: Callable, device: Device = None) -> None:
    r"""Check ``make_layer(irreps_in, irreps_out, irreps_sh, number_of_basis, max_radius,
    num_neighbors)``, which returns a layer ``layer(f, pos, batch=...)`` (such as a
    :class:`se3tutor.Convolution`) that is smooth where a neighbour crosses the cutoff sphere.

    The experiment of the Smoothness chapter: node 4 moves along :math:`x_4(t) = (t, 0.5, 0)`,
    leaving the sphere of node 0 at :math:`t = 1.2`; the readout :math:`y(t)` (a fixed random
    combination of the outputs) and its derivative :math:`y'(t)` (a force) are traced over
    :math:`[1.0, 1.4)` with the steps :math:`10^{-3}` and :math:`10^{-4}`. Their largest change
    between neighbouring steps shrinks about tenfold with the step where they are continuous,
    and stays at the size of the jump where they are not.

    >>> from functools import partial
    >>> from se3tutor import Convolution
    >>> silu = torch.nn.functional.silu
    >>> check_smooth_layer(partial(Convolution, cutoff=True, radial_activation=silu))
    ... # doctest: +ELLIPSIS
    ✓ smooth_layer is correct: output and force continuous along the path...
    """
    name = "smooth_layer"
    device = as_device(device)
    irreps_in, irreps_out = o3.Irreps("4x0e + 2x1o + 1x2e"), o3.Irreps("4x0e + 2x1o")
    with seeded(7, _DTYPE):
        layer = call(make_layer, name, irreps_in, irreps_out, "0e + 1o + 2e", 8, 1.3, 2.0)
        f = irreps_in.randn(5, -1)
    if not isinstance(layer, torch.nn.Module):
        raise fail(name, f"It returned a {type(layer).__name__}; return the layer (a Module).")
    layer = layer.to(device)
    if any(p.dtype != _DTYPE for p in layer.parameters()):
        raise fail(
            name,
            "The layer's parameters are not float64, although it was built with float64 as "
            "the default dtype.",
            "do not pass dtype=torch.float32 or call .float() on it.",
        )
    pos = torch.tensor(
        [[0.0, 0.0, 0.0], [-0.8, 0.3, 0.1], [0.2, -0.9, -0.2], [1.5, 1.0, 0.2], [0.0, 0.5, 0.0]],
        dtype=_DTYPE,
        device=device,
    )
    direction = torch.tensor([1.0, 0.0, 0.0], dtype=_DTYPE, device=device)
    f = f.to(device)
    with default_dtype(_DTYPE), torch.no_grad():
        batch = torch.zeros(len(pos), dtype=torch.long, device=device)
        out = call(layer, name, f.clone(), pos.clone(), batch=batch)
    check_tensor(name, out, (len(pos), irreps_out.dim), "output", pos)
    with default_dtype(_DTYPE):
        jumps = [
            call(largest_jumps, name, layer, f, pos, 4, direction, 1.0, 1.4, step)
            for step in (1e-3, 1e-4)
        ]
    (value_coarse, slope_coarse), (value_fine, slope_fine) = jumps
    # NaN or inf would pass every comparison below (nan < 3 is False): refuse them first.
    if not all(is_finite(jump) for jump in (value_coarse, value_fine)):
        raise fail(
            name,
            "Its output becomes NaN or inf as node 4 moves along x_4(t) = (t, 0.5, 0), t in "
            "[1.0, 1.4), across the cutoff sphere of node 0 (at t = 1.2).",
            "NaN typically comes from 0 / 0, or from a torch.where whose unused branch is NaN "
            "or inf (its gradient still is).",
        )
    if not all(is_finite(jump) for jump in (slope_coarse, slope_fine)):
        raise fail(
            name,
            "Its output is finite, but its derivative (the force on node 4) becomes NaN or inf "
            "as node 4 moves along x_4(t) = (t, 0.5, 0), t in [1.0, 1.4), across the cutoff "
            "sphere of node 0 (at t = 1.2).",
            "torch.where differentiates both branches: a branch that is inf or has an infinite "
            "derivative (exp(-1/x) at x <= 0) gives a NaN gradient even where it is not used.",
        )
    if value_coarse == 0:
        raise fail(name, "Its output does not change as node 4 moves: it ignores the positions.")
    value_ratio = value_coarse / max(value_fine, 1e-300)
    slope_ratio = slope_coarse / max(slope_fine, 1e-300)
    if not value_ratio >= 3:
        raise fail(
            name,
            f"Its output jumps by {value_fine:.3g} along the path, where node 4 leaves the "
            "sphere of node 0 (the largest step of y stays that size when the grid step shrinks "
            "tenfold). An edge at the cutoff still carries a message.",
            "the message must vanish at max_radius: embed the lengths on bumps that all vanish "
            "there (cutoff=True), and use a radial MLP without biases whose activation maps 0 "
            "to 0, so that a zero embedding gives zero weights.",
        )
    if not slope_ratio >= 3:
        raise fail(
            name,
            f"Its output is continuous, but its derivative (the force on node 4) jumps by "
            f"{slope_fine:.3g} along the path.",
            "a relu in the radial MLP has a kink where a hidden unit switches on, anywhere "
            "inside the sphere: use a smooth activation such as torch.nn.functional.silu.",
        )
    passed(
        name,
        f"output and force continuous along the path (their largest steps shrink "
        f"{value_ratio:.0f}x and {slope_ratio:.0f}x when the grid step does)",
    )
