#!/usr/bin/env bash
# slurm-local.sh -- start (or stop) a real one-node Slurm cluster on this Debian host.
#
# For paft's Slurm integration tests and for trying a Slurm executor on a laptop.
# Must run as root. No systemd needed: munged, slurmctld and slurmd are started
# directly as daemons with pid files under /run.
#
# Usage:
#   scripts/slurm-local.sh [start]   install if needed, configure, start, wait for node idle
#   scripts/slurm-local.sh stop      stop slurmd, slurmctld and munged
#   scripts/slurm-local.sh status    print daemon and node state (exit 0 only if node is usable)
#
# Environment:
#   SLURM_LOCAL_CONF_DIR   directory for slurm.conf (default /etc/slurm). If not the
#                          default, every Slurm command needs SLURM_CONF=<dir>/slurm.conf.
#   SLURM_LOCAL_TIMEOUT    seconds to wait for the node to become idle (default 60)
#
# ACCOUNTING (verified with Debian bookworm's Slurm 22.05.8, see scripts/slurm-local.md):
#   There is no slurmdbd here (AccountingStorageType=accounting_storage/none), so plain
#   `sacct` does NOT work: it prints "Slurm accounting storage is disabled" and exits 1.
#   What works instead:
#     * `squeue -h -t all -j ID -o '%i|%A|%T|%r'` and `scontrol show job -o ID` report
#       pending, running AND finished jobs (state, ExitCode=code:signal, Start/EndTime)
#       until MinJobAge (86400 s here) expires; records survive a slurmctld restart
#       (StateSaveLocation). Without `-t all`, squeue hides finished jobs.
#     * JobCompType=jobcomp/filetxt appends one line per finished job (array tasks
#       included, with ArrayJobId=/ArrayTaskId=) to /var/log/slurm/jobcomp.log, and
#       `sacct -c` (--completion) reads that file, with no age limit:
#         sacct -c -j ID --parsable2 --noheader -o JobID,State,ExitCode,Start,End 2>/dev/null
#       Caveats: finished jobs only; no .batch/.extern step rows; array tasks are listed
#       under their raw job ids only (sacct -c -j ARRAYID returns just the task that
#       kept ARRAYID); cancelled jobs show ExitCode 0:0; stderr gets harmless
#       "Unknown type ArrayJobId" lines.
set -euo pipefail

export PATH="/usr/sbin:/sbin:/usr/bin:/bin:${PATH:-}"

CONF_DIR="${SLURM_LOCAL_CONF_DIR:-/etc/slurm}"
CONF_DIR="${CONF_DIR%/}"
CONF_FILE="$CONF_DIR/slurm.conf"
TIMEOUT="${SLURM_LOCAL_TIMEOUT:-60}"
if [[ "$CONF_FILE" != /etc/slurm/slurm.conf ]]; then
  export SLURM_CONF="$CONF_FILE"
fi

CLUSTER_NAME=paftlocal
PARTITION=debug
CTLD_SPOOL=/var/spool/slurmctld
SLURMD_SPOOL=/var/spool/slurmd
LOG_DIR=/var/log/slurm
RUN_DIR=/run/slurm
CTLD_LOG="$LOG_DIR/slurmctld.log"
SLURMD_LOG="$LOG_DIR/slurmd.log"
JOBCOMP_LOG="$LOG_DIR/jobcomp.log"
CTLD_PID="$RUN_DIR/slurmctld.pid"
SLURMD_PID="$RUN_DIR/slurmd.pid"
MUNGE_KEY=/etc/munge/munge.key
MUNGE_RUN=/run/munge
MUNGE_PID="$MUNGE_RUN/munged.pid"
# Records which slurm.conf the running daemons were started with.
CONF_MARK="$RUN_DIR/slurm-local.conf-path"

NODE="$(hostname -s)"

