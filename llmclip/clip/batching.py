"""From loader samples to the tensors of one stage-2 step: pixels, cached report rows, CheXpert
label vectors and report graphs.

Text never goes through the LLM here: the report (and negated report) embeddings are rows of the
embedding cache, looked up by the sample's shard and key (the cache checks the keys). Label vectors
and graphs feed the soft labels and the graph stream; graphs are built once per key and kept.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from llmclip.cache import EmbeddingCache, shard_name
from llmclip.clinical.graph import GRAPH_VOCAB
from llmclip.clip.model import NODE_TYPES, RELATIONS, STATUSES, GraphConfig
from llmclip.clip.reportgraph import graph_parts
from llmclip.config import ConfigError
from llmclip.data.text import sample_text

# CheXpert value -> soft-label weight: positive 1, uncertain 0.5, negative / not mentioned 0.
LABEL_WEIGHT = {1: 1.0, -1: 0.5, 0: 0.0}


def label_matrix(metas: Sequence[dict[str, Any]], classes: Sequence[str]) -> torch.Tensor:
    """[n, len(classes)] soft-label weights from each sample's ``labels`` mapping."""
    out = np.zeros((len(metas), len(classes)), dtype=np.float32)
    for i, meta in enumerate(metas):
        labels = meta.get("labels") or {}
        for j, c in enumerate(classes):
            v = labels.get(c)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[i, j] = LABEL_WEIGHT.get(int(v), 0.0)
    return torch.from_numpy(out)


def report_text(meta: dict[str, Any]) -> str:
    """The one clinical text of a sample (``llmclip.data.text``): what the cache encoded, the
    Labeler labelled and the graph is built from."""
    return sample_text(meta)


# Node-name ids are fixed by the graph vocabulary (0 is the report node), so two entities never
# share an embedding row or a node-set slot, as hash buckets could.
NODE_NAME_IDS = {w: 1 + i for i, w in enumerate(GRAPH_VOCAB)}
UNK_NODE_ID = NODE_NAME_IDS["<unk>"]


def node_id(name: str) -> int:
    """Embedding row of a graph node name (``1 + GRAPH_VOCAB`` index; unknown -> "<unk>")."""
    return NODE_NAME_IDS.get(name, UNK_NODE_ID)


def node_slot(node: int, status: int) -> int:
    """Column of an (entity, status) pair in the ``node_sets`` multi-hot: GRAPH_VOCAB index x
    ``len(STATUSES)`` + status."""
    return (node - 1) * len(STATUSES) + status


