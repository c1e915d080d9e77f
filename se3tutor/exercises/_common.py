"""What every checker does: call the reader's function safely, compare its output with the
reference, recognise typical mistakes, and explain them.

A checker raises :class:`ExerciseError` with a message meant for a student: what was measured,
what was expected, and, where the mistake is a known one, what to change. On success it prints
a line that starts with a check mark. Every message is wrapped at :data:`WIDTH` columns, the
width of the book's page, which cuts longer lines of an output cell.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import textwrap
from collections.abc import Iterator, Sequence
from typing import Callable, Optional, Union

import torch
from e3nn import o3

from se3tutor.checks import default_dtype, equivariance_difference

__all__ = ["ExerciseError"]

# Where a checker puts the tensors it gives the reader's function: "cpu" (the default), "cuda"...
Device = Optional[Union[str, torch.device]]


WIDTH = 80


def wrap(text: str) -> str:
    """``text`` with every line wrapped at :data:`WIDTH` columns (its line breaks kept)."""
    return "\n".join(
        textwrap.fill(line, WIDTH, break_long_words=False, break_on_hyphens=False)
        for line in text.split("\n")
    )


class ExerciseError(AssertionError):
    """The reader's answer to an exercise is not right yet; the message says why."""

    __module__ = "se3tutor.exercises"  # where readers import it from, as tracebacks show it

    def __init__(self, message: str) -> None:
        super().__init__(wrap(message))


# Error messages of torch that students meet in these exercises, with what usually causes them.
_KNOWN_ERRORS = {
    "grad can be implicitly created only for scalar outputs": (
        "torch.autograd.grad(outputs, inputs) needs a scalar output (or grad_outputs): "
        "differentiate the sum, e.g. energy.sum()."
    ),
    "does not require grad": (
        "autograd can only differentiate with respect to a tensor that had requires_grad=True "
        "*before* the output was computed from it: call pos.requires_grad_(True) first."
    ),
    "same device": (
        "a tensor you created is on another device than the inputs: create it with "
        "device=<input>.device (or torch.zeros_like(...))."
    ),
    "expected scalar type": (
        "a tensor you created has another dtype than the inputs: create it with "
        "dtype=<input>.dtype (or torch.zeros_like(...))."
    ),
    "same scalar type": (
        "a tensor you created has another dtype than the inputs: create it with "
        "dtype=<input>.dtype (or torch.zeros_like(...))."
    ),
    "must match the size of tensor": (
        "two tensors of different lengths met. A scatter without dim_size=num_nodes returns "
        "one row per node up to the last node that receives an edge, so it comes up short when "
        "the last nodes receive none; other suspects are a gather with the wrong index "
        "(edge_src, edge_dst) or a missing [edge_dst] after a per-node tensor."
    ),
    "out of bounds": (
        "an index is larger than the tensor it indexes: edge_src and edge_dst index nodes "
        "(rows 0 to num_nodes - 1), so use them on per-node tensors, and a per-edge tensor "
        "only with indices below num_edges."
    ),
    "shapes cannot be multiplied": (
        "a module got features of another width than it was built for: give it the tensor of "
        "the irreps it expects (its irreps_in.dim columns)."
    ),
}


def fail(name: str, problem: str, hint: Optional[str] = None) -> ExerciseError:
    """The error to raise: ``raise fail("radial_embedding", "...", hint="...")``. The first
    line of the message is short, so that it fits after the ``ExerciseError:`` of a traceback.
    """
    message = f"{name} is not right yet.\n{problem}"
    if hint:
        message += f"\nHint: {hint}"
    return ExerciseError(message)


def report(text: str) -> None:
    """Print ``text``, wrapped to the page."""
    print(wrap(text))


def passed(name: str, details: str) -> None:
    report(f"\u2713 {name} is correct: {details}")


def call(function: Callable, name: str, *args, **kwargs):
    """``function(*args, **kwargs)``, with the reader's errors turned into explanations."""
    try:
        return function(*args, **kwargs)
    except NotImplementedError as error:
        stub = _stub_that_raised(error)
        if stub is not None:
            who = name if stub in (name, "<lambda>") else f"{stub} (which {name} calls)"
            raise ExerciseError(
                f"{who} is not written yet: replace `raise NotImplementedError` in its cell "
                "with your code, run that cell, then run this one again."
            ) from None
        raise fail(name, f"Calling it raised NotImplementedError: {error}") from error
    except ExerciseError:
        raise
    except Exception as error:  # the reader's code failed: say where, keep the traceback
        hint = next((h for text, h in _KNOWN_ERRORS.items() if text in str(error)), None)
        raise fail(
            name,
            f"Calling it raised {type(error).__name__}: {error} (the traceback above shows the "
            "line of your code).",
            hint,
        ) from error


