#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine, for the tests and CI that submit jobs (sbatch,
# submitit): slurmctld + slurmd + munged, Debian's slurm-wlm and munge packages (installed with
# apt-get when missing). One node (this host, `hostname -s`, with its nproc CPUs and a bit less
# than its memory), one partition `debug`, no GPUs (no GRES).
#
#   scripts/slurm_local.sh start          # install if needed, start, wait until the node is idle
#   scripts/slurm_local.sh status         # exit 0 when the node answers idle/mixed/allocated
#   scripts/slurm_local.sh stop [--clean] # cancel jobs, stop what `start` started; --clean also
#                                         # removes the state folder
#
# State (conf, controller state, spool, logs, pid files): ${SLURM_LOCAL_DIR:-/tmp/ohem_d2_slurm}.
# The conf is also installed at /etc/slurm/slurm.conf, where Debian's sbatch/squeue/sinfo/...
# read it, so callers need no SLURM_CONF; a conf that was there is moved to
# /etc/slurm/slurm.conf.ohem_d2_backup and put back by `stop`.
#
# Why these settings: this runs in containers and VMs without systemd and without a delegated
# cgroup tree, so no cgroup plugin at all (ProctrackType=proctrack/linuxproc, TaskPlugin=task/none,
# JobAcctGatherType=jobacct_gather/none, no cgroup.conf): nothing enforces a job's memory or CPUs.
# Memory is still a consumable resource (CR_Core_Memory) with DefMemPerCPU=1024 for a job that
# gives no --mem (without it such a job would take the whole node's memory and run alone), and
# OverSubscribe=FORCE:4 lets up to 4 jobs share a core. AuthInfo=cred_expire=10: a requeued job
# may start again after 10 s instead of Slurm's 120 s.
#
# Accounting: no slurmdbd here (on purpose), so AccountingStorageType=accounting_storage/none
# and a plain `sacct` fails ("Slurm accounting storage is disabled", exit 1); Slurm has no
# accounting_storage/filetxt any more. JobCompType=jobcomp/filetxt writes one line per ended job
# (and one, state PENDING, per requeue) to $SLURM_LOCAL_DIR/log/jobcomp.txt, and
# `sacct --completion` (-c) reads that file: it lists ended jobs only, never running or pending
# ones. `start` writes $SLURM_LOCAL_DIR/bin/sacct, a wrapper that adds --completion: with that
# folder first in PATH, submitit's job.state / job.done() (which run `sacct`) see ended jobs
# (COMPLETED, FAILED, CANCELLED, TIMEOUT, ...) and say UNKNOWN (or PENDING after a requeue) for
# live ones. Live states: `squeue`, `scontrol show job ID` (kept MinJobAge=60 s after the end).
set -euo pipefail

STATE_DIR="${SLURM_LOCAL_DIR:-/tmp/ohem_d2_slurm}"
ETC_CONF=/etc/slurm/slurm.conf
ETC_BACKUP=/etc/slurm/slurm.conf.ohem_d2_backup
PARTITION=debug
READY_TIMEOUT_S="${SLURM_LOCAL_TIMEOUT:-90}"
MARKER="# written by ohem_d2 scripts/slurm_local.sh"

log() { echo "slurm_local: $*"; }
die() { echo "slurm_local: error: $*" >&2; exit 1; }

node_name() { hostname -s; }

now_ms() { date +%s%3N; }
since() { awk -v t0="$1" -v t1="$(now_ms)" 'BEGIN { printf "%.1f", (t1 - t0) / 1000 }'; }  # s

# --- processes -------------------------------------------------------------------------------

proc_running() {  # proc_running PID: PID exists and is not a zombie (PID 1 may reap late)
  local state
  state=$(awk '{ print $3 }' "/proc/$1/stat" 2>/dev/null) || return 1
  [ -n "$state" ] && [ "$state" != Z ]
}

