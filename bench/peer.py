"""se3tutor against se3-transformer-pytorch 0.9.0 and equiformer-pytorch: forward plus backward.

    python bench/peer.py                      # every section, 2 threads
    python bench/peer.py --section tracker    # one section alone (repeatable)
    python bench/peer.py --smoke              # tiny sizes, one repeat (CI)
    python bench/peer.py --choose-widths      # how the widths below were chosen

Sections:

- ``same``: the same call, ``SE3Transformer(dim=32, heads=4, dim_head=16, depth=2,
  num_degrees=2, valid_radius=10, num_neighbors=16)``, through both libraries (se3tutor's
  through its drop-in front end ``se3tutor.dense``), on 2 x 64 points drawn from a standard
  normal. The same keywords build models of very different sizes (60 thousand parameters
  against 7.3 million), so this row says what the same call costs, not how fast one model
  is computed.
- ``wide``: se3tutor with the same keywords but ``dim`` and ``dim_head`` both multiplied by
  the whole number ``k`` whose parameter count is closest to the peer's (``k = 12``:
  ``dim=384, dim_head=192``, 0.98x the peer's parameters), against the peer of ``same``.
- ``tracker``: the configuration of se3-transformer-pytorch's issue 17 ("CUDA out of
  memory"), ``dim=20, heads=4, depth=2, dim_head=5, num_degrees=2, valid_radius=5`` with
  0.9.0's default ``num_neighbors=float('inf')`` (no neighbour limit: every other node within
  ``valid_radius``), one graph, which its users report running out of memory at 512 points
  on 32-80 GB GPUs. The points are uniform in a ball of radius 2.4, so every pair is within
  ``valid_radius`` (the graph is all ``n (n - 1)`` pairs). se3tutor at 128 and 512 points,
  the peer at 128 and, under the memory cap below, at 512.
- ``equiformer``: equiformer-pytorch (the same author's successor library, its own
  environment ``.venv-equiformer``), ``Equiformer`` with the same keywords as ``same`` but
  ``dim`` and ``dim_head`` both multiplied by the multiple of 1/4 whose parameter count is
  closest to the wide se3tutor's (9/4: ``dim=72, dim_head=36``, 0.97x), on the points of
  ``same``; its other keywords are its defaults.

How the widths were chosen: by counting parameters, building models without training them
(``--choose-widths`` builds the candidates, prints their counts and the closest; the choice
is fixed here so that every run measures the same models). Every run prints the parameter
ratio of each size-matched pair and warns when it is off by more than 20 %.

Each model runs in a fresh subprocess (the peers in their own virtual environments, made on
first use from the package registry, with the same torch as ours), warmed up on graphs of 4
points. Printed per row: the number of edges (per node, the ``num_neighbors`` nearest others
within ``valid_radius``: the rule of all three libraries), the median time of forward plus
backward, the peak memory of the first full-size step (resident-set growth, ``measure.py``),
the parameters, and the invariance error of the type-0 output under a random rotation and
translation. Memory cap: before its first full-size step each process may grow its address
space by at most ``--cap-gb`` (16 GB by default, ``RLIMIT_AS``), so that a model that needs
more fails cleanly ("out of memory") instead of exhausting the machine's 24 GB.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from measure import memory_kind

ROOT = Path(__file__).resolve().parent.parent

# library -> (what pip installs, virtual environment, name in the table); se3tutor is ours
PACKAGES = {
    "peer": ("se3-transformer-pytorch==0.9.0", ROOT / ".venv-peer", "se3-transformer-pytorch"),
    "equiformer": ("equiformer-pytorch==0.5.4", ROOT / ".venv-equiformer", "equiformer-pytorch"),
}

SAME = dict(dim=32, heads=4, dim_head=16, depth=2, num_degrees=2, valid_radius=10, num_neighbors=16)
WIDE = dict(SAME, dim=12 * 32, dim_head=12 * 16)
EQUIFORMER = dict(SAME, dim=72, dim_head=36)
TRACKER = dict(dim=20, heads=4, depth=2, dim_head=5, num_degrees=2, valid_radius=5)

SMOKE_SAME = dict(SAME, dim=8, heads=2, dim_head=4, depth=1, num_neighbors=4)
SMOKE_WIDE = dict(SMOKE_SAME, dim=18 * 8, dim_head=18 * 4)  # 1.01x the peer's parameters
SMOKE_EQUIFORMER = dict(SMOKE_SAME, dim=28, dim_head=14)  # 7/2: 1.06x the wide se3tutor's

SAME_POINTS = dict(batch=2, nodes=64, spread="normal")
SMOKE_POINTS = dict(SAME_POINTS, nodes=8)
BALL_RADIUS = 2.4  # every pair of points within 4.8 < valid_radius = 5: all pairs
TRACKER_NODES = (128, 512)  # se3tutor at both; the peer at the first, and capped at the last
SMOKE_TRACKER_NODES = (8, 48)
SMOKE_CAP_MB = 64  # smoke: the peer's larger tracker run fails under it (tests the report)

WARM_UP_NODES = 4  # per graph, before the first full-size step
MIN_COMPARED_MB = 10  # smaller peaks are within the noise of the resident set: no ratio
SIZE_TOLERANCE = 0.2  # size-matched pairs: parameter ratio within 1 +- this, or a warning
SECTIONS = ("same", "wide", "tracker", "equiformer")


def tracker_points(nodes: int) -> dict:
    return dict(batch=1, nodes=nodes, spread="ball", radius=BALL_RADIUS)


def plan(smoke: bool, cap_mb: float) -> dict:
    """``{section: [run, ...]}``; a run is a library, a label, model keywords, points, a cap."""
    same, wide, equiformer = (
        (SMOKE_SAME, SMOKE_WIDE, SMOKE_EQUIFORMER) if smoke else (SAME, WIDE, EQUIFORMER)
    )
    points = SMOKE_POINTS if smoke else SAME_POINTS
    small, large = SMOKE_TRACKER_NODES if smoke else TRACKER_NODES

    def run(library, label, model, points, cap=cap_mb):
        return dict(library=library, label=label, model=model, points=points, cap_mb=cap)

    ours_same = run("se3tutor", "same keywords", same, points)
    peer_same = run("peer", "same keywords", same, points)
    ours_wide = run("se3tutor", f"wide ({_widths(wide)})", wide, points)
    equiformer = run("equiformer", f"size of wide ({_widths(equiformer)})", equiformer, points)
    large_cap = SMOKE_CAP_MB if smoke else cap_mb
    tracker = [
        run("se3tutor", "issue 17", TRACKER, tracker_points(small)),
        run("se3tutor", "issue 17", TRACKER, tracker_points(large)),
        run("peer", "issue 17", TRACKER, tracker_points(small)),
        run("peer", "issue 17", TRACKER, tracker_points(large), large_cap),
    ]
    return {
        "same": [ours_same, peer_same],
        "wide": [ours_wide, peer_same],
        "tracker": tracker,
        "equiformer": [equiformer, ours_wide],
    }


def _widths(keywords: dict) -> str:
    return f"dim={keywords['dim']}, dim_head={keywords['dim_head']}"


def run_key(run: dict) -> str:
    return json.dumps(run, sort_keys=True)


# --- the worker: one model, in a fresh process of its library's environment ---


def build(library: str, keywords: dict):
    """The model and ``run(feats, coors) -> type-0 output [b, n, dim]``: the same constructor
    keywords and the same inputs for every library."""
    import torch

    if library == "se3tutor":
        from se3tutor.dense import SE3Transformer

        model = SE3Transformer(**keywords)
    elif library == "peer":
        from se3_transformer_pytorch import SE3Transformer

        model = SE3Transformer(**keywords)
    else:
        from equiformer_pytorch import Equiformer

        model = Equiformer(**keywords)

    def run(feats, coors):
        mask = torch.ones(feats.shape[:2], dtype=torch.bool)
        if library == "equiformer":
            return model(feats, coors, mask).type0
        return model(feats, coors, mask, return_type=0)

    return model, run


def make_inputs(torch, points: dict, nodes: int, dim: int, seed: int):
    """``feats [b, nodes, dim]`` (standard normal) and ``coors [b, nodes, 3]``: standard
    normal, or uniform in a ball of ``points["radius"]``. The coordinates are drawn first, so
    they are the same for every ``dim`` (and, with the same torch, in every environment)."""
    generator = torch.Generator().manual_seed(seed)
    shape = (points["batch"], nodes)
    coors = torch.randn(*shape, 3, generator=generator)
    if points["spread"] == "ball":
        direction = coors / coors.norm(dim=-1, keepdim=True)
        radius = points["radius"] * torch.rand(*shape, 1, generator=generator) ** (1 / 3)
        coors = direction * radius
    return torch.randn(*shape, dim, generator=generator), coors


def count_edges(torch, coors, valid_radius: float, num_neighbors: float) -> int:
    """Edges ``j -> i``, ``j != i``: per node, the ``num_neighbors`` nearest others within
    ``valid_radius``."""
    distance = torch.cdist(coors, coors)  # [b, n, n]
    n = coors.shape[1]
    within = (distance <= valid_radius) & ~torch.eye(n, dtype=torch.bool)
    return int(within.sum(-1).clamp(max=int(min(num_neighbors, n - 1))).sum())


def _address_space_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) / 1024
    raise KeyError("VmSize")


def _is_out_of_memory(error: BaseException) -> bool:
    text = str(error).lower()
    return isinstance(error, MemoryError) or "alloc" in text or "memory" in text


def worker(runs: list, repeats: int, threads: int) -> list:
    """Measure ``runs`` one after the other in this process."""
    import torch

    torch.set_num_threads(threads)
    return [measure(torch, run, repeats) for run in runs]


def measure(torch, run: dict, repeats: int) -> dict:
    from measure import peak_memory_mb

    torch.manual_seed(0)
    keywords, points = run["model"], run["points"]
    model, forward = build(run["library"], keywords)
    feats, coors = make_inputs(torch, points, points["nodes"], keywords["dim"], seed=0)
    result = dict(
        parameters=sum(p.numel() for p in model.parameters()),
        edges=count_edges(
            torch, coors, keywords.get("valid_radius", 1e5), keywords.get("num_neighbors", math.inf)
        ),
        points_checksum=float(coors.double().sum()),
        torch=torch.__version__,
    )

    def step(feats, coors):
        forward(feats, coors).sum().backward()
        model.zero_grad(set_to_none=True)

    # imports, kernels, allocator: on small graphs, so that the full-size peak shows below
    step(*make_inputs(torch, points, WARM_UP_NODES, keywords["dim"], seed=1))
    limit = int((_address_space_mb() + run["cap_mb"]) * 2**20)
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    start = time.perf_counter()
    try:
        peak_mb = peak_memory_mb(lambda: step(feats, coors), "cpu")
    except (RuntimeError, MemoryError) as error:
        if not _is_out_of_memory(error):
            raise
        return dict(result, out_of_memory=True, seconds_to_failure=time.perf_counter() - start)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step(feats, coors)
        times.append(time.perf_counter() - start)

    rotation = _random_rotation(torch)
    with torch.no_grad():
        shift = torch.randn(3)
        invariance = (forward(feats, coors @ rotation.T + shift) - forward(feats, coors)).abs()
    return dict(
        result,
        out_of_memory=False,
        median_s=statistics.median(times),
        times_s=times,
        peak_mb=peak_mb,
        invariance_error=float(invariance.max()),
    )


def _random_rotation(torch):
    q, r = torch.linalg.qr(torch.randn(3, 3))
    q = q * torch.sign(torch.diagonal(r))
    return q * torch.sign(torch.det(q))  # det +1


def count_parameters(library: str, candidates: list, stop_above: float) -> list:
    """Parameter counts of ``candidates`` (model keywords) in order, up to the first count
    above ``stop_above``."""
    counts = []
    for keywords in candidates:
        model, _ = build(library, keywords)
        counts.append(sum(p.numel() for p in model.parameters()))
        if counts[-1] > stop_above:
            break
    return counts


# --- the parent: environments, subprocesses, the table ---


def library_python(library: str) -> Path:
    """Our interpreter for se3tutor; for a peer, its virtual environment's, made on first use
    with the same torch as ours."""
    if library == "se3tutor":
        return Path(sys.executable)
    package, venv, _ = PACKAGES[library]
    python = venv / "bin" / "python"
    if not python.exists():
        import torch

        print(f"making {venv} with {package} (once)", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        (venv / ".gitignore").write_text("*\n")  # as Python 3.13's venv does
        torch_pin = f"torch=={torch.__version__.split('+')[0]}"
        subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", torch_pin, package], check=True
        )
    return python


def subprocess_json(library: str, arguments: list, threads: int, allow_failure=False):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
    command = [str(library_python(library)), __file__, *arguments, "--threads", str(threads)]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        if allow_failure:
            return None, result.stderr
        raise SystemExit(f"{library} failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stderr


def run_group(runs: list, repeats: int, threads: int) -> list:
    """Results of ``runs`` (one library) measured in one fresh process."""
    arguments = ["--worker", json.dumps(runs), "--repeats", str(repeats)]
    results, stderr = subprocess_json(runs[0]["library"], arguments, threads, allow_failure=True)
    if results is None:
        # an allocation can also fail where Python cannot catch it (std::bad_alloc in a thread)
        if len(runs) > 1 or ("alloc" not in stderr.lower() and "memory" not in stderr.lower()):
            raise SystemExit(f"{runs[0]['library']} failed:\n{stderr}")
        results = [dict(out_of_memory=True, parameters=None, edges=None, points_checksum=None)]
    return results


def groups(runs: list, smoke: bool) -> list:
    """One process per run; for ``--smoke``, one per library (imports once: the memory column
    is then not that of a fresh process), a capped run still alone."""
    if not smoke:
        return [[run] for run in runs]
    grouped = {}
    for run in runs:
        grouped.setdefault((run["library"], run["cap_mb"]), []).append(run)
    return list(grouped.values())


def label(run: dict) -> str:
    name = "se3tutor" if run["library"] == "se3tutor" else PACKAGES[run["library"]][2]
    return f"{name}, {run['label']}"


def row(run: dict, result: dict) -> str:
    points = f"{run['points']['batch']} x {run['points']['nodes']}"
    edges = "" if result["edges"] is None else f"{result['edges']:,}"
    params = "" if result["parameters"] is None else f"{result['parameters']:,}"
    if result["out_of_memory"]:  # the cap in the memory column
        cap = f"> {run['cap_mb']:,.0f}"
        return f"{label(run):<54}{points:>9}{edges:>9}{'OOM':>13}{cap:>10}{params:>11}"
    return (
        f"{label(run):<54}{points:>9}{edges:>9}{result['median_s']:>13.4f}"
        f"{result['peak_mb']:>10,.0f}{params:>11}{result['invariance_error']:>12.1e}"
    )


def compare(ours: dict, theirs: dict, name: str) -> str:
    """How se3tutor's row compares with another library's row."""
    if ours["out_of_memory"]:
        return "se3tutor ran out of memory"
    if theirs["out_of_memory"]:
        failed = theirs.get("seconds_to_failure")
        after = "" if failed is None else f" after {failed:.0f} s"
        return f"{name} ran out of memory{after}; se3tutor took {ours['median_s']:.3f} s"
    speed = theirs["median_s"] / ours["median_s"]
    faster = f"{speed:.1f}x faster" if speed >= 1 else f"{1 / speed:.1f}x slower"
    memory = (
        f"{ours['peak_mb'] / theirs['peak_mb']:.2f}x the peak memory"
        if min(ours["peak_mb"], theirs["peak_mb"]) >= MIN_COMPARED_MB
        else "a peak memory too small to compare"
    )
    params = ours["parameters"] / theirs["parameters"]
    return f"se3tutor is {faster} than {name}, uses {memory}, has {params:.3g}x the parameters"


def size_check(result: dict, target: dict, what: str) -> str:
    ratio = result["parameters"] / target["parameters"]
    warning = "" if abs(ratio - 1) <= SIZE_TOLERANCE else " WARNING: not within 20 %"
    return f"{what}: {ratio:.3f}x the parameters{warning} (--choose-widths)"


def summary(section: str, runs: list, results: dict) -> list:
    """The ratio lines of one section."""
    got = [results[run_key(run)] for run in runs]
    peer = PACKAGES["peer"][2]
    if section == "same":
        return [f"same keywords: {compare(got[0], got[1], peer)}"]
    if section == "wide":
        return [
            size_check(got[0], got[1], f"wide se3tutor against {peer}"),
            f"equal size: {compare(got[0], got[1], peer)}",
        ]
    if section == "equiformer":
        name = PACKAGES["equiformer"][2]
        lines = [size_check(got[0], got[1], f"{name} against the wide se3tutor")]
        return [*lines, f"equal size: {compare(got[1], got[0], name)}"]
    ours_small, ours_large, peer_small, peer_large = got
    lines = []
    for ours, theirs, run in ((ours_small, peer_small, runs[0]), (ours_large, peer_large, runs[1])):
        points = f"{run['points']['nodes']} points ({ours['edges']:,} edges)"
        lines.append(f"issue 17 at {points}: {compare(ours, theirs, peer)}")
    if not ours_large["out_of_memory"]:
        growth = [ours_large[key] / ours_small[key] for key in ("edges", "median_s")]
        line = "se3tutor from {} to {} points: {:.1f}x the edges, {:.1f}x the time".format(
            runs[0]["points"]["nodes"], runs[1]["points"]["nodes"], *growth
        )
        if min(ours_small["peak_mb"], ours_large["peak_mb"]) >= MIN_COMPARED_MB:
            line += f", {ours_large['peak_mb'] / ours_small['peak_mb']:.1f}x the peak memory"
        lines.append(line)
    return lines


def choose_widths(smoke: bool, threads: int) -> None:
    """Print the parameter counts of the width candidates and the closest (see the module
    docstring): se3tutor ``k (dim, dim_head)`` against the peer, equiformer ``k/4 (dim,
    dim_head)`` against the wide se3tutor that is configured."""
    same, wide = (SMOKE_SAME, SMOKE_WIDE) if smoke else (SAME, WIDE)

    def counts(library, candidates, stop_above):
        request = dict(library=library, candidates=candidates, stop_above=stop_above)
        arguments = ["--count", json.dumps(request)]
        return subprocess_json(library, arguments, threads)[0]

    def closest(library, target, steps, against):
        candidates = [
            dict(same, dim=round(same["dim"] * s), dim_head=round(same["dim_head"] * s))
            for s in steps
        ]
        found = counts(library, candidates, (1 + SIZE_TOLERANCE) * target)
        print(f"{library}: target {target:,} ({against})")
        for keywords, count in zip(candidates, found):
            print(f"  dim={keywords['dim']:>4} dim_head={keywords['dim_head']:>4} {count:>12,}")
        best = min(range(len(found)), key=lambda i: abs(math.log(found[i] / target)))
        print(f"  closest: {_widths(candidates[best])} ({found[best] / target:.3f}x)")

    (peer,) = counts("peer", [same], math.inf)
    closest("se3tutor", peer, range(1, 33), "the peer's count for the same keywords")
    (ours,) = counts("se3tutor", [wide], math.inf)
    quarters = [m / 4 for m in range(1, 65) if (same["dim_head"] * m) % 4 == 0]
    closest("equiformer", ours, quarters, "the configured wide se3tutor")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat")
    parser.add_argument(
        "--section", action="append", choices=SECTIONS, help="run this section (default: all)"
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--cap-gb", type=float, default=16.0, help="most address space one step may add"
    )
    parser.add_argument("--choose-widths", action="store_true", help="print the width search")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--count", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        print(json.dumps(worker(json.loads(args.worker), args.repeats, args.threads)))
        return
    if args.count:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(count_parameters(**json.loads(args.count))))
        return
    if args.choose_widths:
        choose_widths(args.smoke, args.threads)
        return

    repeats = 1 if args.smoke else args.repeats
    sections = {
        name: runs
        for name, runs in plan(args.smoke, args.cap_gb * 1024).items()
        if name in (args.section or SECTIONS)
    }
    print(f"{args.threads} threads, median of {repeats}; models:", flush=True)
    order = list({run_key(run): run for runs in sections.values() for run in runs}.values())
    results = {}
    for group in groups(order, args.smoke):
        for run in group:
            keywords = ", ".join(f"{key}={value}" for key, value in run["model"].items())
            print(f"  {label(run)}: ({keywords})", flush=True)
        for run, result in zip(group, run_group(group, repeats, args.threads)):
            results[run_key(run)] = result

    checksums = {}
    for run in order:
        checksum = results[run_key(run)]["points_checksum"]
        seen = checksums.setdefault(json.dumps(run["points"], sort_keys=True), checksum)
        if checksum is not None and seen is not None and checksum != seen:
            print(f"WARNING: {label(run)} got other points (another torch?)")

    print(
        f"{'library, configuration':<54}{'points':>9}{'edges':>9}{'fwd+bwd (s)':>13}"
        f"{'peak MB':>10}{'params':>11}{'inv. error':>12}"
    )
    for run in order:
        print(row(run, results[run_key(run)]))
    print(f"peak MB: {memory_kind('cpu')}")
    print("OOM: an allocation failed when the step grew the address space past the peak MB column")
    for name, runs in sections.items():
        for line in summary(name, runs, results):
            print(line)
    if args.smoke:
        print("--smoke: tiny models, one repeat: a check of this script, not a measurement")


if __name__ == "__main__":
    main()
