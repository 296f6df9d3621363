//! `prefix/cold_prefill` against `prefix/restore_file` against `prefix/fork_in_memory`, at
//! 500, 1,000 and 2,000 prefix tokens, on the default model, in the default layout: a KV stream
//! per sequence (deterministic mode), where a fork copies the prefix's stream. With
//! `INFER_BATCH_BENCH_UNIFIED=1`, one unified cache, where a fork only tags cells. With
//! `INFER_BATCH_BENCH_KV=q8_0` (or another `--cache-type-k` name), keys and values of that type,
//! with flash attention (llama.cpp needs it for quantized values).
//!
//! Run: `cargo bench --bench prefix` (fetch the model first with `./models/fetch.sh`).
//! Threads: `INFER_BATCH_BENCH_THREADS`, default the physical cores.

mod common;

use clap::ValueEnum;
use common::{model, prefix_tokens, threads};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use infer_batch::cache::prefix_cache::materialize;
use infer_batch::cache::prefix_store::{model_sha256, PrefixStore, StateIdentity};
use infer_batch::engine::{Engine, FlashAttn, KvType, KvTypes, Session, SessionSettings};
use infer_batch::report::metrics::Metrics;

const SIZES: [usize; 3] = [500, 1000, 2000];
const N_BATCH: u32 = 512;

fn settings() -> SessionSettings {
    let unified = std::env::var("INFER_BATCH_BENCH_UNIFIED").is_ok_and(|v| v == "1");
    let kv_types = kv_types();
    SessionSettings {
        // Two sequences (the prefix and a slot): each stream holds the largest prefix.
        n_ctx: if unified { 2304 } else { 2 * 2304 },
        n_batch: N_BATCH,
        n_seq_max: 2,
        threads: threads(),
        // As the run's: off in the default layout, llama.cpp's choice in a unified cache, on
        // for a quantized value type, which llama.cpp has no other kernel for.
        flash_attn: match std::env::var("INFER_BATCH_BENCH_FA").as_deref() {
            _ if kv_types.v.is_quantized() => FlashAttn::On,
            Ok("on") => FlashAttn::On,
            Ok("off") => FlashAttn::Off,
            _ if unified => FlashAttn::Auto,
            _ => FlashAttn::Off,
        },
        kv_types,
        kv_unified: unified,
    }
}

/// `INFER_BATCH_BENCH_KV=q8_0` (any `--cache-type-k` name): both the key and value type.
fn kv_types() -> KvTypes {
    let t = std::env::var("INFER_BATCH_BENCH_KV").map_or(KvType::F16, |name| {
        KvType::from_str(&name, true).unwrap_or_else(|e| panic!("INFER_BATCH_BENCH_KV: {e}"))
    });
    KvTypes { k: t, v: t }
}

fn bench_prefix(c: &mut Criterion) {
    let model = model();
    let settings = settings();
    let dir = tempfile::tempdir().unwrap();
    let store = PrefixStore::open(
        dir.path(),
        u64::MAX,
        // A scratch store that only this bench reads: any computation name serves.
        StateIdentity {
            model_sha256: model_sha256(model.path(), Some(dir.path())).unwrap(),
            computation: "bench".to_owned(),
            layout: format!("memory={}", model.memory_kind()),
        },
    )
    .unwrap();
    let mut session: Session<'_> = model.new_session(&settings).unwrap();
    let mut metrics = Metrics::default();
    let mut group = c.benchmark_group("prefix");
    group.sample_size(10);
    for n in SIZES {
        let tokens = prefix_tokens(&model, n);
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(BenchmarkId::new("cold_prefill", n), &tokens, |b, t| {
            b.iter(|| {
                materialize(&mut session, 0, t, None, &mut metrics).unwrap();
                session.clear_seq(0).unwrap();
            })
        });
        // Save once, then every iteration reads, verifies and loads the file.
        materialize(&mut session, 0, &tokens, Some(&store), &mut metrics).unwrap();
        session.clear_seq(0).unwrap();
        group.bench_with_input(BenchmarkId::new("restore_file", n), &tokens, |b, t| {
            b.iter(|| {
                let e = materialize(&mut session, 0, t, Some(&store), &mut metrics).unwrap();
                assert_eq!(e.source.to_string(), "restored");
                session.clear_seq(0).unwrap();
            })
        });
        materialize(&mut session, 1, &tokens, None, &mut metrics).unwrap();
        group.bench_with_input(BenchmarkId::new("fork_in_memory", n), &n, |b, _| {
            b.iter(|| {
                session.share_prefix(1, 0).unwrap();
                session.clear_seq(0).unwrap();
            })
        });
        session.clear_seq(1).unwrap();
        let bytes = std::fs::metadata(store.path_of(&tokens)).unwrap().len();
        let info = model.info();
        // f16 K and V: layers × 2 × KV heads × head dim × 2 bytes.
        let theory = info.n_layer as u64
            * 2
            * info.n_head_kv as u64
            * (info.n_embd / info.n_head) as u64
            * 2;
        eprintln!(
            "prefix {n} tokens: state file {bytes} bytes = {:.0} bytes/token (theoretical KV {theory} bytes/token)",
            bytes as f64 / n as f64
        );
    }
    group.finish();
}

criterion_group!(benches, bench_prefix);
criterion_main!(benches);
