r"""The training loop of ``python -m se3tutor.train``, in one process or several
(book: Learning an interatomic potential).

.. code-block:: bash

    python -m se3tutor.train --data emt --num-structures 500 --epochs 20 --out runs/cu
    python -m se3tutor.train --data mine.extxyz --irreps-hidden "32x0e + 16x1o" --num-layers 2
    torchrun --standalone --nproc_per_node 4 -m se3tutor.train --data emt --out runs/cu4

The model, loss and optimiser are those of :func:`se3tutor.potential.train_energy_model` (an
:class:`~se3tutor.potential.EnergyModel`, :func:`~se3tutor.potential.energy_force_loss`,
Adam with a cosine decay); around them this module adds what a longer run needs:

- **data**: ``--data emt`` makes EMT clusters, any other value is a file of ase ``Atoms`` with
  energies and forces (``ase.io.read(path, ":")``); every structure is checked before training
  (:func:`se3tutor.data.check_structures`), a bad one named in the error;
- **a validation set** (``--validation-fraction``): energy MAE per atom and force MAE and RMSE
  after every epoch;
- **a log**, ``OUT/log.jsonl``, one JSON record a line (``"event"``: ``start``, ``step`` at
  step 1 and every ``--log-every`` steps, ``epoch``, ``checkpoint``, ``resume``, ``extend``,
  ``end``), each with its time (UTC) and the seconds since the process started; the first of
  each process (``start``, ``resume``) with the versions of se3tutor, torch, e3nn and Python.
  :func:`plot_log` draws it. Epochs are numbered from 1, in the log as on the console. In a
  terminal, a progress bar with the loss and the structures per second from the first step;
  elsewhere, plain lines with the same numbers (:mod:`se3tutor.train.runlog`);
- **checkpoints** every ``--checkpoint-every`` steps and at the end
  (:mod:`se3tutor.train.checkpoint`): a run that is killed and started again with the same
  command continues where its last checkpoint was, and ends with the parameters that an
  uninterrupted run ends with, to the bit (on a CPU with one thread). **More epochs**: the
  same command with a larger ``--epochs`` extends a finished run (it says so, and logs an
  ``extend`` record): the extra epochs restart the learning rate's cosine decay, from
  ``--lr`` to 0 over the new steps (``--lr`` may differ from the run's: a smaller one disturbs
  the trained model less), and keep Adam's moments (so the result is not that of a run
  started with the larger ``--epochs``, whose decay would be longer). Another
  ``--epochs`` for an unfinished run, or fewer for a finished one, is refused;
- **a full disk** (or any failure to write the log, a checkpoint or the model) ends the run
  with exit status 2 and a message naming the file; nothing half-written is left, and the
  last checkpoint is intact, to continue from;
- **several processes** under ``torchrun`` (:mod:`se3tutor.train.distributed`): each takes a
  shard of every global batch of ``--batch-size`` structures, and the steps are those of one
  process;
- **repeatability**: on a CPU a run repeats bit for bit. On a GPU, atomic additions (scatter,
  ``index_add_``) sum in a varying order and runs differ in the last bits, growing over the
  steps; ``--deterministic`` switches torch to its deterministic algorithms (and cuBLAS to a
  fixed workspace, the scatter to pure torch), slower, so that GPU runs repeat too;
- the trained model, ``OUT/model.pt``, which :func:`load_model` reads back.

On several machines, start the same command on each, with the rendezvous on one of them
(``OUT`` must be a directory that all of them see, since every process reads the
checkpoint it resumes from):

.. code-block:: bash

    torchrun --nnodes 2 --nproc_per_node 4 --rdzv_backend c10d \
        --rdzv_endpoint HOST:29500 --rdzv_id cu-run -m se3tutor.train --data emt --out /shared/cu

From Python, :func:`fit` takes a :class:`TrainConfig` (and optionally a list of structures)
and returns the trained model; :func:`main` is the command line.

(Over 400 lines, on purpose: one run from start to end, read top to bottom, as nanoGPT's
``train.py``; the options, checkpoints, resumption, log and processes are in the sibling
modules.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

from se3tutor.data import check_structures, collate, fingerprint
from se3tutor.graph import available_backends
from se3tutor.potential import (
    EnergyModel,
    adam_with_cosine_decay,
    energy_force_loss,
    fit_reference_energies,
    steps_per_epoch,
)
from se3tutor.train import distributed
from se3tutor.train.checkpoint import (
    newest_intact_checkpoint,
    random_states,
    save_checkpoint,
    set_random_states,
    write_atomically,
)
from se3tutor.train.config import (
    DTYPES,
    SetupError,
    Stopped,
    TrainConfig,
    TrainingError,
    WriteError,
    check_config,
    config_from_args,
)
from se3tutor.train.data import load_structures, split
from se3tutor.train.model import (
    build_model,
    compile_for_inference,
    evaluate,
    model_options,
)
from se3tutor.train.resume import checkpoint_to_resume, restarted_schedule
from se3tutor.train.runlog import (
    RunLog,
    console,
    epoch_summary,
    progress_bar,
    step_line,
    versions,
)

__all__ = ["deterministic_algorithms", "fit", "main"]

# ---------------------------------------------------------------------------- one step, one epoch


@dataclass(frozen=True)
class _Session:
    """What every step of a run reads, besides the run's own state (:class:`_Run`)."""

    config: TrainConfig
    processes: distributed.Processes
    species: list  # atomic numbers the model knows
    trained: torch.nn.Module  # the model, wrapped in DistributedDataParallel for several
    log: RunLog
    bar: object  # the progress bar (se3tutor.train.runlog.progress_bar)
    say: object  # a line on the console (se3tutor.train.runlog.console)
    data_sha256: str  # se3tutor.data.fingerprint of the structures, checked on resume
    start_step: int  # the step this process started from (0, or that of its checkpoint)
    total_steps: int  # of the whole run
    stop: threading.Event = dataclasses.field(default_factory=threading.Event)  # by SIGTERM

    def as_batch(self, structures: Sequence) -> dict:
        """``structures`` collated onto this process's device, in the run's dtype."""
        dtype = DTYPES[self.config.dtype]
        return collate(structures, self.species, dtype, self.processes.device)


