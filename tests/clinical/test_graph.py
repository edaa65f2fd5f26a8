"""ReportGraph: entities, relations, stable JSON, numeric arrays for the graph encoder."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmclip.clinical import GRAPH_VOCAB, GRAPH_VOCAB_SHA, ReportGraph
from llmclip.clinical.graph import NODE_STATUSES, NODE_TYPES, RELATIONS

TEXT = (
    "There is patchy opacity in the left lung base which may represent pneumonia. "
    "Small right pleural effusion. Left chest wall pacemaker. No pneumothorax."
)


def _edges(g: ReportGraph) -> set[tuple[str, str, str]]:
    return {(g.nodes[e.src].name, e.relation, g.nodes[e.dst].name) for e in g.edges}


def test_entities_and_relations():
    g = ReportGraph.from_report(TEXT)
    by = {(n.type, n.name): n for n in g.nodes}
    assert by[("finding", "opacity")].status == "positive"
    assert by[("finding", "pneumonia")].status == "uncertain"
    assert by[("finding", "pneumothorax")].status == "negative"
    assert by[("device", "pacemaker")].status == "positive"
    assert ("anatomy", "lung base") in by
    edges = _edges(g)
    assert ("opacity", "located_at", "lung base") in edges
    assert ("opacity", "suggestive_of", "pneumonia") in edges
    assert ("small", "modify", "pleural effusion") in edges
    assert ("right", "modify", "pleural effusion") in edges
    assert ("left", "modify", "opacity") in edges
    assert [n.id for n in g.nodes] == list(range(len(g.nodes)))


def test_json_is_stable_and_round_trips():
    g = ReportGraph.from_report(TEXT)
    s = g.to_json()
    assert s == ReportGraph.from_report(TEXT).to_json()
    assert json.loads(s)["format"] == "llmclip-report-graph/1"
    back = ReportGraph.from_json(s)
    assert back.to_json() == s and back.nodes == g.nodes and back.edges == g.edges
    with pytest.raises(ValueError):
        ReportGraph.from_json('{"format": "something-else"}')
    with pytest.raises(ValueError):
        ReportGraph.from_json(s.replace('"located_at"', '"eats"'))
    with pytest.raises(ValueError):
        ReportGraph.from_json('{"format": "llmclip-report-graph/1", "nodes": [1, 2], "edges": []}')
    with pytest.raises(ValueError):
        ReportGraph.from_json('{"format": "llmclip-report-graph/1", "nodes": [], "edges": [[0]]}')


def test_arrays_for_gcn():
    g = ReportGraph.from_report(TEXT)
    a = g.to_arrays()
    n, e = len(g.nodes), len(g.edges)
    assert a["node_token"].shape == (n,) and a["edge_index"].shape == (2, e)
    assert all(v.dtype == np.int64 for v in a.values())
    assert [GRAPH_VOCAB[i] for i in a["node_token"]] == [x.name for x in g.nodes]
    assert [NODE_TYPES[i] for i in a["node_type"]] == [x.type for x in g.nodes]
    assert [NODE_STATUSES[i] for i in a["node_status"]] == [x.status for x in g.nodes]
    assert [RELATIONS[i] for i in a["edge_type"]] == [x.relation for x in g.edges]
    assert GRAPH_VOCAB[0] == "<unk>" and len(set(GRAPH_VOCAB)) == len(GRAPH_VOCAB)
    assert len(GRAPH_VOCAB_SHA) == 16
    t = g.to_tensors()
    assert t["edge_index"].shape == (2, e) and str(t["node_token"].dtype) == "torch.int64"


def test_empty_and_unseen_text():
    for text in ["", "   ", "No se observa derrame pleural.", "#$%^&*" * 1000]:
        g = ReportGraph.from_report(text)
        a = g.to_arrays()
        assert g.nodes == [] and g.edges == []
        assert a["node_token"].shape == (0,) and a["edge_index"].shape == (2, 0)


def test_openi_graphs(openi_texts):
    graphs = [ReportGraph.from_report(t) for t in openi_texts[:300]]
    assert sum(bool(g.nodes) for g in graphs) >= 295
    rels = {e.relation for g in graphs for e in g.edges}
    assert rels == set(RELATIONS)
    for g in graphs[:50]:
        assert ReportGraph.from_json(g.to_json()).to_json() == g.to_json()


@settings(max_examples=60, deadline=None, derandomize=True)
@given(text=st.text(max_size=300))
def test_any_text_gives_a_valid_graph(text):
    g = ReportGraph.from_report(text)
    assert ReportGraph.from_json(g.to_json()).to_json() == g.to_json()
    a = g.to_arrays()
    assert (a["edge_index"] < max(1, len(g.nodes))).all()
