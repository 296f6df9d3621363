//! Memory safety: the preflight footprint of a plan, the budget it must fit, and the process's
//! measured memory.
//!
//! The footprint is computed before anything is allocated, from the model's shape and the
//! context plan: weights, KV cache (`n_ctx × layers × 2 × KV heads × head dim × 2 bytes` for
//! f16), llama.cpp's compute buffers, and a fixed allowance for this process. A plan that does
//! not fit the budget runs with fewer slots, or not at all.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::engine::ModelInfo;

/// This process's own memory besides llama.cpp's buffers: reader, scheduler, output.
pub const PROCESS_ALLOWANCE: u64 = 64 << 20;
/// Bytes per KV element (f16 K and V).
const KV_ELEMENT: u64 = 2;

/// What a plan needs, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Footprint {
    /// Model weights (memory-mapped; they count once touched).
    pub weights: u64,
    /// The KV cache for the planned context.
    pub kv: u64,
    /// llama.cpp's compute buffers for one batch.
    pub compute: u64,
    /// This process besides llama.cpp.
    pub process: u64,
}

impl Footprint {
    /// Everything together.
    pub fn total(&self) -> u64 {
        self.weights + self.kv + self.compute + self.process
    }

    /// As JSON, for `--dry-run` and the summary.
    pub fn to_json(&self) -> Value {
        json!({
            "weights_bytes": self.weights,
            "kv_bytes": self.kv,
            "compute_bytes": self.compute,
            "process_bytes": self.process,
            "total_bytes": self.total(),
        })
    }
}

/// KV cache bytes of `n_ctx` cells: keys and values of every layer, at the widths the GGUF
/// gives (Gemma 3's heads are wider than embedding ÷ heads). Sliding-window layers are counted
/// in full, which overstates their cache: the plan errs on the safe side.
pub fn kv_bytes(info: &ModelInfo, n_ctx: u32) -> u64 {
    let fallback = info.n_embd / info.n_head.max(1);
    let width = |d: u32| u64::from(if d > 0 { d } else { fallback });
    u64::from(n_ctx)
        * u64::from(info.n_layer)
        * u64::from(info.n_head_kv)
        * (width(info.head_dim_k) + width(info.head_dim_v))
        * KV_ELEMENT
}

/// llama.cpp's CPU compute buffer for batches of `n_batch` tokens attending over `span`
/// cells (the whole cache when unified, one stream's cells otherwise).
///
/// The buffer holds the logits (`n_batch × n_vocab` floats) or, at another point of the graph,
/// the feed-forward activations and, without flash attention, the attention scores
/// (`n_batch × span` floats per head), whichever is larger; plus a few activations of
/// `n_batch × n_embd`. A test checks this against llama.cpp's own report.
pub fn compute_bytes(info: &ModelInfo, span: u32, n_batch: u32, flash_attn: bool) -> u64 {
    let b = u64::from(n_batch);
    let logits = b * u64::from(info.n_vocab) * 4;
    let activations = b * u64::from(info.n_embd) * 4 * 8;
    let ffn = b * u64::from(info.n_ff) * 4 * 3;
    let scores = if flash_attn {
        0
    } else {
        b * u64::from(span) * u64::from(info.n_head) * 4
    };
    logits.max(ffn + scores) + activations
}

/// Free and total system memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SystemMemory {
    /// Memory the kernel can give without swapping.
    pub available: u64,
    /// Installed memory.
    pub total: u64,
}

/// Reads the system's memory; `None` where the OS does not say.
pub fn system_memory() -> Option<SystemMemory> {
    let mut sys = sysinfo::System::new().ok()?;
    sys.refresh_memory();
    Some(SystemMemory {
        available: sys.available_memory(),
        total: sys.total_memory(),
    })
}

/// Peak resident set size of this process so far (`VmHWM`), where the OS reports it.
pub fn peak_rss() -> Option<u64> {
    proc_status_kib("VmHWM:").map(|k| k * 1024)
}

/// Current resident set size of this process (`VmRSS`).
pub fn current_rss() -> Option<u64> {
    proc_status_kib("VmRSS:").map(|k| k * 1024)
}

fn proc_status_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Bytes as MiB, for messages.
pub fn mib(bytes: u64) -> String {
    format!("{:.0} MiB", bytes as f64 / f64::from(1 << 20))
}

/// One GPU's memory, as NVML reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuMemory {
    /// Device index.
    pub index: u32,
    /// Device name.
    pub name: String,
    /// Unallocated bytes.
    pub free: u64,
    /// Installed bytes.
    pub total: u64,
}

