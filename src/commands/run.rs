//! One batch run: lock the output, plan, then stream every request through the scheduler into
//! the output, resuming where an earlier run of the same computation stopped.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};

use crate::cache::result_reuse::{Earlier, Origin, ResultIndex};
use crate::commands::cli::RunConfig;
use crate::commands::embeddings::{EmbedWork, Embeddings, Step};
use crate::commands::outcome::RunOutcome;
use crate::commands::preflight::Preflight;
use crate::commands::prepare::{check_files, new_manifest, open_input, Input, Prepared};
use crate::commands::worker::{abort_if_poisoned, Event, Reporter, WorkerEnv};
use crate::durability::checkpoint::{self, Done};
use crate::durability::durable::write_json_atomic;
use crate::durability::lock::OutputLock;
use crate::durability::sink::Placed;
use crate::durability::sink::Sink;
use crate::formats::line_error::LineError;
use crate::formats::manifest::{Manifest, RunRecord};
use crate::formats::result::Endpoint;
use crate::formats::result::{model_name, Completion, ComputationKey, ResultLine};
use crate::formats::summary::{GpuUse, MemoryRecord};
use crate::input::request::{Prompt, Request};
use crate::plan::memory::{mib, peak_rss, Pressure, VramMonitor};
use crate::prompt::grammar::Grammars;
use crate::prompt::PromptBuilder;
use crate::report::metrics::Metrics;
use crate::report::progress::Progress;
use crate::report::summary;
use crate::schedule::admission::{admit_all, Apart, Feed, Intake, LoopEnd, Piece};
use crate::schedule::groups::DecodeGroups;
use crate::schedule::job::{prepare, Job, Limits};
use crate::schedule::scheduler::{Exact, Outcome, Scheduler};
use crate::schedule::twins::{Finished, Release, Twins};

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct RunReport {
    /// Measured counters of this run (a resumed run counts only its own work).
    pub metrics: Metrics,
    /// The context plan used.
    pub plan: crate::plan::Plan,
    /// Wall time of the whole run.
    pub wall: Duration,
    /// Requests already done by an earlier run and skipped.
    pub resumed: u64,
    /// Of those, the ones with error lines.
    pub resumed_failed: u64,
    /// Stopped by a signal before the end; running the same command again resumes.
    pub interrupted: bool,
}

impl RunReport {
    /// Whether every request in the output succeeded, earlier runs' included.
    pub fn all_ok(&self) -> bool {
        self.metrics.requests_failed == 0 && self.resumed_failed == 0
    }

    /// How the run ended.
    pub fn outcome(&self) -> RunOutcome {
        if self.interrupted {
            RunOutcome::Interrupted
        } else if self.all_ok() {
            RunOutcome::AllSucceeded
        } else {
            RunOutcome::SomeFailed
        }
    }
}