log() { printf 'slurm-local: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

need_root() {
  [[ "$(id -u)" -eq 0 ]] || die "must run as root"
}

# --- pid helpers ---------------------------------------------------------------

pid_alive() { # pidfile
  local pid
  [[ -s "$1" ]] || return 1
  pid="$(cat "$1" 2>/dev/null)" || return 1
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  kill -0 "$pid" 2>/dev/null
}

stop_pidfile() { # name pidfile
  local name="$1" pidfile="$2" pid i
  if ! pid_alive "$pidfile"; then
    log "$name not running"
    rm -f "$pidfile"
    return 0
  fi
  pid="$(cat "$pidfile")"
  log "stopping $name (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 30; i++)); do
    kill -0 "$pid" 2>/dev/null || { rm -f "$pidfile"; return 0; }
    sleep 1
  done
  log "$name did not exit after 30 s, sending SIGKILL"
  kill -KILL "$pid" 2>/dev/null || true
  rm -f "$pidfile"
}

# --- install -------------------------------------------------------------------

install_packages() {
  local missing=() b
  for b in slurmctld slurmd sbatch munged; do
    command -v "$b" >/dev/null 2>&1 || missing+=("$b")
  done
  if ((${#missing[@]} == 0)); then
    return 0
  fi
  log "missing ${missing[*]}: installing slurm-wlm and munge"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
  for b in slurmctld slurmd sbatch munged; do
    command -v "$b" >/dev/null 2>&1 || die "$b still missing after apt-get install"
  done
}

# --- munge -----------------------------------------------------------------------

munge_ok() {
  munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1
}

start_munge() {
  local user=root
  getent passwd munge >/dev/null 2>&1 && user=munge
  mkdir -p /etc/munge /var/lib/munge /var/log/munge "$MUNGE_RUN"
  chown "$user:" /var/lib/munge /var/log/munge "$MUNGE_RUN"
  chmod 0700 /var/lib/munge /var/log/munge
  chmod 0755 "$MUNGE_RUN"
  if [[ ! -s "$MUNGE_KEY" ]]; then
    log "creating munge key $MUNGE_KEY"
    if command -v mungekey >/dev/null 2>&1; then
      mungekey --create --keyfile="$MUNGE_KEY"
    elif command -v create-munge-key >/dev/null 2>&1; then
      create-munge-key -f
    else
      dd if=/dev/urandom of="$MUNGE_KEY" bs=1 count=1024 status=none
    fi
  fi
  chown "$user:" "$MUNGE_KEY"
  chmod 0400 "$MUNGE_KEY"

  if munge_ok; then
    return 0
  fi
  if pid_alive "$MUNGE_PID"; then
    log "munged running but not answering; restarting it"
    stop_pidfile munged "$MUNGE_PID"
  fi
  log "starting munged as $user"
  if [[ "$user" == root ]]; then
    munged --force --pid-file="$MUNGE_PID"
  else
    runuser -u munge -- munged --pid-file="$MUNGE_PID"
  fi
  local i
  for ((i = 0; i < 10; i++)); do
    munge_ok && return 0
    sleep 1
  done
  tail -n 20 /var/log/munge/munged.log >&2 2>/dev/null || true
  die "munged does not answer (munge -n | unmunge failed)"
}

# --- slurm.conf ------------------------------------------------------------------

plugin_dir() {
  local d
  for d in /usr/lib/x86_64-linux-gnu/slurm-wlm /usr/lib/aarch64-linux-gnu/slurm-wlm \
    /usr/lib/*/slurm-wlm /usr/lib/slurm-wlm /usr/lib64/slurm /usr/lib/slurm; do
    [[ -d "$d" ]] && { echo "$d"; return 0; }
  done
  return 1
}

have_plugin() { # e.g. select_cons_tres
  local d
  d="$(plugin_dir)" || return 0 # unknown layout: assume present
  [[ -e "$d/$1.so" ]]
}

# Prints the node line's topology fields, taken from `slurmd -C` when it agrees
# with nproc; otherwise just CPUs=<nproc> (Slurm then assumes one core per CPU).
node_topology() {
  local cpus="$1" detected sockets cores threads dcpus
  detected="$(slurmd -C 2>/dev/null | head -n 1 || true)"
  dcpus="$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' <<<"$detected")"
  sockets="$(sed -n 's/.* SocketsPerBoard=\([0-9]*\).*/\1/p' <<<"$detected")"
  cores="$(sed -n 's/.* CoresPerSocket=\([0-9]*\).*/\1/p' <<<"$detected")"
  threads="$(sed -n 's/.* ThreadsPerCore=\([0-9]*\).*/\1/p' <<<"$detected")"
  if [[ -n "$sockets" && -n "$cores" && -n "$threads" && "$dcpus" == "$cpus" ]]; then
    echo "CPUs=$cpus Sockets=$sockets CoresPerSocket=$cores ThreadsPerCore=$threads"
  else
    echo "CPUs=$cpus"
  fi
}

write_conf() { # sets CONF_CHANGED=1 when the file content changed
  local cpus mem_total_mb margin real_mem def_mem slurm_user select select_params select_note topo tmp
  cpus="$(nproc)"
  mem_total_mb=$(($(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024))
  # Leave 5% (at least 512 MB) for the OS; slurmd drains a node whose
  # configured RealMemory exceeds what it detects.
  margin=$((mem_total_mb / 20))
  ((margin < 512)) && margin=512
  real_mem=$((mem_total_mb - margin))
  ((real_mem < 256)) && real_mem=256
  # Jobs without --mem get DefMemPerCPU; without it they would get the whole
  # node's memory under CR_Core_Memory and never run side by side.
  def_mem=$((real_mem / cpus))

  slurm_user=root
  getent passwd slurm >/dev/null 2>&1 && slurm_user=slurm

  if have_plugin select_cons_tres; then
    select=select/cons_tres
    select_params=CR_Core_Memory
    select_note="# select/cons_tres with CR_Core_Memory: cores and memory are consumable."
  elif have_plugin select_cons_res; then
    select=select/cons_res
    select_params=CR_Core_Memory
    select_note="# select_cons_tres.so not found in $(plugin_dir); using select/cons_res (same CR_Core_Memory semantics, no GRES/TRES options)."
  else
    select=select/linear
    select_params=CR_Memory
    select_note="# neither select_cons_tres.so nor select_cons_res.so found in $(plugin_dir); select/linear allocates whole nodes, so jobs never share the node."
  fi

  topo="$(node_topology "$cpus")"

  mkdir -p "$CONF_DIR"
  tmp="$(mktemp)"
  cat >"$tmp" <<EOF
# Generated by scripts/slurm-local.sh -- one-node local test cluster. Edits are overwritten.
ClusterName=$CLUSTER_NAME
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=$slurm_user
AuthType=auth/munge
MpiDefault=none
ReturnToService=2
MailProg=/bin/true

SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
StateSaveLocation=$CTLD_SPOOL
SlurmdSpoolDir=$SLURMD_SPOOL
SlurmctldLogFile=$CTLD_LOG
SlurmdLogFile=$SLURMD_LOG
SlurmctldDebug=info
SlurmdDebug=info

# No cgroups: plain process tracking, no task confinement, no cgroup.conf.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none

SchedulerType=sched/backfill
# Test pending jobs every second (default 60 s, backfill 30 s): a job submitted while
# slurmctld is busy would otherwise wait for the next event, e.g. another job's end.
SchedulerParameters=sched_interval=1,bf_interval=1
$select_note
SelectType=$select
SelectTypeParameters=$select_params
DefMemPerCPU=$def_mem

# Short timers so a local cluster reacts quickly.
KillWait=5
InactiveLimit=0
SlurmdTimeout=120
# Keep finished jobs visible to squeue/scontrol for a day (there is no slurmdbd).
MinJobAge=86400

# Accounting without slurmdbd: per-step usage is gathered, nothing is stored in a
# database, and finished jobs are appended to JobCompLoc, which 'sacct -c' reads.
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$JOBCOMP_LOG

NodeName=$NODE NodeAddr=127.0.0.1 $topo RealMemory=$real_mem State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
  CONF_CHANGED=0
  if [[ -f "$CONF_FILE" ]] && cmp -s "$tmp" "$CONF_FILE"; then
    rm -f "$tmp"
  else
    log "writing $CONF_FILE"
    install -m 0644 "$tmp" "$CONF_FILE"
    rm -f "$tmp"
    CONF_CHANGED=1
  fi
  if [[ "$(cat "$CONF_MARK" 2>/dev/null || true)" != "$CONF_FILE" ]]; then
    CONF_CHANGED=1
  fi

  mkdir -p "$CTLD_SPOOL" "$SLURMD_SPOOL" "$LOG_DIR" "$RUN_DIR"
  chown "$slurm_user:" "$CTLD_SPOOL" "$LOG_DIR" "$RUN_DIR"
  chmod 0755 "$CTLD_SPOOL" "$SLURMD_SPOOL" "$LOG_DIR" "$RUN_DIR"
  touch "$JOBCOMP_LOG"
  chown "$slurm_user:" "$JOBCOMP_LOG"
  chmod 0644 "$JOBCOMP_LOG"
}

# --- slurm daemons ---------------------------------------------------------------

ctld_up() {
  scontrol ping 2>/dev/null | grep -q 'is UP'
}

start_slurm() {
  local i
  if ((CONF_CHANGED)) && { pid_alive "$CTLD_PID" || pid_alive "$SLURMD_PID"; }; then
    log "slurm.conf or its path changed: restarting the Slurm daemons"
    stop_pidfile slurmd "$SLURMD_PID"
    stop_pidfile slurmctld "$CTLD_PID"
  fi

  if pid_alive "$CTLD_PID"; then
    log "slurmctld already running (pid $(cat "$CTLD_PID"))"
  else
    log "starting slurmctld"
    slurmctld || true
  fi
  for ((i = 0; i < TIMEOUT; i++)); do
    ctld_up && break
    if ((i > 2)) && ! pid_alive "$CTLD_PID"; then
      fail "slurmctld exited during startup"
    fi
    sleep 1
  done
  ctld_up || fail "slurmctld not answering 'scontrol ping' after ${TIMEOUT}s"

  if pid_alive "$SLURMD_PID"; then
    log "slurmd already running (pid $(cat "$SLURMD_PID"))"
  else
    log "starting slurmd"
    slurmd || fail "slurmd failed to start"
  fi
  echo "$CONF_FILE" >"$CONF_MARK"
}

node_state() {
  sinfo -h -n "$NODE" -o %T 2>/dev/null | head -n 1
}

wait_idle() {
  local i state resumed=0
  for ((i = 0; i < TIMEOUT; i++)); do
    state="$(node_state)"
    case "$state" in
      idle | mixed | allocated | completing)
        return 0
        ;;
      down* | drain* | *drain*)
        if ((!resumed)) && pid_alive "$SLURMD_PID"; then
          log "node $NODE is '$state' (reason: $(sinfo -h -n "$NODE" -o %E)); resuming it"
          scontrol update nodename="$NODE" state=resume || true
          resumed=1
        fi
        ;;
    esac
    sleep 1
  done
  fail "node $NODE not idle after ${TIMEOUT}s (state '${state:-?}', reason: $(sinfo -h -n "$NODE" -o %E 2>/dev/null))"
}

fail() {
  log "ERROR: $*"
  local f
  for f in "$CTLD_LOG" "$SLURMD_LOG"; do
    if [[ -f "$f" ]]; then
      printf '\n==> tail -n 25 %s <==\n' "$f" >&2
      tail -n 25 "$f" >&2
    fi
  done
  exit 1
}

summary() {
  local version cpus mem state
  version="$(sinfo -V 2>/dev/null | awk '{print $2}')"
  cpus="$(sinfo -h -n "$NODE" -o %c | head -n 1)"
  mem="$(sinfo -h -n "$NODE" -o %m | head -n 1)"
  state="$(node_state)"
  printf 'slurm-local: Slurm %s up: node=%s state=%s CPUs=%s RealMemory=%sMB partition=%s conf=%s\n' \
    "$version" "$NODE" "$state" "$cpus" "$mem" "$PARTITION" "$CONF_FILE"
}

# --- commands ----------------------------------------------------------------------

cmd_start() {
  need_root
  install_packages
  start_munge
  write_conf
  start_slurm
  wait_idle
  summary
}

cmd_stop() {
  need_root
  stop_pidfile slurmd "$SLURMD_PID"
  stop_pidfile slurmctld "$CTLD_PID"
  stop_pidfile munged "$MUNGE_PID"
}

cmd_status() {
  local ok=0 name pidfile
  for name in munged slurmctld slurmd; do
    case "$name" in
      munged) pidfile="$MUNGE_PID" ;;
      slurmctld) pidfile="$CTLD_PID" ;;
      slurmd) pidfile="$SLURMD_PID" ;;
    esac
    if pid_alive "$pidfile"; then
      echo "$name: running (pid $(cat "$pidfile"))"
    else
      echo "$name: not running"
      ok=1
    fi
  done
  if command -v sinfo >/dev/null 2>&1 && ctld_up; then
    echo "node $NODE: $(node_state)"
    case "$(node_state)" in idle | mixed | allocated | completing) ;; *) ok=1 ;; esac
  else
    ok=1
  fi
  return "$ok"
}

case "${1:-start}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  -h | --help | help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//' ;;
  *) die "unknown command '$1' (use start, stop or status)" ;;
esac
