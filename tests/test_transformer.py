"""SE3Transformer and its blocks: symmetries, the multi-head formula, graphs and batches,
edge features, smoothness, and input validation."""

import copy
import functools
import warnings

import pytest
import torch
from e3nn import o3

from se3tutor import radius_graph
from se3tutor.checks import (
    default_dtype,
    equivariance_error,
    gradients_match_finite_differences,
    largest_jumps,
    permutation_error,
    response_along_line,
)
from se3tutor.graph import segment_softmax
from se3tutor.norm import EquivariantLayerNorm
from se3tutor.transformer import SE3Transformer, edge_geometry, hidden_irreps

MAX_RADIUS = 1.4
IRREPS_IN = "3x0e + 2x1o + 1x2e"
IRREPS_OUT = "2x0e + 1x0o + 1x1o + 1x1e + 1x2e"


@functools.cache
def build_model(dtype=torch.float32, symmetry="SE3", **overrides):
    """Models are built once per configuration (e3nn modules take a while to build); tests
    must not modify them. Float64 models are built under float64 (see checks.default_dtype)."""
    options = dict(
        max_radius=MAX_RADIUS, num_layers=2, num_heads=3, number_of_basis=6, radial_hidden=16
    )
    options.update(overrides)
    with default_dtype(dtype):
        return SE3Transformer(IRREPS_IN, hidden_irreps(6, 2, symmetry), IRREPS_OUT, **options)


def random_inputs(model, num_nodes=20, scale=1.0):
    dtype = next(model.parameters()).dtype
    f = model.irreps_in.randn(num_nodes, -1, dtype=dtype)
    pos = scale * torch.randn(num_nodes, 3, dtype=dtype)
    return f, pos


# With "E3" the 0o and 1e outputs are unreachable (always 0, and warned about); the 0e, 1o
# and 2e outputs are what the test checks then.
@pytest.mark.filterwarnings("ignore:irreps_out has")
@pytest.mark.parametrize("symmetry", ["E3", "SE3"])
@pytest.mark.parametrize("attend_self", [False, True])
def test_model_is_equivariant_under_rotations_inversion_and_translations(
    dtype, tolerance, symmetry, attend_self
):
    model = build_model(dtype, symmetry, attend_self=attend_self)
    f, pos = random_inputs(model)
    for inversion in (False, True, False):
        error = equivariance_error(model, IRREPS_IN, IRREPS_OUT, f, pos, inversion=inversion)
        assert error < tolerance


def test_model_is_invariant_to_the_order_of_the_nodes():
    model = build_model(torch.float64)
    f, pos = random_inputs(model)
    assert permutation_error(model, f, pos) < 1e-12


def test_the_parity_check_catches_a_wrongly_declared_output():
    model = build_model(torch.float64)
    f, pos = random_inputs(model)
    wrong = IRREPS_OUT.replace("1x1o", "1x1x").replace("1x1e", "1x1o").replace("1x1x", "1x1e")
    assert equivariance_error(model, IRREPS_IN, wrong, f, pos) < 1e-9
    assert equivariance_error(model, IRREPS_IN, wrong, f, pos, inversion=True) > 1e-3


def test_se3_hidden_irreps_carry_the_cross_product_that_natural_parities_lose():
    # Only vectors (1o) in, a pseudovector (1e) out: x1 x x2 needs the 1o x 1o -> 1e path.
    def pseudovector_out(symmetry):
        with default_dtype(torch.float64):
            model = SE3Transformer(
                "2x1o", hidden_irreps(4, 1, symmetry), "1x1e", max_radius=2.0, num_heads=2
            )
        return model(torch.randn(8, 6, dtype=torch.float64), torch.randn(8, 3, dtype=torch.float64))

    assert torch.equal(pseudovector_out("E3"), torch.zeros(8, 3, dtype=torch.float64))
    assert pseudovector_out("SE3").abs().max() > 1e-3


def test_hidden_irreps_for_both_symmetries():
    assert hidden_irreps(4, 2) == o3.Irreps("4x0e + 4x1o + 4x2e")
    assert hidden_irreps(4, 1, "SE3") == o3.Irreps("4x0e + 4x0o + 4x1o + 4x1e")
    with pytest.raises(ValueError, match="symmetry"):
        hidden_irreps(4, 1, "SO3")