/// Runs a batch end to end, resuming into an existing output of the same computation.
/// `stop` is polled between decode steps: once set, no request is admitted, in-flight ones
/// are dropped (a resumed run redoes them) and the run returns as interrupted. `worker` is the
/// supervisor's context when this process is a supervised worker.
///
/// # Errors
/// When the run cannot proceed: another run holds the output, unreadable input, missing model,
/// an output that holds results of another computation, a context that cannot be allocated. A
/// bad request is never an error here: it gets its error line and the batch goes on.
pub fn run(cfg: &RunConfig, stop: &AtomicBool, worker: Option<&WorkerEnv>) -> Result<RunReport> {
    let started = Instant::now();
    let model_hash = check_files(cfg)?;
    let mut manifest = new_manifest(cfg, model_hash)?;
    // Before the lock and the model: a refused --reuse leaves nothing behind.
    let earlier = open_earlier(cfg, &manifest)?;
    let _lock = match worker {
        Some(w) => OutputLock::inherit(&cfg.output, w.lock_fd)?,
        None => OutputLock::acquire(&cfg.output)?,
    };
    let done = checkpoint::prepare(&cfg.output, &mut manifest, cfg.restart, cfg.retry_failed)?;
    let prepared = Prepared::load(cfg, model_hash, |_, _| {})?;
    let pf = &prepared.preflight;
    let (exact, remembered) = prepared.probe(cfg)?;
    log_decode_groups(exact, remembered.as_deref());
    let identity = prepared.identity(cfg, exact);
    manifest.set_machine(&identity);
    checkpoint::check_machine(&cfg.output, &mut manifest)?;
    for e in &earlier {
        e.check_machine(&manifest)?;
    }
    manifest.input.total = pf.demand.lines;
    manifest.record_run(RunRecord {
        started_unix: unix_now(),
        parallel: u32::try_from(pf.parallel)?,
    });
    manifest.write(&cfg.output)?;
    log_plan(pf, done.len());
    let settings = prepared.run_settings(cfg);
    let store = (cfg.prefix_cache && cfg.disk_cache && pf.demand.distinct_prefixes > 0)
        .then(|| prepared.store(cfg, &identity))
        .and_then(|store| {
            store
                .map_err(|e| tracing::warn!("{e:#}; prefix states stay in memory for this run"))
                .ok()
        });
    let model = prepared.model();
    let settings = match exact {
        Some(e) => e.session_settings(&settings, pf.parallel),
        None => settings,
    };
    let mut session = model.new_session(&settings)?;
    let mut scheduler = Scheduler::new(
        &mut session,
        pf.parallel,
        pf.plan.resident_prefixes,
        cfg.prefix_cache,
        store.as_ref(),
        exact,
    );
    let sink = Sink::open(&cfg.output, cfg.fsync_every)?;
    let reuse = open_reuse(cfg, &earlier)?;
    let mut feed = RunFeed {
        cfg,
        input: open_input(cfg)?,
        reuse,
        embeddings: Embeddings::new(model, cfg),
        done: &done,
        prompts: prepared.prompts(),
        grammars: Grammars::new(model),
        limits: Limits {
            n_ctx_train: prepared.planning.info().n_ctx_train as usize,
            slot_budget: pf.plan.slot_budget,
            ctx_overridden: cfg.ctx_size.is_some(),
        },
        results: Results {
            sink,
            reporter: Reporter::new(worker.is_some()),
            model_name: model_name(&cfg.model),
            created: unix_now(),
        },
        progress: Progress::new(pf.demand.lines.saturating_sub(done.len()), cfg.progress),
        pressure: Pressure::new(),
        vram: VramMonitor::new(pf.gpu_layers > 0),
        stop,
        started,
    };
    let apart = Apart {
        isolate: worker.map(|w| &w.isolate),
        quarantine: worker.map(|w| &w.quarantine),
    };
    let end = admit_all(&mut scheduler, &mut feed, apart)?;
    feed.progress.finish();
    feed.results.sink.finish()?;
    manifest.finish(end == LoopEnd::Interrupted, unix_now());
    manifest.write(&cfg.output)?;
    let report = RunReport {
        metrics: scheduler.metrics.clone(),
        plan: pf.plan,
        wall: started.elapsed(),
        resumed: done.len(),
        resumed_failed: done.failed.len() as u64,
        interrupted: end == LoopEnd::Interrupted,
    };
    write_summary(
        cfg,
        &report,
        pf,
        feed.vram.gpus(),
        exact,
        remembered.as_deref(),
        &manifest,
    )?;
    Ok(report)
}

fn log_plan(pf: &Preflight, already_done: u64) {
    tracing::info!(
        requests = pf.demand.lines,
        already_done,
        prefixes = pf.demand.distinct_prefixes,
        n_ctx = pf.plan.n_ctx,
        slot_budget = pf.plan.slot_budget,
        parallel = pf.parallel,
        memory = %mib(pf.footprint.total()),
        budget = %mib(pf.budget),
        "planned"
    );
}

