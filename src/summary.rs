//! The run summary written next to the output (`out.jsonl` → `out.summary.json`).
//!
//! Every number in it is a count or a clock reading from [`Metrics`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::{json, Value};

use crate::durable::write_atomic;
use crate::metrics::Metrics;
use crate::metrics::PrefixSource;
use crate::plan::Plan;

/// `dir/out.jsonl` → `dir/out.summary.json`.
pub fn summary_path(output: &Path) -> PathBuf {
    crate::output::sibling_path(output, "summary.json")
}

/// The summary as JSON.
pub fn to_json(m: &Metrics, plan: &Plan, wall: Duration) -> Value {
    let computed = m.prompt_tokens_computed;
    let reused = m.prompt_tokens_reused;
    let reuse_ratio = if computed + reused > 0 {
        reused as f64 / (computed + reused) as f64
    } else {
        0.0
    };
    let prefixes: Vec<Value> = m
        .prefix_events
        .iter()
        .map(|e| {
            json!({
                "key": e.key.short(),
                "source": e.source.to_string(),
                "tokens": e.tokens,
                "file_bytes": e.file_bytes,
                "ms": e.time.as_secs_f64() * 1e3,
            })
        })
        .collect();
    json!({
        "wall_seconds": wall.as_secs_f64(),
        "requests": {
            "ok": m.requests_ok,
            "failed": m.requests_failed,
            "failed_by_code": m.errors_by_code,
        },
        "tokens": {
            "prompt_computed": computed,
            "prompt_reused": reused,
            "reuse_ratio": reuse_ratio,
            "prefix_prefilled": m.prefix_tokens(PrefixSource::Prefilled),
            "prefix_restored": m.prefix_tokens(PrefixSource::Restored),
            "completion": m.completion_tokens,
        },
        "rates": {
            "prefill_tokens_per_second": m.prefill_tokens_per_sec(),
            "decode_tokens_per_second": m.decode_tokens_per_sec(),
            "requests_per_second": (m.requests_ok + m.requests_failed) as f64 / wall.as_secs_f64().max(1e-9),
        },
        // Where the wall clock went; the rest is sampling, scheduling, loading and output.
        "seconds": {
            "prefill": m.prefill_time.as_secs_f64(),
            "decode": m.decode_time.as_secs_f64(),
            "prefix_restore": m.prefix_time(PrefixSource::Restored).as_secs_f64(),
        },
        "time_to_first_token_seconds": {
            "p50": m.ttft_percentile(50.0),
            "p90": m.ttft_percentile(90.0),
            "p99": m.ttft_percentile(99.0),
        },
        "prefixes": prefixes,
        "prefixes_made_resident": m.prefix_count(),
        "plan": {
            "n_ctx": plan.n_ctx,
            "slot_budget": plan.slot_budget,
            "resident_prefixes": plan.resident_prefixes,
            "n_seq_max": plan.n_seq_max,
            "kv_layout": format!("{:?}", plan.layout).to_lowercase(),
        },
    })
}

/// Writes the summary atomically and durably.
///
/// # Errors
/// When the file cannot be written.
pub fn write(path: &Path, summary: &Value) -> Result<()> {
    write_atomic(path, &serde_json::to_vec_pretty(summary)?)
        .with_context(|| format!("cannot write summary {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::PrefixEvent;
    use crate::prompt::PrefixKey;

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
        let v = to_json(&m, &plan(), Duration::from_secs(2));
        assert_eq!(v["tokens"]["reuse_ratio"], 0.75);
        assert_eq!(v["requests"]["failed_by_code"]["invalid_json"], 3);
        assert_eq!(v["plan"]["n_ctx"], 256);
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
        let v = to_json(&m, &plan(), Duration::from_secs(2));
        assert_eq!(v["seconds"]["prefill"], 1.5);
        assert_eq!(v["seconds"]["decode"], 0.25);
        assert!((v["seconds"]["prefix_restore"].as_f64().unwrap() - 0.1).abs() < 1e-9);
    }
}
