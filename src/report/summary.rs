//! The run summary written next to the output (`out.jsonl` → `out.summary.json`).
//!
//! Every number in it is a count or a clock reading from [`Metrics`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::formats::summary::{
    DecodeGroupsRecord, MemoryRecord, Percentiles, PrefixRecord, Rates, RequestCounts, RunSummary,
    RunTokens, Seconds, SummaryKind,
};
use crate::plan::Plan;
use crate::report::metrics::Metrics;
use crate::report::metrics::PrefixSource;

/// `dir/out.jsonl` → `dir/out.summary.json`.
pub fn summary_path(output: &Path) -> PathBuf {
    crate::formats::paths::sibling_path(output, "summary.json")
}

/// The summary of a run from its counters, plan and memory.
pub fn run_summary(
    m: &Metrics,
    plan: &Plan,
    wall: Duration,
    memory: MemoryRecord,
    decode_groups: DecodeGroupsRecord,
) -> RunSummary {
    let computed = m.prompt_tokens_computed;
    let reused = m.prompt_tokens_reused;
    let reuse_ratio = if computed + reused > 0 {
        reused as f64 / (computed + reused) as f64
    } else {
        0.0
    };
    RunSummary {
        kind: SummaryKind::Run,
        wall_seconds: wall.as_secs_f64(),
        requests: RequestCounts {
            ok: m.requests_ok,
            failed: m.requests_failed,
            reused: Some(m.requests_reused),
            deduplicated: Some(m.requests_deduplicated),
            failed_by_code: m.errors_by_code.clone(),
        },
        tokens: RunTokens {
            prompt_computed: computed,
            prompt_reused: reused,
            reuse_ratio,
            prefix_prefilled: m.prefix_tokens(PrefixSource::Prefilled),
            prefix_restored: m.prefix_tokens(PrefixSource::Restored),
            completion: m.completion_tokens,
            embedded: m.embedded_tokens,
        },
        rates: Rates {
            prefill_tokens_per_second: m.prefill_tokens_per_sec(),
            decode_tokens_per_second: m.decode_tokens_per_sec(),
            requests_per_second: (m.requests_ok + m.requests_failed) as f64
                / wall.as_secs_f64().max(1e-9),
            embedding_tokens_per_second: m.embedding_tokens_per_sec(),
        },
        seconds: Seconds {
            prefill: m.prefill_time.as_secs_f64(),
            decode: m.decode_time.as_secs_f64(),
            prefix_restore: m.prefix_time(PrefixSource::Restored).as_secs_f64(),
            embedding: m.embedding_time.as_secs_f64(),
        },
        time_to_first_token_seconds: Percentiles {
            p50: m.ttft_percentile(50.0),
            p90: m.ttft_percentile(90.0),
            p99: m.ttft_percentile(99.0),
        },
        prefixes: m
            .prefix_events
            .iter()
            .map(|e| PrefixRecord {
                key: e.key.short(),
                source: e.source.to_string(),
                tokens: e.tokens,
                file_bytes: e.file_bytes,
                ms: e.time.as_secs_f64() * 1e3,
            })
            .collect(),
        prefixes_made_resident: m.prefix_count(),
        plan: plan.record(),
        memory,
        decode_groups,
        identity: serde_json::Map::new(),
        other_machines: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::summary::FootprintRecord;
    use crate::prompt::PrefixKey;
    use crate::report::metrics::PrefixEvent;

    fn summary(m: &Metrics) -> RunSummary {
        let memory = MemoryRecord {
            peak_rss_bytes: None,
            planned: FootprintRecord {
                weights_bytes: 1,
                kv_bytes: 2,
                compute_bytes: 3,
                process_bytes: 4,
                total_bytes: 10,
            },
            budget_bytes: 100,
            parallel: 1,
            gpu_layers: 0,
            vram: None,
            vram_use: Vec::new(),
            kv_cache: Default::default(),
        };
        run_summary(
            m,
            &plan(),
            Duration::from_secs(2),
            memory,
            DecodeGroupsRecord {
                decision: "any shape, 1 to 32 rows a call".into(),
                sizes_tried: Some([1, 32]),
                probe_seconds: Some(1.5),
                classes: vec!["1-32".into()],
                remembered_from: None,
            },
        )
    }

    fn plan() -> Plan {
        Plan {
            n_ctx: 256,
            slot_budget: 10,
            resident_prefixes: 1,
            n_seq_max: 2,
            layout: crate::plan::KvLayout::Unified,
        }
    }

    #[test]
    fn summary_path_sits_next_to_the_output() {
        assert_eq!(
            summary_path(Path::new("/d/out.jsonl")),
            PathBuf::from("/d/out.summary.json")
        );
        assert_eq!(
            summary_path(Path::new("res")),
            PathBuf::from("res.summary.json")
        );
    }

    #[test]
    fn reuse_ratio_is_reused_over_all_prompt_tokens() {
        let mut m = Metrics {
            prompt_tokens_computed: 25,
            prompt_tokens_reused: 75,
            ..Metrics::default()
        };
        m.errors_by_code.insert("invalid_json".into(), 3);
        let s = summary(&m);
        assert_eq!(s.tokens.reuse_ratio, 0.75);
        assert_eq!(s.requests.failed_by_code["invalid_json"], 3);
        assert_eq!(s.plan.n_ctx, 256);
        assert_eq!(s.plan.kv_layout, "unified");
        // The file reads back as it was written, kind first.
        let text = serde_json::to_string(&s).unwrap();
        assert!(text.starts_with(r#"{"kind":"run","#), "{text}");
        assert_eq!(serde_json::from_str::<RunSummary>(&text).unwrap(), s);
    }

    #[test]
    fn restore_seconds_count_restored_prefixes_only() {
        let event = |source, ms| PrefixEvent {
            key: PrefixKey([0; 32]),
            tokens: 10,
            source,
            file_bytes: None,
            time: Duration::from_millis(ms),
        };
        let mut m = Metrics {
            prefill_time: Duration::from_millis(1500),
            decode_time: Duration::from_millis(250),
            ..Metrics::default()
        };
        m.record_prefix(&event(PrefixSource::Restored, 40));
        m.record_prefix(&event(PrefixSource::Prefilled, 900));
        m.record_prefix(&event(PrefixSource::Restored, 60));
        let s = summary(&m);
        assert_eq!(s.seconds.prefill, 1.5);
        assert_eq!(s.seconds.decode, 0.25);
        assert!((s.seconds.prefix_restore - 0.1).abs() < 1e-9);
    }
}