def _train_step(run: _Run, session: _Session, structures: Sequence) -> torch.Tensor:
    """One optimiser step on a global batch of ``structures`` (every process passes all of
    them and takes its shard). Returns ``[loss, energy term, force term, stop]`` of the global
    batch (``stop`` > 0 when a process was asked to stop, by SIGTERM).
    """
    counts = dict(num_graphs=len(structures), num_atoms=sum(len(atoms) for atoms in structures))
    processes = session.processes
    mine = distributed.shard(structures, processes)
    # DDP averages the gradients over the processes; each backpropagates world_size times its
    # part of the loss, so that the average is the gradient of the sum (se3tutor.train.distributed).
    weight = processes.world_size
    if not mine:  # a last batch with fewer structures than processes: a stand-in of weight 0,
        mine, weight = structures[:1], 0  # since every process must take part in the step
    config = session.config
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=config.amp):
        loss = energy_force_loss(
            session.trained,
            session.as_batch(mine),
            config.force_weight,
            **counts,
            stress_weight=config.stress_weight,
        )
    run.optimizer.zero_grad()
    (loss.total * weight).backward()
    run.optimizer.step()
    run.schedule.step()
    terms = torch.stack(list(loss)).detach()
    terms = terms if weight else torch.zeros_like(terms)
    # The stop request travels with the sums, so that every process stops after this step.
    stop = terms.new_tensor([float(session.stop.is_set())])
    return distributed.all_sum(torch.cat([terms, stop]))


@torch.no_grad()
def _gradient_norm(model) -> torch.Tensor:
    norms = [p.grad.norm() for p in model.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms))


# ---------------------------------------------------------------------------- the run


_POSITION = ("epoch", "batch", "step", "order", "epoch_loss")  # where a run is


@dataclass
class _Run:
    """What a run is at a step, and all that its checkpoint holds: in ``epoch``, ``batch``
    global batches of the epoch's ``order`` are done (``order`` is ``None`` until drawn);
    ``step`` counts all steps; ``epoch_loss`` sums loss times batch size over the epoch."""

    model: EnergyModel
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    generator: torch.Generator  # draws the order of each epoch
    epoch: int = 0
    batch: int = 0
    step: int = 0
    order: Optional[torch.Tensor] = None
    epoch_loss: float = 0.0

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "generator": self.generator.get_state(),
            **{name: getattr(self, name) for name in _POSITION},
            "random": random_states(),  # not used by the training; for code that adds some
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.generator.set_state(state["generator"])
        for name in _POSITION:
            setattr(self, name, state[name])
        set_random_states(state["random"])


def _what_is_intact(out: Path) -> str:
    newest = newest_intact_checkpoint(out)
    if newest is None:
        return "no checkpoint was saved yet: free some space, then run the same command"
    return f"{newest} is intact: free some space, then run the same command to continue"


