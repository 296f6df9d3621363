#!/usr/bin/env python3
"""KV cache types and flash attention in deterministic mode, on the seed's shape, on the CPU:

    python3 benches/kv_types.py [--reps N] [--threads N] [--no-server]

  1. cold runs (fresh process, no state file, clocked from start to exit, as `make bench`
     clocks them) of a seed-shaped batch (8 requests, a rubric of about 2,800 tokens, ~600-token
     profiles, 64-token answers): ours at f16 with flash attention off (the default) and on,
     and llama-server at `-np 1` (flash attention auto), N repetitions interleaved; then once
     each, ours at q8_0 and q4_0 at --parallel 8 and every type at --parallel 1;
  2. each type's prefix state: its file's bytes, and the median of three restores;
  3. how far each type moves the outputs of the bundled example (examples/rubric.jsonl, greedy,
     with log probabilities) from f16's: identical answers, and the mean absolute difference of
     the chosen tokens' log probabilities, token by token up to and including the first token
     that differs.

Needs the release build, the default model and, for the server, benches/peers.sh's build.
Writes benches/out/kv-types.json and prints the tables that docs/benchmarks.md holds.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402

TYPES = {"f16": [], "q8_0": ["--cache-type-k", "q8_0", "--cache-type-v", "q8_0"],
         "q4_0": ["--cache-type-k", "q4_0", "--cache-type-v", "q4_0"]}
FA = ["--flash-attn", "on"]
# Ours, by configuration (bench.run_ours takes them from bench.OURS): cold, no state file.
bench.OURS.update({
    "coldfa": ["--no-disk-cache"] + FA,
    "coldq8": ["--no-disk-cache"] + TYPES["q8_0"],
    "coldq4": ["--no-disk-cache"] + TYPES["q4_0"],
})
CONFIG_NAMES = {"cold": "f16", "coldfa": "f16, flash attention", "coldq8": "q8_0", "coldq4": "q4_0"}
SPEC = {
    "gen": ["--preset", "seed-shape", "-n", "8", "-m", "64"],
    "naive_sample": 1,
    "every_rep": ["ours-cold/8", "ours-coldfa/8", "server-cold/1"],
    "once": ["ours-coldq8/8", "ours-coldq4/8", "ours-cold/1", "ours-coldfa/1", "ours-coldq8/1",
             "ours-coldq4/1"],
}
OUT = os.path.join(bench.OUT, "kv-types.json")


def run(args):
    bench.log("$ " + " ".join(args))
    p = subprocess.run(args, cwd=bench.ROOT, capture_output=True, text=True,
                       env=dict(os.environ, INFER_BATCH_LOG="warn"))
    if p.returncode != 0:
        sys.exit(f"{args[0]} failed ({p.returncode}):\n{p.stderr}")
    return p


def states(workload, threads, work):
    """Each type's prefix state: its file's bytes and the median restore of three."""
    first = os.path.join(work, "first.jsonl")
    with open(first, "w") as f:
        line = json.loads(open(workload).readline())
        line["body"]["max_tokens"] = 1
        f.write(json.dumps(line) + "\n")
    rows = {}
    for name, flags in TYPES.items():
        cache = os.path.join(work, f"cache-{name}")
        shutil.rmtree(cache, ignore_errors=True)
        base = [bench.BIN, "--model", bench.MODEL, "--threads", str(threads), "--prefix-cache-dir", cache,
                *flags]
        run([bench.BIN, "cache", "warm", *base[1:], first])
        ms, size, tokens = [], None, None
        for i in range(3):
            out = os.path.join(work, f"restore-{name}-{i}.jsonl")
            run([*base, "--parallel", "1", "-o", out, "--restart", first])
            s = json.load(open(out.replace(".jsonl", ".summary.json")))
            p = s["prefixes"][0]
            if p["source"] != "restored":
                sys.exit(f"{name}: the prefix was {p['source']}, not restored")
            ms.append(p["ms"])
            size, tokens = p["file_bytes"], p["tokens"]
            bytes_per_token = s["memory"]["kv_cache"]["bytes_per_token"]
        rows[name] = {"bytes_per_token": bytes_per_token, "prefix_tokens": tokens, "file_bytes": size,
                      "restore_ms": bench.median(ms)}
    return rows


def quality(threads, work):
    """The bundled example, greedy with log probabilities, under each type, against f16."""
    example = os.path.join(bench.ROOT, "examples", "rubric.jsonl")
    inp = os.path.join(work, "rubric-logprobs.jsonl")
    with open(inp, "w") as f:
        for l in open(example):
            r = json.loads(l)
            r["body"].update({"temperature": 0, "logprobs": True})
            f.write(json.dumps(r) + "\n")
    answers = {}
    configs = {"f16": [], "f16, flash attention": FA, "q8_0": TYPES["q8_0"], "q4_0": TYPES["q4_0"]}
    for name, flags in configs.items():
        out = os.path.join(work, f"quality-{name.replace(', ', '-').replace(' ', '_')}.jsonl")
        run([bench.BIN, "--model", bench.MODEL, "--threads", str(threads), "--parallel", "4", "--no-disk-cache",
             "-o", out, "--restart", *flags, inp])
        answers[name] = {}
        for l in open(out):
            r = json.loads(l)
            c = r["response"]["body"]["choices"][0]
            answers[name][r["custom_id"]] = [(t["token"], t["logprob"]) for t in c["logprobs"]["content"]]
    rows = {}
    base = answers["f16"]
    for name, got in answers.items():
        same = sum(got[k] == base[k] or [t for t, _ in got[k]] == [t for t, _ in base[k]] for k in base)
        diffs = []
        for k in base:
            for (ta, la), (tb, lb) in zip(base[k], got[k]):
                diffs.append(abs(la - lb))
                if ta != tb:
                    break
        rows[name] = {"identical_answers": same, "answers": len(base),
                      "mean_abs_logprob_diff": sum(diffs) / len(diffs), "tokens_compared": len(diffs)}
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--no-server", action="store_true")
    a = ap.parse_args()
    threads = a.threads or bench.physical_cores()
    spec = dict(SPEC)
    if a.no_server:
        spec["every_rep"] = [k for k in spec["every_rep"] if not k.startswith("server")]
    os.makedirs(bench.OUT, exist_ok=True)
    w = bench.Workload("kv-types", spec, threads)
    for kind, rounds in (("every_rep", a.reps), ("once", 1)):
        for _ in range(rounds):
            for key in spec[kind]:
                w.run(key)
    results = {"machine": bench.machine(), "threads": threads, "workload": w.record(),
               "states": states(w.input, threads, w.work), "quality": quality(threads, w.work)}
    json.dump(results, open(OUT, "w"), indent=1)
    report(results)


def report(r):
    samples = r["workload"]["samples"]
    med = lambda key, f: bench.median([s[f] for s in samples.get(key, [])])  # noqa: E731
    print(f"{r['machine']['cpu']}, {r['threads']} threads; {r['workload']['requests']} requests, "
          f"prefix {r['states']['f16']['prefix_tokens']} tokens\n")
    print("| run | wall s (median) | prefill tok/s | decode tok/s |")
    print("|---|---|---|---|")
    for key in [*r["workload"]["samples"]]:
        engine, _, rest = key.partition("-")
        config, _, p = rest.partition("/")
        name = f"llama-server -np {p}" if engine == "server" else f"ours {CONFIG_NAMES[config]}, --parallel {p}"
        n = len(samples[key])
        print(f"| {name} ({n} run{'s' if n > 1 else ''}) | {med(key, 'wall'):.1f} | "
              f"{med(key, 'prefill_tps'):.0f} | {med(key, 'decode_tps'):.1f} |")
    print("\n| type | KV bytes/token | prefix state file | restore ms (median of 3) |")
    print("|---|---|---|---|")
    for name, s in r["states"].items():
        print(f"| {name} | {s['bytes_per_token']:,} | {s['file_bytes']:,} | {s['restore_ms']:.1f} |")
    print("\n| against f16 | identical greedy answers | mean abs. logprob difference | tokens compared |")
    print("|---|---|---|---|")
    for name, q in r["quality"].items():
        print(f"| {name} | {q['identical_answers']} of {q['answers']} | {q['mean_abs_logprob_diff']:.4f} | "
              f"{q['tokens_compared']} |")


if __name__ == "__main__":
    main()
