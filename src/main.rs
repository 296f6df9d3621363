//! The `infer-batch` command: parse the arguments, run, map the outcome to an exit code.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use clap::Parser;
use infer_batch::cache::prefix_store;
use infer_batch::commands::cli::{CacheAction, Cli, Command, ServeArgs};
use infer_batch::commands::outcome::RunOutcome;
use infer_batch::commands::preflight::dry_run;
use infer_batch::commands::run::{run, RunReport};
use infer_batch::commands::supervise::{attach_to_supervisor, supervise, Signals};
use infer_batch::commands::warm::warm;
use infer_batch::commands::worker::WorkerEnv;
use infer_batch::report::metrics::{PrefixEvent, PrefixSource};
use infer_batch::serve::engine_command::EngineCommand;
use infer_batch::serve::{read_key, ServeConfig};

/// Prefixes listed one by one in the summary on stderr; the rest are counted.
const PRINTED_PREFIXES: usize = 8;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.run.common.verbose);
    let outcome = dispatch(&cli).unwrap_or_else(|e| {
        eprintln!("error: {e:#}");
        RunOutcome::Fatal
    });
    ExitCode::from(outcome.exit_code())
}

fn dispatch(cli: &Cli) -> anyhow::Result<RunOutcome> {
    match &cli.command {
        Some(Command::Serve { args }) => {
            serve(args)?;
            return Ok(RunOutcome::AllSucceeded);
        }
        Some(Command::Cache { action }) => return cache(action).map(|()| RunOutcome::AllSucceeded),
        Some(Command::Status { output, json }) => {
            println!("{}", infer_batch::commands::status::report(output, *json)?);
            return Ok(RunOutcome::AllSucceeded);
        }
        Some(Command::Bench { args }) => {
            let max = args.parallel.iter().copied().max().unwrap_or(1);
            let cfg = args.common.resolve(max)?;
            let plan = infer_batch::commands::bench::BenchPlan {
                parallel: args.parallel.clone(),
                sample: args.sample,
                reps: args.reps,
            };
            let report = infer_batch::commands::bench::bench(&cfg, &plan, &*stop_flag(true)?)?;
            print!("{}", infer_batch::commands::bench::table(&report));
            if let Some(path) = &args.json {
                std::fs::write(path, serde_json::to_vec_pretty(&report)?)?;
                println!("measurements: {}", path.display());
            }
            let svg = args
                .svg
                .clone()
                .or_else(|| args.json.as_ref().map(|j| j.with_extension("svg")));
            if let Some(path) = svg {
                infer_batch::commands::bench::plot(&report, &path)?;
                println!("plot: {}", path.display());
            }
            return Ok(RunOutcome::AllSucceeded);
        }
        Some(Command::Merge {
            output,
            shards,
            order,
        }) => {
            let m = infer_batch::commands::merge::merge(output, shards.as_deref(), *order)?;
            eprintln!(
                "merged {} shards: {} lines ({} failed) -> {}",
                m.shards,
                m.lines,
                m.failed,
                output.display()
            );
            return Ok(RunOutcome::AllSucceeded);
        }
        None => {}
    }
    let cfg = cli.run.resolve()?;
    if cfg.dry_run {
        println!(
            "{}",
            serde_json::to_string_pretty(&dry_run(&cfg)?.dry_run())?
        );
        return Ok(RunOutcome::AllSucceeded);
    }
    if cfg.supervise {
        let args: Vec<_> = std::env::args_os().skip(1).collect();
        return supervise(&cfg, &args, &*count_signals()?);
    }
    let worker = WorkerEnv::from_env()?;
    let stop = match &worker {
        Some(env) => {
            attach_to_supervisor(env)?;
            // The supervisor decides when to stop at once; a repeated signal (one from the
            // terminal and one forwarded) must not kill a worker that is stopping cleanly.
            stop_flag(false)?
        }
        None => stop_flag(true)?,
    };
    let report = run(&cfg, &stop, worker.as_ref())?;
    print_summary(&report, &cfg.output);
    let outcome = report.outcome();
    if outcome == RunOutcome::Interrupted {
        eprintln!("interrupted: run the same command again to resume");
    }
    Ok(outcome)
}

/// `infer-batch serve`: checks its flags, then serves until a signal. Each batch runs this
/// binary with the run flags given after `serve`.
fn serve(args: &ServeArgs) -> anyhow::Result<()> {
    args.check_run_flags()?;
    let raw: Vec<_> = std::env::args_os()
        .skip_while(|a| a != "serve")
        .skip(1)
        .collect();
    let api_key = args.api_key_file.as_deref().map(read_key).transpose()?;
    infer_batch::serve::serve(ServeConfig {
        addr: std::net::SocketAddr::new(args.host, args.port),
        data_dir: args.data_dir.clone(),
        api_key,
        max_upload_bytes: args.max_upload_bytes,
        request_timeout: std::time::Duration::from_secs(args.request_timeout.max(1)),
        engine: EngineCommand::new(std::env::current_exe()?, &raw),
    })
}

