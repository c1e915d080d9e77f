"""Normalisation (book: Normalization): the layers of se3tutor.norm keep equivariance and the
second moment, and every scaling of the book keeps the second moment within a factor 3 of 1,
a check that fails for the variant without the scaling."""

import math
import re

import pytest
import torch
from e3nn import nn, o3
from e3nn.math import soft_one_hot_linspace

from se3tutor import Convolution, EquivariantAttention, radius_graph, scatter, segment_softmax
from se3tutor.checks import default_dtype, equivariance_error
from se3tutor.graph import edge_vectors
from se3tutor.norm import (
    EquivariantLayerNorm,
    gated_nonlinearity,
    pre_norm_bound,
    second_moment_deviation,
    second_moment_per_irrep,
)
from se3tutor.radial import embed_edge_length

IRREPS = o3.Irreps("4x0e + 2x0o + 3x1o + 1x1e + 2x2e")  # both parities, l up to 2
# The chapter's band: a scaled step keeps the second moment within a factor 3 of 1.
WITHIN_FACTOR = 3.0
# The chapter's c: the largest second moment a layer adds to a pre-norm residual stream.
MAX_INCREMENT = 8.0


def layer_norm(scope, dtype):
    """A layer norm with random gains and biases, built in ``dtype`` (so that the affine part
    is part of every check)."""
    with default_dtype(dtype):
        norm = EquivariantLayerNorm(IRREPS, scope=scope)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    return norm


def max_equivariance_error(layer, irreps_in, irreps_out, f, inversion):
    """Largest error over three random rotations (with inversion if asked) of a layer of the
    features alone; the check's Wigner matrices are built in the dtype of ``f``."""
    pos = torch.randn(f.shape[0], 3, dtype=f.dtype)
    return max(
        equivariance_error(
            lambda f, pos: layer(f), irreps_in, irreps_out, f, pos, inversion=inversion
        )
        for _ in range(3)
    )


# --------------------------------------------------------------------------- layer norm


@pytest.mark.parametrize("scope", ["irrep", "node"])
@pytest.mark.parametrize("inversion", [False, True], ids=["rotation", "inversion"])
def test_layer_norm_is_equivariant_under_rotations_and_inversion(
    scope, inversion, dtype, tolerance
):
    norm = layer_norm(scope, dtype)
    f = IRREPS.randn(20, -1, dtype=dtype)
    with torch.no_grad():
        scale = norm(f).abs().max()
        error = max_equivariance_error(norm, IRREPS, IRREPS, f, inversion)
    assert error < tolerance * scale


@pytest.mark.parametrize("scale", [1.0, 1e2, 1e4])
def test_layer_norm_gives_every_block_of_every_node_second_moment_one(scale):
    norm = EquivariantLayerNorm(IRREPS, affine=False)
    f = scale * IRREPS.randn(30, -1)
    out = norm(f)
    for (mul, ir), block in zip(IRREPS, IRREPS.slices()):
        per_node = out[:, block].reshape(30, mul, ir.dim).pow(2).mean(dim=(1, 2))
        torch.testing.assert_close(per_node, torch.ones(30), rtol=0, atol=1e-3)


@pytest.mark.parametrize("scale", [1.0, 1e2, 1e4])
def test_node_scope_gives_every_node_second_moment_one_and_keeps_the_ratios(scale):
    norm = EquivariantLayerNorm(IRREPS, affine=False, scope="node")
    f = scale * IRREPS.randn(30, -1)
    out = norm(f)
    torch.testing.assert_close(out.pow(2).mean(dim=1), torch.ones(30), rtol=0, atol=1e-3)
    # one factor per node: out / f is the same number for every component of a node
    ratio = out / f
    torch.testing.assert_close(ratio, ratio[:, :1].expand_as(ratio), rtol=1e-5, atol=0)


@pytest.mark.parametrize("scope", ["irrep", "node"])
def test_layer_norm_keeps_the_direction_of_every_irrep(scope):
    norm = EquivariantLayerNorm(IRREPS, scope=scope)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)  # positive gains: directions kept, not flipped
    f = IRREPS.randn(30, -1)
    with torch.no_grad():
        out = norm(f)
    for (mul, ir), block in zip(IRREPS, IRREPS.slices()):
        if ir.l > 0:
            cosine = torch.nn.functional.cosine_similarity(
                f[:, block].reshape(30, mul, ir.dim), out[:, block].reshape(30, mul, ir.dim), dim=-1
            )
            assert cosine.min() > 1 - 1e-5


