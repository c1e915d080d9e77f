"""Convolution and EquivariantAttention: symmetries, agreement with the chapters' formulas,
batches, gradients at awkward places, and input validation."""

import copy
import functools

import pytest
import torch
from e3nn import o3
from e3nn.math import soft_one_hot_linspace, soft_unit_step

from se3tutor import Convolution, EquivariantAttention, radius_graph, scatter
from se3tutor.checks import (
    default_dtype,
    equivariance_error,
    gradients_are_finite,
    permutation_error,
)

MAX_RADIUS = 1.3


def make_convolution():
    # Odd and even features and all harmonics up to l=2: every parity path is exercised.
    return Convolution(
        "4x0e + 3x1o + 2x1e + 1x2e",
        "3x0e + 2x0o + 2x1o + 1x2e",
        o3.Irreps.spherical_harmonics(2),
        number_of_basis=6,
        max_radius=MAX_RADIUS,
        num_neighbors=4.0,
    )


def make_attention():
    return EquivariantAttention(
        "10x0e + 5x1o + 2x2e",
        "11x0e + 4x1o",
        "12x0e + 3x1o",
        "14x0e + 6x1o + 1x1e",
        o3.Irreps.spherical_harmonics(3),
        number_of_basis=10,
        max_radius=MAX_RADIUS,
    )


LAYERS = {"convolution": make_convolution, "attention": make_attention}


@functools.cache
def build_layer(name, dtype):
    """Layers are built once per dtype (building e3nn modules takes a while); tests must not
    modify them. e3nn stores its Clebsch-Gordan constants in the default dtype when a module
    is built: a float64 layer must be built under float64, not converted afterwards."""
    with default_dtype(dtype):
        return LAYERS[name]()


@pytest.fixture(params=list(LAYERS))
def layer(request, dtype):
    return build_layer(request.param, dtype)


def random_inputs(layer, num_nodes=25, device="cpu"):
    dtype = next(layer.parameters()).dtype
    f = layer.irreps_in.randn(num_nodes, -1, dtype=dtype, device=device)
    pos = torch.randn(num_nodes, 3, dtype=dtype, device=device)
    return f, pos


def test_layer_is_equivariant_under_random_rotations_and_translations(
    layer, dtype, tolerance, device
):
    layer = copy.deepcopy(layer).to(device=device)  # the cached layer stays on the CPU
    f, pos = random_inputs(layer, device=device)
    for _ in range(3):
        error = equivariance_error(layer, layer.irreps_in, layer.irreps_out, f, pos)
        assert error < tolerance


def test_layer_is_equivariant_under_inversion(layer, dtype, tolerance):
    f, pos = random_inputs(layer)
    error = equivariance_error(layer, layer.irreps_in, layer.irreps_out, f, pos, inversion=True)
    assert error < tolerance


@pytest.mark.parametrize("dtype", [torch.float64], ids=["float64"])
def test_the_inversion_check_catches_a_parity_mistake(layer, dtype):
    # Declaring the odd vector outputs even must break the inversion check (and only it).
    f, pos = random_inputs(layer)
    wrong = o3.Irreps(str(layer.irreps_out).replace("1o", "1e"))
    assert equivariance_error(layer, layer.irreps_in, wrong, f, pos) < 1e-10
    assert equivariance_error(layer, layer.irreps_in, wrong, f, pos, inversion=True) > 1e-3


@pytest.mark.parametrize("dtype", [torch.float64], ids=["float64"])
def test_layer_is_invariant_to_the_order_of_the_nodes(layer, dtype):
    f, pos = random_inputs(layer)
    assert permutation_error(layer, f, pos) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float32], ids=["float32"])
def test_a_batch_of_graphs_gives_each_graph_its_own_result(layer, dtype):
    f1, pos1 = random_inputs(layer, num_nodes=12)
    f2, pos2 = random_inputs(layer, num_nodes=9)
    pos2 = pos2 + 0.1  # overlapping clouds: only `batch` keeps them apart
    batch = torch.cat([torch.zeros(12, dtype=torch.long), torch.ones(9, dtype=torch.long)])
    together = layer(torch.cat([f1, f2]), torch.cat([pos1, pos2]), batch=batch)
    torch.testing.assert_close(together, torch.cat([layer(f1, pos1), layer(f2, pos2)]))


