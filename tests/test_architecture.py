"""The layers of docs/architecture.md hold: a lower package never imports a higher one, siblings
(scoring | evaluation, reporting | provenance) never import each other, the library never imports the
stages, and no two modules import each other in a cycle.

The contracts live in pyproject.toml ([tool.importlinter]) and `make lint` runs them; these tests run the
same contracts, show on a throw-away copy of the packages that a planted forbidden import breaks them (so a
green run means something), and check for module-level import cycles with grimp's graph, independently of
import-linter's contract code. grimp reads every import statement: lazy ones inside functions and those
under `if TYPE_CHECKING:` included.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[1]
# What the `lint-imports` console script of `make lint` runs, in this interpreter.
LINT_IMPORTS = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"


def lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    """`lint-imports` on `cwd`'s pyproject.toml, finding `transferlab` and `stages` in `cwd` first."""
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    cmd = [sys.executable, "-c", LINT_IMPORTS, "--no-cache", "--no-logo"]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)


def import_cycles(package: str) -> list[list[str]]:
    """The import cycles among `package`'s modules: strongly connected components of more than one module.

    An edge from a package to one of its own submodules is left out: a registry's `__init__` that imports
    (or is imported by) the modules it registers is how registries work, not a cycle between layers.

    Returns:
        Each cycle's modules, sorted; an empty list when the graph is acyclic.
    """
    graph = grimp.build_graph(package, cache_dir=None)
    edges = {
        m: sorted(i for i in graph.find_modules_directly_imported_by(m) if not i.startswith(m + "."))
        for m in sorted(graph.modules)
    }
    return [sorted(c) for c in strongly_connected_components(edges) if len(c) > 1]


def strongly_connected_components(edges: dict[str, list[str]]) -> list[set[str]]:
    """Tarjan's algorithm, iterative (no recursion limit on deep graphs)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[set[str]] = []
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(edges.get(root, ())))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.add(member)
                        if member == node:
                            break
                    out.append(component)
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(edges.get(child, ()))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return out


# (a) The contracts of pyproject.toml hold on the package as it is.


def test_import_contracts_are_kept():
    result = lint_imports(ROOT)
    assert result.returncode == 0, f"`lint-imports` (make lint) failed:\n{result.stdout}\n{result.stderr}"
    assert "BROKEN" not in result.stdout
    assert " 0 broken" in result.stdout, result.stdout


# (b) The contracts can fail: each case plants one forbidden import in a copy of the package.

PLANTED = {  # case -> (file in the copied package, code appended to it; the file is created if missing)
    # a low layer importing a high one, at module level
    "core imports diagnosis": ("core/_planted.py", "import transferlab.diagnosis.findings\n"),
    # the bottom layer is a leaf (params.py is a module: the import is appended to a copy of it)
    "params imports core": ("params.py", "\nimport transferlab.core.io  # noqa: E402\n"),
    # siblings are independent of each other
    "scoring imports evaluation": ("scoring/_planted.py", "from transferlab.evaluation import metrics\n"),
    "provenance imports reporting": ("provenance/_planted.py", "import transferlab.reporting.report\n"),
    # a lazy import inside a function counts as much as one at the top
    "data imports training lazily": (
        "data/_planted.py",
        "def planted():\n    from transferlab.training import loop\n\n    return loop\n",
    ),
    # the library never imports the stages built on it
    "the library imports a stage": ("evaluation/_planted.py", "from stages import _common\n"),
}


def _copy_package(tmp_path: Path) -> Path:
    """A throw-away copy of the repository's packages (the contracts' root packages) and of its contracts
    (pyproject.toml) in tmp_path."""
    for package in ("transferlab", "stages"):
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


@pytest.mark.parametrize("case", sorted(PLANTED))
def test_a_planted_forbidden_import_breaks_the_contracts(tmp_path, case):
    relpath, code = PLANTED[case]
    copy = _copy_package(tmp_path)
    target = copy / "transferlab" / relpath
    target.write_text((target.read_text() if target.exists() else "") + code)
    importer = "transferlab." + relpath.removesuffix(".py").replace("/", ".")

    result = lint_imports(copy)

    assert result.returncode != 0, result.stdout
    assert "BROKEN" in result.stdout
    # The report names the planted import: the copy was checked (not the installed package), and the
    # failure is the plant's, not some other violation's.
    assert re.search(rf"^-\s+{re.escape(importer)} -> ", result.stdout, re.MULTILINE), result.stdout


def test_a_package_outside_the_layers_breaks_the_contracts(tmp_path):
    """The layers contract is exhaustive: a new subpackage fails until it is given its layer."""
    copy = _copy_package(tmp_path)
    (copy / "transferlab" / "newlayer").mkdir()
    (copy / "transferlab" / "newlayer" / "__init__.py").write_text('"""Not placed in any layer."""\n')

    result = lint_imports(copy)

    assert result.returncode != 0, result.stdout
    assert "transferlab.newlayer" in result.stdout, result.stdout


# (c) No import cycles among transferlab's modules, whatever the layers say.


def test_no_import_cycles_between_modules():
    cycles = import_cycles("transferlab")
    assert cycles == [], "import cycles (each list imports itself round):\n" + "\n".join(map(str, cycles))


def test_the_cycle_check_finds_a_cycle(tmp_path, monkeypatch):
    """A tiny fake package whose modules import each other round, one of them lazily, the way a cycle
    usually creeps in; a registry package importing its own submodule is not reported."""
    pkg = tmp_path / "cyclepkg"
    (pkg / "reg").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from cyclepkg import b\n")
    (pkg / "b.py").write_text("def f():\n    from cyclepkg import c\n\n    return c\n")
    (pkg / "c.py").write_text("import cyclepkg.a\n")
    (pkg / "reg" / "__init__.py").write_text("from cyclepkg.reg import entry\n")
    (pkg / "reg" / "entry.py").write_text("import cyclepkg.reg\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    assert import_cycles("cyclepkg") == [["cyclepkg.a", "cyclepkg.b", "cyclepkg.c"]]
