#!/usr/bin/env bash
# A private one-node Slurm cluster on this machine, to try the Slurm path before a real cluster:
#
#   launch/slurm-local.sh up        # install (Debian, root) if missing, configure, start, wait for idle
#   eval "$(launch/slurm-local.sh env)"   # point sbatch/squeue/scancel at it (SLURM_CONF)
#   sbatch --ntasks=4 --cpus-per-task=1 slurm/train.sbatch --config configs/default.yaml
#   launch/slurm-local.sh status    # daemons, node state, queue
#   launch/slurm-local.sh down      # stop the daemons (state and logs stay for inspection)
#
# Everything lives under FEDSEA_SLURM_DIR (default /tmp/fedsea-slurm): its own munge key and
# socket, slurm.conf, state, spool, pid and log files, and non-default ports
# (FEDSEA_SLURM_PORT, default 16817, and the next one), so a system Slurm is never touched. When
# slurmctld, slurmd or munged already run but not from this directory, `up` says so and exits 1.
# The node declares FEDSEA_SLURM_CPUS CPUs (default 32; SlurmdParameters=config_overrides lets it
# declare more than the machine has), so a few multi-task jobs fit on a 2-core laptop; give jobs
# --cpus-per-task=1 there (slurm/job.sh sets OMP_NUM_THREADS from it). Process tracking is
# proctrack/linuxproc (no cgroups needed, so it works inside a container); jobs run as the user
# who ran `up` (root for slurmd to start steps as any user).
set -euo pipefail

dir="${FEDSEA_SLURM_DIR:-/tmp/fedsea-slurm}"
port="${FEDSEA_SLURM_PORT:-16817}"
cpus="${FEDSEA_SLURM_CPUS:-32}"
conf="$dir/etc/slurm.conf"
socket="$dir/munge/munge.socket"
host="$(hostname -s)"
packages=(slurmctld slurmd slurm-client munge)

say() { echo "[slurm-local] $*" >&2; }
die() { echo "slurm-local: error: $*" >&2; exit 1; }

usage() {
  echo "usage: launch/slurm-local.sh {up|down|status|env}   (state in FEDSEA_SLURM_DIR=$dir)" >&2
  exit 2
}

# pid from one of our pid files when that process is alive, else nothing
ours() {
  local f="$dir/run/$1.pid" pid
  [ -f "$f" ] || return 1
  pid="$(cat "$f")"
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && echo "$pid"
}

# pids of a daemon by name that are not ours
foreign() {
  local name="$1" mine pid
  mine="$(ours "$name" || true)"
  for pid in $(pgrep -x "$name" || true); do
    [ "$pid" = "$mine" ] || echo "$pid"
  done
}

install_packages() {
  local missing=() p
  for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    die "Slurm is not installed (missing: ${missing[*]}); as root on Debian/Ubuntu this script installs it (apt-get install ${packages[*]})"
  fi
  say "installing ${missing[*]} (apt-get)"
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
}

write_config() {
  local user mem
  user="$(id -un)"
  mem="$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)"
  mkdir -p "$dir"/{etc,munge,state,spool,run,log}
  chmod 700 "$dir/munge"
  if [ ! -s "$dir/munge/munge.key" ]; then
    dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
    chmod 400 "$dir/munge/munge.key"
  fi
  cat > "$conf" <<EOF
# Written by launch/slurm-local.sh: a private one-node cluster. Edits are overwritten by 'up'.
ClusterName=fedsea-local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$port
SlurmdPort=$((port + 1))
SlurmUser=$user
SlurmdUser=$user
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$socket
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
# seconds between SIGTERM and SIGKILL when a job is cancelled or reaches its time limit
KillWait=10
MinJobAge=600
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
  local limit="$1" what="$2" t=0
  shift 2
  until "$@" >/dev/null 2>&1; do
    t=$((t + 1))
    [ "$t" -le "$((limit * 2))" ] || return 1
    sleep 0.5
  done
}

node_idle() { SLURM_CONF="$conf" sinfo -h -N -o %T 2>/dev/null | grep -qx "idle"; }

up() {
  install_packages
  local name pids
  for name in slurmctld slurmd munged; do
    pids="$(foreign "$name" | tr '\n' ' ')"
    [ -z "$pids" ] || die "a $name not started from $dir is running (pid $pids): use that Slurm, or stop it first (this script never touches a system Slurm)"
  done
  if ours slurmctld >/dev/null && ours slurmd >/dev/null && ours munged >/dev/null; then
    say "already up ($dir)"
    wait_for 60 "the node" node_idle || die "the node is not idle; see $dir/log/"
    return 0
  fi
  down quiet
  write_config
  # a fresh controller state each time: no jobs from an earlier 'up' come back
  rm -rf "${dir:?}/state"/* "${dir:?}/spool"/*
  munged --force --socket="$socket" --key-file="$dir/munge/munge.key" --pid-file="$dir/run/munged.pid" \
    --log-file="$dir/log/munged.log" --seed-file="$dir/munge/munged.seed" \
    || die "munged did not start; see $dir/log/munged.log"
  wait_for 10 munge test -S "$socket" || die "munged did not open $socket; see $dir/log/munged.log"
  slurmctld -f "$conf" -i || die "slurmctld did not start; see $dir/log/slurmctld.log"
  wait_for 30 slurmctld env SLURM_CONF="$conf" scontrol ping \
    || die "slurmctld does not answer on port $port; see $dir/log/slurmctld.log"
  slurmd -f "$conf" || die "slurmd did not start; see $dir/log/slurmd.log"
  if ! wait_for 60 "the node" node_idle; then
    die "the node did not become idle in 60 s ($(SLURM_CONF="$conf" sinfo -h -N -o '%T %E' 2>&1)); see $dir/log/"
  fi
  say "up: one node '$host', $cpus CPUs, partition 'local'; eval \"\$(launch/slurm-local.sh env)\" to use it"
}

down() {
  local name pid stopped=0
  if [ -f "$conf" ]; then
    SLURM_CONF="$conf" timeout 10 scancel --quiet --full --user="$(id -un)" 2>/dev/null || true
  fi
  for name in slurmd slurmctld munged; do
    pid="$(ours "$name" || true)"
    [ -n "$pid" ] || continue
    kill "$pid" 2>/dev/null || true
    wait_for 15 "$name" bash -c "! kill -0 $pid" || kill -9 "$pid" 2>/dev/null || true
    rm -f "$dir/run/$name.pid"
    stopped=1
  done
  # job steps whose slurmstepd outlived slurmd (a killed daemon): nothing of ours keeps running
  pkill -f "slurmstepd.*$dir" 2>/dev/null || true
  [ "${1:-}" = quiet ] || { [ "$stopped" = 1 ] && say "down (state and logs kept in $dir)" || say "not running"; }
}

status() {
  local name pid rc=0
  for name in munged slurmctld slurmd; do
    if pid="$(ours "$name")"; then echo "$name: running (pid $pid)"; else echo "$name: stopped"; rc=3; fi
  done
  if [ "$rc" = 0 ]; then
    SLURM_CONF="$conf" sinfo -N -o "%N %T %c"
    SLURM_CONF="$conf" squeue
  fi
  return "$rc"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  env) echo "export SLURM_CONF=$conf" ;;
  *) usage ;;
esac
