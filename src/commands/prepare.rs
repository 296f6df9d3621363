//! The one prepare step of `run` and `cache warm` (and so of `bench`, which runs both): check
//! the files, load the model, plan the context, and derive from that one plan the session
//! settings and the prefix states' identity. Both commands build them here, so a state `cache
//! warm` writes is one the run restores.

use std::fs::File;
use std::io::BufReader;
use std::path::PathBuf;

use anyhow::{Context, Result};

use crate::cache::prefix_store::{model_sha256, PrefixStore};
use crate::cache::probe_cache::ProbeCache;
use crate::commands::cli::RunConfig;
use crate::commands::preflight::{
    input_kinds, load_model, load_offloaded, prefix_store, preflight, Preflight,
};
use crate::digest::sha256_file_hex;
use crate::engine;
use crate::engine::{FlashAttn, Model, SessionSettings, Token};
use crate::formats::manifest::{InputRecord, Manifest, ModelRecord, RunState, MANIFEST_VERSION};
use crate::identity::{Identity, Machine, OutputParams, Settings};
use crate::input::request::RequestReader;
use crate::plan::KvLayout;
use crate::prompt::thinking::{ReasoningFormat, ThinkSetup, DEFAULT_BUDGETS};
use crate::prompt::{PrefixKey, PromptBuilder, Renderer};
use crate::schedule::groups::DecodeGroups;
use crate::schedule::scheduler::Exact;

/// The test hook that forces fixed-shape decode groups where the probe finds them unneeded.
pub const FIXED_SHAPE_ENV: &str = "INFER_BATCH_TEST_FIXED_SHAPE";

/// The input, read request by request (the run's shard only).
pub type Input = RequestReader<BufReader<File>>;

/// Opens the input of `cfg`.
///
/// # Errors
/// When the file cannot be read.
pub fn open_input(cfg: &RunConfig) -> Result<Input> {
    let file = File::open(&cfg.input)
        .with_context(|| format!("cannot read input {}", cfg.input.display()))?;
    Ok(RequestReader::new(BufReader::new(file), cfg.fields).shard(cfg.shard))
}

/// Checks that the input can be read and the model exists, and returns the model's SHA-256
/// (memoised beside the prefix states, so a large model is not hashed at every start).
///
/// # Errors
/// When the input cannot be read or the model is missing.
pub fn check_files(cfg: &RunConfig) -> Result<[u8; 32]> {
    open_input(cfg)?;
    if !cfg.model.is_file() {
        anyhow::bail!(
            "model {} not found: run ./models/fetch.sh to fetch the default model, or pass \
             --model with the path of a GGUF file",
            cfg.model.display()
        );
    }
    Ok(model_sha256(&cfg.model, Some(&cfg.prefix_cache_dir))?)
}

/// The computation identity of a run of `cfg` on `machine`.
pub fn identity(cfg: &RunConfig, model_sha256: [u8; 32], machine: Machine) -> Identity {
    Identity {
        model: hex::encode(model_sha256),
        machine,
        settings: Settings {
            batch_size: cfg.batch_size,
            ctx_size: cfg.ctx_size,
            cache_type_k: cfg.kv_types.k.name().to_owned(),
            cache_type_v: cfg.kv_types.v.name().to_owned(),
            deterministic: cfg.deterministic,
            no_prefix_cache: !cfg.prefix_cache,
        },
        output: OutputParams {
            max_tokens: cfg.max_tokens,
            temperature: cfg.temperature,
            seed: cfg.seed,
            chat_template: cfg.chat_template.identity(),
            ignore_unknown_fields: cfg.fields.ignore_unknown,
            pooling: cfg.pooling.map(|p| p.name().to_owned()),
            no_normalize_embeddings: !cfg.normalize_embeddings,
            reasoning_format: (cfg.reasoning_format != ReasoningFormat::Auto)
                .then(|| cfg.reasoning_format.name().to_owned()),
            reasoning_budget: (cfg.reasoning_budgets != DEFAULT_BUDGETS).then(|| {
                let [l, m, h] = cfg.reasoning_budgets;
                format!("{l},{m},{h}")
            }),
            chat_template_kwargs: (!cfg.template_kwargs.is_empty())
                .then(|| serde_json::Value::Object(cfg.template_kwargs.clone()).to_string()),
        },
    }
}

/// The machine a run computes on, once the engine has started: `gpu_layers` as the plan fitted
/// them, and the decode-group probe's decision (`None` without deterministic mode).
pub fn machine(cfg: &RunConfig, gpu_layers: u32, exact: Option<Exact>) -> Machine {
    let hardware = engine::machine::hardware();
    Machine {
        build: build_name(),
        llama_cpp: engine::machine::llama_cpp(),
        backend: engine::machine::backends(),
        cpu_variant: hardware.cpu_variant,
        devices: hardware.devices,
        gpu_layers,
        flash_attn: format!("{:?}", cfg.flash_attn).to_lowercase(),
        decode_groups: Exact::describe(exact),
    }
}