def fit(config: TrainConfig, structures: Optional[Sequence] = None) -> EnergyModel:
    """Train as ``config`` says, on ``structures`` (a list of ase ``Atoms``; default: those of
    ``config.data``). Returns the trained model, in eval mode, on every process. Raises
    :class:`SetupError` before training for bad data or options."""
    check_config(config)
    if structures is None:
        structures = load_structures(config)
    else:
        try:
            check_structures(structures)
        except ValueError as error:
            raise SetupError(str(error)) from None
    training, validation = split(structures, config.validation_fraction, config.seed)
    if config.compile:  # torch.compile cannot trace torch-scatter (see compile_for_inference)
        os.environ.setdefault("SE3TUTOR_BACKEND", "torch")
    if config.threads:
        torch.set_num_threads(config.threads)
    with deterministic_algorithms(config.deterministic):
        try:
            processes = distributed.start(config.device)
        except ValueError as error:
            raise SetupError(str(error)) from None
        try:
            return _fit(config, processes, training, validation)
        finally:
            distributed.stop()


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool = True):
    """``--deterministic``: within the block, torch's deterministic algorithms
    (``torch.use_deterministic_algorithms``; an operation that has none raises), cuBLAS with a
    fixed workspace (``CUBLAS_WORKSPACE_CONFIG=:4096:8``, read when CUDA starts) and the
    pure-torch scatter (``SE3TUTOR_BACKEND=torch``: torch-scatter's CUDA kernels add in a
    varying order). Each setting is restored afterwards; an environment variable already set
    is kept, and ``SE3TUTOR_BACKEND=pyg`` is refused."""
    if not enabled:
        yield
        return
    if os.environ.get("SE3TUTOR_BACKEND", "torch") != "torch":
        raise SetupError(
            "deterministic needs the pure-torch scatter, but SE3TUTOR_BACKEND="
            f"{os.environ['SE3TUTOR_BACKEND']}: unset it (torch-scatter's CUDA kernels add in "
            "a varying order)"
        )
    variables = {"SE3TUTOR_BACKEND": "torch", "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    before = {name: os.environ.get(name) for name in variables}
    was_enabled = torch.are_deterministic_algorithms_enabled()
    for name, value in variables.items():
        os.environ.setdefault(name, value)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was_enabled)
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)


def _lock(out: Path):
    """Hold an exclusive lock on ``out/.lock`` (released when the returned file is closed, or
    the process ends): two runs writing into one directory would cut each other's log and
    delete each other's files."""
    file = open(out / ".lock", "a")
    try:
        import fcntl  # POSIX; elsewhere, no lock
    except ImportError:
        return file
    try:
        fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        file.close()
        message = f"another run is writing to {out}: wait for it, or choose another out"
        raise SetupError(message) from None
    return file


def _fit(config, processes, training, validation) -> EnergyModel:
    out = Path(config.out)
    lock, refusal = None, None
    if processes.is_main:
        try:
            out.mkdir(parents=True, exist_ok=True)
            lock = _lock(out)
        except (SetupError, OSError) as error:
            refusal = f"cannot use {out} for the run: {error}"
    refusal = distributed.from_main(refusal)  # the same message on every process
    if refusal is not None:
        raise SetupError(refusal)
    try:
        return _fit_locked(config, processes, training, validation, out)
    except WriteError as error:
        raise WriteError(f"{error}; {_what_is_intact(out)}") from None
    finally:
        if lock is not None:
            lock.close()


def _fit_locked(config, processes, training, validation, out: Path) -> EnergyModel:
    species = sorted({int(z) for atoms in training + validation for z in atoms.numbers})
    options = model_options(config, species)
    torch.manual_seed(config.seed)  # the initial parameters (DDP copies rank 0's to the others)
    model = build_model(options, config.dtype).to(processes.device)
    total_steps = config.epochs * steps_per_epoch(len(training), config.batch_size)
    optimizer, schedule = adam_with_cosine_decay(model, config.lr, total_steps)
    run = _Run(model, optimizer, schedule, torch.Generator().manual_seed(config.seed))

    data_sha256 = fingerprint(training + validation)
    found = checkpoint_to_resume(config, out, processes, data_sha256)
    if found is None:
        fit_reference_energies(model, training)
    else:
        run.load_state_dict(found[0])
    log = RunLog(out / "log.jsonl", processes.is_main, cut_to=found[0]["log_bytes"] if found else 0)
    try:
        _start_or_resume(config, processes, run, log, found, len(training), len(validation), out)
        if processes.world_size > 1:  # averages the gradients in backward
            trained = torch.nn.parallel.DistributedDataParallel(model)
        else:
            trained = model
        evaluation_model = compile_for_inference(model) if config.compile else model
        bar = progress_bar(total_steps, run.step, config.progress and processes.is_main)
        say = console(processes)
        session = _Session(
            config, processes, species, trained, log, bar, say, data_sha256, run.step, total_steps
        )
        with _stop_on_sigterm(session.stop):
            _train_epochs(run, session, training, validation, evaluation_model)
        model.eval()
        finished_before = found is not None and found[0]["epoch"] >= config.epochs
        _check_finite(model, run.step)
        if processes.is_main:
            if not finished_before:
                _save_checkpoint(run, session)
            _save_model(model, options, config.dtype, out)
            log.write("end", step=run.step)
            say(f"trained model: {out / 'model.pt'} (se3tutor.train.load_model reads it back)")
    finally:
        log.close()
    return model


