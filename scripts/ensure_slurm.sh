#!/usr/bin/env bash
# Installs Debian's Slurm daemons and client (for the one-node test cluster) when they are missing.
set -euo pipefail
if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "warning: Slurm is not installed and cannot be installed here (needs root and apt-get);" \
       "the Slurm tests will fail" >&2
  exit 0
fi
echo "installing slurm-wlm daemons (slurmctld, slurmd, slurm-client)" >&2
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client >/dev/null
