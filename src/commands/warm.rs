//! `infer-batch cache warm`: prefill and store the prefixes of an input without decoding any
//! request, so that shards and later runs restore them.

use anyhow::Result;

use crate::cache::prefix_cache::materialize;
use crate::commands::cli::RunConfig;
use crate::commands::prepare::{check_files, Prepared};
use crate::engine::{Engine, Token};
use crate::plan::CTX_STEP;
use crate::report::metrics::{Metrics, PrefixEvent};

/// Prefills and stores every distinct prefix of the input without decoding any request.
///
/// # Errors
/// When the input or model cannot be read, or the store cannot be opened.
pub fn warm(cfg: &RunConfig) -> Result<Vec<PrefixEvent>> {
    let model_hash = check_files(cfg)?;
    // Prepared as `run` prepares, so that the layers offloaded, which are part of a state's
    // identity, are the ones the run will offload, also when the plan fits them down.
    let mut prefixes: Vec<Vec<Token>> = Vec::new();
    let prepared = Prepared::load(cfg, model_hash, |_, tokens| prefixes.push(tokens.to_vec()))?;
    let longest = prefixes.iter().map(Vec::len).max().unwrap_or(0);
    let n_ctx = u32::try_from(longest.div_ceil(CTX_STEP).max(1) * CTX_STEP)?;
    let settings = prepared.settings(cfg, n_ctx, 1);
    // The states' identity names the run's decode groups too, so the probe runs as in `run`.
    let identity = prepared.identity(cfg, prepared.probe(cfg)?.0);
    let store = prepared.store(cfg, &identity)?;
    let model = prepared.model();
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
        session.clear_seq(0)?;
    }
    Ok(events)
}