def _start_or_resume(config, processes, run, log, found, num_training, num_validation, out):
    """The first records of the log and lines on the console: a new run, a resumed one, or a
    finished one that more epochs extend (its learning-rate schedule started again)."""
    say = console(processes)
    if found is None:
        log.write(
            "start",
            versions=versions(),
            world_size=processes.world_size,
            config=asdict(config),
            num_training=num_training,
            num_validation=num_validation,
        )
        parameters = sum(p.numel() for p in run.model.parameters())
        say(
            f"training on {num_training} structures, validating on {num_validation}; "
            f"{parameters:,} parameters; {processes.world_size} process(es) on "
            f"{processes.device}; log, checkpoints and model in {out}"
        )
        return
    log.write(
        "resume",
        versions=versions(),  # this process's, which may differ from the start's
        step=run.step,
        file=found[1].name,
        world_size=processes.world_size,
    )
    before = found[0]["config"]["epochs"]
    if before < config.epochs:  # finished (check_epochs): more epochs extend it
        new_steps = (config.epochs - before) * steps_per_epoch(num_training, config.batch_size)
        run.schedule = restarted_schedule(run.optimizer, config.lr, new_steps)
        log.write("extend", step=run.step, from_epochs=before, epochs=config.epochs)
        say(
            f"extending the finished run of {before} epoch{'s' if before > 1 else ''} to "
            f"{config.epochs} epochs ({found[1]}, step {run.step}): {new_steps} more steps, "
            f"the learning rate's cosine decay from {config.lr:g} to 0 started again"
        )
    elif run.epoch < config.epochs:
        say(f"resuming from {found[1]} at step {run.step} (epoch {run.epoch + 1})")
    else:
        say(f"{found[1]} ends the run (step {run.step}): nothing left to train")


def _save_model(model: EnergyModel, options: dict, dtype: str, out: Path) -> None:
    """``out/model.pt``, which :func:`se3tutor.train.load_model` reads back."""
    state_dict = {key: value.cpu() for key, value in model.state_dict().items()}
    buffer = io.BytesIO()
    torch.save({"options": options, "dtype": dtype, "state_dict": state_dict}, buffer)
    try:
        write_atomically(out / "model.pt", buffer.getvalue())
    except OSError as error:
        raise WriteError(f"cannot write the model {out / 'model.pt'}: {error}") from None


def _train_epochs(run, session, training, validation, evaluation_model) -> None:
    """The epochs from ``run.epoch`` on, each followed by a validation and its log lines."""
    config, model, log, bar = session.config, run.model, session.log, session.bar
    while run.epoch < config.epochs:
        _train_epoch(run, session, training)
        metrics = {}
        if validation:
            if evaluation_model is not model:
                evaluation_model.load_state_dict(model.state_dict())
            metrics = evaluate(evaluation_model, validation, config.batch_size, session.processes)
        train_loss = run.epoch_loss / len(training)
        number = run.epoch + 1  # from 1, in the log as on the console
        log.write("epoch", epoch=number, step=run.step, train_loss=train_loss, **metrics)
        session.say(epoch_summary(number, config.epochs, train_loss, metrics), bar)
        run.epoch, run.batch, run.order, run.epoch_loss = run.epoch + 1, 0, None, 0.0
    bar.close()


