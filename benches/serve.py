#!/usr/bin/env python3
"""`infer-batch serve` against the command line, on one machine, with one clock:

    .venv-openai/bin/python benches/serve.py [--reps N] [--threads N] [--load-seconds S]

  1. overhead: the same batch (benches/gen_workload.py's `ci` preset: 16 requests, a rubric of
     about 1,000 tokens, 32-token answers) run by the command line (process start to exit) and
     through the server with the openai SDK (upload to the last line downloaded, polling every
     0.1 s), N repetitions interleaved, the prefix state already on disk for both; medians;
  2. what a batch pays to start: a one-request batch the same two ways;
  3. polling under load: 32 clients poll (a third of them first upload and create a batch)
     while a batch decodes; p50 and p99 of GET /v1/batches/{id};
  4. recovery: SIGKILL the server mid-batch, start it again, and time its first answer and the
     batch's next finished request.

Needs the release build, the default model and the openai SDK (scripts/openai-sdk.sh).
Writes benches/out/serve.json and prints the table that docs/benchmarks.md holds.
"""
import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "openai"))
import batch_api  # noqa: E402

BIN = os.path.join(ROOT, "target", "release", "infer-batch")
MODEL = os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")
ENDPOINT = "/v1/chat/completions"


def start_server(data, cache, threads):
    log = open(os.path.join(data + ".log"), "w")
    t0 = time.perf_counter()
    p = subprocess.Popen(
        [BIN, "serve", "--model", MODEL, "--port", "0", "--data-dir", data,
         "--prefix-cache-dir", cache, "--threads", str(threads)],
        stdout=subprocess.DEVNULL, stderr=log, env={**os.environ, "INFER_BATCH_LOG": "warn"})
    while True:
        text = open(log.name).read()
        if "serving the Batch API on " in text:
            base = text.split("serving the Batch API on ")[1].split()[0]
            return p, base, time.perf_counter() - t0
        assert p.poll() is None, text
        time.sleep(0.005)


def cli(inp, out, cache, threads):
    t0 = time.perf_counter()
    subprocess.run([BIN, "--model", MODEL, inp, "-o", out, "--restart", "--prefix-cache-dir", cache,
                    "--threads", str(threads)], check=True, stderr=subprocess.DEVNULL,
                   env={**os.environ, "INFER_BATCH_LOG": "warn"})
    return time.perf_counter() - t0


def through_server(base, inp, outdir):
    c = batch_api.client(base)
    t0 = time.perf_counter()
    b = batch_api.submit(c, inp, ENDPOINT)
    while b.status not in batch_api.TERMINAL:
        time.sleep(0.1)
        b = c.batches.retrieve(b.id)
    batch_api.download(c, b, outdir)
    assert b.status == "completed", b
    return time.perf_counter() - t0, b.id


def overhead(inp, reps, threads, work, server):
    """Interleaved wall times; and what the server adds to its own engine's run, which the
    machine's drift between two runs does not blur: the server's wall time less that batch's
    engine wall time (its summary's `wall_seconds`, model load to last line)."""
    cache = os.path.join(work, "cache")
    cli(inp, os.path.join(work, "warm.jsonl"), cache, threads)
    ours, served, added = [], [], []
    for r in range(reps):
        ours.append(cli(inp, os.path.join(work, f"cli{r}.jsonl"), cache, threads))
        wall, bid = through_server(server, inp, os.path.join(work, f"srv{r}"))
        served.append(wall)
        with open(os.path.join(work, "data", "batches", bid, "output.summary.json")) as f:
            added.append(wall - json.load(f)["wall_seconds"])
        print(f"  rep {r + 1}: command line {ours[-1]:.2f} s, server {served[-1]:.2f} s "
              f"(adds {added[-1]:.2f} s to its engine's run)", flush=True)
    return {"cli_s": ours, "server_s": served, "server_added_s": added,
            "cli_median_s": statistics.median(ours), "server_median_s": statistics.median(served),
            "added_median_s": statistics.median(added),
            "ratio": statistics.median(served) / statistics.median(ours)}


