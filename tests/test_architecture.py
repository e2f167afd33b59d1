"""The package layout's rules, checked on the source (docs/architecture.md says why).

Every `import` counts: at module level, under `if TYPE_CHECKING:`, and inside functions. A circle that only
type hints close is still a circle: it says two modules are one concept, or that a protocol is missing.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROOTS = ("qlmctl", "simulator")

FORBIDDEN: dict[str, tuple[str, ...]] = {
    # The simulator is the engine model: it knows nothing of qlmctl.
    "simulator": ("qlmctl",),
    # The engine seam talks to engine servers; it knows nothing of who uses it.
    "qlmctl.engines": ("qlmctl.gateway", "qlmctl.emulator", "qlmctl.client", "qlmctl.core", "qlmctl.policies",
                       "qlmctl.backends", "qlmctl.runner", "qlmctl.scenario"),
    # The emulator is an engine server: it speaks vLLM's API over the simulator's engine model.
    "qlmctl.emulator": ("qlmctl.gateway", "qlmctl.client", "qlmctl.engines", "qlmctl.core", "qlmctl.policies",
                        "qlmctl.backends", "qlmctl.runner"),
    # Client tools talk HTTP to a server, whichever it is.
    "qlmctl.client": ("qlmctl.gateway", "qlmctl.emulator", "qlmctl.core.driver", "qlmctl.policies",
                      "qlmctl.backends", "qlmctl.runner"),
    # The live world never reaches into the simulated one: the core is the one door between them.
    "qlmctl.gateway": ("qlmctl.backends", "qlmctl.runner", "qlmctl.emulator"),
    # The core and the policies see a ClusterView, never a world.
    "qlmctl.core": ("qlmctl.backends", "qlmctl.gateway", "qlmctl.runner"),
    "qlmctl.policies": ("qlmctl.backends", "qlmctl.gateway", "qlmctl.runner", "qlmctl.core.driver"),
}
"""Package (or module) -> the packages and modules it must not import."""


def _modules() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for root in ROOTS:
        for path in sorted((REPO / root).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _imports(module: str, path: Path) -> set[str]:
    """First-party modules `module` imports: each import's most specific target that is a module here."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    targets: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                src = ".".join(base + ([node.module] if node.module else []))
            else:
                src = node.module or ""
            targets += [f"{src}.{a.name}" for a in node.names] + [src]
    out: set[str] = set()
    for t in targets:
        while t and t not in MODULES:
            t = t.rpartition(".")[0]
        if t and t != module:
            out.add(t)
    return out


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_sees_the_layout():
    assert {"qlmctl.gateway.cluster", "qlmctl.engines.base", "qlmctl.emulator.server", "qlmctl.client.replay",
            "simulator.engine"} <= set(MODULES)
    assert "qlmctl.engines.base" in GRAPH["qlmctl.gateway.instance"]
    assert "qlmctl.gateway.instance" in GRAPH["qlmctl.gateway.health"]  # under TYPE_CHECKING
    assert not any(_within(m, "qlmctl.live") for m in MODULES)


def test_no_import_circles():
    circles = _cycles(GRAPH)
    detail = "\n".join(
        " <-> ".join(c) + ":\n" + "\n".join(f"    {m} imports {sorted(GRAPH[m] & set(c))}" for m in c)
        for c in circles)
    assert not circles, f"import circles:\n{detail}"


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_packages_import_only_what_their_room_may(package):
    bad = sorted(
        f"{m} imports {t}"
        for m, targets in GRAPH.items() if _within(m, package)
        for t in targets if any(_within(t, f) for f in FORBIDDEN[package])
    )
    assert not bad, "\n".join(bad)


def test_the_circle_finder_finds_circles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