fn log_decode_groups(exact: Option<Exact>, remembered: Option<&Path>) {
    let record = Exact::record(exact);
    if let Some(path) = remembered {
        tracing::info!(
            "decode groups: the probe's findings on this machine, model, build and settings, \
             remembered in {}",
            path.display()
        );
    }
    let why = match exact.map(|e| e.groups) {
        Some(DecodeGroups::Any) => " (rows alike at every size)",
        Some(DecodeGroups::Fixed { .. }) => " (rows alike within that class of sizes, or the test hook asked for fixed shapes)",
        Some(DecodeGroups::Alone) => " (no class of 2 rows or more is usable: rows change with the row count, a deeper batch-mate or their place in the call)",
        None => "",
    };
    match record.sizes_tried {
        Some([first, last]) => tracing::info!(
            "decode groups: {}{why}; the probe tried sizes {first} to {last} in {:.1} s: classes {}",
            record.decision,
            record.probe_seconds.unwrap_or(0.0),
            record.classes.join(" | ")
        ),
        None => tracing::info!("decode groups: {}", record.decision),
    }
}

/// Writes the run's summary file beside its output.
fn write_summary(
    cfg: &RunConfig,
    report: &RunReport,
    pf: &Preflight,
    gpus: &[GpuUse],
    exact: Option<Exact>,
    remembered: Option<&Path>,
    manifest: &Manifest,
) -> Result<()> {
    let memory = MemoryRecord {
        peak_rss_bytes: peak_rss(),
        planned: pf.footprint.record(),
        budget_bytes: pf.budget,
        parallel: pf.parallel,
        gpu_layers: pf.gpu_layers,
        vram: pf.vram_plan(),
        // Sampled while the run went (NVML, else the backend's query): each GPU's last reading
        // and peak.
        vram_use: gpus.to_vec(),
        kv_cache: pf.kv_cache.clone(),
    };
    let mut summary = summary::run_summary(
        &report.metrics,
        &report.plan,
        report.wall,
        memory,
        Exact::record(exact),
    );
    summary.decode_groups.remembered_from = remembered.map(Path::to_path_buf);
    summary.identity = manifest.identity.clone();
    summary.other_machines = manifest.other_machines.clone();
    write_json_atomic(&summary::summary_path(&cfg.output), &summary)?;
    Ok(())
}

/// Copies instead of computations, in deterministic mode: earlier results by key (`--reuse`,
/// and this output's own lines under dedup), and the keys of the requests in flight.
struct Reuse {
    index: ResultIndex,
    twins: Twins,
}

/// The earlier outputs of `--reuse`, each checked before the model loads (its machine is
/// checked once the engine has started). The output itself is left out: its done requests
/// are skipped anyway.
fn open_earlier(cfg: &RunConfig, manifest: &Manifest) -> Result<Vec<Earlier>> {
    let own = std::fs::canonicalize(&cfg.output).ok();
    let mut out = Vec::new();
    for given in &cfg.reuse {
        let earlier = Earlier::open(given, manifest)?;
        if own.as_deref() == Some(earlier.path()) {
            tracing::info!(
                "--reuse {}: the output itself, whose done requests are skipped anyway",
                given.display()
            );
            continue;
        }
        out.push(earlier);
    }
    Ok(out)
}

/// The run's [`Reuse`]; `None` without deterministic mode, where a copy could differ from what
/// the computation would give.
fn open_reuse(cfg: &RunConfig, earlier: &[Earlier]) -> Result<Option<Reuse>> {
    if !cfg.deterministic {
        return Ok(None);
    }
    let mut index = ResultIndex::new();
    for e in earlier {
        let added = index.add_earlier(e)?;
        tracing::info!("--reuse {}: {added} results to copy", e.path().display());
    }
    if cfg.dedup {
        index.add_own(&cfg.output)?;
    }
    Ok(Some(Reuse {
        index,
        twins: Twins::new(cfg.dedup),
    }))
}

/// What the admission loop reads from and writes to in a run.
struct RunFeed<'a, 'm> {
    cfg: &'a RunConfig,
    input: Input,
    reuse: Option<Reuse>,
    embeddings: Embeddings<'m>,
    done: &'a Done,
    prompts: PromptBuilder<'m>,
    grammars: Grammars<'m>,
    limits: Limits,
    results: Results,
    progress: Progress,
    pressure: Pressure,
    vram: VramMonitor,
    stop: &'a AtomicBool,
    started: Instant,
}

