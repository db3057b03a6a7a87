#!/usr/bin/env bash
# Installs what the two-"node" multi-node tests need when it is missing: Debian's OpenSSH server (sshd; the
# client comes with it) and pdsh, which the deepspeed launcher runs to ssh into every host of a hostfile.
# The tests start their own sshd on a free loopback port (scripts/start_sshd.sh); nothing is enabled or started
# here, and the system's sshd configuration is left alone.
set -euo pipefail
missing=()
[ -x /usr/sbin/sshd ] || missing+=(openssh-server)
command -v ssh >/dev/null && command -v ssh-keygen >/dev/null || missing+=(openssh-client)
command -v pdsh >/dev/null || missing+=(pdsh)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "warning: ${missing[*]} not installed and cannot be installed here (needs root and apt-get);" \
       "the multi-node tests (tests/test_multinode.py) will skip, or fail under CI" >&2
  exit 0
fi
echo "installing ${missing[*]} (for the multi-node launch tests)" >&2
apt-get update -qq
# policy-rc.d: do not let the package start (or enable) the system's own sshd on port 22
policy=/usr/sbin/policy-rc.d
own_policy=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && own_policy=1
fi
status=0
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null || status=$?
[ $own_policy = 1 ] && rm -f "$policy"
exit $status
