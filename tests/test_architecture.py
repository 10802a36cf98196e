"""The package arrows of docs/architecture.md hold, and no import circle exists between fedxray's modules.

client, server and clinic use common; simulations may use all of them as a user would; common
uses none of them; client and server never import each other. Every import counts, also those
inside functions (deferred for start-up time): an arrow is an arrow wherever it is written.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "client", "server", "simulations", "clinic")
ALLOWED = {
    "common": {"common"},
    "client": {"common", "client"},
    "server": {"common", "server"},
    "clinic": {"common", "clinic"},
    "simulations": {"common", "client", "server", "simulations", "clinic"},
}
#: Product modules may not grow past this many lines (one idea per module; split beyond).
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            out[".".join(rel.parts).removesuffix(".__init__")] = path
    return out


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name.split(".")[0] in PACKAGES}


MODULES = _modules()


@pytest.mark.parametrize("module", sorted(MODULES))
def test_arrows_go_one_way(module: str) -> None:
    package = module.split(".")[0]
    wrong = sorted(i for i in _imports(MODULES[module]) if i.split(".")[0] not in ALLOWED[package])
    assert not wrong, f"{module} imports {wrong}: {package} may only use {sorted(ALLOWED[package])}"


def test_no_import_circle() -> None:
    graph = {m: {i for i in _imports(p) if i in MODULES and i != m} for m, p in MODULES.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            pytest.fail("import circle: " + " -> ".join(cycle))


@pytest.mark.parametrize("module", sorted(MODULES))
def test_modules_stay_small(module: str) -> None:
    lines = len(MODULES[module].read_text().splitlines())
    assert lines <= MAX_LINES, f"{module} has {lines} lines: split it by idea (limit {MAX_LINES})"


def test_common_does_not_import_flower_except_the_bundle_builder() -> None:
    """common/ is shared by both sides and by tools that run without Flower; only the bundle builder needs it."""
    users = sorted(m for m, p in MODULES.items() if m.startswith("common.") and "flwr" in p.read_text()
                   and any(line.strip().startswith(("import flwr", "from flwr")) for line in p.read_text().splitlines()))
    assert users in ([], ["common.bundle"]), users