impl Feed for RunFeed<'_, '_> {
    type Error = anyhow::Error;
    type Work = EmbedWork;

    fn next_request(&mut self) -> Result<Option<Result<Request, LineError>>> {
        for item in self.input.by_ref() {
            let item =
                item.with_context(|| format!("cannot read input {}", self.cfg.input.display()))?;
            let (id, line) = match &item {
                Ok(r) => (Some(r.custom_id.as_str()), r.line),
                Err(e) => (None, e.line),
            };
            if !self.done.contains(id, line) {
                return Ok(Some(item));
            }
        }
        Ok(None)
    }

    fn prepare(&mut self, request: Request, metrics: &mut Metrics) -> Result<Intake<EmbedWork>> {
        let request = match request.prompt {
            // Embeddings take no generation slot: the loop computes them beside the slots.
            Prompt::Embed(inputs) => {
                let base64 = matches!(request.endpoint, Endpoint::Embeddings { base64: true });
                let line = request.line;
                let work = EmbedWork::new(line, request.custom_id, inputs, base64);
                return Ok(Intake::Work { line, work });
            }
            prompt => Request { prompt, ..request },
        };
        let job = match prepare(
            request,
            &mut self.prompts,
            &mut self.grammars,
            &self.cfg.defaults(),
            &self.limits,
        ) {
            Ok(job) => job,
            Err(e) => return Ok(Intake::Failed(e)),
        };
        if self.copy_earlier(&job.key, job.line, &job.custom_id, metrics)? {
            return Ok(Intake::Settled);
        }
        if self.reuse.as_mut().is_some_and(|r| r.twins.hold(&job)) {
            return Ok(Intake::Settled);
        }
        Ok(Intake::Run(job))
    }

    fn admitted(&mut self, job: &Job) {
        self.results.reporter.report(Event::Admitted(job.line));
        abort_if_poisoned(&job.custom_id);
    }

    fn work(&mut self, work: &mut EmbedWork, metrics: &mut Metrics) -> Result<Piece> {
        let line = work.line;
        match self.embeddings.advance(work, self.cfg.threads, metrics) {
            Step::More => return Ok(Piece::More),
            Step::Keyed(key) => {
                if !self.copy_earlier(&key, line, &work.custom_id, metrics)? {
                    // In flight from here: a supervisor sets apart a line whose inputs crash
                    // the worker.
                    self.results.reporter.report(Event::Admitted(line));
                    return Ok(Piece::More);
                }
            }
            Step::Failed(code, message) => {
                let failed = LineError::new(line, Some(&work.custom_id), code, message);
                self.results.write(metrics, &Err(failed), None)?;
            }
            Step::Done(key, vectors) => {
                let r = &mut self.results;
                let n_tokens = work.n_tokens();
                let mut success = ResultLine::embeddings(
                    &work.custom_id,
                    &vectors,
                    work.base64,
                    n_tokens,
                    &r.model_name,
                );
                if self.reuse.is_some() {
                    success = success.with_computation(key);
                }
                let placed = r.write_ok(metrics, &success, line)?;
                if let Some(reuse) = &mut self.reuse {
                    reuse.index.record(key, placed);
                }
            }
        }
        Ok(Piece::Done)
    }

