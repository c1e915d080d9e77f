"""The exercises: every checker accepts a right answer and rejects the typical wrong ones with
a message that names the mistake, in lines of at most 80 columns (``accepts`` and ``rejects``
check the width of every message). (The student notebooks: ci/test_make_student_notebooks.py.)
"""

import math
import re
from functools import partial

import pytest
import torch
from e3nn import o3
from e3nn.math import soft_one_hot_linspace

import se3tutor
from se3tutor import exercises
from se3tutor.exercises import ExerciseError
from se3tutor.radial import embed_edge_length, smooth_cutoff

silu = torch.nn.functional.silu


WIDTH = 80  # the book cuts longer lines of an output cell


def assert_fits(text):
    wide = [line for line in text.splitlines() if len(line) > WIDTH]
    assert not wide, f"lines wider than {WIDTH} columns: {wide}"


def rejects(checker, answer, match, **kwargs):
    """The checker raises on ``answer``; ``match`` is searched in its message with the line
    breaks read as spaces; every line of the message fits the page."""
    with pytest.raises(ExerciseError) as error:
        checker(answer, **kwargs)
    message = str(error.value)
    assert re.search(match, " ".join(message.split()), re.S), message
    assert_fits(message)
    return message


def accepts(checker, answer, capsys, **kwargs):
    checker(answer, **kwargs)
    out = capsys.readouterr().out
    assert out.startswith("\u2713")
    assert_fits(out)
    return out


# ------------------------------------------------------------------------ convolution chapter


def test_a_long_message_is_wrapped_at_80_columns_keeping_its_line_breaks():
    problem = "The output has shape (23, 12), expected (24, 12). " * 4
    error = ExerciseError(f"layer is not right yet.\n{problem}\nHint: pass dim_size=num_nodes.")
    lines = str(error).splitlines()
    assert lines[0] == "layer is not right yet."
    assert lines[-1] == "Hint: pass dim_size=num_nodes."
    assert " ".join(lines[1:-1]) == problem.strip()
    assert max(len(line) for line in lines) <= WIDTH


def radial_embedding(edge_length, max_radius, number_of_basis, scale=None, cutoff=False):
    bumps = soft_one_hot_linspace(
        edge_length, 0.0, max_radius, number_of_basis, "smooth_finite", cutoff
    )
    return bumps * (number_of_basis**0.5 if scale is None else scale)


def convolution(
    layer,
    f_in,
    pos,
    edge_index,
    sign=1.0,
    divide=True,
    dim_size=True,
    swap=False,
    onto="dst",
    normalize=True,
    z="layer",
):
    edge_src, edge_dst = edge_index.flip(0) if swap else edge_index
    edge_vec = sign * (pos[edge_src] - pos[edge_dst])
    edge_sh = o3.spherical_harmonics(
        layer.irreps_sh, edge_vec, normalize, normalization="component"
    )
    embedded = radial_embedding(edge_vec.norm(dim=1), layer.max_radius, layer.number_of_basis)
    summand = layer.tp(f_in[edge_src], edge_sh, layer.fc(embedded))
    centre = edge_dst if onto == "dst" else edge_src
    f_out = se3tutor.scatter(summand, centre, dim=0, dim_size=len(pos) if dim_size else None)
    # z: the layer's constant, or (a slip) the mean degree of the graph at hand
    num_neighbors = layer.num_neighbors if z == "layer" else edge_index.shape[1] / len(pos)
    return f_out / num_neighbors**0.5 if divide else f_out


def test_radial_embedding_checker_accepts_the_chapters_embedding(capsys, device):
    accepts(exercises.check_radial_embedding, radial_embedding, capsys, device=device)


