//! The summary beside an output (`out.jsonl` → `out.summary.json`) in its two kinds: a run's
//! ([`RunSummary`], `"kind": "run"`) and a merge's ([`MergeSummary`], `"kind": "merge"`), and
//! the plan `--dry-run` prints ([`DryRun`]). Every number in them is a count or a clock reading.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Requests by outcome.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestCounts {
    /// Requests with a result line.
    pub ok: u64,
    /// Requests with an error line.
    pub failed: u64,
    /// Of `ok`, requests whose line was copied from an earlier output (`--reuse`), not
    /// computed. A run's summary only: a merge's lines do not say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reused: Option<u64>,
    /// Of `ok`, requests whose line was copied from an identical request of the same input
    /// (a run's summary only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deduplicated: Option<u64>,
    /// Error lines by their `error.code`.
    pub failed_by_code: BTreeMap<String, u64>,
}

/// A run's token counts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunTokens {
    /// Prompt tokens llama.cpp computed, shared prefixes once each.
    pub prompt_computed: u64,
    /// Prompt tokens requests took from a shared prefix.
    pub prompt_reused: u64,
    /// `prompt_reused` over all prompt tokens.
    pub reuse_ratio: f64,
    /// Prefix tokens prefilled.
    pub prefix_prefilled: u64,
    /// Prefix tokens restored from state files.
    pub prefix_restored: u64,
    /// Tokens sampled.
    pub completion: u64,
    /// Tokens of embedding inputs computed.
    #[serde(default)]
    pub embedded: u64,
}

/// Measured rates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rates {
    /// Prompt tokens computed per second of prefill.
    pub prefill_tokens_per_second: f64,
    /// Generated tokens per second of decode.
    pub decode_tokens_per_second: f64,
    /// Requests written per second of wall time.
    pub requests_per_second: f64,
    /// Embedding input tokens per second of embedding calls.
    #[serde(default)]
    pub embedding_tokens_per_second: f64,
}

/// Where the wall clock went; the rest is sampling, scheduling, loading and output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Seconds {
    /// In decode calls holding prompt tokens.
    pub prefill: f64,
    /// In decode calls of generated tokens only.
    pub decode: f64,
    /// Restoring prefix states.
    pub prefix_restore: f64,
    /// In the decode calls of embedding inputs.
    #[serde(default)]
    pub embedding: f64,
}

/// Percentiles of the time to first token; `None` when no request completed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    /// Median.
    pub p50: Option<f64>,
    /// 90th percentile.
    pub p90: Option<f64>,
    /// 99th percentile.
    pub p99: Option<f64>,
}

/// A prefix made resident.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrefixRecord {
    /// The first 8 bytes of its key, in hex.
    pub key: String,
    /// `prefilled` or `restored`.
    pub source: String,
    /// Its tokens.
    pub tokens: usize,
    /// Its state file's size, when it has one.
    pub file_bytes: Option<u64>,
    /// Milliseconds it took.
    pub ms: f64,
}

/// The context plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanRecord {
    /// KV cells.
    pub n_ctx: u32,
    /// Cells each slot may use beyond its prefix.
    pub slot_budget: usize,
    /// Prefix sequences kept resident.
    pub resident_prefixes: usize,
    /// Sequences.
    pub n_seq_max: u32,
    /// `unified` or `streams`.
    pub kv_layout: String,
}

/// Memory a plan needs, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FootprintRecord {
    /// Model weights.
    pub weights_bytes: u64,
    /// The KV cache.
    pub kv_bytes: u64,
    /// llama.cpp's compute buffers.
    pub compute_bytes: u64,
    /// This process besides llama.cpp.
    pub process_bytes: u64,
    /// All of them.
    pub total_bytes: u64,
}

/// The embedding context a plan counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EmbeddingContextPlan {
    /// Its cells: the longest input it embeds.
    pub n_ctx: u32,
    /// Its KV cache.
    pub kv_bytes: u64,
    /// Its compute buffer.
    pub compute_bytes: u64,
}

