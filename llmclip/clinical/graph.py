"""Report graphs: clinical entities and their relations, with a stable JSON form and arrays for a GCN.

Entities (nodes):
- ``finding``: a CheXpert observation mention (named by its lexicon term, e.g. "pleural effusion",
  "nodule", or by the observation for predicate forms, e.g. "cardiomegaly") or another finding of
  ``lexicon.GRAPH_FINDINGS`` ("granuloma", "emphysema", ...), with status positive / negative /
  uncertain (aggregated over the report: positive > uncertain > negative);
- ``device``: a support device ("pacemaker", "central line", "tube", ...), with status;
- ``anatomy``: a region of ``lexicon.ANATOMY`` ("lower lobe", "hilum", "costophrenic angle", ...);
- ``modifier``: laterality ("left", "right", "bilateral"), severity ("small", "moderate", ...) or
  "measurement".

Relations (edges, directed):
- ``located_at``: finding/device -> the nearest anatomy in the same sentence;
- ``modify``: modifier -> finding/device (and laterality -> anatomy next to it);
- ``suggestive_of``: finding -> finding when a cue such as "may represent", "consistent with",
  "suggestive of" stands between them in a sentence ("opacity ... may represent pneumonia").

Nodes are unique per (type, name) and sorted by (type, name), so equal reports give equal graphs
and ``to_json`` is byte-stable. ``to_arrays`` / ``to_tensors`` give the numeric form for the
stage-2 graph encoder:

- ``node_token`` int64 [N]: index of the node name in ``GRAPH_VOCAB`` (0 = "<unk>");
- ``node_type`` int64 [N]: ``NODE_TYPES`` index (finding 0, device 1, anatomy 2, modifier 3);
- ``node_status`` int64 [N]: ``NODE_STATUSES`` index (none 0, positive 1, negative 2,
  uncertain 3);
- ``edge_index`` int64 [2, E] (source row, target row) and ``edge_type`` int64 [E]:
  ``RELATIONS`` index (located_at 0, modify 1, suggestive_of 2).

``GRAPH_VOCAB`` is fixed by the lexicon (documented order: "<unk>", the 14 CheXpert names,
lexicon terms, extra findings, anatomy, modifiers); ``GRAPH_VOCAB_SHA`` fingerprints it so a
model can refuse graphs tokenised with another vocabulary. A report without entities gives an
empty graph (N = 0).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field

import numpy as np

from llmclip.clinical import lexicon as lx
from llmclip.clinical.fastre import WordStartMatcher, lower_same_length
from llmclip.clinical.labeler import Labeler, TextContext

NODE_TYPES = ("finding", "device", "anatomy", "modifier")
NODE_STATUSES = (None, "positive", "negative", "uncertain")
RELATIONS = ("located_at", "modify", "suggestive_of")
_LATERALITY_VALUES = ("left", "right", "bilateral")
_SEVERITY_VALUES = ("trace", "small", "mild", "moderate", "large", "severe")
GRAPH_VOCAB: tuple[str, ...] = tuple(
    dict.fromkeys(
        ["<unk>"]
        + [c.lower() for c in lx.CHEXPERT_CLASSES]
        + [term for _obs, term, _rx in lx.TERMS]
        + [name for name, _rx in lx.GRAPH_FINDINGS]
        + [name for name, _rx in lx.ANATOMY]
        + list(_LATERALITY_VALUES)
        + list(_SEVERITY_VALUES)
        + ["measurement"]
    )
)
GRAPH_VOCAB_SHA = hashlib.sha256("\n".join(GRAPH_VOCAB).encode()).hexdigest()[:16]
_VOCAB_INDEX = {w: i for i, w in enumerate(GRAPH_VOCAB)}
_STATUS_RANK = {"negative": 0, "uncertain": 1, "positive": 2}

_EXTRA = WordStartMatcher(
    [(f"g{i}", f"(?:{rx})(?!\\w)") for i, (_n, rx) in enumerate(lx.GRAPH_FINDINGS)]
)
_ANATOMY = WordStartMatcher(
    [(f"a{i}", f"(?:{rx})(?!\\w)") for i, (_n, rx) in enumerate(lx.ANATOMY)]
)
_SUGGESTIVE = re.compile(rf"\b(?:{lx.SUGGESTIVE_CUES})\b")
_LATERALITY_NEAR = re.compile(r"\b(left|right|bilateral|bilaterally|both)\s+(?:\w+\s+)?$")
_LOCATE_BEFORE = 50
_LOCATE_AFTER = 60
_LABELER = Labeler()


@dataclass(frozen=True)
class Node:
    """One entity of a report graph."""

    id: int
    """Row of the node (its index in ``ReportGraph.nodes``)."""
    type: str
    """"finding", "device", "anatomy" or "modifier"."""
    name: str
    """Canonical name (a ``GRAPH_VOCAB`` word)."""
    status: str | None = None
    """"positive", "negative", "uncertain" for findings and devices; None otherwise."""
    observation: str | None = None
    """CheXpert class of a finding/device, if it is one."""


@dataclass(frozen=True)
class Edge:
    """A directed relation between two nodes."""

    src: int
    """Source node id."""
    dst: int
    """Target node id."""
    relation: str
    """"located_at", "modify" or "suggestive_of"."""


@dataclass
class ReportGraph:
    """Entities and relations of one report (see module doc)."""

    nodes: list[Node] = field(default_factory=list)
    """Nodes sorted by (type, name); ``nodes[i].id == i``."""
    edges: list[Edge] = field(default_factory=list)
    """Edges sorted by (src, dst, relation), no duplicates."""

    @classmethod
    def from_report(cls, text: str) -> ReportGraph:
        """Build the graph of a report (empty graph for empty / unseen text)."""
        if not isinstance(text, str) or not text.strip():
            return cls()
        return _build(text)

    def to_json(self) -> str:
        """Stable JSON (sorted keys, no spaces)."""
        doc = {
            "format": "llmclip-report-graph/1",
            "nodes": [{k: v for k, v in vars(n).items() if v is not None} for n in self.nodes],
            "edges": [[e.src, e.dst, e.relation] for e in self.edges],
        }
        return json.dumps(doc, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, s: str) -> ReportGraph:
        """Inverse of ``to_json``; raises ValueError on a malformed document."""
        doc = json.loads(s)
        if not isinstance(doc, dict) or doc.get("format") != "llmclip-report-graph/1":
            raise ValueError("not an llmclip report graph (format llmclip-report-graph/1)")
        try:
            return cls._from_doc(doc)
        except (TypeError, KeyError, AttributeError) as e:
            raise ValueError(f"malformed report graph: {e}") from None

    @classmethod
    def _from_doc(cls, doc: dict) -> ReportGraph:
        nodes = []
        for i, n in enumerate(doc.get("nodes", [])):
            if n.get("id") != i or n.get("type") not in NODE_TYPES:
                raise ValueError(f"bad node {i}: {n!r}")
            nodes.append(
                Node(
                    id=i,
                    type=n["type"],
                    name=str(n["name"]),
                    status=n.get("status"),
                    observation=n.get("observation"),
                )
            )
        edges = []
        for e in doc.get("edges", []):
            src, dst, rel = e
            if rel not in RELATIONS or not (0 <= src < len(nodes) and 0 <= dst < len(nodes)):
                raise ValueError(f"bad edge {e!r}")
            edges.append(Edge(int(src), int(dst), rel))
        return cls(nodes=nodes, edges=edges)

    def to_arrays(self, vocab: tuple[str, ...] = GRAPH_VOCAB) -> dict[str, np.ndarray]:
        """Numeric form for a GCN (int64 arrays, see module doc)."""
        index = _VOCAB_INDEX if vocab is GRAPH_VOCAB else {w: i for i, w in enumerate(vocab)}
        n, e = len(self.nodes), len(self.edges)
        out = {
            "node_token": np.array([index.get(x.name, 0) for x in self.nodes], dtype=np.int64),
            "node_type": np.array([NODE_TYPES.index(x.type) for x in self.nodes], dtype=np.int64),
            "node_status": np.array(
                [NODE_STATUSES.index(x.status) for x in self.nodes], dtype=np.int64
            ),
            "edge_index": np.array(
                [[x.src for x in self.edges], [x.dst for x in self.edges]], dtype=np.int64
            ).reshape(2, e),
            "edge_type": np.array(
                [RELATIONS.index(x.relation) for x in self.edges], dtype=np.int64
            ),
        }
        out["node_token"] = out["node_token"].reshape(n)
        return out

    def to_tensors(self, vocab: tuple[str, ...] = GRAPH_VOCAB):
        """``to_arrays`` as torch tensors (torch imported only here)."""
        import torch

        return {k: torch.from_numpy(v) for k, v in self.to_arrays(vocab).items()}


class _Builder:
    def __init__(self) -> None:
        self.nodes: dict[tuple[str, str], dict] = {}
        self.edges: set[tuple[tuple[str, str], tuple[str, str], str]] = set()

    def node(self, type_: str, name: str, status: str | None = None, obs: str | None = None):
        key = (type_, name)
        cur = self.nodes.get(key)
        if cur is None:
            self.nodes[key] = {"status": status, "observation": obs}
        elif status is not None and (
            cur["status"] is None or _STATUS_RANK[status] > _STATUS_RANK[cur["status"]]
        ):
            cur["status"] = status
        return key

    def edge(self, src, dst, rel: str) -> None:
        if src != dst:
            self.edges.add((src, dst, rel))

    def graph(self) -> ReportGraph:
        order = sorted(self.nodes, key=lambda k: (NODE_TYPES.index(k[0]), k[1]))
        ids = {k: i for i, k in enumerate(order)}
        nodes = [
            Node(i, k[0], k[1], self.nodes[k]["status"], self.nodes[k]["observation"])
            for i, k in enumerate(order)
        ]
        edges = sorted(
            {Edge(ids[a], ids[b], r) for a, b, r in self.edges},
            key=lambda e: (e.src, e.dst, RELATIONS.index(e.relation)),
        )
        return ReportGraph(nodes=nodes, edges=edges)


def _build(text: str) -> ReportGraph:
    result = _LABELER.label(text)
    low = lower_same_length(text)
    ctx = TextContext(text, low)
    b = _Builder()
    # (span, sentence, key) of every finding/device, for relations
    entities: list[tuple[int, int, int, tuple[str, str]]] = []
    seen_spans: set[tuple[int, int]] = set()
    for m in result.mentions:
        if m.observation == "No Finding":
            continue
        type_ = "device" if m.observation == "Support Devices" else "finding"
        name = m.term if m.form == "term" else m.observation.lower()
        key = b.node(type_, name, m.status, m.observation)
        entities.append((m.span[0], m.span[1], m.sentence_index, key))
        if m.status != "negative":
            if m.laterality:
                b.edge(b.node("modifier", m.laterality), key, "modify")
            if m.severity:
                b.edge(b.node("modifier", m.severity), key, "modify")
            if m.measurement:
                b.edge(b.node("modifier", "measurement"), key, "modify")
        seen_spans.add(m.span)
    for m in _EXTRA.finditer(low):
        if any(a < m.end() and m.start() < z for a, z in seen_spans):
            continue
        name = lx.GRAPH_FINDINGS[int(m.lastgroup[1:])][0]
        key = b.node("finding", name, ctx.status(m.start(), m.end()))
        entities.append((m.start(), m.end(), ctx.sentence_index(m.start()), key))
    anatomy = []
    for m in _ANATOMY.finditer(low):
        name = lx.ANATOMY[int(m.lastgroup[1:])][0]
        key = b.node("anatomy", name)
        anatomy.append((m.start(), m.end(), ctx.sentence_index(m.start()), key))
        lat = _LATERALITY_NEAR.search(low, max(0, m.start() - 25), m.start())
        if lat:
            value = {"bilaterally": "bilateral", "both": "bilateral"}.get(
                lat.group(1), lat.group(1)
            )
            b.edge(b.node("modifier", value), key, "modify")
    entities.sort()
    for start, end, si, key in entities:
        best = None
        for a_start, a_end, a_si, a_key in anatomy:
            if a_si != si or (a_start < end and start < a_end):
                continue
            if a_end <= start and start - a_end <= _LOCATE_BEFORE:
                d = start - a_end
            elif a_start >= end and a_start - end <= _LOCATE_AFTER:
                d = a_start - end
            else:
                continue
            if best is None or d < best[0]:
                best = (d, a_key)
        if best:
            b.edge(key, best[1], "located_at")
    for i, (_s1, e1, si1, k1) in enumerate(entities):
        for s2, _e2, si2, k2 in entities[i + 1 :]:
            if si2 != si1:
                break
            if k1[0] == "finding" and k2[0] == "finding" and _SUGGESTIVE.search(low, e1, s2):
                b.edge(k1, k2, "suggestive_of")
    return b.graph()
