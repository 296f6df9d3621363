//! `infer-batch bench`: what prefix sharing buys on your own requests, measured in this process.
//!
//! A sample of the input's requests (the N whose `custom_id` hashes lowest: the same ones every
//! time, spread over the whole file) runs as a batch in three modes, at each `--parallel`:
//! naive re-prefill (`--no-prefix-cache`), the prefix shared in memory (computed once per run),
//! and the prefix restored from a state file that a `cache warm` step wrote first. Every run is
//! a full batch run, model load included, into a scratch directory; repetitions are
//! interleaved and medians reported. From the rates it extrapolates how long the whole input
//! would take.

use std::collections::{BTreeMap, BinaryHeap, HashSet};
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::commands::cli::RunConfig;
use crate::commands::run::{run, RunReport};
use crate::commands::warm::warm;
use crate::digest::hash64;
use crate::input::request::RequestReader;
use crate::plan::memory::peak_rss;
use crate::report::metrics::PrefixSource;

/// How a configuration shares its prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Every request computes its whole prompt.
    Naive,
    /// The prefix is computed once per run and shared in memory.
    Memory,
    /// The prefix is restored from a state file.
    Disk,
}

impl Mode {
    const ALL: [Self; 3] = [Self::Naive, Self::Memory, Self::Disk];

    fn name(self) -> &'static str {
        match self {
            Self::Naive => "naive",
            Self::Memory => "memory",
            Self::Disk => "disk",
        }
    }
}

/// One run of one configuration.
#[derive(Debug, Clone, Serialize)]
pub struct Measurement {
    /// How the prefix was shared.
    pub mode: Mode,
    /// Slots.
    pub parallel: u32,
    /// Which repetition.
    pub rep: u32,
    /// Requests in the sample.
    pub requests: u64,
    /// Wall clock of the run, model load included.
    pub wall_seconds: f64,
    /// Requests per second over that clock.
    pub requests_per_second: f64,
    /// Prompt tokens llama.cpp computed.
    pub prompt_computed: u64,
    /// Prompt tokens taken from a shared prefix.
    pub prompt_reused: u64,
    /// Seconds in decode calls that held prompt tokens.
    pub prefill_seconds: f64,
    /// Prefill rate over those calls.
    pub prefill_tokens_per_second: f64,
    /// Decode rate over calls of generated tokens only.
    pub decode_tokens_per_second: f64,
    /// Median time from admission to first token.
    pub ttft_p50_seconds: Option<f64>,
    /// Peak resident memory during the run.
    pub peak_rss_bytes: Option<u64>,
    /// Prefix tokens restored from disk.
    pub prefix_restored: u64,
}

impl Measurement {
    fn new(mode: Mode, parallel: u32, rep: u32, r: &RunReport) -> Self {
        let m = &r.metrics;
        let requests = m.requests_ok + m.requests_failed;
        let wall = r.wall.as_secs_f64();
        Self {
            mode,
            parallel,
            rep,
            requests,
            wall_seconds: wall,
            requests_per_second: requests as f64 / wall.max(1e-9),
            prompt_computed: m.prompt_tokens_computed,
            prompt_reused: m.prompt_tokens_reused,
            prefill_seconds: m.prefill_time.as_secs_f64(),
            prefill_tokens_per_second: m.prefill_tokens_per_sec(),
            decode_tokens_per_second: m.decode_tokens_per_sec(),
            ttft_p50_seconds: m.ttft_percentile(50.0),
            peak_rss_bytes: peak_rss(),
            prefix_restored: m.prefix_tokens(PrefixSource::Restored),
        }
    }
}

/// The medians of one configuration, with its speedup over naive at the same `--parallel`.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// The configuration's median run.
    pub median: Measurement,
    /// Requests/s over naive's at the same `--parallel`.
    pub speedup: Option<f64>,
    /// The speedup if skipping the reused tokens saved exactly their share of naive's prefill
    /// time: naive's wall over (naive's wall − reused tokens ÷ naive's prefill rate).
    pub ideal_speedup: Option<f64>,
}

/// What a bench found.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// The input benchmarked.
    pub input: PathBuf,
    /// Valid requests in the whole input.
    pub input_requests: u64,
    /// Requests in the sample.
    pub sample: u64,
    /// CPU threads.
    pub threads: u32,
    /// Every run.
    pub measurements: Vec<Measurement>,
    /// Medians per configuration.
    pub rows: Vec<Row>,
    /// At the measured rates, seconds for the whole input: naive at its best `--parallel`, and
    /// shared (in memory, the prefix computed once) at its best.
    pub whole_input_seconds: BTreeMap<String, f64>,
}

