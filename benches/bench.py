#!/usr/bin/env python3
"""Regenerates benches/RESULTS.md and its plots (benches/plots/*.svg) from nothing, peers
included. One command:

    make bench            (= benches/bench.py)

It runs, in order, on this machine:
  1. set-up: the quick start's own scripts (build packages, default model), benches/peers.sh
     (llama-server, llama-bench and llama-batched-bench, built into benches/peers/ from the
     llama.cpp sources our crate compiles), and a release build;
  2. the ceilings: llama-bench at the workloads' chunk sizes and depths, llama-batched-bench at
     our decode batch sizes, and our criterion decode bench at the same shape;
  3. the end-to-end comparison on generated workloads (benches/gen_workload.py), every
     configuration in every repetition, interleaved, so that drift hits all alike:
       - cold: each engine's first run in a fresh process, nothing precomputed, clocked from
         process start to the last answer (model load included, for every engine);
       - warm: ours restoring the prefix from a state file that `infer-batch cache warm` wrote,
         clocked from process start; llama-server after one warm-up request per slot (the rubric
         and a throw-away user message), clocked from the first request;
       - naive: ours re-prefilling every prompt, on the first requests of the same batch;
     then llama-server at `-np 4` once, to show whether more slots help it;
  4. the criterion prefix bench, and the report from benches/out/results.json.

results.json is rewritten after every run, so an interrupted bench still reports what it
measured (`--report-only`), or goes on where it stopped (`--continue`). Options: --reps N
(default 3), --threads N (default: the physical cores), --smoke (tiny inputs, report under
benches/out/smoke/), --sweep (speedup against prefix length, about 6 more minutes),
--skip-criterion.
"""
import argparse
import datetime
import http.client
import json
import math
import os
import platform
import queue
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHES = os.path.join(ROOT, "benches")
OUT = os.path.join(BENCHES, "out")
PLOTS = os.path.join(BENCHES, "plots")
RESULTS = os.path.join(OUT, "results.json")
REPORT = os.path.join(BENCHES, "RESULTS.md")
BIN = os.path.join(ROOT, "target", "release", "infer-batch")
MODEL = os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")
PEERS = os.path.join(BENCHES, "peers")
SERVER = os.path.join(PEERS, "current", "bin", "llama-server")
LLAMA_BENCH = os.path.join(PEERS, "current", "bin", "llama-bench")
BATCHED_BENCH = os.path.join(PEERS, "current", "bin", "llama-batched-bench")

# Ours, by configuration: extra flags.
OURS = {
    "naive": ["--no-prefix-cache", "--no-disk-cache"],
    "cold": ["--no-disk-cache"],
    "warm": [],
    "fast": ["--no-disk-cache", "--no-deterministic"],
}
# A workload: gen_workload.py arguments; how many of its first requests the naive runs take (they
# are independent of each other, so their rate holds for the whole batch); the configurations run
# in every repetition, headline pairs first; and those run once, after the last repetition.
WORKLOADS = {
    "seed-shape": {
        "gen": ["--preset", "seed-shape", "-n", "24"],
        "naive_sample": 4,
        "every_rep": ["ours-cold/8", "server-cold/1", "ours-warm/8", "server-warm/1", "naive/1"],
        "once": ["server-cold/4"],
    },
    "ci": {
        "gen": ["--preset", "ci", "-n", "128"],
        "naive_sample": 16,
        "every_rep": ["ours-cold/8", "server-cold/1", "naive/1"],
        "once": [],
    },
}
SMOKE = {
    "ci": {
        "gen": ["--preset", "ci", "-n", "6", "-s", "300", "-m", "4"],
        "naive_sample": 2,
        "every_rep": ["ours-cold/4", "server-cold/1", "ours-warm/4", "server-warm/1", "naive/1"],
        "once": ["server-cold/2", "ours-fast/4"],
    },
}
# The ceilings: llama-bench at the workloads' chunk sizes and depths (the ci prefix is ~1,100
# tokens, the seed's ~2,800), and llama-batched-bench at the criterion decode bench's shape.
CEILING_PROMPTS = "128,512"
CEILING_DEPTHS = "1000,2800"
DECODE_DEPTH = 1000
DECODE_STEPS = 32
DECODE_BATCHES = [1, 2, 4, 8]
SWEEP = [250, 500, 1000, 2000]


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sh(cmd, **kw):
    log("$ " + " ".join(cmd))
    subprocess.run(cmd, cwd=ROOT, check=True, **kw)


