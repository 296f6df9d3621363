//! One batch run: scan the input, plan the context, then stream every request through the
//! scheduler into the output.

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

use crate::checkpoint::{self, file_sha256, Manifest, RunState};
use crate::cli::RunConfig;
use crate::engine::{
    llama_build, FlashAttn, Model, ModelSettings, SamplerSpec, SessionSettings, Token,
};
use crate::memory::{
    compute_bytes, current_rss, gpu_memory, gpu_share, kv_bytes, mib, peak_rss, pressure_floor,
    system_memory, Footprint, PROCESS_ALLOWANCE,
};
use crate::metrics::Metrics;
use crate::output::{error_line, success_line};
use crate::plan::{plan, Demand, KvLayout, Plan, CTX_STEP, MAX_TRACKED_PREFIXES};
use crate::prefix_cache::{materialize, PrefixEvent};
use crate::prefix_store::{model_sha256, PrefixStore, StateIdentity};
use crate::prompt::{PrefixKey, PromptBuilder};
use crate::request::{ErrorCode, LineError, Request, RequestReader};
use crate::scheduler::{Admission, Exact, GenParams, Job, Outcome, Scheduler};
use crate::sink::Sink;
use crate::summary;

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct RunReport {
    /// Measured counters of this run (a resumed run counts only its own work).
    pub metrics: Metrics,
    /// The context plan used.
    pub plan: Plan,
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
/// are dropped (a resumed run redoes them) and the run returns as interrupted.
///
/// # Errors
/// When the run cannot proceed: unreadable input, missing model, an output that holds results
/// of another computation, a context that cannot be allocated. A bad request is never an
/// error here: it gets its error line and the batch goes on.
pub fn run(cfg: &RunConfig, stop: &AtomicBool) -> Result<RunReport> {
    let started = Instant::now();
    let open_input = || -> Result<RequestReader<BufReader<File>>> {
        let file = File::open(&cfg.input)
            .with_context(|| format!("cannot read input {}", cfg.input.display()))?;
        Ok(RequestReader::new(BufReader::new(file)))
    };
    open_input()?;
    if !cfg.model.is_file() {
        anyhow::bail!(
            "model {} not found: run ./models/fetch.sh to fetch the default model, or pass \
             --model with the path of a GGUF file",
            cfg.model.display()
        );
    }
    let memo_dir = cfg.disk_cache.then_some(cfg.prefix_cache_dir.as_path());
    let model_hash = model_sha256(&cfg.model, memo_dir)?;
    let mut manifest = Manifest {
        input_sha256: file_sha256(&cfg.input)?,
        model_sha256: crate::prefix_store::hex(&model_hash),
        params: output_params(cfg),
        total: 0,
        state: RunState::Running,
    };
    let done = checkpoint::prepare(&cfg.output, &manifest, cfg.restart, cfg.retry_failed)?;

    let model = load_model(cfg)?;
    let info = model.info();
    let mut prompts = PromptBuilder::new(&model);
    let Preflight {
        demand,
        plan,
        footprint,
        budget,
        parallel,
        vram,
    } = preflight(cfg, &model, &mut prompts)?;
    manifest.total = demand.lines;
    manifest.write(&cfg.output, &cfg.input, &cfg.model)?;
    let mut sink = Sink::open(&cfg.output, cfg.fsync_every)?;
    tracing::info!(
        requests = demand.lines,
        already_done = done.len(),
        prefixes = demand.prefix_lens.len(),
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
    let store = if cfg.prefix_cache && cfg.disk_cache && !demand.prefix_lens.is_empty() {
        open_store(cfg, &settings, model_hash)
    } else {
        None
    };
    let mut session = model.new_session(&settings)?;
    let exact = match plan.layout {
        KvLayout::Unified => None,
        KvLayout::Streams => {
            // The pad stream is the last sequence, after the slots and the prefixes. It is
            // only needed when this model's kernels treat a lone row differently.
            let pad = i32::try_from(plan.n_seq_max - 1)?;
            let invariant = session.single_row_is_batch_invariant(0, pad)?;
            tracing::debug!(invariant, "single-row decode probe");
            Some(Exact {
                pad_seq: (!invariant).then_some(pad),
            })
        }
    };
    let mut scheduler = Scheduler::new(
        &mut session,
        parallel,
        plan.resident_prefixes,
        cfg.prefix_cache,
        store.as_ref(),
        exact,
    );

    let model_name = model_name(&cfg.model);
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let limits = Limits {
        n_ctx_train: info.n_ctx_train as usize,
        slot_budget: plan.slot_budget,
        ctx_overridden: cfg.ctx_size.is_some(),
    };
    let write = |sink: &mut Sink, metrics: &mut Metrics, outcome: Outcome| -> Result<()> {
        match outcome {
            Ok(c) => {
                metrics.requests_ok += 1;
                sink.write(&success_line(&c, &model_name, created))
            }
            Err(e) => {
                metrics.requests_failed += 1;
                *metrics
                    .errors_by_code
                    .entry(e.code.as_str().to_owned())
                    .or_default() += 1;
                sink.write(&error_line(&e))
            }
        }
    };

    let remaining = demand.lines.saturating_sub(done.len());
    let mut progress = Progress::new(remaining);
    let mut pressure = Pressure::new();
    let mut input = open_input()?;
    let mut input_done = false;
    let mut waiting: Option<Job> = None;
    let mut finished = Vec::new();
    let mut interrupted = false;
    loop {
        if stop.load(Ordering::Relaxed) {
            interrupted = true;
            break;
        }
        // Fill free slots, unless memory is short; a refused request waits for the next step.
        while scheduler.has_idle_slot() && !pressure.high() {
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
                        match item.and_then(|r| prepare(r, &mut prompts, cfg, &limits)) {
                            Ok(job) => job,
                            Err(e) => {
                                write(&mut sink, &mut scheduler.metrics, Err(e))?;
                                continue;
                            }
                        }
                    }
                },
            };
            match scheduler.admit(job) {
                Ok(Admission::Started) => {}
                Ok(Admission::Wait(job)) => {
                    waiting = Some(job);
                    break;
                }
                Err(e) => write(&mut sink, &mut scheduler.metrics, Err(e))?,
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
            write(&mut sink, &mut scheduler.metrics, outcome)?;
        }
        progress.update(&scheduler.metrics, started.elapsed());
    }
    progress.finish();
    sink.finish()?;
    manifest.state = if interrupted {
        RunState::Interrupted
    } else {
        RunState::Finished
    };
    manifest.write(&cfg.output, &cfg.input, &cfg.model)?;
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
        "vram": vram_json(vram),
        "vram_used_bytes_at_end": vram.and_then(|_| gpu_memory().ok()).and_then(|d| d.first().map(|g| g.total - g.free)),
    });
    summary::write(&summary::summary_path(&cfg.output), &summary)?;
    Ok(report)
}