/// The bench's own settings.
#[derive(Debug, Clone)]
pub struct BenchPlan {
    /// `--parallel` values.
    pub parallel: Vec<u32>,
    /// Requests sampled.
    pub sample: usize,
    /// Repetitions.
    pub reps: u32,
}

/// Runs the bench. `cfg` is the run's configuration; its output and cache directory are
/// replaced by scratch ones. `stop` (SIGINT, SIGTERM) ends it early.
///
/// # Errors
/// When the input cannot be read or holds no valid request, or a run cannot proceed.
pub fn bench(cfg: &RunConfig, plan: &BenchPlan, stop: &AtomicBool) -> Result<BenchReport> {
    if plan.parallel.is_empty() || plan.sample == 0 || plan.reps == 0 {
        bail!("give at least one --parallel, a --sample and --reps of at least 1");
    }
    let scratch = tempfile::Builder::new()
        .prefix("infer-batch-bench-")
        .tempdir()
        .context("cannot create a scratch directory")?;
    let sample_path = scratch.path().join("sample.jsonl");
    let (input_requests, sampled) = sample(cfg, plan.sample, &sample_path)?;
    if sampled == 0 {
        bail!(
            "{} holds no valid request to benchmark",
            cfg.input.display()
        );
    }
    let configs: Vec<(Mode, u32)> = plan
        .parallel
        .iter()
        .flat_map(|&p| Mode::ALL.map(|m| (m, p)))
        .collect();
    let bar = indicatif::ProgressBar::new((configs.len() as u64) * u64::from(plan.reps) + 1);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} runs, {elapsed} | {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let base = RunConfig {
        input: sample_path,
        prefix_cache_dir: scratch.path().join("cache"),
        restart: true,
        retry_failed: false,
        // Every request is computed: the benchmark measures the engine, not the copies.
        reuse: Vec::new(),
        dedup: false,
        supervise: false,
        shard: None,
        progress: false,
        ..cfg.clone()
    };
    bar.set_message("cache warm: the state file the disk mode restores");
    warm(&base)?;
    bar.inc(1);
    let mut measurements = Vec::new();
    for rep in 0..plan.reps {
        for &(mode, parallel) in &configs {
            if stop.load(Ordering::Relaxed) {
                bail!("interrupted");
            }
            bar.set_message(format!("{} --parallel {parallel}", mode.name()));
            let run_cfg = RunConfig {
                output: scratch
                    .path()
                    .join(format!("{}-p{parallel}-r{rep}.jsonl", mode.name())),
                parallel,
                prefix_cache: mode != Mode::Naive,
                disk_cache: mode == Mode::Disk,
                ..base.clone()
            };
            reset_peak_rss();
            let report = run(&run_cfg, stop, None)?;
            if report.interrupted {
                bail!("interrupted");
            }
            measurements.push(Measurement::new(mode, parallel, rep, &report));
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    let rows = rows(&measurements, &configs);
    let whole_input_seconds = extrapolate(&rows, input_requests);
    Ok(BenchReport {
        input: cfg.input.clone(),
        input_requests,
        sample: sampled,
        threads: cfg.threads,
        measurements,
        rows,
        whole_input_seconds,
    })
}

/// Writes the sample (the `n` valid requests whose ids hash lowest, in input order) to `out`;
/// returns the input's valid requests and the sample's size.
fn sample(cfg: &RunConfig, n: usize, out: &Path) -> Result<(u64, u64)> {
    let open = || {
        File::open(&cfg.input)
            .map(BufReader::new)
            .with_context(|| format!("cannot read input {}", cfg.input.display()))
    };
    let mut lowest: BinaryHeap<(u64, u64)> = BinaryHeap::new();
    let mut valid = 0;
    for item in RequestReader::new(open()?, cfg.fields) {
        let Ok(r) = item? else { continue };
        valid += 1;
        lowest.push((hash64(&r.custom_id), r.line));
        if lowest.len() > n {
            lowest.pop();
        }
    }
    let lines: HashSet<u64> = lowest.into_iter().map(|(_, line)| line).collect();
    let mut w = BufWriter::new(File::create(out)?);
    for (i, line) in open()?.lines().enumerate() {
        let line = line?;
        if lines.contains(&(i as u64 + 1)) {
            writeln!(w, "{line}")?;
        }
    }
    w.flush()?;
    Ok((valid, lines.len() as u64))
}

/// Lets the next run report its own peak memory: Linux resets VmHWM on this write.
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn median_of(ms: &[&Measurement]) -> Measurement {
    let mut sorted: Vec<&Measurement> = ms.to_vec();
    sorted.sort_by(|a, b| a.requests_per_second.total_cmp(&b.requests_per_second));
    sorted[sorted.len() / 2].clone()
}

/// Medians per configuration, with speedups over naive at the same `--parallel`.
fn rows(measurements: &[Measurement], configs: &[(Mode, u32)]) -> Vec<Row> {
    let median = |mode: Mode, parallel: u32| {
        let ms: Vec<&Measurement> = measurements
            .iter()
            .filter(|m| m.mode == mode && m.parallel == parallel)
            .collect();
        (!ms.is_empty()).then(|| median_of(&ms))
    };
    configs
        .iter()
        .filter_map(|&(mode, parallel)| {
            let m = median(mode, parallel)?;
            let naive = median(Mode::Naive, parallel);
            let speedup = naive
                .as_ref()
                .map(|n| m.requests_per_second / n.requests_per_second.max(1e-12));
            let ideal_speedup = naive.as_ref().and_then(|n| {
                let saved = m.prompt_reused as f64 / n.prefill_tokens_per_second.max(1e-12);
                let ideal_wall = n.wall_seconds - saved;
                (ideal_wall > 0.0).then(|| n.wall_seconds / ideal_wall)
            });
            Some(Row {
                median: m,
                speedup,
                ideal_speedup,
            })
        })
        .collect()
}

/// Seconds for `requests` at the best measured rate of naive, and of the prefix shared in
/// memory (which computes it once, as a first run over the whole input would).
fn extrapolate(rows: &[Row], requests: u64) -> BTreeMap<String, f64> {
    let best = |mode: Mode| {
        rows.iter()
            .filter(|r| r.median.mode == mode)
            .map(|r| r.median.requests_per_second)
            .fold(0.0, f64::max)
    };
    [("naive", Mode::Naive), ("shared", Mode::Memory)]
        .into_iter()
        .filter(|(_, m)| best(*m) > 0.0)
        .map(|(name, m)| (name.to_owned(), requests as f64 / best(m)))
        .collect()
}

/// The report as a table for a terminal.
pub fn table(r: &BenchReport) -> String {
    let mut out = format!(
        "{} requests sampled of {} in {}, {} threads; medians of each configuration\n\n",
        r.sample,
        r.input_requests,
        r.input.display(),
        r.threads
    );
    out.push_str(&format!(
        "{:<7} {:>4} {:>8} {:>10} {:>10} {:>9} {:>9} {:>9} {:>9} {:>13}\n",
        "mode",
        "par",
        "req/s",
        "computed",
        "reused",
        "prefill",
        "decode",
        "ttft p50",
        "peak rss",
        "vs naive"
    ));
    out.push_str(&format!(
        "{:<7} {:>4} {:>8} {:>10} {:>10} {:>9} {:>9} {:>9} {:>9} {:>13}\n",
        "", "", "", "tokens", "tokens", "tok/s", "tok/s", "s", "MiB", "(ideal)"
    ));
    for row in &r.rows {
        let m = &row.median;
        let vs = match (row.speedup, row.ideal_speedup) {
            (Some(s), Some(i)) if m.mode != Mode::Naive => format!("{s:.2}x ({i:.2}x)"),
            _ => "-".into(),
        };
        out.push_str(&format!(
            "{:<7} {:>4} {:>8.3} {:>10} {:>10} {:>9.1} {:>9.1} {:>9} {:>9} {:>13}\n",
            m.mode.name(),
            m.parallel,
            m.requests_per_second,
            m.prompt_computed,
            m.prompt_reused,
            m.prefill_tokens_per_second,
            m.decode_tokens_per_second,
            m.ttft_p50_seconds.map_or("-".into(), |t| format!("{t:.3}")),
            m.peak_rss_bytes
                .map_or("-".into(), |b| format!("{}", b >> 20)),
            vs
        ));
    }
    out.push('\n');
    for (name, secs) in &r.whole_input_seconds {
        out.push_str(&format!(
            "the whole input ({} requests), {name}, at its best --parallel: {}\n",
            r.input_requests,
            human_duration(*secs)
        ));
    }
    out
}

fn human_duration(secs: f64) -> String {
    match secs {
        s if s < 120.0 => format!("{s:.0} s"),
        s if s < 7200.0 => format!("{:.1} min", s / 60.0),
        s => format!("{:.1} h", s / 3600.0),
    }
}

/// Plots requests/s against `--parallel`, a line per mode, as SVG.
///
/// # Errors
/// When the file cannot be written.
pub fn plot(r: &BenchReport, path: &Path) -> Result<()> {
    use plotters::prelude::*;
    let parallel: Vec<u32> = {
        let mut p: Vec<u32> = r.rows.iter().map(|row| row.median.parallel).collect();
        p.sort_unstable();
        p.dedup();
        p
    };
    let top = r
        .rows
        .iter()
        .map(|row| row.median.requests_per_second)
        .fold(0.0, f64::max)
        * 1.15;
    let (lo, hi) = (
        f64::from(*parallel.first().unwrap_or(&1)),
        f64::from(*parallel.last().unwrap_or(&1)),
    );
    let root = SVGBackend::new(path, (720, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "requests/s on a {}-request sample, {} threads",
                r.sample, r.threads
            ),
            ("sans-serif", 18),
        )
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d((lo - 0.5)..(hi + 0.5), 0.0..top.max(1e-6))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc("--parallel")
        .y_desc("requests/s")
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let colors = [RED, BLUE, GREEN];
    for (mode, color) in Mode::ALL.into_iter().zip(colors) {
        let points: Vec<(f64, f64)> = r
            .rows
            .iter()
            .filter(|row| row.median.mode == mode)
            .map(|row| {
                (
                    f64::from(row.median.parallel),
                    row.median.requests_per_second,
                )
            })
            .collect();
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .label(mode.name())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
        chart
            .draw_series(
                points
                    .into_iter()
                    .map(|p| Circle::new(p, 4, color.filled())),
            )
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(mode: Mode, parallel: u32, rps: f64) -> Measurement {
        Measurement {
            mode,
            parallel,
            rep: 0,
            requests: 10,
            wall_seconds: 10.0 / rps,
            requests_per_second: rps,
            prompt_computed: 0,
            prompt_reused: if mode == Mode::Naive { 0 } else { 500 },
            prefill_seconds: 0.0,
            prefill_tokens_per_second: 200.0,
            decode_tokens_per_second: 50.0,
            ttft_p50_seconds: None,
            peak_rss_bytes: None,
            prefix_restored: 0,
        }
    }

    #[test]
    fn rows_take_medians_and_speedups_against_naive_at_the_same_parallel() {
        let ms = vec![
            m(Mode::Naive, 1, 1.0),
            m(Mode::Naive, 1, 3.0),
            m(Mode::Naive, 1, 2.0),
            m(Mode::Memory, 1, 5.0),
            m(Mode::Naive, 4, 4.0),
            m(Mode::Memory, 4, 6.0),
        ];
        let rows = rows(
            &ms,
            &[(Mode::Naive, 1), (Mode::Memory, 1), (Mode::Memory, 4)],
        );
        assert_eq!(rows[0].median.requests_per_second, 2.0, "median of three");
        assert_eq!(rows[1].speedup, Some(2.5));
        // Naive took 5 s; 500 reused tokens at 200 tok/s save 2.5 s of them: 2x at best.
        assert_eq!(rows[1].ideal_speedup, Some(2.0));
        assert_eq!(rows[2].speedup, Some(1.5));
        // Naive at 4 took 2.5 s: saving 2.5 s leaves nothing, so there is no finite ideal.
        assert_eq!(rows[2].ideal_speedup, None);
        let extra = extrapolate(&rows, 1000);
        assert_eq!(extra["naive"], 500.0);
        assert_eq!(extra["shared"], 1000.0 / 6.0);
    }

    #[test]
    fn durations_read_at_a_glance() {
        assert_eq!(human_duration(30.0), "30 s");
        assert_eq!(human_duration(600.0), "10.0 min");
        assert_eq!(human_duration(36_000.0), "10.0 h");
    }
}
