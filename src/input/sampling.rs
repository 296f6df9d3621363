//! The sampling settings a request may carry, and the reader of the sampling fields that chat,
//! completions and Responses share, so each endpoint's parser bounds them the same way.

use serde_json::Value;

use crate::input::fields::Honoured;

/// Sampling settings a request may carry; `None` falls back to the run's defaults.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SamplingParams {
    /// Upper bound on generated tokens (`max_tokens` or `max_completion_tokens`).
    pub max_tokens: Option<u32>,
    /// 0 selects greedy decoding.
    pub temperature: Option<f32>,
    /// Nucleus sampling mass.
    pub top_p: Option<f32>,
    /// Keep only the k most likely tokens (0 disables).
    pub top_k: Option<i32>,
    /// Minimum probability relative to the most likely token.
    pub min_p: Option<f32>,
    /// The request's own sampling seed.
    pub seed: Option<u64>,
    /// Strings that end generation; they are not part of the output.
    pub stop: Vec<String>,
    /// OpenAI's frequency penalty, in [-2, 2].
    pub frequency_penalty: Option<f32>,
    /// OpenAI's presence penalty, in [-2, 2].
    pub presence_penalty: Option<f32>,
    /// Choices to sample from the one prompt, 1 to [`MAX_CHOICES`].
    pub n: u32,
    /// Log probabilities to return: `Some(k)` with the `k` most likely alternatives per token.
    pub logprobs: Option<u8>,
    /// The constraint the answer must follow.
    pub constraint: Option<ConstraintSpec>,
}

/// Most choices one request may ask for (`n`); a run also needs as many slots (`--parallel`).
pub const MAX_CHOICES: u32 = 32;

/// Most alternatives per token that `top_logprobs` may ask for, as in OpenAI's API.
pub const MAX_TOP_LOGPROBS: u64 = 20;

/// What a request constrains its answer to, as it asked.
#[derive(Debug, Clone, PartialEq)]
pub enum ConstraintSpec {
    /// A JSON schema (`response_format` `json_schema` or `json_object`, or `json_schema`).
    JsonSchema {
        /// The schema.
        schema: Value,
        /// The field it came from, for error messages.
        field: &'static str,
    },
    /// A GBNF grammar (llama.cpp's `grammar` field).
    Gbnf(String),
}

/// The sampling fields chat shares with completions and Responses.
///
/// # Errors
/// The field at fault.
pub fn parse_sampling(body: &Honoured) -> Result<SamplingParams, String> {
    let float = |name: &str, lo: f64, hi: f64| -> Result<Option<f32>, String> {
        match body.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => match v.as_f64() {
                Some(x) if (lo..=hi).contains(&x) => Ok(Some(x as f32)),
                _ => Err(format!(
                    "field `{name}` is {v}; expected a number in [{lo}, {hi}]"
                )),
            },
        }
    };
    let uint = |name: &str, hi: u64| -> Result<Option<u64>, String> {
        match body.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => match v.as_u64() {
                Some(x) if x <= hi => Ok(Some(x)),
                _ => Err(format!(
                    "field `{name}` is {v}; expected an integer in [0, {hi}]"
                )),
            },
        }
    };
    let max_tokens = match uint("max_completion_tokens", u64::from(u32::MAX))? {
        Some(n) => Some(n),
        None => uint("max_tokens", u64::from(u32::MAX))?,
    };
    if max_tokens == Some(0) {
        return Err("field `max_tokens` is 0; ask for at least one token".into());
    }
    let stop = match body.get("stop") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|s| s.as_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()
            .ok_or("field `stop` must be a string or an array of strings")?,
        Some(v) => return Err(format!("field `stop` is {v}; expected a string or array")),
    };
    if stop.iter().any(String::is_empty) {
        return Err("field `stop` holds an empty string".into());
    }
    let n = match body.get("n") {
        None | Some(Value::Null) => 1,
        Some(v) => match v.as_u64() {
            Some(n) if (1..=u64::from(MAX_CHOICES)).contains(&n) => n as u32,
            _ => {
                return Err(format!(
                    "field `n` is {v}; expected an integer in [1, {MAX_CHOICES}]"
                ))
            }
        },
    };
    let logprobs = match body.get("logprobs") {
        None | Some(Value::Null | Value::Bool(false)) => false,
        Some(Value::Bool(true)) => true,
        Some(v) => return Err(format!("field `logprobs` is {v}; expected true or false")),
    };
    let top = uint("top_logprobs", MAX_TOP_LOGPROBS)?;
    if top.is_some() && !logprobs {
        return Err("field `top_logprobs` needs `logprobs`: true".into());
    }
    Ok(SamplingParams {
        n,
        logprobs: logprobs.then(|| top.unwrap_or(0) as u8),
        constraint: parse_constraint(body)?,
        max_tokens: max_tokens.map(|n| n as u32),
        temperature: float("temperature", 0.0, 2.0)?,
        top_p: float("top_p", 0.0, 1.0)?,
        top_k: uint("top_k", i32::MAX as u64)?.map(|k| k as i32),
        min_p: float("min_p", 0.0, 1.0)?,
        seed: uint("seed", u64::MAX)?,
        stop,
        frequency_penalty: float("frequency_penalty", -2.0, 2.0)?,
        presence_penalty: float("presence_penalty", -2.0, 2.0)?,
    })
}

