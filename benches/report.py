"""Writes benches/RESULTS.md and its SVG plots from the measurements bench.py collected.

Every figure here is a median of measured runs or a number derived from them, and the derived
ones say how they were derived. Ratios compare medians from the same run of bench.py.
"""
import math
import os
import statistics

COLORS = {
    "ours": "#1f77b4",
    "llama.cpp": "#d62728",
    "cold_prefill": "#7f7f7f",
    "restore_file": "#2ca02c",
    "fork_in_memory": "#1f77b4",
}
LABELS = {
    "ours-cold": "ours, prefix computed in the run",
    "ours-fast": "ours, `--no-deterministic`, prefix computed in the run",
    "ours-warm": "ours, prefix restored from disk",
    "server-cold": "llama-server, started fresh",
    "server-warm": "llama-server, after a warm-up request per slot",
    "naive": "ours, naive re-prefill (`--no-prefix-cache`)",
}
COLD = ["ours-cold", "ours-fast", "server-cold", "naive"]
WARM = ["ours-warm", "server-warm"]
# The targets: (workload, ours, peers, at least).
TARGETS = [
    ("seed-shape", "cold", "ours-cold", "server-cold", 1.3),
    ("seed-shape", "warm", "ours-warm", "server-warm", 1.5),
    ("ci", "cold", "ours-cold", "server-cold", 1.1),
]
DECODE_TARGET = 0.9


# ---------------------------------------------------------------- numbers


def med(samples, key):
    xs = [s[key] for s in samples if s.get(key) is not None]
    return statistics.median(xs) if xs else None


def runs(n):
    return f"{n} run" + ("" if n == 1 else "s")


def fmt(x, digits=2, suffix=""):
    if x is None:
        return "–"
    return f"{x:.{digits}f}{suffix}"


def rows(w, config):
    """[(parallel, samples)] of one configuration, by --parallel."""
    found = [(int(k.split("/")[1]), v) for k, v in w["samples"].items() if k.split("/")[0] == config]
    return sorted(found)


def best(w, config):
    """(parallel, median req/s, runs) of a configuration's fastest --parallel, or None."""
    cands = [(p, med(s, "req_s"), len(s)) for p, s in rows(w, config)]
    return max(cands, key=lambda t: t[1]) if cands else None


def ideal_speedup(naive_wall, naive_computed, naive_prefill_tps, computed):
    """Speedup over naive if skipping prefix tokens were free: the naive run's wall clock less
    the time its own measured prefill rate says the skipped tokens took."""
    rest = naive_wall - (naive_computed - computed) / naive_prefill_tps
    return naive_wall / rest if rest > 0 else None


def ceiling(results, test, depth, flash_attn=False):
    for r in results.get("llama_bench", []):
        if r["test"] == test and r["depth"] == depth and r["flash_attn"] == flash_attn:
            return r["tokens_per_s"]
    return None


def decode_pairs(results):
    """[(batch, ours aggregate tok/s, llama-batched-bench tok/s)] at the same shape."""
    cr = results.get("criterion", {}).get("decode", {})
    bb = {r["batch"]: r for r in results.get("batched_bench", [])}
    out = []
    for b in sorted(bb):
        e = cr.get(str(b))
        ours = b * bb[b]["steps"] / e["median_s"] if e else None
        out.append((b, ours, bb[b]["decode_tps"]))
    return out


# ---------------------------------------------------------------- SVG


def nice_step(span, target=5):
    raw = span / target
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if m * mag >= raw:
            return m * mag
    return 10 * mag


def tick_label(v):
    if v >= 1000 and v == int(v):
        return f"{int(v):,}"
    if v == int(v):
        return str(int(v))
    return f"{v:g}"


