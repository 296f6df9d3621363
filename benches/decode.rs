//! `decode/parallel/{1,2,4,8}`: aggregate decode tokens/s of P sequences stepping together, each
//! at the depth of a shared 1,000-token prefix, in the default (deterministic) layout: a KV
//! stream per sequence, flash attention off.
//!
//! Run: `cargo bench --bench decode` (fetch the model first with `./models/fetch.sh`).
//! Threads: `INFER_BATCH_BENCH_THREADS`, default the physical cores.

mod common;

use std::time::{Duration, Instant};

use common::{model, prefix_tokens, threads};
use criterion::{
    criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput,
};
use infer_batch::cache::prefix_cache::materialize;
use infer_batch::engine::{Engine, FlashAttn, KvTypes, SessionSettings};
use infer_batch::report::metrics::Metrics;

const PARALLEL: [u32; 4] = [1, 2, 4, 8];
const DEPTH: usize = 1000;
const STEPS: u32 = 32;
/// Cells per stream: the prefix plus the steps, rounded up.
const STREAM_CELLS: u32 = 1280;

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
            kv_types: KvTypes::default(),
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
                        session.share_prefix(resident, seq).unwrap();
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
                        session.clear_seq(seq).unwrap();
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
