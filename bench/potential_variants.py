"""Benchmark: what the potential chapter's choices cost or buy, measured over seeds.

The chapter (book/potential.ipynb) trains one model, a one-layer SE3Transformer with scalar
hidden features, on EMT copper clusters, and argues two choices in prose. This script trains
the variants behind those arguments with the chapter's data and training (200 clusters, 20
epochs, batches of 16, learning rate 2e-2, force weight 0.1), each from several seeds, and
prints the errors on the chapter's 50 held-out clusters:

- vectors with one layer: ``hidden_irreps(16, 0)`` (the chapter's) against
  ``hidden_irreps(16, 1)``, both one layer; and the same two with two layers, where a
  second attention can combine the vectors of the first;
- a relu radial MLP for energies alone: models trained on energies only (force weight 0),
  with the radial MLPs' SiLU (the package's) or relu; their energy errors, and how far their
  forces jump along a path (relu's derivative jumps where a hidden unit switches: see the
  Smoothness chapter);
- the hard cutoff of the chapter's last section (``HardCutoffTransformer``, the same class),
  whose test errors the chapter compares with the smooth model's for one seed.

A second table measures how the forces change along a path on which pairs of atoms cross
the cutoff: the atom farthest from the centroid of the first 13-atom test cluster (a surface
atom) moves along the line from the centroid through it, from 0.2 Å inside its position to
0.2 Å outside. Its distances to other surface atoms lie near MAX_RADIUS, so pairs cross it
on the way (the script counts the crossings and prints the count). The "largest force change"
is the largest change of the force on any atom between consecutive points of the path, at two
spacings of the points, 1e-3 and 1e-4 Å (1e-2 and 1e-3 with --smoke). Forces that change
smoothly change ten times less at the finer spacing; forces that jump (a hard cutoff where a
pair crosses MAX_RADIUS, relu where a hidden unit switches) jump by as much at both.

    python bench/potential_variants.py            # 3 seeds, about 14 minutes
    python bench/potential_variants.py --seeds 5
    python bench/potential_variants.py --smoke    # 1 seed, 1 epoch, few clusters (CI)
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

from se3tutor.data import emt_clusters
from se3tutor.graph import edge_vectors
from se3tutor.multihead import MultiHeadAttention
from se3tutor.potential import EnergyModel, predict, train_energy_model
from se3tutor.radial import embed_edge_length, radial_mlp
from se3tutor.transformer import SE3Transformer, hidden_irreps

SPECIES = [29]
MAX_RADIUS = 4.5
PATH_HALF_LENGTH = 0.2  # Å on either side of the moved atom's position
SPACINGS = (1e-3, 1e-4)  # Å between consecutive points of the path
SMOKE_SPACINGS = (1e-2, 1e-3)


class ReluRadialAttention(MultiHeadAttention):
    """The package's attention with relu instead of SiLU in its radial MLP."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.fc = radial_mlp(self.fc.hs[0], self.fc.hs[1], self.fc.hs[-1], torch.nn.functional.relu)


class HardCutoffTransformer(SE3Transformer):
    """The potential chapter's hard cutoff: an embedding that is not zero at max_radius, and
    every edge with weight 1 in the softmax."""

    def edges(self, pos, batch=None, edge_index=None, edge_attr=None):
        edges = super().edges(pos, batch, edge_index, edge_attr)
        edge_length = edge_vectors(pos, edges[:2]).norm(dim=1)
        return edges._replace(
            edge_scalars=embed_edge_length(
                edge_length, self.max_radius, self.number_of_basis, cutoff=False
            ),
            edge_log_weight=torch.zeros_like(edge_length),  # log 1: weight 1
        )


SCALARS, VECTORS = hidden_irreps(16, 0), hidden_irreps(16, 1)
# name: (hidden irreps, layers, force weight, model options)
VARIANTS = {
    "16x0e, 1 layer (chapter)": (SCALARS, 1, 0.1, {}),
    "16x0e + 16x1o, 1 layer": (VECTORS, 1, 0.1, {}),
    "16x0e, 2 layers": (SCALARS, 2, 0.1, {}),
    "16x0e + 16x1o, 2 layers": (VECTORS, 2, 0.1, {}),
    "16x0e, 1 layer, hard cutoff": (SCALARS, 1, 0.1, {"transformer": HardCutoffTransformer}),
    "energies only, SiLU MLP": (SCALARS, 1, 0.0, {}),
    "energies only, relu MLP": (SCALARS, 1, 0.0, {"attention": ReluRadialAttention}),
}


def surface_atom(structure) -> tuple[torch.Tensor, int, torch.Tensor]:
    """``(pos [N, 3], atom, direction [3])``: the atom farthest from the centroid of
    ``structure`` (a surface atom) and the unit vector from the centroid to it."""
    pos = torch.tensor(structure.get_positions(), dtype=torch.float32)
    offset = pos - pos.mean(dim=0)
    atom = int(offset.norm(dim=1).argmax())
    return pos, atom, offset[atom] / offset[atom].norm()


def path(pos: torch.Tensor, atom: int, direction: torch.Tensor, spacing: float) -> torch.Tensor:
    """``[P, N, 3]``: ``pos`` with ``atom`` moved by ``t * direction``, ``t`` from
    -PATH_HALF_LENGTH to PATH_HALF_LENGTH in steps of ``spacing`` (Å)."""
    steps = round(2 * PATH_HALF_LENGTH / spacing)
    t = torch.linspace(-PATH_HALF_LENGTH, PATH_HALF_LENGTH, steps + 1)
    points = pos.repeat(steps + 1, 1, 1)
    points[:, atom] += t[:, None] * direction
    return points


