"""What a reader on Colab installs: the package's dependencies and each chapter's first cell.

    python ci/colab_install.py book/convolution.ipynb book/attention.ipynb ...

pyproject.toml's hard dependencies must be lower bounds only (``torch>=2.1``, not ``==`` nor an
upper bound: Colab's CUDA torch must stay) and must not include a compiled extension
(torch-scatter, torch-cluster: optional extras, minutes of building from source).

Each chapter's first code cell must, as the README promises:

- install se3tutor only when it cannot be imported (``try: import se3tutor`` /
  ``except ImportError:`` / ``%pip install ...``);
- install it loosely: no ``==`` pin of se3tutor, no optional extras (``se3tutor[pyg]``: those
  build from source for minutes), and no torch of its own (Colab's CUDA torch stays);
- pick the GPU when there is one (``torch.cuda.is_available()`` choosing ``device``).

It also counts the later code cells that use ``device``: a chapter that picks the GPU and then
never uses it runs on the CPU all the same. Standard library only.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMPILED = ("torch-scatter", "torch-cluster", "torch-sparse", "torch-spline-conv", "pyg-lib")


def dependency_problems(pyproject: Path) -> list:
    """What is wrong with the hard dependencies of ``pyproject`` (empty when nothing is)."""
    import tomllib  # Python 3.11

    dependencies = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    problems = []
    for requirement in dependencies:
        match = re.match(r"\s*([A-Za-z0-9_.-]+)\s*(\[[^]]*\])?\s*(.*)", requirement)
        name, spec = match.group(1).lower().replace("_", "-"), match.group(3)
        if name in COMPILED:
            problems.append(f"{requirement!r}: a compiled extension as a hard dependency")
        for op in re.findall(r"(===|==|~=|!=|<=|<|>=|>)", spec.split(";")[0]):
            if op not in (">=", ">", "!="):
                problems.append(f"{requirement!r}: not a lower bound only ({op})")
    return problems


def first_code_cell(path: Path) -> tuple:
    notebook = json.loads(path.read_text(encoding="utf-8"))
    code = ["".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == "code"]
    if not code:
        return "", []
    return code[0], code[1:]


def problems_of(source: str) -> list:
    """What is wrong with a first cell (empty when nothing is)."""
    problems = []
    guarded = re.search(
        r"try:\s*\n\s+import se3tutor\b.*?\nexcept (ModuleNotFoundError|ImportError)\b[^\n]*\n"
        r"(\s+[^\n]*\n)*?\s+[%!]pip install (?P<args>[^\n]*)",
        source + "\n",
        re.S,
    )
    if not guarded:
        problems.append(
            "does not install se3tutor only when it is missing "
            "(try: import se3tutor / except ImportError: %pip install ...)"
        )
    else:
        args = guarded.group("args")
        spec = re.search(r"""["']?(se3tutor[^"'\s]*(?:\s*@\s*[^"'\s]+)?)["']?""", args)
        if not spec:
            problems.append(f"the %pip install line does not name se3tutor: {args!r}")
        else:
            name = spec.group(1)
            if re.match(r"se3tutor\s*\[", name):
                problems.append(f"installs optional extras: {name!r}")
            if re.match(r"se3tutor\s*==", name):
                problems.append(f"pins se3tutor exactly: {name!r}")
        if re.search(r"\btorch\b", args):
            problems.append(f"installs a torch of its own (Colab's would be replaced): {args!r}")
        if "--no-deps" in args:
            problems.append(f"installs se3tutor without its dependencies: {args!r}")
    if not re.search(
        r"device\s*=\s*torch\.device\(\s*[\"']cuda[\"']\s+if\s+torch\.cuda\.is_available\(\)",
        source,
    ):
        problems.append(
            'does not pick the GPU when there is one (device = torch.device("cuda" if '
            'torch.cuda.is_available() else "cpu"))'
        )
    return problems


def main(paths: list) -> int:
    pyproject = ROOT / "pyproject.toml"
    problems = dependency_problems(pyproject)
    print(f"{'ok  ' if not problems else 'FAIL'} {pyproject.relative_to(ROOT)}: hard dependencies")
    for problem in problems:
        print(f"       - {problem}")
    failed = int(bool(problems))
    for name in paths:
        path = Path(name)
        first, rest = first_code_cell(path)
        problems = problems_of(first)
        install = re.search(r"[%!]pip install[^\n]*", first)
        using_device = sum("device" in cell for cell in rest)
        failed += bool(problems)
        print(
            f"{'ok  ' if not problems else 'FAIL'} {path}: "
            f"{install.group(0) if install else 'no pip install'}; "
            f"{using_device} of {len(rest)} later code cells use device"
        )
        for problem in problems:
            print(f"       - {problem}")
    print(f"{1 + len(paths) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
