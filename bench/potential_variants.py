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

The last column, "force jump", is the largest change of the force on one atom between
neighbouring points of a path (the atom moved 0.4 Å in steps of 1e-3 Å) over the median change:
up to about 7 for forces that change smoothly (the SiLU rows), large where they jump (relu).
It does not measure a hard cutoff's jump: the path moves the centre atom of a 13-atom cluster,
whose 12 neighbours stay within MAX_RADIUS all along it, so no pair crosses the cutoff and the
hard-cutoff row reads as smooth. (A path that moves a surface atom across MAX_RADIUS is still to
be written; the chapter measures the hard cutoff's jumps in molecular dynamics.)

    python bench/potential_variants.py            # 3 seeds, about 11 minutes (225 s a seed)
    python bench/potential_variants.py --seeds 5
    python bench/potential_variants.py --smoke    # 1 seed, 1 epoch, few clusters (CI)
"""

from __future__ import annotations

import argparse
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


def force_jump(model: EnergyModel, structure, steps: int = 401) -> float:
    """Largest change of the force on atom 0 between neighbouring points of a path (atom 0
    moved 0.4 Å along x in steps of 1e-3 Å), over the median change: small for forces that
    change smoothly, large where they jump."""
    pos = torch.tensor(structure.get_positions(), dtype=torch.float32)
    species_index = torch.zeros(len(pos), dtype=torch.long)
    batch = torch.zeros(len(pos), dtype=torch.long)
    forces = []
    for t in torch.linspace(0.0, 0.4, steps):
        moved = pos.clone()
        moved[0, 0] += t
        forces.append(model(moved, species_index, batch, 1)[1][0].detach())
    change = torch.stack(forces).diff(dim=0).norm(dim=1)
    return float(change.max() / change.median())


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="1 seed, 1 epoch, 20 clusters")
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds = 1 if args.smoke else args.seeds
    num_train, num_test, epochs = (20, 10, 1) if args.smoke else (200, 50, 20)
    train_set = emt_clusters(num_train, element="Cu", shells=(2, 3), seed=0)
    test_set = emt_clusters(num_test, element="Cu", shells=(2, 3), seed=1)
    training = dict(epochs=epochs, batch_size=16, lr=2e-2)

    print(f"{num_train} training, {num_test} test clusters, {epochs} epochs, seeds 0..{seeds - 1}")
    print(f"{'':29s}{'energy MAE':>12s}{'force MAE':>18s}{'force':>12s}{'time':>6s}")
    print(f"{'variant':29s}{'(meV/atom)':>12s}{'(eV/Å)':>18s}{'jump':>12s}{'(s)':>6s}")
    for name, (irreps, num_layers, force_weight, options) in VARIANTS.items():
        rows, start = [], time.perf_counter()
        for seed in range(seeds):
            torch.manual_seed(seed)
            model = EnergyModel(
                SPECIES, irreps, MAX_RADIUS, num_layers=num_layers, num_heads=2, **options
            )
            train_energy_model(model, train_set, force_weight=force_weight, seed=seed, **training)
            row = errors(model, test_set)
            small = next(a for a in test_set if len(a) == 13)
            row["force jump"] = force_jump(model, small)
            rows.append(row)
        columns = {key: [row[key] for row in rows] for key in rows[0]}
        print(f"{name:29s}{spread(columns['energy MAE'], 0, 0):>12s}", end="")
        print(f"{spread(columns['force MAE'], 3, 2):>18s}", end="")
        print(f"{spread(columns['force jump'], 0, 0):>12s}", end="")
        print(f"{(time.perf_counter() - start) / seeds:6.0f}")
    print("mean over the seeds (smallest-largest); time: per seed, training and evaluation")


if __name__ == "__main__":
    main()
