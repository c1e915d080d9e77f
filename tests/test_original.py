"""The paper's SE(3)-Transformer layer (se3tutor.original): its symmetries (rotations, not
inversion), its parts, its neighbourhoods, the stack, and input validation."""

import functools

import pytest
import torch
from e3nn import o3

from se3tutor import EquivariantAttention
from se3tutor.checks import (
    default_dtype,
    equivariance_error,
    largest_jumps,
    permutation_error,
)
from se3tutor.original import (
    AttentiveSelfInteraction,
    NormNonlinearity,
    OriginalAttention,
    OriginalSE3Transformer,
    knn_graph,
    so3_harmonics,
    so3_irreps,
)
from se3tutor.transformer import hidden_irreps

# The paper's degrees up to 2, without parity; the layer's harmonics then go up to J = 4.
IRREPS = so3_irreps(4, 2)
# Smaller, for the stack and the many graphs of a line scan.
IRREPS_SMALL = so3_irreps(2, 1)
# The parts (self-interaction, norm) act on any irreps: checked with both parities too.
IRREPS_PARITY = hidden_irreps(2, 2, "SE3")
# Equivariance in float64, relative to the largest output: rounding, with a margin.
TOLERANCE_FLOAT64 = 1e-10
# Under inversion the odd-J harmonics flip sign: the output moves by a sizeable fraction.
NOT_EQUIVARIANT = 1e-2


pytestmark = pytest.mark.usefixtures("one_thread")  # graphs of ten nodes (conftest.py)


@functools.cache
def build_layer():
    with default_dtype(torch.float64):
        torch.manual_seed(0)
        return OriginalAttention(IRREPS, IRREPS, max_radius=3.0, num_neighbors=4, num_heads=2)


@functools.cache
def build_stack():
    with default_dtype(torch.float64):
        torch.manual_seed(1)
        return OriginalSE3Transformer(
            "1x0e", IRREPS_SMALL, "2x0e + 1x1e", num_layers=2, max_radius=3.0, num_neighbors=4
        )


def random_inputs(irreps, num_nodes=10, seed=2):
    generator = torch.Generator().manual_seed(seed)
    f = torch.randn(num_nodes, o3.Irreps(irreps).dim, generator=generator, dtype=torch.float64)
    pos = torch.randn(num_nodes, 3, generator=generator, dtype=torch.float64)
    return f, pos


def test_kernel_has_every_path_of_eq_8():
    # For every pair of degrees (k in, l out), J runs over |k - l| ... k + l.
    kernel = build_layer().w_v
    degree = {i: ir.l for i, (_, ir) in enumerate(IRREPS)}
    harmonic = {i: ir.l for i, (_, ir) in enumerate(kernel.tp.irreps_in2)}
    found = {}
    for ins in kernel.tp.instructions:
        pair = (degree[ins.i_in1], degree[ins.i_out])
        found.setdefault(pair, []).append(harmonic[ins.i_in2])
    assert len(found) == 9
    for (k, l), js in found.items():
        assert sorted(js) == list(range(abs(k - l), k + l + 1)), (k, l)


def test_layer_is_equivariant_under_rotation_and_translation():
    layer = build_layer()
    f, pos = random_inputs(IRREPS)
    scale = layer(f, pos).abs().max().item()
    for _ in range(3):  # three random rotations and translations
        assert equivariance_error(layer, IRREPS, IRREPS, f, pos) < TOLERANCE_FLOAT64 * scale


def test_layer_tells_mirror_images_apart():
    # The paper's kernel has every J for every pair of degrees, without parity: under an
    # inversion of the positions the odd-J paths change sign, and the output is not the
    # inverted output (the labels "e" would claim it is).
    layer = build_layer()
    f, pos = random_inputs(IRREPS)
    scale = layer(f, pos).abs().max().item()
    error = equivariance_error(layer, IRREPS, IRREPS, f, pos, inversion=True)
    assert error > NOT_EQUIVARIANT * scale


