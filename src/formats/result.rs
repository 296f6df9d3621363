//! The OpenAI Batch output line: one per input request, success or error.
//!
//! Ids are derived from the `custom_id`, so a rerun or a resumed run writes the same ids.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::digest::Hasher;
use crate::formats::line_error::LineError;

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

/// What identifies a request's computation for result reuse: a SHA-256 over the endpoint, the
/// rendered prompt tokens, the resolved sampling settings and the constraint. Two requests with
/// the same key, run on the same model and engine settings in deterministic mode, produce the
/// same result line but for the ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ComputationKey(pub [u8; 32]);

impl ComputationKey {
    /// Its hex form, as result lines carry it.
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Reads the hex form back; `None` when it is not 64 hex digits.
    pub fn parse(text: &str) -> Option<Self> {
        let mut key = [0u8; 32];
        hex::decode_to_slice(text, &mut key).ok()?;
        Some(Self(key))
    }
}

/// A hex digest of `tag` and `custom_id`, `n` characters long.
fn derived_id(tag: &str, custom_id: &str, n: usize) -> String {
    let mut h = Hasher::new();
    h.update(tag).update([0]).update(custom_id);
    let digest = h.finish();
    let mut hex = hex::encode(digest);
    hex.truncate(n);
    hex
}

/// The `id` of a batch output line.
pub fn line_id(custom_id: &str) -> String {
    format!("batch_req_{}", derived_id("line", custom_id, 24))
}

fn request_id(custom_id: &str) -> String {
    format!("req_{}", derived_id("request", custom_id, 24))
}

fn completion_id(custom_id: &str) -> String {
    format!("chatcmpl-{}", derived_id("completion", custom_id, 24))
}

/// One line of a batch output: a request's response or its error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultLine {
    /// `batch_req_...`, derived from the `custom_id`.
    pub id: String,
    /// The caller's id (`None` for a line too broken to have one).
    pub custom_id: Option<String>,
    /// The response, for a request that completed.
    pub response: Option<ResponseEnvelope>,
    /// The error, for one that did not.
    pub error: Option<ErrorBody>,
    /// Of a completed request: its [`ComputationKey`] in hex, which `--reuse` and duplicate
    /// detection match on. Not part of OpenAI's line; absent on error lines.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub computation: Option<String>,
}

/// The response of a completed request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResponseEnvelope {
    /// Always 200.
    pub status_code: u16,
    /// `req_...`, derived from the `custom_id`.
    pub request_id: String,
    /// The chat completion.
    pub body: ChatCompletion,
}

/// OpenAI's `chat.completion` object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatCompletion {
    /// `chatcmpl-...`, derived from the `custom_id`.
    pub id: String,
    /// `chat.completion`.
    pub object: String,
    /// When the run started, in seconds since the epoch.
    pub created: u64,
    /// The model's name.
    pub model: String,
    /// The choices, by index.
    pub choices: Vec<ChoiceBody>,
    /// Measured token counts.
    pub usage: UsageBody,
}

/// One choice.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChoiceBody {
    /// Its index.
    pub index: usize,
    /// The assistant's message.
    pub message: MessageBody,
    /// With `logprobs`: the sampled tokens' log probabilities.
    pub logprobs: Option<LogprobsBody>,
    /// `stop` or `length`.
    pub finish_reason: String,
}

/// The assistant's message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageBody {
    /// `assistant`.
    pub role: String,
    /// The generated text.
    pub content: String,
}

/// A choice's log probabilities.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogprobsBody {
    /// One entry per sampled token.
    pub content: Vec<TokenBody>,
    /// Always `null`.
    pub refusal: Option<String>,
}

/// A sampled token with its alternatives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenBody {
    /// The token's text.
    pub token: String,
    /// Its log probability (the f32 the model gave, widened).
    pub logprob: f64,
    /// Its bytes.
    pub bytes: Vec<u8>,
    /// The most likely tokens at its position.
    pub top_logprobs: Vec<TopBody>,
}

/// One of the most likely tokens at a position.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TopBody {
    /// The token's text.
    pub token: String,
    /// Its log probability.
    pub logprob: f64,
    /// Its bytes.
    pub bytes: Vec<u8>,
}

/// OpenAI's `usage`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageBody {
    /// Prompt tokens.
    pub prompt_tokens: u64,
    /// Completion tokens, every choice's.
    pub completion_tokens: u64,
    /// Both.
    pub total_tokens: u64,
    /// Of the prompt, the cached part.
    pub prompt_tokens_details: PromptTokensDetails,
}

/// `usage.prompt_tokens_details`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromptTokensDetails {
    /// Prompt tokens taken from a shared prefix, measured.
    pub cached_tokens: u64,
}

/// The error of a request that failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Machine-readable code.
    pub code: String,
    /// What went wrong and how to fix it.
    pub message: String,
    /// The input line.
    pub line: u64,
}

impl TopBody {
    fn of(t: &TopLogprob) -> Self {
        Self {
            token: t.token.clone(),
            logprob: f64::from(t.logprob),
            bytes: t.bytes.clone(),
        }
    }
}