/// `exact`, or one row a call where layers are on a GPU (`gpu`) with flash attention.
///
/// There llama.cpp's kernels split a row's keys by the call's KV length, its deepest stream's
/// (docs/gpu.md), at depths the probe checks only one step of: a row decoded alone has its
/// own stream's split, so its bits are its own. Not measured on a GPU yet; this is the safe
/// side until it is.
pub fn alone_with_gpu_flash_attention(exact: Exact, gpu: bool, flash_attn: FlashAttn) -> Exact {
    if !gpu || flash_attn == FlashAttn::Off || exact.groups == DecodeGroups::Alone {
        return exact;
    }
    tracing::info!(
        "decode groups: one row a call, whatever the probe found: flash attention on a GPU \
         splits a row's keys by the deepest row of its call"
    );
    Exact {
        groups: DecodeGroups::Alone,
        ..exact
    }
}

/// `infer-batch 0.1.0 (0123456789ab)`: our version and git commit.
pub fn build_name() -> String {
    format!(
        "infer-batch {} ({})",
        env!("CARGO_PKG_VERSION"),
        env!("INFER_BATCH_GIT_COMMIT")
    )
}

/// The manifest a run of `cfg` writes beside its output, before any run is recorded. Its
/// machine is filled in once the engine has started ([`Manifest::set_machine`]).
///
/// # Errors
/// When the input cannot be hashed.
pub fn new_manifest(cfg: &RunConfig, model_sha256: [u8; 32]) -> Result<Manifest> {
    Ok(Manifest {
        version: MANIFEST_VERSION,
        input: InputRecord {
            path: cfg.input.clone(),
            sha256: sha256_file_hex(&cfg.input)?,
            total: 0,
        },
        model: ModelRecord {
            path: cfg.model.clone(),
        },
        // The machine is known only once the engine has started; until then the run compares
        // everything else, and none of these placeholder fields.
        identity: identity(cfg, model_sha256, Machine::default()).to_map(),
        resume_anywhere: cfg.resume_anywhere,
        other_machines: Vec::new(),
        runs: Vec::new(),
        state: RunState::Running,
        shard: cfg.shard,
        finished_unix: None,
        merged_shards: None,
    })
}

/// Where the decode-group probe's findings for a run of `cfg` with `gpu_layers` offloaded are
/// remembered. The key is what the kernels depend on: everything a prefix state's identity
/// holds but the decision itself, and the thread count.
pub fn probe_cache(cfg: &RunConfig, model_sha256: [u8; 32], gpu_layers: u32) -> ProbeCache {
    let machine = machine(cfg, gpu_layers, None);
    let key = format!(
        "probe 1; threads {}; {}",
        cfg.threads,
        identity(cfg, model_sha256, machine).state_key()
    );
    ProbeCache::new(&crate::cache::prefix_store::default_dir(), key)
}

/// A model loaded and a plan fitted to the memory.
pub struct Prepared {
    /// The model on the CPU, loaded to plan (and to render prompts with).
    pub planning: Model,
    /// The model with the plan's layers offloaded, when there are any.
    offloaded: Option<Model>,
    /// How conversations become prompt text.
    pub renderer: Renderer,
    /// The plan.
    pub preflight: Preflight,
    /// The model file's SHA-256.
    pub model_sha256: [u8; 32],
    /// The text `/v1/completions` prompts share.
    pub text_prefix: Option<String>,
    /// Which conversations think, and how.
    pub think: ThinkSetup,
}

impl Prepared {
    /// Loads the model, scans the input and plans; `on_new_prefix` sees each distinct shared
    /// prefix once. Planned on the CPU: the layers to offload are known only once the plan
    /// fits the GPU, and then the model is loaded again with them.
    ///
    /// # Errors
    /// When the model cannot be loaded, no template renders its prompts, or even one slot
    /// does not fit the memory.
    pub fn load(
        cfg: &RunConfig,
        model_sha256: [u8; 32],
        on_new_prefix: impl FnMut(PrefixKey, &[Token]),
    ) -> Result<Self> {
        let kinds = input_kinds(cfg)?;
        let (planning, renderer) = load_model(cfg, 0, kinds.conversations)?;
        renderer.check_kwargs(&cfg.template_kwargs)?;
        let text_prefix = kinds.text_prefix;
        let think = cfg.think_setup(&planning);
        let mut prompts =
            PromptBuilder::new(&planning, &renderer, text_prefix.as_deref(), think.clone());
        let preflight = preflight(
            cfg,
            &planning,
            &mut prompts,
            kinds.embeddings,
            |gpu_layers| probe_cache(cfg, model_sha256, gpu_layers).load().is_some(),
            on_new_prefix,
        )?;
        let offloaded = load_offloaded(cfg, preflight.gpu_layers)?;
        Ok(Self {
            planning,
            offloaded,
            renderer,
            preflight,
            model_sha256,
            text_prefix,
            think,
        })
    }