def physical_cores():
    cores = set()
    phys = core = None
    for line in open("/proc/cpuinfo"):
        key, _, val = line.partition(":")
        key = key.strip()
        if key == "physical id":
            phys = val.strip()
        elif key == "core id":
            core = val.strip()
            cores.add((phys, core))
    return len(cores) or os.cpu_count()


def machine():
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    mem = next(int(l.split()[1]) for l in open("/proc/meminfo") if l.startswith("MemTotal"))
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "physical_cores": physical_cores(),
            "memory_gib": round(mem / 2**20, 1), "kernel": platform.release()}


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


# ---------------------------------------------------------------- ours


def run_ours(workload, config, parallel, threads, work):
    """One run of ours in a fresh process, clocked from its start to its exit."""
    out = os.path.join(work, f"{config}-p{parallel}.jsonl")
    args = [BIN, "--model", MODEL, workload, "-o", out, "--restart", "--parallel", str(parallel),
            "--threads", str(threads), "--prefix-cache-dir", os.path.join(work, "cache")] + OURS[config]
    started = time.monotonic()
    proc = subprocess.Popen(args, env=dict(os.environ, INFER_BATCH_LOG="warn"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stderr = proc.stderr.read()
    _, status, rusage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - started
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        sys.exit(f"ours {config} p{parallel} failed ({code}):\n{stderr}")
    s = json.load(open(out.replace(".jsonl", ".summary.json")))
    results = [json.loads(l) for l in open(out)]
    usage = [r["response"]["body"]["usage"] for r in results]
    return {
        "wall": wall,
        "req_s": len(results) / wall,
        "prefill_tps": s["rates"]["prefill_tokens_per_second"],
        "decode_tps": s["rates"]["decode_tokens_per_second"],
        "ttft_p50": s["time_to_first_token_seconds"]["p50"],
        "peak_rss_mib": rusage.ru_maxrss / 1024,
        "prompt_total": sum(u["prompt_tokens"] for u in usage),
        "prompt_computed": s["tokens"]["prompt_computed"],
        "prefix_tokens": max((p["tokens"] for p in s["prefixes"]), default=0),
        "prefix_restored": s["tokens"]["prefix_restored"],
        "completion": sum(u["completion_tokens"] for u in usage),
        "prefill_s": s["seconds"]["prefill"],
        "decode_s": s["seconds"]["decode"],
        "restore_s": s["seconds"]["prefix_restore"],
        "in_process_wall": s["wall_seconds"],
    }


def warm_ours(workload, threads, cache):
    """Writes the prefix state that the warm runs restore, outside any clock; returns what
    `cache warm` measured: {"tokens", "ms"} of the prefix it prefilled."""
    args = [BIN, "cache", "warm", "--model", MODEL, workload, "--threads", str(threads),
            "--prefix-cache-dir", cache]
    log("$ " + " ".join(args))
    out = subprocess.run(args, cwd=ROOT, check=True, capture_output=True, text=True)
    # "prefix KEY: prefilled N tokens in M ms, state file B bytes"
    words = (out.stdout + out.stderr).split()
    i = words.index("prefilled")
    return {"tokens": int(words[i + 1]), "ms": float(words[i + 4])}


# ---------------------------------------------------------------- llama-server


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vm_hwm_mib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return None


def stream_chat(port, body):
    """Sends one streamed chat completion on its own connection (llama-server closes it after a
    streamed answer); returns (seconds to first content, usage, timings)."""
    payload = {"messages": body["messages"], "max_tokens": body["max_tokens"], "temperature": 0,
               "stream": True, "stream_options": {"include_usage": True}, "cache_prompt": True}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1800)
    try:
        sent = time.monotonic()
        conn.request("POST", "/v1/chat/completions", json.dumps(payload), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"llama-server answered {resp.status}: {resp.read()[:300]!r}")
        first, usage, timings = None, None, None
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if first is None and any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                first = time.monotonic() - sent
            usage = chunk.get("usage") or usage
            timings = chunk.get("timings") or timings
        return first, usage, timings
    finally:
        conn.close()


def send_all(port, bodies, clients):
    """Sends `bodies` from `clients` concurrent clients; returns the answers, or exits on an error."""
    todo = queue.Queue()
    for b in bodies:
        todo.put(b)
    done, errors = [], []

    def client():
        while True:
            try:
                body = todo.get_nowait()
            except queue.Empty:
                return
            try:
                done.append(stream_chat(port, body))
            except Exception as e:  # one failure fails the run
                errors.append(repr(e))

    workers = [threading.Thread(target=client) for _ in range(clients)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    if errors:
        sys.exit(f"llama-server: {errors[0]}")
    return done


def run_server(workload, config, n_parallel, threads, slot_ctx, work):
    """One llama-server process at `-np n_parallel`, fed by as many concurrent clients.

    cold: clocked from process start (model load included) to the last answer.
    warm: one warm-up request per slot first (the shared system prompt and a throw-away user
    message, concurrently, so every slot holds the prefix), then clocked from the first request."""
    port = free_port()
    logf = open(os.path.join(work, f"llama-server-{config}-np{n_parallel}.log"), "w")
    args = [SERVER, "-m", MODEL, "--host", "127.0.0.1", "--port", str(port), "-np", str(n_parallel),
            "-c", str(n_parallel * slot_ctx), "-t", str(threads), "-tb", str(threads)]
    requests = [json.loads(l) for l in open(workload) if l.strip()]
    started = time.monotonic()
    proc = subprocess.Popen(args, stdout=logf, stderr=subprocess.STDOUT)
    try:
        while True:
            if proc.poll() is not None:
                sys.exit(f"llama-server exited ({proc.returncode}); see {logf.name}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() - started > 180:
                sys.exit("llama-server did not become ready in 180 s")
            time.sleep(0.05)
        if config == "warm":
            system = requests[0]["body"]["messages"][0]
            warmup = [{"messages": [system, {"role": "user", "content": f"Warm-up {i}: no candidate."}],
                       "max_tokens": 1} for i in range(n_parallel)]
            send_all(port, warmup, n_parallel)
            started = time.monotonic()
        done = send_all(port, [r["body"] for r in requests], n_parallel)
        wall = time.monotonic() - started
        rss = vm_hwm_mib(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    timings = [t for _, _, t in done if t]
    usage = [u for _, u, _ in done if u]
    prompt_ms = sum(t["prompt_ms"] for t in timings)
    predicted_ms = sum(t["predicted_ms"] for t in timings)
    computed = sum(t["prompt_n"] for t in timings)
    generated = sum(t["predicted_n"] for t in timings)
    return {
        "wall": wall,
        "req_s": len(done) / wall,
        # Per-request times overlap when slots run together; these are per-slot rates.
        "prefill_tps": computed / (prompt_ms / 1e3) if prompt_ms else None,
        "decode_tps": generated / (predicted_ms / 1e3) if predicted_ms else None,
        "ttft_p50": median(f for f, _, _ in done),
        "peak_rss_mib": rss,
        "prompt_total": sum(u["prompt_tokens"] for u in usage) if len(usage) == len(done) else None,
        "prompt_computed": computed if len(timings) == len(done) else None,
        "completion": sum(u["completion_tokens"] for u in usage) if len(usage) == len(done) else None,
    }


# ---------------------------------------------------------------- runs


class Workload:
    """A generated batch, its naive sample, and the samples measured on it."""

    def __init__(self, name, spec, threads, earlier=None):
        """A fresh workload, or with `earlier` (its record in results.json) the one an earlier
        invocation generated, measured and left in place, to be continued."""
        self.name, self.spec, self.threads = name, spec, threads
        self.work = os.path.join(OUT, name)
        self.input = os.path.join(self.work, "input.jsonl")
        self.naive_input = os.path.join(self.work, "naive-input.jsonl")
        if earlier is None:
            shutil.rmtree(self.work, ignore_errors=True)
            os.makedirs(self.work)
            sh([sys.executable, os.path.join(BENCHES, "gen_workload.py"), *spec["gen"], "-o", self.input])
            with open(self.naive_input, "w") as f:
                f.writelines(open(self.input).readlines()[: spec["naive_sample"]])
            # The state the warm runs restore, written outside every clock.
            self.prefix_prefill = warm_ours(self.input, threads, os.path.join(self.work, "cache"))
        elif "prefix_prefill" in earlier:
            self.prefix_prefill = earlier["prefix_prefill"]
        else:
            # An earlier bench that did not record it: prefill the prefix again, into a fresh
            # directory, so that it is computed rather than restored.
            scratch = os.path.join(self.work, "cache-prefill")
            shutil.rmtree(scratch, ignore_errors=True)
            self.prefix_prefill = warm_ours(self.input, threads, scratch)
        lines = open(self.input).readlines()
        self.requests = len(lines)
        self.max_tokens = json.loads(lines[0])["body"]["max_tokens"]
        self.slot_ctx = earlier["slot_ctx"] if earlier else None
        self.samples = earlier["samples"] if earlier else {}

    def run(self, key):
        engine_config, p = key.split("/")
        p = int(p)
        engine, _, config = engine_config.partition("-")
        if engine == "naive":
            r = run_ours(self.naive_input, "naive", p, self.threads, self.work)
        elif engine == "ours":
            r = run_ours(self.input, config, p, self.threads, self.work)
            if config == "warm" and not r["prefix_restored"]:
                sys.exit(f"{self.name} {key}: the warm run did not restore its prefix")
            if self.slot_ctx is None:
                # The context each request needs, from its measured usage, for llama-server's slots.
                need = max(json.loads(l)["response"]["body"]["usage"]["total_tokens"]
                           for l in open(os.path.join(self.work, f"{config}-p{p}.jsonl")))
                self.slot_ctx = 256 * math.ceil((need + 64) / 256)
        else:
            if self.slot_ctx is None:
                sys.exit(f"{self.name}: the first configuration must be one of ours, to size llama-server")
            r = run_server(self.input, config, p, self.threads, self.slot_ctx, self.work)
        self.samples.setdefault(key, []).append(r)
        log(f"{self.name} {key}: {r['req_s']:.3f} req/s ({r['wall']:.1f} s)")

    def record(self):
        return {"gen_args": self.spec["gen"], "requests": self.requests, "naive_sample": self.spec["naive_sample"],
                "prefix_prefill": self.prefix_prefill,
                "max_tokens": self.max_tokens, "slot_ctx": self.slot_ctx, "samples": self.samples}


def end_to_end(results, specs, reps, threads, earlier=None):
    """Every configuration of every workload in every repetition, interleaved, then those run
    once; results.json is rewritten after each run. With `earlier` (results.json's workloads),
    only the samples still missing are measured."""
    workloads = [Workload(name, spec, threads, earlier and earlier.get(name)) for name, spec in specs.items()]
    rounds = [(rep, "every_rep") for rep in range(reps)] + [(0, "once")]
    for rep, kind in rounds:
        for w in workloads:
            for key in w.spec[kind]:
                if len(w.samples.get(key, [])) > rep:
                    continue
                w.run(key)
                results["workloads"][w.name] = w.record()
                save(results)


def prefix_sweep(threads, sizes, extra):
    """Speedup against prefix length: naive against prefix in memory, at the default --parallel."""
    points = []
    for s in sizes:
        work = os.path.join(OUT, f"sweep-{s}")
        shutil.rmtree(work, ignore_errors=True)
        os.makedirs(work)
        workload = os.path.join(work, "input.jsonl")
        sh([sys.executable, os.path.join(BENCHES, "gen_workload.py"), "--preset", "ci", "-n", "8",
            "-s", str(s), "-o", workload, *extra])
        naive = run_ours(workload, "naive", 4, threads, work)
        memory = run_ours(workload, "cold", 4, threads, work)
        log(f"sweep {s}: naive {naive['req_s']:.3f}, memory {memory['req_s']:.3f} req/s")
        points.append({"system_tokens": s, "naive": naive, "memory": memory})
    return points


def criterion(threads, benches):
    env = dict(os.environ, INFER_BATCH_BENCH_THREADS=str(threads))
    args = ["cargo", "bench"]
    for b in benches:
        args += ["--bench", b]
    sh(args, env=env)


def criterion_results(since):
    """Criterion's estimates, those written after `since` (epoch seconds) only: an older run's
    may come from another build or machine."""
    base = os.path.join(ROOT, "target", "criterion")

    def est(*parts):
        path = os.path.join(base, *parts, "new", "estimates.json")
        if not os.path.exists(path) or os.path.getmtime(path) < since:
            return None
        e = json.load(open(path))
        return {"median_s": e["median"]["point_estimate"] / 1e9,
                "lo_s": e["median"]["confidence_interval"]["lower_bound"] / 1e9,
                "hi_s": e["median"]["confidence_interval"]["upper_bound"] / 1e9}

    prefix = {kind: {str(n): est("prefix", kind, str(n)) for n in (500, 1000, 2000)}
              for kind in ("cold_prefill", "restore_file", "fork_in_memory")}
    decode = {str(p): est("decode", "parallel", str(p)) for p in DECODE_BATCHES}
    return {"prefix": prefix, "decode": decode}


def llama_bench(threads, smoke):
    """llama.cpp's raw prefill and decode rates at the workloads' chunk sizes and depths."""
    args = [LLAMA_BENCH, "-m", MODEL, "-t", str(threads), "-p", CEILING_PROMPTS, "-n", str(DECODE_STEPS),
            "-d", "0,300" if smoke else CEILING_DEPTHS, "-fa", "0,1", "-r", "1" if smoke else "2", "-o", "json"]
    log("$ " + " ".join(args))
    rows = json.loads(subprocess.run(args, cwd=ROOT, check=True, capture_output=True, text=True).stdout)
    return [{"test": ("pp" if r["n_prompt"] else "tg") + str(r["n_prompt"] or r["n_gen"]),
             "depth": r.get("n_depth", 0), "flash_attn": bool(r.get("flash_attn")),
             "tokens_per_s": r["avg_ts"], "stddev": r["stddev_ts"]} for r in rows]


def batched_bench(threads, smoke):
    """llama.cpp's own batched decode, the shape of our criterion decode bench: a shared prefix
    of DECODE_DEPTH tokens, then DECODE_STEPS steps of B sequences, a KV stream per sequence,
    flash attention off."""
    depth = 300 if smoke else DECODE_DEPTH
    ctx = depth + DECODE_STEPS * max(DECODE_BATCHES) + 64
    args = [BATCHED_BENCH, "-m", MODEL, "-t", str(threads), "-tb", str(threads), "-c", str(ctx * max(DECODE_BATCHES)),
            "-npp", str(depth), "-ntg", str(DECODE_STEPS), "-npl", ",".join(map(str, DECODE_BATCHES)), "-pps",
            "-fa", "off", "--output-format", "jsonl"]
    log("$ " + " ".join(args))
    out = subprocess.run(args, cwd=ROOT, check=True, capture_output=True, text=True)
    rows = [json.loads(l) for l in (out.stdout + out.stderr).splitlines() if l.startswith("{")]
    return [{"batch": r["pl"], "depth": r["pp"], "steps": r["tg"], "decode_tps": r["speed_tg"],
             "prefill_tps": r["speed_pp"]} for r in rows]


def versions():
    ours = subprocess.run([BIN, "--version"], capture_output=True, text=True).stdout.strip()
    ours = ours.splitlines()[0].removeprefix("infer-batch ")
    peers = open(os.path.join(PEERS, "current", "PEERS.txt")).read().strip()
    return {"ours": ours, "peers": peers}


def save(results):
    tmp = RESULTS + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1)
    os.replace(tmp, RESULTS)


def continue_measuring(a):
    """Measures what an interrupted or shorter bench left missing, on the same workloads."""
    results = json.load(open(RESULTS))
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    results["command"] += f"; continued at {stamp} by `benches/bench.py --continue`"
    end_to_end(results, SMOKE if a.smoke else WORKLOADS, a.reps, results["threads"], results["workloads"])
    save(results)
    return results


def measure(a):
    threads = a.threads or physical_cores()
    sh(["./scripts/deps.sh"])
    sh(["./models/fetch.sh", "smollm2"])
    sh([os.path.join(BENCHES, "peers.sh")])
    sh(["cargo", "build", "--release", "--benches"])
    os.makedirs(OUT, exist_ok=True)
    started = time.time()
    results = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "threads": threads,
        "versions": versions(),
        "command": "`make bench`" + (f" (`benches/bench.py {' '.join(sys.argv[1:])}`)" if sys.argv[1:] else ""),
        "workloads": {},
    }
    results["llama_bench"] = llama_bench(threads, a.smoke)
    results["batched_bench"] = batched_bench(threads, a.smoke)
    save(results)
    if not a.skip_criterion:
        criterion(threads, ["decode"])
    results["criterion"] = criterion_results(0 if a.skip_criterion else started)
    save(results)
    end_to_end(results, SMOKE if a.smoke else WORKLOADS, a.reps, threads)
    if a.sweep:
        results["sweep"] = prefix_sweep(threads, [200, 400] if a.smoke else SWEEP,
                                         ["-n", "2", "-m", "4"] if a.smoke else [])
        save(results)
    if not a.skip_criterion:
        criterion(threads, ["prefix"])
    results["criterion"] = criterion_results(0 if a.skip_criterion else started)
    save(results)
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--continue", dest="continue_", action="store_true",
                    help="measure only the samples results.json still lacks, on the same workloads")
    ap.add_argument("--skip-criterion", action="store_true",
                    help="reuse the criterion results already under target/criterion")
    ap.add_argument("--sweep", action="store_true", help="also measure speedup against prefix length")
    ap.add_argument("--smoke", action="store_true", help="tiny inputs; the report goes to benches/out/smoke/")
    a = ap.parse_args()
    global OUT, RESULTS, REPORT, PLOTS
    if a.smoke:
        OUT = os.path.join(OUT, "smoke")
        RESULTS = os.path.join(OUT, "results.json")
        REPORT = os.path.join(OUT, "RESULTS.md")
        PLOTS = os.path.join(OUT, "plots")
        os.makedirs(PLOTS, exist_ok=True)
    if a.report_only:
        results = json.load(open(RESULTS))
    elif a.continue_:
        results = continue_measuring(a)
    else:
        results = measure(a)
    import report  # benches/report.py: tables and SVG plots from the measurements
    report.write(results, REPORT, PLOTS)
    log(f"wrote {os.path.relpath(REPORT, ROOT)} and {os.path.relpath(PLOTS, ROOT)}/")


if __name__ == "__main__":
    main()
