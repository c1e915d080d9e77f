"""The Normalization chapter's depth experiments, repeated over seeds.

The chapter stacks ten layers on one random graph with one set of seeds. This script repeats
the experiments with other seeds, so that the chapter can say how typical its numbers are:

1. ten separately initialised convolutions (irreps ``8x0e + 4x1o + 2x2e``, harmonics up to
   l = 2, each divided by sqrt(z)) on fresh graphs, layers and inputs: the second moment of the
   features after ten layers;
2. the same graphs and inputs with *one* convolution applied ten times (shared weights);
3. ten separately initialised attention layers on the chapter's graph and input, for several
   seeds of the layers' initialisation: the first layer at which the softmax of e3nn's guide
   (the logits exponentiated as they are) overflows float32 to NaN, and the second moment after
   ten layers with the stable softmax of ``se3tutor.segment_softmax``;
4. ten convolutions on the chapter's graph in the pre-norm and the post-norm arrangement, for
   several seeds of the layers, the input and the loss target: the gradient norm of the last
   three layers' parameters over that of the first three, at initialisation.

    python bench/normalization_depth.py           # 4 trials for 1 and 2, 16 seeds for 3 and 4
    python bench/normalization_depth.py --smoke   # 1 trial, 2 seeds, 4 layers (CI)

The chapter (book/normalization.ipynb) quotes the output of the full run. Small tensors: the
script runs torch on one thread, which is faster than several on a shared machine.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from e3nn import o3

import se3tutor
from se3tutor import edge_vectors, radius_graph, scatter, segment_softmax
from se3tutor.norm import EquivariantLayerNorm

IRREPS = o3.Irreps("8x0e + 4x1o + 2x2e")
NUM_NODES, BOX, MAX_RADIUS, NUM_BASIS = 200, 4.2, 1.3, 10
FLOAT32_EXP_LIMIT = math.log(torch.finfo(torch.float32).max)  # 88.72


def chapter_graph(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The chapter's graph: 200 points uniform in a cube of side 4.2, edges below 1.3, in a
    fixed order (the chapter uses seed 1)."""
    torch.manual_seed(seed)
    pos = BOX * torch.rand(NUM_NODES, 3)
    edge_index = radius_graph(pos, MAX_RADIUS)
    edge_index = edge_index[:, torch.argsort(edge_index[1] * NUM_NODES + edge_index[0])]
    return pos, edge_index


def second_moment(f: torch.Tensor) -> float:
    return f.pow(2).mean().item()


def convolutions(num_layers: int, num_neighbors: float) -> list[se3tutor.Convolution]:
    irreps_sh = o3.Irreps.spherical_harmonics(2)
    return [
        se3tutor.Convolution(IRREPS, IRREPS, irreps_sh, NUM_BASIS, MAX_RADIUS, num_neighbors)
        for _ in range(num_layers)
    ]


def convolution_stacks(trial: int, num_layers: int) -> tuple[float, float]:
    """Second moment after num_layers layers: separate weights, then shared weights."""
    pos, edge_index = chapter_graph(1000 + trial)
    num_neighbors = edge_index.shape[1] / NUM_NODES
    torch.manual_seed(2000 + trial)
    layers = convolutions(num_layers, num_neighbors)
    f_input = IRREPS.randn(NUM_NODES, -1)
    results = []
    with torch.no_grad():
        for stack in (layers, [layers[0]] * num_layers):
            f = f_input
            for layer in stack:
                f = layer(f, pos, edge_index)
            results.append(second_moment(f))
    return results[0], results[1]


def attention_logits(att, f, pos, edge_index):
    """The logits q_i . k_ij, the log cutoff weights and the values of EquivariantAttention,
    per edge (the chapter's ``attention_terms``)."""
    edge_src, edge_dst = edge_index
    edge_vec = edge_vectors(pos, edge_index)
    edge_length_embedded, edge_log_weight = att.edge_embedding(edge_vec.norm(dim=1))
    edge_sh = o3.spherical_harmonics(att.irreps_sh, edge_vec, True, normalization="component")
    q = att.h_q(f)
    k = att.tp_k(f[edge_src], edge_sh, att.fc_k(edge_length_embedded))
    v = att.tp_v(f[edge_src], edge_sh, att.fc_v(edge_length_embedded))
    return att.dot(q[edge_dst], k), edge_log_weight, v


def attention_stack(
    seed: int, num_layers: int, pos, edge_index, f_input
) -> tuple[int | None, float]:
    """First layer at which the guide's softmax is NaN (None: never), and the second moment
    after num_layers layers with the stable softmax."""
    edge_dst = edge_index[1]
    torch.manual_seed(seed)
    layers = [
        se3tutor.EquivariantAttention(
            IRREPS,
            "8x0e + 4x1o",
            "8x0e + 4x1o",
            IRREPS,
            o3.Irreps.spherical_harmonics(3),
            NUM_BASIS,
            MAX_RADIUS,
        )
        for _ in range(num_layers)
    ]
    first_nan, f = None, f_input
    with torch.no_grad():
        for depth, att in enumerate(layers, 1):
            logits, edge_log_weight, v = attention_logits(att, f, pos, edge_index)
            exp = edge_log_weight.exp()[:, None] * logits.exp()  # the guide's numerator
            z = scatter(exp, edge_dst, dim=0, dim_size=NUM_NODES)
            z[z == 0] = 1
            if first_nan is None and not (exp / z[edge_dst]).isfinite().all():
                first_nan = depth
                assert logits.max() > FLOAT32_EXP_LIMIT  # NaN where exp overflows
            alpha = segment_softmax(logits, edge_dst, NUM_NODES, log_weight=edge_log_weight)
            f = scatter(alpha.relu().sqrt() * v, edge_dst, dim=0, dim_size=NUM_NODES)
    return first_nan, second_moment(f)