/// SIGINT or SIGTERM asks the run to stop cleanly. With `second_kills`, a second SIGINT (a
/// second Ctrl-C) kills at once; a repeated SIGTERM only asks again, since schedulers may
/// deliver it twice and send SIGKILL themselves when they mean it.
fn stop_flag(second_kills: bool) -> anyhow::Result<Arc<AtomicBool>> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let stop = Arc::new(AtomicBool::new(false));
    if second_kills {
        signal_hook::flag::register_conditional_default(SIGINT, Arc::clone(&stop))?;
    }
    for sig in [SIGINT, SIGTERM] {
        signal_hook::flag::register(sig, Arc::clone(&stop))?;
    }
    Ok(stop)
}

/// Counts the supervisor's signals: any one stops the worker cleanly, a second SIGINT at once.
fn count_signals() -> anyhow::Result<Arc<Signals>> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let count = Arc::new(Signals::default());
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])?;
    let seen = Arc::clone(&count);
    std::thread::spawn(move || {
        for sig in signals.forever() {
            seen.stops.fetch_add(1, Ordering::Relaxed);
            if sig == SIGINT {
                seen.interrupts.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    Ok(count)
}

fn cache(action: &CacheAction) -> anyhow::Result<()> {
    let dir_or_default =
        |d: &Option<std::path::PathBuf>| d.clone().unwrap_or_else(prefix_store::default_dir);
    match action {
        CacheAction::Ls { prefix_cache_dir } => {
            let dir = dir_or_default(prefix_cache_dir);
            let mut entries = prefix_store::entries(&dir);
            entries.sort_by_key(|e| std::cmp::Reverse(e.last_used));
            println!(
                "{:<40} {:>8} {:>12} {:<12} last used",
                "file", "tokens", "bytes", "model"
            );
            for e in &entries {
                let name = e.path.file_name().unwrap_or_default().to_string_lossy();
                let age = e.last_used.elapsed().map_or(0, |d| d.as_secs());
                println!(
                    "{name:<40} {:>8} {:>12} {:<12} {} ago{}",
                    e.tokens.map_or("?".into(), |t| t.to_string()),
                    e.bytes,
                    e.model.as_deref().unwrap_or("?"),
                    human_age(age),
                    e.problem
                        .as_deref()
                        .map_or(String::new(), |p| format!("  ({p})"))
                );
            }
            let total: u64 = entries.iter().map(|e| e.bytes).sum();
            println!(
                "{} states, {} bytes in {}",
                entries.len(),
                total,
                dir.display()
            );
        }
        CacheAction::Clear { prefix_cache_dir } => {
            let dir = dir_or_default(prefix_cache_dir);
            let n = prefix_store::clear(&dir)?;
            println!("removed {n} files from {}", dir.display());
        }
        CacheAction::Warm { run } => {
            let cfg = run.resolve()?;
            for e in warm(&cfg)? {
                print_prefix(&e);
            }
        }
    }
    Ok(())
}

fn human_age(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

fn print_prefix(e: &PrefixEvent) {
    eprintln!(
        "prefix {}: {} {} tokens in {:.0} ms{}",
        e.key.short(),
        e.source,
        e.tokens,
        e.time.as_secs_f64() * 1e3,
        e.file_bytes
            .map_or(String::new(), |b| format!(", state file {b} bytes"))
    );
}

fn init_logging(verbose: bool) {
    let default = if verbose { "debug" } else { "info" };
    let filter = tracing_subscriber::EnvFilter::try_from_env("INFER_BATCH_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}

fn print_summary(report: &RunReport, output: &std::path::Path) {
    let m = &report.metrics;
    let wall = report.wall.as_secs_f64();
    if report.resumed > 0 {
        eprintln!("resumed: {} requests were already done", report.resumed);
    }
    eprintln!(
        "done: {} ok, {} failed in {:.1}s ({:.2} req/s) -> {}",
        m.requests_ok,
        m.requests_failed,
        wall,
        (m.requests_ok + m.requests_failed) as f64 / wall.max(1e-9),
        output.display()
    );
    for e in m.prefix_events.iter().take(PRINTED_PREFIXES) {
        print_prefix(e);
    }
    let more = m.prefix_count().saturating_sub(PRINTED_PREFIXES as u64);
    if more > 0 {
        eprintln!(
            "... and {more} more prefixes made resident ({} tokens prefilled, {} restored in all)",
            m.prefix_tokens(PrefixSource::Prefilled),
            m.prefix_tokens(PrefixSource::Restored)
        );
    }
    eprintln!(
        "prompt tokens: {} computed, {} reused from shared prefixes",
        m.prompt_tokens_computed, m.prompt_tokens_reused,
    );
    eprintln!(
        "prefill {:.1} tok/s, decode {:.1} tok/s, {} completion tokens, ttft p50 {:.3}s",
        m.prefill_tokens_per_sec(),
        m.decode_tokens_per_sec(),
        m.completion_tokens,
        m.ttft_percentile(50.0).unwrap_or(0.0)
    );
}
