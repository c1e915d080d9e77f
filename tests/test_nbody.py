"""se3tutor.nbody: the charged N-body data of EGNN's Table 2, its physics and its cache.

Tolerances (measured on this machine, float64, the first 128 systems of seed 43):
- energy over the input-to-target window (1,000 steps of 0.001) of the 112 systems whose forces
  are not clipped there, relative to K + |U| at the input frame: at most 3.6e-4 (median 6e-8);
  tested against 1e-3. (Relative to |E|, which can be small: at most 3.1e-3.)
- the energy error at step 0.001 over the error at 0.0005, per system: 3.9985 to 4.0007;
  tested in [3.9, 4.1]. With the stored half-step velocities: 1.987 to 2.009 (first order).
- momentum between frames without clipping: changes up to 3.3e-15; tested against 1e-10.
  Across the 244 of 6,144 frame intervals with clipping: up to 0.23.
"""

import math

import numpy as np
import pytest
import torch

from se3tutor import nbody

WINDOW = slice(nbody.INPUT_FRAME, nbody.TARGET_FRAME + 1)


@pytest.fixture(scope="module")
def published():
    """The first 128 systems of seed 43, as EGNN's script makes them (5,000 steps)."""
    return nbody.simulate(128, seed=43)


def test_simulate_returns_frames_of_the_published_schedule():
    data = nbody.simulate(3, seed=0, steps=500, sample_every=100)
    # Frames at steps 100, 200, 300, 400: steps // sample_every - 1 of them, none at step 0.
    for name in ("positions", "velocities", "forces"):
        assert data[name].shape == (3, 4, 5, 3) and data[name].dtype == torch.float64
    assert data["clipped"].shape == (3, 4) and data["clipped"].dtype == torch.bool
    assert data["charges"].shape == (3, 5)
    assert set(data["charges"].unique().tolist()) <= {-1.0, 1.0}
    # The particles move between frames.
    assert (data["positions"][:, 1:] - data["positions"][:, :-1]).abs().amin() > 0


def test_seed_43_reproduces_the_trajectories_of_egnns_script():
    # Reference values computed once with EGNN's own simulator (vgsatorras/egnn at bd2b4fc,
    # n_body_system/dataset/synthetic_sim.py, ChargedParticlesSim(noise_var=0, n_balls=5,
    # vel_norm=0.5), np.random.seed(43), sample_trajectory(T=5000, sample_freq=100)),
    # its [frames, 3, particles] layout transposed to [particles, 3].
    charges = [[-1, 1, -1, -1, -1], [1, -1, 1, 1, 1], [1, 1, -1, -1, 1]]
    system_1_frame_40 = [
        [-2.2752263113146256, -2.7102952407123673, -1.262262958927147],
        [-0.5609786347622853, 0.4062350021447797, 0.5618011867732429],
        [5.735381340306613, 1.0055802091696457, 0.9771834549281534],
        [-6.197271213398512, 4.775453635733845, 1.7631820948774903],
        [1.7203318000808308, 1.21418093939266, 1.0096671961125163],
    ]
    system_1_velocity_frame_30 = [
        [-0.024147938210348763, -0.7136812287155967, -0.08640914158289562],
        [-0.369754121420719, -0.4411593809282247, -0.03613347867383654],
        [1.4017080922285843, -0.05267036311017317, -0.0040479059028518585],
        [-1.4275024418216122, 0.9897762165891358, 0.48718370098143016],
        [0.2580102682010803, 0.365738277818431, 0.3932005931400909],
    ]
    data = nbody.simulate(3, seed=43)
    assert data["charges"].tolist() == charges
    reference = torch.tensor(system_1_frame_40, dtype=torch.float64)
    torch.testing.assert_close(data["positions"][1, 40], reference, rtol=0, atol=1e-10)
    reference = torch.tensor(system_1_velocity_frame_30, dtype=torch.float64)
    torch.testing.assert_close(data["velocities"][1, 30], reference, rtol=0, atol=1e-10)


def test_the_same_seed_gives_bitwise_the_same_data_and_offset_selects_systems():
    first = nbody.simulate(4, seed=7, steps=1000)
    second = nbody.simulate(4, seed=7, steps=1000)
    for name in first:
        assert torch.equal(first[name], second[name]), name
    tail = nbody.simulate(2, seed=7, offset=2, steps=1000)
    for name in first:
        assert torch.equal(tail[name], first[name][2:]), name
    other = nbody.simulate(4, seed=8, steps=1000)
    assert not torch.equal(other["positions"], first["positions"])