    fn write(&mut self, metrics: &mut Metrics, outcome: Outcome) -> Result<Option<Job>> {
        let line = outcome.as_ref().map_or_else(|e| e.line, |c| c.line);
        let Some(reuse) = &mut self.reuse else {
            self.results.write(metrics, &outcome, None)?;
            return Ok(None);
        };
        let finished = reuse.twins.finished(line, &outcome);
        let written = self
            .results
            .write(metrics, &outcome, finished.as_ref().map(|f| f.key))?;
        let Some(Finished { key, release }) = finished else {
            return Ok(None);
        };
        if let Some(place) = written {
            reuse.index.record(key, place);
        }
        let twins = match release {
            Release::Copy(twins) => twins,
            // It failed for a reason of the moment: its twins compute their own outcome.
            Release::Run(job) => return Ok(Some(*job)),
        };
        // Each twin gets what it would have computed: the same line, with its own ids.
        for twin in twins {
            match &outcome {
                Ok(c) => {
                    let r = &mut self.results;
                    let copy = r.success_line(c, Some(key)).reissue(
                        &twin.custom_id,
                        &r.model_name,
                        r.created,
                    );
                    r.write_copy(metrics, &copy, twin.line, Origin::ThisOutput)?;
                }
                // An error of the request's own content (a transient one is run again): the
                // twin's is the same.
                Err(e) => {
                    let failed = LineError {
                        line: twin.line,
                        custom_id: Some(twin.custom_id),
                        ..e.clone()
                    };
                    self.results.write(metrics, &Err(failed), None)?;
                }
            }
        }
        Ok(None)
    }

    fn memory_short(&mut self) -> bool {
        self.pressure.high()
    }

    fn stop_requested(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    fn stepped(&mut self, metrics: &Metrics) {
        self.progress
            .update(metrics, self.started.elapsed(), self.vram.sample());
    }
}

impl RunFeed<'_, '_> {
    /// Writes, for the request `custom_id` on input line `line`, a copy of the result an
    /// earlier computation with `key` wrote, when the index has one; false when it has none.
    fn copy_earlier(
        &mut self,
        key: &ComputationKey,
        line: u64,
        custom_id: &str,
        metrics: &mut Metrics,
    ) -> Result<bool> {
        let Some((copy, origin)) = self.reuse.as_ref().and_then(|r| r.index.find(key)) else {
            return Ok(false);
        };
        let r = &mut self.results;
        let copy = copy.reissue(custom_id, &r.model_name, r.created);
        r.write_copy(metrics, &copy, line, origin)?;
        Ok(true)
    }
}

/// Result lines on their way to the output, counted, and reported to a supervisor.
struct Results {
    sink: Sink,
    reporter: Reporter,
    model_name: String,
    created: u64,
}

impl Results {
    /// The line of a completed request, tagged with its computation's key when it has one.
    fn success_line(&self, c: &Completion, key: Option<ComputationKey>) -> ResultLine {
        let line = ResultLine::success(c, &self.model_name, self.created);
        match key {
            Some(key) => line.with_computation(key),
            None => line,
        }
    }

    /// Writes the success line of the request on input line `line`; returns where it lies.
    fn write_ok(
        &mut self,
        metrics: &mut Metrics,
        success: &ResultLine,
        line: u64,
    ) -> Result<Placed> {
        let placed = self.sink.write(success)?;
        metrics.requests_ok += 1;
        self.reporter.report(Event::Written(line));
        Ok(placed)
    }

    /// Writes a computed outcome; returns where a success line lies.
    fn write(
        &mut self,
        metrics: &mut Metrics,
        outcome: &Outcome,
        key: Option<ComputationKey>,
    ) -> Result<Option<Placed>> {
        match outcome {
            Ok(c) => {
                let success = self.success_line(c, key);
                self.write_ok(metrics, &success, c.line).map(Some)
            }
            Err(e) => {
                self.sink.write(&ResultLine::failure(e))?;
                metrics.requests_failed += 1;
                *metrics
                    .errors_by_code
                    .entry(e.code.as_str().to_owned())
                    .or_default() += 1;
                self.reporter.report(Event::Written(e.line));
                Ok(None)
            }
        }
    }

    /// Writes a copy of a result computed before, for the request on input line `line`.
    fn write_copy(
        &mut self,
        metrics: &mut Metrics,
        copy: &ResultLine,
        line: u64,
        origin: Origin,
    ) -> Result<()> {
        self.write_ok(metrics, copy, line)?;
        match origin {
            Origin::Earlier => metrics.requests_reused += 1,
            Origin::ThisOutput => metrics.requests_deduplicated += 1,
        }
        Ok(())
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
