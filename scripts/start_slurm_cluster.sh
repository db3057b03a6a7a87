#!/usr/bin/env bash
# Starts a one-node Slurm cluster (Debian slurm-wlm 22.05: slurmctld + slurmd on this machine), for the tests
# and for trying launch/slurm/ by hand. Meant to run as root (SlurmUser/SlurmdUser are the current user).
#
# usage: scripts/start_slurm_cluster.sh STATE_DIR
#
#   STATE_DIR  created if missing; receives slurm.conf, the daemons' state, spool, pid and log files, and
#              STATE_DIR/cluster.env once the node is idle: shell-sourceable KEY=VALUE lines
#                SLURM_CONF         the config path: export it to use sbatch/srun/squeue/scontrol/sinfo
#                SLURMCTLD_PID, SLURMD_PID, CLUSTER_NAME, SLURMCTLD_PORT, SLURMD_PORT, STATE_DIR
#              The same lines go to stdout.
#
# The node is `localhost` with this machine's CPU count (nproc) and ~90% of its memory, in partition `debug`
# (the default). Auth is auth/none: anyone on this machine may submit, so use it on test machines only.
# Ports and paths are fresh per STATE_DIR, so clusters left running by an earlier run do not clash.
#
# Stop it with:  scripts/stop_slurm_cluster.sh STATE_DIR   (SIGTERM to both daemons by PID)
#
# environment: SLURM_START_TIMEOUT seconds (default 60).
# exit status: 0 node idle; 1 failed (the daemons' logs are printed to stderr and the daemons stopped); 2 usage.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
case "${1:-}" in -h|--help) usage; exit 0 ;; esac
if [ $# -ne 1 ]; then usage >&2; exit 2; fi
for tool in slurmctld slurmd sinfo scontrol; do
  command -v "$tool" >/dev/null || { echo "error: $tool not found (scripts/ensure_slurm.sh installs Slurm)" >&2; exit 1; }
done

state="$(mkdir -p "$1" && cd "$1" && pwd)"
timeout_s="${SLURM_START_TIMEOUT:-60}"
conf="$state/slurm.conf"
user="$(id -un)"
cpus="$(nproc)"
mem_mb="$(awk '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)"
name="t$(od -An -N4 -tx1 /dev/urandom | tr -d ' \n')"  # a fresh cluster name per start

read -r ctld_port slurmd_port <<<"$(python3 - <<'EOF'
import socket
socks = []
for _ in range(2):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
)"

mkdir -p "$state/ctld" "$state/spool"
: >"$state/plugstack.conf"  # no SPANK plugins (the system one includes /etc/slurm/plugstack.conf.d)
cat >"$conf" <<EOF
# One-node test cluster written by scripts/start_slurm_cluster.sh
ClusterName=$name
SlurmctldHost=localhost
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
AuthType=auth/none
CredType=cred/none
SlurmUser=$user
SlurmdUser=$user
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
MailProg=/bin/true
PlugStackConfig=$state/plugstack.conf
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$state/jobcomp.txt
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/spool
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd.pid
SlurmctldLogFile=$state/slurmctld.log
SlurmdLogFile=$state/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# keep finished jobs visible to scontrol for an hour (there is no accounting database)
MinJobAge=3600
ReturnToService=2
SlurmdParameters=config_overrides
SlurmctldTimeout=60
SlurmdTimeout=60
InactiveLimit=0
KillWait=5
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus Sockets=1 CoresPerSocket=$cpus ThreadsPerCore=1 RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF

export SLURM_CONF="$conf"
ctld_pid="" slurmd_pid=""

stop_all() {
  local pid
  for pid in $slurmd_pid $ctld_pid; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in $slurmd_pid $ctld_pid; do
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  done
}

fail() {
  echo "error: $*" >&2
  for f in slurmctld.log slurmctld.out slurmd.log slurmd.out; do
    [ -s "$state/$f" ] && { echo "--- $state/$f" >&2; tail -n 40 "$state/$f" >&2; }
  done
  stop_all
  exit 1
}

start_daemon() {  # NAME ARGS...: runs NAME in the foreground (-D) in its own session; prints its PID
  local daemon=$1 pid
  shift
  # No job control in a script, so the child is no process-group leader and setsid execs in place: $! is the
  # daemon's own PID.
  setsid "$daemon" -D "$@" </dev/null >"$state/$daemon.out" 2>&1 &
  pid=$!
  sleep 0.1
  if [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = setsid ]; then
    pid="$(awk '{print $1}' "/proc/$pid/task/$pid/children" 2>/dev/null)"
  fi
  echo "$pid"
}

ctld_pid="$(start_daemon slurmctld -i)"
deadline=$((SECONDS + timeout_s))
until scontrol ping 2>/dev/null | grep -q 'is UP'; do
  kill -0 "$ctld_pid" 2>/dev/null || fail "slurmctld exited during start-up"
  [ $SECONDS -lt $deadline ] || fail "slurmctld did not answer within ${timeout_s}s"
  sleep 0.2
done
slurmd_pid="$(start_daemon slurmd -N localhost)"
until [ "$(sinfo -h -N -n localhost -o %T 2>/dev/null)" = idle ]; do
  kill -0 "$slurmd_pid" 2>/dev/null || fail "slurmd exited during start-up"
  kill -0 "$ctld_pid" 2>/dev/null || fail "slurmctld exited during start-up"
  [ $SECONDS -lt $deadline ] || fail "node localhost not idle within ${timeout_s}s: $(sinfo -h -N -o '%T %E' 2>&1)"
  sleep 0.2
done

{
  echo "SLURM_CONF=$conf"
  echo "SLURMCTLD_PID=$ctld_pid"
  echo "SLURMD_PID=$slurmd_pid"
  echo "CLUSTER_NAME=$name"
  echo "SLURMCTLD_PORT=$ctld_port"
  echo "SLURMD_PORT=$slurmd_port"
  echo "STATE_DIR=$state"
} >"$state/cluster.env.tmp"
mv "$state/cluster.env.tmp" "$state/cluster.env"
cat "$state/cluster.env"
