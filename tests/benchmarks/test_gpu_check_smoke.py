"""``benchmarks/gpu_check.sh --cpu-smoke``: the one prepared GPU check runs end to end on a CPU.

A GPU is lent rarely and briefly, so the script must not meet its first bug there: this runs the
same Python at tiny sizes through the real shell wrapper, DeepSpeed and transformers, and checks that
every comparison names two different implementations, that nothing CUDA-only is counted as passed,
and that a reused ``--workdir`` serves a second run (the ZeRO-2 / profiled stage-1 variant).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _run(tmp_path: Path, out: Path, *args: str) -> dict:
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_LIMIT_S": "500",
           "LLMCLIP_CACHE": os.environ.get("LLMCLIP_CACHE", str(REPO / ".assets"))}
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--cpu-smoke", "--workdir",
                           str(tmp_path / "work"), "--out", str(out), *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())["checks"]


def test_gpu_check_cpu_smoke_runs_every_check_and_a_second_stage1_variant(tmp_path):
    checks = _run(tmp_path, tmp_path / "all.json", "--checks", "attention,kernels,stage1,stage2")
    assert set(checks) == {"attention", "kernels", "stage1", "stage2"}
    for name, res in checks.items():
        assert "error" not in res, (name, res.get("error"), res.get("traceback"))
    for name in ("attention", "kernels"):
        pairs = checks[name]["pairs"]
        assert all(p["compared"][0] != p["compared"][1] for p in pairs)
        passed = [p for p in pairs if p["status"] == "passed"]
        assert passed and all(p["rel_diff"] <= p["tolerance"] for p in passed)
        # CUDA-only implementations are reported as skipped on a CPU, never as passed.
        cuda_only = [p for p in pairs if "efficient" in p["compared"][0]
                     or p["compared"][0].startswith(("flash_attention_2", "liger"))]
        assert cuda_only and all(p["status"].startswith("skipped") for p in cuda_only)
    assert checks["attention"]["control"]["status"] == "passed"
    s1 = checks["stage1"]
    assert s1["ok"] and s1["finite"] and s1["zero_stage"] == 3 and s1["profile"] is None
    assert s1["zero3_leaf"] == "layer" and s1["zero3_leaf_modules"] >= 1  # the trainer's auto

    again = _run(tmp_path, tmp_path / "z2.json", "--checks", "stage1", "--s1-zero", "2",
                 "--s1-profile")["stage1"]
    assert "error" not in again, again.get("traceback")
    assert again["zero_stage"] == 2 and again["ds_config"] == "cpu_zero2.json" and again["ok"]
    prof = again["profile"]
    assert prof["wall_s"] > 0 and prof["top_host_ops"] and prof["gpu_busy_s"] == 0.0


def test_gpu_check_cpu_smoke_times_fetch_units_side_by_side(tmp_path):
    fetch = _run(tmp_path, tmp_path / "fetch.json", "--checks", "fetch",
                 "--fetch-units", "layer,lora,none")["fetch"]
    assert "error" not in fetch, fetch.get("traceback")
    assert fetch["units"] == ["layer", "lora", "none"] and fetch["peer"] == "none"
    rows = fetch["per_unit"]
    assert rows["layer"]["leaves"] == 2 and rows["lora"]["leaves"] == 14 and rows["none"]["leaves"] == 0
    assert all(len(r["step_s"]) == 2 and r["mfu"] > 0 for r in rows.values())
    assert "ratio_vs_none" in rows["layer"] and fetch["first_losses_equal"] and fetch["ok"]
    sys.path.insert(0, str(REPO / "benchmarks"))
    from _gpu_fetch import fetch_units

    for spec in ("layer,layer", "layer", "layer,leaf"):
        with pytest.raises(ValueError, match="--fetch-units"):
            fetch_units(spec)
