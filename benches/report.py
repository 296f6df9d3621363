"""Writes benches/RESULTS.md and its SVG plots from the measurements bench.py collected.

Every figure here is a median of measured runs or a number derived from them, and the derived
ones say how they were derived.
"""
import math
import os
import statistics

COLORS = {
    "naive": "#7f7f7f",
    "memory": "#1f77b4",
    "disk": "#2ca02c",
    "llama-server": "#d62728",
    "llama-cpp-python": "#9467bd",
    "ideal": "#ff7f0e",
    "cold_prefill": "#7f7f7f",
    "restore_file": "#2ca02c",
    "fork_in_memory": "#1f77b4",
}
LABELS = {
    "naive": "ours, naive re-prefill",
    "memory": "ours, prefix in memory",
    "disk": "ours, prefix from disk",
    "llama-server": "llama-server (-np = --parallel)",
    "llama-cpp-python": "llama-cpp-python (sequential)",
}


# ---------------------------------------------------------------- numbers


def med(samples, key):
    xs = [s[key] for s in samples if s.get(key) is not None]
    return statistics.median(xs) if xs else None


def fmt(x, digits=2, suffix=""):
    if x is None:
        return "–"
    return f"{x:.{digits}f}{suffix}"


def keys(w, config):
    return sorted((int(k.split("/")[1]) for k in w["samples"] if k.split("/")[0] == config))


def ideal_speedup(naive_wall, naive_computed, naive_prefill_tps, computed):
    """Speedup over naive if skipping prefix tokens were free: the naive run's wall clock less
    the time its own measured prefill rate says the skipped tokens took."""
    rest = naive_wall - (naive_computed - computed) / naive_prefill_tps
    return naive_wall / rest if rest > 0 else None


def ideal(w, config, p):
    """`ideal_speedup` over the medians of a workload's runs."""
    naive = w["samples"].get(f"naive/{p}")
    ours = w["samples"].get(f"{config}/{p}")
    if not naive or not ours:
        return None
    return ideal_speedup(med(naive, "wall"), med(naive, "prompt_computed"), med(naive, "prefill_tps"),
                         med(ours, "prompt_computed"))


def best(w, configs):
    """(config, parallel, median req/s) of the fastest of `configs`."""
    cands = [(c, p, med(w["samples"][f"{c}/{p}"], "req_s")) for c in configs for p in keys(w, c)]
    return max(cands, key=lambda t: t[2]) if cands else None


def shape(w):
    s = w["samples"]["memory/1"][0]
    return {
        "requests": w["requests"],
        "prefix": s["prefix_tokens"],
        "prompt_avg": s["prompt_total"] / w["requests"],
        "user_avg": s["prompt_total"] / w["requests"] - s["prefix_tokens"],
        "max_tokens": w["max_tokens"],
        "completion": s["completion"],
    }


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


