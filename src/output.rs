//! The OpenAI Batch output line: one per input request, success or error.
//!
//! Ids are derived from the `custom_id`, so a rerun or a resumed run writes the same ids.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::request::LineError;

/// A file beside `path` named after it: `dir/out.jsonl` with `summary.json` gives
/// `dir/out.summary.json`; a name without `.jsonl` keeps its whole name as the stem.
pub fn sibling_path(path: &Path, suffix: &str) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let stem = name.strip_suffix(".jsonl").unwrap_or(&name);
    path.with_file_name(format!("{stem}.{suffix}"))
}

/// Why generation ended; displays as the OpenAI `finish_reason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// An end-of-generation token or a stop string.
    Stop,
    /// `max_tokens` was reached.
    Length,
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Stop => "stop",
            Self::Length => "length",
        })
    }
}

/// Measured token counts of one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// Tokens of the rendered prompt.
    pub prompt_tokens: u64,
    /// Tokens sampled, the final end-of-generation token included.
    pub completion_tokens: u64,
    /// Prompt tokens taken from the shared prefix instead of being computed for this request.
    pub cached_tokens: u64,
}

/// One of the most likely tokens at a position, in OpenAI's `top_logprobs` shape.
#[derive(Debug, Clone, PartialEq)]
pub struct TopLogprob {
    /// The token's text (invalid UTF-8 replaced; `bytes` is exact).
    pub token: String,
    /// The token's bytes.
    pub bytes: Vec<u8>,
    /// Its log probability under the model's own distribution.
    pub logprob: f32,
}

/// A sampled token with its log probability and the most likely alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    /// The token itself.
    pub sampled: TopLogprob,
    /// The most likely tokens at its position, most likely first.
    pub top: Vec<TopLogprob>,
}

/// One choice of a completion.
#[derive(Debug, Clone, PartialEq)]
pub struct Choice {
    /// The generated text, stop string excluded.
    pub content: String,
    /// Why generation ended.
    pub reason: StopReason,
    /// With `logprobs`: every sampled token but a final end-of-generation token.
    pub logprobs: Option<Vec<TokenLogprob>>,
}

/// A request that ran to the end.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    /// Input line number.
    pub line: u64,
    /// The caller's id.
    pub custom_id: String,
    /// Its choices, by index (one unless the request asked for `n`).
    pub choices: Vec<Choice>,
    /// Measured counts: the prompt once, the completions of all choices.
    pub usage: Usage,
    /// Seconds from admission to the first sampled token.
    pub time_to_first_token: f64,
}

/// A hex digest of `tag` and `custom_id`, `n` characters long.
fn derived_id(tag: &str, custom_id: &str, n: usize) -> String {
    let digest = Sha256::new()
        .chain_update(tag.as_bytes())
        .chain_update([0])
        .chain_update(custom_id.as_bytes())
        .finalize();
    let mut hex = hex::encode(digest);
    hex.truncate(n);
    hex
}

/// The `id` of a batch output line.
pub fn line_id(custom_id: &str) -> String {
    format!("batch_req_{}", derived_id("line", custom_id, 24))
}

/// The output line of a completed request.
pub fn success_line(c: &Completion, model: &str, created: u64) -> Value {
    let total = c.usage.prompt_tokens + c.usage.completion_tokens;
    json!({
        "id": line_id(&c.custom_id),
        "custom_id": c.custom_id,
        "response": {
            "status_code": 200,
            "request_id": format!("req_{}", derived_id("request", &c.custom_id, 24)),
            "body": {
                "id": format!("chatcmpl-{}", derived_id("completion", &c.custom_id, 24)),
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": c.choices.iter().enumerate().map(|(i, choice)| json!({
                    "index": i,
                    "message": {"role": "assistant", "content": choice.content},
                    "logprobs": choice.logprobs.as_ref().map(|tokens| json!({
                        "content": tokens.iter().map(|t| {
                            let mut v = top_json(&t.sampled);
                            v["top_logprobs"] = t.top.iter().map(top_json).collect();
                            v
                        }).collect::<Vec<_>>(),
                        "refusal": null,
                    })),
                    "finish_reason": choice.reason.to_string(),
                })).collect::<Vec<_>>(),
                "usage": {
                    "prompt_tokens": c.usage.prompt_tokens,
                    "completion_tokens": c.usage.completion_tokens,
                    "total_tokens": total,
                    "prompt_tokens_details": {"cached_tokens": c.usage.cached_tokens},
                },
            },
        },
        "error": null,
    })
}