pid_alive() {  # pid_alive FILE NAME: the pid in FILE runs, and is a NAME (not a reused pid)
  local pid
  [ -s "$1" ] || return 1
  pid=$(cat "$1")
  [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ] && proc_running "$pid"
}

stop_pidfile() {  # stop_pidfile NAME FILE: TERM, then KILL after 10 s, the pid in FILE
  local name=$1 file=$2 pid
  if ! pid_alive "$file" "$name"; then rm -f "$file"; return 0; fi
  pid=$(cat "$file")
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 1 100); do
    proc_running "$pid" || break
    sleep 0.1
  done
  if proc_running "$pid"; then
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$file"
  log "stopped $name (pid $pid)"
}

# --- install ---------------------------------------------------------------------------------

have_tools() {
  command -v sbatch >/dev/null && command -v slurmctld >/dev/null &&
    command -v slurmd >/dev/null && command -v munged >/dev/null
}

install_packages() {
  local t0 pkgs=(slurm-wlm munge)
  have_tools && return 0
  [ "$(id -u)" = 0 ] || die "slurm-wlm and munge are missing and installing them needs root"
  t0=$(now_ms)
  export DEBIAN_FRONTEND=noninteractive
  # apt-get update only when the package lists do not know the packages yet
  if ! apt-cache show slurm-wlm >/dev/null 2>&1 || ! apt-cache show munge >/dev/null 2>&1; then
    apt-get update -q
  fi
  if ! apt-get install -y -q --no-install-recommends "${pkgs[@]}"; then
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${pkgs[@]}"
  fi
  have_tools || die "slurm-wlm/munge installed, but sbatch/slurmctld/slurmd/munged are not on PATH"
  log "installed ${pkgs[*]} ($(slurmctld -V)) in $(since "$t0") s"
}

# --- munge -----------------------------------------------------------------------------------

munge_running() { munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
  local key=/etc/munge/munge.key
  if munge_running; then return 0; fi
  mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
  if [ ! -s "$key" ]; then
    dd if=/dev/urandom of="$key" bs=1 count=1024 status=none
    log "created munge key $key"
  fi
  # munged insists that its key, socket and log folders belong to the user it runs as
  chown munge:munge "$key" /etc/munge /run/munge /var/lib/munge /var/log/munge
  chmod 0400 "$key"
  chmod 0700 /etc/munge /var/lib/munge /var/log/munge
  chmod 0755 /run/munge
  runuser -u munge -- munged
  for _ in $(seq 1 50); do
    munge_running && break
    sleep 0.1
  done
  munge_running || die "munged does not answer (see /var/log/munge/munged.log)"
  cp /run/munge/munged.pid "$STATE_DIR/run/munged.pid"
  log "started munged (pid $(cat "$STATE_DIR/run/munged.pid"))"
}

# --- configuration ---------------------------------------------------------------------------

mem_mb() {  # what the node offers: MemTotal in MB less 5 % (slurmd drains a node whose
  # configured RealMemory is above what it finds)
  awk '/^MemTotal:/ { printf "%d\n", $2 / 1024 * 0.95 }' /proc/meminfo
}

write_conf() {
  local host=$1 cpus=$2 mem=$3 conf=$STATE_DIR/slurm.conf
  cat >"$conf" <<EOF
$MARKER (state folder $STATE_DIR)
ClusterName=ohemd2
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# a requeued job waits cred_expire seconds (default 120) before it may start again
AuthInfo=cred_expire=10
MailProg=/bin/true
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/spool
SlurmctldPidFile=$STATE_DIR/run/slurmctld.pid
SlurmdPidFile=$STATE_DIR/run/slurmd.pid
SlurmctldLogFile=$STATE_DIR/log/slurmctld.log
SlurmdLogFile=$STATE_DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# no cgroups: containers without systemd
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
# no slurmdbd: sacct has nothing to read (see the header of scripts/slurm_local.sh)
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$STATE_DIR/log/jobcomp.txt
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=5,bf_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
PreemptType=preempt/none
ReturnToService=2
JobRequeue=1
MinJobAge=60
KillWait=5
InactiveLimit=0
Waittime=0
SlurmdTimeout=60
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=$PARTITION Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF
}

