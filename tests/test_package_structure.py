"""The package's import graph: no cycles (not even through imports inside functions), and the data model and
the method math never reach up into files, surgery or the CLI."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "adaptermerge"


def _modules() -> dict[str, Path]:
    out = {}
    for f in ROOT.rglob("*.py"):
        name = ".".join(("adaptermerge", *f.relative_to(ROOT).with_suffix("").parts)).removesuffix(".__init__")
        out[name] = f
    return out


def _imports(f: Path, mods: dict[str, Path]) -> set[str]:
    """Every adaptermerge module ``f`` imports, at module level or inside functions (not under TYPE_CHECKING)."""
    found: set[str] = set()

    def visit(node: ast.AST, type_checking: bool) -> None:
        for ch in ast.iter_child_nodes(node):
            tc = type_checking or (isinstance(ch, ast.If) and "TYPE_CHECKING" in ast.unparse(ch.test))
            if not tc and isinstance(ch, ast.ImportFrom) and (ch.module or "").startswith("adaptermerge"):
                found.add(ch.module)
                found.update(f"{ch.module}.{a.name}" for a in ch.names)
            elif not tc and isinstance(ch, ast.Import):
                found.update(a.name for a in ch.names)
            visit(ch, tc)

    visit(ast.parse(f.read_text(encoding="utf-8")), False)
    return {m for m in found if m in mods}


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    # the package's __init__ only re-exports lazily (PEP 562): importing it imports nothing
    return {m: _imports(f, mods) - {m, "adaptermerge"} for m, f in mods.items()}


def test_no_import_cycles() -> None:
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycle = stack[stack.index(n) :] + [n]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if n not in state:
                dfs(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            dfs(m)


def test_lower_layers_do_not_import_higher_ones() -> None:
    """errors, dtypes, lowrank, adapter (the data model) and the method math depend on nothing above them."""
    graph = _graph()
    low = {"adaptermerge.errors", "adaptermerge.dtypes", "adaptermerge.lowrank", "adaptermerge.adapter"}
    high = ("adaptermerge.io", "adaptermerge.surgery", "adaptermerge.validation", "adaptermerge.train",
            "adaptermerge.combination", "adaptermerge.evaluation", "adaptermerge.hub", "adaptermerge.demo")  # fmt: skip
    for m, deps in graph.items():
        if m in low or m.startswith("adaptermerge.methods."):
            bad = sorted(d for d in deps if d.startswith(high))
            assert not bad, f"{m} imports {bad}"