def workload_section(name, w, plots_rel):
    sh = shape(w)
    lines = [f"### Workload `{name}`", ""]
    lines.append(f"{sh['requests']} requests; shared system prompt of {sh['prefix']} tokens; user messages "
                 f"of about {sh['user_avg']:.0f} tokens ({sh['prompt_avg']:.0f}-token prompts); max_tokens "
                 f"{sh['max_tokens']}, greedy; {sh['completion']} completion tokens in all. "
                 f"Generated by `benches/gen_workload.py {' '.join(w['gen_args'])}`. Naive runs once per "
                 f"`--parallel`; the others {w['reps']} time(s), interleaved.")
    lines += ["", "| configuration | --parallel | runs | req/s | vs naive | ideal | of ideal | prefill tok/s | "
              "decode tok/s | TTFT p50 s | peak RSS MiB | prompt tokens computed |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in ("naive", "memory", "disk", "llama-server", "llama-cpp-python"):
        for p in keys(w, c):
            s = w["samples"][f"{c}/{p}"]
            naive = w["samples"].get(f"naive/{p}")
            vs = med(s, "req_s") / med(naive, "req_s") if naive else None
            ide = ideal(w, c, p) if c in ("memory", "disk") else None
            total = med(w["samples"]["naive/1"], "prompt_total")
            computed = med(s, "prompt_computed")
            comp = f"{computed:,.0f} of {total:,.0f}" if computed is not None else "–"
            # llama-server's per-request timings overlap when slots share the machine, so its
            # rates mean something only with one slot.
            overlapping = c == "llama-server" and p > 1
            prefill = None if overlapping else med(s, "prefill_tps")
            decode = None if overlapping else med(s, "decode_tps")
            lines.append(
                f"| {LABELS[c]} | {p} | {len(s)} | {fmt(med(s, 'req_s'), 3)} | {fmt(vs, 2, '×')} | "
                f"{fmt(ide, 2, '×')} | {fmt(vs / ide * 100 if ide and vs else None, 0, '%')} | "
                f"{fmt(prefill, 0)} | {fmt(decode, 1)} | {fmt(med(s, 'ttft_p50'), 2)} | "
                f"{fmt(med(s, 'peak_rss_mib'), 0)} | {comp} |")
    ours = best(w, ["memory", "disk"])
    naive = best(w, ["naive"])
    server = best(w, ["llama-server"])
    c, p, rps = ours
    s = w["samples"][f"{c}/{p}"]
    wall = med(s, "wall")
    parts = {k: med(s, k) for k in ("prefill_s", "decode_s", "restore_s")}
    other = wall - sum(parts.values())
    lines += ["", f"![requests/s against --parallel, {name}]({plots_rel}/throughput-{name}.svg)", ""]
    cold = best(w, ["memory"])
    lines.append(f"**Best of ours:** {LABELS[c]} at `--parallel {p}`, {rps:.3f} req/s: "
                 f"{rps / naive[2]:.2f}× the best naive ({naive[2]:.3f} req/s at {naive[1]})."
                 + (f" Cold against cold, the prefix in memory at `--parallel {cold[1]}` "
                    f"({cold[2]:.3f} req/s) is {cold[2] / server[2]:.2f}× llama-server at its best "
                    f"`-np` ({server[2]:.3f} req/s at -np {server[1]})"
                    + (f"; the prefix from disk is {rps / server[2]:.2f}× it, warm against cold"
                       if c == "disk" else "") + "." if server else ""))
    ide = ideal(w, c, p)
    vs = rps / med(w["samples"][f"naive/{p}"], "req_s")
    lines.append(f"Against naive at the same `--parallel`: {vs:.2f}× measured, {ide:.2f}× ideal: prefix reuse "
                 f"reaches {vs / ide * 100:.0f}% of its ideal.")
    lines.append(f"Where that run's {wall:.1f} s went: prefill {parts['prefill_s']:.1f} s "
                 f"({parts['prefill_s'] / wall * 100:.0f}%), decode {parts['decode_s']:.1f} s "
                 f"({parts['decode_s'] / wall * 100:.0f}%), prefix restore {parts['restore_s']:.2f} s, the rest "
                 f"(load, tokenizing, sampling, scheduling, output) {other:.1f} s ({other / wall * 100:.0f}%).")
    naive_rate = med(w["samples"][f"naive/{p}"], "prefill_tps")
    if vs / ide >= 0.95:
        lines.append("Reuse is at its ideal within this machine's noise: prefill of each request's own "
                     "tokens, then decode, is the work left.")
        return lines
    lines.append(f"Its prompt tokens, each request's own, sat behind the {sh['prefix']}-token prefix and were "
                 f"prefilled at {med(s, 'prefill_tps'):.0f} tok/s, where the naive run averaged {naive_rate:.0f} "
                 f"tok/s over all depths: the tokens reuse skips are the cheap, shallow ones, and attention "
                 f"over the prefix is what keeps the measured speedup under the token-count ideal.")
    return lines


def write(results, report_path, plots_dir):
    os.makedirs(plots_dir, exist_ok=True)
    plots_rel = os.path.relpath(plots_dir, os.path.dirname(report_path))
    m = results["machine"]
    lines = ["# Benchmarks", "",
             "Generated by `make bench` (`benches/bench.py`); do not edit by hand. Every figure comes from "
             "the one run recorded below, on one machine.", "",
             "| | |", "|---|---|",
             f"| date | {results['date']} |",
             f"| machine | {m['cpu']}, {m['physical_cores']} physical cores ({m['logical_cpus']} logical), "
             f"{m['memory_gib']} GiB, Linux {m['kernel']}, no GPU |",
             f"| threads | {results['threads']} for every engine (ours, llama-server `-t`/`-tb`, "
             "llama-cpp-python, llama-bench) |",
             "| model | SmolLM2-135M-Instruct Q4_1 GGUF (sha256 b179c952…), the default model |",
             f"| ours | infer-batch {results['versions']['ours']}, release build, default settings "
             "(deterministic: a KV stream per sequence, flash attention off) |",
             f"| peers | {results['versions']['peers']}: llama-server and llama-bench built by "
             "`benches/peers.sh` (Release, GGML_NATIVE=OFF, OpenMP, as ours); server defaults otherwise "
             "(flash attention auto, `cache_prompt` on, context `-np` × per-request need) |",
             f"| command | `{results['command']}` |", ""]

    lines += ["## Summary", "",
              "Cold against cold: ours with the prefix computed in the run (prefix in memory) against "
              "llama-server started fresh, each engine's own clock. Warm: ours restoring the prefix from "
              "a state file that an earlier, uncounted run wrote; llama-server had no warm counterpart in "
              "this run, so that figure is not a like-for-like comparison.", ""]
    for name, w in results["workloads"].items():
        cold = best(w, ["memory"])
        warm = best(w, ["disk"])
        naive = best(w, ["naive"])
        server = best(w, ["llama-server"])
        c, p, rps = cold
        ide = ideal(w, c, p)
        vs = rps / med(w["samples"][f"naive/{p}"], "req_s")
        lines.append(f"- **{name}**, cold: {rps:.3f} req/s (prefix in memory, `--parallel {p}`); "
                     f"{rps / naive[2]:.2f}× naive re-prefill"
                     + (f", {rps / server[2]:.2f}× llama-server at its best `-np {server[1]}`" if server else "")
                     + f"; prefix reuse at {vs / ide * 100:.0f}% of its ideal. Warm: {warm[2]:.3f} req/s "
                     f"(prefix from disk, `--parallel {warm[1]}`)"
                     + (f", {warm[2] / server[2]:.2f}× cold llama-server" if server else "") + ".")
    lines.append("")

    lines += ["## End to end", "",
              "req/s counts every request over the whole run, model load included for ours (llama-server's "
              "clock starts once it is ready). *vs naive*: against ours with `--no-prefix-cache` at the same "
              "`--parallel`. *ideal*: the speedup if the skipped prefix tokens cost nothing, that is the naive "
              "wall clock less (tokens not computed ÷ the naive run's measured prefill rate). *of ideal*: "
              "measured over ideal. Prefill and decode tok/s are our own measured rates; for llama-server, "
              "its per-request `timings`, shown at `-np 1` only (with more slots they overlap); for "
              "llama-cpp-python, llama.cpp's perf counters. Prompt tokens computed: ours from the summary, "
              "llama-server from `timings.prompt_n`, llama-cpp-python from `n_p_eval`.", ""]
    for name, w in results["workloads"].items():
        lines += workload_section(name, w, plots_rel) + [""]
        series = []
        for c in ("naive", "memory", "disk", "llama-server", "llama-cpp-python"):
            pts = [(p, med(w["samples"][f"{c}/{p}"], "req_s")) for p in keys(w, c)]
            if pts:
                series.append((c, LABELS[c], pts, c == "llama-server"))
        chart(os.path.join(plots_dir, f"throughput-{name}.svg"), f"Throughput, {name}",
              "--parallel (llama-server: -np)", "requests/s (median)", series, [1, 2, 4, 8], xlog=True)

    sweep = results.get("sweep")
    if sweep:
        lines += ["## Speedup against prefix length", "",
                  "8 requests of about 100 user tokens and 32 completion tokens, system prompts of growing "
                  "length, `--parallel 4`, one run each: prefix in memory against naive re-prefill.", "",
                  "| prefix tokens | naive req/s | prefix in memory req/s | speedup | ideal | of ideal |",
                  "|---|---|---|---|---|---|"]
        meas, ideals = [], []
        for pt in sweep:
            n, mem = pt["naive"], pt["memory"]
            sp = mem["req_s"] / n["req_s"]
            ide = ideal_speedup(n["wall"], n["prompt_computed"], n["prefill_tps"], mem["prompt_computed"])
            meas.append((mem["prefix_tokens"], sp))
            ideals.append((mem["prefix_tokens"], ide))
            lines.append(f"| {mem['prefix_tokens']} | {n['req_s']:.3f} | {mem['req_s']:.3f} | {sp:.2f}× | "
                         f"{ide:.2f}× | {sp / ide * 100:.0f}% |")
        lines += ["", f"![speedup against prefix length]({plots_rel}/speedup-vs-prefix.svg)", ""]
        chart(os.path.join(plots_dir, "speedup-vs-prefix.svg"), "Speedup over naive re-prefill",
              "shared prefix (tokens)", "speedup (×)",
              [("memory", "measured, prefix in memory", meas, False), ("ideal", "ideal", ideals, True)],
              [x for x, _ in meas])

    cr = results["criterion"]
    lines += ["## Restore against prefill (criterion)", "",
              "`cargo bench --bench prefix`: the same prefix made resident three ways; median of 10 "
              "samples, with criterion's 95% interval.", "",
              "| prefix tokens | cold prefill | restore from file | fork in memory | prefill ÷ restore |",
              "|---|---|---|---|---|"]
    sizes = [n for n in ("500", "1000", "2000") if all(cr["prefix"][k][n] for k in cr["prefix"])]
    for n in sizes:
        cold, rest, fork = (cr["prefix"][k][n] for k in ("cold_prefill", "restore_file", "fork_in_memory"))
        lines.append(f"| {n} | {cold['median_s'] * 1e3:.0f} ms | {rest['median_s'] * 1e3:.1f} ms "
                     f"({rest['lo_s'] * 1e3:.1f}–{rest['hi_s'] * 1e3:.1f}) | {fork['median_s'] * 1e3:.2f} ms | "
                     f"{cold['median_s'] / rest['median_s']:.0f}× |")
    lines += ["", f"![restore against prefill]({plots_rel}/restore-vs-prefill.svg)", ""]
    chart(os.path.join(plots_dir, "restore-vs-prefill.svg"), "Making a prefix resident",
          "prefix (tokens)", "milliseconds (log scale)",
          [(k, {"cold_prefill": "cold prefill", "restore_file": "restore from file",
                "fork_in_memory": "fork in memory"}[k],
            [(int(n), cr["prefix"][k][n]["median_s"] * 1e3) for n in sizes], False)
           for k in ("cold_prefill", "restore_file", "fork_in_memory")],
          [500, 1000, 2000], ylog=True)

    lines += ["## Decode against --parallel (criterion)", "",
              "`cargo bench --bench decode`: P sequences each one token per step, 32 steps, at the depth "
              "of a shared 1,000-token prefix, default layout (a KV stream per sequence, flash attention "
              "off).", "", "| sequences | aggregate decode tok/s | per sequence |", "|---|---|---|"]
    pts = []
    for p in (p for p in ("1", "2", "4", "8") if cr["decode"][p]):
        tps = int(p) * 32 / cr["decode"][p]["median_s"]
        pts.append((int(p), tps))
        lines.append(f"| {p} | {tps:.1f} | {tps / int(p):.1f} |")
    lines += ["", f"![decode against parallel]({plots_rel}/decode-parallel.svg)", ""]
    chart(os.path.join(plots_dir, "decode-parallel.svg"), "Aggregate decode rate", "sequences decoded together",
          "tokens/s (median)", [("memory", "ours, decode", pts, False)], [1, 2, 4, 8], xlog=True)

    lines += ["## llama.cpp's own ceiling (llama-bench)", "",
              "The same model and threads through `llama-bench` (built by `benches/peers.sh`), 3 repetitions: "
              "the raw kernel rates our prefill and decode figures compare against.", "",
              "| test | depth | flash attention | tok/s | ± |", "|---|---|---|---|---|"]
    for r in results["llama_bench"]:
        lines.append(f"| {r['test']} | {r['depth']} | {'on' if r['flash_attn'] else 'off'} | "
                     f"{r['tokens_per_s']:.1f} | {r['stddev']:.1f} |")
    lines.append("")
    with open(report_path, "w") as f:
        f.write("\n".join(lines))
