"""An ase calculator backed by :class:`se3tutor.potential.EnergyModel`, so that ase's
optimisers and molecular dynamics run on a learned potential (book: Learning an interatomic
potential). Needs ase (``pip install ase``)."""

from __future__ import annotations

from typing import Optional

import torch
from ase.calculators.calculator import (
    Calculator,
    PropertyNotImplementedError,
    all_changes,
)
from ase.stress import full_3x3_to_voigt_6_stress

from se3tutor.potential import EnergyModel

__all__ = ["SE3Calculator"]


class SE3Calculator(Calculator):
    """Energy (eV), forces (eV/Å) and, for crystals, stress (eV/Å³) of an ase ``Atoms`` from
    an :class:`EnergyModel`.

    Periodic ``Atoms`` (any ``atoms.pbc``) get the periodic graph of their cell: every edge
    to an image of a neighbour across the cell's faces counts
    (:func:`se3tutor.periodic.periodic_radius_graph`). The stress, the derivative of the
    energy with respect to a strain of the cell divided by its volume, is there for
    structures periodic along all three directions.

    ``device``: where the model runs (it is moved there); default: where it is.

    >>> from ase.build import bulk
    >>> atoms = bulk("Cu", "fcc", a=3.61)
    >>> atoms.calc = SE3Calculator(
    ...     EnergyModel([29], "8x0e + 4x1o", max_radius=4.0, num_layers=1, num_heads=2))
    >>> atoms.get_forces().shape, atoms.get_stress().shape
    ((1, 3), (6,))
    """

    implemented_properties = ["energy", "free_energy", "forces", "stress"]

    def __init__(self, model: EnergyModel, device: Optional[str] = None, **kwargs) -> None:
        super().__init__(**kwargs)
        if device is not None:
            model = model.to(device)
        self.model = model.eval()
        parameter = next(model.parameters())
        self.device = parameter.device
        self.dtype = parameter.dtype
        self.species_index = {z: i for i, z in enumerate(model.species)}

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        atoms = self.atoms
        unknown = set(atoms.numbers.tolist()) - set(self.species_index)
        if unknown:
            raise ValueError(f"atomic numbers {sorted(unknown)} are unknown to the model")
        fully_periodic = bool(atoms.pbc.all())
        if "stress" in properties and not fully_periodic:
            raise PropertyNotImplementedError(
                f"stress needs a cell periodic along all three directions; pbc = {atoms.pbc}"
            )
        pos = torch.tensor(atoms.positions, dtype=self.dtype, device=self.device)
        species_index = torch.tensor(
            [self.species_index[int(z)] for z in atoms.numbers], device=self.device
        )
        batch = torch.zeros(len(atoms), dtype=torch.long, device=self.device)
        cell = pbc = None
        if atoms.pbc.any():
            cell = torch.tensor(atoms.cell[:], dtype=self.dtype, device=self.device)
            pbc = torch.tensor(atoms.pbc, device=self.device)
        energy, forces, *stress = self.model(
            pos, species_index, batch, 1, cell=cell, pbc=pbc, stress=fully_periodic
        )
        self.results = {
            "energy": float(energy.detach()),
            "free_energy": float(energy.detach()),
            "forces": forces.detach().double().cpu().numpy(),
        }
        if fully_periodic:
            stress = stress[0][0].detach().double().cpu().numpy()
            self.results["stress"] = full_3x3_to_voigt_6_stress(stress)