class GraphFeaturizer:
    """Report text -> padded GCN inputs and (entity, status) node sets, memoised per sample key."""

    def __init__(self, cfg: GraphConfig, memo: int = 200_000):
        # The ids index the GCN's embedding table, which must have a row for each of them.
        cfg.validate()
        self.cfg = cfg
        # One column per GRAPH_VOCAB word x status: the report node is never an entity.
        self.node_set_size = len(GRAPH_VOCAB) * len(STATUSES)
        self._memo: OrderedDict[str, tuple[list[tuple[int, int, int]], list[tuple[int, int, int]]]]
        self._memo = OrderedDict()
        self._max = memo

    def _parts(
        self, key: str, text: str
    ) -> tuple[list[tuple[int, int, int]], list[tuple[int, int, int]]]:
        hit = self._memo.get(key)
        if hit is not None:
            return hit
        nodes, edges = graph_parts(text)
        # Node 0 is the report itself, so every graph has a node and a readout.
        enc_nodes = [(0, 0, 0)]
        for label, status, ntype in nodes[: self.cfg.max_nodes - 1]:
            enc_nodes.append(
                (
                    node_id(label),
                    STATUSES.index(status) if status in STATUSES else 0,
                    NODE_TYPES.index(ntype) if ntype in NODE_TYPES else len(NODE_TYPES) - 1,
                )
            )
        enc_edges = []
        for src, dst, rel in edges:
            if src + 1 < len(enc_nodes) and dst + 1 < len(enc_nodes):
                r = RELATIONS.index(rel) if rel in RELATIONS else len(RELATIONS) - 1
                enc_edges.append((src + 1, dst + 1, r))
        # Every entity also hangs off the report node (relation "other").
        enc_edges += [(0, i, len(RELATIONS) - 1) for i in range(1, len(enc_nodes))]
        out = (enc_nodes, enc_edges)
        self._memo[key] = out
        if len(self._memo) > self._max:
            self._memo.popitem(last=False)
        return out

    def tensors(self, keys: Sequence[str], texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Padded batch: labels/status/types [B, N], mask [B, N], adj [B, R, N, N] (both directions)."""
        parts = [self._parts(k, t) for k, t in zip(keys, texts, strict=True)]
        b, n, r = len(parts), self.cfg.max_nodes, len(RELATIONS)
        # Scattered once per batch from flat index arrays (one tensor write per sample per node and
        # edge cost more than the GCN itself at demo sizes).
        none = [np.zeros((0, 3), dtype=np.int64)]  # keeps an empty batch well-formed
        nodes = [np.asarray(v, dtype=np.int64).reshape(-1, 3) for v, _ in parts] + none
        node_row = np.concatenate([np.full(len(v), i) for i, v in enumerate(nodes)])
        node_col = np.concatenate([np.arange(len(v)) for v in nodes])
        node_val = np.concatenate(nodes)
        ids = np.zeros((3, b, n), dtype=np.int64)
        ids[:, node_row, node_col] = node_val.T
        mask = np.zeros((b, n), dtype=bool)
        mask[node_row, node_col] = True
        adj = np.zeros((b, r, n, n), dtype=np.float32)
        edges = [np.asarray(e, dtype=np.int64).reshape(-1, 3) for _, e in parts] + none
        edge_row = np.concatenate([np.full(len(e), i) for i, e in enumerate(edges)])
        src, dst, rel = np.concatenate(edges).T
        adj[edge_row, rel, src, dst] = 1.0
        adj[edge_row, rel, dst, src] = 1.0
        labels, status, types = (torch.from_numpy(a) for a in ids)
        return {
            "labels": labels,
            "status": status,
            "types": types,
            "mask": torch.from_numpy(mask),
            "adj": torch.from_numpy(adj),
        }

    def node_sets(self, keys: Sequence[str], texts: Sequence[str]) -> torch.Tensor:
        """[B, node_set_size] multi-hot of (entity, status) pairs, for the g term of soft labels."""
        out = np.zeros((len(keys), self.node_set_size), dtype=np.float32)
        for i, (k, t) in enumerate(zip(keys, texts, strict=True)):
            entities = self._parts(k, t)[0][1:]
            out[i, [node_slot(lab, st) for lab, st, _ in entities]] = 1.0
        return torch.from_numpy(out)


def cache_rows(cache: EmbeddingCache, shards: Sequence[str], keys: Sequence[str]) -> np.ndarray:
    """``[n, variants, dim]`` cache rows for samples that may come from several shards."""
    if len(shards) != len(keys):
        raise ConfigError("batch has different numbers of shard names and keys")
    names = [shard_name(s) for s in shards]
    out = np.empty((len(keys), len(cache.variants), cache.dim), dtype=np.float32)
    for name in dict.fromkeys(names):
        idx = [i for i, s in enumerate(names) if s == name]
        out[idx] = cache.rows(name, [keys[i] for i in idx])
    return out


def text_statistics(
    cache: EmbeddingCache, shards: Sequence[str], column: int, max_rows: int = 20_000
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean and std of one cache column over the training shards (deterministic:
    evenly spaced rows of every shard, at most ``max_rows`` in all; float64 sums)."""
    per_shard = max(1, -(-max_rows // max(1, len(shards))))
    total = np.zeros(cache.dim, dtype=np.float64)
    sq = np.zeros(cache.dim, dtype=np.float64)
    n = 0
    for name in shards:
        arr = cache.array(name)
        idx = np.unique(np.linspace(0, len(arr) - 1, num=min(per_shard, len(arr))).astype(np.int64))
        rows = np.asarray(arr[idx, column], dtype=np.float64)
        total += rows.sum(0)
        sq += (rows * rows).sum(0)
        n += len(rows)
    if n == 0:
        raise ConfigError("the embedding cache has no rows for the training shards", "data.cache")
    mean = total / n
    std = np.sqrt(np.maximum(sq / n - mean * mean, 0.0))
    return torch.from_numpy(mean).float(), torch.from_numpy(std).float()


def unbatch(batch: Any) -> list[dict[str, Any]]:
    """Loader batch (a list of sample dicts, or a dict of lists) -> list of sample dicts."""
    if isinstance(batch, list):
        return batch
    if isinstance(batch, dict):
        n = len(batch["key"])
        return [
            {k: v[i] for k, v in batch.items() if hasattr(v, "__getitem__") and len(v) == n}
            for i in range(n)
        ]
    raise ConfigError(f"loader yielded {type(batch).__name__}, expected a dict or list batch")
