#!/usr/bin/env bash
''''true  # Both a bash script and a Python file: see "How this file runs" below. No triple quotes in the bash part.
# Training on a cluster: ImageNet-22K pretraining, and (as launch/finetune_1k_384.sh, a link to this file) the
# 22K -> 1K fine-tuning at 384; any recipe in configs/ runs the same way. Two ways to start it:
#
#   bash launch/pretrain_22k.sh --config configs/swin_base_22k.yaml [key=value ...]
#       starts the ranks itself with DeepSpeed's launcher (on one machine its per-node launcher, without the
#       runner: swin_common/node_launch.py):
#         HOSTFILE      hostfile ("host slots=8" per line, launch/hostfile.example); unset = this machine only
#         NUM_NODES     nodes to use from the hostfile (default: all)
#         NUM_GPUS      processes per node (default: the hostfile's slots; without one every GPU, or 2 on a
#                       CPU-only machine)
#         MASTER_ADDR, MASTER_PORT   rendezvous (default: the first host, port 29500)
#         SSH_PORT      port of the nodes' sshd when not 22 (deepspeed --ssh_port: its ssh check and pdsh use it);
#                       other ssh settings (key, user) go in ~/.ssh/config, which ssh and pdsh read on this node
#         DS_LAUNCHER_ARGS           anything else for the launcher, e.g. "--launcher openmpi" (split on white
#                                    space; no quotes or glob expansion)
#
#   deepspeed [launcher options] launch/pretrain_22k.sh --config configs/swin_base_22k.yaml [key=value ...]
#       the way the team has always called it; `deepspeed --no_python ...` works too.
#
# Each rank ends up in `python -m pipeline.train`, which reads RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* (or Slurm's
# variables under srun, see launch/slurm/pretrain_22k.sbatch).
#
# How this file runs: the deepspeed launcher, unless given --no_python, starts every rank as
# `python -u launch/pretrain_22k.sh --local_rank=N ...`. So the file is valid bash and valid Python:
# bash runs line 2 as `true` and ends at an exec; Python reads lines 2 up to the last line's triple quote as
# one string, and the last line, after bash's comment sign, is the Python part: it calls pipeline.train.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
launch_dir="$PWD"  # a relative out_dir or --config is the user's, not the repository's: every rank is told
python="${PYTHON:-$repo/.venv/bin/python}"
[ -x "$python" ] || python="$(command -v python3)"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"

if [ -n "${LOCAL_RANK:-}" ] || [ -n "${SLURM_STEP_ID:-}" ]; then
  # already one rank (deepspeed --no_python, or srun): train
  exec "$python" -u -m pipeline.train "$@"
fi

for arg in "$@"; do  # --help: this text and the train command's options, without starting any rank
  case "$arg" in
    -h|--help) sed -n '3,/^# How this file runs/p' "$0" | sed '$d; s/^# \{0,1\}//'
               exec "$python" -m pipeline.train --help ;;
  esac
done
# what a user can get wrong (the config, the shard set, an init_from path), said in a second and as the last
# line, before any rank starts; run from the repository, where the ranks run
(cd "$repo" && "$python" -m pipeline.train --check --launch-dir "$launch_dir" "$@") || exit $?
for arg in "$@"; do  # --check given by the user: the check is all they asked for
  [ "$arg" = --check ] && exit 0
done

# ranks on this machine, when known without asking torch: NUM_GPUS, or 2 on a machine without an NVIDIA driver
local_procs="${NUM_GPUS:-}"
if [ -z "$local_procs" ] && [ -z "${HOSTFILE:-}" ] && { [ ! -e /proc/driver/nvidia/version ] ||
     ! "$python" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())' 2>/dev/null; }; then
  local_procs=2  # CPU-only machine: two gloo ranks (with a hostfile its slots count, wherever this runs)
fi
launcher=(-m deepspeed.launcher.runner)
env_file=""
if [ -z "${HOSTFILE:-}${NUM_NODES:-}${DS_LAUNCHER_ARGS:-}" ] && [ -n "$local_procs" ]; then
  # one machine, the rank count known: DeepSpeed's per-node launcher without the runner, whose only work here
  # is to encode that count, in a process of its own with all of DeepSpeed imported (swin_common/node_launch.py)
  launcher=(-u -m swin_common.node_launch --procs "$local_procs")
elif [ -n "${HOSTFILE:-}" ]; then
  [ -f "$HOSTFILE" ] || { echo "error: HOSTFILE=$HOSTFILE not found" >&2; exit 2; }
  launcher+=(--hostfile "$HOSTFILE")
  # the other nodes get SWIN_*, AWS_*, TORCH_*, DEEPSPEED_TIMEOUT too, not only the runner's own prefixes
  # (swin_common/launch_env.py): a private file, named in DS_ENV_FILE, holding the user's .deepspeed_env lines too
  env_file="$(mktemp "${TMPDIR:-/tmp}/swin-deepspeed-env.XXXXXX")"
  "$python" -m swin_common.launch_env "$HOME/.deepspeed_env" "$launch_dir/.deepspeed_env" >"$env_file"
  export DS_ENV_FILE="$env_file"
else
  launcher+=(--hostfile /dev/null)  # no hostfile: this machine only, no ssh
fi
if [ "${launcher[1]}" = deepspeed.launcher.runner ]; then
  [ -n "${NUM_NODES:-}" ] && launcher+=(--num_nodes "$NUM_NODES")
  [ -n "$local_procs" ] && launcher+=(--num_gpus "$local_procs")
  [ -n "${SSH_PORT:-}" ] && launcher+=(--ssh_port "$SSH_PORT")
fi
[ -n "${MASTER_ADDR:-}" ] && launcher+=(--master_addr "$MASTER_ADDR")
launcher+=(--master_port "${MASTER_PORT:-29500}")
# split on white space only, never glob-expanded: DS_LAUNCHER_ARGS='--include node[1-2]' stays as written
read -r -d '' -a ds_launcher_args <<<"${DS_LAUNCHER_ARGS:-}" || true
launcher+=("${ds_launcher_args[@]}")
cd "$repo"

# Stop signals (SIGTERM, SIGUSR1): every rank saves a checkpoint at the step it reaches and exits 75, which the
# launcher passes on as this script's status (pipeline/engine/stop.py). The runner does not pass signals on by
# itself on one machine, so this script sends them to the ranks under it; with a HOSTFILE it hands SIGTERM to
# the runner, which ends every node's ranks over pdsh (`pkill`, SIGTERM: a SIGUSR1 goes the same way).
ranks_under() {  # the rank processes below $1 (their DataLoader workers share the command line and ignore it)
  local queue=("$1") found=() pid child
  while [ ${#queue[@]} -gt 0 ]; do
    pid=${queue[0]}; queue=("${queue[@]:1}")
    for child in $(pgrep -P "$pid" || true); do
      queue+=("$child")
      tr '\0' ' ' <"/proc/$child/cmdline" 2>/dev/null | grep -q -- "--local_rank=" && found+=("$child")
    done
  done
  echo "${found[@]}"
}
pass_on() {
  echo "launch/pretrain_22k.sh: SIG$1 received: the ranks save a checkpoint at their next step and stop" >&2
  if [ -n "${HOSTFILE:-}" ]; then
    kill -TERM "$runner" 2>/dev/null || true
  else
    # shellcheck disable=SC2046
    kill -"$1" $(ranks_under "$runner") 2>/dev/null || true
  fi
}
# rank 0 writes it once every rank has stopped at a checkpoint (the exit status then is 75 whatever the runner says)
export SWIN_STOP_FILE="${TMPDIR:-/tmp}/swin-stop-$$-$RANDOM"
rm -f "$SWIN_STOP_FILE"
"$python" "${launcher[@]}" --module pipeline.train --launch-dir "$launch_dir" "$@" &
runner=$!
trap 'pass_on TERM' TERM
trap 'pass_on USR1' USR1
while :; do
  status=0
  wait "$runner" || status=$?
  kill -0 "$runner" 2>/dev/null || break  # a trap ended the wait, not the runner: wait on
done
if [ -f "$SWIN_STOP_FILE" ]; then
  status=75
  rm -f "$SWIN_STOP_FILE"
fi
[ -z "$env_file" ] || rm -f "$env_file"
exit "$status"
: "'''" #"; import sys; sys.path.insert(0, __file__.rsplit("/launch/", 1)[0]); from pipeline.train import main; from swin_common.cli import exit_process; exit_process(main(sys.argv[1:]))
