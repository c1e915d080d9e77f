"""se3tutor.radial: the radial embedding and the smooth cutoff."""

import torch

from se3tutor.radial import CUTOFF_SHARPNESS, embed_edge_length, radial_mlp, smooth_cutoff


def test_the_embedding_has_second_moment_about_one_on_uniform_lengths():
    lengths = torch.linspace(0, 2.0, 10001)[1:-1]
    for number_of_basis in (5, 10, 20):
        embedded = embed_edge_length(lengths, 2.0, number_of_basis, cutoff=False)
        assert 0.5 < embedded.pow(2).mean() < 2.0
        # Without the sqrt(number_of_basis) scaling it would shrink like 1/number_of_basis.
        assert embedded.div(number_of_basis**0.5).pow(2).mean() < 2.0 / number_of_basis


def test_the_embedding_with_cutoff_vanishes_at_and_beyond_max_radius():
    embedded = embed_edge_length(torch.tensor([1.5, 1.5 + 1e-6, 3.0]), 1.5, 8, cutoff=True)
    assert torch.equal(embedded, torch.zeros(3, 8))


def test_the_smooth_cutoff_is_zero_outside_and_rises_inside():
    r = torch.linspace(0, 2.0, 201, dtype=torch.float64)
    weight = smooth_cutoff(r, 1.0)
    assert torch.equal(weight[r >= 1.0], torch.zeros(int((r >= 1.0).sum()), dtype=torch.float64))
    inside = weight[r < 1.0]
    assert (inside[1:] <= inside[:-1]).all() and (inside[1:] > 0).all()
    # At r = 0 it is soft_unit_step(CUTOFF_SHARPNESS) = exp(-1 / CUTOFF_SHARPNESS).
    torch.testing.assert_close(weight[0], torch.exp(torch.tensor(-1 / CUTOFF_SHARPNESS)).double())


def test_the_radial_mlp_maps_a_zero_embedding_to_zero_weights():
    # No biases: an edge whose embedding is all zero (at the cutoff) gets zero weights.
    mlp = radial_mlp(8, 16, 30, torch.nn.functional.silu)
    assert torch.equal(mlp(torch.zeros(5, 8)), torch.zeros(5, 30))
