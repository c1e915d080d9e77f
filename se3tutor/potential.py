r"""An interatomic potential from the SE(3)-Transformer (book: Learning an interatomic
potential); :class:`se3tutor.calculator.SE3Calculator` runs it in ase.

.. math:: E = \sum_i \big(s\, \varepsilon_i + e_{Z_i}\big), \qquad
          F_i = -\frac{\partial E}{\partial x_i}

The per-atom energies :math:`\varepsilon_i` are the invariant (``0e``) outputs of an
:class:`se3tutor.SE3Transformer` whose inputs are one-hot species; :math:`e_Z` are per-species
reference energies and :math:`s` a scale (both fitted to the data by
:meth:`EnergyModel.fit_reference`). Because :math:`E` is invariant, the forces, its negative
gradient, rotate with the structure; because the model is smooth at the cutoff, so are they.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from se3tutor.graph import scatter
from se3tutor.transformer import SE3Transformer

__all__ = ["EnergyModel"]


class EnergyModel(torch.nn.Module):
    """Energy (and forces) of structures from their atomic positions and species.

    Args:
        species: the atomic numbers the model knows, e.g. ``[29]`` for copper.
        irreps_hidden, max_radius, num_layers, num_heads, **options: of the
            :class:`se3tutor.SE3Transformer` that gives the per-atom energies.

    ``forward(pos, species_index, batch, num_graphs)`` returns ``(energy [num_graphs],
    forces [N, 3])``; the forces are differentiable (for a force loss) when training.

    >>> model = EnergyModel([29], "8x0e + 4x1o", max_radius=4.0, num_layers=1, num_heads=2)
    >>> energy, forces = model(torch.randn(5, 3), torch.zeros(5, dtype=torch.long),
    ...                        torch.zeros(5, dtype=torch.long), num_graphs=1)
    >>> energy.shape, forces.shape
    (torch.Size([1]), torch.Size([5, 3]))
    """

    def __init__(
        self,
        species: Sequence[int],
        irreps_hidden,
        max_radius: float,
        num_layers: int = 2,
        num_heads: int = 2,
        **options,
    ) -> None:
        super().__init__()
        self.species = [int(z) for z in species]
        self.max_radius = max_radius
        self.transformer = SE3Transformer(
            f"{len(self.species)}x0e",
            irreps_hidden,
            "1x0e",
            max_radius=max_radius,
            num_layers=num_layers,
            num_heads=num_heads,
            **options,
        )
        self.register_buffer("reference", torch.zeros(len(self.species)))
        self.register_buffer("scale", torch.ones(()))

    def atomic_energies(self, pos, species_index, batch) -> torch.Tensor:
        """``[N]``: :math:`s\\, \\varepsilon_i + e_{Z_i}`."""
        one_hot = torch.nn.functional.one_hot(species_index, len(self.species)).to(pos.dtype)
        epsilon = self.transformer(one_hot, pos, batch=batch)[:, 0]
        return self.scale * epsilon + self.reference[species_index]

    def forward(self, pos, species_index, batch, num_graphs: int):
        if not pos.requires_grad:
            pos = pos.requires_grad_(True)
        energy = scatter(
            self.atomic_energies(pos, species_index, batch), batch, dim=0, dim_size=num_graphs
        )
        (gradient,) = torch.autograd.grad(energy.sum(), pos, create_graph=self.training)
        return energy, -gradient

    @torch.no_grad()
    def fit_reference(self, species_index, batch, energy, num_graphs: int) -> None:
        """Least-squares per-species energies :math:`e_Z` (energy ~ sum of atom counts times
        :math:`e_Z`) and the scale :math:`s` = RMS of what they leave unexplained per atom,
        so that the network learns an order-one correction."""
        counts = torch.zeros(num_graphs, len(self.species), dtype=energy.dtype)
        counts.index_put_((batch, species_index), torch.ones_like(batch, dtype=energy.dtype), True)
        reference = torch.linalg.lstsq(counts, energy[:, None]).solution[:, 0]
        residual = energy - counts @ reference
        atoms_per_graph = counts.sum(dim=1)
        self.reference.copy_(reference)
        self.scale.copy_((residual / atoms_per_graph.sqrt()).pow(2).mean().sqrt().clamp(min=1e-3))
