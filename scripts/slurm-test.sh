#!/usr/bin/env bash
# make test-slurm: the shard scripts of deploy/slurm on a real one-node Slurm cluster (started by
# scripts/slurm-cluster.sh; needs root). Checks, on the default model:
#   1. warm -> array -> merge equals a single-process run of the same batch, request by request;
#      the array tasks restore the prefix the warm job computed, and prefill none of it;
#   2. an array task stopped with SIGTERM (as preemption does) requeues itself and resumes:
#      the merge is complete, nothing is duplicated, the requeued run computed only what was left;
#   3. an array task killed with SIGKILL leaves an incomplete shard that merge refuses and names;
#      after a rerun of that index alone, the merge succeeds.
# and measures 2 tasks of 1 thread against 1 process of 2 threads, and submission to merged output.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/deps.sh
./models/fetch.sh smollm2
cargo build --release --quiet
./scripts/slurm-cluster.sh

export INFER_BATCH_BIN=$PWD/target/release/infer-batch
export INFER_BATCH_MODEL=$PWD/models/SmolLM2-135M-Instruct.Q4_1.gguf
work=$(mktemp -d /tmp/infer-batch-slurm.XXXXXX)
export INFER_BATCH_CACHE=$work/prefix-cache
echo "work directory: $work"
flags=(--temperature 0)

python3 benches/gen_workload.py --preset ci -n 24 -s 500 -u 100 -m 40 -o "$work/in.jsonl" >/dev/null

# Job state, from squeue while the job is known to it.
job_done() { [ -z "$(squeue -h -j "$1" 2>/dev/null)" ]; }
wait_jobs() {
    for j in "$@"; do
        while ! job_done "$j"; do sleep 1; done
    done
}
lines() { [ -f "$1" ] && wc -l <"$1" || echo 0; }
wait_lines() { # FILE N: until FILE holds N lines
    for _ in $(seq 600); do
        [ "$(lines "$1")" -ge "$2" ] && return 0
        sleep 0.2
    done
    echo "timed out waiting for $2 lines in $1" >&2
    exit 1
}
fail() {
    echo "FAILED: $*" >&2
    exit 1
}
# Compares two outputs request by request: content, finish_reason and usage, or error code.
same() {
    python3 - "$1" "$2" <<'PY'
import json, sys
def load(p):
    out = {}
    for line in open(p):
        v = json.loads(line)
        if v["error"] is None:
            b = v["response"]["body"]
            key, val = v["custom_id"], (b["choices"][0]["message"]["content"], b["choices"][0]["finish_reason"], b["usage"])
        else:
            key, val = "line:%s" % v["error"]["line"], v["error"]["code"]
        assert key not in out, "%s twice in %s" % (key, p)
        out[key] = val
    return out
a, b = load(sys.argv[1]), load(sys.argv[2])
diff = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
if diff:
    sys.exit("%d requests differ, first %s" % (len(diff), diff[:5]))
print("equal: %d requests" % len(a))
PY
}
summary() { python3 -c "import json,sys; s=json.load(open(sys.argv[1])); print(eval(sys.argv[2]))" "$@"; }

echo "== 1. warm -> array of 2 (1 thread each) -> merge"
t0=$(date +%s.%N)
mapfile -t ids < <(deploy/slurm/submit.sh "$work/in.jsonl" "$work/one/out.jsonl" 2 "${flags[@]}" | awk '{print $2}')
wait_jobs "${ids[@]}"
t1=$(date +%s.%N)
submit_to_merged=$(python3 -c "print(round($t1 - $t0, 1))")
[ -f "$work/one/out.jsonl" ] || fail "the merge job wrote nothing; see $work/one/slurm-logs"
echo "== the same batch in a single process, 2 threads, the warm prefix restored too"
t0=$(date +%s.%N)
"$INFER_BATCH_BIN" --model "$INFER_BATCH_MODEL" --threads 2 --prefix-cache-dir "$INFER_BATCH_CACHE" -o "$work/single.jsonl" \
    "$work/in.jsonl" "${flags[@]}" 2>/dev/null || [ $? -eq 1 ]
t1=$(date +%s.%N)
single_rps=$(python3 -c "print(24 / ($t1 - $t0))")

