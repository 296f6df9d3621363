//! Before the first decode: load the model, scan the input, plan the context and its memory,
//! and open the prefix state store.

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufRead, BufReader};

use anyhow::{Context, Result};

use crate::cache::prefix_store::{PrefixStore, StateIdentity};
use crate::commands::cli::RunConfig;
use crate::commands::prepare::{check_files, probe_cache};
use crate::engine::embed::context_size;
use crate::engine::probe;
use crate::engine::{
    gpu_available, gpu_devices, Device, FlashAttn, KvType, KvTypes, Model, ModelInfo,
    ModelSettings, Token, QUANT_BLOCK,
};
use crate::formats::summary::{DryRun, EmbeddingContextPlan, KvCacheRecord, VramPlan};
use crate::identity::Identity;
use crate::input::request::{parse_line, Prompt, RequestReader, COMPLETIONS_URL, EMBEDDINGS_URL};
use crate::plan::memory::{
    compute_bytes, f16_copy_bytes, fit, gpu_memory, gpu_share, head_widths, kv_bytes,
    kv_bytes_per_token, mib, peak_rss, system_memory, Fitted, Footprint, NoFit, PROCESS_ALLOWANCE,
};
use crate::plan::{plan, Demand, KvLayout, Plan, CTX_STEP};
use crate::prompt::text_prefix::CommonText;
use crate::prompt::{PrefixKey, PromptBuilder, Renderer};
use crate::schedule::job::fits_trained_context;
use crate::schedule::scheduler::Exact;

/// Loads the model of a run, with `gpu_layers` offloaded, and the chat template its prompts
/// are rendered with.
///
/// # Errors
/// When the model cannot be loaded, or no chat template can render its prompts while the input
/// holds `conversations`: then no request could run, so the run stops before any of them gets
/// an error line.
pub fn load_model(
    cfg: &RunConfig,
    gpu_layers: u32,
    conversations: bool,
) -> Result<(Model, Renderer)> {
    let model = Model::load(&ModelSettings {
        path: cfg.model.clone(),
        gpu_layers,
        verbose: cfg.verbose,
    })?;
    let renderer = match Renderer::for_model(&model, &cfg.chat_template) {
        Ok(r) => r,
        // Raw-text prompts need no template; a stray chat line still gets its error line.
        Err(e) if !conversations => Renderer::Missing(e.to_string()),
        Err(e) => anyhow::bail!("model {}: {e}", cfg.model.display()),
    };
    tracing::debug!(template = renderer.identity(), "chat template");
    Ok((model, renderer))
}

/// Cells one query attends over: the whole cache when unified, one stream otherwise.
fn attention_span(plan: &Plan) -> u32 {
    match plan.layout {
        KvLayout::Unified => plan.n_ctx,
        KvLayout::Streams => plan.n_ctx / plan.n_seq_max.max(1),
    }
}

/// The plan a run uses, with its memory footprint.
#[derive(Debug, Clone)]
pub struct Preflight {
    /// What the input needs.
    pub demand: Demand,
    /// The context plan.
    pub plan: Plan,
    /// Memory the plan needs.
    pub footprint: Footprint,
    /// Memory it may use.
    pub budget: u64,
    /// Slots, possibly fewer than asked for so the plan fits.
    pub parallel: usize,
    /// Layers to offload, possibly fewer than asked for so the plan fits the GPU.
    pub gpu_layers: u32,
    /// With offloaded layers and a VRAM budget: (VRAM the plan needs, VRAM it may use).
    pub vram: Option<(u64, u64)>,
    /// The KV cache's types and bytes per token.
    pub kv_cache: KvCacheRecord,
    /// When the input has embeddings lines: the second context that computes them, whose
    /// buffers the footprint counts (in its KV cache and compute parts).
    pub embeddings: Option<EmbeddingContext>,
}

/// The embedding context's share of a plan: its own KV cache and compute buffer (the weights
/// are the model's, counted once).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EmbeddingContext {
    /// Its cells: one input at a time, of up to this many tokens.
    pub n_ctx: u32,
    /// Its KV cache.
    pub kv: u64,
    /// Its compute buffer, for one input of `n_ctx` tokens a call.
    pub compute: u64,
}

