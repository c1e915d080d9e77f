"""Training interatomic potentials: ``python -m se3tutor.train`` (book: Learning an
interatomic potential).

The chapter's model and loss (:mod:`se3tutor.potential`), with what a long run needs around
them:

- :mod:`se3tutor.train.config`: :class:`TrainConfig`, every option once, with its help text;
  the command line is derived from it
- :mod:`se3tutor.train.loop`: :func:`fit` (validation, progress, checkpoints, resume,
  signals), :func:`main`, :func:`deterministic_algorithms` (``--deterministic``)
- :mod:`se3tutor.train.data`: the structures of a run, read or made, checked and split
- :mod:`se3tutor.train.model`: the model, built, saved and loaded (:func:`load_model`),
  compiled for evaluation, and evaluated (:func:`evaluate`)
- :mod:`se3tutor.train.checkpoint`: atomic, checksummed checkpoints and random states
- :mod:`se3tutor.train.resume`: which checkpoint a run continues from, and more epochs for a
  finished run
- :mod:`se3tutor.train.runlog`: the JSON-lines log, console lines, progress bar, plots
- :mod:`se3tutor.train.distributed`: torch.distributed start-up for ``torchrun``
"""

from se3tutor.train.config import SetupError, TrainConfig, TrainingError
from se3tutor.train.loop import deterministic_algorithms, fit, main
from se3tutor.train.model import compile_for_inference, evaluate, load_model
from se3tutor.train.runlog import plot_log, read_log

__all__ = [
    "SetupError",
    "TrainConfig",
    "TrainingError",
    "compile_for_inference",
    "deterministic_algorithms",
    "evaluate",
    "fit",
    "load_model",
    "main",
    "plot_log",
    "read_log",
]