def get(url):
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def recovery(inp, threads, work):
    data, cache = os.path.join(work, "rdata"), os.path.join(work, "cache")
    p, base, _ = start_server(data, cache, threads)
    c = batch_api.client(base)
    bid = batch_api.submit(c, inp, ENDPOINT).id
    batch_api.poll(c, bid, lambda b: b.request_counts.completed >= 3)
    p.send_signal(signal.SIGKILL)
    p.wait()
    p, base, listening = start_server(data, cache, threads)
    t0 = time.perf_counter()
    first = get(f"{base}/v1/batches/{bid}")
    answered = listening + time.perf_counter() - t0
    before = first["request_counts"]["completed"]
    b = batch_api.poll(batch_api.client(base), bid, lambda b: b.request_counts.completed > before)
    next_line = listening + time.perf_counter() - t0
    b = batch_api.poll(batch_api.client(base), bid, lambda b: b.status in batch_api.TERMINAL)
    finished = listening + time.perf_counter() - t0
    p.send_signal(signal.SIGTERM)
    p.wait()
    return {"answers_after_s": answered, "next_request_done_after_s": next_line,
            "batch_finished_after_s": finished, "done_at_kill": before, "status": b.status}


def load(inp, small, threads, work, seconds):
    data, cache = os.path.join(work, "ldata"), os.path.join(work, "cache")
    p, base, _ = start_server(data, cache, threads)
    bid = batch_api.submit(batch_api.client(base), inp, ENDPOINT).id
    out = subprocess.run([sys.executable, batch_api.__file__, "load", base, bid, str(seconds), "32"],
                         check=True, capture_output=True, text=True,
                         env={**os.environ, "SMALL_INPUT": small})
    p.send_signal(signal.SIGTERM)
    p.wait()
    return json.loads(out.stdout)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--load-seconds", type=float, default=30)
    a = ap.parse_args()
    work = tempfile.mkdtemp(prefix="serve-bench-")
    inp = os.path.join(work, "ci.jsonl")
    with open(inp, "w") as f:
        subprocess.run([sys.executable, os.path.join(ROOT, "benches", "gen_workload.py"), "--preset", "ci"],
                       check=True, stdout=f)
    small = os.path.join(work, "one.jsonl")
    with open(inp) as f, open(small, "w") as g:
        g.write(f.readline())
    p, base, _ = start_server(os.path.join(work, "data"), os.path.join(work, "cache"), a.threads)
    print("overhead, 16 requests:", flush=True)
    results = {"threads": a.threads, "reps": a.reps}
    results["overhead"] = overhead(inp, a.reps, a.threads, work, base)
    print("start cost, 1 request:", flush=True)
    results["one_request"] = overhead(small, a.reps, a.threads, work, base)
    p.send_signal(signal.SIGTERM)
    p.wait()
    print("polling under load:", flush=True)
    results["load"] = load(inp, small, a.threads, work, a.load_seconds)
    print("recovery:", flush=True)
    results["recovery"] = recovery(inp, a.threads, work)
    os.makedirs(os.path.join(ROOT, "benches", "out"), exist_ok=True)
    with open(os.path.join(ROOT, "benches", "out", "serve.json"), "w") as f:
        json.dump(results, f, indent=2)
    o, s = results["overhead"], results["one_request"]
    print("| batch | command line (median, min-max) | server, upload to download (median, min-max) "
          "| ratio of medians | the server adds to its engine's run (median) |")
    print("|---|---|---|---|---|")
    for name, r in [("16 requests", o), ("1 request", s)]:
        print(f"| {name} | {r['cli_median_s']:.2f} s ({min(r['cli_s']):.2f}-{max(r['cli_s']):.2f}) "
              f"| {r['server_median_s']:.2f} s ({min(r['server_s']):.2f}-{max(r['server_s']):.2f}) "
              f"| {r['ratio']:.3f}x | {r['added_median_s']:.2f} s |")
    ld, rc = results["load"], results["recovery"]
    print(f"polling, 32 clients, {ld['polls']} polls: p50 {ld['p50_ms']:.2f} ms, p99 {ld['p99_ms']:.2f} ms")
    print(f"recovery: answers {rc['answers_after_s']:.2f} s after the restart, next request done "
          f"{rc['next_request_done_after_s']:.2f} s, batch finished {rc['batch_finished_after_s']:.2f} s "
          f"({rc['done_at_kill']} of 16 done at the kill)")


if __name__ == "__main__":
    main()