def test_layer_norm_has_a_bias_only_on_even_scalars():
    norm = EquivariantLayerNorm(IRREPS)
    assert norm.weight.numel() == IRREPS.num_irreps
    assert norm.bias.numel() == 4  # the 4x0e; none for 0o, 1o, 1e, 2e
    f = IRREPS.randn(10, -1)
    with torch.no_grad():
        before = norm(f)
        norm.bias.fill_(3.0)
        changed = (norm(f) - before).abs().amax(dim=0) > 0  # [IRREPS.dim]
    even_scalars = torch.zeros(IRREPS.dim, dtype=torch.bool)
    even_scalars[IRREPS.slices()[0]] = True
    assert torch.equal(changed, even_scalars)


def test_layer_norm_rejects_a_wrong_feature_width_and_scope():
    norm = EquivariantLayerNorm(IRREPS)
    with pytest.raises(
        ValueError, match=re.escape(f"expected irreps {IRREPS} of dim {IRREPS.dim}")
    ):
        norm(torch.randn(5, IRREPS.dim - 1))
    with pytest.raises(ValueError, match="scope"):
        EquivariantLayerNorm(IRREPS, scope="graph")
    with pytest.raises(ValueError, match=re.escape(f"have dim {IRREPS.dim}")):
        second_moment_per_irrep(torch.randn(5, IRREPS.dim + 1), IRREPS)


# --------------------------------------------------------------------------- gate


@pytest.mark.parametrize("inversion", [False, True], ids=["rotation", "inversion"])
def test_gate_is_equivariant_under_rotations_and_inversion(inversion, dtype, tolerance):
    with default_dtype(dtype):
        gate = gated_nonlinearity(IRREPS)  # odd scalars get tanh: inversion exercises it
    f = gate.irreps_in.randn(50, -1, dtype=dtype)
    with torch.no_grad():
        error = max_equivariance_error(gate, gate.irreps_in, gate.irreps_out, f, inversion)
    assert error < tolerance
    assert gate.irreps_out == IRREPS


def test_gate_keeps_the_second_moment_of_component_inputs():
    # e3nn rescales each activation to E[phi(z)^2] = 1 for standard normal z; 20000 samples
    # leave about 1% of noise.
    gate = gated_nonlinearity("8x0e + 4x1o + 2x2e")
    with torch.no_grad():
        out = gate(gate.irreps_in.randn(20_000, -1))
    for ir, moment in second_moment_per_irrep(out, gate.irreps_out).items():
        assert abs(moment - 1) < 0.05, ir


def test_silu_on_every_component_is_not_equivariant_but_the_gate_is():
    irreps = o3.Irreps("8x0e + 4x1o + 2x2e")
    gate = gated_nonlinearity(irreps)
    f = gate.irreps_in.randn(50, -1)
    silu = torch.nn.SiLU()
    assert max_equivariance_error(silu, irreps, irreps, f[:, 6:], inversion=False) > 0.1
    assert max_equivariance_error(gate, gate.irreps_in, irreps, f, inversion=False) < 1e-4


# --------------------------------------------------------------------------- e3nn BatchNorm


@pytest.mark.parametrize("inversion", [False, True], ids=["rotation", "inversion"])
def test_e3nn_batch_norm_is_equivariant_and_normalises_each_irrep(inversion, dtype, tolerance):
    with default_dtype(dtype):
        batch_norm = nn.BatchNorm(IRREPS)  # training mode: statistics of the batch
    f = 10 * IRREPS.randn(200, -1, dtype=dtype)
    f[:, :4] += 3.0  # an offset on the even scalars, which batch norm removes
    with torch.no_grad():
        error = max_equivariance_error(batch_norm, IRREPS, IRREPS, f, inversion)
        out = batch_norm(f)
    assert error < tolerance
    assert second_moment_deviation(out, IRREPS) < 1 + 1e-3
    assert out[:, :4].mean(dim=0).abs().max() < 1e-3  # even scalars centred


# --------------------------------------------------------------------------- the checks


def test_second_moment_deviation_is_the_worst_factor_away_from_one():
    irreps = o3.Irreps("1x0e + 1x1o")
    f = torch.cat([torch.full((10, 1), 2.0), torch.full((10, 3), 0.25)], dim=1)  # 4 and 1/16
    assert second_moment_deviation(f, irreps) == pytest.approx(16.0)
    assert second_moment_deviation(torch.ones(3, 4), irreps) == 1.0
    assert second_moment_deviation(torch.zeros(3, 4), irreps) == math.inf
    nan = torch.full((3, 4), math.nan)
    assert not second_moment_deviation(nan, irreps) < WITHIN_FACTOR  # NaN fails the check


