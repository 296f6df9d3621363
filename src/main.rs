//! The `infer-batch` command: parse the arguments, run, map the outcome to an exit code.

use std::process::ExitCode;

use clap::Parser;
use infer_batch::cli::Cli;
use infer_batch::run::{run, RunReport};

/// Every request succeeded.
const EXIT_OK: u8 = 0;
/// The run finished, but some requests got error lines.
const EXIT_SOME_FAILED: u8 = 1;
/// The run could not proceed.
const EXIT_FATAL: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.run.verbose);
    match dispatch(&cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(EXIT_FATAL)
        }
    }
}

fn dispatch(cli: &Cli) -> anyhow::Result<u8> {
    if let Some(command) = &cli.command {
        match *command {}
    }
    let cfg = cli.run.resolve()?;
    let report = run(&cfg)?;
    print_summary(&report, &cfg.output);
    Ok(if report.all_ok() {
        EXIT_OK
    } else {
        EXIT_SOME_FAILED
    })
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
    eprintln!(
        "done: {} ok, {} failed in {:.1}s ({:.2} req/s) -> {}",
        m.requests_ok,
        m.requests_failed,
        wall,
        (m.requests_ok + m.requests_failed) as f64 / wall.max(1e-9),
        output.display()
    );
    eprintln!(
        "prompt tokens: {} computed, {} reused from shared prefixes ({} prefixes prefilled, {} tokens, {:.0} ms)",
        m.prompt_tokens_computed,
        m.prompt_tokens_reused,
        m.prefixes_prefilled,
        m.prefix_tokens_prefilled,
        m.prefix_prefill_time.as_secs_f64() * 1e3
    );
    eprintln!(
        "prefill {:.1} tok/s, decode {:.1} tok/s, {} completion tokens, ttft p50 {:.3}s",
        m.prefill_tokens_per_sec(),
        m.decode_tokens_per_sec(),
        m.completion_tokens,
        m.ttft_percentile(50.0).unwrap_or(0.0)
    );
}