@pytest.mark.parametrize("dtype", [torch.float32], ids=["float32"])
def test_a_given_edge_index_is_used_instead_of_the_radius_graph(layer, dtype):
    f, pos = random_inputs(layer)
    torch.testing.assert_close(
        layer(f, pos, edge_index=radius_graph(pos, MAX_RADIUS)), layer(f, pos)
    )
    no_edges = torch.empty(2, 0, dtype=torch.long)
    assert torch.equal(layer(f, pos, edge_index=no_edges), torch.zeros(25, layer.irreps_out.dim))


@pytest.mark.parametrize("dtype", [torch.float32], ids=["float32"])
def test_a_single_node_and_a_graph_without_edges_give_zeros(layer, dtype):
    f, pos = random_inputs(layer, num_nodes=1)
    assert torch.equal(layer(f, pos), torch.zeros(1, layer.irreps_out.dim))
    f, pos = random_inputs(layer, num_nodes=4)
    assert torch.equal(layer(f, pos * 100), torch.zeros(4, layer.irreps_out.dim))


@pytest.mark.parametrize(
    "distance",
    [0.0, 1e-6, MAX_RADIUS / 2, MAX_RADIUS - 1e-6, MAX_RADIUS, MAX_RADIUS + 1e-6, 2 * MAX_RADIUS],
)
def test_gradients_are_finite_at_coincident_points_and_at_the_cutoff(layer, dtype, distance):
    f, _ = random_inputs(layer, num_nodes=3)
    pos = torch.tensor([[0.0, 0.0, 0.0], [distance, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=dtype)
    assert gradients_are_finite(layer, f, pos)


def test_convolution_computes_the_guide_formula_exactly():
    # e3nn's convolution guide, with its own sign of the edge vector (pos[dst] - pos[src]):
    # its l=1 harmonics cannot couple 10x0e + 10x1e to 20x0e + 10x1e, so the sign drops out.
    irreps_sh = o3.Irreps.spherical_harmonics(2)
    conv = Convolution(
        "10x0e + 10x1e",
        "20x0e + 10x1e",
        irreps_sh,
        number_of_basis=10,
        max_radius=1.8,
        num_neighbors=9.5,
    )
    f_in, pos = conv.irreps_in.randn(100, -1), torch.randn(100, 3)
    edge_src, edge_dst = radius_graph(pos, 1.8)
    edge_vec = pos[edge_dst] - pos[edge_src]
    sh = o3.spherical_harmonics(irreps_sh, edge_vec, normalize=True, normalization="component")
    emb = soft_one_hot_linspace(edge_vec.norm(dim=1), 0.0, 1.8, 10, "smooth_finite", False)
    summand = conv.tp(f_in[edge_src], sh, conv.fc(emb.mul(10**0.5)))
    guide = scatter(summand, edge_dst, dim=0, dim_size=100).div(9.5**0.5)
    assert torch.equal(conv(f_in, pos), guide)


def guide_attention(att, f, pos):
    """The later version of e3nn's attention guide, verbatim in its arithmetic."""
    edge_src, edge_dst = radius_graph(pos, att.max_radius)
    edge_vec = pos[edge_src] - pos[edge_dst]
    edge_length = edge_vec.norm(dim=1)
    emb = soft_one_hot_linspace(
        edge_length, 0.0, att.max_radius, att.number_of_basis, "smooth_finite", True
    ).mul(att.number_of_basis**0.5)
    edge_weight_cutoff = soft_unit_step(10 * (1 - edge_length / att.max_radius))
    sh = o3.spherical_harmonics(att.irreps_sh, edge_vec, True, normalization="component")
    q = att.h_q(f)
    k = att.tp_k(f[edge_src], sh, att.fc_k(emb))
    v = att.tp_v(f[edge_src], sh, att.fc_v(emb))
    exp = edge_weight_cutoff[:, None] * att.dot(q[edge_dst], k).exp()
    z = scatter(exp, edge_dst, dim=0, dim_size=len(f))
    z[z == 0] = 1
    alpha = exp / z[edge_dst]
    return scatter(alpha.relu().sqrt() * v, edge_dst, dim=0, dim_size=len(f))


def test_attention_computes_the_guide_formula_where_it_is_finite():
    att = make_attention().double()  # both sides use the same (float32-built) constants
    f, pos = random_inputs(att, num_nodes=40)
    torch.testing.assert_close(att(f, pos), guide_attention(att, f, pos), rtol=0, atol=1e-12)


def test_attention_stays_finite_where_the_guide_overflows():
    att = make_attention()
    f, pos = random_inputs(att, num_nodes=40)
    f = f * 30  # logits of order 1e3: exp overflows float32
    assert not torch.isfinite(guide_attention(att, f, pos)).all()
    assert torch.isfinite(att(f, pos)).all()


def test_attention_output_keeps_the_second_moment_of_the_values():
    # sqrt(alpha) weighting: sum_j alpha_ij = 1, so the output's second moment is the values'.
    att = make_attention()
    f, pos = random_inputs(att, num_nodes=400)
    pos = pos * 2
    second_moment = att(f, pos).pow(2).mean()
    assert 0.4 < second_moment < 2.0


@pytest.mark.parametrize("dtype", [torch.float32], ids=["float32"])
def test_layers_accept_float64_and_reject_mixed_dtypes(layer, dtype):
    f, pos = random_inputs(layer)
    with pytest.raises(TypeError, match="parameters are torch.float32"):
        layer(f.double(), pos.double())
    with pytest.raises(TypeError, match="f is torch.float32 but pos is torch.float64"):
        layer(f, pos.double())


@pytest.mark.parametrize("dtype", [torch.float32], ids=["float32"])
@pytest.mark.parametrize(
    "change, error",
    [
        (lambda f, pos: (f[:, :-1], pos), "f must have shape"),
        (lambda f, pos: (f, pos[:, :2]), "pos must have shape"),
        (lambda f, pos: (f[:-1], pos), "f has 24 nodes but pos has 25"),
        (lambda f, pos: (f.tolist(), pos), "f must be a torch.Tensor"),
    ],
)
def test_layers_reject_bad_shapes_naming_the_argument(layer, dtype, change, error):
    with pytest.raises((ValueError, TypeError), match=error):
        layer(*change(*random_inputs(layer)))


@pytest.mark.parametrize("dtype", [torch.float32], ids=["float32"])
def test_layers_reject_a_batch_or_edge_index_of_the_wrong_shape(layer, dtype):
    f, pos = random_inputs(layer)
    with pytest.raises(ValueError, match="batch must have shape"):
        layer(f, pos, batch=torch.zeros(24, dtype=torch.long))
    with pytest.raises(ValueError, match="edge_index must have shape"):
        layer(f, pos, edge_index=torch.zeros(3, 5, dtype=torch.long))


@pytest.mark.parametrize("dtype", [torch.float32], ids=["float32"])
def test_layers_reject_inputs_on_another_device_with_a_type_error(layer, dtype):
    # The meta device stands in for a GPU: a mismatch is caught before any computation.
    f, pos = random_inputs(layer)
    with pytest.raises(TypeError, match="f is on cpu but pos is on meta"):
        layer(f, pos.to("meta"))
    with pytest.raises(TypeError, match="edge_index is on meta but pos is on cpu"):
        layer(f, pos, edge_index=torch.zeros(2, 3, dtype=torch.long, device="meta"))
    with pytest.raises(
        TypeError, match="parameters are torch.float32 on cpu but f is torch.float64"
    ):
        layer(f.double(), pos.double())  # the parameters are float32


@pytest.mark.parametrize("dtype", [torch.float32], ids=["float32"])
@pytest.mark.parametrize("fraction", [0.998, 0.999, 0.9995])
def test_attention_gradients_are_finite_where_the_cutoff_weight_underflows(dtype, fraction):
    # A lone neighbour just inside the cutoff: c(r) is subnormal or zero in float32.
    att = build_layer("attention", dtype)
    f, _ = random_inputs(att, num_nodes=2)
    pos = torch.tensor([[0.0, 0.0, 0.0], [fraction * MAX_RADIUS, 0.0, 0.0]], dtype=dtype)
    assert gradients_are_finite(att, f, pos)


@pytest.mark.parametrize("dtype", [torch.float32], ids=["float32"])
def test_attention_force_loss_gradients_are_finite_where_alpha_is_zero(dtype):
    # Next to a near neighbour, one just inside the cutoff has alpha = 0 in float32; a force
    # loss differentiates twice, and relu().sqrt() has a NaN second derivative at 0.
    att = build_layer("attention", dtype)
    f, _ = random_inputs(att, num_nodes=3)
    pos = torch.tensor(
        [[0.0, 0, 0], [0.4 * MAX_RADIUS, 0, 0], [0, 0.9995 * MAX_RADIUS, 0]], requires_grad=True
    )
    (force,) = torch.autograd.grad(att(f, pos).sum(), pos, create_graph=True)
    grads = torch.autograd.grad(force.pow(2).sum(), list(att.parameters()), allow_unused=True)
    assert all(g is None or torch.isfinite(g).all() for g in grads)
