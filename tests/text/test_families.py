"""Every supported LLM family through the whole text path. Tiny Llama, Mistral, Qwen2 and Gemma 3
models (built from configs, seeded random weights, the real SmolLM2 tokenizer) must be bidirectional
in llmclip's encoder and, after export, under a plain ``transformers.AutoModel``; then each trains a
few single-process stage-1 steps under DeepSpeed, exports ``final/``, and fills an embedding cache of
real Open-I reports. The Gemma 3 270M asset's assembly and checksum are checked on stand-in wheels."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from llmclip.config import ConfigError
from llmclip.distributed import free_port
from llmclip.text.attention import make_bidirectional, make_causal
from llmclip.text.encoder import LLMEncoder
from llmclip.text.model_config import ModelConfig
from llmclip.text.sources import TINY_WINDOW

REPO = Path(__file__).resolve().parents[2]
MODEL_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "gemma3": "gemma3_text"}
FAMILIES = list(MODEL_TYPES)
REPORT = "The heart is normal in size. There is a small left pleural effusion. No pneumothorax."
LONG = " ".join([REPORT] * 4)  # ~93 tokens: beyond two windowed layers' reach (2 x TINY_WINDOW)
STEPS, MNTP_STEPS = 4, 2


def _build(family: str) -> LLMEncoder:
    torch.manual_seed(0)
    cfg = ModelConfig(source=f"tiny:{family}", attention="sdpa", max_length=128)
    return LLMEncoder.build(cfg, torch.float32, lora=False).eval()


def _first_state_moves(hidden, tokenize, texts: list[str]) -> float:
    """How much the first report token's state changes when the last token of row 0 is edited."""
    b = tokenize(texts)
    last = int(b["attention_mask"][0].sum()) - 1
    edited = b["input_ids"].clone()
    edited[0, last] = (edited[0, last] + 17) % 49152
    with torch.no_grad():
        h0 = hidden(b["input_ids"], b["attention_mask"])
        h1 = hidden(edited, b["attention_mask"])
    return (h0[0, 1] - h1[0, 1]).abs().max().item()


@pytest.mark.parametrize("family", FAMILIES)
def test_family_is_bidirectional_in_llmclip_and_plain_transformers(family, tmp_path):
    from transformers import AutoModel

    from llmclip.text.export import save_encoder_dir

    enc = _build(family)
    assert enc.base_model.config.model_type == MODEL_TYPES[family]
    assert len(enc.tokenize([LONG])["input_ids"][0]) > 2 * TINY_WINDOW + 8
    # One unpadded row is the trap (the mask is skipped; SDPA would fall back to its causal flag).
    assert _first_state_moves(enc.hidden_states, enc.tokenize, [REPORT]) > 1e-4
    assert _first_state_moves(enc.hidden_states, enc.tokenize, [REPORT, "No effusion."]) > 1e-4
    reach = _first_state_moves(enc.hidden_states, enc.tokenize, [LONG, "No effusion."])
    if family == "mistral":  # every layer windowed: the last token is out of reach, both ways
        assert reach < 1e-6
    else:  # global layers (Gemma 3 interleaves them with windowed ones) see the whole report
        assert reach > 1e-4
    make_causal(enc.base_model)  # the probe reads ~0 on the causal model, or it proves nothing
    assert _first_state_moves(enc.hidden_states, enc.tokenize, [REPORT]) < 1e-6
    make_bidirectional(enc.base_model)

    out = save_encoder_dir(tmp_path / "enc", enc.decoder, enc.tokenizer, enc.pooler, pooling="mean",
                           max_length=128, dtype="float32")
    saved = json.loads((out / "model" / "config.json").read_text())
    assert saved["model_type"] == MODEL_TYPES[family] and saved["is_causal"] is False
    if family == "gemma3":
        assert saved["use_bidirectional_attention"] is True  # Gemma 3's own switch, for other loaders
    plain = AutoModel.from_pretrained(out / "model", attn_implementation="sdpa").eval()

    def plain_hidden(ids, mask):
        return plain(input_ids=ids, attention_mask=mask).last_hidden_state

    assert _first_state_moves(plain_hidden, enc.tokenize, [REPORT]) > 1e-4
    assert _first_state_moves(plain_hidden, enc.tokenize, [REPORT, "No effusion."]) > 1e-4
    # The same states token for token, on a padded batch longer than the window: the windows survive
    # export (Gemma 3 writes a bidirectional window as 2 * (w - 1) and halves it again on load).
    b = enc.tokenize([LONG, REPORT])
    real = b["attention_mask"].bool()
    with torch.no_grad():
        want = enc.hidden_states(b["input_ids"], b["attention_mask"])[real]
        torch.testing.assert_close(plain_hidden(b["input_ids"], b["attention_mask"])[real], want,
                                   atol=1e-5, rtol=1e-5)
        again = LLMEncoder.from_dir(out)
        torch.testing.assert_close(again.hidden_states(b["input_ids"], b["attention_mask"])[real], want,
                                   atol=1e-5, rtol=1e-5)


def _recipe(family: str, out: Path, shards: Path) -> dict:
    """A few stage-1 steps of ``tiny:<family>``: fp32, LoRA, ZeRO-2 (the CPU demo's), both objectives."""
    return {
        "stage": 1,
        "run": {"out_dir": str(out), "seed": 0, "log_every": 1, "save_every": 0, "keep_checkpoints": 1,
                "tensorboard": False, "collective_timeout_s": 120},
        "model": {"source": f"tiny:{family}", "quantization": "none", "attention": "sdpa", "max_length": 64,
                  "pooling": "mean", "lora": {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0}},
        "data": {"shards": f"{shards}:train", "num_workers": 0},
        "stage1": {"mntp_steps": MNTP_STEPS, "hard_negatives": 1},
        "optim": {"lr": 3e-3, "warmup_steps": 1, "max_steps": STEPS, "weight_decay": 0.0},
        "deepspeed": {"config": str(REPO / "ds_configs" / "cpu_zero2.json"), "micro_batch_size": 4,
                      "grad_accum": 1, "precision": "fp32"},
    }


