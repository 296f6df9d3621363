//! Memory safety: the preflight footprint of a plan, the budget it must fit, and the process's
//! measured memory.
//!
//! The footprint is computed before anything is allocated, from the model's shape and the
//! context plan: weights, KV cache (`n_ctx × layers × KV heads × head dims`, at 2 bytes an
//! element for f16 and 34 bytes a block of 32 for q8_0), llama.cpp's compute buffers, and a
//! fixed allowance for this process. A plan that does
//! not fit the budget runs with fewer slots, or not at all.

use std::time::{Duration, Instant};

use crate::engine::{KvTypes, ModelInfo};
use crate::formats::summary::{FootprintRecord, GpuUse};

/// This process's own memory besides llama.cpp's buffers: reader, scheduler, output.
pub const PROCESS_ALLOWANCE: u64 = 64 << 20;

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

    /// As `--dry-run` and the summary report it.
    pub fn record(&self) -> FootprintRecord {
        FootprintRecord {
            weights_bytes: self.weights,
            kv_bytes: self.kv,
            compute_bytes: self.compute,
            process_bytes: self.process,
            total_bytes: self.total(),
        }
    }
}

/// KV cache bytes of `n_ctx` cells of `types`: keys and values of every layer, at the widths
/// the GGUF gives (Gemma 3's heads are wider than embedding ÷ heads). Sliding-window layers are
/// counted in full, which overstates their cache: the plan errs on the safe side.
pub fn kv_bytes(info: &ModelInfo, n_ctx: u32, types: KvTypes) -> u64 {
    u64::from(n_ctx) * kv_bytes_per_token(info, types)
}

/// KV cache bytes of one cell: a key and a value row per KV head of every layer. llama.cpp
/// quantizes each row alone, in blocks along its head width.
pub fn kv_bytes_per_token(info: &ModelInfo, types: KvTypes) -> u64 {
    let (k, v) = head_widths(info);
    u64::from(info.n_layer) * u64::from(info.n_head_kv) * (types.k.bytes(k) + types.v.bytes(v))
}

/// The f16 copy of one layer's keys and values over `span` cells that a GPU's flash attention
/// makes of a quantized cache for calls of several rows (CUDA from 2 or 3 rows, Vulkan past
/// 64): outside llama.cpp's compute buffer, which the plan counts apart, so counted here.
pub fn f16_copy_bytes(info: &ModelInfo, span: u32, types: KvTypes) -> u64 {
    if !types.quantized() {
        return 0;
    }
    let (k, v) = head_widths(info);
    u64::from(span) * u64::from(info.n_head_kv) * (k + v) * 2
}

/// The key and value head widths, as the GGUF gives them or as embedding ÷ heads.
pub fn head_widths(info: &ModelInfo) -> (u64, u64) {
    let fallback = info.n_embd / info.n_head.max(1);
    let width = |d: u32| u64::from(if d > 0 { d } else { fallback });
    (width(info.head_dim_k), width(info.head_dim_v))
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
    status_kib(&std::fs::read_to_string("/proc/self/status").ok()?, field)
}

/// A `kB` field of `/proc/PID/status` text.
fn status_kib(status: &str, field: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Bytes as MiB, for messages.
pub fn mib(bytes: u64) -> String {
    format!("{:.0} MiB", bytes as f64 / f64::from(1 << 20))
}

/// One GPU's memory at one reading.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuMemory {
    /// Device index among the GPUs, in the order offloaded layers take.
    pub index: u32,
    /// The backend's name for it (`CUDA0`, `Vulkan0`).
    pub device: String,
    /// What it is (`NVIDIA H200`, `llvmpipe (LLVM 15.0.6, 256 bits)`).
    pub name: String,
    /// Unallocated bytes.
    pub free: u64,
    /// Installed bytes.
    pub total: u64,
    /// Who measured it: `nvml`, or `ggml` (the backend's own device memory query).
    pub source: &'static str,
}

/// Free VRAM per GPU, from the backend's own device memory query (CUDA's, Vulkan's), so every
/// backend is planned the same way. Where NVML knows the device (an NVIDIA GPU, matched by its
/// PCI bus id), its reading is taken instead: NVML counts every process on the device. Empty
/// where no GPU backend has a device.
pub fn gpu_memory() -> Vec<GpuMemory> {
    read_gpus(nvml().as_ref())
}

