"""se3tutor.train: several processes take the steps of one, a killed run resumes to the same
bits, corrupt checkpoints are passed over, bad data is refused by name, torch.compile agrees.

Runs are tiny (13-atom clusters, one layer of "8x0e + 4x1o", float64) and use one thread per
process, so that the whole file takes well under a minute or two on two cores (the
torch.compile check: most of a minute, the first time; inductor caches what it compiled).
"""

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import write

from se3tutor.checks import default_dtype
from se3tutor.data import collate, emt_clusters
from se3tutor.potential import EnergyModel, train_energy_model
from se3tutor.tensor_product import cuequivariance_available, use_backend
from se3tutor.train import (
    SetupError,
    TrainConfig,
    compile_for_inference,
    fit,
    main,
    plot_log,
    read_log,
)
from se3tutor.train.checkpoint import load_latest_checkpoint, save_checkpoint

TINY = ["--data", "emt", "--shells", "2", "--irreps-hidden", "8x0e + 4x1o", "--num-layers", "1"]
# Pinned to the CPU: the bit-exact and "2 processes = 1" claims are CPU claims (atomic adds on
# a GPU sum in a varying order), and a GPU machine must not train these on CUDA.
TINY += ["--dtype", "float64", "--threads", "1", "--no-progress", "--device", "cpu"]
TINY_CONFIG = dict(
    shells=(2,), irreps_hidden="8x0e + 4x1o", num_layers=1, dtype="float64", device="cpu"
)
ENVIRONMENT = {**os.environ, "OMP_NUM_THREADS": "1"}
TRAIN = [sys.executable, "-m", "se3tutor.train"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]


def run(command, **options) -> subprocess.CompletedProcess:
    return subprocess.run(command, env=ENVIRONMENT, capture_output=True, text=True, **options)


def parameters(out) -> dict:
    return torch.load(out / "model.pt", weights_only=True)["state_dict"]


