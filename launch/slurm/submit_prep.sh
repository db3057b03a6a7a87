#!/usr/bin/env bash
# Queues the whole shard preparation on Slurm: the prep_shards.sbatch array (each task writes its share of
# the shards), then a `python -m data_prep finalize OUT` job that runs once every array task succeeded
# (--dependency=afterok; the last array task usually writes manifest.json already, finalize is idempotent
# and fails naming the missing shards otherwise). If a task fails, finalize is cancelled; rerun this same
# command to resume: finished shards are skipped.
#
# usage: launch/slurm/submit_prep.sh [options] SOURCE OUT [data_prep shard options...]
#   e.g. launch/slurm/submit_prep.sh --array 0-63 --cpus-per-task 16 /data/imagenet22k_tars \
#            s3://bucket/in22k --holdout-per-class 10
#
#   SOURCE, OUT            folder or s3://bucket/prefix; local folders are made absolute
#   shard options          passed to every task (see `python -m data_prep shard --help`)
# options (before SOURCE):
#   --array SPEC           array task ids (default: the script's, 0-7)
#   --cpus-per-task N      CPUs and shard worker processes per task (default: the script's, 8)
#   --log-dir DIR          job logs, created if missing (default: logs/slurm); the array's logs are
#                          DIR/prep-shards-<array job>_<task>.out, finalize's DIR/prep-finalize-<job>.out
#   --sbatch-arg ARG       one more sbatch option for both jobs, e.g. --sbatch-arg=--partition=cpu (repeatable)
#   -h, --help
#
# Prints ARRAY_JOB_ID=<id> and FINALIZE_JOB_ID=<id> on stdout (a summary goes to stderr).
# environment: the jobs get this shell's environment (AWS_* for s3:// paths, PYTHON, SWIN_REPO; see
# prep_shards.sbatch --help).
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
log_dir=logs/slurm
job_args=()
common=()
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --array) job_args+=("--array=$2"); shift 2 ;;
    --array=*) job_args+=("$1"); shift ;;
    --cpus-per-task) job_args+=("--cpus-per-task=$2"); shift 2 ;;
    --cpus-per-task=*) job_args+=("$1"); shift ;;
    --log-dir) log_dir=$2; shift 2 ;;
    --log-dir=*) log_dir=${1#*=}; shift ;;
    --sbatch-arg) common+=("$2"); shift 2 ;;
    --sbatch-arg=*) common+=("${1#*=}"); shift ;;
    --) shift; break ;;
    -*) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) break ;;
  esac
done
if [ $# -lt 2 ]; then usage >&2; exit 2; fi
absolute() { case "$1" in s3://*) echo "$1" ;; *) realpath -m -- "$1" ;; esac; }
source_url="$(absolute "$1")"
out_url="$(absolute "$2")"
shift 2
command -v sbatch >/dev/null || { echo "error: sbatch not found" >&2; exit 1; }

mkdir -p "$log_dir"
log_dir="$(cd "$log_dir" && pwd)"
export SWIN_REPO="${SWIN_REPO:-$repo}"
python="${PYTHON:-$SWIN_REPO/.venv/bin/python}"

array_id="$(sbatch --parsable "${common[@]}" "${job_args[@]}" --output="$log_dir/%x-%A_%a.out" \
            "$here/prep_shards.sbatch" "$source_url" "$out_url" "$@")"
array_id="${array_id%%;*}"  # --parsable prints "id;cluster" on multi-cluster setups

finalize_cmd="export PYTHONPATH=$(printf %q "$SWIN_REPO")\${PYTHONPATH:+:\$PYTHONPATH}; exec $(printf %q "$python") -m data_prep finalize $(printf %q "$out_url")"
finalize_id="$(sbatch --parsable "${common[@]}" --job-name=prep-finalize --cpus-per-task=1 \
               --dependency="afterok:$array_id" --kill-on-invalid-dep=yes \
               --output="$log_dir/%x-%j.out" --wrap="$finalize_cmd")"
finalize_id="${finalize_id%%;*}"

echo "queued shard array job $array_id ($source_url -> $out_url): logs $log_dir/prep-shards-${array_id}_*.out" >&2
echo "queued finalize job $finalize_id after it succeeds: log $log_dir/prep-finalize-$finalize_id.out" >&2
echo "ARRAY_JOB_ID=$array_id"
echo "FINALIZE_JOB_ID=$finalize_id"
