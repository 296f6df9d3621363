#!/usr/bin/env bash
# Submits one batch as three chained Slurm jobs: a warm job that computes the shared prefix
# states once, an array of N shard tasks that restore them, and a merge job that runs only when
# every shard succeeded. Prints the three job ids.
#
#   deploy/slurm/submit.sh INPUT.jsonl OUTPUT.jsonl N [infer-batch flags...]
#
# Set in the environment (sbatch passes it on to the jobs):
#   INFER_BATCH_BIN    the infer-batch binary          [infer-batch on PATH, else target/release]
#   INFER_BATCH_MODEL  the GGUF model                  [models/SmolLM2-135M-Instruct.Q4_1.gguf]
#   INFER_BATCH_CACHE  prefix states, on a filesystem every node sees [OUTPUT's dir/prefix-cache]
# Extra flags go to all three jobs; give the ones that change the prefix state (--batch-size,
# --flash-attn, --gpu-layers, --no-deterministic) to every job alike. Per-task resources are
# sbatch's: for example SBATCH_CPUS_PER_TASK, or edit shard.sbatch.
set -euo pipefail

if [ $# -lt 3 ]; then
    sed -n '2,17p' "$0" >&2
    exit 2
fi
here=$(cd "$(dirname "$0")" && pwd)
input=$(realpath "$1")
output=$(realpath -m "$2")
shards=$3
shift 3
case $shards in '' | *[!0-9]* | 0) echo "error: N must be a whole number of shards, at least 1" >&2; exit 2 ;; esac

INFER_BATCH_BIN=${INFER_BATCH_BIN:-$(command -v infer-batch || realpath target/release/infer-batch)}
INFER_BATCH_MODEL=$(realpath "${INFER_BATCH_MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}")
INFER_BATCH_CACHE=${INFER_BATCH_CACHE:-$(dirname "$output")/prefix-cache}
export INFER_BATCH_BIN INFER_BATCH_MODEL INFER_BATCH_CACHE INFER_BATCH_SHARDS=$shards
mkdir -p "$(dirname "$output")"
logs=$(dirname "$output")/slurm-logs
mkdir -p "$logs"

warm=$(sbatch --parsable --output="$logs/warm-%j.out" "$here/warm.sbatch" "$input" "$@")
array=$(sbatch --parsable --dependency="afterok:$warm" --array="0-$((shards - 1))" \
    --output="$logs/shard-%A_%a.out" "$here/shard.sbatch" "$input" "$output" "$@")
merge=$(sbatch --parsable --dependency="afterok:$array" --output="$logs/merge-%j.out" \
    "$here/merge.sbatch" "$output")
echo "warm $warm"
echo "array $array"
echo "merge $merge"
