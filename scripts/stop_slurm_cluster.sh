#!/usr/bin/env bash
# Stops a cluster that scripts/start_slurm_cluster.sh started: SIGTERM to its slurmd and slurmctld by the
# PIDs in STATE_DIR/cluster.env (SIGKILL after 15 s), after cancelling its queued and running jobs.
#
# usage: scripts/stop_slurm_cluster.sh STATE_DIR
set -euo pipefail
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
case "${1:-}" in -h|--help) usage; exit 0 ;; esac
if [ $# -ne 1 ]; then usage >&2; exit 2; fi
env_file="$1/cluster.env"
[ -f "$env_file" ] || { echo "error: $env_file not found" >&2; exit 1; }
pids=()
for key in SLURMD_PID SLURMCTLD_PID; do
  pid="$(sed -n "s/^$key=//p" "$env_file")"
  # Only signal it while it still is that daemon (the PID may have been reused since).
  case "$(cat "/proc/$pid/comm" 2>/dev/null)" in slurmd|slurmctld) pids+=("$pid") ;; esac
done
[ ${#pids[@]} -gt 0 ] || exit 0
# Jobs outlive a slurmd restart by design: cancel them first, so that no job steps are left behind.
export SLURM_CONF="$1/slurm.conf"
if scontrol ping 2>/dev/null | grep -q 'is UP'; then
  read -r -d '' -a job_ids <<<"$(squeue -h -o %A 2>/dev/null | sort -u)" || true  # no glob expansion
  if [ ${#job_ids[@]} -gt 0 ]; then
    scancel "${job_ids[@]}" 2>/dev/null || true
    for _ in $(seq 100); do [ -z "$(squeue -h -t R,CG -o %A 2>/dev/null)" ] && break; sleep 0.1; done
  fi
fi
kill -TERM "${pids[@]}" 2>/dev/null || true
for pid in "${pids[@]}"; do
  for _ in $(seq 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
done
