//! `decode/parallel_{1,2,4,8}`: aggregate decode tokens/s of P sequences stepping together, each
//! at the depth of a shared 1,000-token prefix, in the default (deterministic) layout: a KV
//! stream per sequence, flash attention off.
//!
//! Run: `cargo bench --bench decode` (fetch the model first with `./models/fetch.sh`).
//! Threads: `INFER_BATCH_BENCH_THREADS`, default the physical cores.

use std::path::Path;
use std::time::{Duration, Instant};

use criterion::{
    criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput,
};
use infer_batch::cli::physical_cores;
use infer_batch::engine::{FlashAttn, Model, ModelSettings, SessionSettings, Token};
use infer_batch::metrics::Metrics;
use infer_batch::prefix_cache::materialize;

const PARALLEL: [u32; 4] = [1, 2, 4, 8];
const DEPTH: usize = 1000;
const STEPS: u32 = 32;
/// Cells per stream: the prefix plus the steps, rounded up.
const STREAM_CELLS: u32 = 1280;

fn model() -> Model {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    Model::load(&ModelSettings {
        path,
        gpu_layers: 0,
        verbose: false,
    })
    .expect("run ./models/fetch.sh first")
}

fn threads() -> u32 {
    std::env::var("INFER_BATCH_BENCH_THREADS")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(physical_cores)
}

/// Exactly `n` tokens of rubric-like text.
fn prefix_tokens(model: &Model, n: usize) -> Vec<Token> {
    let mut text = String::new();
    let mut i = 0;
    loop {
        text.push_str(&format!(
            "Criterion {i}: rate the candidate's evidence of shipped work from 0 to 3, citing only the profile. "
        ));
        let mut tokens = model.tokenize(&text);
        if tokens.len() >= n {
            tokens.truncate(n);
            return tokens;
        }
        i += 1;
    }
}

fn bench_decode(c: &mut Criterion) {
    let model = model();
    let prefix = prefix_tokens(&model, DEPTH);
    let next = prefix[DEPTH - 1];
    let mut group = c.benchmark_group("decode");
    group.sample_size(10);
    group.sampling_mode(SamplingMode::Flat);
    group.measurement_time(Duration::from_secs(8));
    for p in PARALLEL {
        // Sequences 0..p decode; sequence p holds the prefix they copy before each iteration.
        let settings = SessionSettings {
            n_ctx: (p + 1) * STREAM_CELLS,
            n_batch: 512,
            n_seq_max: p + 1,
            threads: threads(),
            flash_attn: FlashAttn::Off,
            kv_unified: false,
        };
        let mut session = model.new_session(&settings).unwrap();
        let resident = p as i32;
        materialize(
            &mut session,
            resident,
            &prefix,
            None,
            &mut Metrics::default(),
        )
        .unwrap();
        group.throughput(Throughput::Elements(u64::from(p * STEPS)));
        group.bench_with_input(BenchmarkId::new("parallel", p), &p, |b, &p| {
            b.iter_custom(|iters| {
                let mut busy = Duration::ZERO;
                for _ in 0..iters {
                    for seq in 0..p as i32 {
                        session.share_prefix(resident, seq);
                    }
                    let t0 = Instant::now();
                    for step in 0..STEPS {
                        for seq in 0..p as i32 {
                            session.push(next, DEPTH as u32 + step, seq, true).unwrap();
                        }
                        session.decode().unwrap();
                    }
                    busy += t0.elapsed();
                    for seq in 0..p as i32 {
                        session.clear_seq(seq);
                    }
                }
                busy
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench_decode);
criterion_main!(benches);