def test_multi_head_attention_computes_each_heads_softmax_separately():
    # The reference slices each head out of every irrep block by hand and runs the
    # Attention chapter's formula on it; the module does it with one matrix product.
    model = build_model(torch.float64, attend_self=False)
    attention = model.blocks[0].attention
    f = model.irreps_hidden.randn(30, -1, dtype=torch.float64)
    pos = torch.randn(30, 3, dtype=torch.float64)
    edge_index = radius_graph(pos, MAX_RADIUS)
    edges = edge_geometry(pos, edge_index, model.irreps_sh, MAX_RADIUS, 6)
    q = attention.h_q(f)
    messages = attention.tp(f[edges.edge_src], edges.edge_sh, attention.fc(edges.edge_scalars))
    k, v = attention.h_k(messages), attention.h_v(messages)

    def head_slice(x, head):
        parts = []
        for (mul, ir), block in zip(attention.irreps_heads, attention.irreps_heads.slices()):
            per_head = mul // attention.num_heads
            parts.append(
                x[:, block].reshape(-1, mul, ir.dim)[:, head * per_head : (head + 1) * per_head]
            )
        return parts

    d = attention.irreps_head.dim
    outputs = []
    for head in range(attention.num_heads):
        q_h, k_h, v_h = (
            head_slice(q[edges.edge_dst], head),
            head_slice(k, head),
            head_slice(v, head),
        )
        logits = sum((a * b).sum(dim=(1, 2)) for a, b in zip(q_h, k_h)) / d**0.5
        alpha = segment_softmax(logits, edges.edge_dst, 30, log_weight=edges.edge_log_weight)
        sums = [
            torch.zeros(30, *block.shape[1:], dtype=torch.float64).index_add_(
                0, edges.edge_dst, alpha.sqrt()[:, None, None] * block
            )
            for block in v_h
        ]
        outputs.append(sums)
    # Reassemble irreps_heads: block by block, heads side by side.
    blocks = [
        torch.cat([outputs[h][b] for h in range(attention.num_heads)], dim=1)
        for b in range(len(attention.irreps_heads))
    ]
    reference = attention.h_o(torch.cat([b.reshape(30, -1) for b in blocks], dim=1))
    torch.testing.assert_close(attention(f, edges), reference, rtol=0, atol=1e-12)


def test_a_batch_of_graphs_gives_each_graph_its_own_result():
    model = build_model()
    f1, pos1 = random_inputs(model, num_nodes=12)
    f2, pos2 = random_inputs(model, num_nodes=9)
    batch = torch.cat([torch.zeros(12, dtype=torch.long), torch.ones(9, dtype=torch.long)])
    together = model(torch.cat([f1, f2]), torch.cat([pos1, pos2 + 0.1]), batch=batch)
    apart = torch.cat([model(f1, pos1), model(f2, pos2 + 0.1)])
    torch.testing.assert_close(together, apart)


def influence(model, f, pos, node, **kwargs):
    """Which nodes' input features the output of ``node`` depends on (gradient != 0)."""
    f = f.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(f, pos, **kwargs)[node].sum(), f)
    return grad.abs().sum(dim=1) > 0


def test_a_node_sees_only_its_neighbors_per_layer():
    model = build_model(torch.float64, num_layers=1)
    f, pos = random_inputs(model, num_nodes=30, scale=1.5)
    edge_src, edge_dst = radius_graph(pos, MAX_RADIUS)
    expected = torch.zeros(30, dtype=torch.bool)
    expected[edge_src[edge_dst == 0]] = True
    expected[0] = True  # the residual connection
    assert torch.equal(influence(model, f, pos, 0), expected)


def test_max_num_neighbors_keeps_only_the_nearest():
    model = build_model(torch.float64, num_layers=1, max_num_neighbors=3)
    f, pos = random_inputs(model, num_nodes=30, scale=0.5)
    distances = (pos - pos[0]).norm(dim=1)
    nearest = distances.argsort()[:4]  # node 0 itself and its 3 nearest neighbours
    expected = torch.zeros(30, dtype=torch.bool)
    expected[nearest] = True
    assert torch.equal(influence(model, f, pos, 0), expected)


