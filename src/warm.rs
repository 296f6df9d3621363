//! `infer-batch cache warm`: prefill and store the prefixes of an input without decoding any
//! request, so that shards and later runs restore them.

use std::fs::File;
use std::io::BufReader;

use anyhow::{Context, Result};

use crate::cli::RunConfig;
use crate::engine::{SessionSettings, Token};
use crate::metrics::{Metrics, PrefixEvent};
use crate::plan::CTX_STEP;
use crate::prefix_cache::materialize;
use crate::prefix_store::model_sha256;
use crate::preflight::{load_model, offloadable_layers, prefix_store, scan};
use crate::prompt::PromptBuilder;
use crate::request::RequestReader;

/// Prefills and stores every distinct prefix of the input without decoding any request.
///
/// # Errors
/// When the input or model cannot be read, or the store cannot be opened.
pub fn warm(cfg: &RunConfig) -> Result<Vec<PrefixEvent>> {
    let file = File::open(&cfg.input)
        .with_context(|| format!("cannot read input {}", cfg.input.display()))?;
    if !cfg.model.is_file() {
        anyhow::bail!("model {} not found", cfg.model.display());
    }
    let gpu_layers = offloadable_layers(cfg.gpu_layers);
    let (model, renderer) = load_model(cfg, gpu_layers)?;
    let mut prompts = PromptBuilder::new(&model, &renderer);
    let mut prefixes: Vec<Vec<Token>> = Vec::new();
    let reader = RequestReader::new(BufReader::new(file), cfg.fields);
    scan(
        reader,
        &mut prompts,
        cfg,
        model.info().n_ctx_train as usize,
        |_, tokens| {
            prefixes.push(tokens.to_vec());
        },
    )?;
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
    let store = prefix_store(cfg, &model, &settings, gpu_layers, model_hash)?;
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