def test_pre_norm_bound_is_linear_in_the_root_mean_square():
    assert pre_norm_bound(0, 8.0, initial=2.0) == pytest.approx(2.0)
    assert pre_norm_bound(10, 4.0) == pytest.approx(441.0)
    rms = [math.sqrt(pre_norm_bound(depth, 9.0)) for depth in range(5)]
    assert rms == pytest.approx([1.0, 4.0, 7.0, 10.0, 13.0])
    with pytest.raises(ValueError, match="depth"):
        pre_norm_bound(-1, 4.0)


# ------------------------------------------------- every scaling, and the variant without it
# Each test applies the chapter's check, second_moment_deviation(x) < WITHIN_FACTOR, to the
# real operation (it must pass) and to the variant without the scaling (it must fail).


@pytest.fixture(scope="module")
def graph():
    """The chapter's graph, smaller: 150 points in a cube, mean degree about 15."""
    generator = torch.Generator().manual_seed(1)
    pos = 3.8 * torch.rand(150, 3, generator=generator)
    edge_index = radius_graph(pos, 1.3)
    return pos, edge_index, edge_index.shape[1] / 150


def test_the_graph_has_the_degree_the_scalings_assume(graph):
    _, _, num_neighbors = graph
    assert 12 < num_neighbors < 19


def test_component_spherical_harmonics_pass_and_the_integral_default_fails(graph):
    pos, edge_index, _ = graph
    edge_vec = edge_vectors(pos, edge_index)
    irreps_sh = o3.Irreps.spherical_harmonics(3)
    component = o3.spherical_harmonics(irreps_sh, edge_vec, True, normalization="component")
    integral = o3.spherical_harmonics(irreps_sh, edge_vec, True)  # e3nn's default
    assert second_moment_deviation(component, irreps_sh) < 1 + 1e-5
    assert second_moment_deviation(integral, irreps_sh) > WITHIN_FACTOR  # 4 pi ~ 12.6


def test_the_radial_embedding_needs_its_sqrt_of_the_number_of_basis(graph):
    pos, edge_index, _ = graph
    edge_length = edge_vectors(pos, edge_index).norm(dim=1)
    embedded = embed_edge_length(edge_length, 1.3, 10, cutoff=False)
    bumps = soft_one_hot_linspace(edge_length, 0.0, 1.3, 10, "smooth_finite", cutoff=False)
    assert second_moment_deviation(embedded) < WITHIN_FACTOR
    assert second_moment_deviation(bumps) > WITHIN_FACTOR  # about 1/B = 0.1


def test_the_radial_mlp_needs_e3nns_initialization(graph):
    pos, edge_index, _ = graph
    edge_length = edge_vectors(pos, edge_index).norm(dim=1)
    embedded = embed_edge_length(edge_length, 1.3, 10, cutoff=False)
    # Five initialisations pooled: one 16-unit hidden layer is a small sample.
    with torch.no_grad():
        e3nn_mlp = torch.cat(
            [nn.FullyConnectedNet([10, 16, 100], torch.relu)(embedded) for _ in range(5)]
        )
        torch_mlp = torch.cat(
            [
                torch.nn.Sequential(
                    torch.nn.Linear(10, 16), torch.nn.ReLU(), torch.nn.Linear(16, 100)
                )(embedded)
                for _ in range(5)
            ]
        )
    assert second_moment_deviation(e3nn_mlp) < WITHIN_FACTOR
    assert second_moment_deviation(torch_mlp) > WITHIN_FACTOR  # about 0.08


def test_the_tensor_product_needs_its_path_normalization(graph):
    pos, edge_index, _ = graph
    irreps, irreps_sh = o3.Irreps("8x0e + 4x1o + 2x2e"), o3.Irreps.spherical_harmonics(2)
    edge_sh = o3.spherical_harmonics(irreps_sh, edge_vectors(pos, edge_index), True, "component")
    f = irreps.randn(150, -1)[edge_index[0]]
    outputs = {}
    for path_normalization in ("element", "none"):
        tp = o3.FullyConnectedTensorProduct(
            irreps, irreps_sh, irreps, shared_weights=False, path_normalization=path_normalization
        )
        weight = torch.randn(f.shape[0], tp.weight_numel)
        with torch.no_grad():
            outputs[path_normalization] = tp(f, edge_sh, weight)
    assert second_moment_deviation(outputs["element"], irreps) < WITHIN_FACTOR
    assert second_moment_deviation(outputs["none"], irreps) > WITHIN_FACTOR  # the fan-in, 14-18


