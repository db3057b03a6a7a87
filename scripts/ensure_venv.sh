#!/usr/bin/env bash
# Creates or updates .venv with the project installed (editable) and the extras in $1 (default: test), plus the
# DALI build that matches torch's CUDA major. Reinstalls only when pyproject.toml, the extras or SWIN_CUDA
# changed, so reruns start at once.
#
# SWIN_CUDA (default: the pinned torch as pip serves it, a CUDA 13 build for sm_75 and newer: A100, H100, H200)
#   cu126   V100 (sm_70) nodes: torch and torchvision from PyTorch's CUDA 12.6 wheel index (the last builds that
#           carry sm_70) and nvidia-dali-cuda120; SWIN_TORCH_INDEX overrides the index URL (a local mirror)
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-test}"
cuda="${SWIN_CUDA:-}"
case "$cuda" in
  "") dali_extra=dali; dali_pkg=nvidia-dali-cuda130 ;;
  cu126) dali_extra=dali-cu12; dali_pkg=nvidia-dali-cuda120 ;;
  *) echo "error: SWIN_CUDA=$cuda is not known (leave it unset for A100/H100/H200, cu126 for V100)" >&2; exit 2 ;;
esac
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
stamp=".venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)-${extras//,/_}-${cuda:-default}"
if [ ! -f "$stamp" ]; then
  pip=(.venv/bin/pip --disable-pip-version-check)
  # one DALI in the venv: another CUDA major's wheel would shadow this one's nvidia.dali
  for other in $("${pip[@]}" list --format=freeze 2>/dev/null | grep -o '^nvidia-dali-cuda[0-9]*' | grep -vx "$dali_pkg" || true); do
    echo "removing $other (this venv's DALI is $dali_pkg)" >&2
    "${pip[@]}" uninstall --quiet -y "$other"
  done
  if [ "$cuda" = cu126 ]; then
    torch_pins="$(grep -oE '"torch(vision)?==[^"]+"' pyproject.toml | tr -d '"')"
    echo "installing $torch_pins from the CUDA 12.6 index (sm_70 kernels)" >&2
    # shellcheck disable=SC2086
    "${pip[@]}" install --quiet --index-url "${SWIN_TORCH_INDEX:-https://download.pytorch.org/whl/cu126}" $torch_pins
  fi
  echo "installing swin-pipeline[$extras,$dali_extra] into .venv" >&2
  "${pip[@]}" install --quiet -e ".[$extras,$dali_extra]"
  rm -f .venv/.installed-*
  touch "$stamp"
fi
