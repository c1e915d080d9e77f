"""se3tutor.dense.variants, rotary and egnn: each variant keyword of se3-transformer-pytorch
0.9.0 does what it says, keeps the model equivariant, and composes with the others."""

import functools

import pytest
import torch
from dense_helpers import B, N, chain, equivariance_errors, influence, inputs
from e3nn import o3

from se3tutor.checks import default_dtype
from se3tutor.dense import SE3Transformer
from se3tutor.dense.variants import GatedScaleLayerNorm, reversible_step

SMALL = dict(dim=8, heads=2, dim_head=4, depth=1, num_degrees=3, output_degrees=3)


def small_model(dtype=torch.float64, **kwargs):
    """Seeded, so that a variant shares the plain model's weights where it has the same ones
    (a variant creates its own parameters after the plain attention's)."""
    torch.manual_seed(0)
    with default_dtype(dtype):
        return SE3Transformer(**{**SMALL, **kwargs})


def num_params(module):
    return sum(p.numel() for p in module.parameters())


def assert_equivariant(model, dtype=torch.float64, **kwargs):
    feats, coors, mask = inputs(dim=8, dtype=dtype)
    errors = equivariance_errors(model, feats, coors, mask, **kwargs)
    assert set(errors) == {"0", "1", "2"} and max(errors.values()) < 1e-9, errors


def edge_keys_values(model):
    """Keys and values of the first layer's edges for random inputs, and that layer's input."""
    feats, coors, mask = inputs(dim=8, dtype=torch.float64)
    captured = {}
    attention = model.net.blocks[0].attention
    attention.register_forward_hook(
        lambda module, args, out: captured.update(kv=module.edge_keys_values(*args), args=args)
    )
    model(feats, coors, mask)
    return captured["kv"], captured["args"]


def test_linear_proj_keys_take_keys_from_the_neighbor_alone_with_fewer_parameters():
    plain, linear = small_model(), small_model(linear_proj_keys=True)
    attention, plain_attention = linear.net.blocks[0].attention, plain.net.blocks[0].attention
    # W_K maps the node's irreps instead of the (larger) messages' irreps.
    assert attention.h_k.irreps_in == attention.irreps_node
    saved = num_params(plain_attention.h_k) - num_params(attention.h_k)
    assert saved > 0 and num_params(plain) - num_params(linear) == saved
    # The keys do not depend on the edges' directions and lengths; the values do.
    (keys, values), (f, edges) = edge_keys_values(linear)
    other_edges = edges._replace(
        edge_sh=torch.randn_like(edges.edge_sh), edge_scalars=torch.randn_like(edges.edge_scalars)
    )
    other_keys, other_values = attention.edge_keys_values(f, other_edges)
    assert torch.equal(other_keys, keys) and (other_values - values).abs().max() > 1e-3
    assert_equivariant(linear)


def test_tie_key_values_makes_keys_equal_to_values_without_a_key_map():
    plain, tied = small_model(), small_model(tie_key_values=True)
    attention = tied.net.blocks[0].attention
    assert not hasattr(attention, "h_k")
    assert num_params(plain) - num_params(tied) == num_params(plain.net.blocks[0].attention.h_k)
    (keys, values), _ = edge_keys_values(tied)
    assert torch.equal(keys, values)
    assert_equivariant(tied)
    with pytest.raises(ValueError, match="exclude"):
        SE3Transformer(**SMALL, tie_key_values=True, linear_proj_keys=True)


