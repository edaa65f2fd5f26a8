"""A throw-away two-node SLURM cluster on this one machine: its own slurmctld and two slurmd
(SLURM's "multiple slurmd" mode: ``slurmd -N NAME``, one port per node), its own config, ports,
spool and state folders under a temp folder, so it never touches the shared one-node test cluster
(tests/slurm/cluster_up.sh) running beside it. Root only (the daemons run jobs as any user).

The two node names are this host's short name and ``localhost``: both resolve here, so the first
node of a job's node list is a master address every rank can reach, exactly as on a real cluster.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

from llmclip.distributed import free_port

CPUS_PER_NODE = 1  # 2 cores here: one "node" each
# Job ids far from the shared cluster's, and new ones on every start (the sandbox keeps no state):
# slurm/logs/<name>-<id> of two jobs never collide.
FIRST_JOB_ID = 900000 + int(time.time()) % 90000


def _conf(root: Path, host: str, ports: list[int]) -> str:
    names = [host, "localhost"]
    nodes = "\n".join(
        f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={p} CPUs={CPUS_PER_NODE} "
        f"RealMemory=4000 State=UNKNOWN" for n, p in zip(names, ports[1:], strict=True))
    return f"""ClusterName=llmclip2n
SlurmctldHost={host}
SlurmctldPort={ports[0]}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
ReturnToService=2
FirstJobId={FIRST_JOB_ID}
KillWait=10
MinJobAge=600
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmdSpoolDir={root}/spool-%n
StateSaveLocation={root}/state
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
{nodes}
PartitionName=two Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


class TwoNodeSlurm:
    """Start with ``up()``; clients reach it with ``env`` (``SLURM_CONF``); ``down()`` stops it."""

    def __init__(self, root: Path):
        self.root = root
        self.host = socket.gethostname().split(".")[0]
        self.names = [self.host, "localhost"]
        self.conf = root / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self.procs: list[subprocess.Popen] = []

    def _start(self, *cmd: str, log: str) -> None:
        fh = open(self.root / log, "ab")  # noqa: SIM115 - closed with the process
        self.procs.append(subprocess.Popen(list(cmd), stdout=fh, stderr=subprocess.STDOUT,
                                           env=self.env, start_new_session=True))

    def _wait(self, what: str, ok, seconds: float = 60) -> None:
        deadline = time.monotonic() + seconds
        while not ok():
            dead = [p.args for p in self.procs if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"two-node SLURM: {what} failed ({'exited: ' + str(dead) if dead else 'timeout'}); "
                                   f"logs in {self.root}")
            time.sleep(0.3)

    def _out(self, *cmd: str) -> str:
        r = subprocess.run(list(cmd), capture_output=True, text=True, env=self.env, timeout=30)
        return r.stdout if r.returncode == 0 else ""

    def up(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        for d in ["state", *[f"spool-{n}" for n in self.names]]:
            (self.root / d).mkdir(exist_ok=True)
        ports = [free_port() for _ in range(3)]
        self.conf.write_text(_conf(self.root, self.host, ports), encoding="utf-8")
        self._start("slurmctld", "-D", "-i", "-f", str(self.conf), log="slurmctld.out")
        self._wait("slurmctld", lambda: "UP" in self._out("scontrol", "ping"))
        for name in self.names:
            self._start("slurmd", "-D", "-N", name, "-f", str(self.conf), log=f"slurmd-{name}.out")

        def idle() -> bool:
            states = self._out("sinfo", "-h", "-N", "-o", "%N %t").split()
            return sum(s in ("idle", "mix", "alloc") for s in states[1::2]) == 2

        self._wait("two idle nodes", idle)

    def down(self) -> None:
        """Stop the daemons this object started (by their ids, children first)."""
        import psutil

        for p in reversed(self.procs):
            try:
                tree = psutil.Process(p.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                tree = []
            for q in [*tree, psutil.Process(p.pid) if p.poll() is None else None]:
                if q is not None:
                    try:
                        q.terminate()
                    except psutil.NoSuchProcess:
                        pass
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