def crossings(points: torch.Tensor) -> int:
    """How many times a pair of atoms crosses MAX_RADIUS between consecutive points of
    ``points [P, N, 3]``."""
    inside = (points[:, :, None] - points[:, None]).norm(dim=-1) < MAX_RADIUS  # [P, N, N]
    return int((inside[1:] != inside[:-1]).sum()) // 2  # each pair counted as (i, j) and (j, i)


def path_forces(model: EnergyModel, points: torch.Tensor, chunk: int = 500) -> torch.Tensor:
    """``[P, N, 3]``: the forces at every point of the path, ``chunk`` points per forward pass
    (as a batch of copies of the structure)."""
    forces = []
    for part in points.split(chunk):
        batch = torch.arange(len(part)).repeat_interleave(part.shape[1])
        species_index = torch.zeros_like(batch)
        _, part_forces = model(part.reshape(-1, 3), species_index, batch, len(part))
        forces.append(part_forces.detach().view(part.shape))
    return torch.cat(forces)


def force_jump(model: EnergyModel, points: torch.Tensor) -> float:
    """``max |F_a(t + h) - F_a(t)|`` over the atoms ``a`` and the consecutive points of the
    path (eV/Å): about proportional to the spacing ``h`` where the forces change smoothly,
    independent of it where they jump."""
    return float(path_forces(model, points).diff(dim=0).norm(dim=2).max())


def errors(model: EnergyModel, test_set) -> dict:
    energy, forces = predict(model, test_set)
    true_energy = torch.tensor([a.get_potential_energy() for a in test_set])
    sizes = torch.tensor([len(a) for a in test_set], dtype=torch.float64)
    true_forces = torch.tensor(np.concatenate([a.get_forces() for a in test_set]))
    return {
        "energy MAE": float(1000 * ((energy - true_energy) / sizes).abs().mean()),
        "force MAE": float((forces - true_forces).abs().mean()),
    }


def spread(values, digits: int, range_digits: int) -> str:
    """``"mean (smallest-largest)"``."""
    low, high = np.min(values), np.max(values)
    return f"{np.mean(values):.{digits}f} ({low:.{range_digits}f}-{high:.{range_digits}f})"


def spread_2(values) -> str:
    """:func:`spread` with the decimals that give the mean two significant digits (at least)."""
    digits = max(0, 1 - math.floor(math.log10(abs(np.mean(values)))))
    return spread(values, digits, digits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="1 seed, 1 epoch, 20 clusters")
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds = 1 if args.smoke else args.seeds
    num_train, num_test, epochs = (20, 10, 1) if args.smoke else (200, 50, 20)
    spacings = SMOKE_SPACINGS if args.smoke else SPACINGS
    train_set = emt_clusters(num_train, element="Cu", shells=(2, 3), seed=0)
    test_set = emt_clusters(num_test, element="Cu", shells=(2, 3), seed=1)
    training = dict(epochs=epochs, batch_size=16, lr=2e-2)
    pos, atom, direction = surface_atom(next(a for a in test_set if len(a) == 13))
    paths = {spacing: path(pos, atom, direction, spacing) for spacing in spacings}
    num_crossings = crossings(paths[spacings[-1]])
    if num_crossings == 0:
        raise RuntimeError(
            "no pair crosses MAX_RADIUS on the path: the force jump would not see it"
        )

    print(f"{num_train} training, {num_test} test clusters, {epochs} epochs, seeds 0..{seeds - 1}")
    print(f"{'':28s}{'energy MAE':>14s}{'force MAE':>18s}{'training':>10s}")
    print(f"{'variant':28s}{'(meV/atom)':>14s}{'(eV/Å)':>18s}{'(s)':>10s}")
    jumps = {}
    for name, (irreps, num_layers, force_weight, options) in VARIANTS.items():
        rows, training_time = [], 0.0
        for seed in range(seeds):
            torch.manual_seed(seed)
            model = EnergyModel(
                SPECIES, irreps, MAX_RADIUS, num_layers=num_layers, num_heads=2, **options
            )
            start = time.perf_counter()
            train_energy_model(model, train_set, force_weight=force_weight, seed=seed, **training)
            training_time += time.perf_counter() - start
            row = errors(model, test_set)
            for spacing, points in paths.items():
                row[spacing] = 1000 * force_jump(model, points)  # meV/Å
            rows.append(row)
        columns = {key: [row[key] for row in rows] for key in rows[0]}
        print(f"{name:28s}{spread(columns['energy MAE'], 0, 0):>14s}", end="")
        print(f"{spread(columns['force MAE'], 3, 2):>18s}{training_time / seeds:10.0f}")
        jumps[name] = columns
    print("mean over the seeds (smallest-largest); training time per seed")

    coarse, fine = spacings
    print()
    print(
        f"path: atom {atom}, on the surface of a 13-atom test cluster, moved from"
        f" {PATH_HALF_LENGTH} Å inside\nits position to {PATH_HALF_LENGTH} Å outside, along the"
        f" line from the centroid: {num_crossings} crossings of\nr_max = {MAX_RADIUS} Å by a pair"
    )
    print(f"{'':28s}{'largest force change (meV/Å)':>34s}{'ratio of':>17s}")
    print(f"{'variant':28s}{f'h = {coarse:g} Å':>17s}{f'h = {fine:g} Å':>17s}{'the two':>17s}")
    for name, columns in jumps.items():
        ratio = np.array(columns[coarse]) / np.array(columns[fine])
        print(f"{name:28s}{spread_2(columns[coarse]):>17s}{spread_2(columns[fine]):>17s}", end="")
        print(f"{spread(ratio, 1, 1):>17s}")
    print("largest |F_a(t + h) - F_a(t)| over the atoms a and the points t of the path;")
    print("mean over the seeds (smallest-largest)")


if __name__ == "__main__":
    main()