@contextlib.contextmanager
def _stop_on_sigterm(stop: threading.Event):
    """While training, SIGTERM (a scheduler's notice) sets ``stop`` instead of killing the
    process: the run saves a checkpoint after the current step and ends."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _train_epoch(run: _Run, session: _Session, training: Sequence) -> None:
    """The rest of the epoch ``run.epoch``: its global batches from ``run.batch`` on."""
    config = session.config
    if run.order is None:  # the epoch's order, the same on every process
        run.order = torch.randperm(len(training), generator=run.generator)
    num_batches = steps_per_epoch(len(training), config.batch_size)
    session.trained.train()
    window_start, window_structures = time.perf_counter(), 0
    while run.batch < num_batches:
        first = run.batch * config.batch_size
        batch = [training[int(i)] for i in run.order[first : first + config.batch_size]]
        lr = run.optimizer.param_groups[0]["lr"]
        terms = _train_step(run, session, batch)
        run.batch, run.step = run.batch + 1, run.step + 1
        loss, energy_term, force_term, stress_term, stop = terms.tolist()
        if not math.isfinite(loss):  # every process sees the same sums, and stops alike
            raise TrainingError(
                f"step {run.step}: the loss is {loss} (energy term {energy_term}, force term "
                f"{force_term}, stress term {stress_term}); stopped without saving, the last "
                f"checkpoint in {config.out} is intact. Try a smaller --lr or --force-weight."
            )
        run.epoch_loss += loss * len(batch)
        window_structures += len(batch)
        speed = window_structures / (time.perf_counter() - window_start)
        logged = run.step == 1 or run.step % config.log_every == 0
        if logged:
            session.log.write(
                "step",
                step=run.step,
                epoch=run.epoch + 1,
                loss=loss,
                energy_term=energy_term,
                force_term=force_term,
                stress_term=stress_term,
                lr=lr,
                gradient_norm=float(_gradient_norm(run.model)),
                structures_per_s=speed,
            )
        _show_step(
            run, session, loss, speed, first=run.step == session.start_step + 1, logged=logged
        )
        if logged:
            window_start, window_structures = time.perf_counter(), 0
        last = run.epoch == config.epochs - 1 and run.batch == num_batches  # saved after
        if stop:
            if session.processes.is_main:
                _save_checkpoint(run, session)
            session.log.write("stopped", step=run.step, signal="SIGTERM")
            raise Stopped(f"stopped by SIGTERM after step {run.step}, its checkpoint saved")
        if run.step % config.checkpoint_every == 0 and session.processes.is_main and not last:
            _save_checkpoint(run, session)


def _show_step(
    run: _Run, session: _Session, loss: float, speed: float, first: bool, logged: bool
) -> None:
    """The loss and speed on the console from the first step on: on the progress bar after
    every step, or without one, a line at the steps the log records and at this process's
    first."""
    bar = session.bar
    bar.update()
    if not bar.disable:
        bar.set_postfix(loss=f"{loss:.4g}", structures_per_s=f"{speed:.1f}")
    elif logged or first:
        epochs = session.config.epochs
        session.say(step_line(run.step, session.total_steps, run.epoch + 1, epochs, loss, speed))


def _check_finite(model: EnergyModel, step: int) -> None:
    """Refuse to save parameters that are not all finite (an update by an infinite step)."""
    bad = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise TrainingError(
            f"step {step}: parameters {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''} are "
            "not finite; stopped without saving them. Try a smaller --lr."
        )


def _save_checkpoint(run: _Run, session: _Session) -> None:
    _check_finite(run.model, run.step)
    config, log = session.config, session.log
    state = {
        **run.state_dict(),
        "config": asdict(config),
        "log_bytes": log.size(),
        "data_sha256": session.data_sha256,
        "graph_backends": available_backends(),
    }
    try:
        path = save_checkpoint(state, Path(config.out), run.step)
    except OSError as error:  # a full disk: save_checkpoint left no file of this step
        message = f"cannot write the checkpoint of step {run.step} in {config.out}: {error}"
        raise WriteError(message) from None
    log.write("checkpoint", step=run.step, file=path.name)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line: ``python -m se3tutor.train --help``. Returns the exit status, with
    a message on stderr: 2 for bad data or options and when the log, a checkpoint or the model
    cannot be written (a full disk), 1 when training diverges, 143 after SIGTERM (a checkpoint
    saved), 130 after Ctrl-C (SIGINT)."""
    config = config_from_args(argv)
    try:
        fit(config)
    except (SetupError, WriteError) as error:
        print(f"se3tutor.train: error: {error}", file=sys.stderr)
        return 2
    except TrainingError as error:
        print(f"se3tutor.train: error: {error}", file=sys.stderr)
        return 1
    except Stopped as error:
        print(f"se3tutor.train: {error}; run the same command to continue", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print(
            f"se3tutor.train: interrupted; the checkpoints in {config.out} are intact: run the "
            "same command to continue from the last one",
            file=sys.stderr,
        )
        return 128 + signal.SIGINT
    return 0