def _train_solo(config: Path, log: Path) -> int:
    """``python llmclip/train.py`` as one rank without a launcher (what srun or torchrun would set)."""
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    with open(log, "wb") as fh:
        return subprocess.run([sys.executable, str(REPO / "llmclip" / "train.py"), "--config", str(config)],
                              cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=300).returncode


@pytest.mark.parametrize("family", FAMILIES)
def test_family_stage1_export_cache(family, openi_shards, tmp_path):
    from llmclip.cache import EmbeddingCache
    from llmclip.cache.build import BuildOptions, build_cache

    run = tmp_path / "run"
    config = tmp_path / "stage1.yaml"
    config.write_text(yaml.safe_dump(_recipe(family, run, openi_shards)))
    log = tmp_path / "log.txt"
    assert _train_solo(config, log) == 0, log.read_text(errors="replace")[-4000:]
    metrics = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    assert [m["objective"] for m in metrics] == ["mntp"] * MNTP_STEPS + ["contrastive"] * (STEPS - MNTP_STEPS)
    assert all(np.isfinite(m["loss"]) for m in metrics)

    final = run / "final"
    saved = json.loads((final / "model" / "config.json").read_text())
    assert saved["model_type"] == MODEL_TYPES[family] and saved["is_causal"] is False
    enc = LLMEncoder.from_dir(final)
    assert _first_state_moves(enc.hidden_states, enc.tokenize, [REPORT]) > 1e-4
    # The merged LoRA changed the decoder: the exported encoder is not the untrained one.
    trained, base = enc.encode([REPORT]), _build(family).encode([REPORT])
    assert (trained - base).abs().max() > 1e-4

    cache = tmp_path / "cache"
    build_cache(BuildOptions(encoder=str(final), shards=f"{openi_shards}:test", out=str(cache),
                             variants=["report", "negated"], progress=False))
    got = EmbeddingCache(cache)
    assert got.fingerprint == enc.fingerprint and got.dim == 64 and got.counts
    for shard, n in got.counts.items():
        rows = np.asarray(got.array(shard), dtype=np.float32)
        assert rows.shape == (n, 2, 64) and np.isfinite(rows).all()
        assert rows[:, 0].std(axis=0).max() > 0  # reports embed differently
        assert np.abs(rows[:, 0] - rows[:, 1]).max() > 0  # a negation moves the embedding


# ------------------------------------------------------------------------ Gemma 3 270M assembly
def _stand_in_wheels(folder: Path, data: bytes, listed_sha: str) -> None:
    """The layout of the real chunk packages, small: a main wheel with SHA256SUMS, 4 part wheels."""
    from llmclip.text.sources import GEMMA3_FILE, GEMMA3_PACKAGE, GEMMA3_PARTS, GEMMA3_VERSION

    def wheel(package: str, members: dict[str, bytes]) -> None:
        mod = package.replace("-", "_")
        with zipfile.ZipFile(folder / f"{mod}-{GEMMA3_VERSION}-py3-none-any.whl", "w") as z:
            z.writestr(f"{mod}/__init__.py", "")
            for name, body in members.items():
                z.writestr(f"{mod}/data/{name}", body)

    folder.mkdir(parents=True, exist_ok=True)
    wheel(GEMMA3_PACKAGE, {"SHA256SUMS": f"{listed_sha}  {GEMMA3_FILE}\n".encode()})
    size = -(-len(data) // GEMMA3_PARTS)
    for i in range(GEMMA3_PARTS):
        wheel(f"{GEMMA3_PACKAGE}-part{i + 1}", {f"{GEMMA3_FILE}.part{i:02d}": data[i * size:(i + 1) * size]})


def test_gemma3_chunks_assemble_in_order_and_a_bad_checksum_is_refused(tmp_path):
    from llmclip.text.sources import GEMMA3_FILE, assemble_gguf

    data = bytes(range(256)) * 1000 + b"tail"
    _stand_in_wheels(tmp_path / "good", data, hashlib.sha256(data).hexdigest())
    out = assemble_gguf(tmp_path / "good", tmp_path / "a" / GEMMA3_FILE)
    assert out.read_bytes() == data

    _stand_in_wheels(tmp_path / "bad", data, hashlib.sha256(data + b"x").hexdigest())
    with pytest.raises(ConfigError, match="model.source.*sha256.*refusing"):
        assemble_gguf(tmp_path / "bad", tmp_path / "b" / GEMMA3_FILE)
    assert not list((tmp_path / "b").iterdir())  # nothing half-written is left to be reused


def test_builtin_sources_are_known_at_config_time():
    from llmclip.config import load_config
    from llmclip.text.stage1_config import Stage1Config

    for source in ("tiny:mistral", "tiny:qwen2", "tiny:gemma3", "asset:gemma3-270m"):
        ModelConfig(source=source).validate()  # nothing is built or downloaded here
    with pytest.raises(ConfigError, match="model.source.*tiny:gemma3"):
        ModelConfig(source="tiny:gemma2").validate()
    cfg = load_config(Stage1Config, REPO / "configs" / "stage1" / "gemma3-270m.yaml")
    assert cfg.model.source == "asset:gemma3-270m" and 0 < cfg.model.keep_layers <= 18  # 270M: 18 layers
    assert cfg.optim.max_steps > cfg.stage1.mntp_steps