/// NVML, where an NVIDIA driver is.
fn nvml() -> Option<nvml_wrapper::Nvml> {
    nvml_wrapper::Nvml::init().ok()
}

fn read_gpus(nvml: Option<&nvml_wrapper::Nvml>) -> Vec<GpuMemory> {
    crate::engine::gpu_devices()
        .into_iter()
        .zip(0..)
        .map(|(d, index)| {
            let measured = nvml
                .zip(d.pci_bus_id.as_deref())
                .and_then(|(nvml, bus)| nvml.device_by_pci_bus_id(bus).ok())
                .and_then(|dev| dev.memory_info().ok());
            let (free, total, source) =
                measured.map_or((d.free, d.total, "ggml"), |m| (m.free, m.total, "nvml"));
            GpuMemory {
                index,
                device: d.name,
                name: d.description,
                free,
                total,
                source,
            }
        })
        .collect()
}

/// Reads VRAM while a run goes, at most once a second, and keeps each GPU's peak.
pub struct VramMonitor {
    watch: bool,
    nvml: Option<nvml_wrapper::Nvml>,
    gpus: Vec<GpuUse>,
    last: Option<Instant>,
}

impl VramMonitor {
    /// Watches when `watch` (layers are offloaded); NVML is opened once, where a driver is.
    pub fn new(watch: bool) -> Self {
        Self {
            watch,
            nvml: watch.then(nvml).flatten(),
            gpus: Vec::new(),
            last: None,
        }
    }

    /// Takes a reading if a second has passed since the last; returns the GPUs as read.
    pub fn sample(&mut self) -> &[GpuUse] {
        let due = self
            .last
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(1));
        if self.watch && due {
            self.last = Some(Instant::now());
            record(&mut self.gpus, &read_gpus(self.nvml.as_ref()));
        }
        &self.gpus
    }

    /// Every GPU's last reading and peak.
    pub fn gpus(&self) -> &[GpuUse] {
        &self.gpus
    }
}

/// Folds a reading into each GPU's use: the latest, and the peak.
fn record(gpus: &mut Vec<GpuUse>, devices: &[GpuMemory]) {
    for d in devices {
        // Readings are taken only while layers are on the device, so nothing in use means
        // the device does not say.
        let used = Some(d.total.saturating_sub(d.free)).filter(|&u| u > 0);
        match gpus.iter_mut().find(|g| g.index == d.index) {
            Some(g) => {
                g.used_bytes = used;
                g.peak_used_bytes = g.peak_used_bytes.max(used);
            }
            None => gpus.push(GpuUse {
                index: d.index,
                device: d.device.clone(),
                name: d.name.clone(),
                source: d.source.to_owned(),
                total_bytes: d.total,
                used_bytes: used,
                peak_used_bytes: used,
            }),
        }
    }
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

/// Layers of `n_layer` whose share of a footprint fits `free` bytes of VRAM, at most
/// `requested`: each layer brings its share of the weights and of the KV cache, and the
/// compute buffer comes with any offload.
pub fn layers_that_fit(footprint: &Footprint, requested: u32, n_layer: u32, free: u64) -> u32 {
    let requested = requested.min(n_layer);
    if requested == 0 || free <= footprint.compute {
        return 0;
    }
    let per_layer = (footprint.weights + footprint.kv).div_ceil(u64::from(n_layer.max(1)));
    let fit = (free - footprint.compute) / per_layer.max(1);
    requested.min(u32::try_from(fit).unwrap_or(u32::MAX))
}

/// Settings that fit the memory a run may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fitted {
    /// Slots, at most the requested.
    pub parallel: usize,
    /// Offloaded layers, at most the requested.
    pub gpu_layers: u32,
    /// The footprint at those settings.
    pub footprint: Footprint,
}

/// Why no plan fits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoFit {
    /// The footprint of one slot.
    pub footprint: Footprint,
}

