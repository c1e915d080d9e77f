r"""Checker for the exercise of the potential chapter (book/exercises/potential.ipynb): the
energies of a batch of structures and the forces on their atoms,

.. math:: E_b = \sum_{i \in b} \varepsilon_i, \qquad F_i = -\frac{\partial E}{\partial x_i},

as :meth:`se3tutor.potential.EnergyModel.forward` computes them.
"""

from __future__ import annotations

from typing import Callable

import torch

from se3tutor.exercises._common import (
    Device,
    as_device,
    call,
    check_tensor,
    close,
    fail,
    largest_difference,
    passed,
    seeded,
)
from se3tutor.graph import edge_vectors, radius_graph, scatter
from se3tutor.radial import smooth_cutoff

__all__ = ["check_forces"]


class PairEnergy(torch.nn.Module):
    r"""Per-atom energies of a Morse pair potential with a smooth cutoff, a stand-in for a
    trained model with one parameter, ``depth``:

    .. math:: \varepsilon_i = \frac12 \sum_j V(r_{ij}), \qquad
              V(r) = D \big(e^{-2a(r - r_0)} - 2 e^{-a(r - r_0)}\big)\, c(r).

    ``forward(pos, batch) -> [num_atoms]``.
    """

    def __init__(self, max_radius: float = 2.5, r0: float = 1.0, a: float = 1.5) -> None:
        super().__init__()
        self.depth = torch.nn.Parameter(torch.tensor(1.0))
        self.max_radius, self.r0, self.a = max_radius, r0, a

    def forward(self, pos: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        edge_index = radius_graph(pos, self.max_radius, batch=batch)
        r = edge_vectors(pos, edge_index).norm(dim=1)
        morse = torch.exp(-2 * self.a * (r - self.r0)) - 2 * torch.exp(-self.a * (r - self.r0))
        pair = self.depth * morse * smooth_cutoff(r, self.max_radius)  # [num_edges]
        # Each pair appears twice in edge_index (once per direction): half to each atom.
        return scatter(pair / 2, edge_index[1], dim=0, dim_size=len(pos))


def _reference(model, pos, batch, num_graphs, training):
    pos = pos.detach().requires_grad_(True)
    energy = scatter(model(pos, batch), batch, dim=0, dim_size=num_graphs)
    (gradient,) = torch.autograd.grad(energy.sum(), pos, create_graph=training)
    return energy, -gradient


def check_forces(energy_and_forces: Callable, device: Device = None) -> None:
    r"""Check ``energy_and_forces(atomic_energies, pos, batch, num_graphs, training=False)``,
    which returns the energy of every structure of a batch and the force on every atom:

    .. math:: E_b = \sum_{i:\ \mathrm{batch}_i = b} \varepsilon_i, \qquad
              F_i = -\frac{\partial \sum_b E_b}{\partial x_i}

    with ``atomic_energies(pos, batch) -> [num_atoms]`` (a model). With ``training=True`` the
    forces must stay differentiable (with respect to the model's parameters, for a force loss);
    with ``training=False`` they should keep no graph. Calling it must leave no gradients
    behind (in ``pos.grad`` or the parameters) and give the same forces every time.

    Shapes: ``pos [num_atoms, 3]``, ``batch [num_atoms]`` ->
    ``(energy [num_graphs], forces [num_atoms, 3])``.

    >>> check_forces(lambda *args, training=False: _reference(*args, training))
    ... # doctest: +ELLIPSIS
    ✓ energy_and_forces is correct: energies [3], forces [15, 3] = -dE/dx,
    differentiable when training, nothing left in .grad
    """
    name = "energy_and_forces"
    device = as_device(device)
    sizes = (5, 6, 4)
    with seeded(11):
        model = PairEnergy().to(device)
        pos = torch.cat([torch.randn(n, 3) + 10 * b for b, n in enumerate(sizes)]).to(device)
    batch = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes)).to(device)
    num_graphs, num_atoms = len(sizes), len(pos)
    expected_energy, expected_forces = _reference(model, pos, batch, num_graphs, False)

    def run(pos, training):
        result = call(energy_and_forces, name, model, pos, batch, num_graphs, training=training)
        if not (isinstance(result, tuple) and len(result) == 2):
            raise fail(name, "It should return a pair (energy, forces).")
        energy, forces = result
        check_tensor(
            name,
            energy,
            (num_graphs,),
            "energy",
            pos,
            {
                (): "that is one number for the whole batch; return one energy per structure: "
                "scatter(atomic_energies(pos, batch), batch, dim=0, dim_size=num_graphs).",
                (num_atoms,): "those are the atomic energies; sum them over each structure "
                "(scatter over batch, dim_size=num_graphs).",
            },
        )
        check_tensor(name, forces, (num_atoms, 3), "forces", pos)
        return energy, forces

    given = pos.clone()
    energy, forces = run(given, training=False)
    if given.grad is not None or model.depth.grad is not None:
        raise fail(
            name,
            "It leaves gradients behind, in pos.grad or in the model's parameters.",
            "loss.backward() accumulates into the .grad of every leaf tensor, parameters "
            "included, and an optimizer would later use them. torch.autograd.grad(energy.sum(), "
            "pos) returns the gradient without storing anything.",
        )
    if not close(energy.detach(), expected_energy.detach()):
        raise fail(
            name,
            f"The energies are {[round(float(e), 4) for e in energy]}, expected "
            f"{[round(float(e), 4) for e in expected_energy]}.",
            "E_b is the sum of the atomic energies of structure b: scatter over batch.",
        )
    if not close(forces.detach(), expected_forces):
        if close(forces.detach(), -expected_forces):
            raise fail(
                name,
                "Your forces are +dE/dx: they point uphill, towards higher energy.",
                "the force is minus the gradient: F = -dE/dx.",
            )
        zero = [b for b in range(num_graphs) if float(forces[batch == b].abs().max()) == 0]
        raise fail(
            name,
            f"The forces differ from -dE/dx by up to "
            f"{largest_difference(forces, expected_forces):.3g} (largest force component "
            f"{float(expected_forces.abs().max()):.3g})"
            + (f"; they are 0 on the atoms of structures {zero}." if zero else "."),
            "differentiate the sum of the energies of all structures, energy.sum(): the atoms "
            "of one structure do not affect the others, so each gets the gradient of its own.",
        )
    if forces.requires_grad:
        raise fail(
            name,
            "With training=False the forces still carry an autograd graph, which costs memory "
            "at every call (a simulation makes thousands).",
            "pass create_graph=training to torch.autograd.grad.",
        )
    _, forces_again = run(given, training=False)
    if not close(forces_again.detach(), forces.detach()):
        raise fail(
            name,
            "Calling it twice on the same positions gives different forces.",
            "gradients stored in pos.grad add up from call to call; use torch.autograd.grad.",
        )
    # Training: the forces must be differentiable with respect to the parameters.
    energy, forces = run(pos.clone(), training=True)
    if not forces.requires_grad:
        raise fail(
            name,
            "With training=True the forces are not differentiable, so a loss on the forces "
            "cannot be minimised.",
            "torch.autograd.grad(..., create_graph=True) keeps the graph of the gradient itself.",
        )
    (grad,) = torch.autograd.grad(forces.pow(2).sum(), model.depth, allow_unused=True)
    _, reference_forces = _reference(model, pos, batch, num_graphs, True)
    (expected_grad,) = torch.autograd.grad(reference_forces.pow(2).sum(), model.depth)
    if grad is None or not close(grad, expected_grad, 1e-4):
        raise fail(
            name,
            "With training=True, the gradient of a force loss with respect to the model's "
            f"parameters is {'missing' if grad is None else f'{float(grad):.4g}'}, expected "
            f"{float(expected_grad):.4g}.",
            "compute the forces from positions that require grad, with create_graph=True, and "
            "do not detach them.",
        )
    passed(
        name,
        f"energies [{num_graphs}], forces [{num_atoms}, 3] = -dE/dx, differentiable when "
        "training, nothing left in .grad",
    )