def chart(path, title, xlabel, ylabel, series, xticks, xlog=False, ylog=False):
    """A line chart: series is [(key, label, [(x, y)], dashed)]."""
    W, H, L, R, T, B = 720, 420, 72, 230, 44, 56
    pw, ph = W - L - R, H - T - B
    xs = [x for _, _, pts, _ in series for x, _ in pts] + list(xticks)
    ys = [y for _, _, pts, _ in series for _, y in pts if y]
    fx = (lambda v: math.log(v)) if xlog else (lambda v: v)
    x0, x1 = fx(min(xs)), fx(max(xs))
    if ylog:
        lo, hi = 10 ** math.floor(math.log10(min(ys))), 10 ** math.ceil(math.log10(max(ys)))
        fy = lambda v: math.log10(v)
        y0, y1 = fy(lo), fy(hi)
        yticks = [lo * 10 ** i for i in range(int(round(y1 - y0)) + 1)]
    else:
        step = nice_step(max(ys) * 1.1)
        top = step * math.ceil(max(ys) * 1.1 / step)
        fy = lambda v: v
        y0, y1 = 0.0, top
        yticks = [i * step for i in range(int(round(top / step)) + 1)]
    px = lambda v: L + (fx(v) - x0) / ((x1 - x0) or 1) * pw
    py = lambda v: T + ph - (fy(v) - y0) / ((y1 - y0) or 1) * ph
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
           f'font-family="sans-serif" font-size="12">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{L}" y="24" font-size="15" font-weight="bold">{title}</text>']
    for v in yticks:
        y = py(v)
        out.append(f'<line x1="{L}" x2="{L + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e5e5e5"/>')
        out.append(f'<text x="{L - 6}" y="{y + 4:.1f}" text-anchor="end">{tick_label(v)}</text>')
    for v in xticks:
        x = px(v)
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{T}" y2="{T + ph}" stroke="#f0f0f0"/>')
        out.append(f'<text x="{x:.1f}" y="{T + ph + 18}" text-anchor="middle">{tick_label(v)}</text>')
    out.append(f'<rect x="{L}" y="{T}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>')
    out.append(f'<text x="{L + pw / 2}" y="{H - 12}" text-anchor="middle">{xlabel}</text>')
    out.append(f'<text transform="translate(18 {T + ph / 2}) rotate(-90)" text-anchor="middle">{ylabel}</text>')
    for i, (key, label, pts, dashed) in enumerate(series):
        color = COLORS.get(key, "#000")
        pts = [(x, y) for x, y in pts if y]
        if len(pts) > 1:
            d = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
            dash = ' stroke-dasharray="6 4"' if dashed else ""
            out.append(f'<polyline points="{d}" fill="none" stroke="{color}" stroke-width="2.2"{dash}/>')
        for x, y in pts:
            out.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="4" fill="{color}"/>')
        ly = T + 14 + i * 20
        dash = ' stroke-dasharray="6 4"' if dashed else ""
        out.append(f'<line x1="{L + pw + 14}" x2="{L + pw + 38}" y1="{ly - 4}" y2="{ly - 4}" stroke="{color}" '
                   f'stroke-width="2.2"{dash}/>')
        out.append(f'<text x="{L + pw + 44}" y="{ly}">{label}</text>')
    out.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")


# ---------------------------------------------------------------- report


def shape_line(name, w):
    s = next((s[0] for k, s in w["samples"].items() if k.startswith("ours-cold/")), None)
    if s is None:
        return f"{w['requests']} requests."
    n = w["requests"]
    return (f"{n} requests: a shared system prompt of {s['prefix_tokens']} tokens, user messages of about "
            f"{s['prompt_total'] / n - s['prefix_tokens']:.0f} tokens ({s['prompt_total'] / n:.0f}-token prompts), "
            f"max_tokens {w['max_tokens']}, greedy; {s['completion']:,} completion tokens in all "
            f"({s['completion'] / n:.0f} a request). Generated by `benches/gen_workload.py {' '.join(w['gen_args'])}`.")


