"""The charged N-body benchmark (EGNN Table 2): se3tutor's models beside the published numbers
and beside se3-transformer-pytorch, every model trained for the same wall-clock time.

    python bench/nbody.py                 # the full run: 5 entries x 3 seeds x 6 minutes
    python bench/nbody.py --smoke         # under 2 minutes: tiny models, few systems
    python bench/nbody.py --minutes 5 --seeds 1 --models transformer,peer

Data: :func:`se3tutor.nbody.charged_nbody` (3,000 training, 2,000 validation, 2,000 test
systems, generated here and cached). Task: the positions 1,000 steps ahead; error: mean
squared error per coordinate, of the weights with the best validation error (EGNN's
protocol). Every model is trained by :func:`se3tutor.dynamics.fit` with the same settings
(Adam, learning rate 3e-3 with a cosine schedule over the run's time, batches of 100
systems, float32) for ``--minutes`` of training (evaluations not counted), each run in a
fresh process with ``--threads`` threads, ``--jobs`` runs at a time:

- ``transformer``: :class:`se3tutor.dynamics.NBodyTransformer`, the graph-level model;
- ``egnn``: the front end ``se3tutor.dense.SE3Transformer(use_egnn=True, ...)``, E(n)-GNN
  layers on irreps (:mod:`se3tutor.dense.egnn`);
- ``dense``: ``se3tutor.dense.SE3Transformer`` with se3-transformer-pytorch's keywords;
- ``peer``: se3-transformer-pytorch 0.9.0 with the same keywords, in its own virtual
  environment (``.venv-peer``, made on first use as ``bench/peer.py`` does);
- ``peer-slow``: the same at 5e-4, the default of EGNN's training script (at 3e-3 the peer
  ends worse than moving straight on).

The full run takes about 90 minutes with ``--jobs 2`` (each peer run also spends about 6
minutes on its evaluations, which are not counted in its budget).

The three dense models read charges as a degree-0 and velocities as a degree-1 input, the
product of the two charges as an edge feature (``edge_dim=1``), all four other particles as
neighbours, and return a degree-1 displacement: prediction = positions + displacement.

Resumable: each run writes its result to ``--out`` (default ``bench/results/nbody``) and a
checkpoint after every evaluation; a run with a result is skipped, one with a checkpoint
continues. Prints the table (test MSE mean +- std over seeds beside the published numbers,
parameters, epochs reached, seconds per epoch, peak memory) and saves the learning curves to
``nbody_curves.png`` there. Peak memory: the growth of the worker's resident set from just
before its first training step to the end of the run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import resource
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

# EGNN (Satorras, Hoogeboom and Welling 2021, arXiv:2102.09844), Table 2, test MSE, as the
# N-body issue cites them. EGNN's 0.0071 is confirmed by a second source (the egnn-jax README,
# github.com/gerkone/egnn-jax); the others could not be read from the paper's text here.
PUBLISHED = {
    "Linear": 0.0819,
    "SE(3)-Transformer": 0.0244,
    "Tensor Field Network": 0.0155,
    "GNN": 0.0107,
    "Radial Field": 0.0104,
    "EGNN": 0.0071,
}

# Inputs and outputs of the N-body task in se3-transformer-pytorch's keywords.
NBODY_IO = dict(input_degrees=2, dim_in=1, output_degrees=2, reduce_dim_out=True, edge_dim=1,
                valid_radius=30, num_neighbors=4)  # fmt: skip
# bench/peer.py's "same keywords" (its README's model, smaller radius and neighbours aside).
SAME = dict(dim=32, heads=4, dim_head=16, depth=2, num_degrees=2)
LR = 3e-3  # every model's, unless its entry says otherwise
# name -> (library, keywords, learning rate or None for LR, name in the table)
MODELS = {
    "transformer": ("se3tutor", dict(irreps_hidden="32x0e + 32x1o", num_layers=4, num_heads=4),
                    None, "se3tutor NBodyTransformer"),
    "egnn": ("se3tutor", dict(dim=64, depth=4, num_degrees=2, use_egnn=True, egnn_hidden_dim=64,
                              **NBODY_IO), None, "se3tutor.dense, use_egnn=True"),
    "dense": ("se3tutor", dict(SAME, **NBODY_IO), None, "se3tutor.dense, peer's keywords"),
    "peer": ("peer", dict(SAME, **NBODY_IO), None, "se3-transformer-pytorch 0.9.0"),
    # At LR the peer (7.6 million parameters) ends worse than x + a v: the default of EGNN's
    # training script as well.
    "peer-slow": ("peer", dict(SAME, **NBODY_IO), 5e-4, "se3-transformer-pytorch 0.9.0"),
}  # fmt: skip
SMOKE_MODELS = {
    "transformer": ("se3tutor", dict(irreps_hidden="4x0e + 4x1o", irreps_head="2x0e + 2x1o",
                                     num_layers=1, num_heads=2),
                    None, "se3tutor NBodyTransformer"),
    "egnn": ("se3tutor", dict(dim=4, depth=1, num_degrees=2, use_egnn=True, egnn_hidden_dim=8,
                              **NBODY_IO), None, "se3tutor.dense, use_egnn=True"),
    "dense": ("se3tutor", dict(SAME, dim=4, heads=2, dim_head=2, depth=1, **NBODY_IO), None,
              "se3tutor.dense, peer's keywords"),
    "peer": ("peer", dict(SAME, dim=4, heads=2, dim_head=2, depth=1, **NBODY_IO), None,
             "se3-transformer-pytorch 0.9.0"),
}  # fmt: skip
SMOKE_SYSTEMS = {"train": 60, "valid": 40, "test": 40}


def load_dynamics():
    """:mod:`se3tutor.dynamics` by its path: the peer's environment has no e3nn, so it cannot
    import the package, and the module imports only torch at the top."""
    spec = importlib.util.spec_from_file_location("dynamics", ROOT / "se3tutor" / "dynamics.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- the worker: one model and one seed, in a fresh process of its library's environment ---


def build(name: str, library: str, keywords: dict):
    """The model and its ``predict(positions, velocities, charges) -> positions``."""
    import torch

    if name == "transformer":
        model = load_dynamics().NBodyTransformer(**keywords)
        return model, model
    if library == "peer":
        from se3_transformer_pytorch import SE3Transformer
    else:
        from se3tutor.dense import SE3Transformer
    model = SE3Transformer(**keywords)

    def predict(positions, velocities, charges):
        feats = {"0": charges[..., None, None], "1": velocities[..., None, :]}
        edges = (charges[:, :, None] * charges[:, None, :])[..., None]  # [b, n, n, 1]
        mask = torch.ones(charges.shape, dtype=torch.bool, device=charges.device)
        return positions + model(feats, positions, mask, edges=edges, return_type=1)

    return model, predict


def max_resident_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


def worker(run: dict) -> dict:
    import torch

    torch.manual_seed(run["seed"])
    dynamics = load_dynamics()
    data = torch.load(run["data"], weights_only=True)
    model, predict = build(run["name"], run["library"], run["keywords"])
    parameters = sum(p.numel() for p in model.parameters())
    label = f"{run['name']} seed {run['seed']}"

    def log(entry):
        print(f"  [{label}] epoch {entry['epoch']:.1f}, {entry['seconds'] / 60:.1f} min: "
              f"train {entry['train']:.4f}, valid {entry['valid']:.4f}", file=sys.stderr,
              flush=True)  # fmt: skip

    before = max_resident_mb()
    started = time.perf_counter()
    result = dynamics.fit(model, data, predict=predict, time_limit=run["seconds"],
                          lr=run.get("lr", LR), seed=run["seed"], log=log,
                          checkpoint=run["checkpoint"], evaluations=run["evaluations"])  # fmt: skip
    result.update(parameters=parameters, peak_mb=max_resident_mb() - before,
                  wall_seconds=time.perf_counter() - started)  # fmt: skip
    return result


# --- the parent: data, runs, the table and the figure ---


def library_python(library: str) -> Path:
    if library == "se3tutor":
        return Path(sys.executable)
    from peer import library_python as peer_python  # makes .venv-peer on first use

    return peer_python(library)


def make_data(out: Path, smoke: bool) -> Path:
    import torch

    from se3tutor.nbody import charged_nbody

    path = out / ("data_smoke.pt" if smoke else "data.pt")
    if not path.exists():
        data = {}
        for split in ("train", "valid", "test"):
            full = charged_nbody(split, num_systems=SMOKE_SYSTEMS[split] if smoke else None)
            data[split] = {key: value.float() for key, value in full.items()
                           if isinstance(value, torch.Tensor) and key != "clipped"}  # fmt: skip
        torch.save(data, path)
    return path


def run_one(run: dict, threads: int) -> dict:
    result_path = Path(run["result"])
    if result_path.exists():
        return json.loads(result_path.read_text())
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
    command = [str(library_python(run["library"])), __file__, "--worker", json.dumps(run)]
    print(f"start {run['name']} seed {run['seed']} ({run['seconds'] / 60:.1f} min)",
          file=sys.stderr, flush=True)  # fmt: skip
    finished = subprocess.run(command, env=env, stdout=subprocess.PIPE, text=True)
    if finished.returncode != 0:
        raise SystemExit(f"{run['name']} seed {run['seed']} failed (exit {finished.returncode})")
    result = json.loads(finished.stdout.strip().splitlines()[-1])
    result_path.write_text(json.dumps(result))
    print(f"done {run['name']} seed {run['seed']}: test {result['test']:.4f}", file=sys.stderr,
          flush=True)  # fmt: skip
    return result


def mean_std(values: list) -> tuple:
    mean = sum(values) / len(values)
    std = (
        math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
        if len(values) > 1
        else 0.0
    )
    return mean, std


def linear_baseline(data_path: Path) -> float:
    """Test MSE of :math:`x + a v`, the one number :math:`a` fitted to the training set by
    least squares: a check of the data against the published Linear model."""
    import torch

    data = torch.load(data_path, weights_only=True)
    x, v, target = (data["train"][key].double() for key in ("positions", "velocities", "target"))
    a = (v * (target - x)).sum() / v.pow(2).sum()
    test = data["test"]
    error = test["positions"].double() + a * test["velocities"].double() - test["target"].double()
    return error.pow(2).mean().item()


def table(results: dict, minutes: float, threads: int, linear: float) -> str:
    lines = [
        f"Charged N-body, test MSE (positions 1,000 steps ahead), every model trained for "
        f"{minutes:g} min on {threads} CPU thread(s); mean +- std over seeds",
        "",
        "| model | lr | test MSE | seeds | parameters | epochs | s / epoch | peak MB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for (label, lr), runs in results.items():
        mean, std = mean_std([r["test"] for r in runs])
        epochs = sum(r["epochs"] for r in runs) / len(runs)
        per_epoch = sum(r["seconds"] / r["epochs"] for r in runs) / len(runs)
        peak = max(r["peak_mb"] for r in runs)
        size = f"{runs[0]['parameters']:,}"
        lines.append(f"| {label} | {lr:g} | {mean:.4f} +- {std:.4f} | {len(runs)} | {size} | "
                     f"{epochs:.1f} | {per_epoch:.3g} | {peak:.0f} |")  # fmt: skip
    lines.append(f"| linear, x + a v (a fitted) | | {linear:.4f} | | 1 | | | |")
    lines += [
        "",
        "Published (EGNN Table 2): " + ", ".join(f"{k} {v}" for k, v in PUBLISHED.items()),
    ]
    return "\n".join(lines)


def figure(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for k, ((label, lr), runs) in enumerate(results.items()):
        for i, run in enumerate(runs):
            minutes = [e["seconds"] / 60 for e in run["history"]]
            ax.plot(minutes, [e["valid"] for e in run["history"]], color=f"C{k}",
                    label=f"{label}, lr {lr:g}" if i == 0 else None, alpha=0.8)  # fmt: skip
    for label, style in (("SE(3)-Transformer", "--"), ("EGNN", ":")):
        ax.axhline(
            PUBLISHED[label], color="gray", linestyle=style, label=f"{label}, published (test)"
        )
    ax.set(xlabel="training time (minutes)", ylabel="validation MSE", yscale="log",
           title="Charged N-body: learning curves (one line per seed)")  # fmt: skip
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--smoke", action="store_true", help="tiny models and data, < 2 minutes")
    parser.add_argument("--models", help=f"comma-separated, among {','.join(MODELS)}; default: all")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--minutes", type=float, default=6.0, help="training time per run")
    parser.add_argument("--threads", type=int, default=1, help="per run")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time")
    parser.add_argument("--evaluations", type=int, default=8, help="per run")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "nbody")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if args.smoke:
        args.seeds, args.minutes, args.evaluations = 2, 0.05, 2
    models = SMOKE_MODELS if args.smoke else MODELS
    names = args.models.split(",") if args.models else list(models)
    unknown = set(names) - set(models)
    if unknown or args.seeds < 1 or not args.minutes > 0:
        parser.error(f"need models among {list(models)}, seeds >= 1, minutes > 0")
    out = args.out / "smoke" if args.smoke else args.out
    out.mkdir(parents=True, exist_ok=True)
    data = make_data(out, args.smoke)
    runs = []
    for name in names:
        library, keywords, lr, label = models[name]
        lr = lr or LR
        for seed in range(args.seeds):
            stem = out / f"{name}_seed{seed}_{args.minutes:g}min_lr{lr:g}"
            runs.append(dict(name=name, library=library, keywords=keywords, seed=seed, lr=lr,
                             label=label, seconds=60 * args.minutes, evaluations=args.evaluations,
                             data=str(data), checkpoint=f"{stem}.ckpt",
                             result=f"{stem}.json"))  # fmt: skip
    if args.smoke:  # a fresh run every time: the smoke run tests the whole path
        for run in runs:
            for key in ("checkpoint", "result"):
                Path(run[key]).unlink(missing_ok=True)
    with ThreadPoolExecutor(args.jobs) as pool:
        finished = list(pool.map(lambda run: run_one(run, args.threads), runs))
    results = {}
    for run, result in zip(runs, finished):
        results.setdefault((run["label"], run["lr"]), []).append(result)
    text = table(results, args.minutes, args.threads, linear_baseline(data))
    print(text)
    (out / "nbody.md").write_text(text + "\n")
    figure(results, out / "nbody_curves.png")
    print(f"learning curves: {out / 'nbody_curves.png'}")


if __name__ == "__main__":
    main()
