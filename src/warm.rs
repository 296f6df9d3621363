//! `infer-batch cache warm`: prefill and store the prefixes of an input without decoding any
//! request, so that shards and later runs restore them.

use std::fs::File;

use anyhow::{Context, Result};

use crate::cli::RunConfig;
use crate::engine::{SessionSettings, Token};
use crate::metrics::{Metrics, PrefixEvent};
use crate::plan::CTX_STEP;
use crate::prefix_cache::materialize;
use crate::prefix_store::model_sha256;
use crate::preflight::{load_model, load_offloaded, prefix_store, preflight, Preflight};
use crate::prompt::PromptBuilder;

/// Prefills and stores every distinct prefix of the input without decoding any request.
///
/// # Errors
/// When the input or model cannot be read, or the store cannot be opened.
pub fn warm(cfg: &RunConfig) -> Result<Vec<PrefixEvent>> {
    File::open(&cfg.input).with_context(|| format!("cannot read input {}", cfg.input.display()))?;
    if !cfg.model.is_file() {
        anyhow::bail!("model {} not found", cfg.model.display());
    }
    // Planned as `run` plans, so that the layers offloaded, which are part of a state's
    // identity, are the ones the run will offload, also when the plan fits them down.
    let (planning, renderer) = load_model(cfg, 0)?;
    let mut prompts = PromptBuilder::new(&planning, &renderer);
    let mut prefixes: Vec<Vec<Token>> = Vec::new();
    let Preflight { gpu_layers, .. } = preflight(cfg, &planning, &mut prompts, |_, tokens| {
        prefixes.push(tokens.to_vec());
    })?;
    let offloaded = load_offloaded(cfg, gpu_layers)?;
    let model = offloaded.as_ref().unwrap_or(&planning);
    let longest = prefixes.iter().map(Vec::len).max().unwrap_or(0);
    let settings = SessionSettings {
        n_ctx: u32::try_from(longest.div_ceil(CTX_STEP).max(1) * CTX_STEP)?,
        n_batch: cfg.batch_size,
        n_seq_max: 1,
        threads: cfg.threads,
        flash_attn: cfg.flash_attn,
        kv_unified: !cfg.deterministic,
    };
    let model_hash = model_sha256(&cfg.model, Some(&cfg.prefix_cache_dir))?;
    let store = prefix_store(cfg, model, &settings, gpu_layers, model_hash)?;
    let mut session = model.new_session(&settings)?;
    let mut metrics = Metrics::default();
    let mut events = Vec::new();
    for tokens in &prefixes {
        events.push(materialize(
            &mut session,
            0,
            tokens,
            Some(&store),
            &mut metrics,
        )?);
        session.clear_seq(0);
    }
    Ok(events)
}