/// A token in OpenAI's logprobs shape.
fn top_json(t: &TopLogprob) -> Value {
    json!({"token": t.token, "logprob": t.logprob, "bytes": t.bytes})
}

/// The output line of a request that failed.
pub fn error_line(e: &LineError) -> Value {
    // A line too broken to have an id is named by its line number instead.
    let id_source = e
        .custom_id
        .clone()
        .unwrap_or_else(|| format!("\0line:{}", e.line));
    json!({
        "id": line_id(&id_source),
        "custom_id": e.custom_id,
        "response": null,
        "error": {"code": e.code.as_str(), "message": e.to_string(), "line": e.line},
    })
}

/// The name results report as `model`: the GGUF file name without its extension.
pub fn model_name(path: &Path) -> String {
    path.file_stem()
        .map_or_else(|| "model".into(), |s| s.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::ErrorCode;

    #[test]
    fn success_line_has_the_batch_shape_and_sums_usage() {
        let c = Completion {
            line: 1,
            custom_id: "cand-1".into(),
            choices: vec![
                Choice {
                    content: "hi".into(),
                    reason: StopReason::Length,
                    logprobs: None,
                },
                Choice {
                    content: "yo".into(),
                    reason: StopReason::Stop,
                    logprobs: Some(vec![TokenLogprob {
                        sampled: TopLogprob {
                            token: "yo".into(),
                            bytes: b"yo".to_vec(),
                            logprob: -0.5,
                        },
                        top: vec![TopLogprob {
                            token: "yo".into(),
                            bytes: b"yo".to_vec(),
                            logprob: -0.5,
                        }],
                    }]),
                },
            ],
            usage: Usage {
                prompt_tokens: 10,
                completion_tokens: 4,
                cached_tokens: 7,
            },
            time_to_first_token: 0.1,
        };
        let v = success_line(&c, "m", 5);
        assert_eq!(v["custom_id"], "cand-1");
        assert_eq!(v["error"], Value::Null);
        let body = &v["response"]["body"];
        assert_eq!(v["response"]["status_code"], 200);
        assert_eq!(body["object"], "chat.completion");
        assert_eq!(body["choices"][0]["message"]["content"], "hi");
        assert_eq!(body["choices"][0]["finish_reason"], "length");
        assert_eq!(body["choices"][0]["logprobs"], Value::Null);
        assert_eq!(body["choices"][1]["index"], 1);
        let lp = &body["choices"][1]["logprobs"]["content"][0];
        assert_eq!(lp["token"], "yo");
        assert_eq!(lp["bytes"], json!([121, 111]));
        assert_eq!(lp["top_logprobs"][0]["logprob"], -0.5);
        assert_eq!(body["usage"]["total_tokens"], 14);
        assert_eq!(body["usage"]["prompt_tokens_details"]["cached_tokens"], 7);
    }

    #[test]
    fn ids_are_derived_from_custom_id() {
        assert_eq!(line_id("a"), line_id("a"));
        assert_ne!(line_id("a"), line_id("b"));
        assert!(line_id("a").starts_with("batch_req_"));
    }

    #[test]
    fn error_line_names_line_and_code() {
        let e = LineError::new(4, None, ErrorCode::InvalidJson, "bad".into());
        let v = error_line(&e);
        assert_eq!(v["response"], Value::Null);
        assert_eq!(v["custom_id"], Value::Null);
        assert_eq!(v["error"]["code"], "invalid_json");
        assert_eq!(v["error"]["line"], 4);
        assert!(v["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("line 4:"));
    }
}