impl EmbeddingContext {
    /// The context the run makes for a model like `info` ([`context_size`]): cells allocated
    /// in llama.cpp's steps, a whole input a call, without flash attention, as
    /// [`Model::new_embedder`] makes it.
    pub fn plan(info: &ModelInfo) -> Self {
        let n_ctx = context_size(info.n_ctx_train);
        let cells = u32::try_from((n_ctx as usize).next_multiple_of(CTX_STEP)).unwrap_or(n_ctx);
        Self {
            n_ctx,
            // The embedder's cache is llama.cpp's default type, f16.
            kv: kv_bytes(info, cells, KvTypes::default()),
            compute: compute_bytes(info, cells, n_ctx, false),
        }
    }

    /// As `--dry-run` reports it.
    pub fn record(&self) -> EmbeddingContextPlan {
        EmbeddingContextPlan {
            n_ctx: self.n_ctx,
            kv_bytes: self.kv,
            compute_bytes: self.compute,
        }
    }
}

impl Preflight {
    /// The VRAM part of the plan, as the dry run and the summary report it.
    pub fn vram_plan(&self) -> Option<VramPlan> {
        self.vram.map(|(planned_bytes, budget_bytes)| VramPlan {
            planned_bytes,
            budget_bytes,
        })
    }

    /// What `--dry-run` prints.
    pub fn dry_run(&self) -> DryRun {
        DryRun {
            requests: self.demand.lines,
            valid_requests: self.demand.requests,
            distinct_prefixes: self.demand.distinct_prefixes,
            parallel: self.parallel,
            n_ctx: self.plan.n_ctx,
            slot_budget: self.plan.slot_budget,
            kv_layout: self.plan.layout.name().to_owned(),
            memory: self.footprint.record(),
            kv_cache: self.kv_cache.clone(),
            budget_bytes: self.budget,
            gpu_layers: self.gpu_layers,
            vram: self.vram_plan(),
            embedding_context: self.embeddings.map(|e| e.record()),
            peak_rss_bytes: peak_rss(),
        }
    }
}

