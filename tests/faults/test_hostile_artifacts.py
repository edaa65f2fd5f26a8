"""Hostile checkpoints, model folders and caches: a pickle payload where a tensor file belongs, a
safetensors file with a wrong shape or a broken header, a cache with NaN rows, a pickled array, a
sidecar from another encoder. Each is refused with a ``ConfigError`` naming the file; nothing executes
(a payload's side effect would create a file)."""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from fault_tools import ENGINE, PYTHON, REPO, rank_env
from safetensors.torch import load_file, save_file

from llmclip.cache import EmbeddingCache, emb_path, keys_path
from llmclip.config import ConfigError


class _Payload:
    """Unpickling this calls ``open(path, "w")``: a file appears if anything unpickles it."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _canary(tmp_path: Path) -> Path:
    return tmp_path / f"executed-{uuid.uuid4().hex[:8]}"


# ---------------------------------------------------------------------------------- checkpoints
# A real DeepSpeed engine writes a genuine checkpoint with llmclip.checkpoint, then loads hostile
# copies of it; each outcome is printed as JSON.
CHECKPOINT_CASES = ENGINE + r"""
import pickle, shutil
from safetensors.torch import load_file, save_file

root, canary = Path(sys.argv[1]), sys.argv[2]
good = save_checkpoint(root / "run", 1, engine, {"data": {}})

class Payload:
    def __reduce__(self):
        return (open, (canary, "w"))