def test_initial_states_follow_the_published_distributions():
    positions, velocities, charges = nbody._initial_states(
        2000, seed=0, offset=0, num_particles=5, num_frames=1
    )
    speeds = np.linalg.norm(velocities, axis=-1)
    np.testing.assert_allclose(speeds, nbody.SPEED, rtol=1e-12)
    # 30,000 standard normal coordinates: the standard error of the std is about 0.004.
    assert abs(positions.mean()) < 0.03 and 0.98 < positions.std() < 1.02
    assert set(np.unique(charges)) == {-1.0, 1.0}
    assert 0.47 < (charges > 0).mean() < 0.53  # 10,000 charges, standard error 0.005


def test_initial_positions_outside_the_box_are_reflected_back_moving_inward(monkeypatch):
    def draw():
        return nbody._initial_states(500, seed=1, offset=0, num_particles=5, num_frames=1)

    monkeypatch.setattr(nbody, "BOX_SIZE", math.inf)
    free_positions, free_velocities, _ = draw()
    monkeypatch.setattr(nbody, "BOX_SIZE", 2.0)
    positions, velocities, _ = draw()
    outside = np.abs(free_positions) > 2.0
    assert outside.sum() > 100  # the check below is not vacuous
    assert np.abs(positions).max() <= 2.0
    np.testing.assert_allclose(
        positions[outside], np.sign(free_positions[outside]) * 4.0 - free_positions[outside]
    )
    assert np.all(velocities[outside] * np.sign(free_positions[outside]) <= 0)
    np.testing.assert_array_equal(positions[~outside], free_positions[~outside])
    np.testing.assert_array_equal(velocities[~outside], free_velocities[~outside])


def test_forces_are_minus_the_gradient_of_the_energy():
    generator = torch.Generator().manual_seed(0)
    positions = torch.randn(6, 5, 3, dtype=torch.float64, generator=generator)
    charges = torch.randint(0, 2, (6, 5), generator=generator).double() * 2 - 1
    positions.requires_grad_(True)
    potential = nbody.energy(positions, torch.zeros_like(positions), charges).sum()
    (gradient,) = torch.autograd.grad(potential, positions)
    forces = nbody.coulomb_forces(positions.detach(), charges)
    torch.testing.assert_close(forces, -gradient, rtol=1e-12, atol=1e-12)
    # Newton's third law: the forces of a system sum to zero.
    assert forces.sum(-2).abs().max() < 1e-12


def test_forces_are_clipped_componentwise_at_max_force():
    positions = torch.tensor([[0.0, 0.0, 0.0], [0.05, 0.0, 0.0]], dtype=torch.float64)
    charges = torch.tensor([1.0, -1.0], dtype=torch.float64)
    free = nbody.coulomb_forces(positions, charges)
    assert free[0, 0].item() == pytest.approx(1 / 0.05**2)  # 400, attracted towards +x
    clipped = nbody.coulomb_forces(positions, charges, max_force=nbody.MAX_FORCE)
    assert clipped[:, 0].tolist() == [100.0, -100.0]


def leapfrog_from(positions, velocities, charges, *, dt, duration=1.0, record_every=0.01):
    """Integrate from a synchronous state (x, v) for ``duration`` with step ``dt``, frames every
    ``record_every``: the stored half-step velocity that makes the published whole first kick a
    textbook half kick is v - dt / 2 F(x)."""
    steps_per_frame = round(record_every / dt)
    steps = round(duration / dt) + steps_per_frame
    forces = nbody.coulomb_forces(positions, charges, max_force=nbody.MAX_FORCE)
    return nbody.integrate(
        positions,
        velocities - 0.5 * dt * forces,
        charges,
        steps=steps,
        sample_every=steps_per_frame,
        dt=dt,
    )


