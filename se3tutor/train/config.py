"""The options of a training run, written once: :class:`TrainConfig`'s fields carry their
defaults and their help text, and the command line (:func:`parser`) is derived from them.

A field's metadata says how it appears on the command line: ``help``, ``group`` (the section
of ``--help``), and, where the default does not tell, ``type``, ``nargs`` or ``choices``. A
boolean field ``name`` becomes ``--name`` / ``--no-name``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Optional

import torch
from e3nn import o3

__all__ = [
    "DTYPES",
    "SetupError",
    "Stopped",
    "TrainConfig",
    "TrainingError",
    "WriteError",
    "check_config",
    "config_from_args",
    "parser",
]

DTYPES = {"float32": torch.float32, "float64": torch.float64}
DEVICES = ("auto", "cpu", "cuda")


def _option(default, help: str, group: str, **argparse_options):
    """A field of :class:`TrainConfig` with its command-line help."""
    metadata = {"help": help, "group": group, **argparse_options}
    return dataclasses.field(default=default, metadata=metadata)


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run depends on. The defaults are the model and training of the book
    chapter, with 200 clusters to train on and 50 to validate on."""

    # data
    data: str = _option(
        "emt",
        '"emt" (EMT copper clusters, and crystals with --crystals), or a file of ase Atoms '
        "with energies and forces (and stress, cells and pbc for crystals), read by "
        'ase.io.read(path, ":")',
        "data",
    )
    num_structures: int = _option(250, "emt: number of clusters", "data")
    crystals: int = _option(
        0,
        "emt: number of periodic fcc copper crystals (32 atoms, strained, sheared and rattled, "
        "with EMT's stress) added to the clusters",
        "data",
    )
    shells: tuple = _option(
        (2, 3), "emt: icosahedron shells to draw from (2: 13 atoms, 3: 55 atoms)", "data",
        type=int, nargs="+",
    )  # fmt: skip
    seed: int = _option(0, "data, split, initial parameters and batch order", "data")
    validation_fraction: float = _option(
        0.2, "of the structures, held out to measure the errors after each epoch", "data"
    )
    # model
    irreps_hidden: str = _option("16x0e", "node features", "model")
    num_layers: int = _option(1, "transformer blocks", "model")
    num_heads: int = _option(2, "attention heads", "model")
    max_radius: float = _option(4.5, "cutoff radius, Å", "model")
    # training
    epochs: int = _option(
        20,
        "passes over the training structures; more than a finished run in --out had: that run "
        "goes on for the extra epochs, the learning rate's cosine decay started again from "
        "--lr (which may then differ from the run's)",
        "training",
    )
    batch_size: int = _option(16, "structures per step, over all processes", "training")
    lr: float = _option(2e-2, "Adam's learning rate, decaying to 0 along a cosine", "training")
    force_weight: float = _option(
        0.1, "lambda in: loss = energy term + lambda * force term", "training"
    )
    stress_weight: float = _option(
        1.0,
        "lambda_s in: loss = ... + lambda_s * stress term, over the structures that have a "
        "stress (periodic in 3D); the term is in (eV/atom)^2, the stress times volume per atom",
        "training",
    )
    # how the run is carried out
    dtype: str = _option("float32", "of all tensors", "run", choices=list(DTYPES))
    device: str = _option("auto", "auto: CUDA if there is a GPU", "run", choices=list(DEVICES))
    amp: bool = _option(False, "CUDA: forward and loss under bfloat16 autocast", "run")
    compile: bool = _option(
        False,
        "torch.compile the model for validation (training stays eager: torch.compile cannot "
        "differentiate twice); needs SE3TUTOR_BACKEND=torch, which it sets when unset",
        "run",
    )
    deterministic: bool = _option(
        False,
        "repeat bit for bit on a GPU too: torch.use_deterministic_algorithms, "
        "CUBLAS_WORKSPACE_CONFIG=:4096:8 and the pure-torch scatter (SE3TUTOR_BACKEND=torch, "
        "which it sets when unset); slower. A CPU run repeats without it",
        "run",
    )
    threads: Optional[int] = _option(
        None, "torch.set_num_threads (default: torch's)", "run", type=int
    )
    out: str = _option("runs/potential", "directory of log, checkpoints and model", "run")
    log_every: int = _option(10, "steps between 'step' records of the log", "run")
    checkpoint_every: int = _option(100, "steps between checkpoints", "run")
    resume: bool = _option(True, "continue from the last intact checkpoint in --out, if any", "run")
    progress: bool = _option(
        True,
        "show a progress bar when stderr is a terminal (else, and with --no-progress: a line "
        "with the loss and speed at each logged step)",
        "run",
    )


