"""Scaling with data size: peak memory and wall time of the long jobs as the samples grow 4x.

    python benchmarks/scaling.py                      # PadChest 10K vs 40K, stage 2 on 256 vs 1024
    python benchmarks/scaling.py --text-n 40000 --image-n 1024    # 40K vs 160K (all of PadChest)

Each job runs as the user runs it, as a subprocess, at n and at 4n samples; a sampler adds up the
resident memory of the job's whole process tree (worker processes, DeepSpeed ranks) every 50 ms.

- ``shards``: ``llmclip shards build --source padchest --maxcount N`` (real PadChest reports from
  the torchxrayvision package, text-only shards);
- ``cache``: ``llmclip cache build`` of those shards with a tiny encoder (random 2-layer Llama,
  real SmolLM2 tokenizer) -- the encoder cost is small, so the cache machinery itself is measured;
- ``stage2``: one epoch of ``llmclip/train.py`` (configs/stage2/tiny.yaml, the full clinical
  recipe) under the real ``deepspeed`` launcher on Open-I shards with rendered images and their
  cache (built first, not timed).

Streaming jobs should keep memory flat (peak RSS ratio ~1.0) and time linear (ratio <= 4, less
when a fixed start-up cost is amortised). The final line gives the worst ratios over the jobs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

MiB = 1024 * 1024
FLAT = 1.25  # peak RSS may grow at most this much for 4x the samples
LINEAR = 4.4  # time may grow at most this much for 4x the samples (10% slack for noise)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--text-n", type=int, default=10_000, help="PadChest reports (small size)")
    p.add_argument("--image-n", type=int, default=320, help="Open-I records for stage 2 (small)")
    p.add_argument("--factor", type=int, default=4, help="large size = factor x small size")
    p.add_argument("--workers", type=int, default=2, help="shard-build worker processes")
    p.add_argument("--ranks", type=int, default=2, help="DeepSpeed CPU ranks for stage 2")
    p.add_argument(
        "--jobs", default="shards,cache,stage2", help="comma-separated subset of the jobs to run"
    )
    p.add_argument("--reps", type=int, default=1, help="interleaved repetitions (medians)")
    p.add_argument("--keep", default="", help="keep the work folder here instead of a temp dir")
    p.add_argument("--json", default="", help="also write the results to this JSON file")
    return p.parse_args(argv)


def llmclip_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "llmclip.cli", *args]


def job_env() -> dict[str, str]:
    env = dict(
        os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false"
    )
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


def tiny_encoder(out: Path) -> Path:
    """The test suite's tiny encoder dir (2 x 64 random Llama, real tokenizer, mean pooling)."""
    import torch

    from llmclip.text.encoder import LLMEncoder
    from llmclip.text.export import save_encoder_dir
    from llmclip.text.model_config import ModelConfig

    if (out / "encoder.json").is_file():
        return out
    enc = LLMEncoder.build(
        ModelConfig(source="tiny:llama", attention="sdpa", max_length=128),
        torch.float32,
        lora=False,
    )
    return save_encoder_dir(
        out, enc.decoder, enc.tokenizer, enc.pooler, pooling="mean", max_length=128,
        dtype="float32", extra={"base_model": "tiny:llama"},
    )  # fmt: skip


def count(shard_dir: Path, split: str | None = None) -> int:
    manifest = json.loads((shard_dir / "manifest.json").read_text(encoding="utf-8"))
    splits = manifest["splits"]
    return int(splits[split] if split else sum(splits.values()))


def run_shards(n: int, work: Path, args: argparse.Namespace) -> tuple[float, int, int, float]:
    out = work / f"padchest-{n}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = llmclip_cmd(
        "shards", "build", "--source", "padchest", "--maxcount", str(n), "--out", str(out),
        "--workers", str(args.workers), "--quiet",
    )  # fmt: skip
    wall, peak = C.run_measured(cmd, env=job_env(), cwd=C.REPO, log=work / f"shards-{n}.log")
    return wall, peak, count(out), wall


def run_cache(n: int, work: Path, enc: Path) -> tuple[float, int, int, float]:
    shards = work / f"padchest-{n}"
    out = work / f"cache-padchest-{n}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = llmclip_cmd(
        "cache", "build", "--encoder", str(enc), "--shards", str(shards), "--out", str(out),
        "--variants", "report", "--no-progress",
    )  # fmt: skip
    log = work / f"cache-{n}.log"
    wall, peak = C.run_measured(cmd, env=job_env(), cwd=C.REPO, log=log)
    # The builder reports its encoding rate with the model load left out.
    rates = re.findall(r"\((\d+) reports, ([\d.]+) reports/s\)", log.read_text(encoding="utf-8"))
    work_s = sum(int(k) / float(r) for k, r in rates) if rates else wall
    return wall, peak, count(shards), work_s


def prepare_stage2(n: int, work: Path, enc: Path) -> tuple[Path, Path]:
    """Open-I image shards (rendered 64 px) and their cache; set-up, not timed."""
    import subprocess

    shards = work / f"openi-{n}"
    cache = work / f"cache-openi-{n}"
    if not (shards / "manifest.json").is_file():
        subprocess.run(
            llmclip_cmd(
                "shards", "build", "--source", "openi", "--images", "render", "--maxcount", str(n),
                "--image-size", "64", "--shard-size", "64", "--out", str(shards), "--quiet",
            ),
            check=True, env=job_env(), cwd=C.REPO,
        )  # fmt: skip
    if not (cache / "meta.json").is_file():
        subprocess.run(
            llmclip_cmd(
                "cache", "build", "--encoder", str(enc), "--shards", str(shards), "--out",
                str(cache), "--variants", "report,negated,laterality,severity", "--no-progress",
            ),
            check=True, env=job_env(), cwd=C.REPO,
        )  # fmt: skip
    return shards, cache


