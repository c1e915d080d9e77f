"""The potential chapter's bulk copper, repeated over seeds: how typical are its numbers?

The chapter trains one model (one seed) on EMT copper clusters and periodic crystals, then
reads off fcc copper's lattice constant and bulk modulus from an energy-volume curve and runs a
short NVE simulation of a periodic supercell. This script repeats that for several seeds of
the model's initialisation and of the shuffling (the data stay the chapter's), for the model of
scalars of the chapter's cluster sections (16x0e) with and without the stress term, two larger
scalar models with it (32x0e, more parameters than the vector model; 16x0e in 2 layers), and
the model with vectors of the chapter's crystal section (16x0e + 16x1o) with and without it, and
prints per run and as mean and spread:

- the mean signed energy error per atom on 20 held-out crystals and 50 held-out clusters (an
  offset between the two kinds of structure shows here), and on the crystals the mean
  absolute errors of energy per atom (meV), forces (eV/Å) and stress (GPa);
- a0 (Å) and B (GPa) from a Birch-Murnaghan fit of E(V) of the one-atom fcc cell at 11
  lattice constants from 3.45 to 3.80 Å, next to EMT's;
- the largest |E_total(t) - E_total(0)| per atom (meV) of 200 velocity-Verlet steps of 2 fs
  of the 32-atom supercell from 300 K, at the model's own a0 (as in the chapter).

    python bench/bulk_copper.py            # 3 seeds, 6 variants (about 12 minutes)
    python bench/bulk_copper.py --smoke    # 1 seed, 2 epochs, a few structures (CI)

Torch runs on one thread (small graphs: a second thread only waits on a shared machine).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from ase import units
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.eos import EquationOfState
from ase.md.velocitydistribution import Stationary
from ase.md.verlet import VelocityVerlet

from se3tutor.calculator import SE3Calculator
from se3tutor.data import emt_bulk, emt_clusters
from se3tutor.potential import EnergyModel, predict, train_energy_model
from se3tutor.transformer import hidden_irreps

try:  # ase >= 3.29
    from ase.md.velocitydistribution import thermalize_momenta
except ImportError:
    from ase.md.velocitydistribution import (
        MaxwellBoltzmannDistribution as thermalize_momenta,
    )

# The chapter's model, training and data (book/potential.ipynb): its bulk section trains the
# model with vectors and the stress term; the other rows show what each of the two changes.
MODEL = dict(max_radius=4.5, num_heads=2)
TRAINING = dict(epochs=20, batch_size=16, lr=2e-2, force_weight=0.1)
VARIANTS = {  # name: (hidden irreps, stress weight, layers)
    "16x0e": (hidden_irreps(16, 0), 0.0, 1),
    "16x0e, stress": (hidden_irreps(16, 0), 1.0, 1),
    "32x0e, stress": (hidden_irreps(32, 0), 1.0, 1),  # more parameters than the vector model
    "16x0e, 2 layers, stress": (hidden_irreps(16, 0), 1.0, 2),
    "16x0e+16x1o": (hidden_irreps(16, 1), 0.0, 1),
    "16x0e+16x1o, stress": (hidden_irreps(16, 1), 1.0, 1),  # the chapter's
}
LATTICE_CONSTANTS = np.linspace(3.45, 3.80, 11)


def equation_of_state(calculator) -> tuple[float, float]:
    """``(a0 in Å, B in GPa)`` of fcc copper from E(V) of its one-atom cell."""
    volumes, energies = [], []
    for a in LATTICE_CONSTANTS:
        atoms = bulk("Cu", "fcc", a=a)
        atoms.calc = calculator
        volumes.append(atoms.get_volume())
        energies.append(atoms.get_potential_energy())
    try:
        v0, _, b0 = EquationOfState(volumes, energies, eos="birchmurnaghan").fit()
    except RuntimeError:  # no minimum to fit in the range (an untrained model, in --smoke)
        return float("nan"), float("nan")
    return (4 * v0) ** (1 / 3), b0 / units.GPa


def nve_drift(calculator, lattice_constant: float, steps: int) -> float:
    """Largest |E_total(t) - E_total(0)| per atom (eV) of NVE from 300 K, 32 atoms, 2 fs,
    from the perfect crystal at ``lattice_constant`` (the chapter: the model's a0)."""
    atoms = bulk("Cu", "fcc", a=lattice_constant, cubic=True).repeat(2)
    atoms.calc = calculator
    thermalize_momenta(atoms, temperature_K=300, rng=np.random.default_rng(0))
    Stationary(atoms)
    energies = []
    dynamics = VelocityVerlet(atoms, timestep=2 * units.fs)
    dynamics.attach(lambda: energies.append(atoms.get_total_energy()), interval=1)
    dynamics.run(steps)
    return float(np.abs(np.array(energies) - energies[0]).max()) / len(atoms)


def signed_energy_error(model, structures) -> float:
    """Mean of (predicted - EMT energy) per atom, meV: an offset shows here, not in an MAE."""
    energy, _ = predict(model, structures)
    reference = torch.tensor([a.get_potential_energy() for a in structures])
    atoms = torch.tensor([len(a) for a in structures])
    return 1000 * float(((energy - reference) / atoms).mean())


def one_run(data, variant, seed, epochs, md_steps) -> dict:
    train_set, test_set, test_clusters = data
    irreps_hidden, stress_weight, num_layers = VARIANTS[variant]
    torch.manual_seed(seed)
    model = EnergyModel([29], irreps_hidden, num_layers=num_layers, **MODEL)
    training = dict(TRAINING, epochs=epochs)
    train_energy_model(model, train_set, **training, stress_weight=stress_weight, seed=seed)
    energy, forces, stress = predict(model, test_set, stress=True)
    reference_energy = torch.tensor([a.get_potential_energy() for a in test_set])
    reference_forces = torch.tensor(np.concatenate([a.get_forces() for a in test_set]))
    reference_stress = torch.tensor(np.stack([a.get_stress(voigt=False) for a in test_set]))
    atoms = torch.tensor([len(a) for a in test_set])
    a0, b0 = equation_of_state(SE3Calculator(model))
    return {
        "crystals, signed": signed_energy_error(model, test_set),
        "clusters, signed": signed_energy_error(model, test_clusters),
        "energy meV/atom": 1000 * float(((energy - reference_energy) / atoms).abs().mean()),
        "force eV/Å": float((forces - reference_forces).abs().mean()),
        "stress GPa": float((stress - reference_stress).abs().mean()) / units.GPa,
        "a0 Å": a0,
        "B GPa": b0,
        "drift meV/atom": 1000 * nve_drift(SE3Calculator(model), a0 if a0 == a0 else 3.6, md_steps),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="1 seed, 2 epochs (CI)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds, epochs, md_steps = (1, 2, 10) if args.smoke else (args.seeds, TRAINING["epochs"], 200)
    clusters, crystals = (20, 8) if args.smoke else (200, 50)
    train_set = emt_clusters(clusters, shells=(2, 3), seed=0) + emt_bulk(crystals, seed=0)
    test_set = emt_bulk(4 if args.smoke else 20, seed=1)
    test_clusters = emt_clusters(4 if args.smoke else 50, shells=(2, 3), seed=1)
    data = (train_set, test_set, test_clusters)

    emt_a0, emt_b0 = equation_of_state(EMT())
    print(f"EMT: a0 = {emt_a0:.4f} Å, B = {emt_b0:.1f} GPa")
    print(f"{clusters} clusters + {crystals} crystals, {epochs} epochs, seeds 0..{seeds - 1}")
    header = ("Ecr", "Ecl", "|E|", "F eV/Å", "σ GPa", "a0 Å", "B GPa", "drift", "s")
    print(f"{'variant':20} {'seed':>4}" + "".join(f"{name:>8}" for name in header))
    for variant in VARIANTS:
        rows = []
        for seed in range(seeds):
            start = time.perf_counter()
            rows.append(one_run(data, variant, seed, epochs, md_steps))
            values = [*rows[-1].values(), time.perf_counter() - start]
            print(f"{variant:20} {seed:4d}" + "".join(f"{v:8.3g}" for v in values))
        for name, summary in (("mean", statistics.mean), ("std", _spread)):
            values = [summary([row[key] for row in rows]) for key in rows[0]]
            print(f"{variant:20} {name:>4}" + "".join(f"{v:8.3g}" for v in values))
    print("Ecr, Ecl: mean signed energy error per atom (meV) on held-out crystals, clusters;")
    print("|E|: crystals' energy MAE per atom (meV); F, σ: crystals' force and stress MAE;")
    print("drift: largest |E_total(t) - E_total(0)| in meV/atom; s: seconds per run")


def _spread(values):
    return statistics.stdev(values) if len(values) > 1 else 0.0


if __name__ == "__main__":
    main()