/// Free VRAM per NVIDIA device.
///
/// # Errors
/// When there is no NVIDIA driver or NVML library: the caller plans for the CPU.
pub fn gpu_memory() -> Result<Vec<GpuMemory>, String> {
    let nvml = nvml_wrapper::Nvml::init().map_err(|e| e.to_string())?;
    let count = nvml.device_count().map_err(|e| e.to_string())?;
    (0..count)
        .map(|index| {
            let device = nvml.device_by_index(index).map_err(|e| e.to_string())?;
            let info = device.memory_info().map_err(|e| e.to_string())?;
            Ok(GpuMemory {
                index,
                name: device.name().unwrap_or_default(),
                free: info.free,
                total: info.total,
            })
        })
        .collect()
}

/// The part of a footprint that goes to the GPU when `gpu_layers` of `n_layer` layers are
/// offloaded: that share of the weights and of the KV cache, and the compute buffer.
pub fn gpu_share(footprint: &Footprint, gpu_layers: u32, n_layer: u32) -> u64 {
    if gpu_layers == 0 || n_layer == 0 {
        return 0;
    }
    let layers = u64::from(gpu_layers.min(n_layer));
    let n = u64::from(n_layer);
    footprint.weights * layers / n + footprint.kv * layers / n + footprint.compute
}

/// Free memory under which no new request is admitted: the larger of 256 MiB and 5% of RAM.
pub fn pressure_floor(total: u64) -> u64 {
    (256 << 20).max(total / 20)
}

/// Pauses admission while free memory is under the floor, checking at most once a second.
#[derive(Debug)]
pub struct Pressure {
    last_check: Instant,
    paused: bool,
}

impl Default for Pressure {
    fn default() -> Self {
        Self::new()
    }
}

impl Pressure {
    /// Starts unpaused.
    pub fn new() -> Self {
        Self {
            last_check: Instant::now(),
            paused: false,
        }
    }

    /// Whether admission must pause now.
    pub fn high(&mut self) -> bool {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn smollm() -> ModelInfo {
        ModelInfo {
            n_ctx_train: 8192,
            n_layer: 30,
            n_head_kv: 3,
            n_embd: 576,
            n_head: 9,
            n_ff: 1536,
            head_dim_k: 0,
            head_dim_v: 0,
            n_vocab: 49152,
            size: 98_000_000,
        }
    }

    #[test]
    fn kv_bytes_per_token_match_the_layout() {
        // 30 layers × 2 (K, V) × 3 KV heads × 64 dims × 2 bytes.
        assert_eq!(kv_bytes(&smollm(), 1), 23_040);
        assert_eq!(kv_bytes(&smollm(), 1000), 23_040_000);
    }

    #[test]
    fn kv_bytes_use_the_gguf_head_widths() {
        // Gemma 3 270M: 18 layers, 1 KV head of 256 for keys and values, embedding 640 / 4.
        let gemma = ModelInfo {
            n_layer: 18,
            n_head_kv: 1,
            n_embd: 640,
            n_head: 4,
            head_dim_k: 256,
            head_dim_v: 256,
            ..smollm()
        };
        assert_eq!(kv_bytes(&gemma, 1), 18 * 512 * 2);
    }

    #[test]
    fn attention_scores_count_only_without_flash_attention() {
        let i = smollm();
        assert!(compute_bytes(&i, 8192, 512, false) > compute_bytes(&i, 8192, 512, true));
        assert_eq!(
            compute_bytes(&i, 256, 512, true),
            512 * 49152 * 4 + 512 * 576 * 4 * 8
        );
    }

    #[test]
    fn footprint_sums_its_parts() {
        let f = Footprint {
            weights: 1,
            kv: 2,
            compute: 3,
            process: 4,
        };
        assert_eq!(f.total(), 10);
        assert_eq!(f.to_json()["total_bytes"], 10);
    }

    #[test]
    fn gpu_share_follows_the_offloaded_layers() {
        let f = Footprint {
            weights: 300,
            kv: 600,
            compute: 10,
            process: 5,
        };
        assert_eq!(gpu_share(&f, 0, 30), 0);
        assert_eq!(gpu_share(&f, 10, 30), 100 + 200 + 10);
        assert_eq!(gpu_share(&f, u32::MAX, 30), 300 + 600 + 10);
    }

    #[test]
    fn no_nvidia_driver_is_an_error_not_a_panic() {
        // On a machine without NVML this says why; with one it lists the devices.
        match gpu_memory() {
            Ok(devices) => assert!(devices.iter().all(|d| d.free <= d.total)),
            Err(reason) => assert!(!reason.is_empty()),
        }
    }

    #[test]
    fn pressure_floor_has_a_minimum() {
        assert_eq!(pressure_floor(1 << 30), 256 << 20);
        assert_eq!(pressure_floor(100 << 30), 5 << 30);
    }

    #[test]
    fn rss_is_readable_here() {
        // Current first: other test threads may grow RSS between the reads, and the peak
        // read afterwards covers anything read before it.
        let current = current_rss().expect("Linux reports VmRSS");
        let peak = peak_rss().expect("Linux reports VmHWM");
        assert!(peak >= current, "{peak} < {current}");
    }
}