def test_two_opposite_charges_circle_each_other():
    # Charges +1 and -1 at distance 1 attract with force 1; with speeds 1/sqrt(2) each
    # (reduced mass 1/2) they circle their centre at angular velocity sqrt(2).
    speed, omega = 1 / math.sqrt(2), math.sqrt(2)
    positions = torch.tensor([[[0.5, 0.0, 0.0], [-0.5, 0.0, 0.0]]], dtype=torch.float64)
    velocities = torch.tensor([[[0.0, speed, 0.0], [0.0, -speed, 0.0]]], dtype=torch.float64)
    charges = torch.tensor([[1.0, -1.0]], dtype=torch.float64)
    frames = leapfrog_from(positions, velocities, charges, dt=nbody.DT, duration=2.0)
    time = 0.01 * torch.arange(1, 201, dtype=torch.float64)
    circle = 0.5 * torch.stack([time.mul(omega).cos(), time.mul(omega).sin(), 0 * time], -1)
    expected = torch.stack([circle, -circle], 1)
    # Leapfrog's O(dt^2) error: 9e-7 measured up to t = 2. Starting half a kick off (the
    # published whole first kick, uncorrected) would be off by about 1e-3.
    torch.testing.assert_close(frames["positions"][0], expected, rtol=0, atol=2e-6)


def energy_error(frames, charges, *, dt, e0, scale, synchronous=True):
    """max over frames of |E - E0| / scale, per system."""
    velocities = frames["velocities"]
    if synchronous:
        velocities = velocities + 0.5 * dt * frames["forces"]
    num_frames = velocities.shape[1]
    total = nbody.energy(
        frames["positions"], velocities, charges[:, None].expand(-1, num_frames, -1)
    )
    return (total - e0[:, None]).abs().amax(1) / scale


@pytest.fixture(scope="module")
def window_runs(published):
    """The input frame of the published systems, integrated over the window (t = 1, 1,000 steps
    of the published dt) with dt and dt / 2, energy recorded every 0.01."""
    dt = nbody.DT
    frame = nbody.INPUT_FRAME
    x0, charges = published["positions"][:, frame], published["charges"]
    v0 = published["velocities"][:, frame] + 0.5 * dt * published["forces"][:, frame]
    e0 = nbody.energy(x0, v0, charges)
    kinetic = 0.5 * v0.square().sum((-1, -2))
    scale = kinetic + (e0 - kinetic).abs()
    runs = {step: leapfrog_from(x0, v0, charges, dt=step) for step in (dt, dt / 2)}
    clean = ~(runs[dt]["clipped"].any(1) | runs[dt / 2]["clipped"].any(1))
    return runs, charges, e0, scale, clean


def test_energy_is_conserved_over_the_input_to_target_window(published, window_runs):
    runs, charges, e0, scale, clean = window_runs
    dt = nbody.DT
    assert clean.sum() > 80  # most systems meet no clipping in the window
    error = energy_error(runs[dt], charges, dt=dt, e0=e0, scale=scale)
    assert error[clean].max() < 1e-3
    # The window run is the published trajectory itself (same steps from the same state; equal
    # to the last bit here).
    torch.testing.assert_close(
        runs[dt]["positions"][:, -1],
        published["positions"][:, nbody.TARGET_FRAME],
        rtol=0,
        atol=1e-9,
    )


def test_halving_the_step_cuts_the_energy_error_fourfold(window_runs):
    runs, charges, e0, scale, clean = window_runs
    dt = nbody.DT
    coarse = energy_error(runs[dt], charges, dt=dt, e0=e0, scale=scale)[clean]
    fine = energy_error(runs[dt / 2], charges, dt=dt / 2, e0=e0, scale=scale)[clean]
    ratio = coarse / fine
    assert ratio.min() > 3.9 and ratio.max() < 4.1  # second order: 2^2


def test_energy_with_the_stored_half_step_velocities_is_only_first_order(window_runs):
    # The stored velocities lag half a step: energy computed with them errs by O(dt), so the
    # fourfold test above would fail for them (and did, before the synchronous velocity).
    runs, charges, e0, scale, clean = window_runs
    dt = nbody.DT
    coarse = energy_error(runs[dt], charges, dt=dt, e0=e0, scale=scale, synchronous=False)
    fine = energy_error(runs[dt / 2], charges, dt=dt / 2, e0=e0, scale=scale, synchronous=False)
    ratio = (coarse / fine)[clean]
    assert 1.9 < ratio.median() < 2.1 and ratio.max() < 3.0


def test_momentum_is_conserved_exactly_unless_forces_are_clipped(published):
    momentum = nbody.total_momentum(published["velocities"])  # [S, T, 3]
    change = (momentum[:, 1:] - momentum[:, :-1]).abs().amax(-1)  # [S, T - 1]
    clipped = published["clipped"][:, :-1]  # clipping between frame k and k + 1
    assert clipped.sum() > 10 and (~clipped).sum() > 1000
    assert change[~clipped].max() < 1e-10
    # Clipping caps each particle's total force separately: Newton's third law breaks.
    assert change[clipped].max() > 1e-3