/// Fits a plan to its budgets before anything is allocated: `--parallel` comes down to a count
/// whose footprint fits `ram` and, with offloaded layers, whose GPU share fits `vram`; at one
/// slot, the offloaded layers come down until the share fits. `footprint(parallel)` is the
/// plan's footprint at a number of slots. Where it grows with the slots (a context sized by
/// the plan) the count is the largest that fits; a fixed `--ctx-size` divides the same cells
/// among more slots, and then the count found fits but may not be the largest.
///
/// # Errors
/// [`NoFit`] when even one slot does not fit the RAM budget.
pub fn fit<E>(
    parallel: usize,
    gpu_layers: u32,
    n_layer: u32,
    ram: u64,
    vram: Option<u64>,
    mut footprint: impl FnMut(usize) -> Result<Footprint, E>,
) -> Result<Result<Fitted, NoFit>, E> {
    let fits = |f: &Footprint| {
        f.total() <= ram && vram.is_none_or(|free| gpu_share(f, gpu_layers, n_layer) <= free)
    };
    let fitted = |parallel, footprint| Fitted {
        parallel,
        gpu_layers,
        footprint,
    };
    let top = parallel.max(1);
    let f = footprint(top)?;
    if fits(&f) {
        return Ok(Ok(fitted(top, f)));
    }
    let one = footprint(1)?;
    if !fits(&one) {
        if one.total() > ram {
            return Ok(Err(NoFit { footprint: one }));
        }
        let layers = vram.map_or(gpu_layers, |free| {
            layers_that_fit(&one, gpu_layers, n_layer, free)
        });
        return Ok(Ok(Fitted {
            parallel: 1,
            gpu_layers: layers,
            footprint: one,
        }));
    }
    // 1 fits and `top` does not: halve the gap between them.
    let (mut lo, mut lo_footprint, mut hi) = (1, one, top);
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        let f = footprint(mid)?;
        if fits(&f) {
            (lo, lo_footprint) = (mid, f);
        } else {
            hi = mid;
        }
    }
    Ok(Ok(fitted(lo, lo_footprint)))
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
pub(crate) mod tests {
    use super::*;
    use crate::engine::KvType;

    /// SmolLM2-135M's shape, as its GGUF gives it.
    pub(crate) fn smollm() -> ModelInfo {
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
        let f16 = KvTypes::default();
        assert_eq!(kv_bytes(&smollm(), 1, f16), 23_040);
        assert_eq!(kv_bytes(&smollm(), 1000, f16), 23_040_000);
    }

    #[test]
    fn quantized_kv_bytes_per_token_count_ggml_blocks() {
        // 30 layers × 3 KV heads × 2 blocks of 32 a row: q8_0 34 bytes a block, q4_0 18.
        let q8 = KvTypes {
            k: KvType::Q8_0,
            v: KvType::Q8_0,
        };
        assert_eq!(kv_bytes_per_token(&smollm(), q8), 30 * 3 * 2 * 2 * 34);
        let mixed = KvTypes {
            k: KvType::Q8_0,
            v: KvType::Q4_0,
        };
        assert_eq!(kv_bytes_per_token(&smollm(), mixed), 30 * 3 * 2 * (34 + 18));
        // q8_0 is 17/32 of f16: a little over half.
        let f16 = kv_bytes_per_token(&smollm(), KvTypes::default());
        assert_eq!(kv_bytes_per_token(&smollm(), q8) * 32, f16 * 17);
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
        assert_eq!(kv_bytes(&gemma, 1, KvTypes::default()), 18 * 512 * 2);
    }