/// Scans the input and plans the context; lowers `--parallel` until the plan fits the memory
/// budget (`--memory-budget`, else 90% of the RAM free now). With `embeddings` (the input has
/// embeddings lines) the plan counts the embedding context too. In deterministic mode it
/// counts the decode-group probe's session, unless `probe_remembered` says its findings are
/// remembered for that many offloaded layers (then no probe runs).
///
/// # Errors
/// When even one slot does not fit: the message gives the numbers and what to change.
pub fn preflight(
    cfg: &RunConfig,
    model: &Model,
    prompts: &mut PromptBuilder<'_>,
    embeddings: bool,
    probe_remembered: impl Fn(u32) -> bool,
    on_new_prefix: impl FnMut(PrefixKey, &[Token]),
) -> Result<Preflight> {
    let file = File::open(&cfg.input)
        .with_context(|| format!("cannot read input {}", cfg.input.display()))?;
    let info = model.info();
    let demand = scan(
        RequestReader::new(BufReader::new(file), cfg.fields)
            .shard(cfg.shard)
            .log_ignored_fields(),
        prompts,
        cfg,
        info.n_ctx_train as usize,
        on_new_prefix,
    )?;
    let budget = memory_budget(cfg);
    let flash_attn = cfg.flash_attn != FlashAttn::Off;
    // llama.cpp counts the output layer as one more: n_layer + 1 offloads everything.
    let gpu_layers = offloadable_layers(cfg.gpu_layers).min(info.n_layer + 1);
    let gpus = if gpu_layers > 0 {
        gpu_devices()
    } else {
        Vec::new()
    };
    check_kv_types(&info, cfg.kv_types, cfg.flash_attn, &gpus)?;
    let vram = if gpu_layers > 0 {
        vram_budget(cfg)
    } else {
        None
    };
    let layout = if cfg.deterministic {
        KvLayout::Streams
    } else {
        KvLayout::Unified
    };
    // The decode-group probe's session comes and goes before the run's: the plan holds the
    // larger of the two, where the probe will run.
    let probe_footprint = |layers: u32| {
        if layout == KvLayout::Streams && !probe_remembered(layers) {
            let cells = Exact::probe_cells(layers > 0, cfg.batch_size);
            (
                kv_bytes(&info, cells, cfg.kv_types),
                compute_bytes(&info, probe::STREAM_CELLS, cfg.batch_size, flash_attn),
            )
        } else {
            (0, 0)
        }
    };
    let plan_at = |parallel: usize| {
        plan(
            &demand,
            parallel,
            cfg.max_prefixes as usize,
            cfg.prefix_cache,
            cfg.ctx_size.map(|c| c as usize),
            layout,
        )
    };
    let embeddings = embeddings.then(|| EmbeddingContext::plan(&info));
    // Its buffers sit beside the run's own, in RAM and, with offloaded layers, in VRAM: its
    // cache is split by layer as the run's is, and its compute buffer goes to the GPU with any.
    let (embed_kv, embed_compute) = embeddings.map_or((0, 0), |e| (e.kv, e.compute));
    // A GPU's flash attention copies a quantized cache's keys and values to f16 for wide calls.
    let gpu_f16_copy = |span: u32| {
        if gpu_layers > 0 && flash_attn {
            f16_copy_bytes(&info, span, cfg.kv_types)
        } else {
            0
        }
    };
    let fit_with = |(probe_kv, probe_compute): (u64, u64)| {
        fit(
            cfg.parallel as usize,
            gpu_layers,
            info.n_layer,
            budget,
            vram,
            |parallel| {
                plan_at(parallel).map(|plan| Footprint {
                    weights: info.size,
                    // The probe's session comes and goes before the run's, which the
                    // embedding context joins: the larger of the two counts.
                    kv: (kv_bytes(&info, plan.n_ctx, cfg.kv_types) + embed_kv).max(probe_kv),
                    compute: (compute_bytes(
                        &info,
                        attention_span(&plan),
                        cfg.batch_size,
                        flash_attn,
                    ) + gpu_f16_copy(attention_span(&plan))
                        + embed_compute)
                        .max(probe_compute),
                    process: PROCESS_ALLOWANCE,
                })
            },
        )
    };
    let requested = probe_footprint(gpu_layers);
    let mut fitted = fit_with(requested)?;
    // Fewer layers fitted are another probe key: plan again where that one must probe.
    if let Ok(f) = &fitted {
        if f.gpu_layers != gpu_layers {
            let probe = probe_footprint(f.gpu_layers);
            if probe != requested {
                fitted = fit_with(probe)?;
            }
        }
    }
    let fitted = match fitted {
        Ok(f) => f,
        Err(NoFit { footprint }) => anyhow::bail!(
            "not enough memory even for one slot: the plan needs {} (weights {}, KV cache {}, \
             compute {}, process {}{}) but the budget is {}. Lower max_tokens or --ctx-size, \
             shorten the prompts, use a smaller model, free memory, or raise --memory-budget",
            mib(footprint.total()),
            mib(footprint.weights),
            mib(footprint.kv),
            mib(footprint.compute),
            mib(footprint.process),
            embeddings.map_or(String::new(), |e| format!(
                "; the embedding context's {} of them",
                mib(e.kv + e.compute)
            )),
            mib(budget)
        ),
    };
    warn_if_lowered(cfg, &info, &fitted, budget, vram, gpu_layers);
    let Fitted {
        parallel,
        gpu_layers: fitted_layers,
        footprint,
    } = fitted;
    let plan = plan_at(parallel)?;
    Ok(Preflight {
        demand,
        plan,
        footprint,
        budget,
        parallel,
        gpu_layers: fitted_layers,
        vram: vram.map(|free| (gpu_share(&footprint, fitted_layers, info.n_layer), free)),
        embeddings,
        kv_cache: KvCacheRecord {
            type_k: cfg.kv_types.k.name().to_owned(),
            type_v: cfg.kv_types.v.name().to_owned(),
            bytes_per_token: kv_bytes_per_token(&info, cfg.kv_types),
        },
    })
}

