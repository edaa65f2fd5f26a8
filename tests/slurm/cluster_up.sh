#!/usr/bin/env bash
# Bring up a real one-node SLURM cluster on this machine (root only), idempotently.
#
# Used by `make test` before pytest so the tests in tests/slurm run against a real scheduler in CI:
# installs Debian's slurmctld/slurmd/slurm-client/munge when missing, writes slurm.conf with this
# machine's real CPU count and memory (from `slurmd -C`), starts munged, slurmctld and slurmd, and
# waits until the node is idle. Run it again at any time: a healthy cluster is left as it is.
# Exit status is non-zero (with the reason on stderr) when the cluster cannot be started.
set -euo pipefail

log() { echo "cluster_up: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (installs packages and starts daemons)"

CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
PARTITION=${LLMCLIP_SLURM_PARTITION:-debug}
HOST=$(hostname -s)

node_state() { sinfo -h -N -n "$HOST" -o '%t' 2>/dev/null | head -1; }

# --- 1. packages -------------------------------------------------------------------------------
pkgs=()
for p in slurmctld slurmd slurm-client munge; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || pkgs+=("$p")
done
if [ ${#pkgs[@]} -gt 0 ]; then
  log "installing ${pkgs[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # Package lists may be stale or empty on a fresh CI image: update once, then retry.
  apt-get install -y -q --no-install-recommends "${pkgs[@]}" >/dev/null 2>&1 || {
    apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends "${pkgs[@]}" >/dev/null
  } || die "apt-get could not install ${pkgs[*]}"
fi

# --- 2. munge ----------------------------------------------------------------------------------
install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
install -d -o munge -g munge -m 0755 /run/munge
if [ ! -s /etc/munge/munge.key ]; then
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key
if ! munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
  log "starting munged"
  runuser -u munge -- /usr/sbin/munged --force
  for _ in $(seq 50); do munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.2; done
  munge -n </dev/null | unmunge >/dev/null || die "munged does not answer"
fi

# --- 3. slurm.conf -----------------------------------------------------------------------------
# `slurmd -C` prints this node's real hardware line (CPUs, sockets, cores, threads, RealMemory).
hw=$(slurmd -C | head -1)
[[ $hw == NodeName=* ]] || die "slurmd -C gave no node line: $hw"
# Keep a little memory back for the OS so jobs asking for the default do not fail to schedule.
real_mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$hw")
node_mem=$((real_mem * 95 / 100))
hw=$(sed "s/RealMemory=[0-9]*/RealMemory=$node_mem/; s/NodeName=[^ ]*/NodeName=$HOST/" <<<"$hw")
# The host name must resolve for slurmctld, srun and the training rendezvous; a bare CI container
# may not map it.
getent hosts "$HOST" >/dev/null || echo "127.0.0.1 $HOST" >>/etc/hosts

install -d -m 0755 $CONF_DIR /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
new_conf=$(mktemp)
cat >"$new_conf" <<EOF
# Written by tests/slurm/cluster_up.sh: one-node test cluster for llmclip's slurm/ scripts.
ClusterName=llmclip
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job waits cred_expire (default 120 s), then for the next scheduling pass (up to 30-60 s)
# before it starts again; the preemption test requeues a job, so this test cluster shortens both.
# Real clusters keep their own values.
AuthInfo=cred_expire=5
SchedulerParameters=sched_interval=2,bf_interval=2
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
ReturnToService=2
JobRequeue=1
# A preempted job's checkpoint must finish before SIGKILL follows SIGTERM.
KillWait=60
MinJobAge=600
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmdSpoolDir=/var/spool/slurmd
StateSaveLocation=/var/spool/slurmctld
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldTimeout=30
SlurmdTimeout=60
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
$hw State=UNKNOWN
PartitionName=$PARTITION Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
changed=0
if ! cmp -s "$new_conf" "$CONF"; then
  install -m 0644 "$new_conf" "$CONF"
  changed=1
fi
rm -f "$new_conf"

up() { case "$(node_state)" in idle | mix | alloc | comp) return 0 ;; esac; return 1; }
if [ "$changed" = 0 ] && up; then log "cluster already up ($HOST: $(node_state))"; exit 0; fi

# --- 4. daemons --------------------------------------------------------------------------------
running() { [ -f "$1" ] && kill -0 "$(cat "$1" 2>/dev/null)" 2>/dev/null; }
if [ "$changed" = 1 ]; then
  # A new config needs fresh daemons; stop only the ones whose pid files we wrote.
  for pidf in /run/slurmd.pid /run/slurmctld.pid; do
    if running "$pidf"; then kill "$(cat "$pidf")"; fi
  done
  for _ in $(seq 50); do running /run/slurmd.pid || running /run/slurmctld.pid || break; sleep 0.2; done
fi
if ! running /run/slurmctld.pid; then log "starting slurmctld"; slurmctld; fi
for _ in $(seq 100); do scontrol ping >/dev/null 2>&1 && break; sleep 0.2; done
scontrol ping | grep -q UP || die "slurmctld did not come up (see /var/log/slurm/slurmctld.log)"
if ! running /run/slurmd.pid; then log "starting slurmd"; slurmd; fi

# --- 5. wait for the node ----------------------------------------------------------------------
for i in $(seq 150); do
  state=$(node_state)
  case "$state" in
    idle | mix | alloc | comp) log "cluster up: $hw (state $state)"; exit 0 ;;
    down* | drain* | drng* | fail*)
      # e.g. left down by an earlier slurmd restart: ReturnToService covers most cases, not all.
      [ $((i % 10)) = 1 ] && scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 || true ;;
  esac
  sleep 0.2
done
die "node $HOST not idle after 30 s (state '$(node_state)'); see /var/log/slurm/slurmd.log"
