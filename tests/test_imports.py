"""No import cycle anywhere: every module-level and function-level import between the project's
own modules, read from the source with `ast`, forms an acyclic graph."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("medmerge_core", "client", "server", "simulations")


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the project's packages."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules `name` imports anywhere in its file (functions included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:  # `from pkg import module` imports that module
                out.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {m for m in out if m in known and m != name}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_import_graph_has_no_cycle() -> None:
    found = modules()
    graph = {name: imports(name, path, set(found)) for name, path in found.items()}
    assert graph["medmerge_core.saved_model"] >= {"medmerge_core.experiment.run_folder"}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]


def test_reading_a_run_folder_imports_neither_the_runner_nor_the_probe() -> None:
    """saved_model (evaluate, export) reads run folders through ExperimentRun alone."""
    found = modules()
    graph = {name: imports(name, path, set(found)) for name, path in found.items()}
    reached, todo = set(), ["medmerge_core.saved_model"]
    while todo:
        for target in graph[todo.pop()] - reached:
            reached.add(target)
            todo.append(target)
    assert not reached & {"medmerge_core.experiment.runner", "medmerge_core.probe"}


def _external_imports(path: Path) -> set[str]:
    """The top-level package of every absolute import in the file (functions included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {alias.name.partition(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            out.add(node.module.partition(".")[0])
    return out


def test_the_core_knows_nothing_of_flower_or_its_adapters() -> None:
    """medmerge_core imports neither flwr nor client/ nor server/, not even inside a function
    (the `medmerge site` subcommand comes in through an entry point, not an import)."""
    found = modules()
    offenders = {
        name: sorted(_external_imports(path) & {"flwr", "client", "server"})
        for name, path in found.items()
        if name.startswith("medmerge_core")
    }
    assert not {k: v for k, v in offenders.items() if v}
    assert "flwr" in _external_imports(found["client.site_runtime"])  # the check can see one


def test_the_site_policy_loads_without_torch() -> None:
    """A refusal's audit line is written by the site runtime before any bundle runs: reading
    the policy must not pay for a torch import (about 2 s per ClientApp process)."""
    code = (
        "import sys, medmerge_core.federation.site_policy, client.site_runtime; "
        "print(sorted(m for m in ('torch', 'torchvision') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