    /// A builder of the run's prompts.
    pub fn prompts(&self) -> PromptBuilder<'_> {
        PromptBuilder::new(
            &self.planning,
            &self.renderer,
            self.text_prefix.as_deref(),
            self.think.clone(),
        )
    }

    /// The model sessions run on.
    pub fn model(&self) -> &Model {
        self.offloaded.as_ref().unwrap_or(&self.planning)
    }

    /// The settings of a session of `n_ctx` cells for `n_seq_max` sequences, laid out as the
    /// plan says.
    pub fn settings(&self, cfg: &RunConfig, n_ctx: u32, n_seq_max: u32) -> SessionSettings {
        SessionSettings {
            n_ctx,
            n_batch: cfg.batch_size,
            n_seq_max,
            threads: cfg.threads,
            flash_attn: cfg.flash_attn,
            kv_types: cfg.kv_types,
            kv_unified: self.preflight.plan.layout == KvLayout::Unified,
        }
    }

    /// The settings of the run's own session: the plan's context and sequences.
    pub fn run_settings(&self, cfg: &RunConfig) -> SessionSettings {
        let plan = &self.preflight.plan;
        self.settings(cfg, plan.n_ctx, plan.n_seq_max)
    }

    /// The prefix state store, its files keyed and checked by the computation `identity`.
    ///
    /// # Errors
    /// When the model's states are of an untested layout or the directory cannot be created.
    pub fn store(&self, cfg: &RunConfig, identity: &Identity) -> Result<PrefixStore> {
        prefix_store(cfg, self.model(), identity)
    }

    /// The decode-group probe's decision in deterministic mode (`None` without it), found in
    /// a session of its own with the run's settings, or remembered from an earlier probe on
    /// this machine with the same model, build and settings ([`ProbeCache`]). Also returns where
    /// it was remembered from.
    ///
    /// # Errors
    /// When the session cannot be made or a probe decode fails.
    pub fn probe(&self, cfg: &RunConfig) -> Result<(Option<Exact>, Option<PathBuf>)> {
        if self.preflight.plan.layout == KvLayout::Unified {
            return Ok((None, None));
        }
        let gpu = self.preflight.gpu_layers > 0;
        let force_fixed = std::env::var_os(FIXED_SHAPE_ENV).is_some();
        let cache = probe_cache(cfg, self.model_sha256, self.preflight.gpu_layers);
        if let Some(findings) = cache.load() {
            let exact = Exact::from_findings(findings, gpu, force_fixed);
            let exact = alone_with_gpu_flash_attention(exact, gpu, cfg.flash_attn);
            return Ok((Some(exact), Some(cache.path().to_owned())));
        }
        let exact = Exact::probe_with(self.model(), &self.run_settings(cfg), gpu, force_fixed)?;
        if let Some(findings) = exact.findings {
            cache.save(findings);
        }
        let exact = alone_with_gpu_flash_attention(exact, gpu, cfg.flash_attn);
        Ok((Some(exact), None))
    }

    /// The run's computation identity, once the probe has decided its decode groups.
    pub fn identity(&self, cfg: &RunConfig, exact: Option<Exact>) -> Identity {
        identity(
            cfg,
            self.model_sha256,
            machine(cfg, self.preflight.gpu_layers, exact),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flash_attention_on_a_gpu_decodes_one_row_a_call() {
        let fixed = Exact {
            groups: DecodeGroups::Fixed { lo: 2, hi: 64 },
            max_rows: 64,
            findings: None,
            probe_time: None,
        };
        let alone = |gpu, fa| alone_with_gpu_flash_attention(fixed, gpu, fa).groups;
        assert_eq!(alone(true, FlashAttn::On), DecodeGroups::Alone);
        assert_eq!(alone(true, FlashAttn::Auto), DecodeGroups::Alone);
        // The probe's decision stands without flash attention, and on the CPU, whose kernel
        // the probe and a test check.
        assert_eq!(alone(true, FlashAttn::Off), fixed.groups);
        assert_eq!(alone(false, FlashAttn::On), fixed.groups);
    }
}
