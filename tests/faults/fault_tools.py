"""Shared tools of the fault-injection suite: launching real processes, killing them at random points,
small filesystems that fill up, and digests of output folders.

Everything here drives the real commands (``llmclip/train.py``, ``python -m llmclip.cli``); nothing is
mocked. Kill points are drawn from seeds: ``LLMCLIP_FAULT_SEEDS`` ("0,1,2,3" or a count "8") widens
the default two seeds per stage.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

from llmclip.distributed import free_port

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
TRAIN = REPO / "llmclip" / "train.py"


def fault_seeds(default: int = 2) -> list[int]:
    """Seeds of the random kill points: ``LLMCLIP_FAULT_SEEDS`` = "0,1,5" or a count ("8" = 0..7)."""
    raw = os.environ.get("LLMCLIP_FAULT_SEEDS", "").strip()
    if not raw:
        return list(range(default))
    if "," in raw:
        return [int(s) for s in raw.split(",") if s.strip()]
    return list(range(int(raw)))


def rank_env(rank: int = 0, world: int = 1, port: int | None = None, **extra: str) -> dict[str, str]:
    """Environment of one rank started without a launcher (what srun or torchrun would set)."""
    env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
               LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port or free_port()), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.update(extra)
    return env


def write_config(path: Path, cfg: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


class Proc:
    """A command in its own process group, output to a log file; killed as a group."""

    def __init__(self, cmd: list[str], log: Path, env: dict[str, str] | None = None,
                 cwd: Path = REPO):
        self.log = log
        self.fh = open(log, "ab")
        self.fh.write(f"\n$ {' '.join(cmd)}\n".encode())
        self.fh.flush()
        self.p = subprocess.Popen(cmd, stdout=self.fh, stderr=subprocess.STDOUT, env=env or dict(os.environ),
                                  cwd=cwd, start_new_session=True)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.p.pid, sig)

    def wait(self, timeout: float) -> int:
        try:
            return self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            self.p.wait()
            raise AssertionError(f"still running after {timeout:.0f}s; log {self.log}:\n{self.tail()}") from None
        finally:
            if self.p.poll() is not None:
                self.fh.close()

    def tail(self, n: int = 4000) -> str:
        self.fh.flush()
        return self.log.read_bytes()[-n:].decode("utf-8", "replace")


def run(cmd: list[str], log: Path, env: dict[str, str] | None = None, timeout: float = 300) -> int:
    return Proc(cmd, log, env).wait(timeout)


def kill_at_random_point(cmd: list[str], log: Path, env: dict[str, str], seed: int,
                         progress: Callable[[], int], stages: int, max_delay: float,
                         timeout: float = 900) -> bool:
    """Start ``cmd``; once ``progress()`` has grown by a seeded random 1..``stages`` since the start
    (a rerun begins with earlier progress), wait a seeded random delay and SIGKILL the whole process
    group. False if the command finished first."""
    rng = random.Random(seed)
    stage, delay = rng.randint(1, max(1, stages)), rng.uniform(0.0, max_delay)
    stage += progress()
    proc = Proc(cmd, log, env)
    with open(log, "ab") as fh:
        fh.write(f"[faults] seed {seed}: SIGKILL at progress {stage} + {delay:.2f}s\n".encode())
    deadline = time.monotonic() + timeout
    while proc.p.poll() is None and progress() < stage:
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"no progress to stage {stage} in {timeout}s:\n{proc.tail()}")
        time.sleep(0.02)
    end = time.monotonic() + delay
    while proc.p.poll() is None and time.monotonic() < end:
        time.sleep(0.01)
    finished = proc.p.poll() is not None
    proc.kill()
    proc.wait(60)
    return not finished


def count_lines(path: Path) -> int:
    try:
        return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    except OSError:
        return 0


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def digest(folder: Path, pattern: str = "**/*") -> dict[str, str]:
    """relative path -> sha256 of every file under ``folder`` matching ``pattern``."""
    return {str(p.relative_to(folder)): sha256(p) for p in sorted(folder.glob(pattern)) if p.is_file()}


def metrics(run_dir: Path) -> dict[int, dict[str, Any]]:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r for r in recs}


# Linux keeps a process's memory high-water mark across exec, and subprocess starts children with
# vfork: a child's ``ru_maxrss`` therefore starts at the *parent's* peak (pytest's, which grows to
# gigabytes over a session). A tiny meter interpreter in between starts the command from a small
# address space and reports the command's own peak.
_METER = (
    "import json, resource, subprocess, sys\n"
    "rc = subprocess.call(sys.argv[2:])\n"
    "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
    "open(sys.argv[1], 'w').write(json.dumps({'rc': rc, 'maxrss_kb': peak}))\n"
    "sys.exit(rc)\n"
)


def peak_rss_mb_of(cmd: list[str], log: Path, env: dict[str, str] | None = None,
                   timeout: float = 300) -> tuple[int, float]:
    """(exit code, peak resident memory in MiB) of a command, measured by a small meter process."""
    report = log.with_name(log.name + ".rss.json")
    report.unlink(missing_ok=True)
    proc = Proc([PYTHON, "-c", _METER, str(report), *cmd], log, env)
    rc = proc.wait(timeout)
    if not report.exists():
        raise AssertionError(f"the memory meter wrote no report (exit {rc}):\n{proc.tail()}")
    res = json.loads(report.read_text())
    return int(res["rc"]), res["maxrss_kb"] / 1024


# ---------------------------------------------------------------------------------- shards
def sample_meta(key: str, split: str = "train", text: str = "The heart is normal in size. No effusion.") -> dict:
    """A sample json as ``llmclip shards build`` writes it."""
    report = {"findings": text, "impression": "", "indication": "", "comparison": "", "history": "",
              "full": text}
    return {"key": key, "source": "faults", "patient_id": key, "study_id": key, "image_id": key,
            "view": "PA", "split": split, "report": report, "labels": {}, "label_source": "labeler",
            "synthetic_image": True}


def jpeg(key: str, size: int = 32) -> bytes:
    """A rendered chest phantom (llmclip.data.phantom), JPEG-encoded."""
    from llmclip.data import phantom
    from llmclip.data.phantom_spec import PhantomSpec

    return phantom.encode(phantom.render(PhantomSpec(), key, size), "jpg")


def tar_member(name: str, data: bytes = b"", **fields: Any) -> tuple[Any, bytes]:
    import tarfile

    info = tarfile.TarInfo(name)
    info.size = len(data)
    for k, v in fields.items():
        setattr(info, k, v)
    return info, data


def write_tar(path: Path, members: list[tuple[Any, bytes]]) -> Path:
    import io
    import tarfile

    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return path


def write_manifest(root: Path, count: int, with_images: bool = True) -> Path:
    """``manifest.json`` of one train shard (``images/`` and/or ``text/train-000000.tar``)."""
    from llmclip.data.shards import FORMAT

    entry = {"split": "train", "index": 0, "count": count, "image": None, "text": "text/train-000000.tar",
             "sha256": {}}
    for kind, rel in (("image", "images/train-000000.tar"), ("text", "text/train-000000.tar")):
        if kind == "image" and not with_images:
            continue
        entry[kind] = rel
        entry["sha256"][kind] = None  # hashing a 2 GB sparse member would read it; readers don't check
    manifest = {"format": FORMAT, "source": "faults", "created_by": "tests/faults", "shards": [entry],
                "splits": {"train": count, "val": 0, "test": 0}, "label_source": "labeler",
                "synthetic_images": True}
    (root / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    return root


# ---------------------------------------------------------------------------------- engines
ENGINE = f"import sys\nsys.path.insert(0, {str(Path(__file__).resolve().parent)!r})\n" + r"""
import json, torch
from pathlib import Path
import deepspeed
from llmclip.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from llmclip.config import ConfigError

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
ds = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "train_batch_size": 2,
      "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
