"""se3tutor.dynamics: the N-body predictor's symmetries and the training loop of bench/nbody.py.

Tolerances: float64 equivariance of the predictor, 1e-10 (measured: about 1e-15).
"""

import math

import pytest
import torch

from se3tutor.checks import default_dtype, equivariance_error
from se3tutor.dynamics import NBodyTransformer, evaluate, fit, fully_connected_edges


def small_model(**kwargs) -> NBodyTransformer:
    return NBodyTransformer("4x0e + 4x1o", irreps_head="2x0e + 2x1o", num_layers=1, num_heads=2,
                            **kwargs)  # fmt: skip


def toy_data(seed: int, sizes=(40, 20, 20)) -> dict:
    """Systems whose target is a smooth equivariant function of the inputs."""
    generator = torch.Generator().manual_seed(seed)
    data = {}
    for split, size in zip(("train", "valid", "test"), sizes):
        x = torch.randn(size, 5, 3, generator=generator, dtype=torch.float64)
        v = torch.randn(size, 5, 3, generator=generator, dtype=torch.float64)
        q = torch.randint(0, 2, (size, 5), generator=generator).double() * 2 - 1
        target = x + 0.5 * v - 0.1 * q[..., None] * (x - x.mean(1, keepdim=True))
        data[split] = dict(positions=x, velocities=v, charges=q, target=target)
    return data


def test_fully_connected_edges_are_every_ordered_pair_within_each_system():
    edge_index = fully_connected_edges(3, 4)
    pairs = {tuple(pair) for pair in edge_index.T.tolist()}
    expected = {
        (4 * s + j, 4 * s + i) for s in range(3) for i in range(4) for j in range(4) if i != j
    }
    assert pairs == expected and edge_index.shape == (2, len(expected))


@pytest.mark.parametrize("inversion", [False, True])
def test_the_predictor_is_equivariant_to_rotations_reflections_and_translations(inversion):
    torch.manual_seed(0)
    with default_dtype(torch.float64):
        model = small_model()
    num_systems = 3

    def displacement(f, pos):  # Delta = prediction - x: a 1o field, translation invariant
        x = pos.reshape(num_systems, 5, 3)
        v, q = f[:, 1:].reshape(num_systems, 5, 3), f[:, 0].reshape(num_systems, 5)
        return (model(x, v, q) - x).reshape(-1, 3)

    f = torch.cat([torch.randn(15, 1).sign(), torch.randn(15, 3)], dim=1).double()
    pos = torch.randn(15, 3, dtype=torch.float64)
    assert displacement(f, pos).abs().max() > 1e-3  # not trivially equivariant (zero)
    error = equivariance_error(displacement, "1x0e + 1x1o", "1x1o", f, pos, inversion=inversion)
    assert error < 1e-10


def test_the_predictor_sees_the_charges_and_the_velocities():
    torch.manual_seed(0)
    model = small_model()
    x, v, q = torch.randn(2, 5, 3), torch.randn(2, 5, 3), torch.ones(2, 5)
    base = model(x, v, q)
    assert (model(x, v, -q) - base).abs().max() > 1e-6
    assert (model(x, 2 * v, q) - base).abs().max() > 1e-6


def test_evaluate_is_the_mean_squared_error_per_coordinate():
    split = toy_data(0)["valid"]
    shift = torch.tensor([0.1, -0.2, 0.3])
    error = evaluate(lambda x, v, q: x + shift, split, batch_size=7)
    expected = (split["positions"].float() + shift - split["target"].float()).pow(2).mean()
    assert error == pytest.approx(expected.item(), rel=1e-6)


def test_fit_learns_and_returns_the_test_error_of_the_best_validation_weights():
    torch.manual_seed(0)
    data = toy_data(1)
    model = small_model()
    before = evaluate(model, data["test"])
    result = fit(model, data, epochs=8, batch_size=10, lr=1e-2, evaluations=4)
    assert result["test"] < 0.5 * before
    assert [e["epoch"] for e in result["history"]] == [2, 4, 6, 8]
    valid = [e["valid"] for e in result["history"]]
    assert result["best_valid"] == min(valid)
    # The returned model holds the best weights: its validation error is the best one.
    assert evaluate(model, data["valid"]) == pytest.approx(min(valid), rel=1e-5)
    assert result["history"][-1]["lr"] < 0.05 * 1e-2  # the cosine ends near zero


def test_a_run_continued_from_its_checkpoint_equals_an_uninterrupted_one(tmp_path):
    data = toy_data(2)
    settings = dict(epochs=6, batch_size=15, evaluations=3, seed=5)

    torch.manual_seed(0)
    whole = fit(small_model(), data, **settings)

    class Interrupted(Exception):
        pass

    def crash_after_the_first_evaluation(entry):
        raise Interrupted

    torch.manual_seed(0)
    model = small_model()
    with pytest.raises(Interrupted):
        fit(model, data, checkpoint=tmp_path / "run.ckpt", log=crash_after_the_first_evaluation,
            **settings)  # fmt: skip
    torch.manual_seed(1)  # a fresh model with other weights: the checkpoint restores them
    resumed = fit(small_model(), data, checkpoint=tmp_path / "run.ckpt", **settings)
    assert [e["valid"] for e in resumed["history"]] == pytest.approx(
        [e["valid"] for e in whole["history"]], rel=1e-6
    )
    assert resumed["test"] == pytest.approx(whole["test"], rel=1e-6)


def test_a_run_for_a_time_completes_its_schedule_in_that_time():
    data = toy_data(3)
    result = fit(small_model(), data, time_limit=0.5, batch_size=10, evaluations=2)
    assert result["seconds"] >= 0.5
    assert result["history"][-1]["lr"] < 0.05 * 3e-3  # progress reached 1 at the limit
    assert len(result["history"]) == 2


def test_fit_refuses_a_nan_loss_and_bad_settings():
    data = toy_data(4)
    data["train"]["target"][0, 0, 0] = math.nan
    with pytest.raises(FloatingPointError, match="loss is nan"):
        fit(small_model(), data, epochs=1, batch_size=40)
    with pytest.raises(ValueError, match="epochs"):
        fit(small_model(), toy_data(4), epochs=0)
    with pytest.raises(ValueError, match="time_limit"):
        fit(small_model(), toy_data(4), time_limit=0)
