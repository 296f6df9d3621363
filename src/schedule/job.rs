//! A parsed request turned into a job the scheduler can run: its prompt tokens, its resolved
//! sampling settings, and a check that it fits the context.

use crate::digest::{request_seed, sha256_parts};
use crate::engine::Token;
use crate::engine::{Constraint, SamplerSpec};
use crate::formats::line_error::{ErrorCode, LineError};
use crate::formats::result::{ComputationKey, Endpoint};
use crate::input::request::{
    Request, CHAT_COMPLETIONS_URL, COMPLETIONS_URL, EMBEDDINGS_URL, RESPONSES_URL,
};
use crate::input::sampling::ConstraintSpec;
use crate::prompt::grammar::Grammars;
use crate::prompt::{PromptBuilder, RequestPromptError, SplitPrompt};

/// Resolved generation settings of one request.
#[derive(Debug, Clone)]
pub struct GenParams {
    /// Sampling chain and seed (of choice 0; the others derive theirs).
    pub sampler: SamplerSpec,
    /// Most tokens to sample, per choice.
    pub max_tokens: u32,
    /// Strings that end generation.
    pub stop: Vec<String>,
    /// Choices to sample from the one prompt.
    pub n: u32,
    /// `Some(k)`: return log probabilities, with the `k` most likely alternatives.
    pub logprobs: Option<u8>,
    /// What the answer must follow.
    pub constraint: Option<Constraint>,
    /// How a reasoning model thinks before it answers; `None`: it answers at once.
    pub think: Option<std::sync::Arc<crate::schedule::reasoning::ThinkPlan>>,
}

impl GenParams {
    /// The constraint the first sampler of a choice carries: none while it thinks (the
    /// thinking is free text), the request's when it answers at once.
    pub fn first_constraint(&self) -> Option<&Constraint> {
        if self.think.is_some() {
            None
        } else {
            self.constraint.as_ref()
        }
    }
}

/// A request ready to run.
#[derive(Debug, Clone)]
pub struct Job {
    /// Input line number.
    pub line: u64,
    /// The caller's id.
    pub custom_id: String,
    /// Tokens, split into shared prefix and own part.
    pub prompt: SplitPrompt,
    /// How to generate.
    pub params: GenParams,
    /// What identifies its computation, for result reuse.
    pub key: ComputationKey,
    /// The endpoint it came through, which shapes its result.
    pub endpoint: Endpoint,
}

/// The run's defaults for what a request leaves out.
#[derive(Debug, Clone, Copy)]
pub struct Defaults {
    /// `max_tokens` of a request that gives none.
    pub max_tokens: u32,
    /// `temperature` of a request that gives none.
    pub temperature: f32,
    /// The base seed a request without its own derives its seed from.
    pub seed: u64,
    /// Whether shared prefixes are computed once (else every request computes its whole
    /// prompt, and needs the cells for it).
    pub prefix_cache: bool,
}

impl Defaults {
    /// The `max_tokens` a request runs with: its own, else the run's.
    pub fn max_tokens_for(&self, request: &Request) -> u32 {
        request.sampling.max_tokens.unwrap_or(self.max_tokens)
    }
}

/// Whether a prompt of `len` tokens and `max_tokens` more fit the model's trained context.
/// The planner and [`prepare`] both ask this, so that a request the plan left out is the one
/// that gets the error line.
pub fn fits_trained_context(len: usize, max_tokens: u32, n_ctx_train: usize) -> bool {
    len + max_tokens as usize <= n_ctx_train
}

/// Bounds a request must fit.
pub struct Limits {
    /// The model's trained context.
    pub n_ctx_train: usize,
    /// Most cells one request may use beyond its shared prefix, per choice.
    pub slot_budget: usize,
    /// Whether `--ctx-size` set the context.
    pub ctx_overridden: bool,
}