/// The settings that change what a request's line says; a resume must not mix two of them.
fn output_params(cfg: &RunConfig) -> serde_json::Value {
    serde_json::json!({
        "max-tokens": cfg.max_tokens,
        "temperature": cfg.temperature,
        "seed": cfg.seed,
        "batch-size": cfg.batch_size,
        "flash-attn": format!("{:?}", cfg.flash_attn).to_lowercase(),
        "gpu-layers": cfg.gpu_layers,
        "no-prefix-cache": !cfg.prefix_cache,
        "ctx-size": cfg.ctx_size,
        "deterministic": cfg.deterministic,
        // Batch-mates change the rounding unless the run is deterministic.
        "parallel": (!cfg.deterministic).then_some(cfg.parallel),
    })
}

/// Cells one query attends over: the whole cache when unified, one stream otherwise.
fn attention_span(plan: &Plan) -> u32 {
    match plan.layout {
        KvLayout::Unified => plan.n_ctx,
        KvLayout::Streams => plan.n_ctx / plan.n_seq_max.max(1),
    }
}

fn load_model(cfg: &RunConfig) -> Result<Model> {
    Ok(Model::load(&ModelSettings {
        path: cfg.model.clone(),
        gpu_layers: cfg.gpu_layers,
        verbose: cfg.verbose,
    })?)
}

