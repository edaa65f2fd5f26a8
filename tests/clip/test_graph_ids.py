"""Report-graph node ids come from GRAPH_VOCAB: no two entities share an embedding row or a
node-set slot (hash buckets did: "pneumothorax" and "copd" got g = 1 under the demo config)."""

from __future__ import annotations

from itertools import combinations
from pathlib import Path

import pytest
import torch

from llmclip.clinical import GRAPH_VOCAB, ReportGraph
from llmclip.clip.batching import UNK_NODE_ID, GraphFeaturizer, node_id, node_slot
from llmclip.clip.losses import set_similarity
from llmclip.clip.model import NODE_NAME_ROWS, STATUSES, GraphConfig, GraphEncoder
from llmclip.clip.stage2 import Stage2Config
from llmclip.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]
STAGE2_CONFIGS = sorted((ROOT / "configs" / "stage2").glob("*.yaml")) + sorted(
    (ROOT / "configs" / "stage2" / "ablations").glob("*.yaml")
)
# The demo's graph settings (configs/stage2/demo.yaml), where the hash buckets collided.
DEMO = GraphConfig(enabled=True, dim=64, layers=2, vocab_size=2048, max_nodes=24)

DIFFERENT_ENTITIES = [
    ("There is a pneumothorax.", "There is COPD."),
    ("There is a pleural effusion.", "There is cardiomegaly."),
    ("There is a nodule.", "There is a pacemaker."),
    ("There is emphysema.", "There is pneumonia."),
    ("There is atelectasis.", "There is a pneumothorax."),
]


def test_every_vocab_word_and_status_has_its_own_id_and_slot():
    ids = [node_id(w) for w in GRAPH_VOCAB]
    assert len(set(ids)) == len(GRAPH_VOCAB)
    # Row 0 is the report node; every name has a row of the smallest accepted table.
    assert min(ids) == 1 and max(ids) == NODE_NAME_ROWS - 1 == len(GRAPH_VOCAB)
    assert node_id("no such entity") == UNK_NODE_ID == node_id("<unk>")
    featurizer = GraphFeaturizer(GraphConfig(vocab_size=NODE_NAME_ROWS))
    slots = [node_slot(i, s) for i in ids for s in range(len(STATUSES))]
    # Pairwise distinct and exactly covering the multi-hot: no modulo, no unused column.
    assert sorted(slots) == list(range(featurizer.node_set_size))
    # The smallest accepted table embeds every id (an out-of-range id would raise here).
    enc = GraphEncoder(GraphConfig(enabled=True, dim=8, vocab_size=NODE_NAME_ROWS), embed_dim=4)
    n = len(ids) + 1
    graph = {
        "labels": torch.tensor([[0, *ids]]),
        "status": torch.zeros(1, n, dtype=torch.long),
        "types": torch.zeros(1, n, dtype=torch.long),
        "mask": torch.ones(1, n, dtype=torch.bool),
        "adj": torch.zeros(1, 4, n, n),
    }
    assert enc(graph).shape == (1, 4)


def test_featurizer_ids_match_the_graph_tokens():
    text = (
        "There is patchy opacity in the left lung base which may represent pneumonia. "
        "Small right pleural effusion. Left chest wall pacemaker. No pneumothorax."
    )
    tokens = ReportGraph.from_report(text).to_arrays()["node_token"].tolist()
    t = GraphFeaturizer(DEMO).tensors(["k"], [text])
    n = int(t["mask"].sum())
    assert t["labels"][0, 0] == 0 and t["labels"][0, 1:n].tolist() == [1 + i for i in tokens]


@pytest.mark.parametrize(("a", "b"), DIFFERENT_ENTITIES)
def test_reports_naming_different_entities_are_not_graph_equal(a: str, b: str):
    sets = GraphFeaturizer(DEMO).node_sets(["a", "b"], [a, b])
    assert sets.sum(-1).tolist() == [1.0, 1.0]
    assert not torch.equal(sets[0], sets[1])
    assert set_similarity(sets)[0, 1] < 1


def test_every_pair_of_single_finding_reports_differs():
    texts = sorted({t for pair in DIFFERENT_ENTITIES for t in pair} | {"No pneumothorax."})
    sets = GraphFeaturizer(DEMO).node_sets([str(i) for i in range(len(texts))], texts)
    g = set_similarity(sets)
    for i, j in combinations(range(len(texts)), 2):
        assert g[i, j] == 0, (texts[i], texts[j])


def test_the_same_report_gives_the_same_set():
    text = "Small right pleural effusion. No pneumothorax."
    sets = GraphFeaturizer(DEMO).node_sets(["a", "b"], [text, text])
    # effusion, pneumothorax and the modifiers "small" and "right" (status "none").
    assert sets[0].sum() == 4 and torch.equal(sets[0], sets[1])
    assert set_similarity(sets)[0, 1] == 1


def test_too_small_embedding_table_is_refused():
    with pytest.raises(ConfigError, match="vocab_size"):
        GraphConfig(vocab_size=NODE_NAME_ROWS - 1).validate()
    with pytest.raises(ConfigError, match="vocab_size"):
        GraphFeaturizer(GraphConfig(vocab_size=64))
    with pytest.raises(ConfigError, match=r"model\.graph\.vocab_size"):
        load_config(Stage2Config, ROOT / "configs/stage2/tiny.yaml", ["model.graph.vocab_size=64"])


@pytest.mark.parametrize("path", STAGE2_CONFIGS, ids=lambda p: p.name)
def test_stage2_configs_have_a_large_enough_table(path: Path):
    cfg = load_config(Stage2Config, path)
    assert cfg.model.graph.vocab_size >= NODE_NAME_ROWS