def _stub_that_raised(error: BaseException) -> Optional[str]:
    """The name of the reader's function that raised ``error``, or ``None`` when it came from
    an installed library (an operation that torch does not implement, say)."""
    frame = error.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    if frame is None:
        return None
    code = frame.tb_frame.f_code
    if any(part in code.co_filename for part in ("site-packages", "dist-packages")):
        return None
    return code.co_name


@contextlib.contextmanager
def seeded(seed: int, dtype: torch.dtype = torch.float32) -> Iterator[None]:
    """Run with torch's CPU random state seeded and the default dtype set, then restore both,
    so that a check neither depends on nor disturbs the notebook's random numbers."""
    with torch.random.fork_rng(devices=[]), default_dtype(dtype):
        torch.manual_seed(seed)
        yield


def as_device(device: Device) -> torch.device:
    return torch.device("cpu") if device is None else torch.device(device)


def layer_outputs(function: Callable, name: str, layer, f, pos, edge_index, how_to_sum: str):
    """The reader's ``function(layer, f, pos, edge_index)`` and the reference ``layer(f, pos,
    edge_index)``, without gradients, after checking the reader's output like
    :func:`check_tensor` does, naming the two usual slips of a sum over the edges:
    ``how_to_sum`` says how the edges' terms should reach their centres."""
    num_nodes, dim = len(pos), layer.irreps_out.dim
    with torch.no_grad():
        got = call(function, name, layer, f.clone(), pos.clone(), edge_index.clone())
        expected = layer(f, pos, edge_index)
    shape_hints = {
        (num_nodes - 1, dim): "the last node has no neighbour, so scatter without dim_size "
        "stops one row short: pass dim_size=num_nodes (it gets a row of zeros).",
        (edge_index.shape[1], dim): f"that is one row per edge: {how_to_sum}",
    }
    check_tensor(name, got, (num_nodes, dim), "output", f, shape_hints)
    return got, expected


def check_tensor(
    name: str,
    got,
    shape: Sequence[int],
    what: str,
    like: torch.Tensor,
    shape_hints: Optional[dict] = None,
) -> torch.Tensor:
    """``got`` must be a finite tensor of ``shape`` with the dtype and device of ``like``.
    ``shape_hints`` maps wrong shapes (tuples) that have a known cause to a hint."""
    shape = tuple(shape)
    if isinstance(got, tuple) and len(got) == 1:
        raise fail(name, f"It returned a tuple with one element; return the {what} itself.")
    if not isinstance(got, torch.Tensor):
        raise fail(name, f"It returned a {type(got).__name__}; the {what} should be a tensor.")
    if tuple(got.shape) != shape:
        hint = (shape_hints or {}).get(tuple(got.shape))
        if hint is None and sorted(got.shape) == sorted(shape) and len(shape) == 2:
            hint = f"the two axes are the other way round: transpose, to get {shape}."
        raise fail(name, f"The {what} has shape {tuple(got.shape)}, expected {shape}.", hint=hint)
    if got.dtype != like.dtype:
        raise fail(
            name,
            f"The {what} is {got.dtype}, but the inputs are {like.dtype}.",
            "create new tensors with dtype=<input>.dtype, or with torch.zeros_like(...).",
        )
    if got.device != like.device:
        raise fail(name, f"The {what} is on {got.device}, but the inputs are on {like.device}.")
    if not bool(got.isfinite().all()):
        bad = (~got.isfinite()).nonzero()[0].tolist()
        raise fail(name, f"The {what} contains NaN or inf (first at index {bad}).")
    return got


def is_finite(x) -> bool:
    """Whether ``x`` (a number or a tensor) holds no NaN and no inf. Compare measured errors
    as ``not (error <= tolerance)``, or test this first: ``nan > tolerance`` is ``False``."""
    if isinstance(x, torch.Tensor):
        return bool(x.detach().isfinite().all())
    return math.isfinite(x)


def largest_difference(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.detach() - expected.detach()).abs().max()) if got.numel() else 0.0


def scale_of(x: torch.Tensor) -> float:
    return max(float(x.detach().abs().max()), 1e-12) if x.numel() else 1.0


def close(got: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5) -> bool:
    """Equal up to ``rtol`` times the largest entry of ``expected`` (float32 rounding of
    sums, in any order)."""
    return largest_difference(got, expected) <= rtol * scale_of(expected)


def second_moment(x: torch.Tensor) -> float:
    return float(x.detach().pow(2).mean())


def matching_mistake(
    got: torch.Tensor, mistakes: Sequence[tuple[Callable[[], torch.Tensor], str]], rtol=1e-4
):
    """The hint of the first typical mistake whose output ``got`` equals, or ``None``.
    ``mistakes``: ``(output of the mistake, computed lazily, hint)`` pairs."""
    for mistake, hint in mistakes:
        with torch.no_grad():
            wrong = mistake()
        if wrong.shape == got.shape and close(got, wrong, rtol):
            return hint
    return None