@pytest.mark.parametrize(
    "wrong, match",
    [
        (
            partial(radial_embedding, scale=1.0),
            r"second moment .* 0\.0995.*sqrt\(number_of_basis\)",
        ),
        (partial(radial_embedding, cutoff=True), r"cutoff=False"),
        (
            lambda r, max_radius, b: radial_embedding(r, max_radius, b).T,
            r"shape \(10, 400\).*transpose",
        ),
        (lambda r, max_radius, b: radial_embedding(r, 1.8, 10), r"number where the argument"),
    ],
    ids=["without sqrt(B)", "cutoff=True", "transposed", "hard-coded constants"],
)
def test_radial_embedding_checker_names_the_mistake(wrong, match):
    rejects(exercises.check_radial_embedding, wrong, match)


def test_convolution_checker_accepts_the_chapters_layer(capsys, device):
    accepts(exercises.check_convolution, convolution, capsys, device=device)


@pytest.mark.parametrize(
    "wrong, match",
    [
        (partial(convolution, divide=False), r"did you divide by sqrt\(num_neighbors\)\?"),
        (partial(convolution, sign=-1.0), r"pos\[edge_src\] - pos\[edge_dst\]"),
        (partial(convolution, dim_size=False), r"shape \(23, 12\).*pass dim_size=num_nodes"),
        (
            partial(convolution, swap=True),
            r"edge_src and edge_dst are swapped everywhere.*edges that go one way only",
        ),
        (
            partial(convolution, z="graph"),
            r"square root of this graph's mean degree.*layer\.num_neighbors",
        ),
        (partial(convolution, onto="src"), r"summed onto edge_src.*scatter\(.*edge_dst"),
        (partial(convolution, normalize=False), r"normalize=False.*Pass normalize=True"),
        (
            partial(convolution, onto="src", divide=False),
            r"summed onto edge_src.*did you divide by sqrt\(num_neighbors\)\?",
        ),
    ],
    ids=[
        "without 1/sqrt(z)",
        "edge vectors reversed",
        "without dim_size",
        "src and dst swapped",
        "z from the graph",
        "scattered onto edge_src",
        "harmonics not normalized",
        "scattered onto edge_src, without 1/sqrt(z)",
    ],
)
def test_convolution_checker_names_the_mistake(wrong, match):
    message = rejects(exercises.check_convolution, wrong, match)
    assert "the geometry is right" not in message


def test_convolution_checker_finds_an_index_slip_among_unknown_ones():
    """A message that lands on edge_src, in an answer that is wrong in other ways too."""

    def scrambled(layer, f_in, pos, edge_index):
        out = convolution(layer, f_in, pos, edge_index, onto="src")
        return out + 0.1 * out.roll(1, dims=1)

    rejects(
        exercises.check_convolution,
        scrambled,
        r"one edge, from node 0 \(edge_src\) to node 1.*summed onto edge_src",
    )


def test_a_stub_called_by_the_answer_is_named_in_the_message():
    def radial_embedding(edge_length, max_radius, number_of_basis):
        raise NotImplementedError

    def convolution_with_stub(layer, f_in, pos, edge_index):
        radial_embedding(pos[:, 0], layer.max_radius, layer.number_of_basis)

    rejects(
        exercises.check_convolution,
        convolution_with_stub,
        r"^radial_embedding \(which convolution calls\) is not written yet",
    )


# -------------------------------------------------------------------------- attention chapter


def segment_softmax(logits, edge_dst, num_nodes, shift="centre", detach_z=False):
    if shift == "centre":
        m = se3tutor.scatter(logits.detach(), edge_dst, dim=0, dim_size=num_nodes, reduce="max")
        logits = logits - m[edge_dst]
    elif shift == "global":
        logits = logits - logits.max()
    exp = logits.exp()
    z = se3tutor.scatter(exp, edge_dst, dim=0, dim_size=num_nodes)
    return exp / (z.detach() if detach_z else z)[edge_dst]


