#!/usr/bin/env bash
# The main job on its embedded default: sets up .venv, then runs python -m pipeline.demo (see --help).
set -euo pipefail
cd "$(dirname "$0")"
scripts/ensure_venv.sh test
exec .venv/bin/python -m pipeline.demo "$@"
