"""What a training run of :mod:`se3tutor.train` shows and leaves behind: the log file
``log.jsonl`` (:class:`RunLog`, read back by :func:`read_log`, drawn by :func:`plot_log`), the
lines on the console and the progress bar.

Epochs are numbered from 1, in the log as on the console (``epoch 1/20``); steps count from 1
over the whole run. In a terminal, a progress bar shows the loss and the structures per
second from the first step on; elsewhere (stderr a file or a pipe) there is no bar, whose
``\\r`` frames would fill a file, and the same numbers come as plain lines on stdout, at the
steps that the log records.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

from se3tutor.train.config import WriteError

__all__ = [
    "RunLog",
    "console",
    "epoch_summary",
    "plot_log",
    "progress_bar",
    "read_log",
    "step_line",
    "versions",
]


def versions() -> dict:
    """The versions a run depends on: se3tutor, torch, e3nn and Python."""
    import e3nn
    import torch

    import se3tutor

    return {
        "se3tutor": se3tutor.__version__,
        "torch": torch.__version__,
        "e3nn": e3nn.__version__,
        "python": platform.python_version(),
    }


class RunLog:
    """``log.jsonl``: one JSON record a line, written by the main process only. Every record
    has its ``event``, its ``time`` (ISO 8601, UTC) and ``elapsed_s``, the seconds since this
    process opened the log (a resumed run starts again from 0 at its ``resume`` record).

    A resumed run cuts the file back to the size its checkpoint recorded (``cut_to``), so that
    the steps it repeats are not logged twice. A record that cannot be written whole (a full
    disk) is taken back, and :class:`~se3tutor.train.config.WriteError` raised: the file holds
    whole records only."""

    def __init__(self, path: Path, enabled: bool, cut_to: int) -> None:
        self.path = Path(path)
        self.started = time.monotonic()
        # Unbuffered: each record reaches the file in one write (a killed process leaves every
        # record it wrote), and one that fails leaves nothing in a buffer to retry later.
        self.file = open(path, "ab", buffering=0) if enabled else None
        if self.file:
            self.file.truncate(min(cut_to, self.size()))  # "ab": writes go to the (new) end

    def write(self, event: str, **record) -> None:
        if not self.file:
            return
        stamps = {
            "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "elapsed_s": round(time.monotonic() - self.started, 3),
        }
        line = (json.dumps({"event": event, **stamps, **record}) + "\n").encode()
        size = self.size()
        try:
            written = 0
            while written < len(line):  # a raw write may write less than it was given
                written += self.file.write(line[written:])
        except OSError as error:
            self.file.truncate(size)  # no half record (truncating frees space, needs none)
            raise WriteError(f"cannot write the log {self.path}: {error}") from None

    def size(self) -> int:
        return os.fstat(self.file.fileno()).st_size if self.file else 0

    def close(self) -> None:
        if self.file:
            self.file.close()


def read_log(path) -> list:
    """The records of a training log (``log.jsonl``, or the run's directory)."""
    path = Path(path)
    path = path / "log.jsonl" if path.is_dir() else path
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_log(path):
    """A matplotlib figure of a training log: the loss (every logged step, and the mean of
    every epoch), the validation energy MAE per atom, and the validation force MAE and RMSE.

    ``path``: ``log.jsonl``, or the run's directory.
    """
    import matplotlib.pyplot as plt

    records = read_log(path)
    steps = [r for r in records if r["event"] == "step"]
    epochs = [r for r in records if r["event"] == "epoch"]
    validated = [r for r in epochs if "force_mae" in r]
    figure, (loss_axes, energy_axes, force_axes) = plt.subplots(1, 3, figsize=(13, 3.6))
    loss_axes.semilogy(
        [r["step"] for r in steps], [r["loss"] for r in steps], lw=0.8, alpha=0.6, label="batch"
    )
    loss_axes.semilogy(
        [r["step"] for r in epochs], [r["train_loss"] for r in epochs], "o-", label="epoch mean"
    )
    loss_axes.set(xlabel="step", ylabel="training loss")
    loss_axes.legend()
    epoch_numbers = [r["epoch"] for r in validated]
    energy_axes.plot(epoch_numbers, [1000 * r["energy_mae_per_atom"] for r in validated], "o-")
    energy_axes.set(xlabel="epoch", ylabel="validation energy MAE (meV/atom)")
    force_axes.plot(epoch_numbers, [r["force_mae"] for r in validated], "o-", label="MAE")
    force_axes.plot(epoch_numbers, [r["force_rmse"] for r in validated], "s-", label="RMSE")
    force_axes.set(xlabel="epoch", ylabel="validation force error (eV/Å)")
    force_axes.legend()
    figure.tight_layout()
    return figure


def console(processes):
    """``say(text, bar=None)``: a line on the console from the main process (through the
    progress bar, when there is one, so that the bar stays below it)."""

    def say(text: str, bar=None) -> None:
        if processes.is_main:
            if bar is not None and not bar.disable:
                bar.write(text)
            else:
                print(text, flush=True)

    return say


def step_line(step: int, steps: int, epoch: int, epochs: int, loss: float, speed: float) -> str:
    """The console's line for a step (when there is no progress bar); ``epoch`` from 1."""
    return (
        f"step {step}/{steps} (epoch {epoch}/{epochs}): loss {loss:.4g}, {speed:.1f} structures/s"
    )


def epoch_summary(epoch: int, epochs: int, train_loss: float, metrics: dict) -> str:
    """The console's line after epoch number ``epoch`` (from 1) of ``epochs``."""
    text = f"epoch {epoch}/{epochs}: training loss {train_loss:.4g}"
    if metrics:
        text += (
            f"; validation energy MAE {1000 * metrics['energy_mae_per_atom']:.1f} meV/atom, "
            f"force MAE {metrics['force_mae']:.3f} eV/Å, RMSE {metrics['force_rmse']:.3f} eV/Å"
        )
        if "stress_mae" in metrics:  # eV/Å³ -> GPa
            text += f", stress MAE {metrics['stress_mae'] * 160.21766:.2f} GPa"
    return text


class _NoProgressBar:
    """What the loop calls on a progress bar, doing nothing."""

    disable = True

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **values) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total_steps: int, done: int, enabled: bool):
    """A tqdm progress bar of ``total_steps`` steps, ``done`` of them done, when ``enabled``,
    stderr is a terminal and tqdm is installed; otherwise one that shows nothing (and whose
    ``disable`` tells the loop to print plain lines instead)."""
    if not (enabled and sys.stderr.isatty()):
        return _NoProgressBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        warnings.warn("no progress bar: tqdm is not installed (pip install tqdm)", stacklevel=3)
        return _NoProgressBar()
    return tqdm(total=total_steps, initial=done, unit="step", dynamic_ncols=True)
