"""The llmclip side of the llm2vec peer: its isolated venv, and the pipe to ``_llm2vec_peer.py``,
which runs llm2vec's step in that venv and exchanges only numbers (JSON lines) with this process."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

VENV = C.REPO / ".bench-venv" / "llm2vec"
# Versions that install together and run on this machine's torch (llm2vec 0.2.3 requires
# transformers <= 4.44.2; peft releases after 0.12 need a newer transformers).
PEER_PACKAGES = ["torch==2.14.1", "llm2vec==0.2.3", "transformers==4.44.2", "peft==0.12.0"]


def ensure_peer_venv() -> Path:
    """``.bench-venv/llm2vec`` with PEER_PACKAGES (isolated from .venv); created once."""
    py = VENV / "bin" / "python"
    stamp = VENV / ".installed"
    want = " ".join(PEER_PACKAGES)
    if py.exists() and stamp.exists() and stamp.read_text(encoding="utf-8") == want:
        return py
    base = getattr(sys, "_base_executable", sys.executable)
    cmds = [
        [base, "-m", "venv", "--clear", str(VENV)],
        [str(py), "-m", "pip", "install", "-q", *PEER_PACKAGES],
    ]
    for cmd in cmds:
        print("+ " + " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    stamp.write_text(want, encoding="utf-8")
    return py


class Peer:
    """The llm2vec step in its own process; ``run(k)`` -> seconds of each of k steps."""

    def __init__(self, py: Path, model: Path, batches: Path, args: argparse.Namespace, threads: int,
                 cfg, autocast: bool):
        lora = cfg.model.lora
        cmd = [str(py), str(Path(__file__).resolve().parent / "_llm2vec_peer.py"),
               "--model", str(model), "--batches", str(batches),
               "--max-length", str(cfg.model.max_length), "--threads", str(threads),
               "--lora-r", str(lora.r), "--lora-alpha", str(lora.alpha),
               "--lora-dropout", str(lora.dropout), "--scale", str(cfg.stage1.contrastive_scale),
               "--lr", str(cfg.optim.lr), *(["--autocast"] if autocast else [])]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=C.REPO
        )
        line = self._line()
        if not line.startswith("READY "):
            raise RuntimeError(f"llm2vec peer did not start: {line!r}")
        self.info = json.loads(line[6:])
        self.seconds: list[float] = []
        self.loss = float("nan")

    def _line(self) -> str:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"llm2vec peer exited ({self.proc.wait()}); see its stderr above")
        return line.strip()

    def run(self, k: int) -> None:
        self.proc.stdin.write(f"run {k}\n")
        self.proc.stdin.flush()
        out = json.loads(self._line())
        self.seconds.append(sum(out["seconds"]))
        self.loss = out["loss"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=60)