def test_a_given_edge_index_replaces_the_radius_graph():
    model = build_model(torch.float64, num_layers=1)
    f, pos = random_inputs(model, num_nodes=10, scale=0.3)
    chain = torch.tensor([[1, 2, 3], [0, 0, 0]])  # only 1, 2, 3 send to node 0
    expected = torch.zeros(10, dtype=torch.bool)
    expected[[0, 1, 2, 3]] = True
    assert torch.equal(influence(model, f, pos, 0, edge_index=chain), expected)
    torch.testing.assert_close(
        model(f, pos, edge_index=radius_graph(pos, MAX_RADIUS)), model(f, pos)
    )


def test_attend_self_lets_an_isolated_node_attend_to_itself():
    for attend_self in (False, True):
        model = build_model(torch.float64, num_layers=1, attend_self=attend_self)
        attention = model.blocks[0].attention
        f = model.irreps_hidden.randn(2, -1, dtype=torch.float64)
        pos = torch.tensor([[0.0, 0, 0], [10.0, 0, 0]], dtype=torch.float64)  # no edges
        edges = edge_geometry(pos, radius_graph(pos, MAX_RADIUS), model.irreps_sh, MAX_RADIUS, 6)
        isolated = attention(f, edges)
        assert (isolated.abs().max() > 1e-3) == attend_self


def test_edge_features_enter_the_model_and_keep_it_equivariant(dtype, tolerance):
    model = build_model(dtype, edge_attr_dim=4)
    f, pos = random_inputs(model)
    edge_index = radius_graph(pos, MAX_RADIUS)
    edge_attr = torch.randn(edge_index.shape[1], 4, dtype=dtype)

    def layer(f, pos):
        return model(f, pos, edge_index=edge_index, edge_attr=edge_attr)

    assert equivariance_error(layer, IRREPS_IN, IRREPS_OUT, f, pos, inversion=True) < tolerance
    other = layer(f, pos) - model(f, pos, edge_index=edge_index, edge_attr=edge_attr.flip(0))
    assert other.abs().max() > 1e-3


@pytest.mark.slow
def test_the_model_is_smooth_through_the_cutoff_and_differentiable_at_awkward_places():
    model = build_model(torch.float64, edge_attr_dim=0)
    f, pos = random_inputs(model, num_nodes=4, scale=0.4)
    pos[3] = pos[0] + torch.tensor([MAX_RADIUS, 0, 0], dtype=torch.float64)  # at the cutoff
    direction = torch.tensor([1.0, 0, 0], dtype=torch.float64)
    # The cutoff's sqrt(c(r)) has large curvature just inside the sphere: resolve it with
    # steps of 1e-3 and 1e-4 (a step of 1e-2 jumps across the whole rise).
    coarse = largest_jumps(model, f, pos, 3, direction, -0.01, 0.01, 1e-3)
    fine = largest_jumps(model, f, pos, 3, direction, -0.01, 0.01, 1e-4)
    # Smooth: ten times smaller steps, about ten times smaller jumps (3x allows for curvature).
    assert fine[0] < coarse[0] / 3 and fine[1] < coarse[1] / 3
    pos[2] = pos[1]  # coincident points
    assert gradients_match_finite_differences(model, f, pos)


def test_the_output_has_second_moment_of_order_one_at_initialization():
    model = build_model(num_layers=4)
    f, pos = random_inputs(model, num_nodes=150, scale=1.2)
    second_moment = model(f, pos).pow(2).mean()
    assert 0.2 < second_moment < 5.0


@pytest.mark.parametrize("dtype", [torch.float32], ids=["float32"])
def test_model_runs_on_the_device(dtype, device):
    model = copy.deepcopy(build_model(dtype)).to(device)  # the cached model stays on the CPU
    f, pos = random_inputs(model)
    out = model(f.to(device), pos.to(device))
    assert out.device.type == device.type and out.shape == (20, model.irreps_out.dim)
    out.sum().backward()


def test_bad_inputs_are_rejected_with_a_message_naming_the_argument():
    model = build_model()
    f, pos = random_inputs(model, num_nodes=5)
    with pytest.raises(ValueError, match="f must have shape"):
        model(f[:, :3], pos)
    with pytest.raises(ValueError, match="pos must have shape"):
        model(f, pos[:, :2])
    with pytest.raises(ValueError, match="edge_attr given"):
        model(f, pos, edge_attr=torch.zeros(3, 4))
    with pytest.raises(ValueError, match="max_radius"):
        SE3Transformer("0e", "4x0e", "0e", max_radius=0.0)
    model = build_model(edge_attr_dim=4)
    edge_index = radius_graph(pos, MAX_RADIUS)
    with pytest.raises(ValueError, match="edge_attr_dim=4"):
        model(f, pos, edge_index=edge_index)
    with pytest.raises(ValueError, match="edge_attr must have shape"):
        model(f, pos, edge_index=edge_index, edge_attr=torch.zeros(edge_index.shape[1] + 1, 4))
    with pytest.raises(ValueError, match="edge_index"):
        model(f, pos, edge_attr=torch.zeros(3, 4))


