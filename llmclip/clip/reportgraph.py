"""The clinical toolkit's ``ReportGraph``, flattened to what the GCN and the soft labels need.

``graph_parts(text)`` -> (nodes, edges): nodes as (name, status, type) in the graph's stable order
(status "none" for anatomy and modifiers), edges as (source row, target row, relation).
"""

from __future__ import annotations


def graph_parts(text: str) -> tuple[list[tuple[str, str, str]], list[tuple[int, int, str]]]:
    from llmclip.clinical import ReportGraph

    graph = ReportGraph.from_report(text or "")
    nodes = [(n.name, n.status or "none", n.type) for n in graph.nodes]
    edges = [(e.src, e.dst, e.relation) for e in graph.edges]
    return nodes, edges