def test_stack_is_equivariant_under_rotation_not_inversion():
    model = build_stack()
    f, pos = torch.ones(10, 1, dtype=torch.float64), random_inputs("1x0e")[1]
    scale = model(f, pos).abs().max().item()
    rotation = equivariance_error(model, "1x0e", model.irreps_out, f, pos)
    inversion = equivariance_error(model, "1x0e", model.irreps_out, f, pos, inversion=True)
    assert scale > 1e-3 and rotation < TOLERANCE_FLOAT64 * scale
    assert inversion > NOT_EQUIVARIANT * scale


def test_stack_is_laid_out_as_the_official_models():
    # Hidden layers: linear self-interaction, values divided by div, norm nonlinearity;
    # last layer: attentive self-interaction (the N-body model's siend='att').
    model = OriginalSE3Transformer(
        "1x0e", so3_irreps(8, 1), "1x1e", num_layers=2, max_radius=3.0, num_neighbors=4, div=4
    )
    kinds = [type(layer).__name__ for layer in model.layers]
    assert kinds == ["OriginalAttention", "NormNonlinearity"] * 2 + ["OriginalAttention"]
    hidden, last = model.layers[2], model.layers[-1]
    assert isinstance(hidden.self_interaction, o3.Linear)
    assert hidden.irreps_value == so3_irreps(2, 1) and hidden.irreps_sh == so3_harmonics(1)
    assert isinstance(last.self_interaction, AttentiveSelfInteraction)


def test_layer_is_equivariant_under_permutation():
    layer = build_layer()
    f, pos = random_inputs(IRREPS)
    assert permutation_error(layer, f, pos) < 1e-12


@pytest.mark.parametrize("part", ["attentive self-interaction", "norm nonlinearity"])
def test_parts_are_equivariant_under_rotation_and_inversion(part):
    torch.manual_seed(3)
    irreps = IRREPS_PARITY
    irreps_in = irreps + irreps if part == "attentive self-interaction" else irreps
    with default_dtype(torch.float64):
        if part == "attentive self-interaction":
            module = AttentiveSelfInteraction(irreps_in, irreps)
        else:
            module = NormNonlinearity(irreps)
    f, pos = random_inputs(irreps_in)
    error = equivariance_error(lambda f, pos: module(f), irreps_in, irreps, f, pos, inversion=True)
    assert error < TOLERANCE_FLOAT64


def test_attentive_self_interaction_takes_convex_combinations_of_channels():
    # Every output channel is a weighted mean of the input channels of its irrep: with all
    # input channels equal, every output channel equals them.
    si = AttentiveSelfInteraction("3x0e + 4x1e", "2x0e + 5x1e")
    vector = torch.randn(6, 1, 3)
    f = torch.cat([torch.full((6, 3), 0.7), vector.expand(6, 4, 3).reshape(6, 12)], dim=1)
    out = si(f)
    assert torch.allclose(out[:, :2], torch.full((6, 2), 0.7), atol=1e-6)
    assert torch.allclose(out[:, 2:].view(6, 5, 3), vector.expand(6, 5, 3), atol=1e-6)


def test_attention_weights_are_a_plain_softmax_over_each_neighbourhood():
    layer = build_layer()
    f, pos = random_inputs(IRREPS)
    edge_index = knn_graph(pos, layer.num_neighbors, layer.max_radius)
    alpha, v = layer.attention_weights_and_values(f, pos, edge_index)
    sums = torch.zeros(len(f), layer.num_heads, dtype=alpha.dtype).index_add_(
        0, edge_index[1], alpha
    )
    assert torch.allclose(sums, torch.ones_like(sums), atol=1e-12)
    assert alpha.shape == (edge_index.shape[1], 2) and v.shape == (edge_index.shape[1], IRREPS.dim)


def test_one_radial_network_per_pair_of_input_and_output_irreps():
    kernel = build_layer().w_v
    pairs = {(ins.i_in1, ins.i_out) for ins in kernel.tp.instructions}
    assert len(kernel.radial) == len(pairs) == len(kernel.pairs)
    total = sum(net[-1].out_features for net in kernel.radial)
    assert total == kernel.tp.weight_numel


