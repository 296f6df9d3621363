//! One request's sampling chain: penalties, its constraint, truncation and a seeded draw.

use llama_cpp_2::sampling::LlamaSampler;

use super::{EngineError, Model};

/// A compiled constraint on a request's answer, ready to copy into each of its samplers.
#[derive(Clone)]
pub enum Constraint {
    /// A JSON schema's llguidance matcher, compiled once; each sampler takes a deep copy.
    Json(std::sync::Arc<llguidance::Matcher>),
    /// A GBNF grammar (rooted at `root`) that llama.cpp accepted.
    Gbnf(std::sync::Arc<str>),
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Json(_) => f.write_str("Constraint::Json"),
            Self::Gbnf(g) => write!(f, "Constraint::Gbnf({} bytes)", g.len()),
        }
    }
}

/// Resolved sampling settings of one request.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplerSpec {
    /// 0 is greedy.
    pub temperature: f32,
    /// Nucleus mass (1 disables).
    pub top_p: f32,
    /// Top-k (0 disables).
    pub top_k: i32,
    /// Min-p (0 disables).
    pub min_p: f32,
    /// Seed of the random draw.
    pub seed: u32,
    /// OpenAI's frequency penalty (0 disables): subtracted once per earlier occurrence.
    pub frequency_penalty: f32,
    /// OpenAI's presence penalty (0 disables): subtracted once if the token occurred.
    pub presence_penalty: f32,
    /// Generated tokens the penalties look back over: the request's `max_tokens`, so all.
    pub penalty_window: u32,
}

impl SamplerSpec {
    /// The settings of choice `k` of a request (`n` > 1): its own seed, derived from the
    /// request's, so each choice draws differently and the same way every run. Choice 0 keeps
    /// the request's seed.
    pub fn for_choice(&self, k: u32) -> Self {
        let mut spec = self.clone();
        if k > 0 {
            spec.seed = crate::digest::choice_seed(self.seed, k);
        }
        spec
    }
}

/// One request's sampling chain; its random state belongs to that request alone.
pub struct Sampler {
    pub(super) inner: LlamaSampler,
}

impl Sampler {
    pub(super) fn new(
        spec: &SamplerSpec,
        model: &Model,
        constraint: Option<&Constraint>,
    ) -> Result<Self, EngineError> {
        let mut chain = Vec::new();
        // Penalties see only the tokens this sampler drew: the request's own completion.
        if spec.frequency_penalty != 0.0 || spec.presence_penalty != 0.0 {
            chain.push(LlamaSampler::penalties(
                model.model.n_vocab(),
                i32::try_from(spec.penalty_window).unwrap_or(i32::MAX),
                1.0,
                spec.frequency_penalty,
                spec.presence_penalty,
            ));
        }
        // The grammar masks what it does not allow; the draw below picks among the rest.
        match constraint {
            Some(Constraint::Json(matcher)) => chain.push(LlamaSampler::from(matcher.deep_clone())),
            Some(Constraint::Gbnf(grammar)) => chain.push(
                LlamaSampler::grammar(&model.model, grammar, "root")
                    .map_err(|e| EngineError::Sampler(e.to_string()))?,
            ),
            None => {}
        }
        if spec.temperature <= 0.0 {
            if chain.is_empty() {
                return Ok(Self {
                    inner: LlamaSampler::greedy(),
                });
            }
            chain.push(LlamaSampler::greedy());
            return Ok(Self {
                inner: LlamaSampler::chain_simple(chain),
            });
        }
        if spec.top_k > 0 {
            chain.push(LlamaSampler::top_k(spec.top_k));
        }
        if spec.top_p < 1.0 {
            chain.push(LlamaSampler::top_p(spec.top_p, 1));
        }
        if spec.min_p > 0.0 {
            chain.push(LlamaSampler::min_p(spec.min_p, 1));
        }
        chain.push(LlamaSampler::temp(spec.temperature));
        chain.push(LlamaSampler::dist(spec.seed));
        Ok(Self {
            inner: LlamaSampler::chain_simple(chain),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choices_get_their_own_stable_seeds() {
        let spec = SamplerSpec {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            seed: 7,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            penalty_window: 8,
        };
        assert_eq!(spec.for_choice(0), spec);
        assert_ne!(spec.for_choice(1).seed, spec.seed);
        assert_ne!(spec.for_choice(1).seed, spec.for_choice(2).seed);
        assert_eq!(spec.for_choice(3), spec.for_choice(3));
    }
}
