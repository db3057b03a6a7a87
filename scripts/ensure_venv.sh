#!/usr/bin/env bash
# Creates or updates .venv with the project installed (editable) and the extras in $1 (default: test).
# Reinstalls only when pyproject.toml or the extras changed, so reruns start at once.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-test}"
if [ ! -x .venv/bin/python ]; then
  py="${PYTHON:-}"
  if [ -z "$py" ]; then
    for cand in python3.11 python3; do
      if command -v "$cand" >/dev/null && "$cand" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
        py="$cand"; break
      fi
    done
  fi
  [ -n "$py" ] || { echo "error: Python 3.11 not found (set PYTHON=/path/to/python3.11)" >&2; exit 1; }
  echo "creating .venv with $py" >&2
  "$py" -m venv .venv
fi
stamp=".venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)-${extras//,/_}"
if [ ! -f "$stamp" ]; then
  echo "installing swin-pipeline[$extras] into .venv" >&2
  .venv/bin/pip install --quiet --disable-pip-version-check -e ".[$extras]"
  rm -f .venv/.installed-*
  touch "$stamp"
fi