def attention(
    layer,
    f,
    pos,
    edge_index,
    weight_by="sqrt",
    cutoff_weight=True,
    swap=False,
    group="dst",
    onto="dst",
    normalize=True,
):
    edge_src, edge_dst = edge_index.flip(0) if swap else edge_index
    edge_vec = pos[edge_src] - pos[edge_dst]
    length = edge_vec.norm(dim=1)
    embedded = embed_edge_length(length, layer.max_radius, layer.number_of_basis, cutoff=True)
    edge_sh = o3.spherical_harmonics(
        layer.irreps_sh, edge_vec, normalize, normalization="component"
    )
    q = layer.h_q(f)
    k = layer.tp_k(f[edge_src], edge_sh, layer.fc_k(embedded))
    v = layer.tp_v(f[edge_src], edge_sh, layer.fc_v(embedded))
    weight = smooth_cutoff(length, layer.max_radius) if cutoff_weight else None
    by = edge_dst if group == "dst" else edge_src
    alpha = se3tutor.segment_softmax(layer.dot(q[edge_dst], k), by, len(f), weight=weight)
    alpha = alpha.relu().sqrt() if weight_by == "sqrt" else alpha
    centre = edge_dst if onto == "dst" else edge_src
    return se3tutor.scatter(alpha * v, centre, dim=0, dim_size=len(f))


def test_segment_softmax_checker_accepts_a_stable_softmax(capsys, device):
    accepts(exercises.check_segment_softmax, segment_softmax, capsys, device=device)


@pytest.mark.parametrize(
    "wrong, match",
    [
        (partial(segment_softmax, shift=None), r"near 100 .*NaN.*subtract each centre's largest"),
        (partial(segment_softmax, shift="global"), r"centre's own largest logit"),
        (lambda logits, edge_dst, n: torch.softmax(logits, 0), r"normalised over all edges"),
        (partial(segment_softmax, detach_z=True), r"gradient .* differs.*denominator"),
    ],
    ids=["no shift: overflow", "one shift for all centres", "over all edges", "detached sum"],
)
def test_segment_softmax_checker_names_the_mistake(wrong, match):
    rejects(exercises.check_segment_softmax, wrong, match)


def test_attention_checker_accepts_the_chapters_layer(capsys, device):
    accepts(exercises.check_attention, attention, capsys, device=device)


@pytest.mark.parametrize(
    "wrong, match",
    [
        (partial(attention, weight_by="alpha"), r"weight them by sqrt\(alpha\)"),
        (partial(attention, cutoff_weight=False), r"softmax lacks the cutoff weight"),
        (
            partial(attention, swap=True),
            r"edge_src and edge_dst are swapped everywhere.*edges that go one way only",
        ),
        (partial(attention, group="src"), r"softmax is grouped by edge_src.*edge_dst"),
        (partial(attention, onto="src"), r"summed onto edge_src.*scatter\(.*edge_dst"),
        (partial(attention, normalize=False), r"normalize=False.*Pass normalize=True"),
        (
            partial(attention, group="src", weight_by="alpha"),
            r"softmax is grouped by edge_src.*sqrt\(alpha\)",
        ),
    ],
    ids=[
        "alpha, not sqrt(alpha)",
        "no cutoff weight",
        "src and dst swapped",
        "softmax grouped by edge_src",
        "scattered onto edge_src",
        "harmonics not normalized",
        "softmax grouped by edge_src, weighted by alpha",
    ],
)
def test_attention_checker_names_the_mistake(wrong, match):
    message = rejects(exercises.check_attention, wrong, match)
    assert "the geometry is right" not in message


# ---------------------------------------------------------------------- normalization chapter


def second_moment_per_irrep(f, irreps, pool="pooled", norm=False):
    squares, counts = {}, {}
    for (_mul, ir), block in zip(irreps, irreps.slices()):
        x = f[:, block].pow(2) * (ir.dim if norm else 1)
        squares.setdefault(str(ir), []).append(x.sum())
        counts.setdefault(str(ir), []).append(x.numel())
    if pool == "last":
        return {k: s[-1] / counts[k][-1] for k, s in squares.items()}
    if pool == "mean of means":
        return {k: sum(a / b for a, b in zip(s, counts[k])) / len(s) for k, s in squares.items()}
    return {k: sum(s) / sum(counts[k]) for k, s in squares.items()}