same "$work/single.jsonl" "$work/one/out.jsonl" || fail "the merged output differs from the single run"
for k in 0 1; do
    s=$work/one/out.shard-000$k-of-0002.summary.json
    [ "$(summary "$s" 's["tokens"]["prefix_prefilled"]')" = 0 ] || fail "shard $k prefilled the prefix"
    echo "shard $k: prefix restored $(summary "$s" 's["tokens"]["prefix_restored"]') tokens, prefilled 0"
done
array_rps=$(python3 -c "
import json; s=json.load(open('$work/one/out.summary.json'))
walls=[x['last_run']['wall_seconds'] for x in s['shards']]
print(24 / max(walls))")

echo "== 2. SIGTERM to a running task: it stops cleanly, requeues itself, resumes"
mapfile -t ids < <(deploy/slurm/submit.sh "$work/in.jsonl" "$work/two/out.jsonl" 2 "${flags[@]}" | awk '{print $2}')
shard1=$work/two/out.shard-0001-of-0002.jsonl
wait_lines "$shard1" 2
scancel --signal=TERM --batch "${ids[1]}_1"
# Slurm holds a requeued job back for about two minutes (its begin time); the test does not wait.
for _ in $(seq 300); do
    if squeue -h -j "${ids[1]}_1" -o %r 2>/dev/null | grep -q BeginTime; then
        scontrol update JobId="${ids[1]}_1" StartTime=now
        break
    fi
    sleep 0.2
done
wait_jobs "${ids[@]}"
same "$work/single.jsonl" "$work/two/out.jsonl" || fail "the merged output differs after a requeue"
runs=$(summary "$work/two/out.shard-0001-of-0002.manifest.json" 'len(s["runs"])')
[ "$runs" -ge 2 ] || fail "shard 1 ran $runs time(s); the SIGTERM did not interrupt it"
total=$(summary "$work/two/out.shard-0001-of-0002.manifest.json" 's["input"]["total"]')
last=$(summary "$work/two/out.shard-0001-of-0002.summary.json" 's["requests"]["ok"] + s["requests"]["failed"]')
[ "$last" -lt "$total" ] || fail "the requeued task computed all $total requests again"
echo "requeued shard 1: $runs runs; the last computed $last of its $total requests"

echo "== 3. SIGKILL to a running task: merge refuses; a rerun of that index completes it"
array=$(sbatch --parsable --array=0-1 --output="$work/three-%A_%a.out" --export=ALL,INFER_BATCH_SHARDS=2 \
    deploy/slurm/shard.sbatch "$work/in.jsonl" "$work/three/out.jsonl" "${flags[@]}")
wait_lines "$work/three/out.shard-0001-of-0002.jsonl" 2
# Every process of the task at once, as a lost node or the OOM killer would: no clean stop.
scontrol listpids "$(squeue -h -j "${array}_1" -o %A)" | awk 'NR > 1 {print $1}' | xargs -r kill -KILL
wait_jobs "$array"
if "$INFER_BATCH_BIN" merge "$work/three/out.jsonl" 2>"$work/three/merge.err"; then
    fail "merge accepted an incomplete shard"
fi
grep -q "unfinished shards: 1/2" "$work/three/merge.err" || fail "merge did not name shard 1: $(cat "$work/three/merge.err")"
echo "merge refused: $(cut -c1-160 "$work/three/merge.err")"
rerun=$(sbatch --parsable --array=1 --output="$work/three-rerun-%a.out" --export=ALL,INFER_BATCH_SHARDS=2 \
    deploy/slurm/shard.sbatch "$work/in.jsonl" "$work/three/out.jsonl" "${flags[@]}")
wait_jobs "$rerun"
"$INFER_BATCH_BIN" merge "$work/three/out.jsonl" || fail "merge after the rerun"
same "$work/single.jsonl" "$work/three/out.jsonl" || fail "the merged output differs after the rerun"

echo
echo "measured on $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
printf '1 process, 2 threads:       %.3f req/s\n' "$single_rps"
printf '2 array tasks, 1 thread:    %.3f req/s (24 requests over the slower task'"'"'s run)\n' "$array_rps"
printf 'submission to merged output: %s s (warm, array and merge jobs, queueing included)\n' "$submit_to_merged"
echo "PASSED"
