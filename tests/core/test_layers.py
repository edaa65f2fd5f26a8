"""The package's layering, read from the code itself: no import cycles among llmclip's modules
(every import counts, including the ones deferred into functions), and the lower layers never
reach up: the stage-2 training side does not import the LLM code, the clinical text package does
not import the shard format, and no library module imports the command-line entry point."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PKG = REPO / "llmclip"


def _modules() -> dict[str, Path]:
    mods = {}
    for p in PKG.rglob("*.py"):
        parts = p.relative_to(REPO).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return mods


MODULES = _modules()


def _targets(name: str, node: ast.AST) -> list[str]:
    """llmclip modules one import statement loads (``from pkg import sub`` -> ``pkg.sub`` only)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in MODULES]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:
        base = name.split(".") if MODULES[name].name == "__init__.py" else name.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        mod = ".".join(base + ([node.module] if node.module else []))
    else:
        mod = node.module or ""
    subs = [f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in MODULES]
    return subs or ([mod] if mod in MODULES else [])


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        graph[name] = {t for n in ast.walk(tree) for t in _targets(name, n) if t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_walker_sees_a_cycle_and_a_deferred_import():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    tree = ast.parse("def f():\n    from llmclip.clip import trainer\n")
    assert [t for n in ast.walk(tree) for t in _targets("llmclip.api", n)] == ["llmclip.clip.trainer"]


def test_no_import_cycles():
    assert cycles(import_graph()) == []


@pytest.mark.parametrize(
    "lower, upper",
    [
        ("llmclip.clip", "llmclip.text"),  # stage 2 trains on cached embeddings, never an LLM
        ("llmclip.clinical", "llmclip.data"),  # pure text: no shard format
        ("llmclip.data", "llmclip.cli"),
        ("llmclip.text", "llmclip.clip"),
    ],
)
def test_lower_layers_do_not_import_upper_ones(lower, upper):
    graph = import_graph()
    bad = sorted((m, t) for m, ts in graph.items() for t in ts
                 if (m == lower or m.startswith(lower + ".")) and (t == upper or t.startswith(upper + ".")))
    assert bad == []


@pytest.mark.parametrize("module, forbidden", [("llmclip.clip.trainer", "llmclip.text"),
                                               ("llmclip.clinical", "llmclip.data")])
def test_importing_a_layer_loads_nothing_above_it(module, forbidden):
    code = (f"import sys, {module}; "
            f"print(sorted(m for m in sys.modules if m == '{forbidden}' or m.startswith('{forbidden}.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]", out.stdout
