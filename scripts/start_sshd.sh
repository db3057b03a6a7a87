#!/usr/bin/env bash
# Starts a throwaway OpenSSH server on loopback, so that one machine can play several "nodes" for the deepspeed
# launcher (pdsh over ssh): 127.0.0.1 and 127.0.0.2 (every 127.x address reaches this machine). For the tests
# (tests/test_multinode.py) and for trying multi-node launches by hand. Meant to run as root (sshd needs it);
# it logs in the user who starts it, by key only.
#
# usage: scripts/start_sshd.sh STATE_DIR
#
#   STATE_DIR  created if missing; receives a fresh host key and client key (never reused), sshd_config,
#              authorized_keys, known_hosts, ssh_config (the client side: key, known hosts, batch mode; what a
#              user's ~/.ssh/config holds on a cluster), bin/ssh (runs /usr/bin/ssh -F STATE_DIR/ssh_config:
#              put it first in PATH so that deepspeed's ssh check and pdsh use that config, because ssh reads
#              ~/.ssh/config from the passwd home directory and ignores $HOME), sshd.log, and STATE_DIR/sshd.env
#              once a login works: shell-sourceable KEY=VALUE lines
#                SSHD_PID      the listening sshd
#                SSH_PORT      its port (the same on both addresses): `SSH_PORT=... bash launch/pretrain_22k.sh`
#                              or `deepspeed --ssh_port ...`
#                SSH_HOSTS     127.0.0.1,127.0.0.2 (pdsh -w form)
#                SSH_CONFIG, SSH_BIN_DIR, STATE_DIR
#              The same lines go to stdout.
#
# Try it:   source STATE_DIR/sshd.env; PATH="$SSH_BIN_DIR:$PATH" ssh -p "$SSH_PORT" 127.0.0.2 hostname
# Stop it:  scripts/stop_sshd.sh STATE_DIR   (SIGTERM by PID to the listener and its session processes)
#
# environment: SSHD_HOSTS (default "127.0.0.1 127.0.0.2": the loopback addresses it listens on),
#              SSHD_START_TIMEOUT seconds (default 30),
#              SSHD_SETENV "ADDRESS:KEY=VALUE ..." (default none): variables set in the sessions of one address
#              only (sshd's Match LocalAddress + SetEnv), to make one "node" differ from the others, e.g.
#              "127.0.0.2:PYTHONHOME=/nonexistent" for an interpreter that is broken on that node alone.
# exit status: 0 a login works on every address; 1 failed (sshd.log printed to stderr, sshd stopped); 2 usage.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
case "${1:-}" in -h|--help) usage; exit 0 ;; esac
if [ $# -ne 1 ]; then usage >&2; exit 2; fi
sshd_bin=/usr/sbin/sshd  # sshd re-executes itself per connection, so it must be started by absolute path
[ -x "$sshd_bin" ] || { echo "error: $sshd_bin not found (scripts/ensure_ssh.sh installs openssh-server)" >&2; exit 1; }
for tool in ssh ssh-keygen; do
  command -v "$tool" >/dev/null || { echo "error: $tool not found (scripts/ensure_ssh.sh installs it)" >&2; exit 1; }
done
[ "$(id -u)" = 0 ] || { echo "error: sshd needs root here (it changes user for each login)" >&2; exit 1; }

state="$(mkdir -p "$1" && cd "$1" && pwd)"
chmod 700 "$state"
timeout_s="${SSHD_START_TIMEOUT:-30}"
read -r -a hosts <<<"${SSHD_HOSTS:-127.0.0.1 127.0.0.2}"
user="$(id -un)"
port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"

rm -f "$state"/host_ed25519_key* "$state"/client_ed25519_key* "$state/sshd.env"
ssh-keygen -q -t ed25519 -N '' -C "test sshd host key" -f "$state/host_ed25519_key"
ssh-keygen -q -t ed25519 -N '' -C "test sshd client key" -f "$state/client_ed25519_key"
# the key logs in from loopback only
echo "from=\"127.0.0.0/8\" $(cat "$state/client_ed25519_key.pub")" >"$state/authorized_keys"
known="$(printf '[%s]:'"$port"',' "${hosts[@]}")"
echo "${known%,} $(cut -d' ' -f1,2 "$state/host_ed25519_key.pub")" >"$state/known_hosts"

{
  echo "# Test sshd written by scripts/start_sshd.sh: loopback only, $user by key only"
  for h in "${hosts[@]}"; do echo "ListenAddress $h:$port"; done
  cat <<EOF
HostKey $state/host_ed25519_key
PidFile $state/sshd.pid
AuthorizedKeysFile $state/authorized_keys
AllowUsers $user
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
HostbasedAuthentication no
# no PAM: its session modules (pam_loginuid) fail in containers, and a key is all this server accepts
UsePAM no
# the key files live in a temporary folder (under /tmp, which is world-writable)
StrictModes no
PermitUserEnvironment no
X11Forwarding no
AllowAgentForwarding no
AllowTcpForwarding no
PrintMotd no
PrintLastLog no
UseDNS no
MaxStartups 64:30:128
MaxSessions 64
LogLevel INFO
EOF
  for item in ${SSHD_SETENV:-}; do  # Match blocks last: they run to the end of the file
    printf 'Match LocalAddress %s\n  SetEnv %s\n' "${item%%:*}" "${item#*:}"
  done
} >"$state/sshd_config"

cat >"$state/ssh_config" <<EOF
# The client side of the test sshd (scripts/start_sshd.sh): what a user's ~/.ssh/config says on a cluster.
# The port is not here: the launchers pass it (SSH_PORT, deepspeed --ssh_port).
Host ${hosts[*]}
  User $user
  IdentityFile $state/client_ed25519_key
  IdentitiesOnly yes
  UserKnownHostsFile $state/known_hosts
  GlobalKnownHostsFile /dev/null
  StrictHostKeyChecking yes
  BatchMode yes
  ConnectTimeout 10
  LogLevel ERROR
EOF
mkdir -p "$state/bin"
cat >"$state/bin/ssh" <<EOF
#!/bin/sh
# ssh with the test sshd's client config (scripts/start_sshd.sh)
exec /usr/bin/ssh -F "$state/ssh_config" "\$@"
EOF
chmod 755 "$state/bin/ssh"

mkdir -p /run/sshd && chmod 755 /run/sshd  # sshd's privilege separation directory (the service makes it)
"$sshd_bin" -t -f "$state/sshd_config" 2>"$state/sshd.log" || { cat "$state/sshd.log" >&2; exit 1; }

# No job control in a script, so the child is no process-group leader and setsid execs in place: $! is
# sshd's own PID (-D: it stays in the foreground, -e: logs to stderr).
setsid "$sshd_bin" -D -e -f "$state/sshd_config" </dev/null >>"$state/sshd.log" 2>&1 &
pid=$!

fail() {
  echo "error: $*" >&2
  echo "--- $state/sshd.log" >&2
  tail -n 40 "$state/sshd.log" >&2
  kill -TERM "$pid" 2>/dev/null || true
  exit 1
}

deadline=$((SECONDS + timeout_s))
for h in "${hosts[@]}"; do
  until out="$("$state/bin/ssh" -p "$port" "$h" echo ok 2>&1)" && [ "$out" = ok ]; do
    kill -0 "$pid" 2>/dev/null || fail "sshd exited during start-up"
    [ $SECONDS -lt $deadline ] || fail "no login on $h:$port within ${timeout_s}s: $out"
    sleep 0.2
  done
done

{
  echo "SSHD_PID=$pid"
  echo "SSH_PORT=$port"
  echo "SSH_HOSTS=$(IFS=,; echo "${hosts[*]}")"
  echo "SSH_CONFIG=$state/ssh_config"
  echo "SSH_BIN_DIR=$state/bin"
  echo "STATE_DIR=$state"
} >"$state/sshd.env.tmp"
mv "$state/sshd.env.tmp" "$state/sshd.env"
cat "$state/sshd.env"