def records(out, event) -> list:
    lines = (out / "log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == event]


def complete_records(out) -> list:
    """The records of a log that a running process writes to: its complete lines."""
    log = out / "log.jsonl"
    return [json.loads(line) for line in log.read_text().split("\n")[:-1]] if log.exists() else []


def test_the_command_line_explains_itself(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["--help"])
    assert exit.value.code == 0
    assert "--checkpoint-every" in capsys.readouterr().out


@pytest.mark.slow
def test_two_processes_take_the_steps_of_one(tmp_path):
    # 5 training clusters of 13 and 55 atoms in global batches of 4, then 1: the processes
    # hold different numbers of atoms, and in the second step process 1 holds none.
    options = ["--num-structures", "7", "--shells", "2", "3", "--validation-fraction", "0.25"]
    options += ["--epochs", "1", "--batch-size", "4", "--log-every", "1"]
    one = run([*TRAIN, *TINY, *options, "--out", str(tmp_path / "one")])
    two = run(
        [*TORCHRUN, "--nproc_per_node", "2", "-m", "se3tutor.train", *TINY, *options]
        + ["--out", str(tmp_path / "two")]
    )
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    assert records(tmp_path / "two", "start")[0]["world_size"] == 2
    # Each epoch's validation errors on the console, once (from the main process only).
    for done in (one, two):
        assert done.stdout.count("epoch 1/1: training loss") == 1, done.stdout
        assert re.search(r"validation energy MAE [\d.]+ meV/atom, force MAE", done.stdout)
    assert "2 process(es)" in two.stdout
    # Started again, the two processes resume from the checkpoint the main one chose.
    again = run(
        [*TORCHRUN, "--nproc_per_node", "2", "-m", "se3tutor.train", *TINY, *options]
        + ["--out", str(tmp_path / "two")]
    )
    assert again.returncode == 0, again.stderr
    assert "nothing left to train" in again.stdout
    assert records(tmp_path / "two", "resume")[0]["world_size"] == 2
    # Adam's step hardly depends on the gradient's scale, so compare the gradients too.
    for single, double in zip(records(tmp_path / "one", "step"), records(tmp_path / "two", "step")):
        for key in ("loss", "energy_term", "force_term", "gradient_norm"):
            assert single[key] == pytest.approx(double[key], rel=1e-12, abs=0), key
    expected, got = parameters(tmp_path / "one"), parameters(tmp_path / "two")
    difference = max((expected[k] - got[k]).abs().max().item() for k in expected if got[k].numel())
    print(f"two processes vs one, float64: max |parameter difference| = {difference:.1e}")
    assert difference < 1e-12


@pytest.mark.slow
def test_a_run_killed_and_resumed_ends_with_exactly_the_parameters_of_an_uninterrupted_one(
    tmp_path,
):
    # 36 training clusters in batches of 2: 18 steps an epoch, 216 in all
    options = ["--num-structures", "40", "--validation-fraction", "0.1", "--epochs", "12"]
    options += ["--batch-size", "2", "--log-every", "1", "--checkpoint-every", "10"]
    uninterrupted = run([*TRAIN, *TINY, *options, "--out", str(tmp_path / "whole")])
    assert uninterrupted.returncode == 0, uninterrupted.stderr

    out = tmp_path / "killed"
    command = [*TRAIN, *TINY, *options, "--out", str(out)]
    process = subprocess.Popen(command, env=ENVIRONMENT, stderr=subprocess.DEVNULL)
    while process.poll() is None:
        time.sleep(0.01)
        logged = complete_records(out)
        checkpoints = [r["step"] for r in logged if r["event"] == "checkpoint"]
        steps = [r["step"] for r in logged if r["event"] == "step"]
        if checkpoints and steps[-1] >= checkpoints[0] + 3:
            process.send_signal(signal.SIGKILL)  # 3 steps after the first checkpoint
            checkpoint_step, killed_at = checkpoints[0], steps[-1]
            break
    assert process.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    assert not records(out, "end")

    resumed = run(command)
    assert resumed.returncode == 0, resumed.stderr
    [resume] = records(out, "resume")
    print(f"checkpoint at step {checkpoint_step}, killed after step {killed_at}, resumed at")
    print(f"step {resume['step']} of {len(records(out, 'step'))}")
    assert checkpoint_step <= resume["step"] < 216
    expected, got = parameters(tmp_path / "whole"), parameters(out)
    assert all(torch.equal(expected[key], got[key]) for key in expected)
    # The log tells the same story, each step once.
    steps = [(r["step"], r["loss"]) for r in records(out, "step")]
    assert steps == [(r["step"], r["loss"]) for r in records(tmp_path / "whole", "step")]


@pytest.mark.parametrize("damage", ["truncated", "one byte changed", "no manifest"])
def test_a_corrupt_checkpoint_is_reported_by_name_and_the_one_before_is_used(tmp_path, damage):
    for step in (10, 20, 30):
        save_checkpoint({"step": step, "weight": torch.full((100,), float(step))}, tmp_path, step)
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == [
        "checkpoint-00000020.pt",
        "checkpoint-00000030.pt",
    ]  # the last two are kept
    newest = tmp_path / "checkpoint-00000030.pt"
    if damage == "truncated":
        newest.write_bytes(newest.read_bytes()[:-100])
    elif damage == "one byte changed":
        data = bytearray(newest.read_bytes())
        data[len(data) // 2] ^= 1
        newest.write_bytes(bytes(data))
    else:
        newest.with_suffix(".json").unlink()
    with pytest.warns(UserWarning, match="checkpoint-00000030.pt"):
        state, path = load_latest_checkpoint(tmp_path)
    assert path.name == "checkpoint-00000020.pt" and state["step"] == 20


def test_training_resumes_from_the_checkpoint_before_a_corrupt_one(tmp_path):
    structures = emt_clusters(10, shells=(2,), seed=3)
    config = TrainConfig(
        **TINY_CONFIG, epochs=2, batch_size=2, checkpoint_every=3, progress=False, out=str(tmp_path)
    )
    finished = fit(config, structures)
    final = sorted(tmp_path.glob("checkpoint-*.pt"))[-1]
    final.write_bytes(final.read_bytes()[:1000])
    with pytest.warns(UserWarning, match=final.name):
        again = fit(config, structures)  # resumes from step 6 of 8, ends as before
    assert records(tmp_path, "resume")[0]["step"] == 6
    assert all(torch.equal(a, b) for a, b in zip(finished.parameters(), again.parameters()))


def labelled(positions, forces=None):
    atoms = Atoms("Cu" * len(positions), positions=positions)
    forces = np.zeros((len(positions), 3)) if forces is None else forces
    atoms.calc = SinglePointCalculator(atoms, energy=1.0, forces=forces)
    return atoms


GOOD = [[0, 0, 0], [2.5, 0, 0]]


@pytest.mark.slow  # a subprocess per case
@pytest.mark.parametrize(
    "file, bad, message",
    [
        ("nan.extxyz", labelled([[0, 0, 0], [np.nan, 0, 0]]), "structure 1 .*non-finite positions"),
        ("one_atom.extxyz", labelled([[0, 0, 0]]), "structure 1 .*1 atom"),
        (
            "forces.traj",
            labelled(GOOD, forces=np.zeros((3, 3))),
            r"structure 1 .*forces .*\(3, 3\)",
        ),
        ("empty.extxyz", None, "cannot read .*empty"),
    ],
)
def test_the_command_line_refuses_bad_data_by_name_before_training(tmp_path, file, bad, message):
    path = tmp_path / file
    if bad is None:
        path.touch()
    else:
        write(path, [labelled(GOOD), bad])
    result = run([*TRAIN, *TINY, "--data", str(path), "--out", str(tmp_path / "run")])
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert re.search(message, result.stderr), result.stderr
    assert not (tmp_path / "run" / "log.jsonl").exists()  # nothing was trained


def test_fit_refuses_an_empty_list_of_structures():
    with pytest.raises(SetupError, match="empty"):
        fit(TrainConfig(**TINY_CONFIG), structures=[])


@pytest.mark.slow
def test_one_process_takes_the_steps_of_train_energy_model(tmp_path):
    structures = emt_clusters(6, shells=(2,), seed=7)
    config = TrainConfig(
        **TINY_CONFIG, validation_fraction=0, epochs=3, batch_size=2, lr=1e-2, seed=0
    )
    model = fit(dataclasses.replace(config, out=str(tmp_path), progress=False), structures)
    torch.manual_seed(0)
    with default_dtype(torch.float64):
        reference = EnergyModel([29], "8x0e + 4x1o", max_radius=4.5, num_layers=1, num_heads=2)
    losses = train_energy_model(
        reference, structures, epochs=3, batch_size=2, lr=1e-2, force_weight=0.1, seed=0
    )
    assert [r["train_loss"] for r in records(tmp_path, "epoch")] == losses
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters()))


