"""Where a run of :mod:`se3tutor.train` starts: afresh, from the last intact checkpoint in its
``--out`` (with the same options and data), or, when more epochs are asked of a finished run,
from its end with the learning rate's cosine decay started again (used by
:mod:`se3tutor.train.loop`)."""

from __future__ import annotations

import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch

from se3tutor.graph import available_backends
from se3tutor.train import distributed
from se3tutor.train.checkpoint import load_latest_checkpoint, read_checkpoint
from se3tutor.train.config import HOW_NOT_WHAT, SetupError, TrainConfig

__all__ = ["check_epochs", "checkpoint_to_resume", "restarted_schedule"]


def checkpoint_to_resume(
    config: TrainConfig, out: Path, processes, data_sha256: str
) -> Optional[tuple]:
    """``(state, path)`` of the checkpoint to resume from, or ``None`` to start afresh. The
    main process chooses, and the others read the file it chose: each choosing for itself,
    processes on several machines could see different files and resume at different steps."""
    if not config.resume:
        if any(out.glob("checkpoint-*.pt")):
            raise SetupError(f"{out} holds checkpoints but resume is off: choose another out")
        return None
    decision = None
    if processes.is_main:
        found = load_latest_checkpoint(out)
        refusal = None
        if found is None and any(out.glob("checkpoint-*.pt")):
            refusal = (
                f"every checkpoint in {out} is corrupt or incomplete (see the warnings): move "
                "them away to start over, or choose another out"
            )
        decision = (found[1].name if found else None, refusal)
    chosen, refusal = distributed.from_main(decision)  # every process stops alike
    if refusal is not None:
        raise SetupError(refusal)
    if chosen is not None and not processes.is_main:
        found = read_checkpoint(out / chosen), out / chosen
    elif chosen is None:
        found = None
    if found is not None:
        # An option newer than the checkpoint had its default in the run that wrote it.
        saved, now = {**asdict(TrainConfig()), **found[0]["config"]}, asdict(config)
        check_epochs(found, config.epochs)
        # More epochs for a finished run may start their decay from another --lr.
        free = {"epochs", "lr"} if saved["epochs"] < config.epochs else {"epochs"}
        compared = [key for key in now if key not in HOW_NOT_WHAT | free]
        changed = [key for key in compared if saved[key] != now[key]]
        if changed:
            raise SetupError(
                f"{found[1]} was written by a run with other {', '.join(changed)}: "
                f"{ {key: saved[key] for key in changed} }; use the same options, or another out"
            )
        if found[0]["data_sha256"] != data_sha256:
            raise SetupError(
                f"{found[1]} was written by a run on other data (their contents differ from "
                f"{config.data}'s, whatever the file name): use the same data, or another out"
            )
        if found[0]["graph_backends"] != available_backends():
            warnings.warn(
                f"{found[1]} was written with the graph backends {found[0]['graph_backends']}, "
                f"this run has {available_backends()}: equal results up to rounding, but not "
                "bit for bit",
                stacklevel=2,
            )
    return found


def check_epochs(found: tuple, epochs: int) -> None:
    """Refuse ``epochs`` other than those of the run that wrote the checkpoint ``found``,
    unless that run is finished and ``epochs`` are more: then they extend it."""
    state, path = found
    before = state["config"]["epochs"]
    if epochs == before:
        return
    if state["epoch"] < before:
        raise SetupError(
            f"{path} belongs to a run of {before} epochs that is not finished (it stopped in "
            f"epoch {state['epoch'] + 1}): finish it with --epochs {before}, then give more "
            "epochs to extend it; or choose another out"
        )
    if epochs < before:
        raise SetupError(
            f"the run in {path.parent} finished {before} epochs; --epochs {epochs} is fewer: "
            f"give {before} (nothing left to train) or more (to extend it), or another out"
        )


def restarted_schedule(optimizer: torch.optim.Optimizer, lr: float, steps: int):
    """The learning rate's cosine decay from ``lr`` to 0 over ``steps`` more steps, for the
    epochs that extend a finished run (whose own decay ended at 0). Adam's moments are kept.
    """
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] = lr  # where the new schedule starts from
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