# Options that change how a run is carried out, not what it computes: a run may resume with
# other values of these (another device, more threads, another log interval).
# (The data are compared by their contents, se3tutor.data.fingerprint, not by their path.)
HOW_NOT_WHAT = frozenset(
    {"device", "compile", "threads", "out", "log_every", "checkpoint_every", "resume", "progress"}
    | {"data", "deterministic"}
)


class SetupError(ValueError):
    """The data or the configuration cannot be trained on; raised before training starts."""


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss or parameters); nothing bad was saved."""


class WriteError(RuntimeError):
    """The log, a checkpoint or the model could not be written (a full disk, say); nothing
    half-written is left, and the last checkpoint is intact."""


class Stopped(RuntimeError):
    """The run was asked to stop (SIGTERM) and saved a checkpoint to continue from."""


def parser() -> argparse.ArgumentParser:
    """``python -m se3tutor.train``'s arguments: one per field of :class:`TrainConfig`.

    >>> parser().parse_args(["--epochs", "3", "--no-progress"]).epochs
    3
    """
    command_line = argparse.ArgumentParser(
        prog="python -m se3tutor.train",
        description="Train an SE(3)-Transformer interatomic potential on energies and forces. "
        "Under torchrun, each process takes a shard of every batch.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    groups = {}
    for field in fields(TrainConfig):
        options = dict(field.metadata)
        group_name = options.pop("group")
        if group_name not in groups:
            groups[group_name] = command_line.add_argument_group(group_name)
        flag = "--" + field.name.replace("_", "-")
        if isinstance(field.default, bool):
            options["action"] = argparse.BooleanOptionalAction
        elif "type" not in options:
            options["type"] = type(field.default)
        default = list(field.default) if isinstance(field.default, tuple) else field.default
        groups[group_name].add_argument(flag, default=default, **options)
    return command_line


def config_from_args(argv: Optional[Sequence[str]] = None) -> TrainConfig:
    """The :class:`TrainConfig` of a command line (``None``: ``sys.argv``)."""
    arguments = vars(parser().parse_args(argv))
    arguments["shells"] = tuple(arguments["shells"])
    return TrainConfig(**arguments)


def check_config(config: TrainConfig) -> None:
    """Raise :class:`SetupError` naming the first option that cannot be trained with."""
    for field in fields(config):  # inf passes "> 0", and NaN fails every comparison quietly
        value = getattr(config, field.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise SetupError(f"{field.name} must be a finite number, got {value}")
    if config.seed < 0:
        raise SetupError(f"seed must be >= 0, got {config.seed}")
    if not config.shells or min(config.shells) < 2:
        raise SetupError(f"shells must each be >= 2 (2 shells: 13 atoms), got {config.shells}")
    positive_ints = ("num_structures", "epochs", "batch_size", "log_every", "checkpoint_every")
    for name in (*positive_ints, "num_layers", "num_heads"):
        if getattr(config, name) < 1:
            raise SetupError(f"{name} must be >= 1, got {getattr(config, name)}")
    for name in ("max_radius", "lr"):
        if not getattr(config, name) > 0:
            raise SetupError(f"{name} must be > 0, got {getattr(config, name)}")
    for name in ("force_weight", "stress_weight", "crystals"):
        if not getattr(config, name) >= 0:
            raise SetupError(f"{name} must be >= 0, got {getattr(config, name)}")
    if not 0 <= config.validation_fraction < 1:
        raise SetupError(f"validation_fraction must be in [0, 1), got {config.validation_fraction}")
    if config.threads is not None and config.threads < 1:
        raise SetupError(f"threads must be >= 1, got {config.threads}")
    try:
        irreps = o3.Irreps(config.irreps_hidden)
    except (ValueError, AssertionError) as error:  # e3nn raises either, for a bad string
        message = f"irreps_hidden {config.irreps_hidden!r} are not irreps ({error})"
        raise SetupError(message) from None
    if o3.Irrep("0e") not in [ir for _, ir in irreps]:
        raise SetupError(f"irreps_hidden {config.irreps_hidden!r} need 0e (the energies are 0e)")
    if config.dtype not in DTYPES:
        raise SetupError(f"dtype must be one of {list(DTYPES)}, got {config.dtype!r}")
    if config.device not in DEVICES:
        raise SetupError(f'device must be "auto", "cpu" or "cuda", got {config.device!r}')
    if config.device == "cuda" and not torch.cuda.is_available():
        raise SetupError("device cuda asked for, but torch sees no GPU")
    uses_cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    if config.amp and not (uses_cuda and config.dtype == "float32"):
        raise SetupError("amp (bfloat16 autocast) needs CUDA and dtype float32")