/// VRAM a plan needs and may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VramPlan {
    /// What the offloaded part needs.
    pub planned_bytes: u64,
    /// What it may use.
    pub budget_bytes: u64,
}

/// One GPU's memory over a run, as read while it went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuUse {
    /// Device index among the GPUs.
    pub index: u32,
    /// The backend's name for it (`CUDA0`, `Vulkan0`).
    pub device: String,
    /// What it is (`NVIDIA H200`, `llvmpipe (...)`).
    pub name: String,
    /// Who measured it: `nvml` or `ggml`.
    pub source: String,
    /// Installed bytes.
    pub total_bytes: u64,
    /// Bytes in use at the last reading (by every process on the device, where NVML reads
    /// it; as the backend accounts them otherwise). `None` where the device reports none in use
    /// although this run's layers are on it: it does not report its use (a Vulkan device
    /// without the memory-budget extension, such as lavapipe, reports its size as free).
    pub used_bytes: Option<u64>,
    /// The most in use at any reading, where the device reports its use.
    pub peak_used_bytes: Option<u64>,
}

/// A run's memory: planned and measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemoryRecord {
    /// The process's peak resident memory.
    pub peak_rss_bytes: Option<u64>,
    /// What the plan needs.
    pub planned: FootprintRecord,
    /// What it may use.
    pub budget_bytes: u64,
    /// Slots, after any lowering to fit.
    pub parallel: usize,
    /// Layers offloaded, after any lowering to fit.
    pub gpu_layers: u32,
    /// With offloaded layers and a VRAM budget: the VRAM plan.
    pub vram: Option<VramPlan>,
    /// Each GPU's last reading and peak while the run went.
    pub vram_use: Vec<GpuUse>,
    /// The KV cache's types and bytes per token.
    #[serde(default)]
    pub kv_cache: KvCacheRecord,
}

/// The KV cache's element types and what a token of context costs in them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvCacheRecord {
    /// The key type (`--cache-type-k`).
    pub type_k: String,
    /// The value type (`--cache-type-v`).
    pub type_v: String,
    /// Bytes of keys and values for one token of context, over every layer.
    pub bytes_per_token: u64,
}

/// What kind of summary a file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SummaryKind {
    /// A batch run's.
    Run,
    /// A merge of shard outputs.
    Merge,
}

/// The summary of one run (a resumed run counts only its own work).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSummary {
    /// [`SummaryKind::Run`].
    pub kind: SummaryKind,
    /// Wall time of the run.
    pub wall_seconds: f64,
    /// Requests by outcome.
    pub requests: RequestCounts,
    /// Token counts.
    pub tokens: RunTokens,
    /// Rates.
    pub rates: Rates,
    /// Where the time went.
    pub seconds: Seconds,
    /// Time to first token.
    pub time_to_first_token_seconds: Percentiles,
    /// The first prefixes made resident.
    pub prefixes: Vec<PrefixRecord>,
    /// Every prefix made resident.
    pub prefixes_made_resident: u64,
    /// The context plan.
    pub plan: PlanRecord,
    /// Memory.
    pub memory: MemoryRecord,
    /// How exactness was kept.
    pub decode_groups: DecodeGroupsRecord,
    /// The computation identity the run's lines were computed under (as the manifest
    /// stores it).
    #[serde(default)]
    pub identity: serde_json::Map<String, serde_json::Value>,
    /// Other machines whose lines the output holds, accepted by `--resume-anywhere`; empty
    /// when one machine computed every line.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub other_machines: Vec<serde_json::Value>,
}