def test_no_clipping_without_a_cap():
    data = nbody.simulate(16, seed=43, max_force=math.inf)
    assert not data["clipped"].any()
    momentum = nbody.total_momentum(data["velocities"])
    assert (momentum - momentum[:, :1]).abs().max() < 1e-10


def test_charged_nbody_returns_the_input_and_target_frames(tmp_path):
    data = nbody.charged_nbody("train", num_systems=3, cache_dir=tmp_path)
    frames = nbody.simulate(3, seed=nbody.SEED)
    assert torch.equal(data["positions"], frames["positions"][:, 30])
    assert torch.equal(data["velocities"], frames["velocities"][:, 30])
    assert torch.equal(data["target"], frames["positions"][:, 40])
    assert torch.equal(data["charges"], frames["charges"])
    assert torch.equal(data["clipped"], frames["clipped"][:, 30:40].any(1))
    assert data["positions"].shape == data["target"].shape == (3, 5, 3)


def test_validation_split_follows_the_10000_training_systems_of_the_stream(tmp_path):
    valid = nbody.charged_nbody("valid", num_systems=2, cache_dir=tmp_path)
    frames = nbody.simulate(2, seed=nbody.SEED, offset=10000)
    assert torch.equal(valid["target"], frames["positions"][:, 40])
    assert valid["parameters"]["offset"] == 10000


def test_split_sizes_are_the_published_ones():
    assert nbody.SPLIT_SIZES == {"train": 3000, "valid": 2000, "test": 2000}
    with pytest.raises(ValueError, match="split"):
        nbody.charged_nbody("val")
    with pytest.raises(ValueError, match="num_systems"):
        nbody.charged_nbody("test", num_systems=2001)


def test_charged_nbody_reads_its_cache_back(tmp_path, monkeypatch):
    first = nbody.charged_nbody("train", num_systems=2, cache_dir=tmp_path)
    (path,) = tmp_path.iterdir()
    assert path.name.startswith("charged_nbody_train_2_seed43_") and path.suffix == ".pt"

    def no_simulation(*args, **kwargs):
        raise AssertionError("simulated again instead of reading the cache")

    monkeypatch.setattr(nbody, "simulate", no_simulation)
    second = nbody.charged_nbody("train", num_systems=2, cache_dir=tmp_path)
    for name in ("positions", "velocities", "charges", "target", "clipped"):
        assert torch.equal(first[name], second[name]), name
    assert second["parameters"] == first["parameters"]


def test_a_changed_constant_or_stale_file_regenerates(tmp_path, monkeypatch):
    first = nbody.charged_nbody("train", num_systems=2, cache_dir=tmp_path)
    (path,) = tmp_path.iterdir()
    calls = []
    simulate = nbody.simulate

    def counting(*args, **kwargs):
        calls.append(kwargs)
        return simulate(*args, **kwargs)

    monkeypatch.setattr(nbody, "simulate", counting)
    # A file at the expected name whose parameters differ is not trusted.
    stale = {**first, "target": first["target"] + 1, "parameters": {"format_version": -1}}
    torch.save(stale, path)
    again = nbody.charged_nbody("train", num_systems=2, cache_dir=tmp_path)
    assert len(calls) == 1 and torch.equal(again["target"], first["target"])
    # A changed constant gives a new file and new data.
    monkeypatch.setattr(nbody, "DT", nbody.DT / 2)
    changed = nbody.charged_nbody("train", num_systems=2, cache_dir=tmp_path)
    assert len(calls) == 2 and calls[-1]["dt"] == nbody.DT
    assert len(list(tmp_path.iterdir())) == 2
    assert not torch.equal(changed["target"], first["target"])


def test_bad_input_is_rejected_naming_the_argument():
    positions = torch.zeros(2, 5, 3, dtype=torch.float64)
    charges = torch.ones(2, 5, dtype=torch.float64)
    with pytest.raises(TypeError, match="charges"):
        nbody.integrate(positions, positions, charges.long())
    with pytest.raises(ValueError, match="charges"):
        nbody.energy(positions, positions, charges[:, :4])
    with pytest.raises(ValueError, match="velocities"):
        nbody.integrate(positions, positions[:, :4], charges)
    with pytest.raises(ValueError, match="sample_every"):
        nbody.simulate(2, seed=0, steps=250, sample_every=100)
    with pytest.raises(ValueError, match="num_systems"):
        nbody.simulate(0, seed=0)