def normalized_convolution(layer, f_in, pos, edge_index, sh="component", root_b=True, z=True):
    edge_src, edge_dst = edge_index
    edge_vec = pos[edge_src] - pos[edge_dst]
    edge_sh = o3.spherical_harmonics(layer.irreps_sh, edge_vec, True, normalization=sh)
    scale = layer.number_of_basis**0.5 if root_b else 1.0
    embedded = radial_embedding(
        edge_vec.norm(dim=1), layer.max_radius, layer.number_of_basis, scale
    )
    summand = layer.tp(f_in[edge_src], edge_sh, layer.fc(embedded))
    f_out = se3tutor.scatter(summand, edge_dst, dim=0, dim_size=len(pos))
    return f_out / layer.num_neighbors**0.5 if z else f_out


def layer_norm(f, irreps, eps=1e-5, over="block"):
    blocks = []
    for (mul, ir), block in zip(irreps, irreps.slices()):
        x = f[:, block].reshape(len(f), mul, ir.dim)
        if over == "block":
            mean_square = x.pow(2).mean(dim=(1, 2), keepdim=True)
        elif over == "component":
            mean_square = x.pow(2)
        else:  # the sum of the squares
            mean_square = x.pow(2).sum(dim=(1, 2), keepdim=True)
        blocks.append((x / (mean_square + eps).sqrt()).reshape(len(f), -1))
    return torch.cat(blocks, dim=1)


def test_second_moment_checker_accepts_pooled_moments(capsys, device):
    accepts(exercises.check_second_moment_per_irrep, second_moment_per_irrep, capsys, device=device)


@pytest.mark.parametrize(
    "wrong, match",
    [
        (partial(second_moment_per_irrep, norm=True), r"mean squared \*norm\*"),
        (partial(second_moment_per_irrep, pool="last"), r"last block only: pool"),
        (partial(second_moment_per_irrep, pool="mean of means"), r"averaged the means"),
        (lambda f, irreps: f.pow(2).mean(), r"return a dict"),
    ],
    ids=["squared norm", "last block", "mean of means", "one number"],
)
def test_second_moment_checker_names_the_mistake(wrong, match):
    rejects(exercises.check_second_moment_per_irrep, wrong, match)


def test_normalization_checker_accepts_the_normalized_layer(capsys, device):
    accepts(exercises.check_normalization, normalized_convolution, capsys, device=device)


def test_normalization_checker_names_every_missing_constant():
    unnormalized = partial(normalized_convolution, sh="integral", root_b=False, z=False)
    message = rejects(exercises.check_normalization, unnormalized, r"these slips give")
    message = " ".join(message.split())
    assert re.search(r"Second moment of your output per irrep type: 0e 0\.0\d", message)
    assert "did you divide by sqrt(num_neighbors)?" in message
    assert "normalization='integral'" in message
    assert "lacks the factor sqrt(B)" in message


@pytest.mark.parametrize(
    "wrong, match",
    [
        (partial(normalized_convolution, root_b=False), r"this slip gives: the embedding"),
        (partial(normalized_convolution, sh="norm"), r'normalization="norm"'),
    ],
    ids=["without sqrt(B)", "harmonics in norm normalisation"],
)
def test_normalization_checker_names_the_mistake(wrong, match):
    rejects(exercises.check_normalization, wrong, match)


def test_layer_norm_checker_accepts_the_chapters_layer_norm(capsys, device):
    accepts(exercises.check_layer_norm, layer_norm, capsys, device=device)


@pytest.mark.parametrize(
    "wrong, match",
    [
        (lambda f, irreps: torch.nn.functional.layer_norm(f, f.shape[1:]), r"not equivariant"),
        (partial(layer_norm, over="component"), r"changes its direction"),
        (partial(layer_norm, over="sum"), r"root of the \*mean\*"),
    ],
    ids=["torch layer norm", "per component", "sum of squares"],
)
def test_layer_norm_checker_names_the_mistake(wrong, match):
    rejects(exercises.check_layer_norm, wrong, match)


# ------------------------------------------------------------------------- smoothness chapter


