"""Each program imports only what it runs: the control plane never loads torch or the worker package, and no
module-level import cycle joins our packages."""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Folder -> import package, for every package we ship or run (bench/dgemma_sim is run by the benchmarks).
PACKAGES = {"common": "dgemma_common", "worker": "dgemma_worker", "gateway": "dgemma_gateway",
            "operator": "dgemma_operator", "proto": "dgemma_proto", "devloop": "dgemma_serve", "cli": "dgemma_cli",
            "bench": "dgemma_sim"}
CONTROL_PLANE = ("dgemma_common", "dgemma_proto", "dgemma_gateway", "dgemma_operator", "dgemma_cli")
FORBIDDEN = ("torch", "transformers", "tokenizers", "safetensors", "dgemma_worker", "dgemma_serve")

# Run in a fresh interpreter: a finder placed first on sys.meta_path refuses the worker's stack, then every
# module of the control-plane packages is imported.
_BLOCKED_IMPORT = """
import importlib, pkgutil, sys
FORBIDDEN = {forbidden!r}
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in FORBIDDEN:
            raise ImportError("blocked by the test: " + name)
        return None
sys.meta_path.insert(0, Refuse())
for top in {packages!r}:
    package = importlib.import_module(top)
    for info in pkgutil.walk_packages(package.__path__, top + "."):
        importlib.import_module(info.name)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in FORBIDDEN)
print("loaded:", loaded)
sys.exit(1 if loaded else 0)
"""


def test_the_control_plane_imports_every_module_with_torch_and_the_worker_blocked() -> None:
    code = _BLOCKED_IMPORT.format(forbidden=FORBIDDEN, packages=CONTROL_PLANE)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def _module_name(path: Path) -> str | None:
    for folder, package in PACKAGES.items():
        base = ROOT / folder
        if path.is_relative_to(base / package):
            parts = path.relative_to(base).with_suffix("").parts
            return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    return None


def _top_level_imports(tree: ast.Module, module: str, is_package: bool) -> set[str]:
    """Modules imported at module level (imports inside functions run later and cannot form an import cycle)."""
    found: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return found


def import_graph() -> dict[str, set[str]]:
    """Our modules and the modules of ours each imports at module level."""
    sources: dict[str, tuple[Path, bool]] = {}
    for folder, package in PACKAGES.items():
        for path in (ROOT / folder / package).rglob("*.py"):
            name = _module_name(path)
            if name and "_pb2" not in name:
                sources[name] = (path, path.name == "__init__.py")
    graph: dict[str, set[str]] = {}
    for name, (path, is_package) in sources.items():
        imported = _top_level_imports(ast.parse(path.read_text()), name, is_package)
        graph[name] = {m for m in imported if m in sources and m != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules, or None (depth-first search with colours)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_module_level_import_cycle_joins_our_modules() -> None:
    graph = import_graph()
    assert len(graph) > 50  # the walk found our packages
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_the_gateway_and_operator_import_neither_each_other_nor_the_dev_loop() -> None:
    graph = import_graph()
    for module, imported in graph.items():
        top = module.split(".")[0]
        if top in ("dgemma_gateway", "dgemma_operator", "dgemma_common"):
            others = {m.split(".")[0] for m in imported} - {top, "dgemma_common", "dgemma_proto"}
            assert not others, f"{module} imports {sorted(others)}"


def test_every_shipped_package_is_walked() -> None:
    names = {info.name for info in pkgutil.iter_modules([str(ROOT / f) for f in PACKAGES])}
    assert set(PACKAGES.values()) <= names
