"""Stage 1 under the real ``deepspeed`` launcher on 2 CPU ranks: 4-bit NF4 + LoRA + ZeRO-3 trains,
exports a loadable encoder dir, and a run killed mid-way resumes to the same losses. Bad configs
fail with exit code 2 and a message naming the key, before any heavy work."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from llmclip.config import EXIT_CONFIG
from llmclip.distributed import free_port
from llmclip.train import main

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "stage1" / "tiny.yaml"
STEPS, SAVE_EVERY, KILL_AFTER = 8, 4, 6


def _launch(out: Path, shards: Path, log: Path, *extra: str) -> subprocess.Popen:
    deepspeed = Path(sys.executable).parent / "deepspeed"
    port = free_port()
    cmd = [str(deepspeed), "--master_port", str(port), "--num_gpus", "2", str(REPO / "llmclip" / "train.py"),
           "--config", str(TINY), "--set", f"run.out_dir={out}", "--set", f"data.shards={shards}:train",
           "--set", f"optim.max_steps={STEPS}", "--set", f"run.save_every={SAVE_EVERY}",
           "--set", "stage1.mntp_steps=3", *extra]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    proc.master_port = port  # type: ignore[attr-defined]
    return proc


def _finish(proc: subprocess.Popen, log: Path, timeout: float = 420) -> None:
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert rc == 0, log.read_text(errors="replace")[-4000:]


def _metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


@pytest.fixture(scope="module")
def killed_and_resumed(openi_shards, tmp_path_factory):
    """A 4-bit LoRA ZeRO-3 run on 2 ranks, SIGKILLed (launcher and both ranks) after the step-4
    checkpoint once step 6 is logged, then relaunched: it must resume from step 4, and redo steps
    5.. with the losses the first attempt logged before the kill (uninterrupted up to there)."""
    out = tmp_path_factory.mktemp("stage1") / "run"
    log = out.parent / "log1.txt"
    proc = _launch(out, openi_shards, log)
    deadline = time.time() + 420
    while time.time() < deadline and proc.poll() is None:
        if any(r["step"] >= KILL_AFTER for r in _metrics(out)):
            break
        time.sleep(0.1)
    assert proc.poll() is None, "the run ended before it could be killed: " + log.read_text()[-3000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    first = _metrics(out)
    assert first, "no step was logged before the deadline: " + log.read_text()[-3000:]
    log2 = out.parent / "log2.txt"
    _finish(_launch(out, openi_shards, log2), log2)
    return out, first, log2.read_text(errors="replace")


def test_killed_run_resumes_to_the_same_losses(killed_and_resumed):
    out, first, log = killed_and_resumed
    killed_at = max(r["step"] for r in first)
    assert SAVE_EVERY < killed_at < STEPS, killed_at
    assert f"resumed from {out / 'checkpoints' / f'step-{SAVE_EVERY:06d}'} at step {SAVE_EVERY}" in log
    final = _metrics(out)
    assert [r["step"] for r in final] == list(range(1, STEPS + 1))  # records after the checkpoint replaced
    redone = [r for r in final if SAVE_EVERY < r["step"] <= killed_at]
    assert len(redone) >= 2
    for b in redone:
        a = next(r for r in first if r["step"] == b["step"])
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-5), (a, b)
        assert b["lr"] == pytest.approx(a["lr"], rel=1e-9)
        assert b["samples_seen"] == a["samples_seen"]


def test_4bit_lora_zero3_trains_and_exports(killed_and_resumed):
    from safetensors import safe_open

    from llmclip.text.encoder import LLMEncoder

    out = killed_and_resumed[0]
    m = _metrics(out)
    assert [r["objective"] for r in m] == ["mntp"] * 3 + ["contrastive"] * (STEPS - 3)
    mntp = [r["loss"] for r in m if r["objective"] == "mntp"]
    contrastive = [r["loss"] for r in m if r["objective"] == "contrastive"]
    assert mntp[-1] < mntp[0], mntp  # both losses fall
    assert sum(contrastive[-3:]) / 3 < 0.7 * contrastive[0], contrastive
    ds = json.loads((out / "ds_config.json").read_text())
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"] is True
    assert ds["train_batch_size"] == 2 * ds["train_micro_batch_size_per_gpu"]
    assert yaml.safe_load((out / "config.yaml").read_text())["model"]["quantization"] == "nf4"
    ckpt = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    assert ckpt.name == f"step-{STEPS:06d}" and (ckpt / "state.json").is_file()
    assert len(list((out / "checkpoints").glob("step-*"))) == 2  # keep_checkpoints
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    # Only trainable tensors are checkpointed: LoRA and the pooler, never a 4-bit base weight.
    assert names and all(".lora_" in n or n.startswith("encoder.pooler.") for n in names)
    assert list((out / "tb").rglob("events.out.tfevents.*"))
    final = out / "final"
    enc = LLMEncoder.from_dir(final)
    assert (final / "adapter" / "adapter_config.json").is_file()
    assert enc.fingerprint and enc.pooling == "latent_attention"
    emb = enc.encode(["No acute disease.", "Small right pleural effusion."])
    assert emb.shape == (2, 64) and bool(emb.isfinite().all())


@pytest.mark.parametrize("ds_json", ["cpu_zero2.json", "cpu_zero3_demo.json"])
def test_calibrated_latent_pooler_trains_past_checkpoints(openi_shards, tmp_path, ds_json):
    """MNTP steps, then a checkpoint, with a calibrated latent-attention pooler, under the demo's
    DeepSpeed JSON (ZeRO-2, precision auto) and under ZeRO-3 with resident weights. ZeRO-2 used to
    fail at the first checkpoint (the pooler gets no gradient during MNTP, so it had no optimizer
    state); ZeRO-3's replayed parameter-fetch order broke on the step after a checkpoint when the
    pooler read weights outside module calls (nn.MultiheadAttention's out_proj)."""
    out, log = tmp_path / "run", tmp_path / "log.txt"
    sets = {"deepspeed.config": f"ds_configs/{ds_json}", "deepspeed.precision": "auto",
            "model.standardize": "true", "model.calibration_reports": "16", "stage1.hard_negatives": "3",
            "run.save_every": "3", "stage1.mntp_steps": "3"}
    proc = _launch(out, openi_shards, log, *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")])
    _finish(proc, log)
    assert [r["step"] for r in _metrics(out)] == list(range(1, STEPS + 1))
    assert (out / "final" / "encoder.json").is_file()
    # Each rank removed its DeepSpeed shared-memory buffer (130 MB of RAM per run otherwise).
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{proc.master_port}_*"))


def test_zero3_leaves_train_like_per_module_hooks(openi_shards, tmp_path):
    """ZeRO-3 with every weight partitioned (persistence 0), one bucket per micro-step, no
    checkpointing (layer 0's inputs need no gradient: where DeepSpeed's leaf gradient hook fired
    before the adapters' gradients existed), NF4 + bf16: LoRA linears fetched as leaf modules train
    to exactly the losses of DeepSpeed's per-module hooks, MNTP and contrastive steps alike; whole
    decoder layers as leaves train too (their gradients differ only in summation order: the test
    below), so in bf16 their losses agree to rounding, not bit for bit."""
    ds = json.loads((REPO / "ds_configs" / "cpu_zero3.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    ds_path = tmp_path / "zero3_partitioned.json"
    ds_path.write_text(json.dumps(ds))
    losses = {}
    for leaf in ("lora", "layer", "none"):
        out, log = tmp_path / leaf, tmp_path / f"{leaf}.txt"
        proc = _launch(out, openi_shards, log, "--set", f"deepspeed.config={ds_path}",
                       "--set", "stage1.length_buckets=1", "--set", f"deepspeed.zero3_leaf={leaf}")
        _finish(proc, log)
        marked = {"lora": 14, "layer": 2, "none": 0}[leaf]  # 2 layers x 7 LoRA linears
        assert f"ZeRO stage 3 ({marked} leaf modules)" in log.read_text(errors="replace")
        losses[leaf] = [r["loss"] for r in _metrics(out)]
    assert len(losses["lora"]) == STEPS and losses["lora"] == losses["none"]
    assert losses["layer"][:2] == losses["none"][:2]  # Adam's first update: the gradients' signs
    assert losses["layer"] == pytest.approx(losses["none"], rel=1e-2)


def test_zero3_leaf_gradients_match_per_module_hooks(tmp_path):
    """The reduced adapter gradients of one ZeRO-3 micro-step (2 ranks, real launcher, fp32, gradient
    checkpointing, every weight partitioned): LoRA-linear leaves give DeepSpeed's per-module-hook
    gradients bit for bit, decoder-layer leaves to fp32 rounding (hooks on the submodules change the
    order in which autograd sums a tensor's fan-out gradients). A gradient reduced before it was
    accumulated, or twice, would be off by far more."""
    from safetensors.torch import load_file

    out, log = tmp_path / "grads.safetensors", tmp_path / "log.txt"
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--master_port", str(free_port()),
           "--num_gpus", "2", str(REPO / "tests" / "text" / "zero3_leaf_grads.py"), "--out", str(out)]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    _finish(proc, log, timeout=300)
    assert json.loads(Path(str(out) + ".json").read_text()) == {"none": 0, "lora": 14, "layer": 2}
    g = load_file(out)
    names = [k.split("/", 1)[1] for k in g if k.startswith("none/")]
    assert len(names) == 28 and all(g[f"none/{n}"].abs().sum() > 0 for n in names)
    for n in names:
        ref = g[f"none/{n}"]
        assert torch.equal(g[f"lora/{n}"], ref), n
        assert ((g[f"layer/{n}"] - ref).norm() / ref.norm()).item() < 1e-5, n


def test_zero3_leaf_mode():
    from llmclip.config import ConfigError, load_config
    from llmclip.text.stage1 import zero3_leaf_mode
    from llmclip.text.stage1_config import Stage1Config

    cfg = load_config(Stage1Config, TINY)
    cfg.stage1.length_buckets = 1
    assert zero3_leaf_mode(cfg, zero3=True) == "layer" and zero3_leaf_mode(cfg, zero3=False) == "none"
    cfg.stage1.length_buckets = 3
    assert zero3_leaf_mode(cfg, zero3=True) == "none"  # auto: buckets keep per-module hooks
    for mode in ("lora", "layer"):
        cfg.deepspeed.zero3_leaf = mode
        with pytest.raises(ConfigError, match="length_buckets") as e:
            zero3_leaf_mode(cfg, zero3=True)
        assert "deepspeed.zero3_leaf" in str(e.value)
    assert zero3_leaf_mode(cfg, zero3=False) == "none"


def test_recipes_validate():
    from llmclip.config import load_config
    from llmclip.text.stage1_config import Stage1Config

    for name in ("tiny", "demo", "llama3-8b", "mistral-7b"):
        cfg = load_config(Stage1Config, REPO / "configs" / "stage1" / f"{name}.yaml")
        assert cfg.stage == 1 and cfg.optim.max_steps > cfg.stage1.mntp_steps
    big = load_config(Stage1Config, REPO / "configs" / "stage1" / "llama3-8b.yaml")
    assert big.model.quantization == "nf4" and big.model.gradient_checkpointing and big.model.lora.r == 16
    assert big.model.max_length == 512 and big.deepspeed.precision == "bf16"


def _bad(tmp_path: Path, **model) -> Path:
    cfg = yaml.safe_load(TINY.read_text())
    cfg["model"].update(model)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize(("change", "words"), [
    ({"pooling": "max"}, ["model.pooling", "latent_attention"]),
    ({"attention": "flash_attention_2"}, ["model.attention", "CUDA"]),
    ({"source": "MINILM"}, ["model.source", "not a decoder-only", "bert"]),
    ({"quantization": "nf4", "lora": {"enabled": False}}, ["model.quantization", "lora"]),
    ({"keep_layers": -1}, ["model.keep_layers"]),
])
def test_bad_config_exits_2_naming_the_key(tmp_path, capsys, change, words):
    from llmclip.assets import minilm_dir

    if change.get("source") == "MINILM":
        change = {"source": str(minilm_dir())}
    assert main(["--config", str(_bad(tmp_path, **change))]) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert all(w in err for w in words), err


def test_bad_config_from_the_command_line(tmp_path):
    bad = _bad(tmp_path, pooling="max")
    t0 = time.time()
    res = subprocess.run([sys.executable, str(REPO / "llmclip" / "train.py"), "--config", str(bad),
                          "--set", "optim.lr=1e-3"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert res.returncode == EXIT_CONFIG and "model.pooling" in res.stderr, res.stderr
    assert time.time() - t0 < 60  # refused before loading anything heavy
    res = subprocess.run([sys.executable, str(REPO / "llmclip" / "train.py"), "--config", str(TINY),
                          "--set", "stage=7"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert res.returncode == EXIT_CONFIG and "stage" in res.stderr