engine, *_ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=ds)
loss = engine(torch.randn(2, 64)).pow(2).mean()
engine.backward(loss)
engine.step()
"""
"""Prelude of a child script: one real DeepSpeed engine (ZeRO-2, one rank, torch AdamW) of a small
model after one optimizer step, and llmclip.checkpoint's functions."""


# ---------------------------------------------------------------------------------- recipes
STAGE1_STEPS = 5
STAGE2_STEPS = 6


def stage1_recipe(out: Path, shards: Path, **run_overrides: Any) -> dict[str, Any]:
    """A stage-1 run small enough for a fault test: tiny Llama, LoRA, ZeRO-3, fp32, both objectives,
    a checkpoint after every step (all kept, so a test can compare any of them)."""
    return {
        "stage": 1,
        "run": {"out_dir": str(out), "seed": 0, "log_every": 1, "save_every": 1, "keep_checkpoints": 10,
                "tensorboard": False, "max_nonfinite_steps": 3, "collective_timeout_s": 60, **run_overrides},
        "model": {"source": "tiny:llama", "quantization": "none", "attention": "sdpa", "max_length": 48,
                  "pooling": "mean", "lora": {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0}},
        "data": {"shards": f"{shards}:train", "num_workers": 0},
        "stage1": {"mntp_steps": 2, "hard_negatives": 1},
        "optim": {"lr": 3e-3, "warmup_steps": 1, "max_steps": STAGE1_STEPS, "weight_decay": 0.0},
        "deepspeed": {"config": str(REPO / "ds_configs" / "cpu_zero3.json"), "micro_batch_size": 2,
                      "grad_accum": 1, "precision": "fp32"},
    }


