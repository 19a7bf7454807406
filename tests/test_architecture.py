"""The import graph matches docs/architecture.md: every module sits in one layer, imports only its own layer
or lower ones, and no two modules import each other (directly or around a circle).

Imports are read with ast from the source (top level, inside functions and under TYPE_CHECKING alike), so a
lazy import that would close a circle at run time is caught too.
"""

from __future__ import annotations

import ast
import functools
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "sd35hub"
ARCHITECTURE = ROOT / "docs" / "architecture.md"

# Lowest first. A module belongs to the first entry whose prefix matches its dotted name (longest prefix wins).
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("core", ("sd35hub.errors", "sd35hub.redact", "sd35hub.diskspace", "sd35hub.paths", "sd35hub.pngmeta",
              "sd35hub.config_checks", "sd35hub.config", "sd35hub.hardware", "sd35hub.hubhttp", "sd35hub.access",
              "sd35hub.run_summary", "sd35hub.failures")),
    ("models", ("sd35hub.models",)),
    ("data", ("sd35hub.data",)),
    ("adapters", ("sd35hub.adapters",)),
    ("hub", ("sd35hub.hub",)),
    ("plan", ("sd35hub.workflows.plan", "sd35hub.workflows.sizes", "sd35hub.workflows.checks")),
    ("train", ("sd35hub.train",)),
    ("blend", ("sd35hub.blend",)),
    ("workflows", ("sd35hub.workflows", "sd35hub.bench")),
    ("frontends", ("sd35hub.frontends", "sd35hub.__main__")),
]  # fmt: skip
KNOWN_CIRCLES: list[list[str]] = []  # none left (models.components and models.load share models.locate)
# Upward imports not yet removed (docs/architecture.md, "Not yet"); listed so that no new one goes unnoticed.
KNOWN_UPWARD = [
]
# sd35hub/__init__.py is the lazy public API: its imports sit inside functions and may reach any layer.
PUBLIC_API = "sd35hub"


def module_files() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """sd35hub modules that ``name`` imports anywhere in its source (package imports resolve to the package)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def resolve(dotted: str) -> str | None:
        while dotted and dotted not in known:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from sd35hub.hub import card` imports the module sd35hub.hub.card, not just the package
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for target in targets:
            if target == "sd35hub" or target.startswith("sd35hub."):
                resolved = resolve(target)
                if resolved and resolved != name:
                    found.add(resolved)
    return found


@functools.cache  # one parse of the package for all the tests here
def import_graph() -> dict[str, frozenset[str]]:
    files = module_files()
    return {name: frozenset(imports_of(name, path, set(files))) for name, path in files.items()}


def layer_of(name: str) -> int:
    best, best_len = -1, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    return best


def test_every_module_has_a_layer() -> None:
    unplaced = [name for name in import_graph() if name != PUBLIC_API and layer_of(name) < 0]
    assert not unplaced, f"modules in no layer (add them to LAYERS and docs/architecture.md): {unplaced}"


def test_no_import_runs_up_the_layers() -> None:
    upward = []
    for name, deps in import_graph().items():
        if name == PUBLIC_API:
            continue
        for dep in sorted(deps):
            if dep != PUBLIC_API and layer_of(dep) > layer_of(name):
                upward.append(f"{name} ({LAYERS[layer_of(name)][0]}) -> {dep} ({LAYERS[layer_of(dep)][0]})")
    assert upward == KNOWN_UPWARD, "imports that run up the layers:\n" + "\n".join(upward)


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative; components of more than one module are import circles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in graph:
                    continue
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    circles.append(sorted(component))
    return circles


def test_no_import_circles() -> None:
    graph = {name: set(deps) - {PUBLIC_API} for name, deps in import_graph().items()}
    assert strongly_connected(graph) == KNOWN_CIRCLES


def test_the_cycle_finder_finds_a_circle() -> None:
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_architecture_doc_lists_the_same_layers() -> None:
    """docs/architecture.md's layer table names each layer, lowest first, in the order used here."""
    text = ARCHITECTURE.read_text(encoding="utf-8")
    table = re.findall(r"^\| (\d+) \| (\w+) \|", text, flags=re.M)
    assert [(int(n), layer) for n, layer in table] == [(i, name) for i, (name, _) in enumerate(LAYERS)]


def test_import_sd35hub_loads_no_torch() -> None:
    code = "import sys, sd35hub, sd35hub.frontends.cli; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
