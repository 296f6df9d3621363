#!/usr/bin/env python3
"""Thinking on and off, on one batch, on the CPU:

    python3 benches/reasoning.py [--reps N] [--threads N] [-n REQUESTS]

The batch: N requests (24 by default) sharing a rubric, each asking for a JSON grade under a
schema (`{"score": 0..3}`), 96 tokens at most, temperature 0.6 with a seed each. Run three
ways, N repetitions interleaved, each a fresh process with the prefix state on disk:
  - today's: the model's own template, `--reasoning-format none`: the schema applies from the
    first token;
  - thinking, `reasoning_effort: low`: tests/templates/think.jinja (the GGUF's ChatML with a
    think block opened in the generation prompt, as DeepSeek-R1's does),
    `--reasoning-format deepseek`, budgets 16,48,96: the engine closes the thinking after 16
    tokens and the schema applies to the answer;
  - the same with `reasoning_effort: none` (the template's `enable_thinking` off).
For each: the wall time, the decode rate (the summary's, measured), completion and reasoning
tokens, and the share of answers that end with `stop` and parse under the schema.

Needs the release build and the default model. Writes benches/out/reasoning.json.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "infer-batch")
MODEL = os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")
TEMPLATE = os.path.join(ROOT, "tests", "templates", "think.jinja")
SCHEMA = {"type": "json_schema", "json_schema": {"name": "grade", "strict": True, "schema": {
    "type": "object", "properties": {"score": {"type": "integer", "minimum": 0, "maximum": 3}},
    "required": ["score"], "additionalProperties": False}}}
RUBRIC = ("You grade one candidate profile. Criteria: clarity of reasoning, evidence of shipped "
          "work, depth in systems programming, care for testing. Reply with a JSON grade. ") * 4


def batch(path, n, effort):
    with open(path, "w") as f:
        for i in range(n):
            body = {"messages": [{"role": "system", "content": RUBRIC},
                                 {"role": "user", "content": f"Candidate {i}: {2 + i % 9} years "
                                  f"of Rust, led {1 + i % 4} projects."}],
                    "max_tokens": 96, "temperature": 0.6, "seed": i, "response_format": SCHEMA}
            if effort:
                body["reasoning_effort"] = effort
            f.write(json.dumps({"custom_id": f"c{i}", "method": "POST",
                                "url": "/v1/chat/completions", "body": body}) + "\n")


def run(inp, out, flags, threads, cache):
    t0 = time.perf_counter()
    subprocess.run([BIN, "--model", MODEL, inp, "-o", out, "--restart", "--threads", str(threads),
                    "--prefix-cache-dir", cache] + flags, check=False, stderr=subprocess.DEVNULL,
                   env={**os.environ, "INFER_BATCH_LOG": "warn"})
    wall = time.perf_counter() - t0
    summary = json.load(open(out.replace(".jsonl", ".summary.json")))
    lines = [json.loads(l) for l in open(out)]
    parsed = 0
    reasoning = 0
    for l in lines:
        body = (l.get("response") or {}).get("body") or {}
        choice = (body.get("choices") or [{}])[0]
        reasoning += ((body.get("usage") or {}).get("completion_tokens_details") or {}).get("reasoning_tokens", 0)
        if choice.get("finish_reason") == "stop":
            try:
                v = json.loads(choice["message"]["content"])
                parsed += isinstance(v.get("score"), int) and 0 <= v["score"] <= 3
            except (ValueError, AttributeError):
                pass
    return {"wall_s": wall, "decode_tok_s": summary["rates"]["decode_tokens_per_second"],
            "completion_tokens": summary["tokens"]["completion"], "reasoning_tokens": reasoning,
            "parsed": parsed, "requests": len(lines)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("-n", type=int, default=24)
    a = ap.parse_args()
    work = tempfile.mkdtemp(prefix="reasoning-bench-")
    think = ["--chat-template", TEMPLATE, "--reasoning-format", "deepseek", "--reasoning-budget", "16,48,96"]
    modes = {
        "today (no thinking)": (None, ["--reasoning-format", "none"]),
        "thinking, effort low (16-token budget)": ("low", think),
        "thinking off, effort none": ("none", think),
    }
    results = {}
    for name, (effort, _) in modes.items():
        batch(os.path.join(work, f"{effort}.jsonl"), a.n, effort)
        results[name] = []
    cache = os.path.join(work, "cache")
    for r in range(a.reps):
        for name, (effort, flags) in modes.items():
            inp = os.path.join(work, f"{effort}.jsonl")
            results[name].append(run(inp, os.path.join(work, f"out-{effort}-{r}.jsonl"), flags, a.threads, cache))
            print(f"  rep {r + 1} {name}: {results[name][-1]}", flush=True)
    os.makedirs(os.path.join(ROOT, "benches", "out"), exist_ok=True)
    json.dump(results, open(os.path.join(ROOT, "benches", "out", "reasoning.json"), "w"), indent=2)
    print("| run | wall s (median) | decode tok/s (median) | completion tokens | of which thinking | schema answers that parse |")
    print("|---|---|---|---|---|---|")
    for name, rs in results.items():
        med = lambda k: statistics.median(x[k] for x in rs)
        print(f"| {name} | {med('wall_s'):.1f} | {med('decode_tok_s'):.1f} | {rs[0]['completion_tokens']} "
              f"| {rs[0]['reasoning_tokens']} | {rs[0]['parsed']} of {rs[0]['requests']} |")


if __name__ == "__main__":
    main()