def test_the_convolution_needs_its_one_over_sqrt_z(graph):
    pos, edge_index, num_neighbors = graph
    irreps = o3.Irreps("4x0e + 2x1o + 1x2e")
    args = (irreps, irreps, o3.Irreps.spherical_harmonics(2), 10, 1.3)
    conv = Convolution(*args, num_neighbors=num_neighbors)
    conv_without = Convolution(*args, num_neighbors=1.0)  # no 1/sqrt(z)
    conv_without.load_state_dict(conv.state_dict())
    f = irreps.randn(150, -1)
    with torch.no_grad():
        assert second_moment_deviation(conv(f, pos, edge_index), irreps) < WITHIN_FACTOR
        assert second_moment_deviation(conv_without(f, pos, edge_index), irreps) > WITHIN_FACTOR


def attention_outputs(att, f, pos, edge_index):
    """The layer's output, and the variant weighted by alpha instead of sqrt(alpha), from the
    layer's own submodules."""
    edge_dst = edge_index[1]
    logits, edge_log_weight, v = att.edge_terms(f, pos, edge_index)
    alpha = segment_softmax(logits, edge_dst, f.shape[0], log_weight=edge_log_weight)
    return [
        scatter(weight * v, edge_dst, dim=0, dim_size=f.shape[0])
        for weight in (alpha.relu().sqrt(), alpha)
    ]


def test_the_attention_needs_its_sqrt_alpha(graph):
    pos, edge_index, _ = graph
    irreps = o3.Irreps("4x0e + 2x1o + 1x2e")
    att = EquivariantAttention(
        irreps, "4x0e + 2x1o", "4x0e + 2x1o", irreps, o3.Irreps.spherical_harmonics(2), 10, 1.3
    )
    f = irreps.randn(150, -1)
    with torch.no_grad():
        with_sqrt, with_alpha = attention_outputs(att, f, pos, edge_index)
        torch.testing.assert_close(with_sqrt, att(f, pos, edge_index))
    assert second_moment_deviation(with_sqrt, irreps) < WITHIN_FACTOR
    assert second_moment_deviation(with_alpha, irreps) > WITHIN_FACTOR  # about 1/n_eff


def test_a_deep_stack_needs_residual_connections_and_normalization(graph):
    # The chapter's depth check: the second moment of every irrep type after L layers stays
    # within pre_norm_bound(L, c, m_0). A plain stack of convolutions, each with 1/sqrt(z),
    # leaves it; the same layers in pre-norm residual blocks f <- f + layer(norm(f)) do not.
    pos, edge_index, num_neighbors = graph
    irreps = o3.Irreps("4x0e + 2x1o + 1x2e")
    depth = 10
    layers = [
        Convolution(irreps, irreps, o3.Irreps.spherical_harmonics(2), 10, 1.3, num_neighbors)
        for _ in range(depth)
    ]
    norms = [EquivariantLayerNorm(irreps, scope="node") for _ in range(depth)]
    f_plain = f_residual = irreps.randn(150, -1)
    initial = max(second_moment_per_irrep(f_plain, irreps).values()).item()

    def within_band(f, layer_count):
        largest = max(second_moment_per_irrep(f, irreps).values()).item()
        return largest <= pre_norm_bound(layer_count, MAX_INCREMENT, initial)

    residual_within, plain_within = [], []
    with torch.no_grad():
        for k, (layer, norm) in enumerate(zip(layers, norms), 1):
            update = layer(norm(f_residual), pos, edge_index)
            assert max(second_moment_per_irrep(update, irreps).values()) <= MAX_INCREMENT
            f_residual = f_residual + update
            f_plain = layer(f_plain, pos, edge_index)
            residual_within.append(within_band(f_residual, k))
            plain_within.append(within_band(f_plain, k))
    assert all(residual_within)
    assert not plain_within[-1]


def test_gated_nonlinearity_refuses_irreps_whose_scalars_do_not_come_first():
    with pytest.raises(ValueError, match="scalars first"):
        gated_nonlinearity("2x1o + 3x0e")
    with pytest.raises(ValueError, match="scalars first"):
        gated_nonlinearity("2x0e + 1x1o + 2x0e")
    assert gated_nonlinearity("3x0e + 2x1o").irreps_out == o3.Irreps("3x0e + 2x1o")
