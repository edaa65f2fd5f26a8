"""Shared helpers of the performance benchmarks: interleaved timing, medians, tables, peak RSS.

The machines these run on are small shared CPUs whose speed drifts by tens of percent within a
minute. Every benchmark therefore times its contenders *side by side*: repetition ``i`` runs each
contender once, in an order that rotates every repetition, and only medians are compared. A slow
patch of the machine then hits every contender about equally, and the ratio survives it.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def interleaved(
    runners: dict[str, Callable[[], object]], reps: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Seconds per call of each runner, ``reps`` times, in rotating order; warm-up calls untimed.

    Rotation (A B C, B C A, C A B, ...) makes every contender run first, middle and last equally
    often, so caches, clock boost and a neighbour's load do not favour one of them.
    """
    names = list(runners)
    for _ in range(warmup):
        for n in names:
            runners[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(reps):
        k = i % len(names)
        for n in names[k:] + names[:k]:
            t0 = time.perf_counter()
            runners[n]()
            times[n].append(time.perf_counter() - t0)
    return times


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def spread(xs: Sequence[float]) -> float:
    """Relative half-range of the middle half (a noise figure printed next to every median)."""
    if len(xs) < 4:
        return (max(xs) - min(xs)) / (2 * median(xs)) if len(xs) > 1 else 0.0
    q = quartiles(xs)
    return (q[2] - q[0]) / (2 * median(xs))


def quartiles(xs: Sequence[float]) -> list[float]:
    """Q1, median, Q3 by linear interpolation between the data points (numpy's default), so the
    inter-quartile range always lies within min-max. (Python's default ``exclusive`` method
    extrapolates past the data for small samples: with 2 repetitions its Q1 fell below the minimum.
    Every result saved up to 2026-12-04 used it; their IQRs are slightly wider.)"""
    return statistics.quantiles(xs, n=4, method="inclusive")


@dataclass
class Ratio:
    """Throughput of ``ours`` over ``peer`` for the same work: the ratio of medians, with spread.

    ``value`` = median(peer seconds) / median(our seconds) (same work on both sides, so this is the
    ratio of median throughputs). The spread comes from the per-repetition ratios (repetition ``i``
    of the two ran back to back): ``q1``-``q3`` is their inter-quartile range, ``lo``-``hi`` min-max.
    """

    value: float
    q1: float
    q3: float
    lo: float
    hi: float
    reps: int

    def __str__(self) -> str:
        return (f"{self.value:.2f}x (per-repetition IQR {self.q1:.2f}-{self.q3:.2f}, "
                f"min-max {self.lo:.2f}-{self.hi:.2f}, {self.reps} reps)")

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def ratio_of_medians(ours: Sequence[float], peer: Sequence[float]) -> Ratio:
    """How many times faster ``ours`` is than ``peer``, from seconds per repetition of the same work.

    The headline is the ratio of medians (never the median of ratios, which can differ from it);
    the per-repetition ratios only give the spread.
    """
    per = [b / a for a, b in zip(ours, peer, strict=True)]
    q = quartiles(per) if len(per) >= 2 else [per[0]] * 3
    return Ratio(median(peer) / median(ours), q[0], q[2], min(per), max(per), len(per))


def verdict(label: str, r: Ratio, target: float) -> str:
    """The final ``RATIO`` line every benchmark prints."""
    met = "met" if r.value >= target else "NOT met"
    return f"RATIO {label}: {r} [target >= {target:.2f}x: {met}]"


def write_json(path: str | Path | None, payload: dict) -> None:
    """Write a benchmark's result (every repetition included) where ``--json`` points."""
    if path:
        Path(path).write_text(json.dumps(payload, indent=2, default=str), encoding="utf-8")
        print(f"wrote {path}")


# ------------------------------------------------------------------------------------------------
# Distance to the limit: a same-run GEMM peak
# ------------------------------------------------------------------------------------------------


def gemm_peak(shapes: Sequence[tuple[int, int, int]], dtype=None, reps: int = 5) -> float:
    """FLOP/s of ``torch.matmul`` at the given (m, k, n) shapes, in this process's threads and dtype.

    This is what the machine does on the model's own matrix shapes right now (same threads, same
    load); a step's achieved FLOP/s over it says how close the step is to the machine's limit. The
    best of ``reps`` timings of the whole set is taken: a peak, not a typical figure.
    """
    import torch

    dtype = dtype or torch.float32
    mats = [(torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)) for m, k, n in shapes]
    flops = sum(2.0 * m * k * n for m, k, n in shapes)
    for a, b in mats:  # warm-up: first calls pick kernels and fault pages in
        a @ b
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for a, b in mats:
            a @ b
        best = min(best, time.perf_counter() - t0)
    return flops / best