/// Refuses KV types and attention kernels the model or the devices cannot run, before any
/// request does.
///
/// llama.cpp quantizes each head's row in blocks of 32 and fails on a head width that is not a
/// whole number of blocks. Its CUDA build compiles flash-attention kernels for a few type
/// pairs only (llama.cpp's default `GGML_CUDA_FA_QUANTS`), and runs the others many times
/// slower: they are refused there rather than run slowly. Mesa's lavapipe (22.3.6, Debian 12)
/// crashes compiling llama.cpp's Vulkan flash-attention shaders for calls of 3 tokens or more,
/// whatever the KV types: refused there rather than crash.
fn check_kv_types(
    info: &ModelInfo,
    types: KvTypes,
    flash_attn: FlashAttn,
    devices: &[Device],
) -> Result<()> {
    let (k, v) = head_widths(info);
    for (flag, t, width) in [
        ("--cache-type-k", types.k, k),
        ("--cache-type-v", types.v, v),
    ] {
        if t.is_quantized() && width % u64::from(QUANT_BLOCK) != 0 {
            anyhow::bail!(
                "{flag} {} stores blocks of {QUANT_BLOCK} elements, but this model's heads are \
                 {width} wide: use {flag} f16",
                t.name()
            );
        }
    }
    // `auto` is llama.cpp's choice, made per device; `on` is the user's.
    if flash_attn == FlashAttn::On {
        if let Some(d) = devices
            .iter()
            .find(|d| d.description.starts_with("llvmpipe"))
        {
            anyhow::bail!(
                "flash attention (--flash-attn on, or a quantized --cache-type-v) crashes \
                 {} ({}) in Mesa's shader compiler: use --gpu-layers 0 to run it on the CPU, \
                 or --flash-attn off with --cache-type-v f16 (quantized keys alone need no \
                 flash attention)",
                d.name,
                d.description
            );
        }
    }
    let cuda = devices.iter().any(|d| d.name.starts_with("CUDA"));
    let compiled =
        types.k == types.v && matches!(types.k, KvType::F16 | KvType::Q8_0 | KvType::Q4_0);
    if cuda && flash_attn != FlashAttn::Off && !compiled {
        // Quantized keys beside f16 values need no flash attention at all.
        let off = if types.v.is_quantized() {
            ""
        } else {
            ", --flash-attn off"
        };
        anyhow::bail!(
            "--cache-type-k {} with --cache-type-v {} ({}) has no flash-attention kernel in this \
             CUDA build (it has f16/f16, q8_0/q8_0 and q4_0/q4_0), and would run many times \
             slower: use one of those pairs{off}, or --gpu-layers 0",
            types.k.name(),
            types.v.name(),
            types.describe()
        );
    }
    Ok(())
}

/// Memory the plan may use: `--memory-budget`, else 90% of the RAM free now.
fn memory_budget(cfg: &RunConfig) -> u64 {
    match (cfg.memory_budget, system_memory()) {
        (Some(b), _) => b,
        (None, Some(mem)) => mem.available / 10 * 9,
        (None, None) => {
            tracing::warn!("the OS does not report free memory; planning without a budget");
            u64::MAX
        }
    }
}

/// Says when the plan lowered `--parallel` or the offloaded layers (from `gpu_layers`) to
/// fit the `budget` and the free `vram`.
fn warn_if_lowered(
    cfg: &RunConfig,
    info: &ModelInfo,
    fitted: &Fitted,
    budget: u64,
    vram: Option<u64>,
    gpu_layers: u32,
) {
    let Fitted {
        parallel,
        gpu_layers: fitted_layers,
        footprint,
    } = *fitted;
    if parallel < cfg.parallel as usize {
        tracing::warn!(
            "lowered --parallel from {} to {parallel} so the plan ({}) fits the memory budget ({}){}",
            cfg.parallel,
            mib(footprint.total()),
            mib(budget),
            vram.map_or(String::new(), |free| format!(" and {} of VRAM", mib(free)))
        );
    }
    if fitted_layers < gpu_layers.min(info.n_layer) {
        tracing::warn!(
            "offloading {fitted_layers} of {} layers so the plan fits the {} of VRAM free{}",
            info.n_layer,
            mib(vram.unwrap_or(0)),
            if fitted_layers == 0 {
                ": the run goes on the CPU"
            } else {
                ""
            }
        );
    }
}

/// VRAM the plan may use on the first GPU: `--vram-budget`, else 90% of what the GPU has free
/// (as its backend, or NVML, reports it).
fn vram_budget(cfg: &RunConfig) -> Option<u64> {
    if cfg.vram_budget.is_some() {
        return cfg.vram_budget;
    }
    match gpu_memory().first() {
        Some(gpu) => Some(gpu.free / 10 * 9),
        None => {
            tracing::warn!("no GPU reports its free memory; planning VRAM is left to llama.cpp");
            None
        }
    }
}