def cutoff(edge_length, max_radius, safe=True):
    x = 10 * (1 - edge_length / max_radius)
    if safe:
        x_safe = torch.where(x > 0, x, torch.ones_like(x))
        return torch.where(x > 0, torch.exp(-1 / x_safe), torch.zeros_like(x))
    return torch.where(x > 0, torch.exp(-1 / x), torch.zeros_like(x))


def test_smooth_cutoff_checker_accepts_the_books_cutoff(capsys, device):
    accepts(exercises.check_smooth_cutoff, cutoff, capsys, device=device)


def test_smooth_cutoff_checker_accepts_a_c1_cutoff_with_a_remark(capsys):
    def cosine(r, max_radius):
        return torch.where(r < max_radius, 0.5 * (torch.cos(math.pi * r / max_radius) + 1), 0.0)

    out = accepts(exercises.check_smooth_cutoff, cosine, capsys)
    assert "the second does not" in " ".join(out.split())


@pytest.mark.parametrize(
    "wrong, match",
    [
        (partial(cutoff, safe=False), r"gradient is NaN.*differentiates \*both\* branches"),
        (lambda r, max_radius: (r < max_radius).to(r.dtype), r"jumps at max_radius, a hard cutoff"),
        (lambda r, max_radius: (1 - r / max_radius).relu(), r"derivative does not.*kink"),
        (lambda r, max_radius: 0.5 * (torch.cos(math.pi * r / max_radius) + 1), r"0 at and beyond"),
        (
            lambda r, max_radius: (2 * (1 - r / max_radius)).clamp(0, 1) ** 2,
            r"jumps inside the sphere",
        ),
    ],
    ids=["NaN gradient", "hard cutoff", "kink at the cutoff", "nonzero beyond", "kink inside"],
)
def test_smooth_cutoff_checker_names_the_mistake(wrong, match):
    rejects(exercises.check_smooth_cutoff, wrong, match)


def test_smooth_layer_checker_accepts_the_smooth_convolution(capsys):
    smooth = partial(se3tutor.Convolution, cutoff=True, radial_activation=silu)
    accepts(exercises.check_smooth_layer, smooth, capsys)


@pytest.mark.parametrize(
    "wrong, match",
    [
        (se3tutor.Convolution, r"output jumps .*\(cutoff=True\)"),
        (partial(se3tutor.Convolution, cutoff=True), r"derivative .* jumps.*relu"),
    ],
    ids=["the guide's convolution", "relu"],
)
def test_smooth_layer_checker_names_the_mistake(wrong, match):
    rejects(exercises.check_smooth_layer, wrong, match)


# ------------------------------------------------------------------------ transformer chapter


def transformer_block(block, f, edges, variant="pre-norm"):
    attention = block.attention
    if variant == "post-norm":
        f = block.norm_attention(f + attention(f, edges))
        return block.norm_feed_forward(f + block.feed_forward(f))
    if variant == "parallel":
        update = attention(block.norm_attention(f), edges)
        return f + update + block.feed_forward(block.norm_feed_forward(f))
    if variant == "no residual":
        f = attention(block.norm_attention(f), edges)
        return block.feed_forward(block.norm_feed_forward(f))
    f = f + attention(block.norm_attention(f), edges)
    return f + block.feed_forward(block.norm_feed_forward(f))


def test_transformer_block_checker_accepts_a_pre_norm_block(capsys, device):
    accepts(exercises.check_transformer_block, transformer_block, capsys, device=device)


@pytest.mark.parametrize(
    "variant, match",
    [
        ("post-norm", r"post-norm"),
        ("parallel", r"both sublayers read the same f"),
        ("no residual", r"residual connections are missing"),
    ],
)
def test_transformer_block_checker_names_the_mistake(variant, match):
    rejects(exercises.check_transformer_block, partial(transformer_block, variant=variant), match)


