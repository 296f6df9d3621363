//! One batch run: lock the output, plan, then stream every request through the scheduler into
//! the output, resuming where an earlier run of the same computation stopped.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::BufReader;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};

use crate::checkpoint;
use crate::cli::RunConfig;
use crate::digest::sha256_file_hex;
use crate::engine::{RowDependence, Session, SessionSettings};
use crate::grammar::Grammars;
use crate::job::{prepare, Limits};
use crate::lock::OutputLock;
use crate::manifest::{InputRecord, Manifest, ModelRecord, RunRecord, RunState, MANIFEST_VERSION};
use crate::memory::{mib, peak_rss, Pressure, VramMonitor};
use crate::metrics::Metrics;
use crate::output::{error_line, model_name, success_line};
use crate::plan::KvLayout;
use crate::prefix_store::model_sha256;
use crate::preflight::{load_model, load_offloaded, open_store, preflight, vram_json, Preflight};
use crate::progress::Progress;
use crate::prompt::PromptBuilder;
use crate::request::{ErrorCode, LineError, RequestReader};
use crate::scheduler::{Admission, Exact, Job, Outcome, Scheduler, EXACT_MAX_ROWS};
use crate::sink::Sink;
use crate::summary;
use crate::worker::{abort_if_poisoned, Event, Reporter, WorkerEnv};

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
    let _lock = match worker {
        Some(w) => OutputLock::inherit(&cfg.output, w.lock_fd)?,
        None => OutputLock::acquire(&cfg.output)?,
    };
    let open_input = || -> Result<RequestReader<BufReader<File>>> {
        let file = File::open(&cfg.input)
            .with_context(|| format!("cannot read input {}", cfg.input.display()))?;
        Ok(RequestReader::new(BufReader::new(file), cfg.fields).shard(cfg.shard))
    };
    open_input()?;
    if !cfg.model.is_file() {
        anyhow::bail!(
            "model {} not found: run ./models/fetch.sh to fetch the default model, or pass \
             --model with the path of a GGUF file",
            cfg.model.display()
        );
    }
    // The memo spares a re-hash of a large model at every start, with or without a disk cache.
    let model_hash = model_sha256(&cfg.model, Some(&cfg.prefix_cache_dir))?;
    let mut manifest = Manifest {
        version: MANIFEST_VERSION,
        input: InputRecord {
            path: cfg.input.clone(),
            sha256: sha256_file_hex(&cfg.input)?,
            total: 0,
        },
        model: ModelRecord {
            path: cfg.model.clone(),
            sha256: hex::encode(model_hash),
        },
        params: output_params(cfg),
        runs: Vec::new(),
        state: RunState::Running,
        shard: cfg.shard,
        finished_unix: None,
        merged_shards: None,
    };
    let done = checkpoint::prepare(&cfg.output, &mut manifest, cfg.restart, cfg.retry_failed)?;

    // Planned on the CPU: the layers to offload are known only once the plan fits the GPU.
    let (planning, renderer) = load_model(cfg, 0)?;
    let info = planning.info();
    let mut prompts = PromptBuilder::new(&planning, &renderer);
    let Preflight {
        demand,
        plan,
        footprint,
        budget,
        parallel,
        gpu_layers,
        vram,
    } = preflight(cfg, &planning, &mut prompts, |_, _| {})?;
    let offloaded = load_offloaded(cfg, gpu_layers)?;
    let model = offloaded.as_ref().unwrap_or(&planning);
    manifest.input.total = demand.lines;
    manifest.record_run(RunRecord {
        started_unix: unix_now(),
        parallel: u32::try_from(parallel)?,
    });
    manifest.write(&cfg.output)?;
    let mut results = Results {
        sink: Sink::open(&cfg.output, cfg.fsync_every)?,
        reporter: Reporter::new(worker.is_some()),
        model_name: model_name(&cfg.model),
        created: unix_now(),
    };
    tracing::info!(
        requests = demand.lines,
        already_done = done.len(),
        prefixes = demand.distinct_prefixes,
        n_ctx = plan.n_ctx,
        slot_budget = plan.slot_budget,
        parallel,
        memory = %mib(footprint.total()),
        budget = %mib(budget),
        "planned"
    );
    let settings = SessionSettings {
        n_ctx: plan.n_ctx,
        n_batch: cfg.batch_size,
        n_seq_max: plan.n_seq_max,
        threads: cfg.threads,
        flash_attn: cfg.flash_attn,
        kv_unified: plan.layout == KvLayout::Unified,
    };
    let store = if cfg.prefix_cache && cfg.disk_cache && demand.distinct_prefixes > 0 {
        open_store(cfg, model, &settings, gpu_layers, model_hash)
    } else {
        None
    };
    let mut session = model.new_session(&settings)?;
    let exact = match plan.layout {
        KvLayout::Unified => None,
        KvLayout::Streams => Some(exact_mode(&mut session, parallel)?),
    };
    let decode_groups = decode_groups(exact);
    tracing::info!(
        "decode groups: {decode_groups}{}",
        match exact.map(|e| e.fixed_block) {
            Some(None) => " (the probe found rows independent of their batch-mates)",
            Some(Some(_)) => " (the probe found rows that depend on how many share a call)",
            None => "",
        }
    );
    let mut scheduler = Scheduler::new(
        &mut session,
        parallel,
        plan.resident_prefixes,
        cfg.prefix_cache,
        store.as_ref(),
        exact,
    );
    let limits = Limits {
        n_ctx_train: info.n_ctx_train as usize,
        slot_budget: plan.slot_budget,
        ctx_overridden: cfg.ctx_size.is_some(),
        slots: parallel,
    };
    let mut grammars = Grammars::new(model);
    let no_lines = BTreeSet::new();
    let (isolate, quarantine) =
        worker.map_or((&no_lines, &no_lines), |w| (&w.isolate, &w.quarantine));

    let mut progress = Progress::new(demand.lines.saturating_sub(done.len()), cfg.progress);
    let mut pressure = Pressure::new();
    let mut vram_monitor = VramMonitor::new(gpu_layers > 0);
    let mut input = open_input()?;
    let mut input_done = false;
    let mut waiting: Option<Job> = None;
    // An isolated request runs alone: nothing is admitted beside it.
    let mut alone = false;
    let mut finished = Vec::new();
    let mut interrupted = false;
    loop {
        if stop.load(Ordering::Relaxed) {
            interrupted = true;
            break;
        }
        alone = alone && !scheduler.is_idle();
        // Fill free slots, unless memory is short; a refused request waits for the next step.
        while !alone && scheduler.has_idle_slot() && !pressure.high() {
            let job = match waiting.take() {
                Some(job) => job,
                None => match input.next() {
                    None => {
                        input_done = true;
                        break;
                    }
                    Some(item) => {
                        let item = item.with_context(|| {
                            format!("cannot read input {}", cfg.input.display())
                        })?;
                        let (id, line) = match &item {
                            Ok(r) => (Some(r.custom_id.as_str()), r.line),
                            Err(e) => (None, e.line),
                        };
                        if done.contains(id, line) {
                            continue;
                        }
                        let job = item.and_then(|r| {
                            if quarantine.contains(&r.line) {
                                Err(quarantined(r.line, &r.custom_id))
                            } else {
                                prepare(r, &mut prompts, &mut grammars, cfg, &limits)
                            }
                        });
                        match job {
                            Ok(job) => job,
                            Err(e) => {
                                results.write(&mut scheduler.metrics, Err(e))?;
                                continue;
                            }
                        }
                    }
                },
            };
            let solo = isolate.contains(&job.line);
            if solo && !scheduler.is_idle() {
                waiting = Some(job);
                break;
            }
            results.reporter.report(Event::Admitted(job.line));
            abort_if_poisoned(&job.custom_id);
            match scheduler.admit(job) {
                Ok(Admission::Started) => alone = solo,
                Ok(Admission::Wait(job)) => {
                    waiting = Some(job);
                    break;
                }
                Err(e) => results.write(&mut scheduler.metrics, Err(e))?,
            }
        }
        if scheduler.is_idle() {
            if input_done && waiting.is_none() {
                break;
            }
            // Admission is paused for memory: wait for it to free up.
            std::thread::sleep(Duration::from_millis(200));
            continue;
        }
        scheduler.step(&mut finished);
        for outcome in finished.drain(..) {
            results.write(&mut scheduler.metrics, outcome)?;
        }
        progress.update(&scheduler.metrics, started.elapsed(), vram_monitor.sample());
    }
    progress.finish();
    results.sink.finish()?;
    if interrupted {
        manifest.state = RunState::Interrupted;
    } else {
        manifest.state = RunState::Finished;
        manifest.finished_unix = Some(unix_now());
    }
    manifest.write(&cfg.output)?;
    let report = RunReport {
        metrics: scheduler.metrics.clone(),
        plan,
        wall: started.elapsed(),
        resumed: done.len(),
        resumed_failed: done.failed.len() as u64,
        interrupted,
    };
    let mut summary = summary::to_json(&report.metrics, &report.plan, report.wall);
    summary["memory"] = serde_json::json!({
        "peak_rss_bytes": peak_rss(),
        "planned": footprint.to_json(),
        "budget_bytes": budget,
        "parallel": parallel,
        "gpu_layers": gpu_layers,
        "vram": vram_json(vram),
        // Sampled while the run went (NVML, else the backend's query): each GPU's last reading
        // and peak.
        "vram_use": vram_monitor.gpus(),
    });
    summary["decode_groups"] = decode_groups.into();
    summary::write(&summary::summary_path(&cfg.output), &summary)?;
    Ok(report)
}