def test_plot_log_draws_the_loss_and_the_validation_errors(tmp_path):
    config = TrainConfig(
        **TINY_CONFIG, epochs=2, batch_size=4, log_every=1, progress=False, out=str(tmp_path)
    )
    fit(config, emt_clusters(10, shells=(2,), seed=1))
    figure = plot_log(tmp_path)
    loss, energy, force = figure.axes
    assert len(loss.lines[0].get_xdata()) == 4  # 8 training clusters, 2 steps an epoch
    assert len(energy.lines[0].get_xdata()) == 2 and len(force.lines) == 2


def test_without_tqdm_training_runs_and_says_there_is_no_progress_bar(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm: ImportError
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # where a bar would be shown
    config = TrainConfig(**TINY_CONFIG, epochs=1, batch_size=4, out=str(tmp_path))
    with pytest.warns(UserWarning, match="no progress bar: tqdm is not installed"):
        fit(config, emt_clusters(10, shells=(2,), seed=1))
    assert len(records(tmp_path, "epoch")) == 1


def test_deterministic_trains_under_torchs_deterministic_algorithms_then_restores(
    tmp_path, monkeypatch
):
    """--deterministic, for GPU runs that repeat: on the CPU (where runs repeat anyway) this
    checks the settings are in force while training, that nothing in a training step lacks a
    deterministic algorithm on the CPU, and that the settings are undone afterwards."""
    from se3tutor.graph import available_backends
    from se3tutor.train import loop

    monkeypatch.delenv("SE3TUTOR_BACKEND", raising=False)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    seen = {}

    def recording_fit(*args):
        seen["algorithms"] = torch.are_deterministic_algorithms_enabled()
        seen["scatter"] = available_backends()["scatter"]
        seen["cublas"] = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
        return original_fit(*args)

    original_fit = loop._fit
    monkeypatch.setattr(loop, "_fit", recording_fit)
    config = TrainConfig(
        **TINY_CONFIG, epochs=1, batch_size=4, deterministic=True, out=str(tmp_path)
    )
    fit(config, emt_clusters(6, shells=(2,), seed=1))
    assert seen == {"algorithms": True, "scatter": "torch", "cublas": ":4096:8"}
    assert len(records(tmp_path, "epoch")) == 1
    assert not torch.are_deterministic_algorithms_enabled()
    assert "SE3TUTOR_BACKEND" not in os.environ and "CUBLAS_WORKSPACE_CONFIG" not in os.environ


def test_deterministic_refuses_the_compiled_scatter_by_name(tmp_path, monkeypatch):
    monkeypatch.setenv("SE3TUTOR_BACKEND", "pyg")
    config = TrainConfig(**TINY_CONFIG, epochs=1, deterministic=True, out=str(tmp_path))
    with pytest.raises(SetupError, match="deterministic needs the pure-torch scatter"):
        fit(config, emt_clusters(6, shells=(2,), seed=1))
    assert not torch.are_deterministic_algorithms_enabled()


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["e3nn", "cuequivariance"])
def test_the_compiled_model_gives_the_energies_and_forces_of_the_eager_one(monkeypatch, backend):
    """On cuequivariance (its plain-torch fallback on the CPU) the products build their
    cuequivariance modules before compiling: built inside the compiled forward, dynamo failed."""
    if backend == "cuequivariance" and not cuequivariance_available():
        pytest.skip("cuequivariance-torch is not installed")
    monkeypatch.setenv("SE3TUTOR_BACKEND", "torch")
    with default_dtype(torch.float64):
        model = EnergyModel([29], "8x0e + 8x1o", max_radius=4.0, num_layers=1, num_heads=2)
    use_backend(model, backend)
    model.eval()
    data = collate(emt_clusters(2, shells=(2,), seed=2), [29], torch.float64)
    inputs = (data["pos"], data["species_index"], data["batch"], 2)
    start = time.perf_counter()
    compiled = compile_for_inference(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # graph breaks, reported by torch._dynamo
        energy, forces = compiled(*inputs)
    print(f"torch.compile and first call: {time.perf_counter() - start:.0f} s")
    expected_energy, expected_forces = model(*inputs)
    torch.testing.assert_close(energy, expected_energy, rtol=0, atol=1e-12)
    torch.testing.assert_close(forces, expected_forces, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "option, message",
    [
        (["--irreps-hidden", "foo"], "irreps_hidden 'foo' are not irreps"),
        (["--irreps-hidden", "4x1o"], "need 0e"),
        (["--max-radius", "-1"], "max_radius must be > 0"),
        (["--num-heads", "0"], "num_heads must be >= 1"),
        (["--validation-fraction", "-0.5"], r"validation_fraction must be in \[0, 1\)"),
        (["--lr", "inf"], "lr must be a finite number, got inf"),
        (["--force-weight", "inf"], "force_weight must be a finite number"),
        (["--max-radius", "inf"], "max_radius must be a finite number"),
        (["--lr", "nan"], "lr must be a finite number, got nan"),
        (["--seed", "-1"], "seed must be >= 0"),
        (["--shells", "0"], "shells must each be >= 2"),
        (["--stress-weight", "-1"], "stress_weight must be >= 0"),
        (["--crystals", "-2"], "crystals must be >= 0"),
    ],
)
def test_the_command_line_refuses_bad_options_by_name(tmp_path, capsys, option, message):
    assert main([*TINY, *option, "--out", str(tmp_path)]) == 2
    assert re.search(f"se3tutor.train: error: .*{message}", capsys.readouterr().err)
    assert not (tmp_path / "log.jsonl").exists()  # refused before anything started


def test_a_second_run_on_the_same_directory_is_refused_and_a_finished_run_is_left_alone(
    tmp_path,
):
    import fcntl

    config = TrainConfig(**TINY_CONFIG, epochs=1, batch_size=4, progress=False, out=str(tmp_path))
    structures = emt_clusters(6, shells=(2,), seed=1)
    with open(tmp_path / ".lock", "a") as held:  # as a run in progress holds it
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(SetupError, match="another run is writing to"):
            fit(config, structures)
    fit(config, structures)
    saved = {path: path.stat().st_mtime_ns for path in tmp_path.glob("checkpoint-*")}
    fit(config, structures)  # finished: resumes at the end, and rewrites no checkpoint
    assert {path: path.stat().st_mtime_ns for path in tmp_path.glob("checkpoint-*")} == saved
    assert [r["event"] for r in read_log(tmp_path)][-2:] == ["resume", "end"]
    with pytest.raises(ValueError, match="keep must be >= 1"):
        save_checkpoint({"step": 1}, tmp_path, 1, keep=0)


def test_an_out_that_is_a_file_is_refused_by_name(tmp_path, capsys):
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("")
    assert main([*TINY, "--out", str(not_a_directory)]) == 2
    assert re.search(
        r"se3tutor.train: error: cannot use .*file for the run", capsys.readouterr().err
    )


def test_a_diverging_run_stops_with_an_error_and_keeps_its_last_good_checkpoint(tmp_path, capsys):
    # An enormous learning rate: the first update makes the parameters huge, the next loss
    # is not finite. The run stops (exit 1), writes no model, and the checkpoint stays good.
    options = ["--num-structures", "6", "--validation-fraction", "0", "--batch-size", "2"]
    options += ["--lr", "1e300", "--checkpoint-every", "1", "--epochs", "3"]
    assert main([*TINY, *options, "--out", str(tmp_path)]) == 1
    assert re.search(r"step \d+: the loss is (nan|inf)", capsys.readouterr().err)
    assert not (tmp_path / "model.pt").exists()
    state, _ = load_latest_checkpoint(tmp_path)
    assert all(torch.isfinite(value).all() for value in state["model"].values())


def test_when_every_checkpoint_is_corrupt_the_run_is_refused_not_restarted(tmp_path):
    config = TrainConfig(**TINY_CONFIG, epochs=1, batch_size=2, progress=False, out=str(tmp_path))
    structures = emt_clusters(6, shells=(2,), seed=1)
    fit(config, structures)
    log_before = (tmp_path / "log.jsonl").read_text()
    for checkpoint in tmp_path.glob("checkpoint-*.pt"):
        checkpoint.write_bytes(b"garbage")
    with pytest.warns(UserWarning), pytest.raises(SetupError, match="every checkpoint .* corrupt"):
        fit(config, structures)
    assert (tmp_path / "log.jsonl").read_text() == log_before  # not cut, not restarted


def test_a_new_checkpoint_keeps_the_newest_intact_one_and_drops_corrupt_ones(tmp_path):
    def save(step):
        return save_checkpoint({"step": step}, tmp_path, step)

    for step in (10, 20, 30):
        save(step)  # keeps 20 and 30
    (tmp_path / "checkpoint-00000030.pt").write_bytes(b"garbage")
    save(40)
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == [
        "checkpoint-00000020.pt",  # the newest intact older one, not the corrupt 30
        "checkpoint-00000040.pt",
    ]
    # Corrupt checkpoints of later steps (left by an earlier run) do not push a new one out.
    for step in (70, 80):
        (tmp_path / f"checkpoint-{step:08d}.pt").write_bytes(b"garbage")
    path = save(50)
    assert path.exists() and not (tmp_path / "checkpoint-00000080.pt").exists()


def start_and_signal(command, out, signum):
    """Start a run, send ``signum`` once it has logged two steps; its completed process."""
    process = subprocess.Popen(command, env=ENVIRONMENT, stderr=subprocess.PIPE, text=True)
    while process.poll() is None:
        time.sleep(0.01)
        if len([r for r in complete_records(out) if r["event"] == "step"]) >= 2:
            process.send_signal(signum)
            break
    _, stderr = process.communicate(timeout=120)
    return process.returncode, stderr


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_and_ctrl_c_exits_without_a_traceback(tmp_path):
    options = ["--num-structures", "40", "--epochs", "20", "--batch-size", "2"]
    options += ["--log-every", "1", "--checkpoint-every", "1000"]
    out = tmp_path / "term"
    command = [*TRAIN, *TINY, *options, "--out", str(out)]
    status, stderr = start_and_signal(command, out, signal.SIGTERM)
    assert status == 143, stderr
    assert "stopped by SIGTERM after step" in stderr and "Traceback" not in stderr
    [stopped] = records(out, "stopped")
    assert records(out, "checkpoint")[-1]["step"] == stopped["step"]  # saved at that step
    assert load_latest_checkpoint(out)[0]["step"] == stopped["step"]

    out = tmp_path / "interrupt"
    status, stderr = start_and_signal(
        [*TRAIN, *TINY, *options, "--out", str(out)], out, signal.SIGINT
    )
    assert status == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr


def write_structures(path, structures):
    write(path, structures, format="extxyz")
    return str(path)


def test_resuming_checks_the_data_by_contents_not_by_path(tmp_path):
    structures = emt_clusters(6, shells=(2,), seed=1)
    first = write_structures(tmp_path / "a.extxyz", structures)
    again = write_structures(tmp_path / "b.extxyz", structures)  # the same data, another path
    options = dict(**TINY_CONFIG, epochs=1, batch_size=2, progress=False)
    fit(TrainConfig(**options, data=first, out=str(tmp_path / "run")))
    fit(TrainConfig(**options, data=again, out=str(tmp_path / "run")))  # resumes, finished
    assert records(tmp_path / "run", "resume")
    changed = structures[3].copy()
    changed.positions[0, 0] += 0.01
    changed.calc = SinglePointCalculator(
        changed, energy=structures[3].get_potential_energy(), forces=structures[3].get_forces()
    )
    other = write_structures(tmp_path / "c.extxyz", [*structures[:3], changed, *structures[4:]])
    with pytest.raises(SetupError, match="run on other data"):
        fit(TrainConfig(**options, data=other, out=str(tmp_path / "run")))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda path: path.mkdir(), "is a directory: give a file of structures"),
        (lambda path: None, "no such file"),
        (lambda path: path.write_bytes(bytes(range(256)) * 4), "cannot read .* as structures"),
    ],
    ids=["directory", "missing", "binary"],
)
def test_data_that_is_not_a_file_of_structures_is_refused_saying_why(
    tmp_path, capsys, make, message
):
    path = tmp_path / "data.extxyz"
    make(path)
    assert main([*TINY, "--data", str(path), "--out", str(tmp_path / "run")]) == 2
    assert re.search(f"se3tutor.train: error: .*{message}", capsys.readouterr().err)