def test_per_node_norms_keep_the_force_small_where_a_lone_neighbor_enters():
    # Two atoms: the vectors of each are fed only by the other's message, tiny near the
    # cutoff. Normalised per irrep block, that tiny block is blown up to size 1 within a
    # sliver of distance (a near-jump and a force spike); per node it stays tiny.
    model = build_model(torch.float64)
    per_irrep = copy.deepcopy(model)
    for norm in per_irrep.modules():
        if isinstance(norm, EquivariantLayerNorm):
            norm.scope = "irrep"
    f = model.irreps_in.randn(2, -1, dtype=torch.float64)
    pos = torch.zeros(2, 3, dtype=torch.float64)
    direction = torch.tensor([1.0, 0, 0], dtype=torch.float64)
    t = torch.linspace(0.9 * MAX_RADIUS, MAX_RADIUS, 301, dtype=torch.float64)
    _, force = response_along_line(model, f, pos, 1, direction, t)
    _, force_per_irrep = response_along_line(per_irrep, f, pos, 1, direction, t)
    assert force_per_irrep.abs().max() > 5 * force.abs().max()


@pytest.mark.parametrize("fraction", [0.998, 0.999, 0.9995])
def test_force_loss_gradients_are_finite_where_the_cutoff_weight_underflows(fraction):
    # A neighbour just inside the cutoff next to a near one: its c(r) underflows float32 and
    # its alpha is 0 (or subnormal). A force loss differentiates the output twice; both
    # passes must stay finite.
    model = build_model()
    f = model.irreps_in.randn(3, -1)
    pos = torch.tensor(
        [[0.0, 0.0, 0.0], [0.3 * MAX_RADIUS, 0.0, 0.0], [0.0, fraction * MAX_RADIUS, 0.0]],
        requires_grad=True,
    )
    (force,) = torch.autograd.grad(model(f, pos)[:, 0].sum(), pos, create_graph=True)
    grads = torch.autograd.grad(force.pow(2).sum(), list(model.parameters()), allow_unused=True)
    assert torch.isfinite(force).all()
    assert all(g is None or torch.isfinite(g).all() for g in grads)


def test_outputs_the_hidden_irreps_cannot_reach_are_warned_about():
    with pytest.warns(UserWarning, match=r"irreps_out has 1e, which irreps_hidden .* lacks"):
        model = SE3Transformer("2x1o", hidden_irreps(4, 1, "E3"), "1x1e + 1x1o", max_radius=2.0)
    out = model(torch.randn(6, 6), torch.randn(6, 3))
    assert out[:, :3].abs().max() == 0 and out[:, 3:].abs().max() > 0  # 1e zero, 1o not
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SE3Transformer("2x1o", hidden_irreps(4, 1, "SE3"), "1x1e + 1x1o", max_radius=2.0)


def test_inputs_the_hidden_irreps_cannot_take_are_warned_about():
    with pytest.warns(UserWarning, match=r"irreps_in has 0o, which irreps_hidden .* lacks"):
        model = SE3Transformer("1x0o", hidden_irreps(4, 1, "E3"), "1x0e", max_radius=2.0)
    pos = torch.randn(6, 3)
    assert model(torch.randn(6, 1), pos).equal(model(torch.randn(6, 1), pos))  # ignored


@pytest.mark.parametrize("argument", ["irreps_in", "irreps_hidden", "irreps_out", "irreps_sh"])
def test_an_irreps_typo_is_named(argument):
    arguments = dict(irreps_in="4x0e", irreps_hidden="8x0e + 4x1o", irreps_out="1x0e")
    options = dict(max_radius=2.0)
    if argument == "irreps_sh":
        options["irreps_sh"] = "1x0e + 1x1q"
    else:
        arguments[argument] = "8x0e + 4x1q"
    with pytest.raises(ValueError, match=f"{argument}=.* are not irreps"):
        SE3Transformer(*arguments.values(), **options)


