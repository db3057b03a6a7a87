#!/usr/bin/env bash
# The test command: sets up everything on a fresh machine (virtualenv, Slurm), then runs the whole suite,
# including the real S3 server and the one-node Slurm cluster that the tests start and stop themselves.
set -euo pipefail
cd "$(dirname "$0")"
scripts/ensure_venv.sh test
scripts/ensure_slurm.sh
exec .venv/bin/python -m pytest "$@"
