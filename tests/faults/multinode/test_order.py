"""The global data order (llmclip.data.order) in-process, without training: the rule every resume on
another world size and every multi-node run relies on. Seconds."""

from __future__ import annotations

import json

import pytest
from fault_tools import jpeg, sample_meta, tar_member, write_manifest, write_tar

from llmclip.config import ConfigError
from llmclip.data.order import EpochOrder, RankStream, build_index

pytestmark = pytest.mark.multinode


def _run(index, world: int, n: int, takes: int, start=None, workers: int = 0) -> tuple[list[str], dict]:
    """``takes`` lockstep takes of ``n`` on every rank of ``world``; keys in stream order."""
    ranks = [RankStream(index, seed=3, n=n, rank=r, world_size=world, image_size=32,
                        num_workers=workers) for r in range(world)]
    if start is not None:
        for s in ranks:
            s.restore(start)
    keys: list[str] = []
    for _ in range(takes):
        for s in ranks:
            keys += [x["key"] for x in s.next()]
    return keys, ranks[0].position()


def test_any_world_size_continues_the_same_stream(openi_shards):
    index = build_index(f"{openi_shards}:train", "image")
    n = len(index)
    order = EpochOrder(n, seed=3)
    stream = [index.keys[i] for e in range(3) for i in order(e)]
    one, _ = _run(index, 1, 8, 60)  # 480 samples: 2 epochs and a half
    assert one == stream[:480]
    assert sorted(one[:n]) == sorted(index.keys) and sorted(one[n:2 * n]) == sorted(index.keys)
    # 3 ranks, then resumed on 2, then on 1 and 4, from the saved position: the same stream.
    a, pos = _run(index, 3, 8, 5)
    b, pos = _run(index, 2, 8, 9, start=pos)
    c, pos = _run(index, 1, 8, 3, start=pos)
    d, pos = _run(index, 4, 8, 2, start=pos)
    assert a + b + c + d == stream[: 120 + 144 + 24 + 64]
    assert pos["epoch"] == 1 and pos["offset"] == 352 - n
    # DataLoader workers hand out the same takes in the same order.
    w, _ = _run(index, 2, 8, 7, workers=2)
    assert w == stream[:112]


def test_a_changed_sample_set_restarts_at_the_next_epoch_with_a_warning(openi_shards, caplog):
    full = build_index(f"{openi_shards}:train", "image")
    part = build_index(f"{openi_shards}:train", "image", shards=full.shards[:2])
    _, pos = _run(full, 2, 4, 3)
    s = RankStream(part, seed=3, n=4, rank=0, world_size=1, image_size=32)
    s.restore(pos)
    assert s.position()["epoch"] == 1 and s.position()["offset"] == 0
    assert "changed since the checkpoint" in caplog.text
    with pytest.raises(ConfigError, match="data.epoch_samples"):
        RankStream(part, seed=3, n=4, rank=0, world_size=1, epoch_samples=len(part) + 1)


def test_bad_samples_are_left_out_of_the_index_and_an_unreadable_one_is_stood_in_for(tmp_path):
    root = tmp_path / "shards"
    (root / "images").mkdir(parents=True)
    good = [f"k{i}" for i in range(6)]
    members = []
    for k in good:
        members += [tar_member(f"{k}.json", json.dumps(sample_meta(k)).encode()), tar_member(f"{k}.jpg", jpeg(k))]
    members += [tar_member("k0.json", json.dumps(sample_meta("k0")).encode())]  # duplicate key
    members += [tar_member("nojpg.json", json.dumps(sample_meta("nojpg")).encode())]
    members += [tar_member("bad.json", b"{not json"), tar_member("bad.jpg", jpeg("bad"))]
    members += [tar_member("empty.json", json.dumps(sample_meta("empty", text="")).encode()),
                tar_member("empty.jpg", jpeg("empty"))]
    members += [tar_member("broken.json", json.dumps(sample_meta("broken")).encode()),
                tar_member("broken.jpg", b"\xff\xd8 not a jpeg")]
    write_tar(root / "images" / "train-000000.tar", members)
    write_manifest(root, count=len(good) + 5)
    index = build_index(f"{root}:train", "image")
    assert sorted(index.keys) == sorted([*good, "broken"])  # the image is only decoded when taken
    assert index.skipped == {"duplicate_key": 1, "missing_image": 1, "bad_json": 1, "empty_report": 1}
    s = RankStream(index, seed=0, n=len(index), rank=0, world_size=1, image_size=32)
    keys = [x["key"] for x in s.next()]
    assert len(keys) == 7 and "broken" not in keys and set(keys) == set(good)
    assert sum(s.unreadable.values()) == 1
