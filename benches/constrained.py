#!/usr/bin/env python3
"""What JSON-schema constrained decoding costs: the same 16 requests with and without a
response_format, greedy, --parallel 1, 5 interleaved repetitions, medians.

    python3 benches/constrained.py [--threads N]

The figure compared is generation tok/s: completion tokens over (wall clock - prefill seconds),
so it holds the mask llguidance computes for every token, which falls outside llama.cpp's
decode calls (and the one-time vocabulary walk for the first schema). Prompts are identical, so
prefill is too. Needs target/release/infer-batch and the default model.
"""
import argparse
import json
import os
import statistics
import subprocess
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "infer-batch")
MODEL = os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")
SCHEMA = {
    "type": "object",
    "properties": {
        "score": {"type": "integer", "minimum": 1, "maximum": 5},
        "reason": {"type": "string"},
        "strengths": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["score", "reason", "strengths"],
}
SYSTEM = ("You grade a candidate profile from 1 to 5 against a rubric and explain why, in JSON "
          "with score, reason and strengths.")


def batch(path, constrained):
    with open(path, "w") as f:
        for i in range(16):
            body = {"custom_id": f"c{i}", "max_tokens": 96, "temperature": 0, "messages": [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": f"Candidate {i}: {3 + i} years of backend work in "
                                            f"Rust and Go, led {1 + i % 3} projects."}]}
            if constrained:
                body["response_format"] = {"type": "json_schema",
                                           "json_schema": {"name": "grade", "schema": SCHEMA}}
            f.write(json.dumps(body) + "\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="infer-batch-constrained-")
    rates = {"plain": [], "json": []}
    for name in rates:
        batch(os.path.join(work, f"{name}.jsonl"), name == "json")
    for _ in range(args.reps):
        for name in rates:
            out = os.path.join(work, f"{name}.out.jsonl")
            subprocess.run([BIN, "--model", MODEL, "--parallel", "1", "--threads", str(args.threads),
                            "--no-disk-cache", "--restart", "-o", out,
                            os.path.join(work, f"{name}.jsonl")],
                           check=False, stderr=subprocess.DEVNULL)
            s = json.load(open(out.replace(".jsonl", ".summary.json")))
            tokens = s["tokens"]["completion"]
            rates[name].append(tokens / (s["wall_seconds"] - s["seconds"]["prefill"]))
    plain, constrained = statistics.median(rates["plain"]), statistics.median(rates["json"])
    print(f"threads {args.threads}, {args.reps} reps, medians of generation tok/s")
    print(f"unconstrained: {plain:.1f}  ({', '.join(f'{r:.1f}' for r in rates['plain'])})")
    print(f"json schema:   {constrained:.1f}  ({', '.join(f'{r:.1f}' for r in rates['json'])})")
    print(f"cost: {100 * (1 - constrained / plain):.1f}% of unconstrained")


if __name__ == "__main__":
    main()