def scalar_factor(got: torch.Tensor, expected: torch.Tensor) -> Optional[float]:
    """``c`` when ``got`` is ``c * expected`` (within float32 rounding), else ``None``."""
    got, expected = got.detach().flatten().double(), expected.detach().flatten().double()
    norm2 = float(expected @ expected)
    if norm2 == 0 or not is_finite(got):
        return None
    c = float(got @ expected) / norm2
    residual = float((got - c * expected).abs().max())
    return c if residual <= 1e-4 * max(float(got.abs().max()), 1e-30) else None


def explain_factor(
    c: float, factors: dict, max_terms: int = 3, exclusive: Sequence[set] = ()
) -> Optional[list]:
    """Which known mistakes, each multiplying the output by a known factor, multiply together
    to ``c``: the names of the set (of at most ``max_terms``, and at most one of each group in
    ``exclusive``: different ways to get one constant wrong) whose product is closest to
    ``c``, if within 0.5 %, else ``None`` (always for ``c = 0``, NaN or inf)."""
    if c == 0 or not math.isfinite(c):
        return None
    candidates = [
        names
        for size in range(1, max_terms + 1)
        for names in itertools.combinations(factors, size)
        if not any(len(group.intersection(names)) > 1 for group in exclusive)
        # slips that cancel (sqrt(B) and 1/sqrt(B)) explain nothing
        and not abs(math.prod(factors[n] for n in names) - 1) <= 0.005
    ]
    best = min(candidates, key=lambda names: abs(math.prod(factors[n] for n in names) / c - 1))
    error = abs(math.prod(factors[n] for n in best) / c - 1)
    return list(best) if error <= 0.005 else None


def block_errors(difference: torch.Tensor, irreps) -> dict:
    """Largest absolute entry of ``difference`` in each block ``mul x ir`` of ``irreps``."""
    irreps = o3.Irreps(irreps)
    return {
        f"{mul}x{ir} (columns {block.start}:{block.stop})": float(
            difference[..., block].abs().max()
        )
        for (mul, ir), block in zip(irreps, irreps.slices())
    }


def describe_blocks(errors: dict) -> str:
    worst = max(errors, key=errors.get)
    listing = ", ".join(f"{block}: {error:.2g}" for block, error in errors.items())
    return f"the worst block is {worst} ({listing})"


class _OutputChanged(Exception):
    """An output of another type or shape than the first one (message: what happened)."""


def changed_output_problem(transformation: str, got, out: torch.Tensor) -> str:
    """What to say when ``transformation`` changed the output ``out`` into ``got``."""
    shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
    problem = (
        f"{transformation}, its output has shape {shape}, while on the original inputs it "
        f"has {tuple(out.shape)}."
    )
    if isinstance(got, torch.Tensor) and got.dim() == out.dim() and got.shape[1:] == out.shape[1:]:
        problem += (
            " The number of rows must not depend on the positions or the order of the points: "
            "a scatter without dim_size=num_nodes returns rows only up to the last node that "
            "receives an edge, so it comes up short when the last nodes receive none. Pass "
            "dim_size=num_nodes."
        )
    return problem