def linear_shapes(model, tokens: int, skip: Sequence[str] = ()) -> list[tuple[int, int, int]]:
    """(tokens, in, out) of every ``nn.Linear`` of ``model`` whose name contains none of ``skip``
    (e.g. ``("lora_", "lm_head")`` for the base matrices a contrastive step actually multiplies)."""
    import torch

    return [(tokens, m.in_features, m.out_features) for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and not any(k in name for k in skip)]


def count_flops(fn: Callable[[], object]) -> float:
    """FLOPs that ``fn`` performs (matmuls, convolutions, attention), counted by PyTorch's own
    ``FlopCounterMode`` -- one counting rule for every contender, forward and backward."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain fixed-width table (right-aligned numbers, left-aligned text)."""
    cells = [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]

    def line(vals: Sequence[str], raw: Sequence[object] | None = None) -> str:
        out = []
        for i, v in enumerate(vals):
            numeric = raw is not None and isinstance(raw[i], (int, float))
            out.append(v.rjust(widths[i]) if numeric else v.ljust(widths[i]))
        return "  ".join(out).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), sep, *(line(c, r) for c, r in zip(cells, rows, strict=True))])


def _fmt(v: object) -> str:
    if isinstance(v, float):
        if v == 0:
            return "0"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        if abs(v) >= 10:
            return f"{v:.1f}"
        return f"{v:.3g}"
    return str(v)


THREADS_HELP = (
    "torch intra-op threads per contender (default 1; 0 = all cores). On a shared 2-core machine "
    "two OpenMP threads spin-wait for each other whenever a neighbour takes a core (measured: a "
    "stage-1 step 4x slower with 2 threads than with 1 under load), which turns ratios into noise"
)


def set_threads(n: int) -> int:
    """Pin intra-op threads (0 = all cores); returns the count in use."""
    import torch

    n = n or os.cpu_count() or 1
    torch.set_num_threads(n)
    return n


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def single_rank_env() -> None:
    """Environment of a 1-rank process group, so ``deepspeed.initialize`` runs in this process."""
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))


def openi_texts(n: int) -> list[str]:
    """``n`` real Open-I reports (findings + impression), cycled if ``n`` exceeds the archive."""
    from llmclip.assets import openi_reports_tgz
    from llmclip.labels.openi import read_openi

    texts = [r.text for r in read_openi(openi_reports_tgz()) if r.text]
    return [texts[i % len(texts)] for i in range(n)]


def offline_hub() -> None:
    """Benchmarks build every model from a config; never reach a hub. Deprecation notices that
    libraries print on every step are silenced, so the table stays readable."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # DeepSpeed JIT-builds a shared-memory comm op on CPU hosts. In the shared default folder
    # (~/.cache/torch_extensions) every other virtualenv's build has another hash, so processes of
    # different venvs rebuild it in turn under one file lock (minutes each on a busy machine): a
    # benchmark would time that wait. One folder per interpreter builds it once.
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))


# ------------------------------------------------------------------------------------------------
# Peak memory of a command (its whole process tree)
# ------------------------------------------------------------------------------------------------


class TreeRSS:
    """Samples the summed RSS of a process and all its descendants; ``peak`` in bytes.

    Summing the tree matters: shard building and the DeepSpeed launcher do their work in child
    processes, whose memory the parent's own ``ru_maxrss`` never sees.
    """

    def __init__(self, pid: int, interval: float = 0.05):
        import psutil

        self.proc = psutil.Process(pid)
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            total = 0
            try:
                procs = [self.proc, *self.proc.children(recursive=True)]
            except psutil.Error:
                break
            for p in procs:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            self._stop.wait(self.interval)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def run_measured(
    cmd: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 1800,
    log: Path | None = None,
) -> tuple[float, int]:
    """Run ``cmd``; return (wall seconds, peak RSS bytes of its process tree). Fails loudly."""
    out = open(log, "w", encoding="utf-8") if log else subprocess.DEVNULL  # noqa: SIM115
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        list(cmd), env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT if log else None
    )
    sampler = TreeRSS(proc.pid)
    try:
        rc = proc.wait(timeout=timeout)
    finally:
        peak = sampler.stop()
        if log:
            out.close()
    wall = time.perf_counter() - t0
    if rc != 0:
        tail = log.read_text(encoding="utf-8")[-3000:] if log else ""
        sys.exit(f"command failed ({rc}): {' '.join(cmd)}\n{tail}")
    return wall, peak
