#!/usr/bin/env bash
# Starts a real MLflow tracking server on loopback (sqlite backend store, proxied artifacts), for the tests and
# for looking at runs by hand.
#
# usage: scripts/start_mlflow_server.sh STATE_DIR INFO_FILE
#
#   STATE_DIR  holds mlflow.db, the artifacts (unless MLFLOW_ARTIFACTS_DESTINATION says otherwise) and
#              mlflow.log; created if missing. Starting again on the same STATE_DIR continues the same store.
#   INFO_FILE  written once /health answers: shell-sourceable lines PID (the server's process group leader; it
#              runs in its own session), PORT, MLFLOW_TRACKING_URI, LOG, STATE_DIR. Also printed.
#
# environment: MLFLOW_PORT (default: a free port), MLFLOW_ARTIFACTS_DESTINATION (default STATE_DIR/artifacts;
# s3://bucket/prefix needs MLFLOW_S3_ENDPOINT_URL and AWS_* here), MLFLOW_START_TIMEOUT seconds (default 90),
# PYTHON (default REPO/.venv/bin/python).
# Stop it with scripts/stop_mlflow_server.sh INFO_FILE (SIGTERM to its process group).
set -euo pipefail
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
case "${1:-}" in -h|--help) usage; exit 0 ;; esac
if [ $# -ne 2 ]; then usage >&2; exit 2; fi

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
state="$(mkdir -p "$1" && cd "$1" && pwd)"
info="$2"
python="${PYTHON:-$repo/.venv/bin/python}"
[ -x "$python" ] || python="$(command -v python3)"
mlflow="$(dirname "$python")/mlflow"
[ -x "$mlflow" ] || mlflow="$(command -v mlflow || true)"
[ -n "$mlflow" ] || { echo "error: mlflow not found beside $python" >&2; exit 1; }
port="${MLFLOW_PORT:-$("$python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')}"
artifacts="${MLFLOW_ARTIFACTS_DESTINATION:-$state/artifacts}"
log="$state/mlflow.log"

MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false setsid "$mlflow" server --host 127.0.0.1 --port "$port" \
  --backend-store-uri "sqlite:///$state/mlflow.db" --artifacts-destination "$artifacts" --workers 1 \
  >>"$log" 2>&1 < /dev/null &
pid=$!
deadline=$((SECONDS + ${MLFLOW_START_TIMEOUT:-90}))
until "$python" -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:$port/health', timeout=2).read().strip() != b'OK')" 2>/dev/null; do
  if ! kill -0 "$pid" 2>/dev/null || [ $SECONDS -ge $deadline ]; then
    echo "error: the MLflow server did not come up on port $port; its log:" >&2
    tail -n 40 "$log" >&2
    kill -TERM -- "-$pid" 2>/dev/null || true
    exit 1
  fi
  sleep 0.3
done
printf 'PID=%s\nPORT=%s\nMLFLOW_TRACKING_URI=http://127.0.0.1:%s\nLOG=%s\nSTATE_DIR=%s\n' \
  "$pid" "$port" "$port" "$log" "$state" | tee "$info"