def test_one_headed_key_values_share_one_key_and_value_head_between_all_query_heads():
    plain, shared = small_model(), small_model(one_headed_key_values=True)
    attention, plain_attention = shared.net.blocks[0].attention, plain.net.blocks[0].attention
    heads = attention.num_heads
    for name in ("h_k", "h_v", "h_k_self", "h_v_self"):  # attend_self is on by default
        assert num_params(getattr(plain_attention, name)) == heads * num_params(
            getattr(attention, name)
        )
    (keys, values), _ = edge_keys_values(shared)
    assert keys.shape[1] == attention.irreps_head.dim  # one head's keys per edge
    # Every query head reads the same keys: the slices of every block, head by head, agree.
    expanded = attention.expand_heads(keys)
    for (mul, ir), block in zip(attention.irreps_heads, attention.irreps_heads.slices()):
        per_head = expanded[:, block].reshape(len(keys), heads, mul // heads * ir.dim)
        torch.testing.assert_close(per_head, per_head[:, :1].expand_as(per_head))
    assert_equivariant(shared)
    assert_equivariant(small_model(one_headed_key_values=True, linear_proj_keys=True))


def test_use_null_kv_adds_a_learned_invariant_key_and_value_to_attend_to():
    plain, null = small_model(), small_model(use_null_kv=True)
    attention = null.net.blocks[0].attention
    # Learned constants of type 0e only: a weight per 0e channel of the keys, and of the values.
    assert num_params(null) - num_params(plain) == 2 * attention.irreps_kv.count("0e")
    one = torch.ones(1, 1, dtype=torch.float64)
    irreps = attention.irreps_kv
    scalar = torch.cat([torch.full((ir.dim * mul,), ir == o3.Irrep("0e")) for mul, ir in irreps])
    for constant in (attention.h_k_null(one), attention.h_v_null(one)):
        assert constant[0, ~scalar].abs().max() == 0 and constant[0, scalar].abs().min() > 0
    feats, coors, mask = inputs(dim=8, dtype=torch.float64)
    assert (null(feats, coors, mask)["1"] - plain(feats, coors, mask)["1"]).abs().max() > 1e-3
    assert_equivariant(null)
    # A node with nobody to attend to (no neighbour in the radius) gets the null value.
    lonely = small_model(use_null_kv=True, attend_self=False, valid_radius=1.0)
    attention = lonely.net.blocks[0].attention
    captured = []
    attention.register_forward_hook(lambda module, args, out: captured.append(out))
    lonely(feats, coors * 100, mask)
    null_value = attention.h_o(attention.expand_heads(attention.h_v_null(one)))
    torch.testing.assert_close(captured[0], null_value.expand_as(captured[0]))
    assert null_value.abs().max() > 1e-3


def test_global_feats_reach_every_node_and_keep_it_equivariant():
    plain, model = small_model(), small_model(global_feats_dim=5)
    attention = model.net.blocks[0].attention
    assert num_params(model) - num_params(plain) == 2 * 5 * attention.irreps_kv.count("0e")
    feats, coors, mask = inputs(dim=8, dtype=torch.float64)
    global_feats = torch.randn(B, 3, 5, dtype=torch.float64)
    out = model(feats, coors, mask, return_type=1, global_feats=global_feats)
    changed = global_feats.clone()
    changed[0] += 1.0  # graph 0's global features: all of graph 0 changes, graph 1 does not
    other = model(feats, coors, mask, return_type=1, global_feats=changed)
    assert (other[0] - out[0]).flatten(1).abs().max(dim=1).values.min() > 1e-6
    torch.testing.assert_close(other[1], out[1])
    assert_equivariant(model, global_feats=global_feats)
    with pytest.raises(ValueError, match="global_feats"):
        model(feats, coors, mask)
    with pytest.raises(ValueError, match=r"\[2, m, 5\]"):
        model(feats, coors, mask, global_feats=global_feats[..., :4])


def test_num_conv_layers_convolve_before_the_attention_and_widen_the_receptive_field():
    def seen_by_node_5(**kwargs):
        model = small_model(
            dtype=torch.float32, num_neighbors=0, attend_sparse_neighbors=True, **kwargs
        )
        return influence(model, *inputs(dim=8), 5, adj_mat=chain(N), return_type=1)

    assert seen_by_node_5().nonzero().flatten().tolist() == [4, 5, 6]
    assert seen_by_node_5(num_conv_layers=2).nonzero().flatten().tolist() == [2, 3, 4, 5, 6, 7, 8]
    model = small_model(num_conv_layers=2)
    assert len(model.net.stem) == 2 and num_params(model) > num_params(small_model())
    assert_equivariant(model)


def test_norm_gated_scale_scales_each_channel_by_a_function_of_the_nodes_norms():
    plain, gated = small_model(norm_out=True), small_model(norm_out=True, norm_gated_scale=True)
    norms = [m for m in gated.modules() if isinstance(m, GatedScaleLayerNorm)]
    assert len(norms) == 4  # before attention, before feed-forward, at the end, norm_out
    assert num_params(gated) - num_params(plain) == sum(m.gate.numel() for m in norms)
    feats, coors, mask = inputs(dim=8, dtype=torch.float64)
    gated.load_state_dict(plain.state_dict(), strict=False)  # all but the gates
    with torch.no_grad():
        for m in norms:
            m.gate.zero_()  # a zero gate is the plain norm ...
    torch.testing.assert_close(gated(feats, coors, mask), plain(feats, coors, mask))
    with torch.no_grad():
        for m in norms:
            m.gate.uniform_(-0.1, 0.1)  # ... a learned one rescales channels
    assert (gated(feats, coors, mask)["1"] - plain(feats, coors, mask)["1"]).abs().max() > 1e-3
    assert_equivariant(gated)


def trunk_with_autograd(model, f, edges):
    """The reversible blocks' equations with plain autograd: every activation stored."""
    x1 = x2 = f
    for block in model.net.blocks:
        x1, x2 = reversible_step(block, x1, x2, edges)
    return (x1 + x2) / 2


def outputs_and_gradients(model, feats, coors, mask):
    feats, coors = feats.clone().requires_grad_(), coors.clone().requires_grad_()
    model.zero_grad()
    out = model(feats, coors, mask)
    (out["0"].pow(2).sum() + out["1"].sin().sum()).backward()
    return [out["0"], out["1"], feats.grad, coors.grad] + [p.grad for p in model.parameters()]


def saved_for_backward_mb(model, num_nodes=40):
    """Memory that autograd keeps for the backward pass after a forward pass (distinct
    storages, in MB): what grows with the graph and the depth, and the peak of a plain model.
    (The resident set size of a fresh process shows the same effect, but depends on how the
    allocator reuses freed memory: too noisy for a test.)"""
    feats, coors = torch.randn(1, num_nodes, model.dim), torch.randn(1, num_nodes, 3)
    storages = {}

    def keep(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        out = model(feats, coors)
    out.sum().backward()  # and the backward pass works
    return sum(storages.values()) / 2**20


@pytest.mark.slow
def test_splits_and_reversible_keep_less_memory_for_the_backward_pass():
    # Measured with 40 nodes: splits 5.1 -> 0.6 MB; depth 12, 23.6 -> 0.1 MB (100 nodes:
    # 31.5 -> 3.2 MB and 147 -> 0.8 MB). Peak resident memory of a fresh process, 100 nodes:
    # splits about 90 -> 50 MB, reversible about 140 -> 30 MB.
    splits = dict(dim=16, heads=1, dim_head=4, depth=1, num_degrees=2)
    one_piece = saved_for_backward_mb(SE3Transformer(**splits))  # the default 4: one piece
    assert saved_for_backward_mb(SE3Transformer(**splits, splits=8)) < 0.25 * one_piece
    model = SE3Transformer(dim=4, heads=1, dim_head=4, depth=12, num_degrees=2, reversible=True)
    reversible = saved_for_backward_mb(model)
    model.net.trunk = functools.partial(trunk_with_autograd, model)
    assert reversible < 0.05 * saved_for_backward_mb(model)


@pytest.mark.slow
def test_splits_compute_the_same_outputs_and_gradients_in_chunks():
    one_piece, chunked = small_model(), small_model(splits=3)  # the default 4: one piece
    assert num_params(one_piece) == num_params(chunked)
    feats, coors, mask = inputs(dim=8, dtype=torch.float64)
    for a, b in zip(
        outputs_and_gradients(one_piece, feats, coors, mask),
        outputs_and_gradients(chunked, feats, coors, mask),
    ):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    with torch.no_grad():  # no checkpointing without gradients
        torch.testing.assert_close(chunked(feats, coors, mask), one_piece(feats, coors, mask))


@pytest.mark.slow
def test_reversible_gives_the_outputs_and_gradients_of_its_equations_without_storing_them():
    model = small_model(depth=3, output_degrees=2, reversible=True)
    feats, coors, mask = inputs(dim=8, dtype=torch.float64)
    recomputed = outputs_and_gradients(model, feats, coors, mask)
    model.net.trunk = functools.partial(trunk_with_autograd, model)
    stored = outputs_and_gradients(model, feats, coors, mask)
    assert all(g is not None for g in recomputed)
    for a, b in zip(recomputed, stored):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    assert_equivariant(small_model(depth=2, reversible=True))
    with pytest.raises(ValueError, match="exclude"):
        SE3Transformer(**SMALL, reversible=True, global_feats_dim=4)


def test_rotary_position_makes_the_output_depend_on_relative_order_and_stay_equivariant():
    plain, rotary = small_model(), small_model(rotary_position=True)
    assert num_params(rotary) == num_params(plain)  # rotations, no parameters
    feats, coors, mask = inputs(dim=8, dtype=torch.float64)
    out = rotary(feats, coors, mask)
    perm = torch.randperm(N)
    permuted = rotary(feats[:, perm], coors[:, perm], mask)
    assert (permuted["1"] - out["1"][:, perm]).abs().max() > 1e-3  # not just permuted
    # Only j - i matters: a masked node in front moves every position up by one.
    front = lambda x: torch.cat([torch.zeros_like(x[:, :1]), x], dim=1)  # noqa: E731
    shifted = rotary(front(feats), front(coors), front(mask))
    for degree in out:
        torch.testing.assert_close(shifted[degree][:, 1:], out[degree])
    assert_equivariant(rotary)


def test_rotary_rel_dist_changes_the_output_and_keeps_it_permutation_and_rotation_equivariant():
    plain, rotary = small_model(), small_model(rotary_rel_dist=True)
    feats, coors, mask = inputs(dim=8, dtype=torch.float64)
    out = rotary(feats, coors, mask)
    assert (out["1"] - plain(feats, coors, mask)["1"]).abs().max() > 1e-3
    perm = torch.randperm(N)
    torch.testing.assert_close(rotary(feats[:, perm], coors[:, perm], mask)["1"], out["1"][:, perm])
    assert_equivariant(rotary)
    assert_equivariant(small_model(rotary_position=True, rotary_rel_dist=True, dim_head=8))
    with pytest.raises(ValueError, match="0e block of at least 4"):  # 2 0e channels per head
        small_model(rotary_position=True, rotary_rel_dist=True)


def egnn_model(**kwargs):
    """An EGNN model whose layers have random weights of order 1 (they start at 1e-3)."""
    model = small_model(use_egnn=True, **kwargs)
    with torch.no_grad():
        for p in model.net.layers.parameters():
            p.normal_()
    return model


def test_use_egnn_runs_egnn_layers_on_every_degree_equivariantly():
    model = egnn_model()
    assert len(model.net.layers) == SMALL["depth"] and len(model.net.blocks) == 0
    feats, coors, mask = inputs(dim=8, dtype=torch.float64)
    out = model(feats, coors, mask)
    assert min(value.abs().max() for value in out.values()) > 1e-3
    assert_equivariant(model)


def test_egnn_weights_clamp_value_bounds_the_weights_of_the_feature_updates():
    feats, coors, mask = inputs(dim=8, dtype=torch.float64)

    def output(bias, **kwargs):
        model = egnn_model(**kwargs)
        with torch.no_grad():  # phi_x(m_ij) = bias: all weights at the clamp, or far beyond
            model.net.layers[0].weight_mlp[-1].weight.zero_()
            model.net.layers[0].weight_mlp[-1].bias.fill_(bias)
        return model(feats, coors, mask)["1"]

    torch.testing.assert_close(
        output(1.0, egnn_weights_clamp_value=1.0), output(50.0, egnn_weights_clamp_value=1.0)
    )
    assert (output(1.0) - output(50.0)).abs().max() > 1e-3


def test_egnn_feedforward_adds_a_feed_forward_block_after_every_layer():
    plain, model = egnn_model(depth=2), egnn_model(depth=2, egnn_feedforward=True)
    assert len(model.net.feed_forwards) == 2 and len(plain.net.feed_forwards) == 0
    assert num_params(model) - num_params(plain) == num_params(model.net.feed_forwards)
    feats, coors, mask = inputs(dim=8, dtype=torch.float64)
    assert (model(feats, coors, mask)["1"] - plain(feats, coors, mask)["1"]).abs().max() > 1e-6
    assert_equivariant(model)


def test_egnn_hidden_dim_is_the_width_of_the_messages():
    for hidden in (8, 16):
        layer = small_model(use_egnn=True, egnn_hidden_dim=hidden).net.layers[0]
        assert layer.edge_mlp[-2].out_features == hidden == layer.weight_mlp[0].in_features
        assert layer.node_mlp[0].in_features == layer.node_norm.normalized_shape[0] + hidden


def test_attention_variants_compose_and_keep_the_graph_model_equivariant():
    from se3tutor import SE3Transformer as GraphSE3Transformer
    from se3tutor.checks import equivariance_error
    from se3tutor.dense.variants import (
        LinearKeys,
        NullKeyValue,
        OneHeadedKeysValues,
        attention_class,
    )
    from se3tutor.transformer import hidden_irreps

    attention = attention_class(NullKeyValue, OneHeadedKeysValues, LinearKeys)
    irreps_in, irreps_out = "3x0e + 2x1o + 1x2e", "2x0e + 1x0o + 1x1o + 1x1e + 1x2e"
    with default_dtype(torch.float64):
        model = GraphSE3Transformer(
            irreps_in, hidden_irreps(6, 2, "SE3"), irreps_out, max_radius=1.4, num_heads=3,
            attention=attention, attend_self=True,
        )  # fmt: skip
    layer = model.blocks[0].attention
    assert all(isinstance(layer, v) for v in (NullKeyValue, OneHeadedKeysValues, LinearKeys))
    f = model.irreps_in.randn(20, -1, dtype=torch.float64)
    pos = torch.randn(20, 3, dtype=torch.float64)
    for inversion in (False, True):
        error = equivariance_error(model, irreps_in, irreps_out, f, pos, inversion=inversion)
        assert error < 1e-9