def _same_shape_each_call(layer: Callable) -> Callable:
    """``layer``, raising :class:`_OutputChanged` when an output is not a tensor of the shape
    of the first one; the calls are named in the order :func:`_equivariance_problem` makes."""
    names = iter(
        [
            "Shifting every point by the same vector",
            *["Rotating the points and the input features"] * 3,
            "Inverting the points (x -> -x)",
            "Listing the points in another order",
        ]
    )
    first = []

    def checked(f: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        got = layer(f, pos)
        if not first:
            if not isinstance(got, torch.Tensor):
                raise _OutputChanged(
                    f"It returned a {type(got).__name__}; the output should be a tensor."
                )
            first.append(got)
        elif not isinstance(got, torch.Tensor) or got.shape != first[0].shape:
            transformation = next(names, "Called again")
            raise _OutputChanged(changed_output_problem(transformation, got, first[0]))
        else:
            next(names, None)
        return got

    return checked


def equivariance_problem(
    layer: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    irreps_in,
    irreps_out,
    f: torch.Tensor,
    pos: torch.Tensor,
    tolerance: float = 1e-4,
    permute: bool = True,
) -> Optional[str]:
    r"""How ``layer(f, pos)`` fails :math:`L(D_{in} f, R x + t) = D_{out} L(f, x)`, in words,
    or ``None`` when it does not (translations, rotations, the inversion, permutations are
    tried one at a time, so that the message can say which one breaks it). ``tolerance`` is
    relative to the largest output. An output with NaN or inf, on the given inputs or on
    transformed ones, is a problem too (and says which transformation gave it), and so is an
    output whose shape changes with the transformation (a scatter without ``dim_size``).
    ``layer`` should turn the reader's errors into :class:`ExerciseError` (see :func:`call`).
    """
    checked = _same_shape_each_call(layer)
    try:
        return _equivariance_problem(checked, irreps_in, irreps_out, f, pos, tolerance, permute)
    except _OutputChanged as changed:
        return str(changed)


def _equivariance_problem(
    layer: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    irreps_in,
    irreps_out,
    f: torch.Tensor,
    pos: torch.Tensor,
    tolerance: float = 1e-4,
    permute: bool = True,
) -> Optional[str]:
    """:func:`equivariance_problem`, with ``layer`` called in the order of
    :func:`_same_shape_each_call`'s names."""
    irreps_in, irreps_out = o3.Irreps(irreps_in), o3.Irreps(irreps_out)
    nan_hint = (
        "NaN typically comes from 0 / 0 or from the direction of a vector of length 0 (a "
        "self-edge, or the norm of a zero vector differentiated); inf from dividing by 0."
    )
    with torch.no_grad():
        out = layer(f, pos)
        if not is_finite(out):
            return f"Called again on the same inputs, its output contains NaN or inf. {nan_hint}"
        tolerance = tolerance * scale_of(out)
        identity = torch.eye(3, dtype=pos.dtype, device=pos.device)
        shift = torch.randn(3, dtype=pos.dtype).to(pos.device)
        rotations = [o3.rand_matrix(dtype=pos.dtype).to(pos.device) for _ in range(3)]

        def difference(rotation, translation):
            return equivariance_difference(
                layer, irreps_in, irreps_out, f, pos, rotation, translation, out
            )

        def breaks(d: torch.Tensor) -> bool:  # NaN breaks it too
            return not float(d.abs().max()) <= tolerance

        def non_finite(d: torch.Tensor, transformation: str) -> Optional[str]:
            if is_finite(d):
                return None
            return (
                f"{transformation}, its output contains NaN or inf (it is finite on the "
                f"original inputs). {nan_hint}"
            )

        moved = difference(identity, shift)
        problem = non_finite(moved, "Shifting every point by the same vector")
        if problem is not None:
            return problem
        if breaks(moved):
            return (
                f"Shifting every point by the same vector changes the output by up to "
                f"{float(moved.abs().max()):.3g} (largest output entry {scale_of(out):.3g}): the "
                "function reads absolute positions. Build everything from differences of "
                "positions, pos[edge_src] - pos[edge_dst]."
            )
        rotated = [difference(rotation, 0.0) for rotation in rotations]
        for d in rotated:
            problem = non_finite(d, "Rotating the points and the input features")
            if problem is not None:
                return problem
        rotated = max(rotated, key=lambda d: float(d.abs().max()))
        if breaks(rotated):
            errors = block_errors(rotated, irreps_out)
            broken = [block for block, error in errors.items() if not error <= tolerance]
            if all(block.split(" ")[0].endswith(("0e", "0o")) for block in broken):
                cause = (
                    "only scalar outputs break: a scalar must be built from invariants (lengths, "
                    "dot products, norms), never from coordinates or single vector components."
                )
            else:
                cause = (
                    "typical causes are an MLP or a pointwise nonlinearity applied to coordinates "
                    "or to the components of vectors, or components of different irreps mixed."
                )
            return (
                "Rotating the points (and the input features with D_in(R)) should multiply the "
                f"output by D_out(R); yours is off by up to {float(rotated.abs().max()):.3g} "
                f"(largest output entry {scale_of(out):.3g}); {describe_blocks(errors)}. Here "
                f"{cause}"
            )
        inverted = difference(-identity, 0.0)
        problem = non_finite(inverted, "Inverting the points (x -> -x)")
        if problem is not None:
            return problem
        if breaks(inverted):
            blocks = describe_blocks(block_errors(inverted, irreps_out))
            return (
                "Rotations are fine, but the inversion x -> -x is not (error "
                f"{float(inverted.abs().max()):.3g}; {blocks}): a parity mistake, e.g. an output "
                "declared odd (1o) that is built like a cross product (1e), or spherical "
                "harmonics declared even."
            )
        if permute:
            perm = torch.randperm(len(pos)).to(pos.device)
            permuted = layer(f[perm], pos[perm]) - out[perm]
            problem = non_finite(permuted, "Listing the points in another order")
            if problem is not None:
                return problem
            if breaks(permuted):
                return (
                    "Listing the points in another order changes the output (beyond reordering "
                    f"its rows; error {float(permuted.abs().max()):.3g}): the function treats "
                    "some node specially by its index."
                )
    return None