/// The plan a run uses, with its memory footprint.
#[derive(Debug, Clone)]
pub struct Preflight {
    /// What the input needs.
    pub demand: Demand,
    /// The context plan.
    pub plan: Plan,
    /// Memory the plan needs.
    pub footprint: Footprint,
    /// Memory it may use.
    pub budget: u64,
    /// Slots, possibly fewer than asked for so the plan fits.
    pub parallel: usize,
    /// With offloaded layers and NVML: (VRAM the plan needs, VRAM it may use).
    pub vram: Option<(u64, u64)>,
}

impl Preflight {
    /// As JSON, for `--dry-run`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "requests": self.demand.lines,
            "valid_requests": self.demand.requests,
            "distinct_prefixes": self.demand.prefix_lens.len(),
            "parallel": self.parallel,
            "n_ctx": self.plan.n_ctx,
            "slot_budget": self.plan.slot_budget,
            "kv_layout": format!("{:?}", self.plan.layout).to_lowercase(),
            "memory": self.footprint.to_json(),
            "budget_bytes": self.budget,
            "vram": vram_json(self.vram),
            "peak_rss_bytes": peak_rss(),
        })
    }
}

/// The VRAM part of a plan, as the dry run and the summary report it.
fn vram_json(vram: Option<(u64, u64)>) -> serde_json::Value {
    vram.map_or(
        serde_json::Value::Null,
        |(need, free)| serde_json::json!({"planned_bytes": need, "budget_bytes": free}),
    )
}

/// Scans the input and plans the context; lowers `--parallel` until the plan fits the memory
/// budget (`--memory-budget`, else 90% of the RAM free now).
///
/// # Errors
/// When even one slot does not fit: the message gives the numbers and what to change.
pub fn preflight(
    cfg: &RunConfig,
    model: &Model,
    prompts: &mut PromptBuilder<'_>,
) -> Result<Preflight> {
    let file = File::open(&cfg.input)
        .with_context(|| format!("cannot read input {}", cfg.input.display()))?;
    let info = model.info();
    let demand = scan(
        RequestReader::new(BufReader::new(file)),
        prompts,
        cfg,
        info.n_ctx_train as usize,
        |_, _| {},
    )?;
    let budget = match (cfg.memory_budget, system_memory()) {
        (Some(b), _) => b,
        (None, Some(mem)) => mem.available / 10 * 9,
        (None, None) => {
            tracing::warn!("the OS does not report free memory; planning without a budget");
            u64::MAX
        }
    };
    let flash_attn = cfg.flash_attn != FlashAttn::Off;
    // Free VRAM on the first GPU, when layers are offloaded and NVML can tell.
    let vram = (cfg.gpu_layers > 0)
        .then(|| match gpu_memory() {
            Ok(devices) if !devices.is_empty() => Some(devices[0].free / 10 * 9),
            Ok(_) => {
                tracing::warn!("no NVIDIA GPU found; planning everything for the CPU");
                None
            }
            Err(e) => {
                tracing::warn!("no NVIDIA driver or NVML ({e}); planning everything for the CPU");
                None
            }
        })
        .flatten();
    let mut parallel = cfg.parallel as usize;
    loop {
        let plan = plan(
            &demand,
            parallel,
            cfg.max_prefixes as usize,
            cfg.prefix_cache,
            cfg.ctx_size.map(|c| c as usize),
            if cfg.deterministic {
                KvLayout::Streams
            } else {
                KvLayout::Unified
            },
        )?;
        let footprint = Footprint {
            weights: info.size,
            kv: kv_bytes(&info, plan.n_ctx),
            compute: compute_bytes(&info, attention_span(&plan), cfg.batch_size, flash_attn),
            process: PROCESS_ALLOWANCE,
        };
        let vram_fits = vram
            .as_ref()
            .is_none_or(|free| gpu_share(&footprint, cfg.gpu_layers, info.n_layer) <= *free);
        if footprint.total() <= budget && vram_fits {
            if parallel < cfg.parallel as usize {
                tracing::warn!(
                    "lowered --parallel from {} to {parallel} so the plan ({}) fits the memory budget ({})",
                    cfg.parallel,
                    mib(footprint.total()),
                    mib(budget)
                );
            }
            return Ok(Preflight {
                demand,
                plan,
                footprint,
                budget,
                parallel,
                vram: vram.map(|free| (gpu_share(&footprint, cfg.gpu_layers, info.n_layer), free)),
            });
        }
        if parallel == 1 && !vram_fits {
            let need = gpu_share(&footprint, cfg.gpu_layers, info.n_layer);
            anyhow::bail!(
                "not enough GPU memory even for one slot: {} layers need {} of VRAM but {} is \
                 free; lower --gpu-layers or --ctx-size",
                cfg.gpu_layers.min(info.n_layer),
                mib(need),
                mib(vram.unwrap_or(0))
            );
        }
        if parallel == 1 {
            anyhow::bail!(
                "not enough memory even for one slot: the plan needs {} (weights {}, KV cache {} \
                 for {} tokens, compute {}, process {}) but the budget is {}. Lower max_tokens or \
                 --ctx-size, shorten the prompts, use a smaller model, free memory, or raise \
                 --memory-budget",
                mib(footprint.total()),
                mib(footprint.weights),
                mib(footprint.kv),
                plan.n_ctx,
                mib(footprint.compute),
                mib(footprint.process),
                mib(budget)
            );
        }
        parallel /= 2;
    }
}