def table(w, configs, peer):
    """Rows for `configs`, with req/s against the best median of `peer`."""
    ref = best(w, peer)
    out = ["| configuration | --parallel / -np | runs | req/s (min–max) | vs best llama-server | prefill tok/s | "
           "decode tok/s | TTFT p50 s | peak RSS MiB | prompt tokens computed |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for c in configs:
        for p, s in rows(w, c):
            rps = med(s, "req_s")
            lo, hi = min(x["req_s"] for x in s), max(x["req_s"] for x in s)
            vs = rps / ref[1] if ref and not c.startswith("server") else None
            # llama-server's per-request timings overlap when slots run together; they are
            # per-slot rates, shown with one slot only.
            overlap = c.startswith("server") and p > 1
            computed, total = med(s, "prompt_computed"), med(s, "prompt_total")
            comp = f"{computed:,.0f} of {total:,.0f}" if computed is not None and total else "–"
            label = LABELS[c] + (f", first {w['naive_sample']} requests" if c == "naive" else "")
            out.append(f"| {label} | {p} | {len(s)} | {rps:.3f} ({lo:.3f}–{hi:.3f}) | {fmt(vs, 2, '×')} | "
                       f"{fmt(None if overlap else med(s, 'prefill_tps'), 0)} | "
                       f"{fmt(None if overlap else med(s, 'decode_tps'), 1)} | {fmt(med(s, 'ttft_p50'), 2)} | "
                       f"{fmt(med(s, 'peak_rss_mib'), 0)} | {comp} |")
    return out


def where_time_went(results, name, w):
    """Where our cold run's time went, each part against llama.cpp's own rate."""
    b = best(w, "ours-cold")
    if not b:
        return []
    s = dict(rows(w, "ours-cold"))[b[0]]
    wall, prefill, decode, restore = (med(s, k) for k in ("wall", "prefill_s", "decode_s", "restore_s"))
    other = wall - prefill - decode - restore
    # The ceiling's depth nearest the prefix the workload's own tokens sit behind.
    depths = {r["depth"] for r in results.get("llama_bench", [])}
    depth = min(depths, key=lambda d: abs(d - s[0]["prefix_tokens"]), default=None)
    tg_test = next((r["test"] for r in results.get("llama_bench", []) if r["test"].startswith("tg")), None)
    pp = ceiling(results, "pp512", depth)
    pp_fa = ceiling(results, "pp512", depth, True)
    tg = ceiling(results, tg_test, depth)
    ptps, dtps = med(s, "prefill_tps"), med(s, "decode_tps")
    lines = [f"Where ours' cold run at `--parallel {b[0]}` spent its {wall:.1f} s (medians): prefill "
             f"{prefill:.1f} s ({prefill / wall * 100:.0f}%) at {ptps:.0f} tok/s, decode {decode:.1f} s "
             f"({decode / wall * 100:.0f}%) at {dtps:.1f} tok/s aggregate, the rest (load, tokenizing, "
             f"sampling, scheduling, output) {other:.1f} s."]
    if pp and tg:
        lines.append(f"llama-bench at depth {depth}, flash attention off as ours: pp512 {pp:.0f} tok/s (ours' prefill "
                     f"is {ptps / pp * 100:.0f}% of it), {tg_test} {tg:.1f} tok/s for one sequence"
                     + (f"; with flash attention on, pp512 {pp_fa:.0f} tok/s" if pp_fa else "") + ".")
    return lines


def summary(results):
    lines = ["## Summary", "",
             "| target (issue 11) | goal | measured | met |", "|---|---|---|---|"]
    for name, kind, ours, peer, goal in TARGETS:
        w = results["workloads"].get(name)
        o, s = (best(w, ours), best(w, peer)) if w else (None, None)
        if not o or not s:
            lines.append(f"| {name}, {kind} against {kind} | ≥ {goal}× | not measured | – |")
            continue
        ratio = o[1] / s[1]
        measured = [p for p, _ in rows(w, peer)]
        which = (f"its best `-np {s[0]}` (of {', '.join(map(str, measured))})" if len(measured) > 1
                 else f"`-np {s[0]}`")
        lines.append(f"| {name}, {kind} against {kind}: ours at `--parallel {o[0]}` ({o[1]:.3f} req/s, "
                     f"{runs(o[2])}) over llama-server at {which} ({s[1]:.3f} req/s, {runs(s[2])}) | "
                     f"≥ {goal}× | {ratio:.2f}× | {'yes' if ratio >= goal else 'no'} |")
    pairs = [t for t in decode_pairs(results) if t[0] == 8 and t[1]]
    if pairs:
        _, ours, theirs = pairs[0]
        lines.append(f"| decode at `--parallel 8`: ours (criterion decode bench) over llama-batched-bench, same "
                     f"shape | ≥ {DECODE_TARGET * 100:.0f}% | {ours / theirs * 100:.0f}% ({ours:.1f} against "
                     f"{theirs:.1f} tok/s) | {'yes' if ours / theirs >= DECODE_TARGET else 'no'} |")
    return lines + [""]


def write(results, report_path, plots_dir):
    os.makedirs(plots_dir, exist_ok=True)
    plots_rel = os.path.relpath(plots_dir, os.path.dirname(report_path))
    m = results["machine"]
    lines = ["# Benchmarks", "",
             "Generated by `make bench` (`benches/bench.py`); do not edit by hand. Every figure comes from "
             "the one run recorded below, on one machine; ratios are of medians from that run.", "",
             "| | |", "|---|---|",
             f"| date | {results['date']} |",
             f"| machine | {m['cpu']}, {m['physical_cores']} physical cores ({m['logical_cpus']} logical), "
             f"{m['memory_gib']} GiB, Linux {m['kernel']}, no GPU |",
             f"| threads | {results['threads']} for every engine (ours `--threads`, llama-server `-t`/`-tb`, "
             "llama-bench, llama-batched-bench) |",
             "| model | SmolLM2-135M-Instruct Q4_1 GGUF (sha256 b179c952…), the default model |",
             f"| ours | infer-batch {results['versions']['ours']}, release build, default settings unless a "
             "row says otherwise (deterministic: a KV stream per sequence, flash attention off) |",
             f"| peers | {results['versions']['peers']}, built by `benches/peers.sh` (Release, GGML_NATIVE=OFF, "
             "OpenMP, as ours): the same ggml kernels, libllama and common as ours. llama-server "
             "runs with its defaults (flash attention auto, `cache_prompt` on, its RAM prompt cache, a KV "
             "stream per slot) and a context of `-np` × the per-request need; as many concurrent clients "
             "as slots, streamed answers, temperature 0 |",
             "| clocks | cold: from process start, model load included, to the last answer, for every engine. "
             "Warm: ours from process start (load and restore included); llama-server from its first timed "
             "request, after its load and warm-up. Every engine on the bench's own monotonic clock. |",
             f"| command | {results['command']} |", ""]
    lines += summary(results)

    for kind, configs, peer, intro in [
        ("Cold against cold", COLD, "server-cold",
         "Each engine's first run in a fresh process, nothing precomputed. Naive re-prefill runs on the "
         "first requests of the same batch, which are independent of each other, so its rate holds for "
         "the whole batch."),
        ("Warm against warm", WARM, "server-warm",
         "Ours restores the prefix state that `infer-batch cache warm` wrote before the clock started; "
         "llama-server first answers one warm-up request per slot (the shared system prompt and a "
         "throw-away user message), outside its clock, so every slot holds the prefix. llama-server "
         "supports slot save and restore too, but restoring a saved slot is what its prompt cache already "
         "does after a warm-up, without a file."),
    ]:
        lines += [f"## {kind}", "", intro, "",
                  "Prefill and decode tok/s: ours from its summary (measured per decode call); llama-server "
                  "from its per-request `timings`, shown at `-np 1` only. Prompt tokens computed: ours from "
                  "its summary, llama-server from `timings.prompt_n`.", ""]
        for name, w in results["workloads"].items():
            if not any(rows(w, c) for c in configs):
                continue
            lines += [f"### `{name}`", "", shape_line(name, w), ""] + table(w, configs, peer) + [""]
            warm = dict(rows(w, "ours-warm"))
            if kind.startswith("Warm") and warm:
                s = next(iter(warm.values()))
                pre = w.get("prefix_prefill")
                lines += [f"Ours restored the {s[0]['prefix_tokens']}-token prefix state from disk in "
                          f"{med(s, 'restore_s') * 1e3:.0f} ms (median)"
                          + (f", where `infer-batch cache warm` prefilled it in {pre['ms'] / 1e3:.1f} s"
                             if pre else "") + ".", ""]
            if kind.startswith("Cold"):
                lines += where_time_went(results, name, w) + [""]
                ours, server = dict(rows(w, "ours-cold")), dict(rows(w, "server-cold")).get(1)
                if ours and server:
                    o = next(iter(ours.values()))
                    lines += [f"Per token, against llama-server at `-np 1` (medians): prefill {med(o, 'prefill_tps'):.0f} "
                              f"against {med(server, 'prefill_tps'):.0f} tok/s (ours keeps flash attention off to "
                              f"stay exact; llama-server's is at its default, auto), decode {med(o, 'decode_tps'):.1f} tok/s "
                              f"aggregate against {med(server, 'decode_tps'):.1f} for its one sequence.", ""]
                naive = best(w, "naive")
                cold = best(w, "ours-cold")
                if naive and cold:
                    lines += [f"Prefix reuse: ours cold at `--parallel {cold[0]}` is {cold[1] / naive[1]:.2f}× "
                              "naive re-prefill at `--parallel 1`.", ""]

    lines += ["## Ceilings: llama.cpp's own rates", "",
              "`llama-bench` on the same model and threads, 2 repetitions, at the workloads' chunk sizes and "
              "depths (the `ci` prefix is about 1,100 tokens, the seed's about 2,800):", "",
              "| test | depth | flash attention | tok/s | ± |", "|---|---|---|---|---|"]
    for r in results.get("llama_bench", []):
        lines.append(f"| {r['test']} | {r['depth']} | {'on' if r['flash_attn'] else 'off'} | "
                     f"{r['tokens_per_s']:.1f} | {r['stddev']:.1f} |")
    pairs = decode_pairs(results)
    if pairs:
        lines += ["", "Batched decode: `llama-batched-bench -pps -fa off` (a shared 1,000-token prompt, then 32 "
                  "steps of B sequences, a KV stream per sequence) against our criterion decode bench "
                  "(`cargo bench --bench decode`, the same shape through our engine, median of 10 samples):", "",
                  "| sequences | llama-batched-bench tok/s | ours tok/s | ours ÷ llama.cpp |", "|---|---|---|---|"]
        for b, ours, theirs in pairs:
            lines.append(f"| {b} | {theirs:.1f} | {fmt(ours, 1)} | "
                         f"{fmt(ours / theirs * 100 if ours else None, 0, '%')} |")
        lines += ["", f"![decode against sequences]({plots_rel}/decode-parallel.svg)", ""]
        chart(os.path.join(plots_dir, "decode-parallel.svg"), "Aggregate decode rate", "sequences decoded together",
              "tokens/s (median)",
              [("ours", "ours (criterion)", [(b, o) for b, o, _ in pairs if o], False),
               ("llama.cpp", "llama-batched-bench", [(b, t) for b, _, t in pairs], True)],
              [b for b, _, _ in pairs], xlog=True)

    cr = results.get("criterion", {}).get("prefix", {})
    sizes = [n for n in ("500", "1000", "2000") if cr and all(cr[k].get(n) for k in cr)]
    if sizes:
        lines += ["## Restore against prefill (criterion)", "",
                  "`cargo bench --bench prefix`: the same prefix made resident three ways; median of 10 "
                  "samples, with criterion's 95% interval.", "",
                  "| prefix tokens | cold prefill | restore from file | fork in memory | prefill ÷ restore |",
                  "|---|---|---|---|---|"]
        for n in sizes:
            cold, rest, fork = (cr[k][n] for k in ("cold_prefill", "restore_file", "fork_in_memory"))
            lines.append(f"| {n} | {cold['median_s'] * 1e3:.0f} ms | {rest['median_s'] * 1e3:.1f} ms "
                         f"({rest['lo_s'] * 1e3:.1f}–{rest['hi_s'] * 1e3:.1f}) | {fork['median_s'] * 1e3:.2f} ms | "
                         f"{cold['median_s'] / rest['median_s']:.0f}× |")
        lines += ["", f"![restore against prefill]({plots_rel}/restore-vs-prefill.svg)", ""]
        chart(os.path.join(plots_dir, "restore-vs-prefill.svg"), "Making a prefix resident",
              "prefix (tokens)", "milliseconds (log scale)",
              [(k, {"cold_prefill": "cold prefill", "restore_file": "restore from file",
                    "fork_in_memory": "fork in memory"}[k],
                [(int(n), cr[k][n]["median_s"] * 1e3) for n in sizes], False)
               for k in ("cold_prefill", "restore_file", "fork_in_memory")],
              [500, 1000, 2000], ylog=True)

    sweep = results.get("sweep")
    if sweep:
        lines += ["## Speedup against prefix length", "",
                  "8 requests of about 100 user tokens and 32 completion tokens, system prompts of growing "
                  "length, `--parallel 4`, one run each: prefix computed in the run against naive re-prefill.",
                  "", "| prefix tokens | naive req/s | prefix reused req/s | speedup | ideal | of ideal |",
                  "|---|---|---|---|---|---|"]
        for pt in sweep:
            n, mem = pt["naive"], pt["memory"]
            sp = mem["req_s"] / n["req_s"]
            ide = ideal_speedup(n["wall"], n["prompt_computed"], n["prefill_tps"], mem["prompt_computed"])
            lines.append(f"| {mem['prefix_tokens']} | {n['req_s']:.3f} | {mem['req_s']:.3f} | {sp:.2f}× | "
                         f"{fmt(ide, 2, '×')} | {fmt(sp / ide * 100 if ide else None, 0, '%')} |")
        lines.append("")
    with open(report_path, "w") as f:
        f.write("\n".join(lines))
