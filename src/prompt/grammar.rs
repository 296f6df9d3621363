//! Constrained decoding: what a request's answer must follow.
//!
//! JSON schemas (`response_format`, llama.cpp's `json_schema`) are compiled by llguidance once
//! per distinct schema; each request gets a copy of the compiled matcher. GBNF grammars
//! (llama.cpp's `grammar`) are checked once and applied by llama.cpp's grammar sampler. A schema
//! or grammar that does not compile is the request's error, with the reason, and the batch goes
//! on.

use std::collections::HashMap;
use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::{Matcher, ParserFactory};

use crate::digest::sha256_parts;
use crate::engine::{Constraint, Model};
use crate::input::sampling::ConstraintSpec;

/// Distinct constraints kept compiled; past this the cache starts over.
const CACHE_CAPACITY: usize = 1024;

/// Compiles constraints for one model, each distinct one once.
pub struct Grammars<'m> {
    model: &'m Model,
    /// Built on the first JSON schema: it walks the whole vocabulary.
    factory: Option<ParserFactory>,
    compiled: HashMap<[u8; 32], Result<Constraint, ConstraintError>>,
}

/// Why a request's constraint does not compile, naming the field it came from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConstraintError(String);

impl<'m> Grammars<'m> {
    /// An empty cache for `model`.
    pub fn new(model: &'m Model) -> Self {
        Self {
            model,
            factory: None,
            compiled: HashMap::new(),
        }
    }

    /// The compiled form of `spec`, from the cache when the same schema or grammar came before.
    ///
    /// # Errors
    /// Why it does not compile, naming the field it came from.
    pub fn compile(&mut self, spec: &ConstraintSpec) -> Result<Constraint, ConstraintError> {
        let key = match spec {
            ConstraintSpec::JsonSchema { schema, .. } => {
                sha256_parts([b"json".as_slice(), schema.to_string().as_bytes()])
            }
            ConstraintSpec::Gbnf(g) => sha256_parts([b"gbnf".as_slice(), g.as_bytes()]),
        };
        if let Some(done) = self.compiled.get(&key) {
            return done.clone();
        }
        let result = match spec {
            ConstraintSpec::JsonSchema { schema, field } => {
                self.compile_json(schema).map_err(|e| {
                    ConstraintError(format!(
                        "field `{field}` is not a JSON schema this version can enforce: {e}"
                    ))
                })
            }
            ConstraintSpec::Gbnf(g) => self
                .model
                .check_gbnf(g)
                .map(|()| Constraint::Gbnf(Arc::from(g.as_str())))
                .map_err(|e| {
                    ConstraintError(format!(
                        "field `grammar` is not a GBNF grammar llama.cpp accepts: {e}"
                    ))
                }),
        };
        if self.compiled.len() >= CACHE_CAPACITY {
            self.compiled.clear();
        }
        self.compiled.insert(key, result.clone());
        result
    }

    fn compile_json(&mut self, schema: &serde_json::Value) -> Result<Constraint, String> {
        if self.factory.is_none() {
            let env = self.model.token_env();
            self.factory = Some(ParserFactory::new_simple(&env).map_err(|e| e.to_string())?);
        }
        let factory = self.factory.as_ref().expect("built above");
        let parser = factory
            .create_parser(TopLevelGrammar::from_json_schema(schema.clone()))
            .map_err(|e| e.to_string())?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(e);
        }
        Ok(Constraint::Json(Arc::new(matcher)))
    }
}
