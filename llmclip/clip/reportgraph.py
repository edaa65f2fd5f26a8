"""The report graph of the clinical toolkit, flattened to what the GCN and the soft labels need.

``graph_parts(text)`` -> (nodes, edges): nodes as (label, status, type) in report order, edges as
(source index, target index, relation) over those nodes. Labels are lower-cased entity names;
statuses are positive / negative / uncertain (or "none" for anatomy and other plain entities).
"""

from __future__ import annotations

from typing import Any


def _field(obj: Any, *names: str, default: Any = None) -> Any:
    for n in names:
        if isinstance(obj, dict) and n in obj:
            return obj[n]
        if hasattr(obj, n):
            return getattr(obj, n)
    return default


def graph_parts(text: str) -> tuple[list[tuple[str, str, str]], list[tuple[int, int, str]]]:
    from llmclip.clinical import ReportGraph

    graph = ReportGraph.from_report(text or "")
    nodes: list[tuple[str, str, str]] = []
    index: dict[Any, int] = {}
    for i, node in enumerate(graph.nodes):
        label = str(_field(node, "label", "name", "text", default="")).strip().lower()
        status = str(_field(node, "status", default="none") or "none").lower()
        ntype = str(_field(node, "type", "kind", default="other") or "other").lower()
        nodes.append((label, status, ntype))
        index[_field(node, "id", default=i)] = i
    edges: list[tuple[int, int, str]] = []
    for e in graph.edges:
        src = _field(e, "source", "src", "head", default=None)
        dst = _field(e, "target", "dst", "tail", default=None)
        rel = str(_field(e, "relation", "type", "kind", default="other") or "other").lower()
        if isinstance(e, (tuple, list)) and len(e) == 3:
            src, rel_or_dst, third = e
            # (src, relation, dst) or (src, dst, relation)
            src, dst, rel = (
                (src, third, str(rel_or_dst))
                if isinstance(rel_or_dst, str)
                else (src, rel_or_dst, str(third))
            )
        if src in index and dst in index:
            edges.append((index[src], index[dst], rel))
    return nodes, edges