/// Exact mode's decode groups, as the start-up probe finds this device's kernels.
fn exact_mode(session: &mut Session<'_>, parallel: usize) -> Result<Exact> {
    // The pad stream follows the slots, so slots and pad are consecutive sequences.
    let pad = i32::try_from(parallel)?;
    let probe: Vec<i32> = (0..=pad).collect();
    let fixed_block = match session.decode_group_probe(&probe)? {
        RowDependence::SameFrom2UpTo(rows) => Some(rows),
        // Test hook: the fixed-shape path, on kernels that would not need it.
        RowDependence::None if std::env::var_os(FIXED_SHAPE_ENV).is_some() => Some(EXACT_MAX_ROWS),
        RowDependence::None => None,
    };
    Ok(Exact {
        pad_seq: pad,
        fixed_block,
    })
}

/// How exactness is kept, as the summary says it.
fn decode_groups(exact: Option<Exact>) -> String {
    match exact.map(|e| e.fixed_block) {
        None => "mixed (not deterministic)".to_owned(),
        Some(None) => "any shape".to_owned(),
        Some(Some(rows)) => format!("fixed-shape, 2 to {rows} rows a call"),
    }
}

/// Test hook: with this environment variable set, deterministic runs decode generated tokens
/// in fixed-shape blocks even where the probe finds it unneeded (the path GPU kernels take).
pub const FIXED_SHAPE_ENV: &str = "INFER_BATCH_TEST_FIXED_SHAPE";

