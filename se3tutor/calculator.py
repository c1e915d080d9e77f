"""An ase calculator backed by :class:`se3tutor.potential.EnergyModel`, so that ase's
optimisers and molecular dynamics run on a learned potential (book: Learning an interatomic
potential). Needs ase (``pip install ase``)."""

from __future__ import annotations

from typing import Optional

import torch
from ase.calculators.calculator import Calculator, all_changes

from se3tutor.potential import EnergyModel

__all__ = ["SE3Calculator"]


class SE3Calculator(Calculator):
    """Energy (eV) and forces (eV/Å) of an ase ``Atoms`` from an :class:`EnergyModel`.

    >>> from ase.cluster import Icosahedron
    >>> atoms = Icosahedron("Cu", noshells=2)
    >>> atoms.calc = SE3Calculator(
    ...     EnergyModel([29], "8x0e + 4x1o", max_radius=4.0, num_layers=1, num_heads=2))
    >>> atoms.get_forces().shape
    (13, 3)
    """

    implemented_properties = ["energy", "forces"]

    def __init__(self, model: EnergyModel, device: Optional[str] = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.model = model.eval()
        parameter = next(model.parameters())
        self.device = torch.device(device) if device else parameter.device
        self.dtype = parameter.dtype
        self.species_index = {z: i for i, z in enumerate(model.species)}

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        unknown = set(self.atoms.numbers.tolist()) - set(self.species_index)
        if unknown:
            raise ValueError(f"atomic numbers {sorted(unknown)} are unknown to the model")
        pos = torch.tensor(self.atoms.positions, dtype=self.dtype, device=self.device)
        species_index = torch.tensor(
            [self.species_index[int(z)] for z in self.atoms.numbers], device=self.device
        )
        batch = torch.zeros(len(self.atoms), dtype=torch.long, device=self.device)
        energy, forces = self.model(pos, species_index, batch, num_graphs=1)
        self.results = {
            "energy": float(energy.detach()),
            "forces": forces.detach().double().cpu().numpy(),
        }