impl Limits {
    /// Whether `prompt` with `max_tokens` fits the model's trained context and a slot (beyond
    /// the shared prefix, when `share`d).
    ///
    /// # Errors
    /// Why it does not fit, with what to change.
    pub fn check_fit(
        &self,
        prompt: &SplitPrompt,
        max_tokens: u32,
        share: bool,
    ) -> Result<(), String> {
        let len = prompt.tokens.len();
        if !fits_trained_context(len, max_tokens, self.n_ctx_train) {
            return Err(format!(
                "prompt of {len} tokens plus max_tokens {max_tokens} exceeds the model's context \
                 of {} tokens; shorten the messages or lower max_tokens",
                self.n_ctx_train
            ));
        }
        let shared = if share { prompt.shared_len } else { 0 };
        let need = len - shared + max_tokens as usize;
        if need > self.slot_budget {
            let fix = if self.ctx_overridden {
                "raise --ctx-size or lower --parallel"
            } else {
                "lower max_tokens"
            };
            return Err(format!(
                "request needs {need} KV cells ({} own prompt tokens + max_tokens {max_tokens}) \
                 but each slot has {}; {fix}",
                len - shared,
                self.slot_budget
            ));
        }
        Ok(())
    }
}

/// Turns a parsed request into a job: prompt tokens, resolved sampling, its constraint
/// compiled, and a fit check.
///
/// # Errors
/// The request's error line: a template that cannot render it, a constraint that does not
/// compile, a prompt that does not fit.
pub fn prepare(
    request: Request,
    prompts: &mut PromptBuilder<'_>,
    grammars: &mut Grammars<'_>,
    cfg: &Defaults,
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
    let max_tokens = cfg.max_tokens_for(&request);
    let (prompt, think) =
        match prompts.build_request(&request.prompt, &request.reasoning, max_tokens) {
            Ok(p) => p,
            Err(RequestPromptError::Template(e)) => {
                return fail(
                    ErrorCode::InvalidMessages,
                    format!("the chat template cannot render these messages: {e}"),
                )
            }
            Err(RequestPromptError::Reasoning(e)) => return fail(ErrorCode::InvalidParameter, e.0),
        };
    let s = &request.sampling;
    let constraint = match &s.constraint {
        None => None,
        Some(spec) => match grammars.compile(spec) {
            Ok(c) => Some(c),
            Err(e) => return fail(ErrorCode::InvalidParameter, e.to_string()),
        },
    };
    if let Err(message) = limits.check_fit(&prompt, max_tokens, cfg.prefix_cache) {
        return fail(ErrorCode::ContextLengthExceeded, message);
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
    let params = GenParams {
        sampler,
        max_tokens,
        stop: request.sampling.stop,
        n: request.sampling.n,
        logprobs: request.sampling.logprobs,
        constraint,
        think,
    };
    let mut endpoint = request.endpoint;
    // A `response` repeats the settings it ran with, defaults resolved; they are part of what
    // the line says, so of its key too.
    if let Endpoint::Responses(e) = &mut endpoint {
        e.temperature = params.sampler.temperature;
        e.top_p = params.sampler.top_p;
    }
    let echo = match &endpoint {
        Endpoint::Responses(e) => serde_json::to_string(e).unwrap_or_default(),
        _ => String::new(),
    };
    let key = computation_key(
        &match &endpoint {
            Endpoint::Chat => vec![CHAT_COMPLETIONS_URL],
            Endpoint::Completions => vec![COMPLETIONS_URL],
            // Embeddings never become jobs; their key is `embedding_key`.
            Endpoint::Embeddings { .. } => vec![EMBEDDINGS_URL],
            Endpoint::Responses(_) => vec![RESPONSES_URL, &echo],
        },
        &prompt,
        &params,
        request.sampling.constraint.as_ref(),
    );
    Ok(Job {
        line: request.line,
        custom_id: request.custom_id,
        prompt,
        params,
        key,
        endpoint,
    })
}

/// The parts a computation key hashes, each framed by its length ([`sha256_parts`]), so no
/// two different lists of parts give the same bytes.
struct KeyParts(Vec<Vec<u8>>);

impl KeyParts {
    fn new() -> Self {
        Self(vec![b"infer-batch computation 1".to_vec()])
    }

    fn push(&mut self, bytes: impl AsRef<[u8]>) -> &mut Self {
        self.0.push(bytes.as_ref().to_vec());
        self
    }

    fn tokens(&mut self, tokens: &[Token]) -> &mut Self {
        self.0
            .push(tokens.iter().flat_map(|t| t.0.to_le_bytes()).collect());
        self
    }

    fn key(&self) -> ComputationKey {
        ComputationKey(sha256_parts(self.0.iter().map(Vec::as_slice)))
    }
}

/// The key of an embeddings request: its inputs' tokens and how their vectors are pooled,
/// scaled and encoded (given the same model and engine settings).
pub fn embedding_key(
    inputs: &[Vec<Token>],
    pooling: &str,
    normalize: bool,
    base64: bool,
) -> ComputationKey {
    let mut parts = KeyParts::new();
    parts
        .push(EMBEDDINGS_URL)
        .push(pooling)
        .push([u8::from(normalize), u8::from(base64)]);
    for tokens in inputs {
        parts.tokens(tokens);
    }
    parts.key()
}

/// The key of a computation: a hash of everything that decides a request's result line but its
/// ids, given the same model and engine settings (the manifest's part). `endpoint` names the
/// endpoint and what its body repeats of the request. The seed and the truncation settings
/// count only when sampling draws at random: greedy decoding ignores them, so two greedy
/// requests that differ only in `custom_id` (whose hash seeds them) share a key.
pub fn computation_key(
    endpoint: &[&str],
    prompt: &SplitPrompt,
    params: &GenParams,
    constraint: Option<&ConstraintSpec>,
) -> ComputationKey {
    let mut parts = KeyParts::new();
    for e in endpoint {
        parts.push(e);
    }
    // The shared part is what `cached_tokens` reports.
    parts
        .tokens(&prompt.tokens)
        .push((prompt.shared_len as u64).to_le_bytes());
    let s = &params.sampler;
    parts.push(s.temperature.to_le_bytes());
    if s.temperature > 0.0 {
        parts
            .push(s.top_p.to_le_bytes())
            .push(s.top_k.to_le_bytes())
            .push(s.min_p.to_le_bytes())
            .push(s.seed.to_le_bytes());
    }
    parts
        .push(s.frequency_penalty.to_le_bytes())
        .push(s.presence_penalty.to_le_bytes())
        .push(s.penalty_window.to_le_bytes())
        .push(params.max_tokens.to_le_bytes())
        .push(params.n.to_le_bytes())
        .push(params.logprobs.map_or(-1, i16::from).to_le_bytes())
        .push((params.stop.len() as u64).to_le_bytes());
    for stop in &params.stop {
        parts.push(stop);
    }
    // A request that answers at once keeps the key it had before reasoning existed.
    if let Some(t) = &params.think {
        parts
            .push("thinks")
            .push(&t.open)
            .push(&t.close)
            .tokens(&t.open_tokens)
            .tokens(&t.close_tokens)
            .push([u8::from(t.opened_by_prompt)])
            .push(t.budget.to_le_bytes());
    }
    match constraint {
        None => parts.push("none"),
        Some(ConstraintSpec::JsonSchema { schema, .. }) => {
            parts.push("json-schema").push(schema.to_string())
        }
        Some(ConstraintSpec::Gbnf(g)) => parts.push("gbnf").push(g),
    };
    parts.key()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Token;

    fn prompt(len: usize, shared_len: usize) -> SplitPrompt {
        SplitPrompt {
            tokens: vec![Token(1); len],
            shared_len,
        }
    }

    const LIMITS: Limits = Limits {
        n_ctx_train: 100,
        slot_budget: 30,
        ctx_overridden: false,
    };

    fn params(temperature: f32, seed: u32) -> GenParams {
        GenParams {
            sampler: SamplerSpec {
                temperature,
                top_p: 1.0,
                top_k: 0,
                min_p: 0.0,
                seed,
                frequency_penalty: 0.0,
                presence_penalty: 0.0,
                penalty_window: 8,
            },
            max_tokens: 8,
            stop: Vec::new(),
            n: 1,
            logprobs: None,
            constraint: None,
            think: None,
        }
    }

    #[test]
    fn the_computation_key_covers_what_changes_a_result_and_nothing_else() {
        let key = |p: &SplitPrompt, g: &GenParams, c: Option<&ConstraintSpec>| {
            computation_key(&[CHAT_COMPLETIONS_URL], p, g, c)
        };
        let base = key(&prompt(10, 4), &params(0.0, 1), None);
        // Greedy decoding ignores the seed, so requests that differ only in it (or in the
        // custom_id it derives from) are one computation.
        assert_eq!(base, key(&prompt(10, 4), &params(0.0, 99), None));
        // Sampling draws with it, so there it counts.
        let sampled = key(&prompt(10, 4), &params(0.7, 1), None);
        assert_ne!(sampled, base);
        assert_ne!(sampled, key(&prompt(10, 4), &params(0.7, 2), None));
        let mut changed = vec![
            key(&prompt(11, 4), &params(0.0, 1), None),
            key(&prompt(10, 5), &params(0.0, 1), None),
            computation_key(
                &[RESPONSES_URL, "{}"],
                &prompt(10, 4),
                &params(0.0, 1),
                None,
            ),
            computation_key(
                &[RESPONSES_URL, "{\"a\":1}"],
                &prompt(10, 4),
                &params(0.0, 1),
                None,
            ),
        ];
        let mut edit = |f: &dyn Fn(&mut GenParams)| {
            let mut g = params(0.0, 1);
            f(&mut g);
            changed.push(key(&prompt(10, 4), &g, None));
        };
        edit(&|g| g.max_tokens = 9);
        edit(&|g| g.n = 2);
        edit(&|g| g.logprobs = Some(0));
        edit(&|g| g.stop = vec!["x".into()]);
        edit(&|g| g.sampler.presence_penalty = 0.5);
        let schema = ConstraintSpec::JsonSchema {
            schema: serde_json::json!({"type": "object"}),
            field: "response_format",
        };
        changed.push(key(&prompt(10, 4), &params(0.0, 1), Some(&schema)));
        changed.push(key(
            &prompt(10, 4),
            &params(0.0, 1),
            Some(&ConstraintSpec::Gbnf("root ::= \"a\"".into())),
        ));
        let e = |t: &[i32], pooling, normalize, base64| {
            let tokens: Vec<Token> = t.iter().map(|&t| Token(t)).collect();
            embedding_key(&[tokens], pooling, normalize, base64)
        };
        let embed = e(&[1, 2], "mean", true, false);
        assert_eq!(embed, e(&[1, 2], "mean", true, false));
        changed.extend([
            embed,
            e(&[1, 3], "mean", true, false),
            e(&[1, 2], "last", true, false),
            e(&[1, 2], "mean", false, false),
            e(&[1, 2], "mean", true, true),
            embedding_key(&[vec![Token(1)], vec![Token(2)]], "mean", true, false),
        ]);
        let distinct: std::collections::HashSet<_> = changed.iter().copied().collect();
        assert_eq!(
            distinct.len(),
            changed.len(),
            "every change gives its own key"
        );
        assert!(!distinct.contains(&base));
    }

    #[test]
    fn a_request_fits_the_trained_context_and_its_slot_beyond_the_shared_prefix() {
        // 60 prompt tokens, 50 shared: 10 own + 20 generated fill the slot exactly.
        assert_eq!(LIMITS.check_fit(&prompt(60, 50), 20, true), Ok(()));
        // Without sharing the whole prompt needs cells.
        let e = LIMITS.check_fit(&prompt(60, 50), 20, false).unwrap_err();
        assert!(
            e.contains("needs 80 KV cells") && e.contains("lower max_tokens"),
            "{e}"
        );
        // The trained context bounds prompt and answer together, shared or not.
        let e = LIMITS.check_fit(&prompt(90, 89), 11, true).unwrap_err();
        assert!(e.contains("exceeds the model's context of 100"), "{e}");
        assert_eq!(LIMITS.check_fit(&prompt(90, 89), 10, true), Ok(()));
        let fixed = Limits {
            ctx_overridden: true,
            ..LIMITS
        };
        let e = fixed.check_fit(&prompt(40, 0), 1, true).unwrap_err();
        assert!(e.contains("raise --ctx-size"), "{e}");
    }
}