/// `--dry-run`: loads the model, scans the input and returns the plan, touching no output.
///
/// # Errors
/// As [`preflight`], and when the model cannot be loaded.
pub fn dry_run(cfg: &RunConfig) -> Result<Preflight> {
    let model = load_model(cfg)?;
    let mut prompts = PromptBuilder::new(&model);
    preflight(cfg, &model, &mut prompts)
}

/// Pauses admission while free memory is under the floor, checking at most once a second.
struct Pressure {
    last_check: Instant,
    paused: bool,
}

impl Pressure {
    fn new() -> Self {
        Self {
            last_check: Instant::now(),
            paused: false,
        }
    }

    fn high(&mut self) -> bool {
        if self.last_check.elapsed() >= Duration::from_secs(1) {
            self.last_check = Instant::now();
            let Some(mem) = system_memory() else {
                return false;
            };
            let floor = pressure_floor(mem.total);
            let short = mem.available < floor;
            if short != self.paused {
                if short {
                    tracing::warn!(
                        "memory pressure: {} free, under {}; admitting no new request until it frees",
                        mib(mem.available),
                        mib(floor)
                    );
                } else {
                    tracing::info!(
                        "memory pressure over: {} free; admitting again",
                        mib(mem.available)
                    );
                }
                self.paused = short;
            }
        }
        self.paused
    }
}

/// Progress on stderr: a bar on a terminal, else a plain line every 10 seconds.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    total: u64,
    last_line: Instant,
}

