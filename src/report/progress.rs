//! Progress on stderr while a batch runs: a bar on a terminal, else a plain line every 10 s.

use std::time::{Duration, Instant};

use crate::formats::summary::GpuUse;
use crate::plan::memory::{current_rss, mib};
use crate::report::metrics::Metrics;

/// Progress on stderr: a bar on a terminal, else a plain line every 10 seconds.
pub struct Progress {
    bar: Option<indicatif::ProgressBar>,
    total: u64,
    shown: bool,
    last_line: Instant,
}

impl Progress {
    /// Progress over `total` requests; nothing at all unless `shown`.
    pub fn new(total: u64, shown: bool) -> Self {
        use std::io::IsTerminal;
        let bar = (shown && std::io::stderr().is_terminal()).then(|| {
            let bar = indicatif::ProgressBar::new(total);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:30} {pos}/{len} requests, ETA {eta} | {msg}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            bar
        });
        Self {
            bar,
            total,
            shown,
            last_line: Instant::now(),
        }
    }

    /// Shows the counters after a step, with each GPU's VRAM in use when there are any.
    pub fn update(&mut self, m: &Metrics, elapsed: Duration, gpus: &[GpuUse]) {
        let done = m.requests_ok + m.requests_failed;
        let secs = elapsed.as_secs_f64().max(1e-9);
        let rate = done as f64 / secs;
        let status = format!(
            "{} failed, {rate:.2} req/s, prefill {:.0} tok/s, decode {:.0} tok/s, RSS {}",
            m.requests_failed,
            m.prefill_tokens_per_sec(),
            m.decode_tokens_per_sec(),
            current_rss().map_or_else(|| "?".into(), mib)
        ) + &gpus
            .iter()
            .map(|g| {
                // "llvmpipe (LLVM 15.0.6, 256 bits)" reads as "llvmpipe" here.
                let name = g.name.split(" (").next().unwrap_or_default();
                format!(
                    ", {} {name} {} of {}",
                    g.device,
                    g.used_bytes.map_or_else(|| "?".into(), mib),
                    mib(g.total_bytes)
                )
            })
            .collect::<String>();
        match &self.bar {
            Some(bar) => {
                bar.set_position(done);
                bar.set_message(status);
            }
            None if self.shown && self.last_line.elapsed() >= Duration::from_secs(10) => {
                self.last_line = Instant::now();
                let eta = if rate > 0.0 {
                    format!("{:.0}s", self.total.saturating_sub(done) as f64 / rate)
                } else {
                    "?".into()
                };
                tracing::info!("{done}/{} requests, ETA {eta}, {status}", self.total);
            }
            None => {}
        }
    }

    /// Clears the bar.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
