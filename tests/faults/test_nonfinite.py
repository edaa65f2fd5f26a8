"""A non-finite loss, injected for real (``LLMCLIP_INJECT_NAN_AT_STEP``, llmclip/faults.py) into both
trainers: the step is skipped (no update, the step number does not advance, the batch is dropped) and
counted; ``run.max_nonfinite_steps`` in a row stop the run with a clear error; every checkpoint
written before is complete and the ones before the first NaN equal an uninterrupted run's."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from fault_tools import (
    STAGE1_STEPS,
    STAGE2_STEPS,
    metrics,
    stage1_recipe,
    stage2_recipe,
    train_solo,
    write_config,
)
from safetensors.torch import load_file

from llmclip.checkpoint import latest_checkpoint


def _assert_complete(ckpt, step: int) -> dict[str, torch.Tensor]:
    assert json.loads((ckpt / "state.json").read_text())["step"] == step
    weights = load_file(str(ckpt / "model.safetensors"))
    assert weights and all(torch.isfinite(w).all() for w in weights.values())
    optim = torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True)
    for entry in optim["params"].values():
        assert all(torch.isfinite(t).all() for t in entry.values())
    torch.load(ckpt / "scheduler.pt", map_location="cpu", weights_only=True)
    return weights


@pytest.mark.parametrize("stage", [1, 2])
def test_nonfinite_loss_is_skipped_counted_and_stops_the_run(stage, tmp_path, request, openi_shards):
    ref = request.getfixturevalue(f"stage{stage}_reference")
    steps = STAGE1_STEPS if stage == 1 else STAGE2_STEPS
    bad = steps - 1  # its first attempt is NaN (skipped, retried on the next batch); every try of
    stop = steps  # this step is NaN: max_nonfinite_steps=3 in a row stop the run
    if stage == 1:
        recipe = stage1_recipe(tmp_path / "run", openi_shards)
    else:
        recipe = stage2_recipe(tmp_path / "run", openi_shards, request.getfixturevalue("stage2_cache"),
                               request.getfixturevalue("tiny_encoder_dir"))
    log = tmp_path / "log.txt"
    rc = train_solo(write_config(tmp_path / "cfg.yaml", recipe), log,
                    LLMCLIP_INJECT_NAN_AT_STEP=f"{bad}:1,{stop}")
    text = log.read_text()
    assert rc != 0, text[-3000:]
    # Counted: one skip at step `bad`, then three in a row at step `stop`, then a clear error naming
    # the count and the step.
    skips = [int(m) for m in re.findall(r"(?<!with a )non-finite loss at step (\d+)", text)]
    assert skips == [bad, stop, stop, stop], text[-3000:]
    err = re.search(r"(\d+) consecutive (?:steps with a )?non-finite loss(?:es)?.*at step (\d+)", text)
    assert err and err.groups() == ("3", str(stop)), text[-3000:]
    # Skipped, not applied: every logged step has a finite loss, and the step after the skip trained
    # on the next batch (so its loss differs from the uninterrupted run's).
    got, want = metrics(tmp_path / "run"), metrics(ref)
    assert sorted(got) == list(range(1, stop)), got
    assert all(np.isfinite(r["loss"]) and not r.get("nonfinite") for r in got.values())
    assert [got[s]["loss"] for s in range(1, bad)] == [want[s]["loss"] for s in range(1, bad)]
    assert got[bad]["loss"] != want[bad]["loss"]
    # The last good checkpoint is intact and is the latest; the ones before the NaN equal the reference.
    run = tmp_path / "run"
    assert latest_checkpoint(run) == run / "checkpoints" / f"step-{stop - 1:06d}"
    _assert_complete(latest_checkpoint(run), stop - 1)
    for s in range(1, bad):
        mine = _assert_complete(run / "checkpoints" / f"step-{s:06d}", s)
        theirs = load_file(str(ref / "checkpoints" / f"step-{s:06d}" / "model.safetensors"))
        assert mine.keys() == theirs.keys()
        assert all(torch.equal(mine[k], theirs[k]) for k in mine), f"step {s} differs"
    assert not (run / "final").exists()