def make_vector_model(kind: str, max_radius: float = 1.5, device="cpu"):
    """A model from one scalar per point to one vector per point, of a kind, on ``device``."""
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.SiLU(), torch.nn.Linear(16, 3))
    radial = torch.nn.Sequential(torch.nn.Linear(1, 16), torch.nn.SiLU(), torch.nn.Linear(16, 1))
    mlp, radial = mlp.to(device), radial.to(device)

    def model(f, pos):
        edge_src, edge_dst = se3tutor.radius_graph(pos, max_radius)
        edge_vec = pos[edge_src] - pos[edge_dst]
        weight = radial(edge_vec.norm(dim=1, keepdim=True)) * f[edge_src]
        if kind == "mlp on coordinates":
            return mlp(torch.cat([f, pos], dim=1))
        if kind == "mlp on centred coordinates":
            return mlp(torch.cat([f, pos - pos.mean(dim=0)], dim=1))
        if kind == "cross product":
            other = se3tutor.scatter(edge_vec, edge_dst, dim=0, dim_size=len(pos))[edge_src]
            edge_vec = torch.linalg.cross(edge_vec, other)
        if kind == "no geometry":
            return f.repeat(1, 3)
        if kind == "zero":
            return torch.zeros_like(pos)
        if kind == "no dim_size":  # one row short whenever the last point has no neighbour
            return se3tutor.scatter(weight * edge_vec, edge_dst, dim=0)
        return se3tutor.scatter(weight * edge_vec, edge_dst, dim=0, dim_size=len(pos))

    return model


def test_equivariant_checker_accepts_equivariant_models(capsys, device):
    model = make_vector_model("equivariant", device=device)
    out = accepts(exercises.check_equivariant, model, capsys, irreps_in="1x0e", device=device,
                  irreps_out="1x1o")  # fmt: skip
    assert out.startswith("\u2713 model is equivariant")
    transformer = se3tutor.SE3Transformer("1x0e", "8x0e + 8x1o", "1x1o", max_radius=1.5)
    out = accepts(exercises.check_equivariant, transformer.to(device), capsys, irreps_in="1x0e",
                  irreps_out="1x1o", device=device)  # fmt: skip
    assert "SE3Transformer is equivariant" in out


@pytest.mark.parametrize(
    "kind, match",
    [
        ("mlp on coordinates", r"Shifting every point .* reads absolute positions"),
        ("mlp on centred coordinates", r"Rotating the points .* worst block is 1x1o"),
        ("cross product", r"Rotations are fine, but the inversion"),
        ("no geometry", r"does not use the geometry"),
        ("zero", r"always 0"),
        # The 12 points have a neighbour each, but not once moved or listed in another order.
        ("no dim_size", r"output has shape \(11, 3\).*\(12, 3\).*dim_size=num_nodes"),
    ],
)
def test_equivariant_checker_says_which_transformation_breaks_the_model(kind, match):
    kwargs = {"irreps_in": "1x0e", "irreps_out": "1x1o"}
    rejects(exercises.check_equivariant, make_vector_model(kind), match, **kwargs)


@pytest.mark.parametrize("calls_before_the_error", [1, 2])
def test_equivariant_checker_explains_an_error_raised_by_the_model(calls_before_the_error):
    """An error in the model's code, on the first call or on a transformed input, comes back
    as a message that keeps torch's own and says what it usually means."""
    model = make_vector_model("equivariant")
    calls = []

    def fails_later(f, pos):
        calls.append(1)
        if len(calls) > calls_before_the_error:
            return model(f, pos) + torch.zeros(len(pos) - 1, 3)  # a size mismatch in torch
        return model(f, pos)

    rejects(
        exercises.check_equivariant,
        fails_later,
        r"raised RuntimeError: The size of tensor a \(12\) must match the size of tensor b "
        r"\(11\).*Hint: two tensors of different lengths",
        irreps_in="1x0e",
        irreps_out="1x1o",
    )


def test_convolution_checker_explains_an_error_raised_on_a_later_call():
    """The layer checkers call the answer again (probes, equivariance): an error there is
    explained too, not shown raw."""
    calls = []

    def wrong_then_failing(layer, f_in, pos, edge_index):
        calls.append(1)
        out = convolution(layer, f_in, pos, edge_index)
        if len(calls) > 1:
            return out[torch.arange(len(pos) + 1)]  # one row past the end
        return out + 0.1 * out.roll(1, dims=1)

    rejects(exercises.check_convolution, wrong_then_failing, r"raised IndexError: .*Hint: an index")