impl ResultLine {
    /// The line of a completed request.
    pub fn success(c: &Completion, model: &str, created: u64) -> Self {
        let choices = c
            .choices
            .iter()
            .enumerate()
            .map(|(index, choice)| ChoiceBody {
                index,
                message: MessageBody {
                    role: "assistant".into(),
                    content: choice.content.clone(),
                },
                logprobs: choice.logprobs.as_ref().map(|tokens| LogprobsBody {
                    content: tokens
                        .iter()
                        .map(|t| {
                            let sampled = TopBody::of(&t.sampled);
                            TokenBody {
                                token: sampled.token,
                                logprob: sampled.logprob,
                                bytes: sampled.bytes,
                                top_logprobs: t.top.iter().map(TopBody::of).collect(),
                            }
                        })
                        .collect(),
                    refusal: None,
                }),
                finish_reason: choice.reason.to_string(),
            })
            .collect();
        Self {
            id: line_id(&c.custom_id),
            custom_id: Some(c.custom_id.clone()),
            response: Some(ResponseEnvelope {
                status_code: 200,
                request_id: request_id(&c.custom_id),
                body: ChatCompletion {
                    id: completion_id(&c.custom_id),
                    object: "chat.completion".into(),
                    created,
                    model: model.to_owned(),
                    choices,
                    usage: UsageBody {
                        prompt_tokens: c.usage.prompt_tokens,
                        completion_tokens: c.usage.completion_tokens,
                        total_tokens: c.usage.prompt_tokens + c.usage.completion_tokens,
                        prompt_tokens_details: PromptTokensDetails {
                            cached_tokens: c.usage.cached_tokens,
                        },
                    },
                },
            }),
            error: None,
            computation: None,
        }
    }

    /// Tags a success line with the key of the computation that produced it.
    pub fn with_computation(mut self, key: ComputationKey) -> Self {
        self.computation = Some(key.hex());
        self
    }

    /// A success line written by an earlier computation, as this run would write it for
    /// `custom_id`: the ids derived from it, this run's `created` and model name. Everything
    /// else is the computation's and stays as it was.
    pub fn reissue(mut self, custom_id: &str, model: &str, created: u64) -> Self {
        self.id = line_id(custom_id);
        self.custom_id = Some(custom_id.to_owned());
        if let Some(r) = &mut self.response {
            r.request_id = request_id(custom_id);
            r.body.id = completion_id(custom_id);
            r.body.created = created;
            model.clone_into(&mut r.body.model);
        }
        self
    }

    /// The line of a request that failed.
    pub fn failure(e: &LineError) -> Self {
        // A line too broken to have an id is named by its line number instead.
        let id_source = e
            .custom_id
            .clone()
            .unwrap_or_else(|| format!("\0line:{}", e.line));
        Self {
            id: line_id(&id_source),
            custom_id: e.custom_id.clone(),
            response: None,
            error: Some(ErrorBody {
                code: e.code.as_str().to_owned(),
                message: e.to_string(),
                line: e.line,
            }),
            computation: None,
        }
    }
}

/// What readers of an output (resume, merge, status) need from a result line; the rest of
/// the line is skipped unparsed.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct LineHead {
    /// The caller's id.
    #[serde(default)]
    pub custom_id: Option<String>,
    /// The response, for a request that completed.
    #[serde(default)]
    pub response: Option<ResponseHead>,
    /// The error, for one that did not.
    #[serde(default)]
    pub error: Option<ErrorHead>,
}

/// The part of a response readers need.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ResponseHead {
    /// Its body.
    #[serde(default)]
    pub body: Option<BodyHead>,
}

/// The part of a response body readers need.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct BodyHead {
    /// Its usage.
    #[serde(default)]
    pub usage: Option<UsageBody>,
}

/// The part of an error readers need.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ErrorHead {
    /// Its code.
    #[serde(default)]
    pub code: Option<String>,
    /// The input line it is for.
    #[serde(default)]
    pub line: Option<u64>,
}

impl LineHead {
    /// Reads a line's head; `None` when it is not a result line.
    pub fn parse(line: &[u8]) -> Option<Self> {
        serde_json::from_slice(line).ok()
    }

    /// The usage of a completed request.
    pub fn usage(&self) -> Option<UsageBody> {
        self.response.as_ref()?.body.as_ref()?.usage
    }
}

/// The name results report as `model`: the GGUF file name without its extension.
pub fn model_name(path: &Path) -> String {
    path.file_stem()
        .map_or_else(|| "model".into(), |s| s.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::line_error::ErrorCode;
    use serde_json::{json, Value};

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
        let v = serde_json::to_value(ResultLine::success(&c, "m", 5)).unwrap();
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
    fn a_reissued_line_is_byte_for_byte_the_line_written_for_its_new_id() {
        let logprob = |x: f32| TopLogprob {
            token: "é\"\n".into(),
            bytes: "é\"\n".as_bytes().to_vec(),
            logprob: x,
        };
        let completion = |id: &str| Completion {
            line: 3,
            custom_id: id.into(),
            choices: vec![Choice {
                content: "a \u{1F600} \\ \"quoted\"".into(),
                reason: StopReason::Stop,
                logprobs: Some(vec![TokenLogprob {
                    sampled: logprob(-0.1),
                    top: vec![logprob(-0.1), logprob(-1.234_567_9e-7), logprob(-23.5)],
                }]),
            }],
            usage: Usage {
                prompt_tokens: 40,
                completion_tokens: 2,
                cached_tokens: 31,
            },
            time_to_first_token: 0.5,
        };
        let key = ComputationKey([9; 32]);
        let earlier = ResultLine::success(&completion("old"), "old-name", 1).with_computation(key);
        let text = serde_json::to_string(&earlier).unwrap();
        let read: ResultLine = serde_json::from_str(&text).unwrap();
        let copy = read.reissue("new", "m", 5);
        let fresh = ResultLine::success(&completion("new"), "m", 5).with_computation(key);
        assert_eq!(
            serde_json::to_string(&copy).unwrap(),
            serde_json::to_string(&fresh).unwrap()
        );
        assert_eq!(ComputationKey::parse(&key.hex()), Some(key));
        assert_eq!(ComputationKey::parse("zz"), None);
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
        let v = serde_json::to_value(ResultLine::failure(&e)).unwrap();
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
