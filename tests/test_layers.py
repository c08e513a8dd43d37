"""The house plan's import rules (README, "Development"), read from the source with ast.

Every import counts, also one inside a function; an import under ``if TYPE_CHECKING:``
counts for the layer rules (a type is a dependency too) but not for circles (it
never runs).
"""

from __future__ import annotations

import ast
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("agent", "hq", "drivers")
# Where the site's parts are put together: they may import every layer.
ROOTS = {"agent.cli", "agent.daemon"}
FLOW = ("agent.devices", "agent.pipeline", "agent.outbox", "agent.uplink")


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    line: int
    type_only: bool

    def __str__(self) -> str:
        return f"{self.source}:{self.line} imports {self.target}"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for top in PACKAGES for p in (REPO / top).rglob("*.py")}


def edges() -> list[Edge]:
    known = modules()
    found: list[Edge] = []
    for name, path in known.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        type_only: set[int] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                type_only.update(id(inner) for inner in ast.walk(node))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                # ``from agent.web import api`` imports agent.web.api, not only the package
                targets = [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            for target in targets:
                while target and target not in known:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    found.append(Edge(name, target, node.lineno, id(node) in type_only))
    return found


def within(module: str, *packages: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


EDGES = edges()
# agent/*.py but the roots: config, errors, envelope, proof, logs, ... shared by every layer.
CORE = {module_name(p) for p in (REPO / "agent").glob("*.py")} - ROOTS - {"agent"}


# rule -> whether an import breaks it
RULES: dict[str, Callable[[Edge], bool]] = {
    "drivers": lambda e: within(e.source, "drivers") and within(e.target, "agent", "hq"),
    "web": lambda e: within(e.target, "agent.web") and not (
        within(e.source, "agent.web") or e.source in ROOTS or e.source == "hq.web"),
    "flow": lambda e: within(e.source, *FLOW) and within(e.target, "agent.web", "agent.ops"),
    "hq": lambda e: within(e.source, "agent") and within(e.target, "hq") and not (
        e.source == "agent.cli" or within(e.source, "agent.testing")),
    "testing": lambda e: within(e.target, "agent.testing") and not within(e.source,
                                                                          "agent.testing"),
    "core": lambda e: e.source in CORE and e.target.count(".") >= 2,
}


def offenders(rule: str) -> list[str]:
    return [str(e) for e in EDGES if RULES[rule](e)]


@pytest.mark.parametrize(("rule", "why"), [
    ("drivers", "drivers/ is hardware only: it never imports agent/ or hq/"),
    ("web", "nothing imports agent/web but itself, the daemon and cli, and HQ's page (hq/web.py)"),
    ("flow", "devices, pipeline, outbox and uplink never import web/ or ops/"),
    ("hq", "agent/ never imports hq/ but for the cli's `edge-agent hq` and the test harnesses"),
    ("testing", "production code never imports agent/testing (the broker, site and demo harness)"),
    ("core", "agent/'s core modules (config, errors, envelope, ...) import no agent subpackage"),
])
def test_import_rule(rule: str, why: str) -> None:
    """Each house-plan rule holds for every import in agent/, hq/ and drivers/."""
    assert offenders(rule) == [], why


def test_no_import_circles() -> None:
    """No two modules import each other, directly or around a circle (lazy imports too)."""
    graph: dict[str, set[str]] = {m: set() for m in modules()}
    for e in EDGES:
        # a module importing its own package's __init__ is not a circle of modules
        if not e.type_only and not within(e.source, e.target):
            graph[e.source].add(e.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(v: str) -> None:   # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert circles == []


def test_the_rules_see_an_import() -> None:
    """The reader finds imports at all (a rule over zero edges would pass for nothing)."""
    assert any(e.source == "agent.daemon" and e.target == "agent.web.api" for e in EDGES)
    assert any(e.type_only for e in EDGES)