def run_stage2(
    n: int, work: Path, enc: Path, args: argparse.Namespace
) -> tuple[float, int, int, float]:
    import yaml

    shards, cache = prepare_stage2(n, work, enc)
    tiny = yaml.safe_load((C.REPO / "configs/stage2/tiny.yaml").read_text(encoding="utf-8"))
    per_step = int(tiny["deepspeed"]["micro_batch_size"]) * args.ranks
    train = count(shards, "train")
    steps = train // per_step  # one epoch: every rank's full batches once
    if steps < 1:
        sys.exit(
            f"stage2: {train} training samples are less than one step ({per_step}); raise --image-n"
        )
    out = work / f"stage2-{n}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [
        # A free rendezvous port: the default 29500 collides with any other launch on this host
        # (the ranks then join the other job's store and wait for its collective timeout).
        str(Path(sys.executable).parent / "deepspeed"), "--master_port", str(C.free_port()),
        "--num_gpus", str(args.ranks),
        str(C.REPO / "llmclip/train.py"), "--config", str(C.REPO / "configs/stage2/tiny.yaml"),
    ]  # fmt: skip
    for o in (
        f"data.shards={shards}:train", f"data.cache={cache}", f"data.encoder={enc}",
        f"optim.max_steps={steps}", f"optim.warmup_steps={min(3, steps)}", "run.save_every=0",
        f"run.log_every={max(1, steps // 4)}", "run.tensorboard=false", f"run.out_dir={out}",
    ):  # fmt: skip
        cmd += ["--set", o]
    wall, peak = C.run_measured(cmd, env=job_env(), cwd=C.REPO, log=work / f"stage2-{n}.log")
    # The training loop's own time: each metrics.jsonl record covers its log window's samples.
    loop, done = 0.0, 0
    for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        loop += (rec["step"] - done) * per_step / rec["samples_per_s"]
        done = rec["step"]
    return wall, peak, steps * per_step, loop


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    C.offline_hub()
    jobs = [j.strip() for j in args.jobs.split(",") if j.strip()]
    unknown = set(jobs) - {"shards", "cache", "stage2"}
    if unknown:
        sys.exit(f"unknown jobs: {sorted(unknown)}")
    if "cache" in jobs and "shards" not in jobs:
        jobs.insert(0, "shards")  # the cache job encodes the shards job's output
    tmp = None
    if args.keep:
        work = Path(args.keep)
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="llmclip-scaling-")
        work = Path(tmp.name)
    enc = tiny_encoder(work / "encoder") if {"cache", "stage2"} & set(jobs) else None
    sizes = {
        "shards": (args.text_n, args.text_n * args.factor),
        "cache": (args.text_n, args.text_n * args.factor),
        "stage2": (args.image_n, args.image_n * args.factor),
    }
    runs: dict[tuple[str, int], list[tuple[float, int, int, float]]] = {}
    try:
        for job in jobs:
            for rep in range(args.reps):  # n, 4n, n, 4n, ...: drift of the machine hits both sizes
                for n in sizes[job]:
                    print(f"{job}: n={n} (repetition {rep + 1}/{args.reps}) ...", flush=True)
                    if job == "shards":
                        res = run_shards(n, work, args)
                    elif job == "cache":
                        res = run_cache(n, work, enc)
                    else:
                        res = run_stage2(n, work, enc, args)
                    runs.setdefault((job, n), []).append(res)
                    wall, peak, samples, work_s = res
                    print(f"  {samples} samples: wall {wall:.1f} s, work {work_s:.1f} s, "
                          f"peak RSS {peak / MiB:.0f} MiB", flush=True)  # fmt: skip
    finally:
        if tmp is not None:
            tmp.cleanup()
    # Per job and size: median wall and work time, largest peak, the sample count.
    results: dict[str, list[tuple[float, int, int, float]]] = {}
    for (job, _), rs in runs.items():
        results.setdefault(job, []).append(
            (C.median([r[0] for r in rs]), max(r[1] for r in rs), rs[0][2],
             C.median([r[3] for r in rs]))
        )  # fmt: skip

    rows, worst_t, worst_m = [], 0.0, 0.0
    for job, ((t1, m1, s1, w1), (t2, m2, s2, w2)) in results.items():
        rt, rw, rm = t2 / t1, w2 / w1, m2 / m1
        worst_t, worst_m = max(worst_t, rw), max(worst_m, rm)
        lin = "linear" if rw <= LINEAR else "SUPERLINEAR"
        flat = "flat" if rm <= FLAT else "GROWS"
        rows.append([job, s1, s2, t1, t2, rt, w1, w2, rw, m1 / MiB, m2 / MiB, rm, f"{lin}, {flat}"])
    head = [
        "job",
        "n",
        "4n",
        "wall s",
        "wall s",
        "x",
        "work s",
        "work s",
        "x",
        "MiB",
        "MiB",
        "x",
        "",
    ]
    print(C.table(head, rows))
    print(
        "wall: the whole command, start-up included; work: the job's own loop (cache: from the "
        "encoding rate it reports; stage2: from metrics.jsonl; shards: wall). Linear is judged on "
        "work time, flat on peak RSS (MiB, summed over the process tree)."
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"benchmark": "scaling", "args": vars(args),
                                               "results": results}, indent=2), encoding="utf-8")  # fmt: skip
    print(
        f"RATIO {args.factor}x samples vs 1x: work time x{worst_t:.2f} (linear: <= {LINEAR}), "
        f"peak RSS x{worst_m:.2f} (flat: <= {FLAT}) [worst over {', '.join(results)}]"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