def _outputs_and_gradients(model, f, pos, edge_index, create_graph=False):
    """The output, and the gradients of a loss on it (on the forces, with ``create_graph``)
    with respect to ``f``, ``pos`` and every parameter."""
    f, pos = f.clone().requires_grad_(), pos.clone().requires_grad_()
    out = model(f, pos, edge_index=edge_index)
    loss = out.pow(2).sum()
    if create_graph:  # a force loss: differentiate the gradient once more
        forces = torch.autograd.grad(out[:, 0].sum(), pos, create_graph=True)[0]
        loss = loss + forces.pow(2).sum()
    inputs = [f, pos, *model.parameters()]
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    return [out] + [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)]


def _with_attention(model, **settings):
    copied = copy.deepcopy(model)
    for block in copied.blocks:
        for name, value in settings.items():
            setattr(block.attention, name, value)
    return copied


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize("attend_self", [False, True])
@pytest.mark.parametrize("nodes_per_group", [None, 5, 1])  # None: one group
@pytest.mark.parametrize(
    "irreps_head",
    [None, "2x0e + 2x1o + 2x0e"],  # a repeated irrep: two paths into one key
)
def test_the_folded_attention_equals_the_direct_one(
    dtype, tolerance, attend_self, nodes_per_group, irreps_head
):
    # Moving W_K and W_V from the edges to the nodes is exact algebra: outputs and all
    # gradients agree to rounding (relative to the largest entry), with the receiving nodes
    # in one group, in groups of 5 or each alone (recomputed in the backward pass). Uneven
    # degrees, and an isolated node, exercise the gaps of the [nodes, max_degree] tables.
    if irreps_head is not None and (nodes_per_group, attend_self) != (None, False):
        pytest.skip("the repeated irrep is a property of the maps, not of the groups")
    model = build_model(dtype, attend_self=attend_self, irreps_head=irreps_head)
    attention = model.blocks[0].attention
    assert attention.takes_folded_path()
    f, pos = random_inputs(model, num_nodes=24)
    pos[0] += 50.0  # isolated
    edge_index = radius_graph(pos, MAX_RADIUS)
    degrees = torch.bincount(edge_index[1], minlength=24)
    max_degree = int(degrees.max())
    assert degrees[0] == 0 and len(set(degrees[1:].tolist())) > 2
    folded = model
    if nodes_per_group is not None:
        (first, last), *_ = attention.node_groups(10**9, max_degree, f.element_size())
        per_node_mb = attention.chunk_mb / (last - first)  # what node_groups counts per node
        folded = _with_attention(model, chunk_mb=(nodes_per_group + 0.5) * per_node_mb)
        groups = folded.blocks[0].attention.node_groups(24, max_degree, f.element_size())
        assert groups[0] == (0, nodes_per_group) and len(groups) == -(-24 // nodes_per_group)
    direct = _with_attention(model, fold=False)
    assert not direct.blocks[0].attention.takes_folded_path()
    for create_graph in (False, True):
        expected = _outputs_and_gradients(direct, f, pos, edge_index, create_graph)
        for got, want in zip(_outputs_and_gradients(folded, f, pos, edge_index, create_graph),
                             expected):  # fmt: skip
            scale = want.abs().max().clamp(min=1e-30)
            assert (got - want).abs().max() <= tolerance * scale


def test_node_groups_cover_the_nodes_in_groups_that_grow_with_the_budget():
    attention = copy.deepcopy(build_model(torch.float64).blocks[0].attention)
    attention.chunk_mb = 1e-6  # below one node's temporaries: one node per group
    assert attention.node_groups(3, 10, 8) == [(0, 1), (1, 2), (2, 3)]
    sizes = []
    for chunk_mb in (2.0, 4.0, 8.0):
        attention.chunk_mb = chunk_mb
        groups = attention.node_groups(1000, 10, 8)
        assert groups[0][0] == 0 and groups[-1][1] == 1000
        assert all(a[1] == b[0] for a, b in zip(groups, groups[1:]))
        sizes.append(groups[0][1] - groups[0][0])
    assert 1 < sizes[0] and all(1.8 < b / a < 2.2 for a, b in zip(sizes, sizes[1:]))
    with pytest.raises(ValueError, match="chunk_mb must be > 0"):
        SE3Transformer("1x0e", "4x0e", "1x0e", max_radius=1.0, attention=functools.partial(
            type(attention), chunk_mb=0.0))  # fmt: skip
