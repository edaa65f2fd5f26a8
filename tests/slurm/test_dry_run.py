"""The launch plan of slurm/*.sh for a cluster shape we do not have (4 nodes x 8 GPUs), checked line
by line: node ranks, world size, master address, global ranks, and the arguments passed through.

The per-node command lines are parsed with torchrun's own argument parser, so a line that torchrun
would reject, or read differently, fails here. No cluster is needed for these tests.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from torch.distributed.run import get_args_parser

ROOT = Path(__file__).resolve().parents[2]
HEADER = re.compile(
    r"^job=(\d+) name=(\S+) restart=(\d+) nodes=(\d+) nproc_per_node=(\d+) "
    r"world_size=(\d+) master=(\S+):(\d+)$"
)
NODE = re.compile(r"^node (\d+) (\S+) ranks (\d+)-(\d+): (.*)$")


def dry_run(script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    """Run a batch script with LLMCLIP_DRY_RUN=1 and a hand-made SLURM environment."""
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "LLMCLIP_", "CUDA_VISIBLE", "OMP_", "MKL_"))
    }
    clean.update(LLMCLIP_DRY_RUN="1", **env)
    return subprocess.run(
        ["bash", script, *args], cwd=ROOT, env=clean, capture_output=True, text=True, timeout=60
    )


def parse_plan(stdout: str) -> tuple[dict, dict[str, str], list[dict]]:
    lines = stdout.strip().splitlines()
    m = HEADER.match(lines[0])
    assert m, f"bad header: {lines[0]!r}"
    head = dict(
        zip(
            ["job", "name", "restart", "nodes", "nproc", "world", "master", "port"],
            m.groups(),
            strict=True,
        )
    )
    env_line = next(ln for ln in lines if ln.startswith("env:"))
    env = dict(kv.split("=", 1) for kv in env_line[len("env:") :].split())
    nodes = []
    for ln in lines:
        n = NODE.match(ln)
        if n:
            cmd = shlex.split(n.group(5))
            assert Path(cmd[0]).name == "torchrun"
            nodes.append(
                {
                    "index": int(n.group(1)),
                    "host": n.group(2),
                    "first": int(n.group(3)),
                    "last": int(n.group(4)),
                    "cmd": cmd,
                    "torchrun": get_args_parser().parse_args(cmd[1:]),
                }
            )
    return head, env, nodes


def test_four_nodes_eight_gpus_stage1() -> None:
    out = dry_run(
        "slurm/stage1.sh",
        "configs/stage1/tiny.yaml",
        "--set",
        "optim.lr=1e-4",
        "--set",
        "run.out_dir=runs/with space",
        SLURM_JOB_ID="4242",
        SLURM_JOB_NAME="llmclip-stage1",
        SLURM_JOB_NODELIST="gpu[001-004]",
        SLURM_GPUS_ON_NODE="8",
        SLURM_CPUS_ON_NODE="96",
    )
    assert out.returncode == 0, out.stderr
    head, env, nodes = parse_plan(out.stdout)
    assert head["nodes"] == "4" and head["nproc"] == "8" and head["world"] == "32"
    assert head["master"] == "gpu001"
    assert [n["host"] for n in nodes] == ["gpu001", "gpu002", "gpu003", "gpu004"]
    assert env["OMP_NUM_THREADS"] == "12"  # 96 CPUs shared by 8 ranks
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"

    global_ranks = []
    for i, node in enumerate(nodes):
        a = node["torchrun"]
        assert node["index"] == i
        assert a.node_rank == i  # static rendezvous: node rank straight from SLURM's order
        assert a.nnodes == "4" and a.nproc_per_node == "8"
        assert a.master_addr == "gpu001" and a.master_port == int(head["port"])
        assert a.rdzv_backend == "static" and a.max_restarts == 0
        # torchrun's static rendezvous: global rank = node_rank * nproc_per_node + local_rank
        ranks = [a.node_rank * 8 + local for local in range(8)]
        assert (ranks[0], ranks[-1]) == (node["first"], node["last"])
        global_ranks += ranks
        # the program and every user argument, quoting intact, after torchrun's own options
        assert [a.training_script, *a.training_script_args] == [
            "llmclip/train.py",
            "--config",
            "configs/stage1/tiny.yaml",
            "--set",
            "optim.lr=1e-4",
            "--set",
            "run.out_dir=runs/with space",
        ]
    assert sorted(global_ranks) == list(range(32))
    # every node agrees on everything but its node rank
    assert len({tuple(c for c in n["cmd"] if not c.startswith("--node-rank")) for n in nodes}) == 1


def test_stage2_gpus_from_type_spec_and_port_per_job() -> None:
    runs = [
        dry_run(
            "slurm/stage2.sh",
            "configs/stage2/tiny.yaml",
            SLURM_JOB_ID=job,
            SLURM_JOB_NODELIST="a100-[7-8],h100-01",
            SLURM_GPUS_PER_NODE="a100:4",
            SLURM_CPUS_ON_NODE="32",
        )
        for job in ("100", "101")
    ]
    plans = []
    for out in runs:
        assert out.returncode == 0, out.stderr
        plans.append(parse_plan(out.stdout))
    head, env, nodes = plans[0]
    assert (head["nodes"], head["nproc"], head["world"]) == ("3", "4", "12")
    assert [n["host"] for n in nodes] == ["a100-7", "a100-8", "h100-01"]
    assert nodes[2]["torchrun"].node_rank == 2 and nodes[2]["first"] == 8
    assert nodes[0]["torchrun"].training_script_args == ["--config", "configs/stage2/tiny.yaml"]
    assert plans[0][0]["port"] != plans[1][0]["port"]  # two jobs on one node do not collide


def test_cache_plan_uses_the_run_folders_encoder(tmp_path: Path) -> None:
    run = tmp_path / "stage1-run"
    (run / "final").mkdir(parents=True)
    (run / "final" / "encoder.json").write_text("{}", encoding="utf-8")
    out = dry_run(
        "slurm/cache.sh",
        str(run),
        "shards/mimic:train,val",
        "--variants",
        "report,negated",
        SLURM_JOB_ID="9",
        SLURM_JOB_NODELIST="n[1-2]",
        CUDA_VISIBLE_DEVICES="0,1,2",
    )
    assert out.returncode == 0, out.stderr
    head, _, nodes = parse_plan(out.stdout)
    assert (head["nodes"], head["nproc"]) == ("2", "3")
    a = nodes[1]["torchrun"]
    assert a.module and a.training_script == "llmclip.cli"
    assert a.training_script_args == [
        "cache",
        "build",
        "--encoder",
        f"{run}/final",
        "--shards",
        "shards/mimic:train,val",
        "--out",
        "cache/mimic",
        "--no-progress",
        "--variants",
        "report,negated",
    ]
    explicit = dry_run(
        "slurm/cache.sh",
        str(run / "final"),
        "shards/mimic",
        "out/c",
        SLURM_JOB_ID="9",
        SLURM_JOB_NODELIST="n1",
    )
    args = parse_plan(explicit.stdout)[2][0]["torchrun"].training_script_args
    assert args[args.index("--out") + 1] == "out/c"
    assert parse_plan(explicit.stdout)[0]["nproc"] == "2"  # no GPU anywhere: 2 CPU ranks


@pytest.mark.parametrize(
    "args, message",
    [
        ((), "usage: sbatch slurm/stage1.sh CONFIG.yaml"),
        (("configs/stage1/missing.yaml",), "config file not found: configs/stage1/missing.yaml"),
    ],
)
def test_bad_arguments_exit_2(args: tuple[str, ...], message: str) -> None:
    out = dry_run("slurm/stage1.sh", *args, SLURM_JOB_NODELIST="n1")
    assert out.returncode == 2 and message in out.stderr


def test_cache_refuses_a_missing_encoder(tmp_path: Path) -> None:
    out = dry_run("slurm/cache.sh", str(tmp_path / "nope"), "shards/x", SLURM_JOB_NODELIST="n1")
    assert out.returncode == 2 and "encoder folder not found" in out.stderr


HOSTLISTS = ["gpu[001-004]", "a,b,c", "n[1-3,7],m[08-10]", "rack1-[01-02]", "single"]
EXPECTED = [
    ["gpu001", "gpu002", "gpu003", "gpu004"],
    ["a", "b", "c"],
    ["n1", "n2", "n3", "n7", "m08", "m09", "m10"],
    ["rack1-01", "rack1-02"],
    ["single"],
]


def _expand(hostlist: str, without_scontrol: bool) -> list[str]:
    shadow = "scontrol() { return 1; }; " if without_scontrol else ""
    script = f"source slurm/launch.sh; {shadow}expand_hostlist {shlex.quote(hostlist)}"
    out = subprocess.run(
        ["bash", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


@pytest.mark.parametrize("hostlist, expected", list(zip(HOSTLISTS, EXPECTED, strict=True)))
def test_hostlist_fallback_matches_scontrol(hostlist: str, expected: list[str]) -> None:
    """Without scontrol (a laptop dry run) the expansion equals SLURM's own, when SLURM is here."""
    assert _expand(hostlist, without_scontrol=True) == expected
    if shutil.which("scontrol"):
        assert _expand(hostlist, without_scontrol=False) == expected