# -------------------------------------------------------------------------- potential chapter


def energy_and_forces(model, pos, batch, num_graphs, training=False, mistake=None):
    if mistake == "backward":
        pos.requires_grad_(True)
        energy = se3tutor.scatter(model(pos, batch), batch, dim=0, dim_size=num_graphs)
        energy.sum().backward()
        return energy, -pos.grad
    pos = pos.detach().requires_grad_(True)
    energy = se3tutor.scatter(model(pos, batch), batch, dim=0, dim_size=num_graphs)
    if mistake == "one energy":
        energy = energy.sum()
    create_graph = {"no create_graph": False, "always create_graph": True}.get(mistake, training)
    (gradient,) = torch.autograd.grad(energy.sum(), pos, create_graph=create_graph)
    return energy, gradient if mistake == "sign" else -gradient


def test_forces_checker_accepts_minus_the_gradient(capsys, device):
    accepts(exercises.check_forces, energy_and_forces, capsys, device=device)


@pytest.mark.parametrize(
    "mistake, match",
    [
        ("sign", r"\+dE/dx: they point uphill"),
        ("backward", r"leaves gradients behind.*torch\.autograd\.grad"),
        ("no create_graph", r"training=True the forces are not differentiable.*create_graph"),
        ("always create_graph", r"training=False the forces still carry an autograd graph"),
        ("one energy", r"energy has shape \(\), expected \(3,\).*one energy per structure"),
    ],
)
def test_forces_checker_names_the_mistake(mistake, match):
    rejects(exercises.check_forces, partial(energy_and_forces, mistake=mistake), match)


# ------------------------------------------------------------------ non-finite answers


NAN = float("nan")


def nan_tensor(shape, like):
    return torch.full(tuple(shape), NAN, dtype=like.dtype, device=like.device)


class NaNLayer(torch.nn.Module):
    """A layer whose output is NaN everywhere (it depends on pos, so it has a gradient)."""

    def __init__(self, irreps_in, irreps_out, *args, **kwargs):
        super().__init__()
        self.dim = o3.Irreps(irreps_out).dim

    def forward(self, f, pos, edge_index=None, batch=None):
        return pos[:, :1] * nan_tensor((len(pos), self.dim), pos)


# Every checker, with an answer of the right shape (and type) whose numbers are all NaN.
NAN_ANSWERS = {
    "check_radial_embedding": (lambda r, max_radius, b: nan_tensor((len(r), b), r), {}),
    "check_convolution": (
        lambda layer, f, pos, edges: nan_tensor((len(pos), layer.irreps_out.dim), pos),
        {},
    ),
    "check_segment_softmax": (lambda logits, edge_dst, n: nan_tensor(logits.shape, logits), {}),
    "check_attention": (
        lambda layer, f, pos, edges: nan_tensor((len(pos), layer.irreps_out.dim), pos),
        {},
    ),
    "check_second_moment_per_irrep": (
        lambda f, irreps: {str(ir): torch.tensor(NAN) for _, ir in irreps},
        {},
    ),
    "check_normalization": (
        lambda layer, f, pos, edges: nan_tensor((len(pos), layer.irreps_out.dim), pos),
        {},
    ),
    "check_layer_norm": (lambda f, irreps: nan_tensor(f.shape, f), {}),
    "check_smooth_cutoff": (lambda r, max_radius: nan_tensor(r.shape, r), {}),
    "check_smooth_layer": (NaNLayer, {}),
    "check_transformer_block": (lambda block, f, edges: nan_tensor(f.shape, f), {}),
    "check_equivariant": (
        lambda f, pos: nan_tensor((len(pos), 3), pos),
        {"irreps_in": "1x0e", "irreps_out": "1x1o"},
    ),
    "check_forces": (
        lambda model, pos, batch, num_graphs, training=False: (
            nan_tensor((num_graphs,), pos),
            nan_tensor(pos.shape, pos),
        ),
        {},
    ),
}


