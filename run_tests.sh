#!/usr/bin/env bash
# The test command: sets up everything on a fresh machine (virtualenv, Slurm, sshd + pdsh), then runs the whole
# suite, including the real S3 server, the one- and two-node Slurm clusters and the sshd that makes 127.0.0.1
# and 127.0.0.2 two ssh nodes, which the tests start and stop themselves.
set -euo pipefail
cd "$(dirname "$0")"
scripts/ensure_venv.sh test
scripts/ensure_slurm.sh
scripts/ensure_ssh.sh
# the linter, the formatter and the type checker first (seconds; configured in pyproject.toml): a finding fails
# the run as a failing test would
.venv/bin/ruff check --quiet .
.venv/bin/ruff format --check --quiet .
.venv/bin/mypy
exec .venv/bin/python -m pytest "$@"