impl Progress {
    fn new(total: u64) -> Self {
        use std::io::IsTerminal;
        let bar = std::io::stderr().is_terminal().then(|| {
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
            last_line: Instant::now(),
        }
    }

    fn update(&mut self, m: &Metrics, elapsed: Duration) {
        let done = m.requests_ok + m.requests_failed;
        let secs = elapsed.as_secs_f64().max(1e-9);
        let rate = done as f64 / secs;
        let status = format!(
            "{} failed, {rate:.2} req/s, prefill {:.0} tok/s, decode {:.0} tok/s, RSS {}",
            m.requests_failed,
            m.prefill_tokens_per_sec(),
            m.decode_tokens_per_sec(),
            current_rss().map_or_else(|| "?".into(), mib)
        );
        match &self.bar {
            Some(bar) => {
                bar.set_position(done);
                bar.set_message(status);
            }
            None if self.last_line.elapsed() >= Duration::from_secs(10) => {
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

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// Opens the prefix state store for this model and layout; without one the run goes on,
/// sharing prefixes in memory only.
fn open_store(
    cfg: &RunConfig,
    settings: &SessionSettings,
    model_sha256: [u8; 32],
) -> Option<PrefixStore> {
    match prefix_store(cfg, settings, model_sha256) {
        Ok(store) => Some(store),
        Err(e) => {
            tracing::warn!("{e:#}; prefix states stay in memory for this run");
            None
        }
    }
}

/// The prefix state store of `--prefix-cache-dir`, keyed for this model, build and layout.
fn prefix_store(
    cfg: &RunConfig,
    settings: &SessionSettings,
    model_sha256: [u8; 32],
) -> Result<PrefixStore> {
    let identity = StateIdentity {
        model_sha256,
        llama_build: llama_build(),
        layout: settings.state_layout(cfg.gpu_layers),
    };
    PrefixStore::open(&cfg.prefix_cache_dir, cfg.prefix_cache_max_bytes, identity)
}

/// Prefills and stores every distinct prefix of the input without decoding any request.
///
/// # Errors
/// When the input or model cannot be read, or the store cannot be opened.
pub fn warm(cfg: &RunConfig) -> Result<Vec<PrefixEvent>> {
    let file = File::open(&cfg.input)
        .with_context(|| format!("cannot read input {}", cfg.input.display()))?;
    if !cfg.model.is_file() {
        anyhow::bail!("model {} not found", cfg.model.display());
    }
    let model = load_model(cfg)?;
    let mut prompts = PromptBuilder::new(&model);
    let mut prefixes: Vec<Vec<Token>> = Vec::new();
    let reader = RequestReader::new(BufReader::new(file));
    scan(
        reader,
        &mut prompts,
        cfg,
        model.info().n_ctx_train as usize,
        |_, tokens| {
            prefixes.push(tokens.to_vec());
        },
    )?;
    let longest = prefixes.iter().map(Vec::len).max().unwrap_or(0);
    let settings = SessionSettings {
        n_ctx: u32::try_from(longest.div_ceil(CTX_STEP).max(1) * CTX_STEP)?,
        n_batch: cfg.batch_size,
        n_seq_max: 1,
        threads: cfg.threads,
        flash_attn: cfg.flash_attn,
        kv_unified: !cfg.deterministic,
    };
    let model_hash = model_sha256(&cfg.model, Some(&cfg.prefix_cache_dir))?;
    let store = prefix_store(cfg, &settings, model_hash)?;
    let mut session = model.new_session(&settings)?;
    let mut metrics = Metrics::default();
    let mut events = Vec::new();
    for tokens in &prefixes {
        events.push(materialize(
            &mut session,
            0,
            tokens,
            Some(&store),
            &mut metrics,
        )?);
        session.clear_seq(0);
    }
    Ok(events)
}

/// Bounds a request must fit.
struct Limits {
    n_ctx_train: usize,
    slot_budget: usize,
    ctx_overridden: bool,
}

/// First pass: how many requests, which prefixes, and the largest per-request need.
/// `on_new_prefix` sees each distinct shared prefix once.
fn scan(
    input: RequestReader<BufReader<File>>,
    prompts: &mut PromptBuilder<'_>,
    cfg: &RunConfig,
    n_ctx_train: usize,
    mut on_new_prefix: impl FnMut(PrefixKey, &[Token]),
) -> Result<Demand> {
    let mut demand = Demand::default();
    let mut prefixes: HashMap<PrefixKey, usize> = HashMap::new();
    for item in input {
        let item = item.with_context(|| format!("cannot read input {}", cfg.input.display()))?;
        demand.lines += 1;
        let Ok(request) = item else { continue };
        let Ok(prompt) = prompts.build(&request.messages) else {
            continue;
        };
        let max_tokens = request.sampling.max_tokens.unwrap_or(cfg.max_tokens) as usize;
        if prompt.tokens.len() + max_tokens > n_ctx_train {
            continue; // it gets its error in the second pass
        }
        demand.requests += 1;
        let shared = match prompt.prefix_key() {
            Some(key) if cfg.prefix_cache => {
                if prefixes.len() < MAX_TRACKED_PREFIXES && !prefixes.contains_key(&key) {
                    prefixes.insert(key, prompt.shared_len);
                    on_new_prefix(key, prompt.prefix());
                }
                prompt.shared_len
            }
            _ => 0,
        };
        demand.max_need = demand
            .max_need
            .max(prompt.tokens.len() - shared + max_tokens);
    }
    demand.prefix_lens = prefixes.into_values().collect();
    Ok(demand)
}

/// Turns a parsed request into a job: prompt tokens, resolved sampling, and a fit check.
fn prepare(
    request: Request,
    prompts: &mut PromptBuilder<'_>,
    cfg: &RunConfig,
    limits: &Limits,
) -> Result<Job, LineError> {
    let fail = |code, message: String| {
        Err(LineError::new(
            request.line,
            Some(&request.custom_id),
            code,
            message,
        ))
    };
    let prompt = match prompts.build(&request.messages) {
        Ok(p) => p,
        Err(e) => return fail(ErrorCode::InvalidMessages, e.to_string()),
    };
    let s = &request.sampling;
    let max_tokens = s.max_tokens.unwrap_or(cfg.max_tokens);
    let len = prompt.tokens.len();
    if len + max_tokens as usize > limits.n_ctx_train {
        return fail(
            ErrorCode::ContextLengthExceeded,
            format!(
                "prompt of {len} tokens plus max_tokens {max_tokens} exceeds the model's context \
                 of {} tokens; shorten the messages or lower max_tokens",
                limits.n_ctx_train
            ),
        );
    }
    let shared = if cfg.prefix_cache && prompt.shared_len > 0 {
        prompt.shared_len
    } else {
        0
    };
    let need = len - shared + max_tokens as usize;
    if need > limits.slot_budget {
        let fix = if limits.ctx_overridden {
            "raise --ctx-size or lower --parallel"
        } else {
            "lower max_tokens"
        };
        return fail(
            ErrorCode::ContextLengthExceeded,
            format!(
                "request needs {need} KV cells ({} own prompt tokens + max_tokens {max_tokens}) \
                 but each slot has {}; {fix}",
                len - shared,
                limits.slot_budget
            ),
        );
    }
    let sampler = SamplerSpec {
        temperature: s.temperature.unwrap_or(cfg.temperature),
        top_p: s.top_p.unwrap_or(1.0),
        top_k: s.top_k.unwrap_or(0),
        min_p: s.min_p.unwrap_or(0.0),
        seed: request_seed(s.seed, cfg.seed, &request.custom_id),
    };
    Ok(Job {
        line: request.line,
        custom_id: request.custom_id,
        prompt,
        params: GenParams {
            sampler,
            max_tokens,
            stop: request.sampling.stop,
        },
    })
}

/// The request's own seed, or one derived from the run's seed and its id, so a request samples
/// the same tokens whatever its position, slot or batch-mates.
pub fn request_seed(own: Option<u64>, base: u64, custom_id: &str) -> u32 {
    match own {
        Some(s) => (s ^ (s >> 32)) as u32,
        None => {
            let d = Sha256::new()
                .chain_update(base.to_le_bytes())
                .chain_update(custom_id.as_bytes())
                .finalize();
            u32::from_le_bytes([d[0], d[1], d[2], d[3]])
        }
    }
}

/// The name results report as `model`: the GGUF file name without its extension.
fn model_name(path: &Path) -> String {
    path.file_stem()
        .map_or_else(|| "model".into(), |s| s.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_comes_from_the_request_or_its_id() {
        assert_eq!(request_seed(Some(7), 1, "a"), 7);
        assert_eq!(request_seed(None, 1, "a"), request_seed(None, 1, "a"));
        assert_ne!(request_seed(None, 1, "a"), request_seed(None, 1, "b"));
        assert_ne!(request_seed(None, 1, "a"), request_seed(None, 2, "a"));
    }
}