write_sacct_wrapper() {  # $STATE_DIR/bin/sacct: sacct on the job completion log
  local real=/usr/bin/sacct
  [ -x "$real" ] || real=$(PATH=${PATH//"$STATE_DIR/bin:"/} command -v sacct)
  mkdir -p "$STATE_DIR/bin"
  printf '#!/bin/sh\n%s: no slurmdbd, so sacct reads the job completion log\nexec %s --completion "$@"\n' \
    "$MARKER" "$real" >"$STATE_DIR/bin/sacct"
  chmod 0755 "$STATE_DIR/bin/sacct"
}

install_etc_conf() {  # /etc/slurm/slurm.conf: ours; a foreign one is moved to $ETC_BACKUP
  mkdir -p /etc/slurm
  if [ -e "$ETC_CONF" ] && ! grep -qF "$MARKER" "$ETC_CONF"; then
    mv "$ETC_CONF" "$ETC_BACKUP"
    log "moved $ETC_CONF to $ETC_BACKUP (stop puts it back)"
  fi
  cp "$STATE_DIR/slurm.conf" "$ETC_CONF"
}

restore_etc_conf() {
  if [ -e "$ETC_BACKUP" ]; then
    mv "$ETC_BACKUP" "$ETC_CONF"
    log "restored $ETC_CONF"
  elif [ -e "$ETC_CONF" ] && grep -qF "$MARKER" "$ETC_CONF"; then
    rm -f "$ETC_CONF"
  fi
}

# --- slurm daemons ---------------------------------------------------------------------------

slurm_running() {
  pid_alive "$STATE_DIR/run/slurmctld.pid" slurmctld && pid_alive "$STATE_DIR/run/slurmd.pid" slurmd
}

sl() { SLURM_CONF="$STATE_DIR/slurm.conf" timeout 10 "$@"; }  # a slurm client on our conf

node_state() {  # the node's state as sinfo prints it (idle, mixed, down*, ...), or nothing
  sl sinfo -h -n "$(node_name)" -o %T 2>/dev/null | head -n 1 || true
}

slurmd_registered_since() {  # slurmd_registered_since S: this node's slurmd, started at or
  # after epoch second S, has registered (the controller also shows a node state saved by its
  # last run, before the new slurmd has said a word)
  local started
  started=$(sl scontrol show node -o "$(node_name)" 2>/dev/null |
    grep -o 'SlurmdStartTime=[^ ]*' | cut -d= -f2) || return 1
  [ -n "$started" ] && [ "$(date -d "$started" +%s 2>/dev/null || echo 0)" -ge "$1" ]
}

wait_idle() {  # wait_idle T0_MS: until the node is idle, its slurmd registered since T0_MS,
  # resuming the node when it is down or drained
  local t0=$1 host state
  host=$(node_name)
  while :; do
    slurm_running || {
      echo "slurm_local: slurmctld or slurmd is not running; logs in $STATE_DIR/log" >&2
      tail -n 20 "$STATE_DIR/log/slurmctld.log" "$STATE_DIR/log/slurmd.log" >&2 || true
      return 1
    }
    state=$(node_state)
    case "$state" in
      idle | mixed | allocated)
        slurmd_registered_since "$((t0 / 1000 - 1))" && return 0 ;;
      down* | drain* | fail*)
        sl scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true ;;
    esac
    if [ "$(($(now_ms) - t0))" -ge "$((READY_TIMEOUT_S * 1000))" ]; then
      echo "slurm_local: node $host is '${state:-not answering}' after $READY_TIMEOUT_S s;" \
        "logs in $STATE_DIR/log" >&2
      tail -n 20 "$STATE_DIR/log/slurmctld.log" "$STATE_DIR/log/slurmd.log" >&2 || true
      return 1
    fi
    sleep 0.5
  done
}