/// Result lines on their way to the output, counted, and reported to a supervisor.
struct Results {
    sink: Sink,
    reporter: Reporter,
    model_name: String,
    created: u64,
}

impl Results {
    fn write(&mut self, metrics: &mut Metrics, outcome: Outcome) -> Result<()> {
        let line = match &outcome {
            Ok(c) => {
                metrics.requests_ok += 1;
                self.sink
                    .write(&success_line(c, &self.model_name, self.created))?;
                c.line
            }
            Err(e) => {
                metrics.requests_failed += 1;
                *metrics
                    .errors_by_code
                    .entry(e.code.as_str().to_owned())
                    .or_default() += 1;
                self.sink.write(&error_line(e))?;
                e.line
            }
        };
        self.reporter.report(Event::Written(line));
        Ok(())
    }
}

/// The error line of a request that was in flight at two worker crashes.
fn quarantined(line: u64, custom_id: &str) -> LineError {
    LineError::new(
        line,
        Some(custom_id),
        ErrorCode::EngineError,
        "quarantined: the worker process crashed twice while this request was in flight, so \
         --supervise set it aside and the batch went on; run again with --retry-failed to retry it"
            .into(),
    )
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The settings that change what a request's line says; a resume must not mix two of them.
/// `--parallel` is not among them: in deterministic mode it changes nothing, and without it
/// batch-mates change the last bits anyway, resumed or not. The manifest records it per run.
fn output_params(cfg: &RunConfig) -> serde_json::Map<String, serde_json::Value> {
    let serde_json::Value::Object(mut params) = serde_json::json!({
        "max-tokens": cfg.max_tokens,
        "temperature": cfg.temperature,
        "seed": cfg.seed,
        "batch-size": cfg.batch_size,
        "flash-attn": format!("{:?}", cfg.flash_attn).to_lowercase(),
        "gpu-layers": cfg.gpu_layers,
        "no-prefix-cache": !cfg.prefix_cache,
        "ctx-size": cfg.ctx_size,
        "deterministic": cfg.deterministic,
        "chat-template": cfg.chat_template.identity(),
    }) else {
        unreachable!("a JSON object literal")
    };
    // Only when set, so that outputs written before the flag existed still resume.
    if cfg.fields.ignore_unknown {
        params.insert("ignore-unknown-fields".into(), true.into());
    }
    params
}
