//! A parsed request turned into a job the scheduler can run: its prompt tokens, its resolved
//! sampling settings, and a check that it fits the context.

use sha2::{Digest, Sha256};

use crate::cli::RunConfig;
use crate::engine::SamplerSpec;
use crate::grammar::Grammars;
use crate::prompt::PromptBuilder;
use crate::request::{ErrorCode, LineError, Request};
use crate::scheduler::{GenParams, Job};

/// Bounds a request must fit.
pub struct Limits {
    /// The model's trained context.
    pub n_ctx_train: usize,
    /// Most cells one request may use beyond its shared prefix, per choice.
    pub slot_budget: usize,
    /// Whether `--ctx-size` set the context.
    pub ctx_overridden: bool,
    /// Slots of the run: a request's choices decode side by side, one slot each.
    pub slots: usize,
}

/// Turns a parsed request into a job: prompt tokens, resolved sampling, its constraint
/// compiled, and a fit check.
///
/// # Errors
/// The request's error line: a template that cannot render it, a constraint that does not
/// compile, a prompt or `n` that does not fit.
pub fn prepare(
    request: Request,
    prompts: &mut PromptBuilder<'_>,
    grammars: &mut Grammars<'_>,
    cfg: &RunConfig,
    limits: &Limits,
) -> Result<Job, LineError> {
    let fail = |code, message: String| {
        Err(LineError::new(
            request.line,
            Some(&request.custom_id),
            code,
            message,
        ))
    };
    let prompt = match prompts.build(&request.messages) {
        Ok(p) => p,
        Err(e) => {
            return fail(
                ErrorCode::InvalidMessages,
                format!("the chat template cannot render these messages: {e}"),
            )
        }
    };
    let s = &request.sampling;
    if s.n as usize > limits.slots {
        return fail(
            ErrorCode::InvalidParameter,
            format!(
                "field `n` is {} but the run has {} slots: a request's choices decode side by \
                 side, one slot each; raise --parallel to at least {} or lower n",
                s.n, limits.slots, s.n
            ),
        );
    }
    let constraint = match &s.constraint {
        None => None,
        Some(spec) => match grammars.compile(spec) {
            Ok(c) => Some(c),
            Err(e) => return fail(ErrorCode::InvalidParameter, e),
        },
    };
    let max_tokens = s.max_tokens.unwrap_or(cfg.max_tokens);
    let len = prompt.tokens.len();
    if len + max_tokens as usize > limits.n_ctx_train {
        return fail(
            ErrorCode::ContextLengthExceeded,
            format!(
                "prompt of {len} tokens plus max_tokens {max_tokens} exceeds the model's context \
                 of {} tokens; shorten the messages or lower max_tokens",
                limits.n_ctx_train
            ),
        );
    }
    let shared = if cfg.prefix_cache && prompt.shared_len > 0 {
        prompt.shared_len
    } else {
        0
    };
    let need = len - shared + max_tokens as usize;
    if need > limits.slot_budget {
        let fix = if limits.ctx_overridden {
            "raise --ctx-size or lower --parallel"
        } else {
            "lower max_tokens"
        };
        return fail(
            ErrorCode::ContextLengthExceeded,
            format!(
                "request needs {need} KV cells ({} own prompt tokens + max_tokens {max_tokens}) \
                 but each slot has {}; {fix}",
                len - shared,
                limits.slot_budget
            ),
        );
    }
    let sampler = SamplerSpec {
        temperature: s.temperature.unwrap_or(cfg.temperature),
        top_p: s.top_p.unwrap_or(1.0),
        top_k: s.top_k.unwrap_or(0),
        min_p: s.min_p.unwrap_or(0.0),
        seed: request_seed(s.seed, cfg.seed, &request.custom_id),
        frequency_penalty: s.frequency_penalty.unwrap_or(0.0),
        presence_penalty: s.presence_penalty.unwrap_or(0.0),
        penalty_window: max_tokens,
    };
    Ok(Job {
        line: request.line,
        custom_id: request.custom_id,
        prompt,
        params: GenParams {
            sampler,
            max_tokens,
            stop: request.sampling.stop,
            n: request.sampling.n,
            logprobs: request.sampling.logprobs,
            constraint,
        },
    })
}

/// The request's own seed, or one derived from the run's seed and its id, so a request samples
/// the same tokens whatever its position, slot or batch-mates.
pub fn request_seed(own: Option<u64>, base: u64, custom_id: &str) -> u32 {
    match own {
        Some(s) => (s ^ (s >> 32)) as u32,
        None => {
            let d = Sha256::new()
                .chain_update(base.to_le_bytes())
                .chain_update(custom_id.as_bytes())
                .finalize();
            u32::from_le_bytes([d[0], d[1], d[2], d[3]])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_comes_from_the_request_or_its_id() {
        assert_eq!(request_seed(Some(7), 1, "a"), 7);
        assert_eq!(request_seed(None, 1, "a"), request_seed(None, 1, "a"));
        assert_ne!(request_seed(None, 1, "a"), request_seed(None, 1, "b"));
        assert_ne!(request_seed(None, 1, "a"), request_seed(None, 2, "a"));
    }
}