/// The constraint a body asks for: `response_format` (OpenAI), or llama.cpp's `json_schema`
/// or `grammar`; at most one of them.
fn parse_constraint(body: &Honoured) -> Result<Option<ConstraintSpec>, String> {
    let given = |k: &str| body.get(k).is_some_and(|v| !v.is_null());
    let format = match body.get("response_format") {
        None | Some(Value::Null) => None,
        Some(Value::Object(f)) => match f.get("type").and_then(Value::as_str) {
            Some("text") => None,
            Some("json_object") => Some(ConstraintSpec::JsonSchema {
                schema: serde_json::json!({"type": "object"}),
                field: "response_format",
            }),
            Some("json_schema") => match f.get("json_schema").and_then(|j| j.get("schema")) {
                Some(schema @ (Value::Object(_) | Value::Bool(_))) => {
                    Some(ConstraintSpec::JsonSchema {
                        schema: schema.clone(),
                        field: "response_format.json_schema.schema",
                    })
                }
                _ => {
                    return Err(
                        "field `response_format.json_schema.schema` is missing or not \
                                a JSON schema object"
                            .into(),
                    )
                }
            },
            _ => {
                return Err(format!(
                    "field `response_format.type` is {}; expected text, json_object or json_schema",
                    f.get("type").unwrap_or(&Value::Null)
                ))
            }
        },
        Some(v) => {
            return Err(format!(
                "field `response_format` is {v}; expected an object"
            ))
        }
    };
    let schema = match body.get("json_schema") {
        None | Some(Value::Null) => None,
        Some(schema @ (Value::Object(_) | Value::Bool(_))) => Some(ConstraintSpec::JsonSchema {
            schema: schema.clone(),
            field: "json_schema",
        }),
        Some(v) => {
            return Err(format!(
                "field `json_schema` is {v}; expected a JSON schema object"
            ))
        }
    };
    let grammar = match body.get("grammar") {
        None | Some(Value::Null) => None,
        Some(Value::String(g)) if !g.trim().is_empty() => Some(ConstraintSpec::Gbnf(g.clone())),
        Some(v) => {
            return Err(format!(
                "field `grammar` is {v}; expected a GBNF grammar string"
            ))
        }
    };
    let chosen: Vec<ConstraintSpec> = [format, schema, grammar].into_iter().flatten().collect();
    if chosen.len() > 1 {
        let names: Vec<&str> = ["response_format", "json_schema", "grammar"]
            .into_iter()
            .filter(|k| given(k))
            .collect();
        return Err(format!(
            "fields {} each constrain the answer; give one of them",
            names.join(" and ")
        ));
    }
    Ok(chosen.into_iter().next())
}