/// How a run grouped its generated tokens into decode calls, and what the start-up probe found.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DecodeGroupsRecord {
    /// The decision: `any shape, 1 to N rows a call`, `fixed-shape, LO to HI rows a call`,
    /// `one row a call`, or `mixed (not deterministic)`.
    pub decision: String,
    /// The group sizes the probe decoded, every one from the first to the last; absent without
    /// a probe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sizes_tried: Option<[usize; 2]>,
    /// The classes it found, smallest sizes first: runs of consecutive sizes whose rows were
    /// bit-identical (`1-32`, or `1`, `2-8`, `9-64`), a size whose rows changed with a deeper
    /// batch-mate or with their place in the call on its own, with why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub classes: Vec<String>,
    /// Where the findings were remembered from, when an earlier probe on this machine, model,
    /// build and settings measured them; absent when this run probed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remembered_from: Option<std::path::PathBuf>,
    /// Seconds the probe took, its own context included; absent without a probe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe_seconds: Option<f64>,
}

/// Token counts summed from merged result lines.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MergedTokens {
    /// Prompt tokens.
    pub prompt: u64,
    /// Of those, taken from a shared prefix.
    pub prompt_cached: u64,
    /// Completion tokens.
    pub completion: u64,
}

/// A shard's last run, as its own summary says.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ShardRun {
    /// Its wall time.
    pub wall_seconds: Option<f64>,
    /// Prefix tokens it prefilled.
    pub prefix_prefilled_tokens: Option<u64>,
    /// Prefix tokens it restored.
    pub prefix_restored_tokens: Option<u64>,
    /// Prompt tokens it computed.
    pub prompt_computed_tokens: Option<u64>,
}

impl ShardRun {
    /// From a shard's summary, when it has a readable one.
    pub fn of(summary: Option<&RunSummary>) -> Self {
        summary.map_or_else(Self::default, |s| Self {
            wall_seconds: Some(s.wall_seconds),
            prefix_prefilled_tokens: Some(s.tokens.prefix_prefilled),
            prefix_restored_tokens: Some(s.tokens.prefix_restored),
            prompt_computed_tokens: Some(s.tokens.prompt_computed),
        })
    }
}

/// One shard in a merge.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardRecord {
    /// `K/N`.
    pub shard: Option<String>,
    /// Its requests.
    pub requests: u64,
    /// Its runs.
    pub runs: usize,
    /// Its last run.
    pub last_run: ShardRun,
}

/// The summary of `infer-batch merge`: counts from the result lines, times and prefix work
/// from the shards.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MergeSummary {
    /// [`SummaryKind::Merge`].
    pub kind: SummaryKind,
    /// Shards joined.
    pub merged_shards: usize,
    /// From the first shard's start to the last one's end, queueing between them included.
    pub wall_seconds: Option<u64>,
    /// Requests by outcome.
    pub requests: RequestCounts,
    /// Token counts.
    pub tokens: MergedTokens,
    /// Each shard.
    pub shards: Vec<ShardRecord>,
}

/// What `--dry-run` prints: the plan, before anything runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DryRun {
    /// Input lines.
    pub requests: u64,
    /// Of those, requests that parse and fit.
    pub valid_requests: u64,
    /// Distinct shared prefixes.
    pub distinct_prefixes: usize,
    /// Slots, after any lowering to fit.
    pub parallel: usize,
    /// KV cells.
    pub n_ctx: u32,
    /// Cells each slot may use beyond its prefix.
    pub slot_budget: usize,
    /// `unified` or `streams`.
    pub kv_layout: String,
    /// What the plan needs.
    pub memory: FootprintRecord,
    /// The KV cache's types and bytes per token.
    pub kv_cache: KvCacheRecord,
    /// What it may use.
    pub budget_bytes: u64,
    /// Layers to offload.
    pub gpu_layers: u32,
    /// With offloaded layers and a VRAM budget: the VRAM plan.
    pub vram: Option<VramPlan>,
    /// When the input has embeddings lines: the context that computes them (its buffers are
    /// in `memory`, and in `vram`).
    pub embedding_context: Option<EmbeddingContextPlan>,
    /// The process's peak resident memory so far.
    pub peak_rss_bytes: Option<u64>,
}