/// The layers a run can offload: `requested`, or none where no GPU backend has a device (a
/// CPU build, or a GPU build on a machine without a GPU or driver), which it says once.
pub fn offloadable_layers(requested: u32) -> u32 {
    if requested == 0 || gpu_available() {
        return requested;
    }
    static SAID: std::sync::Once = std::sync::Once::new();
    SAID.call_once(|| {
        let failed = crate::engine::gpu_modules_not_loaded();
        let why = match env!("INFER_BATCH_GPU_BACKEND") {
            "" => "this build has no GPU backend (build with --features cuda or vulkan)".to_owned(),
            _ if !failed.is_empty() => failed.join("; "),
            _ => "the GPU backend found no device or driver".to_owned(),
        };
        tracing::warn!("no GPU: {why}; running on the CPU");
    });
    0
}

/// The model with `gpu_layers` offloaded, loaded once the plan has fitted them; `None` when
/// nothing is offloaded and the planning model (loaded on the CPU) serves.
///
/// # Errors
/// When the model cannot be loaded with its layers on the GPU.
pub fn load_offloaded(cfg: &RunConfig, gpu_layers: u32) -> Result<Option<Model>> {
    if gpu_layers == 0 {
        return Ok(None);
    }
    Ok(Some(load_model(cfg, gpu_layers, false)?.0))
}

/// `--dry-run`: loads the model, scans the input and returns the plan, touching no output.
///
/// # Errors
/// As [`preflight`], and when the model cannot be loaded.
pub fn dry_run(cfg: &RunConfig) -> Result<Preflight> {
    let kinds = input_kinds(cfg)?;
    let (model, renderer) = load_model(cfg, 0, kinds.conversations)?;
    renderer.check_kwargs(&cfg.template_kwargs)?;
    let mut prompts = PromptBuilder::new(
        &model,
        &renderer,
        kinds.text_prefix.as_deref(),
        cfg.think_setup(&model),
    );
    let model_sha256 = check_files(cfg)?;
    preflight(
        cfg,
        &model,
        &mut prompts,
        kinds.embeddings,
        |gpu_layers| probe_cache(cfg, model_sha256, gpu_layers).load().is_some(),
        |_, _| {},
    )
}

/// The prefix state store of `--prefix-cache-dir`, its files keyed and checked by the
/// computation `identity` and the model's memory layout.
///
/// # Errors
/// When the model's memory layout is one whose states no test covers (they are never saved
/// or restored), or the directory cannot be created.
pub fn prefix_store(cfg: &RunConfig, model: &Model, identity: &Identity) -> Result<PrefixStore> {
    let memory = model.memory_kind();
    if memory.sections().is_none() {
        anyhow::bail!(
            "prefix states of this model's memory layout, {memory}, are not saved or restored"
        );
    }
    Ok(PrefixStore::open(
        &cfg.prefix_cache_dir,
        cfg.prefix_cache_max_bytes,
        StateIdentity::new(identity, &format!("memory={memory}")),
    )?)
}

/// What a light pass over the whole input (whatever the shard) finds: the text its
/// `/v1/completions` prompts share ([`crate::prompt::text_prefix`]), whether any line asks
/// for a conversation, which needs a chat template, and whether any asks for embeddings, which
/// need a context of their own. Only lines that name the completions or embeddings endpoint are
/// parsed; any other line counts as a conversation.
#[derive(Debug, Default)]
pub struct InputKinds {
    /// The shared text of the completions prompts.
    pub text_prefix: Option<String>,
    /// Whether a line may be a chat or Responses request.
    pub conversations: bool,
    /// Whether a line is a valid embeddings request.
    pub embeddings: bool,
}

/// Reads the input's [`InputKinds`].
///
/// # Errors
/// When the input cannot be read.
pub fn input_kinds(cfg: &RunConfig) -> Result<InputKinds> {
    let file = File::open(&cfg.input)
        .with_context(|| format!("cannot read input {}", cfg.input.display()))?;
    let mut common = CommonText::new();
    let mut conversations = false;
    let mut embeddings = false;
    for (i, line) in BufReader::new(file).split(b'\n').enumerate() {
        let line = line.with_context(|| format!("cannot read input {}", cfg.input.display()))?;
        let text = String::from_utf8_lossy(&line);
        let text = text.trim();
        if text.is_empty() {
            continue;
        }
        if !(text.contains(COMPLETIONS_URL) || text.contains(EMBEDDINGS_URL)) {
            conversations = true;
            continue;
        }
        match parse_line(i as u64 + 1, text, cfg.fields).map(|r| r.prompt) {
            Ok(Prompt::Text(prompt)) => common.add(&prompt),
            Ok(Prompt::Chat(_)) => conversations = true,
            Ok(Prompt::Embed(_)) => embeddings = true,
            Err(_) => {}
        }
    }
    Ok(InputKinds {
        text_prefix: common.finish(),
        conversations,
        embeddings,
    })
}