start_daemons() {
  local conf=$STATE_DIR/slurm.conf
  # a half-started cluster (one daemon died): start both again
  stop_pidfile slurmd "$STATE_DIR/run/slurmd.pid"
  stop_pidfile slurmctld "$STATE_DIR/run/slurmctld.pid"
  # the controller keeps its state (and job ids, which submitit folders are keyed by) across
  # stop/start; `stop --clean` starts from job id 1 again
  slurmctld -f "$conf"
  slurmd -f "$conf"
  # both daemonize at once and write their pid files a moment later
  for _ in $(seq 1 50); do
    slurm_running && return 0
    sleep 0.2
  done
  echo "slurm_local: slurmctld or slurmd did not start; logs in $STATE_DIR/log" >&2
  tail -n 20 "$STATE_DIR/log/slurmctld.log" "$STATE_DIR/log/slurmd.log" >&2 || true
  return 1
}

# --- subcommands -----------------------------------------------------------------------------

cmd_start() {
  local t0 host cpus mem
  if slurm_running; then
    grep -qsF "$MARKER" "$ETC_CONF" || install_etc_conf
    wait_idle 0
    log "already running: node $(node_name) $(node_state) (state folder $STATE_DIR)"
    return 0
  fi
  install_packages
  t0=$(now_ms)
  host=$(node_name)
  cpus=$(nproc)
  mem=$(mem_mb)
  mkdir -p "$STATE_DIR"/{ctld,spool,log,run}
  start_munge
  write_conf "$host" "$cpus" "$mem"
  write_sacct_wrapper
  install_etc_conf
  start_daemons
  wait_idle "$t0"
  log "node $host idle ($cpus cpus, $mem MB) in $(since "$t0") s"
}

cancel_jobs() {  # cancel every job and wait (up to 30 s) until none runs any more
  local ids
  ids=$(sl squeue -h -o %A 2>/dev/null || true)
  [ -n "$ids" ] || return 0
  # shellcheck disable=SC2086  # one word per job id
  sl scancel $ids >/dev/null 2>&1 || true
  for _ in $(seq 1 60); do
    [ -z "$(sl squeue -h -o %A 2>/dev/null)" ] && return 0
    sleep 0.5
  done
  log "warning: jobs still there after 30 s: $(sl squeue -h 2>/dev/null | tr -s ' ' | paste -sd ';')"
}

cmd_stop() {
  local clean=${1:-}
  if slurm_running; then
    cancel_jobs
  fi
  stop_pidfile slurmd "$STATE_DIR/run/slurmd.pid"
  stop_pidfile slurmctld "$STATE_DIR/run/slurmctld.pid"
  stop_pidfile munged "$STATE_DIR/run/munged.pid"
  restore_etc_conf
  if [ "$clean" = --clean ]; then
    rm -rf "$STATE_DIR"
    log "removed $STATE_DIR"
  fi
  log "stopped"
}

cmd_status() {
  local state
  if ! slurm_running; then
    log "not running (state folder $STATE_DIR)"
    return 1
  fi
  state=$(node_state)
  log "slurmctld pid $(cat "$STATE_DIR/run/slurmctld.pid"), slurmd pid" \
    "$(cat "$STATE_DIR/run/slurmd.pid"), node $(node_name): ${state:-not answering}"
  sl sinfo || true
  case "$state" in
    idle | mixed | allocated) return 0 ;;
    *) return 1 ;;
  esac
}

main() {
  case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop "${2:-}" ;;
    status) cmd_status ;;
    *)
      echo "usage: $0 start | stop [--clean] | status" >&2
      exit 2
      ;;
  esac
}

main "$@"