def test_every_checker_has_a_nan_answer():
    checkers = {name for name in exercises.__all__ if name.startswith("check_")}
    assert checkers == set(NAN_ANSWERS)


@pytest.mark.parametrize("checker", sorted(NAN_ANSWERS))
def test_every_checker_rejects_an_all_nan_answer(checker):
    answer, kwargs = NAN_ANSWERS[checker]
    message = rejects(getattr(exercises, checker), answer, r"NaN|non-finite", **kwargs)
    assert " is not right yet" in message


def test_second_moment_checker_rejects_a_nan_for_one_irrep_type():
    def one_nan(f, irreps):
        moments = second_moment_per_irrep(f, irreps)
        return {**moments, "1o": float("nan")}

    rejects(exercises.check_second_moment_per_irrep, one_nan, r"NaN for 1o")


def test_smooth_cutoff_checker_rejects_nan_just_inside_the_cutoff():
    def nan_near_the_cutoff(
        r, max_radius
    ):  # NaN in (max_radius - 1e-6, max_radius): between the grid points
        return torch.where((r < max_radius) & (r > max_radius - 1e-6), NAN, cutoff(r, max_radius))

    rejects(exercises.check_smooth_cutoff, nan_near_the_cutoff, r"NaN or inf")


def test_smooth_layer_checker_rejects_nan_along_the_path():
    class NaNBeyond(se3tutor.Convolution):  # NaN once node 4 (of 5) has moved past x = 1.3
        def forward(self, f, pos, edge_index=None, batch=None):
            out = super().forward(f, pos, edge_index, batch)
            node_4 = (torch.arange(len(pos), device=pos.device) % 5 == 4)[:, None]
            return torch.where(node_4 & (pos[:, :1] > 1.3), NAN, 1.0) * out

    layer = partial(NaNBeyond, cutoff=True, radial_activation=silu)
    rejects(exercises.check_smooth_layer, layer, r"NaN or inf")


def test_equivariant_checker_rejects_nan_on_moved_points():
    model = make_vector_model("equivariant")
    first = {}

    def nan_elsewhere(f, pos):  # right on the points it first sees, NaN on any others
        first.setdefault("pos", pos.clone())
        out = model(f, pos)
        return out if torch.equal(pos, first["pos"]) else torch.full_like(out, NAN)

    rejects(
        exercises.check_equivariant,
        nan_elsewhere,
        r"NaN or inf",
        irreps_in="1x0e",
        irreps_out="1x1o",
    )


def test_layer_norm_checker_rejects_nan_on_rotated_features():
    first = {}

    def nan_elsewhere(f, irreps):  # right on the features it first sees, NaN on any others
        first.setdefault("f", f.clone())
        out = layer_norm(f, irreps)
        return out if torch.equal(f, first["f"]) else torch.full_like(out, NAN)

    rejects(exercises.check_layer_norm, nan_elsewhere, r"NaN or inf")


def test_convolution_checker_explains_an_output_of_zeros():
    zeros = lambda layer, f, pos, edges: torch.zeros(len(pos), layer.irreps_out.dim)  # noqa: E731
    rejects(exercises.check_convolution, zeros, r"all 0")


@pytest.mark.parametrize("checker", [exercises.check_attention, exercises.check_convolution])
def test_layer_checkers_name_the_two_slips_of_a_sum_over_the_edges(checker):
    def one_row_per_edge(layer, f, pos, edge_index):
        return torch.zeros(edge_index.shape[1], layer.irreps_out.dim, dtype=f.dtype)

    def one_row_short(layer, f, pos, edge_index):
        return torch.zeros(len(pos) - 1, layer.irreps_out.dim, dtype=f.dtype)

    rejects(checker, one_row_per_edge, "one row per edge: .*edge_dst")
    rejects(checker, one_row_short, "one row short: pass dim_size=num_nodes")