def test_more_processes_than_gpus_are_refused_on_every_process(monkeypatch):
    from se3tutor.train import distributed

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    for rank in ("0", "1"):
        monkeypatch.setenv("LOCAL_RANK", rank)
        with pytest.raises(ValueError, match="2 processes per machine but 1 GPU"):
            distributed.start("cuda")


def test_training_on_crystals_from_a_file_fits_their_stress(tmp_path):
    """Periodic structures with a stress in an extxyz file: trained with their cells (the
    periodic graph) and a stress term; the validation reports the stress error."""
    from se3tutor.calculator import SE3Calculator
    from se3tutor.data import emt_bulk
    from se3tutor.train import load_model

    structures = emt_clusters(2, shells=(2,), seed=1) + emt_bulk(3, repeat=(1, 1, 1), seed=1)
    write(tmp_path / "mixed.extxyz", structures)
    options = ["--data", str(tmp_path / "mixed.extxyz"), "--validation-fraction", "0.4"]
    options += ["--epochs", "2", "--batch-size", "3", "--log-every", "1"]
    done = run([*TRAIN, *TINY[2:], *options, "--out", str(tmp_path / "run")])
    assert done.returncode == 0, done.stderr
    steps = records(tmp_path / "run", "step")
    assert any(step["stress_term"] > 0 for step in steps)
    for step in steps:  # the logged loss is the sum of its weighted terms
        total = step["energy_term"] + 0.1 * step["force_term"] + step["stress_term"]
        assert step["loss"] == pytest.approx(total, rel=1e-12)
    assert re.search(r"stress MAE [\d.]+ GPa", done.stdout), done.stdout
    crystal = structures[-1].copy()
    crystal.calc = SE3Calculator(load_model(tmp_path / "run"))
    assert crystal.get_stress().shape == (6,)


