#!/usr/bin/env bash
# The main job on its embedded default: sets up .venv, then runs python -m pipeline.demo (see --help). A relative
# --workdir (default runs/demo) or local MLFLOW_TRACKING_URI is taken from the folder you run this from.
set -euo pipefail
repo="$(cd "$(dirname "$0")" && pwd)"
(cd "$repo" && scripts/ensure_venv.sh test)
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
exec "$repo/.venv/bin/python" -m pipeline.demo "$@"