    #[test]
    fn a_quantized_cache_counts_its_f16_copy_on_a_gpu() {
        let q8 = KvTypes {
            k: KvType::Q8_0,
            v: KvType::Q8_0,
        };
        assert_eq!(f16_copy_bytes(&smollm(), 512, KvTypes::default()), 0);
        // 512 cells × 3 KV heads × (64 + 64) wide × 2 bytes.
        assert_eq!(f16_copy_bytes(&smollm(), 512, q8), 512 * 3 * 128 * 2);
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
        assert_eq!(f.record().total_bytes, 10);
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

    fn fake(kv_per_slot: u64) -> impl FnMut(usize) -> Result<Footprint, ()> {
        move |p| {
            Ok(Footprint {
                weights: 3000,
                kv: kv_per_slot * p as u64,
                compute: 100,
                process: 10,
            })
        }
    }

    #[test]
    fn fit_lowers_parallel_then_offloaded_layers_against_a_fake_gpu() {
        // Enough of everything: nothing changes.
        let f = fit(8, 30, 30, u64::MAX, Some(u64::MAX), fake(300))
            .unwrap()
            .unwrap();
        assert_eq!((f.parallel, f.gpu_layers), (8, 30));
        // RAM for 2 slots: 3000 + 2 × 300 + 100 + 10 = 3710.
        let f = fit(8, 0, 30, 3800, None, fake(300)).unwrap().unwrap();
        assert_eq!((f.parallel, f.gpu_layers), (2, 0));
        // The largest count that fits, not a power of two: 3000 + 5 × 300 + 110 = 4610.
        let f = fit(8, 0, 30, 4700, None, fake(300)).unwrap().unwrap();
        assert_eq!((f.parallel, f.footprint.total()), (5, 4610));
        let f = fit(64, 0, 30, 4700, None, fake(150)).unwrap().unwrap();
        assert_eq!(f.parallel, 10);
        // A GPU with 4,000 bytes free holds all 30 layers of 3 slots: 3000 + 900 + 100.
        let f = fit(8, 30, 30, u64::MAX, Some(4000), fake(300))
            .unwrap()
            .unwrap();
        assert_eq!((f.parallel, f.gpu_layers), (3, 30));
        // 2,000 free at one slot: (2000 - 100) / ceil(3300 / 30) = 1900 / 110 = 17 layers.
        let f = fit(8, 30, 30, u64::MAX, Some(2000), fake(300))
            .unwrap()
            .unwrap();
        assert_eq!((f.parallel, f.gpu_layers), (1, 17));
        assert!(gpu_share(&f.footprint, 17, 30) <= 2000);
        assert!(gpu_share(&f.footprint, 18, 30) > 2000);
        // Less than the compute buffer: nothing goes to the GPU.
        let f = fit(4, 30, 30, u64::MAX, Some(50), fake(300))
            .unwrap()
            .unwrap();
        assert_eq!((f.parallel, f.gpu_layers), (1, 0));
        // Not even one slot in RAM.
        let no = fit(4, 0, 30, 1000, None, fake(300)).unwrap().unwrap_err();
        assert_eq!(no.footprint.total(), 3410);
    }

    #[test]
    fn vram_readings_keep_each_gpus_peak() {
        let gpu = |index, free| GpuMemory {
            index,
            device: format!("Vulkan{index}"),
            name: "H100".into(),
            free,
            total: 100,
            source: "ggml",
        };
        let reading = |free0, free1| vec![gpu(0, free0), gpu(1, free1)];
        let mut gpus = Vec::new();
        record(&mut gpus, &reading(90, 50));
        record(&mut gpus, &reading(20, 70));
        record(&mut gpus, &reading(60, 80));
        let use_of = |gpus: &[GpuUse]| {
            gpus.iter()
                .map(|g| (g.used_bytes, g.peak_used_bytes))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            use_of(&gpus),
            vec![(Some(40), Some(80)), (Some(20), Some(50))]
        );
        // A device that reports its whole size free does not report its use.
        let mut silent = Vec::new();
        record(&mut silent, &reading(100, 100));
        assert_eq!(use_of(&silent), vec![(None, None), (None, None)]);
        assert!(VramMonitor::new(false).sample().is_empty(), "not watched");
    }

    #[test]
    fn pressure_floor_has_a_minimum() {
        assert_eq!(pressure_floor(1 << 30), 256 << 20);
        assert_eq!(pressure_floor(100 << 30), 5 << 30);
    }

    #[test]
    fn status_fields_are_read_by_name_in_kib() {
        let status = "Name:\tx\nVmPeak:\t  900 kB\nVmHWM:\t  512 kB\nVmRSS:\t  256 kB\n";
        assert_eq!(status_kib(status, "VmHWM:"), Some(512));
        assert_eq!(status_kib(status, "VmRSS:"), Some(256));
        assert_eq!(status_kib(status, "VmSwap:"), None);
        assert_eq!(status_kib("VmRSS:\tlots kB\n", "VmRSS:"), None);
    }

    #[test]
    fn peak_rss_grows_with_memory_touched() {
        let before = peak_rss().expect("Linux reports VmHWM");
        // 64 MiB, every page written; the kernel's RSS counters may lag by a few pages.
        let mut block = std::hint::black_box(vec![0u8; 64 << 20]);
        for page in block.chunks_mut(4096) {
            page[0] = 1;
        }
        std::hint::black_box(&block);
        let after = peak_rss().expect("Linux reports VmHWM");
        assert!(
            after >= before + (48 << 20),
            "peak {after} after touching 64 MiB, {before} before"
        );
    }
}