/// First pass: how many requests, which prefixes, and the largest per-request need.
/// `on_new_prefix` sees each distinct shared prefix once.
pub fn scan(
    input: RequestReader<BufReader<File>>,
    prompts: &mut PromptBuilder<'_>,
    cfg: &RunConfig,
    n_ctx_train: usize,
    mut on_new_prefix: impl FnMut(PrefixKey, &[Token]),
) -> Result<Demand> {
    let mut demand = Demand::default();
    // 8 bytes per distinct prefix: enough to tell them apart, small for a million.
    let mut seen: HashSet<u64> = HashSet::new();
    for item in input {
        let item = item.with_context(|| format!("cannot read input {}", cfg.input.display()))?;
        demand.lines += 1;
        let Ok(request) = item else { continue };
        let max_tokens = cfg.defaults().max_tokens_for(&request);
        let Ok((prompt, _)) =
            prompts.build_request(&request.prompt, &request.reasoning, max_tokens)
        else {
            continue;
        };
        if !fits_trained_context(prompt.tokens.len(), max_tokens, n_ctx_train) {
            continue; // it gets its error in the second pass
        }
        demand.requests += 1;
        let shared = match prompt.prefix_key() {
            Some(key) if cfg.prefix_cache => {
                if seen.insert(key.hash64()) {
                    demand.add_prefix(prompt.shared_len, cfg.max_prefixes as usize);
                    on_new_prefix(key, prompt.prefix());
                }
                prompt.shared_len
            }
            _ => 0,
        };
        demand.max_need = demand
            .max_need
            .max(prompt.tokens.len() - shared + max_tokens as usize);
    }
    Ok(demand)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(head_dim: u32) -> ModelInfo {
        ModelInfo {
            head_dim_k: head_dim,
            head_dim_v: head_dim,
            ..crate::plan::memory::tests::smollm()
        }
    }

    fn device(name: &str, description: &str) -> Device {
        Device {
            name: name.into(),
            description: description.into(),
            gpu: true,
            pci_bus_id: None,
            free: 0,
            total: 0,
        }
    }

    fn types(k: KvType, v: KvType) -> KvTypes {
        KvTypes { k, v }
    }

    #[test]
    fn kv_types_the_heads_or_the_device_cannot_run_are_refused_by_name() {
        let q8 = types(KvType::Q8_0, KvType::Q8_0);
        let fa = FlashAttn::On;
        assert!(check_kv_types(&info(64), q8, fa, &[]).is_ok());
        // Heads 80 wide are not a whole number of 32-element blocks.
        let e = check_kv_types(&info(80), types(KvType::F16, KvType::Q4_0), fa, &[]);
        let e = e.unwrap_err().to_string();
        assert!(
            e.contains("--cache-type-v q4_0") && e.contains("80 wide"),
            "{e}"
        );
        assert!(check_kv_types(&info(80), KvTypes::default(), fa, &[]).is_ok());

        let h100 = [device("CUDA0", "NVIDIA H100 80GB HBM3")];
        assert!(check_kv_types(&info(64), q8, fa, &h100).is_ok());
        let mixed = types(KvType::Q8_0, KvType::Q4_0);
        let e = check_kv_types(&info(64), mixed, fa, &h100)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("q8_0") && e.contains("q4_0") && e.contains("CUDA"),
            "{e}"
        );
        // Without flash attention, quantized keys take the matrix products, compiled for all.
        let keys = types(KvType::Q5_1, KvType::F16);
        assert!(check_kv_types(&info(64), keys, FlashAttn::Off, &h100).is_ok());

        let lavapipe = [device("Vulkan0", "llvmpipe (LLVM 15.0.6, 256 bits)")];
        let e = check_kv_types(&info(64), KvTypes::default(), fa, &lavapipe);
        assert!(e.unwrap_err().to_string().contains("--gpu-layers 0"));
        assert!(check_kv_types(&info(64), keys, FlashAttn::Off, &lavapipe).is_ok());
        let amd = [device("Vulkan0", "AMD Radeon RX 7900 XTX (RADV NAVI31)")];
        assert!(check_kv_types(&info(64), q8, fa, &amd).is_ok());
    }
}
