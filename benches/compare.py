#!/usr/bin/env python3
"""End-to-end comparison on one machine, in one run: the same input under several settings,
interleaved and repeated, with medians from each run's measured summary.

Usage: benches/compare.py INPUT.jsonl [--reps 3] [--naive-reps 1] [--parallel 1,4]
Needs a release build (cargo build --release) and the default model.

Configurations:
  naive      --no-prefix-cache: every request prefills its whole prompt
  memory     the prefix prefilled once, shared in memory (--no-disk-cache)
  disk       the prefix restored from a state file written by a previous run
  unified    like memory, with --no-deterministic (one unified KV cache, mixed batches)
  fsync-each like memory, syncing the output to disk after every line
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "infer-batch")
MODEL = os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")

CONFIGS = {
    "naive": ["--no-prefix-cache", "--no-disk-cache"],
    "memory": ["--no-disk-cache"],
    "disk": [],
    "unified": ["--no-disk-cache", "--no-deterministic"],
    "fsync-each": ["--no-disk-cache", "--fsync-interval-ms", "0"],
}


def run(input_path, config, parallel, work, extra):
    out = os.path.join(work, f"{config}-p{parallel}.jsonl")
    cache = os.path.join(work, "cache")
    args = [BIN, "--model", MODEL, input_path, "-o", out, "--restart",
            "--parallel", str(parallel), "--prefix-cache-dir", cache] + CONFIGS[config] + extra
    env = dict(os.environ, INFER_BATCH_LOG="warn")
    t0 = time.monotonic()
    proc = subprocess.run(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.monotonic() - t0
    if proc.returncode not in (0, 1):
        sys.exit(f"{config} p{parallel} failed ({proc.returncode}):\n{proc.stderr}")
    summary = json.load(open(out.replace(".jsonl", ".summary.json")))
    results = [json.loads(l) for l in open(out)]
    usage = [r["response"]["body"]["usage"] for r in results if r["error"] is None]
    return {
        "wall": wall,
        "req_s": len(results) / summary["wall_seconds"],
        "prefill_tps": summary["rates"]["prefill_tokens_per_second"],
        "decode_tps": summary["rates"]["decode_tokens_per_second"],
        "ttft_p50": summary["time_to_first_token_seconds"]["p50"],
        "prompt_computed": summary["tokens"]["prompt_computed"],
        "prompt_reused": summary["tokens"]["prompt_reused"],
        "prompt_total": sum(u["prompt_tokens"] for u in usage),
        "completion": sum(u["completion_tokens"] for u in usage),
        "prefix_restored": summary["tokens"]["prefix_restored"],
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("input")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--naive-reps", type=int, default=1)
    ap.add_argument("--parallel", default="1,4")
    ap.add_argument("--configs", default="naive,memory,disk,unified")
    ap.add_argument("--threads", type=int)
    a = ap.parse_args()
    extra = ["--threads", str(a.threads)] if a.threads else []
    parallels = [int(p) for p in a.parallel.split(",")]
    configs = a.configs.split(",")
    work = tempfile.mkdtemp(prefix="infer-batch-bench-")
    try:
        # Write the prefix state once, so "disk" restores it in every rep.
        run(a.input, "disk", parallels[0], work, extra)
        samples = {(c, p): [] for c in configs for p in parallels}
        for rep in range(a.reps):
            for p in parallels:
                for c in configs:
                    if c == "naive" and rep >= a.naive_reps:
                        continue
                    r = run(a.input, c, p, work, extra)
                    samples[(c, p)].append(r)
                    print(f"rep {rep} {c:8} p{p}: {r['req_s']:.3f} req/s", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def med(rs, k):
        return statistics.median(r[k] for r in rs)

    base = {p: med(samples[("naive", p)], "req_s") for p in parallels if ("naive", p) in samples}
    print(f"| config | --parallel | runs | req/s (median) | vs naive | prefill tok/s | decode tok/s | TTFT p50 s | prompt tokens computed / total |")
    print("|---|---|---|---|---|---|---|---|---|")
    for p in parallels:
        for c in configs:
            rs = samples[(c, p)]
            ratio = f"{med(rs, 'req_s') / base[p]:.2f}x" if p in base else "-"
            print(f"| {c} | {p} | {len(rs)} | {med(rs, 'req_s'):.3f} | {ratio} | {med(rs, 'prefill_tps'):.0f} | "
                  f"{med(rs, 'decode_tps'):.1f} | {med(rs, 'ttft_p50'):.2f} | {rs[0]['prompt_computed']} / {rs[0]['prompt_total']} |")
    if base:
        r = samples[(configs[1] if len(configs) > 1 else configs[0], parallels[0])][0]
        ideal = r["prompt_total"] / max(1, r["prompt_computed"])
        print(f"\nprompt tokens: {r['prompt_total']} in all, {r['prompt_computed']} computed with sharing: "
              f"prefill work cut {ideal:.1f}x")


if __name__ == "__main__":
    main()
