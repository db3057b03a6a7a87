#!/usr/bin/env bash
# Stops an sshd that scripts/start_sshd.sh started: SIGTERM by the PID in STATE_DIR/sshd.env to the listener and
# to its session processes ("sshd: user@notty"), SIGKILL after 10 s. Programs started over those sessions are
# not children of sshd's and are left alone: stop them yourself (by PID) first.
#
# usage: scripts/stop_sshd.sh STATE_DIR
set -euo pipefail
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
case "${1:-}" in -h|--help) usage; exit 0 ;; esac
if [ $# -ne 1 ]; then usage >&2; exit 2; fi
env_file="$1/sshd.env"
[ -f "$env_file" ] || { echo "error: $env_file not found" >&2; exit 1; }
listener="$(sed -n 's/^SSHD_PID=//p' "$env_file")"
# Only signal it while it still is that sshd (the PID may have been reused since).
[ "$(cat "/proc/$listener/comm" 2>/dev/null)" = sshd ] || exit 0
pids=("$listener")
for stat in /proc/[0-9]*/stat; do  # its session processes: sshd children of the listener
  read -r cpid comm _ ppid _ <"$stat" 2>/dev/null || continue
  [ "$ppid" = "$listener" ] && [ "$comm" = "(sshd)" ] && pids+=("$cpid")
done
kill -TERM "${pids[@]}" 2>/dev/null || true
for pid in "${pids[@]}"; do
  for _ in $(seq 100); do
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = sshd ] || break
    sleep 0.1
  done
  [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = sshd ] && kill -KILL "$pid" 2>/dev/null || true
done
exit 0
