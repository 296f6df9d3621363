//! The body of a `/v1/completions` request: a raw prompt, continued as it is, with no chat
//! template, and the legacy `logprobs: k`.

use serde_json::Value;

use crate::formats::line_error::ErrorCode;
use crate::input::fields::{Fault, Honoured};
use crate::input::sampling::{parse_sampling, SamplingParams};

/// Most alternatives per token the legacy `logprobs` may ask for, as in OpenAI's API.
pub const MAX_LEGACY_LOGPROBS: u64 = 5;

/// What a completions body asks for.
pub struct CompletionsRequest {
    /// The text to continue.
    pub prompt: String,
    /// Its sampling settings.
    pub sampling: SamplingParams,
}

/// Reads a completions body as [`crate::input::fields::check_body`] left it: the fields
/// [`crate::input::fields::COMPLETIONS`] honours, and no others.
///
/// # Errors
/// The field at fault, with its code.
pub fn parse(body: &Honoured) -> Result<CompletionsRequest, Fault> {
    let invalid = |m: String| (ErrorCode::InvalidParameter, m);
    let prompt = match body.get("prompt") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(items)) => match items.as_slice() {
            [Value::String(s)] => s.clone(),
            [] => return Err(bad_prompt("field `prompt` is an empty list".into())),
            [Value::String(_), ..] => {
                return Err(bad_prompt(format!(
                    "field `prompt` holds {} prompts; send one prompt per line (the batch file \
                     is the list), each with its own custom_id",
                    items.len()
                )))
            }
            _ => {
                return Err(bad_prompt(
                    "field `prompt` holds token ids; send the prompt as text".into(),
                ))
            }
        },
        Some(v) => {
            return Err(bad_prompt(format!(
                "field `prompt` is {v}; expected a string"
            )))
        }
        None => return Err(bad_prompt("field `prompt` is missing".into())),
    };
    if prompt.is_empty() {
        return Err(bad_prompt("field `prompt` is empty".into()));
    }
    if prompt.contains('\0') {
        return Err((
            ErrorCode::InvalidContent,
            "field `prompt` contains a NUL character".into(),
        ));
    }
    if body
        .get("echo")
        .is_some_and(|e| e != &Value::Bool(false) && !e.is_null())
    {
        return Err(invalid(
            "field `echo` is not supported: only the completion is returned; prepend the \
             prompt yourself"
                .into(),
        ));
    }
    if body
        .get("suffix")
        .is_some_and(|s| !s.is_null() && s.as_str() != Some(""))
    {
        return Err(invalid(
            "field `suffix` is not supported: this model continues text, it does not insert".into(),
        ));
    }
    // The chat fields `parse_sampling` shares; `logprobs` means something else here.
    let shared = body.only(|k| !matches!(k, "prompt" | "logprobs" | "echo" | "suffix" | "best_of"));
    let mut sampling = parse_sampling(&shared).map_err(invalid)?;
    if let Some(best_of) = body.get("best_of").filter(|b| !b.is_null()) {
        match best_of.as_u64() {
            Some(b) if b == u64::from(sampling.n) => {}
            _ => {
                return Err(invalid(format!(
                    "field `best_of` is {best_of}; only best_of equal to n ({}) is supported: \
                     every sampled choice is returned",
                    sampling.n
                )))
            }
        }
    }
    sampling.logprobs = match body.get("logprobs") {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_u64() {
            Some(k) if k <= MAX_LEGACY_LOGPROBS => Some(k as u8),
            _ => {
                return Err(invalid(format!(
                    "field `logprobs` is {v}; expected an integer in [0, {MAX_LEGACY_LOGPROBS}]"
                )))
            }
        },
    };
    Ok(CompletionsRequest { prompt, sampling })
}

fn bad_prompt(message: String) -> Fault {
    (ErrorCode::InvalidMessages, message)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::input::fields::{check_body, FieldPolicy, COMPLETIONS};

    fn parse_body(v: Value) -> Result<CompletionsRequest, Fault> {
        let body = v.as_object().unwrap().clone();
        parse(&check_body(body, &COMPLETIONS, FieldPolicy::default(), |_| {}).unwrap())
    }

    #[test]
    fn a_prompt_with_sampling_and_legacy_logprobs_parses() {
        let r = parse_body(
            json!({"prompt": ["Q: 2+2\nA:"], "max_tokens": 5, "temperature": 0,
                                  "stop": ["\n"], "n": 2, "best_of": 2, "seed": 9, "logprobs": 3,
                                  "echo": false, "suffix": null}),
        )
        .unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(r.prompt, "Q: 2+2\nA:");
        assert_eq!(r.sampling.max_tokens, Some(5));
        assert_eq!(r.sampling.n, 2);
        assert_eq!(r.sampling.seed, Some(9));
        assert_eq!(r.sampling.stop, ["\n"]);
        assert_eq!(r.sampling.logprobs, Some(3));
        let r = parse_body(json!({"prompt": "x"})).unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!((r.sampling.n, r.sampling.logprobs), (1, None));
    }

    #[test]
    fn what_cannot_be_honoured_is_refused_by_name() {
        for (body, code, needle) in [
            (json!({}), ErrorCode::InvalidMessages, "`prompt` is missing"),
            (
                json!({"prompt": ["a", "b"]}),
                ErrorCode::InvalidMessages,
                "one prompt per line",
            ),
            (
                json!({"prompt": [1, 2]}),
                ErrorCode::InvalidMessages,
                "token ids",
            ),
            (json!({"prompt": ""}), ErrorCode::InvalidMessages, "empty"),
            (
                json!({"prompt": "x", "echo": true}),
                ErrorCode::InvalidParameter,
                "echo",
            ),
            (
                json!({"prompt": "x", "suffix": "end"}),
                ErrorCode::InvalidParameter,
                "suffix",
            ),
            (
                json!({"prompt": "x", "n": 2, "best_of": 3}),
                ErrorCode::InvalidParameter,
                "best_of",
            ),
            (
                json!({"prompt": "x", "logprobs": 6}),
                ErrorCode::InvalidParameter,
                "logprobs",
            ),
            (
                json!({"prompt": "x", "logprobs": true}),
                ErrorCode::InvalidParameter,
                "logprobs",
            ),
            (
                json!({"prompt": "x", "temperature": 3}),
                ErrorCode::InvalidParameter,
                "temperature",
            ),
        ] {
            let (c, m) = parse_body(body.clone())
                .err()
                .unwrap_or_else(|| panic!("{body}"));
            assert_eq!(c, code, "{body}: {m}");
            assert!(m.contains(needle), "{body}: {m}");
        }
    }
}
