"""Checkpoints that a crash cannot spoil (used by :mod:`se3tutor.train`).

A checkpoint is the pair ``checkpoint-00000120.pt`` (the ``torch.save`` of a dict of
tensors, numbers and strings) and ``checkpoint-00000120.json`` (its step, size in bytes and
SHA-256). Three rules make them safe:

- **Atomic writes.** Each file is written to a temporary file in the same directory, flushed
  to the disk (``fsync``), then renamed over its final name (``os.replace``, atomic on POSIX
  and Windows). A process killed at any moment leaves the old file or the new one, never half
  of one.
- **The manifest commits.** The ``.json`` is written after the ``.pt``; a checkpoint without
  one (killed between the two writes) is ignored.
- **Verified reads.** :func:`load_latest_checkpoint` checks size and checksum before
  ``torch.load``; a corrupt or truncated checkpoint (a full disk, a copy that broke off) gets a
  warning that names the file, and the one before it is used. The last ``keep`` checkpoints
  are kept for that reason.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch

__all__ = [
    "load_latest_checkpoint",
    "newest_intact_checkpoint",
    "random_states",
    "read_checkpoint",
    "save_checkpoint",
    "set_random_states",
    "write_atomically",
]


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` holds either its old or its new content,
    whenever the process dies: temporary file in the same directory, ``fsync``,
    ``os.replace``, then ``fsync`` of the directory (which makes the rename durable). A write
    that fails (``OSError``: a full disk) removes its temporary file and raises."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(temporary, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:  # a full disk (OSError), or Ctrl-C: no partial file is left
        temporary.unlink(missing_ok=True)
        raise
    if os.name == "posix":  # directories cannot be opened for fsync on Windows
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


def _checkpoints(directory: Path) -> list:
    """The ``.pt`` files of ``directory``, oldest first (the step is in the name)."""
    return sorted(Path(directory).glob("checkpoint-*.pt"))


def save_checkpoint(state: dict, directory, step: int, keep: int = 2) -> Path:
    """Save ``state`` as the checkpoint of ``step`` in ``directory``, then keep it and the
    ``keep - 1`` newest older ones that are intact; delete the others (corrupt ones too, which
    would otherwise count as kept and push the last good one out). Returns the ``.pt`` path.
    A write that fails (``OSError``: a full disk) leaves no file of this step, and the older
    checkpoints as they were."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    directory = Path(directory)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    path = directory / f"checkpoint-{step:08d}.pt"
    path.with_suffix(".json").unlink(missing_ok=True)  # saved again: uncommit the old one first
    write_atomically(path, payload)
    manifest = {"step": step, "bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
    try:
        write_atomically(path.with_suffix(".json"), json.dumps(manifest).encode())
    except BaseException:  # uncommitted: of no use, and it holds space a full disk lacks
        path.unlink(missing_ok=True)
        raise
    older = [old for old in reversed(_checkpoints(directory)) if old != path]
    intact = [old for old in older if _is_intact(old)][: keep - 1]
    for old in older:
        if old not in intact:
            old.with_suffix(".json").unlink(missing_ok=True)  # first: uncommit it
            old.unlink(missing_ok=True)
    for stale in directory.glob(".checkpoint-*.tmp-*"):  # left by a writer that was killed
        stale.unlink(missing_ok=True)
    return path


def _verified_payload(path: Path) -> bytes:
    """The bytes of ``path`` if they match its manifest; ``ValueError`` saying how not."""
    manifest_path = path.with_suffix(".json")
    if not manifest_path.exists():
        raise ValueError("no manifest (the writer stopped before committing it)")
    manifest = json.loads(manifest_path.read_text())
    payload = path.read_bytes()
    if len(payload) != manifest["bytes"]:
        raise ValueError(f"{len(payload)} bytes, the manifest says {manifest['bytes']}")
    if hashlib.sha256(payload).hexdigest() != manifest["sha256"]:
        raise ValueError("its SHA-256 differs from the manifest's")
    return payload


def _is_intact(path: Path) -> bool:
    try:
        _verified_payload(path)
    except (ValueError, KeyError, OSError):
        return False
    return True


def newest_intact_checkpoint(directory) -> Optional[Path]:
    """The ``.pt`` path of the newest checkpoint in ``directory`` that matches its manifest
    (checked, not loaded), or ``None``."""
    return next((path for path in reversed(_checkpoints(directory)) if _is_intact(path)), None)


def read_checkpoint(path) -> dict:
    """The state saved in ``path``; ``ValueError`` if it does not match its manifest."""
    payload = _verified_payload(Path(path))
    # weights_only: tensors, numbers, strings and containers, nothing that runs code
    return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)


def load_latest_checkpoint(directory) -> Optional[tuple]:
    """``(state, path)`` of the newest checkpoint in ``directory`` that reads back intact, or
    ``None`` if there is none. Each newer one that does not (missing manifest, wrong size or
    checksum, unreadable) is reported by a ``UserWarning`` naming its file.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as directory:
    ...     for step in (10, 20):
    ...         _ = save_checkpoint({"step": step, "weight": torch.ones(3)}, directory, step)
    ...     with open(f"{directory}/checkpoint-00000020.pt", "r+b") as file:
    ...         _ = file.truncate(100)  # as if the disk had filled up
    ...     with warnings.catch_warnings(record=True) as caught:
    ...         warnings.simplefilter("always")
    ...         state, path = load_latest_checkpoint(directory)
    ...     state["step"], path.name, "checkpoint-00000020.pt" in str(caught[0].message)
    (10, 'checkpoint-00000010.pt', True)
    """
    for path in reversed(_checkpoints(directory)):
        try:
            return read_checkpoint(path), path
        except Exception as error:  # any failure to read it back means: not usable
            warnings.warn(
                f"checkpoint {path} is corrupt or incomplete ({error}); trying the one before",
                stacklevel=2,
            )
    return None


def random_states() -> dict:
    """The states of torch's (CPU and CUDA), numpy's and Python's global random generators, as
    tensors, numbers and tuples (which ``torch.load(..., weights_only=True)`` reads)."""
    # numpy's legacy global generator: the one that code calling np.random.* draws from
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()  # noqa: NPY002
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": (
            name,
            torch.from_numpy(keys.astype(np.int64)),
            position,
            has_gauss,
            cached_gaussian,
        ),
        "python": random.getstate(),
    }


def set_random_states(states: dict) -> None:
    """Restore what :func:`random_states` returned."""
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():  # as many GPUs as both machines have
        for device, state in enumerate(states["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state, device)
    name, keys, position, has_gauss, cached_gaussian = states["numpy"]
    keys = keys.numpy().astype(np.uint32)
    np.random.set_state((name, keys, position, has_gauss, cached_gaussian))  # noqa: NPY002
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