def test_knn_graph_keeps_the_nearest_within_the_radius():
    pos = torch.randn(30, 3, generator=torch.Generator().manual_seed(4))
    edge_src, edge_dst = knn_graph(pos, num_neighbors=5, max_radius=1.2)
    distance = torch.cdist(pos, pos).fill_diagonal_(float("inf"))
    for node in range(len(pos)):
        expected = distance[node].topk(5, largest=False)
        expected = set(expected.indices[expected.values < 1.2].tolist())
        assert set(edge_src[edge_dst == node].tolist()) == expected


def test_knn_neighbourhood_jumps_where_the_radius_graph_is_smooth():
    # Node 4 moves towards node 0, past the others. The book's layer (smooth cutoff at 5.0)
    # runs on the radius graph, and on the 2-nearest-neighbour graph with a radius far beyond
    # every distance, so that only the ranking changes it; the paper's layer on that graph too.
    # Halving the step halves the largest change of a smooth output between neighbouring
    # steps; a jump stays as large.
    torch.manual_seed(5)
    irreps_book = hidden_irreps(1, 1, "SE3")
    original = OriginalAttention(IRREPS_SMALL, IRREPS_SMALL, max_radius=5.0, num_neighbors=2)
    book = EquivariantAttention(
        irreps_book, irreps_query="2x0e + 1x1o", irreps_key="2x0e + 1x1o",
        irreps_out=irreps_book, irreps_sh="0e + 1o", number_of_basis=10, max_radius=5.0,
    )  # fmt: skip
    pos = torch.tensor(
        [[0.0, 0.0, 0.0], [1.0, 0.2, 0.0], [-0.3, 1.1, 0.2], [0.1, -0.4, 1.2], [1.8, 0.3, -0.5]]
    )
    f = torch.randn(5, IRREPS_SMALL.dim)  # 8 components, as irreps_book
    direction = -pos[4] / pos[4].norm()

    def knn(pos, batch):
        return knn_graph(pos, 2, max_radius=100.0, batch=batch)

    layers = {
        "paper, kNN": (lambda f, pos, batch: original(f, pos, knn(pos, batch), batch), True),
        "book, kNN": (lambda f, pos, batch: book(f, pos, knn(pos, batch), batch), True),
        "book, radius": (lambda f, pos, batch: book(f, pos, batch=batch), False),
    }
    for name, (layer, jumps) in layers.items():
        with torch.no_grad():
            coarse, _ = largest_jumps(layer, f, pos, 4, direction, 0.0, 1.5, 1e-2)
            fine, _ = largest_jumps(layer, f, pos, 4, direction, 0.0, 1.5, 5e-3)
        if jumps:
            assert fine > 0.8 * coarse and fine > 0.1, name
        else:
            assert fine < 0.6 * coarse, name
    # On this path every distance stays below 5.0: the radius graph never changes.
    path = pos[4] + torch.arange(0.0, 1.5, 5e-3)[:, None] * direction
    assert (path[:, None] - pos[None, :4]).norm(dim=-1).max() < 5.0


def test_bad_inputs_are_refused_with_the_argument_named():
    layer = build_layer()
    f, pos = random_inputs(IRREPS)
    with pytest.raises(ValueError, match="f must have shape"):
        layer(f[:, :-1], pos)
    with pytest.raises(ValueError, match="pos must have shape"):
        layer(f, pos[:, :2])
    with pytest.raises(TypeError, match="parameters are torch.float64"):
        layer(f.float(), pos.float())
    with pytest.raises(ValueError, match="divide by 3"):
        OriginalAttention(IRREPS, IRREPS, max_radius=1.0, num_neighbors=2, num_heads=3)
    with pytest.raises(ValueError, match="irreps_in: odd irreps"):
        OriginalAttention("2x0e + 2x1o", IRREPS, max_radius=1.0, num_neighbors=2)
    with pytest.raises(ValueError, match="each irrep may appear once"):
        AttentiveSelfInteraction("2x0e", "1x0e + 1x0e")
    with pytest.raises(ValueError, match="lacks"):
        AttentiveSelfInteraction("2x0e", "1x1e")
