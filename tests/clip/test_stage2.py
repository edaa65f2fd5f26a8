"""Stage 2 end to end on real parts: Open-I report shards with rendered images, the embedding cache
of a 2-layer SmolLM2 encoder, a timm LeViT, 2 CPU ranks under the real ``deepspeed`` launcher.

The runs of ``stage2_runs`` (tests/conftest.py) are shared: one uninterrupted ZeRO-0 run (plain data
parallel, the CPU demo's), one SIGKILLed right after its first checkpoint and resumed, and a copy of
the killed one resumed under ZeRO-3.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

from llmclip.api import load_model
from llmclip.cache import EmbeddingCache
from llmclip.clip.batching import cache_rows, report_text
from llmclip.eval.image_text import embed_test_set, retrieval
from llmclip.train import main as train_main


def _train_args(shards: Path, cache: Path, out: Path, *extra: str) -> list[str]:
    args = [
        "--config",
        "configs/stage2/tiny.yaml",
        "--set",
        f"data.shards={shards}:train",
        "--set",
        f"data.cache={cache}",
        "--set",
        f"run.out_dir={out}",
    ]
    for e in extra:
        args += ["--set", e]
    return args


def _copy_cache(src: Path, dst: Path, keep: set[str] | None = None) -> Path:
    shutil.copytree(src, dst)
    if keep is not None:
        meta = json.loads((dst / "meta.json").read_text())
        meta["shards"] = {k: v for k, v in meta["shards"].items() if k in keep}
        (dst / "meta.json").write_text(json.dumps(meta))
    return dst


def test_cache_that_does_not_match_the_shards_is_refused(
    tmp_path, openi_shards, stage2_cache, stage2_encoder_dir, capsys
):
    # (a) a cache built for other shards (only the test split): refused, exit code 2, shard named.
    test_only = _copy_cache(stage2_cache, tmp_path / "test_only", keep={"test-000000"})
    assert train_main(_train_args(openi_shards, test_only, tmp_path / "a")) == 2
    assert "train-000000 is not in the embedding cache" in capsys.readouterr().err
    # (b) same shard names, different samples (keys reordered in one sidecar): refused.
    swapped = _copy_cache(stage2_cache, tmp_path / "swapped")
    kp = swapped / "train-000001.keys.json"
    d = json.loads(kp.read_text())
    d["keys"][0], d["keys"][1] = d["keys"][1], d["keys"][0]
    kp.write_text(json.dumps(d))
    assert train_main(_train_args(openi_shards, swapped, tmp_path / "b")) == 2
    assert "train-000001 row 0" in capsys.readouterr().err
    # (c) a cache made by another encoder than the one named in data.encoder: refused.
    assert (
        train_main(
            _train_args(
                openi_shards, stage2_cache, tmp_path / "c", f"data.encoder={stage2_encoder_dir}"
            )
        )
        == 2
    )
    assert "was built by encoder" in capsys.readouterr().err
    # (d) a cache without the recipe's hard-negative columns: refused, the key and columns named.
    assert train_main(_train_args(openi_shards, stage2_cache, tmp_path / "d")) == 2
    err = capsys.readouterr().err
    assert "loss.negation.hard_negatives" in err and "'laterality', 'severity'" in err, err
    assert "(it has report, negated)" in err, err
    # Nothing was trained or written in any of these cases.
    assert not any((tmp_path / x / "checkpoints").exists() for x in "abcd")


def test_two_rank_run_writes_a_complete_run_folder(stage2_runs):
    run, steps = stage2_runs["full"], stage2_runs["steps"]
    ds = json.loads((run / "ds_config.json").read_text())
    assert ds["zero_optimization"]["stage"] == 0 and ds["train_batch_size"] == 2 * 16
    assert (run / "config.yaml").is_file() and list((run / "tb").rglob("events.out.tfevents.*"))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    assert all(np.isfinite(r["loss"]) and "loss_graph" in r and "alpha" in r for r in records)
    losses = [r["loss"] for r in records]
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    # The user's own monitor block in the DeepSpeed JSON was kept and got every step's loss.
    rows = (stage2_runs["csv"] / "train_loss.csv").read_text().splitlines()
    assert [int(r.split(",")[0]) for r in rows[1:]] == list(range(1, steps + 1)), rows[:3]
    assert (run / "final" / "model.safetensors").is_file()
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step-{steps:06d}"


def test_kill_and_resume_reproduces_the_uninterrupted_run(stage2_runs):
    full, resumed, save = stage2_runs["full"], stage2_runs["resumed"], stage2_runs["save_every"]
    assert f"resumed from step {save}" in stage2_runs["log"].read_text()

    def losses(run: Path) -> dict[int, float]:
        recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in recs}

    a, b, c = losses(full), losses(resumed), losses(stage2_runs["restaged"])
    after = range(save + 1, stage2_runs["steps"] + 1)
    # Same stage, same ranks: the resumed run continues the uninterrupted one (a wrong LR, moment
    # or data position shows up as 1e-2 here).
    np.testing.assert_allclose([b[s] for s in after], [a[s] for s in after], rtol=1e-5, atol=1e-6)
    # Resumed under ZeRO-3: the same math with another reduction order, so equal to float rounding
    # for the first steps (rounding differences then grow step by step, as between any two
    # stages: a wrong weight or moment would be off at once).
    first = range(save + 1, save + 4)
    np.testing.assert_allclose([c[s] for s in first], [a[s] for s in first], rtol=1e-4, atol=1e-5)
    ds = json.loads((stage2_runs["restaged"] / "ds_config.json").read_text())
    assert ds["zero_optimization"]["stage"] == 3
    assert all(np.isfinite(c[s]) for s in after) and sorted(c) == sorted(a)
    from safetensors.torch import load_file

    wa = load_file(str(full / "final" / "model.safetensors"))
    wb = load_file(str(resumed / "final" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k].float(), wa[k].float(), rtol=1e-4, atol=1e-5, msg=k)


def test_trained_model_retrieves_held_out_rendered_images_above_chance(
    stage2_runs, openi_shards, stage2_lm_cache
):
    clip = load_model(stage2_runs["full"])
    test = embed_test_set(clip, f"{openi_shards}:val,test", batch_size=32, num_workers=0)
    cache = EmbeddingCache(stage2_lm_cache)
    rows = torch.from_numpy(
        cache_rows(cache, test.shards, test.keys)[:, cache.variant_index("report")]
    )
    texts = [report_text(m) for m in test.metas]
    trained = retrieval(test.image, clip.encode_text_embeddings(rows), texts)
    assert trained["n_images"] >= 40
    # Held-out patients' images rank their own report above ~2/3 of the others (chance 1/2) and
    # find it in the top 10 clearly more often than chance.
    assert trained["i2t_percentile"] > 0.6, trained
    assert trained["i2t_r10"] > trained["curves"]["i2t_chance"][9] + 0.08, trained