def residual_stack(layers, f, pos, edge_index, arrangement: str) -> torch.Tensor:
    """Pre-norm f + L(norm(f)) or post-norm norm(f + L(f)), one layer norm per layer."""
    for layer in layers:
        norm = EquivariantLayerNorm(IRREPS, scope="node")
        if arrangement == "pre-norm":
            f = f + layer(norm(f), pos, edge_index)
        else:
            f = norm(f + layer(f, pos, edge_index))
    return f


def gradient_ratios(seed: int, num_layers: int, pos, edge_index) -> dict[str, float]:
    """Per arrangement: the gradient norm of the parameters of the last three layers over that
    of the first three, for the loss mean((out - target)^2) at initialisation (the chapter's
    experiment, with fresh layers, input and target)."""
    torch.manual_seed(100 + seed)
    layers = convolutions(num_layers, edge_index.shape[1] / NUM_NODES)
    f_input, target = IRREPS.randn(NUM_NODES, -1), IRREPS.randn(NUM_NODES, -1)
    parameters = [list(layer.parameters()) for layer in layers]
    ratios = {}
    for arrangement in ("pre-norm", "post-norm"):
        out = residual_stack(layers, f_input, pos, edge_index, arrangement)
        loss = (out - target).pow(2).mean()
        grads = torch.autograd.grad(loss, [p for ps in parameters for p in ps])
        norms, start = [], 0
        for ps in parameters:
            layer_grads = grads[start : start + len(ps)]
            norms.append(sum(g.pow(2).sum() for g in layer_grads).sqrt().item())
            start += len(ps)
        ratios[arrangement] = sum(norms[-3:]) / sum(norms[:3])
    return ratios


def chapter_input(pos, edge_index) -> torch.Tensor:
    """The chapter's input features: drawn after its ten convolutions, from seed 6."""
    torch.manual_seed(6)
    convolutions(10, edge_index.shape[1] / NUM_NODES)
    return IRREPS.randn(NUM_NODES, -1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="1 trial, 2 seeds, 4 layers (CI)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    num_layers = 4 if args.smoke else 10
    trials = range(1) if args.smoke else range(4)
    seeds = range(2) if args.smoke else range(16)
    start = time.perf_counter()

    print(f"1, 2. convolutions, {num_layers} layers, fresh graph, layers and input per trial")
    separate, shared = [], []
    for trial in trials:
        moment_separate, moment_shared = convolution_stacks(trial, num_layers)
        separate.append(moment_separate)
        shared.append(moment_shared)
        print(
            f"  trial {trial}: second moment {moment_separate:9.3g} (separate weights),"
            f" {moment_shared:9.3g} (one layer {num_layers} times)"
        )
    print(f"  separate weights: {min(separate):.2g} to {max(separate):.2g}")
    print(f"  shared weights:   {min(shared):.2g} to {max(shared):.2g}")

    print(f"3. attention, {num_layers} layers, the chapter's graph and input, per seed")
    pos, edge_index = chapter_graph(1)
    f_input = chapter_input(pos, edge_index)
    first_nans, moments = [], []
    for seed in seeds:
        first_nan, moment = attention_stack(seed, num_layers, pos, edge_index, f_input)
        first_nans.append(first_nan)
        moments.append(moment)
        print(
            f"  seed {seed:2d}: guide's softmax NaN from layer {first_nan},"
            f" second moment {moment:9.3g}"
        )
    broke = [d for d in first_nans if d is not None]
    print(
        f"  the guide's softmax broke in {len(broke)} of {len(seeds)} stacks"
        + (f", at layers {min(broke)} to {max(broke)}" if broke else "")
    )
    counts = {depth: broke.count(depth) for depth in sorted(set(broke))}
    print(f"  stacks broken at each layer: {counts}")
    print(f"  second moment after {num_layers} layers: {min(moments):.2g} to {max(moments):.2g}")

    print(
        f"4. pre-norm and post-norm, {num_layers} convolutions, the chapter's graph, per seed:\n"
        "   gradient norm of the last three layers' parameters / the first three's"
    )
    ratios = {"pre-norm": [], "post-norm": []}
    for seed in seeds:
        seed_ratios = gradient_ratios(seed, num_layers, pos, edge_index)
        for arrangement, ratio in seed_ratios.items():
            ratios[arrangement].append(ratio)
        print(
            f"  seed {seed:2d}: pre-norm {seed_ratios['pre-norm']:.2f},"
            f" post-norm {seed_ratios['post-norm']:.2f}"
        )
    for arrangement, values in ratios.items():
        below_one = sum(value < 1 for value in values)
        print(
            f"  {arrangement:>9}: {min(values):.2f} to {max(values):.2f},"
            f" below 1 in {below_one} of {len(values)} seeds"
        )
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
