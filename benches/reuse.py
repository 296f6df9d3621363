#!/usr/bin/env python3
"""Measures `--reuse`: a rerun of a batch where a share of the requests changed, against the
full rerun of the same edited batch. Both are warm (the prefix state file is written once,
before anything is timed) and clocked the same way: wall time from process start to exit.

    python3 benches/reuse.py                 (100 requests, 10% edited, 3 repetitions)
    python3 benches/reuse.py -n 14 --changed 3

For each repetition, in order: the full run of the first batch (whose output the rerun reuses),
the full rerun of the edited batch, and the rerun with --reuse. It checks that the unchanged
requests' lines are identical (but for `created`) in both reruns, and prints the medians and
their ratio. Results go to benches/out/reuse-N.json.
"""
import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "infer-batch")
MODEL = os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")


def run(args):
    t = time.monotonic()
    subprocess.run([BIN, "--model", MODEL, *args], check=True, stderr=subprocess.DEVNULL)
    return time.monotonic() - t


def lines_by_id(path):
    out = {}
    with open(path) as f:
        for line in f:
            cid = json.loads(line)["custom_id"]
            out[cid] = re.sub(r'"created":\d+', '"created":0', line, count=1)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=100, help="requests")
    ap.add_argument("--changed", type=int, help="requests edited or new [default: 10%%]")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--max-tokens", type=int, default=32)
    a = ap.parse_args()
    changed = a.changed if a.changed is not None else max(1, a.n // 10)
    work = os.path.join(ROOT, "benches", "out", f"reuse-{a.n}")
    os.makedirs(work, exist_ok=True)
    first = os.path.join(work, "first.jsonl")
    subprocess.run([sys.executable, os.path.join(ROOT, "benches", "gen_workload.py"), "-n", str(a.n),
                    "-s", "600", "-u", "80", "-m", str(a.max_tokens), "-o", first], check=True)
    lines = open(first).read().splitlines()
    picked = sorted(random.Random(7).sample(range(a.n), changed))
    edited = list(lines)
    for i in picked:
        req = json.loads(edited[i])
        req["body"]["messages"][-1]["content"] += " Update: now also leads the on-call rotation."
        edited[i] = json.dumps(req)
    second = os.path.join(work, "second.jsonl")
    open(second, "w").write("\n".join(edited) + "\n")

    cache = os.path.join(work, "cache")
    common = ["--threads", str(a.threads), "--prefix-cache-dir", cache, "--restart"]
    subprocess.run([BIN, "cache", "warm", "--model", MODEL, "--prefix-cache-dir", cache, first],
                   check=True, stderr=subprocess.DEVNULL)
    full, reuse = [], []
    for rep in range(a.reps):
        first_out = os.path.join(work, "first.out.jsonl")
        run([*common, "-o", first_out, first])
        full_out = os.path.join(work, "full.out.jsonl")
        reuse_out = os.path.join(work, "reuse.out.jsonl")
        full.append(run([*common, "-o", full_out, second]))
        reuse.append(run([*common, "--reuse", first_out, "-o", reuse_out, second]))
        want, got = lines_by_id(full_out), lines_by_id(reuse_out)
        assert want == got, "the rerun with --reuse differs from the full rerun"
        summary = json.load(open(os.path.join(work, "reuse.out.summary.json")))
        assert summary["requests"]["reused"] == a.n - changed, summary["requests"]
        print(f"rep {rep + 1}: full rerun {full[-1]:.2f} s, with --reuse {reuse[-1]:.2f} s", flush=True)
    result = {
        "requests": a.n,
        "changed": changed,
        "threads": a.threads,
        "max_tokens": a.max_tokens,
        "full_rerun_seconds": full,
        "reuse_rerun_seconds": reuse,
        "median_full": statistics.median(full),
        "median_reuse": statistics.median(reuse),
    }
    result["speedup"] = result["median_full"] / result["median_reuse"]
    json.dump(result, open(os.path.join(work, "..", f"reuse-{a.n}.json"), "w"), indent=2)
    print(f"{a.n} requests, {changed} changed: median full rerun {result['median_full']:.2f} s, "
          f"with --reuse {result['median_reuse']:.2f} s, {result['speedup']:.2f}x; "
          "unchanged lines identical in every repetition")


if __name__ == "__main__":
    main()
