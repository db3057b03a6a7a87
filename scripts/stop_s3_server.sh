#!/usr/bin/env bash
# Stops an S3 server that scripts/start_s3_server.sh started, by the PID in its INFO_FILE: SIGTERM, then
# SIGKILL after 20 s; then removes the gRPC socket files weed leaves in /tmp. Does not signal a process that
# is gone already or is no longer weed.
#
# usage: scripts/stop_s3_server.sh INFO_FILE
set -euo pipefail
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
case "${1:-}" in -h|--help) usage; exit 0 ;; esac
if [ $# -ne 1 ]; then usage >&2; exit 2; fi
pid="$(sed -n 's/^PID=//p' "$1")"
[ -n "$pid" ] || { echo "error: no PID in $1" >&2; exit 1; }
grpc_ports="$(sed -n 's/^GRPC_PORTS=//p' "$1" | tr -d '"')"
# Only signal it while it still is weed (the PID may have been reused since).
if [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = weed ] && kill -TERM "$pid" 2>/dev/null; then
  for _ in $(seq 200); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then
    echo "weed $pid ignored SIGTERM for 20 s: killing it" >&2
    kill -KILL "$pid" 2>/dev/null || true
    sleep 0.5
  fi
fi
if ! kill -0 "$pid" 2>/dev/null; then  # weed leaves its gRPC unix sockets in /tmp, named by port
  for port in $grpc_ports; do rm -f /tmp/seaweedfs-*-grpc-"$port".sock; done
fi
