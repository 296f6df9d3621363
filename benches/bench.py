#!/usr/bin/env python3
"""Regenerates benches/RESULTS.md and its plots (benches/plots/*.svg) from nothing, peers
included. One command:

    make bench            (= benches/bench.py)

It runs, in order, on this machine:
  1. set-up: the quick start's own scripts (build packages, default model), benches/peers.sh
     (llama-server, llama-bench and llama-cpp-python, built from source into benches/peers/),
     and a release build;
  2. the criterion micro-benches (`cargo bench --bench prefix --bench decode`);
  3. llama-bench on the same model and threads: llama.cpp's raw prefill and decode rates;
  4. the end-to-end comparison on generated workloads (benches/gen_workload.py): ours naive
     (--no-prefix-cache), prefix in memory, prefix restored from disk, at --parallel 1, 2, 4, 8,
     and llama-server at -np 1, 2, 4, 8, and llama-cpp-python sequentially; repetitions are
     interleaved so drift hits every configuration alike;
  5. the report, from the raw measurements in benches/out/results.json.

Options: --reps N (repetitions of the cheap configurations on the ci preset; naive runs once),
--threads N (default: the physical cores), --report-only (rewrite the report from results.json).
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
SERVER = os.path.join(PEERS, "build", "bin", "llama-server")
LLAMA_BENCH = os.path.join(PEERS, "build", "bin", "llama-bench")
PEER_PYTHON = os.path.join(PEERS, "venv", "bin", "python")
PARALLEL = [1, 2, 4, 8]

OURS = {
    "naive": ["--no-prefix-cache", "--no-disk-cache"],
    "memory": ["--no-disk-cache"],
    "disk": [],
}
# Workloads: name, gen_workload.py arguments, ours' configurations, peers or not.
WORKLOADS = [
    ("ci", ["--preset", "ci"], ["naive", "memory", "disk"], True),
    ("seed-shape-reduced", ["--preset", "seed-shape", "-n", "8", "-m", "64"], ["naive", "memory", "disk"], True),
]
SWEEP = [250, 500, 1000, 2000]
# --smoke: the same pipeline on tiny inputs, to check the script in minutes; its report is not
# one to keep.
SMOKE = [
    ("ci", ["--preset", "ci", "-n", "4", "-s", "300", "-m", "4"], ["naive", "memory", "disk"], True),
]


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
    out = os.path.join(work, f"{config}-p{parallel}.jsonl")
    args = [BIN, "--model", MODEL, workload, "-o", out, "--restart", "--parallel", str(parallel),
            "--threads", str(threads), "--prefix-cache-dir", os.path.join(work, "cache")] + OURS[config]
    proc = subprocess.Popen(args, env=dict(os.environ, INFER_BATCH_LOG="warn"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stderr = proc.stderr.read()
    _, status, rusage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        sys.exit(f"ours {config} p{parallel} failed ({code}):\n{stderr}")
    s = json.load(open(out.replace(".jsonl", ".summary.json")))
    results = [json.loads(l) for l in open(out)]
    usage = [r["response"]["body"]["usage"] for r in results]
    wall = s["wall_seconds"]
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
    }


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


def stream_chat(conn, body):
    """Sends one streamed chat completion; returns (seconds to first content, usage, timings)."""
    payload = {"messages": body["messages"], "max_tokens": body["max_tokens"], "temperature": 0,
               "stream": True, "stream_options": {"include_usage": True}, "cache_prompt": True}
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


def run_server(workload, n_parallel, threads, slot_ctx, work):
    port = free_port()
    logf = open(os.path.join(work, f"llama-server-np{n_parallel}.log"), "w")
    args = [SERVER, "-m", MODEL, "--host", "127.0.0.1", "--port", str(port), "-np", str(n_parallel),
            "-c", str(n_parallel * slot_ctx), "-t", str(threads), "-tb", str(threads)]
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
            time.sleep(0.2)
        ready_s = time.monotonic() - started
        requests = [json.loads(l) for l in open(workload) if l.strip()]
        todo = queue.Queue()
        for r in requests:
            todo.put(r)
        done, errors = [], []

        def client():
            while True:
                try:
                    r = todo.get_nowait()
                except queue.Empty:
                    return
                # A connection per request: llama-server closes it after a streamed answer.
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
                try:
                    done.append(stream_chat(conn, r["body"]))
                except Exception as e:  # one failure fails the run below
                    errors.append(repr(e))
                finally:
                    conn.close()

        t0 = time.monotonic()
        workers = [threading.Thread(target=client) for _ in range(n_parallel)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        wall = time.monotonic() - t0
        rss = vm_hwm_mib(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    if errors:
        sys.exit(f"llama-server np{n_parallel}: {errors[0]}")
    timings = [t for _, _, t in done if t]
    usage = [u for _, u, _ in done if u]
    prompt_ms = sum(t["prompt_ms"] for t in timings)
    predicted_ms = sum(t["predicted_ms"] for t in timings)
    computed = sum(t["prompt_n"] for t in timings)
    generated = sum(t["predicted_n"] for t in timings)
    return {
        "wall": wall,
        "req_s": len(done) / wall,
        "ready_s": ready_s,
        # Per-request times overlap when slots run together; these are per-slot rates.
        "prefill_tps": computed / (prompt_ms / 1e3) if prompt_ms else None,
        "decode_tps": generated / (predicted_ms / 1e3) if predicted_ms else None,
        "ttft_p50": median(f for f, _, _ in done),
        "peak_rss_mib": rss,
        "prompt_total": sum(u["prompt_tokens"] for u in usage) if len(usage) == len(done) else None,
        "prompt_computed": computed if len(timings) == len(done) else None,
        "completion": sum(u["completion_tokens"] for u in usage) if len(usage) == len(done) else None,
    }


# ---------------------------------------------------------------- llama-cpp-python


def run_python(workload, threads, slot_ctx, work):
    script = os.path.join(BENCHES, "peer_llama_cpp_python.py")
    logf = open(os.path.join(work, "llama-cpp-python.log"), "w")
    proc = subprocess.Popen([PEER_PYTHON, script, MODEL, workload, "--threads", str(threads),
                             "--ctx", str(slot_ctx)], stdout=subprocess.PIPE, stderr=logf, text=True)
    stdout = proc.stdout.read()
    _, status, rusage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        sys.exit(f"llama-cpp-python failed ({code}); see {logf.name}")
    r = json.loads(stdout.strip().splitlines()[-1])
    return {
        "wall": r["wall"],
        "req_s": r["requests"] / r["wall"],
        "prefill_tps": r["prompt_eval_tokens"] / (r["prompt_eval_ms"] / 1e3) if r["prompt_eval_ms"] else None,
        "decode_tps": r["eval_tokens"] / (r["eval_ms"] / 1e3) if r["eval_ms"] else None,
        "ttft_p50": median(r["ttft"]),
        "peak_rss_mib": rusage.ru_maxrss / 1024,
        "prompt_computed": r["prompt_eval_tokens"],
    }


# ---------------------------------------------------------------- runs


def end_to_end(name, gen_args, configs, peers, reps, threads):
    work = os.path.join(OUT, name)
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    workload = os.path.join(work, "input.jsonl")
    sh([sys.executable, os.path.join(BENCHES, "gen_workload.py"), *gen_args, "-o", workload])
    samples = {}

    def add(key, r):
        samples.setdefault(key, []).append(r)
        log(f"{name} {key}: {r['req_s']:.3f} req/s")

    # The naive run first: its usage gives the exact context each request needs.
    for p in PARALLEL:
        add(f"naive/{p}", run_ours(workload, "naive", p, threads, work))
    need = max(json.loads(l)["response"]["body"]["usage"]["total_tokens"]
               for l in open(os.path.join(work, "naive-p1.jsonl")))
    slot_ctx = 256 * math.ceil((need + 16) / 256)
    # Write the prefix state once, so "disk" restores it in every repetition.
    run_ours(workload, "disk", 1, threads, work)
    for rep in range(reps):
        for p in PARALLEL:
            for c in configs:
                if c != "naive":
                    add(f"{c}/{p}", run_ours(workload, c, p, threads, work))
            if peers:
                add(f"llama-server/{p}", run_server(workload, p, threads, slot_ctx, work))
        if peers and os.path.exists(PEER_PYTHON):
            add("llama-cpp-python/1", run_python(workload, threads, slot_ctx, work))
    for key, rs in samples.items():
        if key.startswith("disk/"):
            assert all(r["prefix_restored"] > 0 for r in rs), "a disk run did not restore its prefix"
    lines = [json.loads(l) for l in open(workload)]
    return {
        "gen_args": gen_args,
        "requests": len(lines),
        "max_tokens": lines[0]["body"]["max_tokens"],
        "slot_ctx": slot_ctx,
        "reps": reps,
        "samples": samples,
    }


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
        memory = run_ours(workload, "memory", 4, threads, work)
        log(f"sweep {s}: naive {naive['req_s']:.3f}, memory {memory['req_s']:.3f} req/s")
        points.append({"system_tokens": s, "naive": naive, "memory": memory})
    return points


def criterion(threads, run=True):
    if run:
        env = dict(os.environ, INFER_BATCH_BENCH_THREADS=str(threads))
        sh(["cargo", "bench", "--bench", "prefix", "--bench", "decode"], env=env)
    base = os.path.join(ROOT, "target", "criterion")

    def est(*parts):
        path = os.path.join(base, *parts, "new", "estimates.json")
        if not os.path.exists(path):  # only with --skip-criterion
            return None
        e = json.load(open(path))
        return {"median_s": e["median"]["point_estimate"] / 1e9,
                "lo_s": e["median"]["confidence_interval"]["lower_bound"] / 1e9,
                "hi_s": e["median"]["confidence_interval"]["upper_bound"] / 1e9}

    prefix = {kind: {str(n): est("prefix", kind, str(n)) for n in (500, 1000, 2000)}
              for kind in ("cold_prefill", "restore_file", "fork_in_memory")}
    decode = {str(p): est("decode", "parallel", str(p)) for p in PARALLEL}
    return {"prefix": prefix, "decode": decode}


def llama_bench(threads):
    out = subprocess.run([LLAMA_BENCH, "-m", MODEL, "-t", str(threads), "-p", "512", "-n", "64",
                          "-d", "0,1000", "-fa", "0,1", "-r", "3", "-o", "json"],
                         cwd=ROOT, check=True, capture_output=True, text=True).stdout
    rows = json.loads(out)
    return [{"test": ("pp" if r["n_prompt"] else "tg") + str(r["n_prompt"] or r["n_gen"]),
             "depth": r.get("n_depth", 0), "flash_attn": bool(r.get("flash_attn")),
             "tokens_per_s": r["avg_ts"], "stddev": r["stddev_ts"]} for r in rows]


def versions():
    ours = subprocess.run([BIN, "--version"], capture_output=True, text=True).stdout.strip()
    ours = ours.removeprefix("infer-batch ")
    server = subprocess.run([SERVER, "--version"], capture_output=True, text=True)
    commit = next((l.split("commit")[1].strip(" )") for l in (server.stdout + server.stderr).splitlines()
                   if "commit" in l), "?")
    return {"ours": ours, "peers": f"llama-cpp-python 0.3.36 sdist, vendored llama.cpp commit {commit}"}


def measure(a):
    threads = a.threads or physical_cores()
    sh(["./scripts/deps.sh"])
    sh(["./models/fetch.sh"])
    sh([os.path.join(BENCHES, "peers.sh")])
    sh(["cargo", "build", "--release", "--benches"])
    os.makedirs(OUT, exist_ok=True)
    results = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "threads": threads,
        "versions": versions(),
        "command": "make bench",
    }
    results["criterion"] = criterion(threads, run=not a.skip_criterion)
    results["llama_bench"] = llama_bench(threads)
    results["workloads"] = {}
    for name, gen_args, configs, peers in (SMOKE if a.smoke else WORKLOADS):
        reps = a.reps if name == "ci" else 1
        results["workloads"][name] = end_to_end(name, gen_args, configs, peers, reps, threads)
        json.dump(results, open(RESULTS, "w"), indent=1)
    results["sweep"] = prefix_sweep(threads, [200, 400] if a.smoke else SWEEP, ["-n", "2", "-m", "4"] if a.smoke else [])
    json.dump(results, open(RESULTS, "w"), indent=1)
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--skip-criterion", action="store_true",
                    help="reuse the criterion results already under target/criterion")
    ap.add_argument("--smoke", action="store_true", help="tiny inputs; the report goes to benches/out/smoke/")
    a = ap.parse_args()
    if a.smoke:
        global RESULTS, REPORT, PLOTS
        RESULTS = os.path.join(OUT, "smoke", "results.json")
        REPORT = os.path.join(OUT, "smoke", "RESULTS.md")
        PLOTS = os.path.join(OUT, "smoke", "plots")
        os.makedirs(PLOTS, exist_ok=True)
    results = json.load(open(RESULTS)) if a.report_only else measure(a)
    import report  # benches/report.py: tables and SVG plots from the measurements
    report.write(results, REPORT, PLOTS)
    log(f"wrote {os.path.relpath(REPORT, ROOT)} and {os.path.relpath(PLOTS, ROOT)}/")


if __name__ == "__main__":
    main()