@pytest.mark.slow
def test_two_processes_take_the_steps_of_one_on_crystals(tmp_path):
    """The stress term is normalised by the whole batch's counts too: 2 processes = 1."""
    options = ["--num-structures", "2", "--crystals", "3", "--validation-fraction", "0"]
    options += ["--epochs", "1", "--batch-size", "5", "--log-every", "1"]
    one = run([*TRAIN, *TINY, *options, "--out", str(tmp_path / "one")])
    two = run(
        [*TORCHRUN, "--nproc_per_node", "2", "-m", "se3tutor.train", *TINY, *options]
        + ["--out", str(tmp_path / "two")]
    )
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    (single,), (double,) = records(tmp_path / "one", "step"), records(tmp_path / "two", "step")
    assert single["stress_term"] > 0
    for key in ("loss", "energy_term", "force_term", "stress_term", "gradient_norm"):
        assert single[key] == pytest.approx(double[key], rel=1e-12, abs=0), key


@pytest.mark.slow
def test_under_torchrun_a_refusal_reaches_every_rank_as_one_clear_message(tmp_path):
    """The lock is taken by rank 0 only; the others hear its refusal through the process group
    and exit the same way (2, the same line), instead of hanging or raising from gloo."""
    import fcntl

    with open(tmp_path / ".lock", "a") as held:  # as a run in progress holds it
        fcntl.flock(held, fcntl.LOCK_EX)
        done = run(
            [*TORCHRUN, "--nproc_per_node", "2", "-m", "se3tutor.train", *TINY]
            + ["--num-structures", "4", "--epochs", "1", "--out", str(tmp_path)]
        )
    message = f"se3tutor.train: error: cannot use {tmp_path} for the run: another run is writing"
    # Each rank that gets to print prints this line (torchrun may stop the second one first).
    assert done.stderr.count(message) >= 1, done.stderr
    # torchrun's summary: the first rank to exit 2 is reported (the other may be stopped
    # by torchrun before it exits by itself), and no rank's traceback from se3tutor or gloo.
    assert "exitcode  : 2" in done.stderr
    assert "se3tutor/train" not in done.stderr
    assert "gloo" not in done.stderr.lower() and "ProcessGroup" not in done.stderr