def corrupt(case):
    d = root / case
    shutil.copytree(good, d)
    if case in ("optimizer_pickle", "scheduler_pickle"):
        name = case.split("_")[0] + ".pt"
        with open(d / name, "wb") as f:
            pickle.dump({"params": Payload()}, f)
    elif case == "optimizer_torch_pickle":  # a torch.save zip whose pickle calls a global
        torch.save({"params": Payload()}, d / "optimizer.pt")
    elif case == "weights_wrong_shape":
        w = load_file(str(d / "model.safetensors"))
        w["0.weight"] = torch.zeros(64, 65)
        save_file(w, str(d / "model.safetensors"))
    elif case == "moments_wrong_shape":
        o = torch.load(d / "optimizer.pt", weights_only=True)
        o["params"]["1.weight"]["exp_avg"] = torch.zeros(3)
        torch.save(o, d / "optimizer.pt")
    elif case == "weights_garbage":
        (d / "model.safetensors").write_bytes(b"\xff" * 64)
    elif case == "weights_truncated":
        b = (d / "model.safetensors").read_bytes()
        (d / "model.safetensors").write_bytes(b[: len(b) // 2])
    elif case == "state_not_json":
        (d / "state.json").write_bytes(b"\x80\x04not json")
    return d

out = {}
for case in ("optimizer_pickle", "scheduler_pickle", "optimizer_torch_pickle", "weights_wrong_shape",
             "moments_wrong_shape", "weights_garbage", "weights_truncated", "state_not_json"):
    try:
        load_checkpoint(corrupt(case), engine)
        out[case] = "loaded"
    except ConfigError as e:
        out[case] = "ConfigError: " + str(e)
    except BaseException as e:
        out[case] = f"{type(e).__name__}: {e}"
# `latest` naming a path outside the run folder is ignored (the newest complete step is used).
(root / "run" / "checkpoints" / "latest").write_text("../../../../etc\n")
out["latest_escape"] = str(latest_checkpoint(root / "run"))
print("RESULT " + json.dumps(out))
"""


def test_hostile_checkpoints_are_refused_naming_the_file(tmp_path):
    canary = _canary(tmp_path)
    r = subprocess.run([PYTHON, "-c", CHECKPOINT_CASES, str(tmp_path), str(canary)], cwd=REPO,
                       env=rank_env(), capture_output=True, text=True, timeout=600)
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert r.returncode == 0 and line, (r.stdout[-2000:], r.stderr[-3000:])
    out = json.loads(line[len("RESULT "):])
    files = {"optimizer_pickle": "optimizer.pt", "scheduler_pickle": "scheduler.pt",
             "optimizer_torch_pickle": "optimizer.pt", "weights_wrong_shape": "model.safetensors",
             "moments_wrong_shape": "optimizer.pt", "weights_garbage": "model.safetensors",
             "weights_truncated": "model.safetensors", "state_not_json": "state.json"}
    for case, file in files.items():
        assert out[case].startswith("ConfigError: "), (case, out[case])
        assert f"{tmp_path / case}" in out[case] and file in out[case], (case, out[case])
    assert "0.weight" in out["weights_wrong_shape"] and "(64, 65)" in out["weights_wrong_shape"]
    assert "exp_avg" in out["moments_wrong_shape"]
    assert out["latest_escape"] == str(tmp_path / "run" / "checkpoints" / "step-000001")
    assert not canary.exists(), "a pickle payload was executed"


# ---------------------------------------------------------------------------------- model folders
def test_hostile_final_models_are_refused(tmp_path, stage2_reference, tiny_encoder_dir):
    from llmclip.api import load
    from llmclip.text.encoder import LLMEncoder

    # Stage-2 RUN/final with a wrong-shaped tensor, then with a broken safetensors header.
    run = tmp_path / "stage2"
    shutil.copytree(stage2_reference / "final", run / "final")
    w = load_file(str(run / "final" / "model.safetensors"))
    name = next(k for k, v in w.items() if v.ndim == 2)
    w[name] = torch.zeros(w[name].shape[0] + 1, w[name].shape[1])
    save_file(w, str(run / "final" / "model.safetensors"))
    with pytest.raises(ConfigError, match=f"model.safetensors.*{name}"):
        load(run)
    (run / "final" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(ConfigError, match="model.safetensors"):
        load(run)
    # Encoder dir (stage-1 RUN/final): a decoder weight with a wrong shape; then the safetensors
    # replaced by a pickled pytorch_model.bin whose payload must not run.
    enc = tmp_path / "encoder"
    shutil.copytree(tiny_encoder_dir, enc)
    model_dir = enc / json.loads((enc / "encoder.json").read_text()).get("model_dir", "model")
    st = next(model_dir.glob("*.safetensors"))
    w = load_file(str(st))
    name = next(k for k, v in w.items() if v.ndim == 2)
    w[name] = torch.zeros(3, 5)
    save_file(w, str(st), metadata={"format": "pt"})
    with pytest.raises(ConfigError, match=str(enc)):
        LLMEncoder.from_dir(enc)
    st.unlink()
    canary = _canary(tmp_path)
    with open(model_dir / "pytorch_model.bin", "wb") as f:
        pickle.dump({"x": _Payload(canary)}, f)
    with pytest.raises(ConfigError, match=str(enc)):
        LLMEncoder.from_dir(enc)
    assert not canary.exists(), "a pickle payload was executed"


# ---------------------------------------------------------------------------------- caches
def test_hostile_caches_are_refused(tmp_path, stage2_cache):
    ref = EmbeddingCache(stage2_cache)
    name = "train-000001"
    keys = ref.keys(name)
    # NaN rows: the reader refuses them at the first lookup that touches them, naming shard and key.
    nan = tmp_path / "nan"
    shutil.copytree(stage2_cache, nan)
    arr = np.load(emb_path(nan, name))
    arr[3, 1, 5] = np.nan
    np.save(emb_path(nan, name), arr, allow_pickle=False)
    cache = EmbeddingCache(nan)
    assert np.isfinite(cache.rows(name, keys[:3])).all()
    with pytest.raises(ConfigError, match=f"{name}.*{keys[3]}.*NaN"):
        cache.rows(name, keys[2:5])
    # A pickled object array where an .emb.npy belongs: refused (allow_pickle=False), nothing runs.
    pick = tmp_path / "pickled"
    shutil.copytree(stage2_cache, pick)
    canary = _canary(tmp_path)
    obj = np.empty((len(keys), 2, ref.dim), dtype=object)
    obj[0, 0, 0] = _Payload(canary)
    np.save(emb_path(pick, name), obj, allow_pickle=True)
    with pytest.raises(ConfigError, match=str(emb_path(pick, name))):
        EmbeddingCache(pick).rows(name, keys[:2])
    assert not canary.exists()
    # A sidecar from another encoder (foreign fingerprint in its keys file) next to this cache's meta.
    foreign = tmp_path / "foreign"
    shutil.copytree(stage2_cache, foreign)
    side = json.loads(keys_path(foreign, name).read_text())
    side["build"]["fingerprint"] = "f" * 64
    keys_path(foreign, name).write_text(json.dumps(side))
    with pytest.raises(ConfigError, match="fingerprint"):
        EmbeddingCache(foreign).rows(name, keys[:2])
    # And a whole cache of another encoder, checked against the encoder stage 2 is told to use.
    with pytest.raises(ConfigError, match="was built by encoder"):
        EmbeddingCache(stage2_cache).check_matches([], fingerprint="0" * 64)
