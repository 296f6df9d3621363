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
use crate::engine::{llama_build, Model, ModelSettings, SamplerSpec, SessionSettings, Token};
use crate::metrics::Metrics;
use crate::output::{error_line, success_line};
use crate::plan::{plan, Demand, KvLayout, Plan, MAX_TRACKED_PREFIXES};
use crate::prefix_cache::{materialize, PrefixEvent};
use crate::prefix_store::{model_sha256, PrefixStore, StateIdentity};
use crate::prompt::{PrefixKey, PromptBuilder};
use crate::request::{ErrorCode, LineError, Request, RequestReader};
use crate::scheduler::{Admission, Exact, GenParams, Job, Outcome, Scheduler};
use crate::sink::Sink;
use crate::summary;

/// How often a progress line is logged.
const PROGRESS_EVERY: Duration = Duration::from_secs(10);

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
    let mut manifest = Manifest {
        input_sha256: file_sha256(&cfg.input)?,
        model_sha256: hex(&model_sha256(&cfg.model, memo_dir)?),
        params: output_params(cfg),
        total: 0,
        state: RunState::Running,
    };
    let done = checkpoint::prepare(&cfg.output, &manifest, cfg.restart, cfg.retry_failed)?;

    let model = Model::load(&ModelSettings {
        path: cfg.model.clone(),
        gpu_layers: cfg.gpu_layers,
        verbose: cfg.verbose,
    })?;
    let info = model.info();
    let mut prompts = PromptBuilder::new(&model);
    let demand = scan(
        open_input()?,
        &mut prompts,
        cfg,
        info.n_ctx_train as usize,
        |_, _| {},
    )?;
    manifest.total = demand.lines;
    manifest.write(&cfg.output, &cfg.input, &cfg.model)?;
    let mut sink = Sink::open(&cfg.output, cfg.fsync_every)?;

    let plan = plan(
        &demand,
        cfg.parallel as usize,
        cfg.max_prefixes as usize,
        cfg.prefix_cache,
        cfg.ctx_size.map(|c| c as usize),
        if cfg.deterministic {
            KvLayout::Streams
        } else {
            KvLayout::Unified
        },
    )?;
    tracing::info!(
        requests = demand.lines,
        already_done = done.len(),
        prefixes = demand.prefix_lens.len(),
        n_ctx = plan.n_ctx,
        slot_budget = plan.slot_budget,
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
        open_store(cfg, &settings)
    } else {
        None
    };
    let mut session = model.new_session(&settings)?;
    let mut scheduler = Scheduler::new(
        &mut session,
        cfg.parallel as usize,
        plan.resident_prefixes,
        cfg.prefix_cache,
        store.as_ref(),
        (plan.layout == KvLayout::Streams).then(|| Exact {
            // The last sequence: after the slots and the prefixes.
            pad_seq: i32::try_from(plan.n_seq_max - 1).ok(),
        }),
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
    let mut input = open_input()?;
    let mut waiting: Option<Job> = None;
    let mut finished = Vec::new();
    let mut last_progress = Instant::now();
    let mut interrupted = false;
    loop {
        if stop.load(Ordering::Relaxed) {
            interrupted = true;
            break;
        }
        // Fill free slots; a request that is refused now waits for the next step.
        while scheduler.has_idle_slot() {
            let job = match waiting.take() {
                Some(job) => job,
                None => match input.next() {
                    None => break,
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
            break;
        }
        scheduler.step(&mut finished);
        for outcome in finished.drain(..) {
            write(&mut sink, &mut scheduler.metrics, outcome)?;
        }
        if last_progress.elapsed() >= PROGRESS_EVERY {
            last_progress = Instant::now();
            log_progress(&scheduler.metrics, remaining, started.elapsed());
        }
    }
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
    summary::write(
        &summary::summary_path(&cfg.output),
        &summary::to_json(&report.metrics, &report.plan, report.wall),
    )?;
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

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Opens the prefix state store for this model and layout; without one the run goes on,
/// sharing prefixes in memory only.
fn open_store(cfg: &RunConfig, settings: &SessionSettings) -> Option<PrefixStore> {
    let open = || -> Result<PrefixStore> {
        let identity = StateIdentity {
            model_sha256: model_sha256(&cfg.model, Some(&cfg.prefix_cache_dir))?,
            llama_build: llama_build(),
            layout: settings.state_layout(cfg.gpu_layers),
        };
        PrefixStore::open(&cfg.prefix_cache_dir, cfg.prefix_cache_max_bytes, identity)
    };
    match open() {
        Ok(store) => Some(store),
        Err(e) => {
            tracing::warn!("{e:#}; prefix states stay in memory for this run");
            None
        }
    }
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
    let model = Model::load(&ModelSettings {
        path: cfg.model.clone(),
        gpu_layers: cfg.gpu_layers,
        verbose: cfg.verbose,
    })?;
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
        n_ctx: u32::try_from(longest.div_ceil(256).max(1) * 256)?,
        n_batch: cfg.batch_size,
        n_seq_max: 1,
        threads: cfg.threads,
        flash_attn: cfg.flash_attn,
        kv_unified: !cfg.deterministic,
    };
    let store = PrefixStore::open(
        &cfg.prefix_cache_dir,
        cfg.prefix_cache_max_bytes,
        StateIdentity {
            model_sha256: model_sha256(&cfg.model, Some(&cfg.prefix_cache_dir))?,
            llama_build: llama_build(),
            layout: settings.state_layout(cfg.gpu_layers),
        },
    )?;
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

fn log_progress(m: &Metrics, total: u64, elapsed: Duration) {
    let done = m.requests_ok + m.requests_failed;
    let secs = elapsed.as_secs_f64().max(1e-9);
    tracing::info!(
        "{done}/{total} requests ({} failed), {:.2} req/s, prefill {:.0} tok/s, decode {:.0} tok/s",
        m.requests_failed,
        done as f64 / secs,
        m.prefill_tokens_per_sec(),
        m.decode_tokens_per_sec()
    );
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
