#!/usr/bin/env bash
# Stops an MLflow server that scripts/start_mlflow_server.sh started: SIGTERM to its process group (the
# server and its worker), SIGKILL after 20 s.
#
# usage: scripts/stop_mlflow_server.sh INFO_FILE
set -euo pipefail
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
case "${1:-}" in -h|--help) usage; exit 0 ;; esac
if [ $# -ne 1 ]; then usage >&2; exit 2; fi
pid="$(sed -n 's/^PID=//p' "$1")"
[ -n "$pid" ] || { echo "error: no PID in $1" >&2; exit 1; }
kill -TERM -- "-$pid" 2>/dev/null || exit 0
for _ in $(seq 200); do kill -0 -- "-$pid" 2>/dev/null || exit 0; sleep 0.1; done
echo "MLflow server group $pid ignored SIGTERM for 20 s: killing it" >&2
kill -KILL -- "-$pid" 2>/dev/null || true