def stage2_recipe(out: Path, shards: Path, cache: Path, encoder: Path, **run_overrides: Any) -> dict[str, Any]:
    """A stage-2 run small enough for a fault test: 1-block ViT on 32 px images, negation negatives,
    ZeRO-2, fp32, a checkpoint after every step (all kept)."""
    return {
        "stage": 2,
        "run": {"out_dir": str(out), "seed": 0, "log_every": 1, "save_every": 1, "keep_checkpoints": 10,
                "tensorboard": False, "max_nonfinite_steps": 3, "collective_timeout_s": 60, **run_overrides},
        "data": {"shards": f"{shards}:train", "cache": str(cache), "encoder": str(encoder), "image_size": 32,
                 "num_workers": 0, "augment": True},
        "model": {"vision": {"name": "vit_tiny_patch16_224",
                             "kwargs": {"patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2}},
                  "text": {"kind": "linear"}, "embed_dim": 32},
        "loss": {"negation": {"enabled": True}},
        "optim": {"lr": 2e-3, "warmup_steps": 1, "max_steps": STAGE2_STEPS},
        "deepspeed": {"config": str(REPO / "ds_configs" / "cpu_zero2.json"), "micro_batch_size": 8,
                      "grad_accum": 1, "precision": "fp32"},
    }


def train_solo(config: Path, log: Path, timeout: float = 600, **env: str) -> int:
    """``python llmclip/train.py --config X`` as one rank without a launcher."""
    return run([PYTHON, str(TRAIN), "--config", str(config)], log, rank_env(**env), timeout)


# ---------------------------------------------------------------------------------- full disks
class SmallDisk:
    """A folder on a 4 MiB tmpfs (``mount -t tmpfs``, needs root) that ``full()`` fills up.

    Where mounting is not permitted, the same tests run with ``RLIMIT_FSIZE`` instead: ``full(n)``
    then limits every file this process (and its children) writes to ``n`` bytes, and writes beyond
    fail with EFBIG instead of ENOSPC. ``mode`` says which one is in use; ``LLMCLIP_FAULT_DISK=rlimit``
    forces the fallback.
    """

    @classmethod
    def attach(cls, path: Path, mode: str) -> SmallDisk:
        """The disk another process mounted (a child process fills it itself)."""
        disk = cls.__new__(cls)
        disk.path, disk.ballast, disk.mode = path, path / ".ballast", mode
        return disk

    def __init__(self, root: Path, size: str = "4m"):
        self.path = root / "disk"
        self.path.mkdir(parents=True)
        self.ballast = self.path / ".ballast"
        forced = os.environ.get("LLMCLIP_FAULT_DISK") == "rlimit"  # exercise the fallback on purpose
        r = None if forced else subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(self.path)], capture_output=True, text=True)
        self.mode = "tmpfs" if r is not None and r.returncode == 0 else "rlimit"
        self._limit: tuple[int, int] | None = None
        self._sigxfsz = None

    @contextlib.contextmanager
    def full(self, leave: int) -> Iterator[None]:
        """Inside the block, at most about ``leave`` more bytes can be written under ``path``."""
        if self.mode == "tmpfs":
            free = os.statvfs(self.path).f_bavail * os.statvfs(self.path).f_frsize
            with open(self.ballast, "wb") as f:
                f.write(b"\0" * max(0, free - leave))
            try:
                yield
            finally:
                self.ballast.unlink(missing_ok=True)
            return
        self._limit = resource.getrlimit(resource.RLIMIT_FSIZE)
        self._sigxfsz = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (leave, self._limit[1]))
        try:
            yield
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, self._limit)
            signal.signal(signal.SIGXFSZ, self._sigxfsz)

    def close(self) -> None:
        if self.mode == "tmpfs":
            r = subprocess.run(["umount", str(self.path)], capture_output=True)
            if r.returncode != 0:
                subprocess.run(["umount", "-l", str(self.path)], capture_output=True)
