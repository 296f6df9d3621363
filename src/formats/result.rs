//! The OpenAI Batch output line: one per input request, success or error.
//!
//! Ids are derived from the `custom_id`, so a rerun or a resumed run writes the same ids.

use std::path::Path;

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

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

/// The endpoint a request came through; it decides the shape of its response body.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Endpoint {
    /// `/v1/chat/completions`: a `chat.completion`.
    #[default]
    Chat,
    /// `/v1/responses`: a `response` object, which repeats some of its request.
    Responses(Box<ResponsesEcho>),
    /// `/v1/completions`: a `text_completion`, with legacy log probabilities.
    Completions,
    /// `/v1/embeddings`: a list of vectors, as numbers or in base64.
    Embeddings {
        /// `encoding_format: base64`.
        base64: bool,
    },
}

/// What a `response` object repeats of its request: the settings it ran with.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ResponsesEcho {
    /// `instructions`, the shared system prefix.
    pub instructions: Option<String>,
    /// `max_output_tokens` as asked (`None`: the run's `--max-tokens`).
    pub max_output_tokens: Option<u32>,
    /// The temperature it sampled with, the run's default when it gave none.
    pub temperature: f32,
    /// The nucleus mass it sampled with.
    pub top_p: f32,
    /// `text` as asked, `{"format": {"type": "text"}}` when absent.
    pub text: Value,
    /// `metadata` as given.
    pub metadata: Option<Value>,
}

/// Measured token counts of one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// Tokens of the rendered prompt.
    pub prompt_tokens: u64,
    /// Tokens sampled, the final end-of-generation token included.
    pub completion_tokens: u64,
    /// Of those, the thinking's (markers included), measured.
    pub reasoning_tokens: u64,
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
    /// With `logprobs`: every sampled token but a final end-of-generation token (of a
    /// reasoning model, the answer's tokens only).
    pub logprobs: Option<Vec<TokenLogprob>>,
    /// A reasoning model's thinking, markers left out; `None` for a request that does not
    /// think.
    pub reasoning: Option<String>,
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
    /// The endpoint it came through.
    pub endpoint: Endpoint,
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

fn text_completion_id(custom_id: &str) -> String {
    format!("cmpl-{}", derived_id("text-completion", custom_id, 24))
}

fn response_id(custom_id: &str) -> String {
    format!("resp_{}", derived_id("response", custom_id, 24))
}

fn reasoning_id(custom_id: &str) -> String {
    format!("rs_{}", derived_id("reasoning", custom_id, 24))
}

fn message_id(custom_id: &str) -> String {
    format!("msg_{}", derived_id("message", custom_id, 24))
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
    /// The endpoint's response object.
    pub body: Body,
}

/// A response body, by endpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Body {
    /// `/v1/chat/completions`.
    Chat(ChatCompletion),
    /// `/v1/responses`.
    Response(Box<ResponseObject>),
    /// `/v1/completions`.
    Text(TextCompletion),
    /// `/v1/embeddings`.
    Embedding(EmbeddingList),
}

impl Body {
    /// The chat completion, for a chat request.
    pub fn chat(&self) -> Option<&ChatCompletion> {
        match self {
            Self::Chat(c) => Some(c),
            Self::Response(_) | Self::Text(_) | Self::Embedding(_) => None,
        }
    }
}

/// OpenAI's `response` object (the Responses API).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResponseObject {
    /// `resp_...`, derived from the `custom_id`.
    pub id: String,
    /// `response`.
    pub object: String,
    /// When the run started, in seconds since the epoch.
    pub created_at: u64,
    /// `completed`, or `incomplete` when `max_output_tokens` cut it short.
    pub status: String,
    /// Always `null`: a failed request gets an error line instead.
    pub error: Option<Value>,
    /// Why it is incomplete.
    pub incomplete_details: Option<IncompleteDetails>,
    /// The request's `instructions`.
    pub instructions: Option<String>,
    /// The request's `max_output_tokens`.
    pub max_output_tokens: Option<u32>,
    /// The request's `metadata`.
    pub metadata: Option<Value>,
    /// The model's name.
    pub model: String,
    /// A reasoning model's thinking (a `reasoning` item), then one assistant message.
    pub output: Vec<OutputItem>,
    /// Always `true`; no tools run here.
    pub parallel_tool_calls: bool,
    /// The temperature it sampled with.
    pub temperature: f64,
    /// Always `none`.
    pub tool_choice: String,
    /// Always empty.
    pub tools: Vec<Value>,
    /// The nucleus mass it sampled with.
    pub top_p: f64,
    /// The request's `text` settings.
    pub text: Value,
    /// Measured token counts.
    pub usage: ResponseUsage,
}

/// OpenAI's `text_completion` object (the legacy Completions API).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TextCompletion {
    /// `cmpl-...`, derived from the `custom_id`.
    pub id: String,
    /// `text_completion`.
    pub object: String,
    /// When the run started, in seconds since the epoch.
    pub created: u64,
    /// The model's name.
    pub model: String,
    /// The choices, by index.
    pub choices: Vec<TextChoice>,
    /// Measured token counts.
    pub usage: UsageBody,
}

/// One choice of a text completion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TextChoice {
    /// The generated text.
    pub text: String,
    /// Its index.
    pub index: usize,
    /// With `logprobs`: the legacy shape.
    pub logprobs: Option<LegacyLogprobs>,
    /// `stop` or `length`.
    pub finish_reason: String,
}

/// The legacy log probabilities: parallel lists, one entry per generated token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LegacyLogprobs {
    /// The tokens' texts.
    pub tokens: Vec<String>,
    /// Their log probabilities.
    pub token_logprobs: Vec<f64>,
    /// The most likely tokens at each position, text to log probability (a text two tokens
    /// share appears once, with the likelier).
    pub top_logprobs: Vec<Map<String, Value>>,
    /// Where each token starts in the generated text, in characters.
    pub text_offset: Vec<u64>,
}

/// OpenAI's embeddings response: a `list` of `embedding` objects.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EmbeddingList {
    /// `list`.
    pub object: String,
    /// One vector per input, in input order.
    pub data: Vec<EmbeddingItem>,
    /// The model's name.
    pub model: String,
    /// Measured token counts.
    pub usage: EmbeddingUsage,
}

/// One input's vector.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EmbeddingItem {
    /// `embedding`.
    pub object: String,
    /// The input's index.
    pub index: usize,
    /// The vector.
    pub embedding: Vector,
}

/// A vector as numbers, or as base64 of its little-endian f32 bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Vector {
    /// `encoding_format: float`.
    Float(Vec<f32>),
    /// `encoding_format: base64`.
    Base64(String),
}

impl Vector {
    /// `values` in the encoding asked for.
    pub fn encode(values: &[f32], base64: bool) -> Self {
        if base64 {
            let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            Self::Base64(base64::engine::general_purpose::STANDARD.encode(bytes))
        } else {
            Self::Float(values.to_vec())
        }
    }
}

/// An embeddings response's `usage`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EmbeddingUsage {
    /// Tokens of every input.
    pub prompt_tokens: u64,
    /// The same: nothing is generated.
    pub total_tokens: u64,
}

/// `incomplete_details`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IncompleteDetails {
    /// `max_output_tokens`.
    pub reason: String,
}

/// An item of a `response`'s `output`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum OutputItem {
    /// The assistant's message.
    Message(OutputMessage),
    /// A reasoning model's thinking.
    Reasoning(ReasoningItem),
}

/// An output item of type `reasoning`: the thinking, whole, as one `reasoning_text` part.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReasoningItem {
    /// `reasoning`.
    #[serde(rename = "type")]
    pub kind: String,
    /// `rs_...`, derived from the `custom_id`.
    pub id: String,
    /// Always empty: no summary is made.
    pub summary: Vec<Value>,
    /// One `reasoning_text` part.
    pub content: Vec<ReasoningText>,
}

/// A `reasoning_text` content part.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReasoningText {
    /// `reasoning_text`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The thinking, markers left out.
    pub text: String,
}

/// An output item of type `message`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputMessage {
    /// `message`.
    #[serde(rename = "type")]
    pub kind: String,
    /// `msg_...`, derived from the `custom_id`.
    pub id: String,
    /// `completed` or `incomplete`.
    pub status: String,
    /// `assistant`.
    pub role: String,
    /// One `output_text` part.
    pub content: Vec<OutputText>,
}

/// An `output_text` content part.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputText {
    /// `output_text`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The generated text.
    pub text: String,
    /// Always empty.
    pub annotations: Vec<Value>,
}

/// The Responses API's `usage`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResponseUsage {
    /// Prompt tokens.
    pub input_tokens: u64,
    /// Of the prompt, the cached part.
    pub input_tokens_details: InputTokensDetails,
    /// Generated tokens.
    pub output_tokens: u64,
    /// Of those, the thinking's, measured.
    pub output_tokens_details: OutputTokensDetails,
    /// Both.
    pub total_tokens: u64,
}

/// `usage.input_tokens_details`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputTokensDetails {
    /// Prompt tokens taken from a shared prefix, measured.
    pub cached_tokens: u64,
    /// Prompt tokens this request wrote to a cache: always 0, since a shared prefix is
    /// computed for the prefix, once, and every request that uses it counts it as cached.
    pub cache_write_tokens: u64,
}

/// `usage.output_tokens_details`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputTokensDetails {
    /// Tokens of a reasoning model's thinking, its markers included, measured.
    pub reasoning_tokens: u64,
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
    /// The generated text (of a reasoning model, the answer alone).
    pub content: String,
    /// A reasoning model's thinking, markers left out: the field llama-server, vLLM and
    /// DeepSeek use, an extension to OpenAI's message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
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
    /// Of the completion, the thinking's part: only for a request that thinks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_tokens_details: Option<CompletionTokensDetails>,
}

/// `usage.completion_tokens_details`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompletionTokensDetails {
    /// Tokens of the thinking, its markers included, measured.
    pub reasoning_tokens: u64,
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
    /// The line of a completed request, in its endpoint's shape.
    pub fn success(c: &Completion, model: &str, created: u64) -> Self {
        let body = match &c.endpoint {
            Endpoint::Responses(echo) => {
                Body::Response(Box::new(response_object(c, echo, model, created)))
            }
            Endpoint::Completions => Body::Text(text_completion(c, model, created)),
            // Never reached: an embeddings request is settled by the run, not decoded as a
            // completion. Were it, its text is still reported, as chat.
            Endpoint::Chat | Endpoint::Embeddings { .. } => {
                Body::Chat(chat_completion(c, model, created))
            }
        };
        Self {
            id: line_id(&c.custom_id),
            custom_id: Some(c.custom_id.clone()),
            response: Some(ResponseEnvelope {
                status_code: 200,
                request_id: request_id(&c.custom_id),
                body,
            }),
            error: None,
            computation: None,
        }
    }

    /// The line of an embeddings request: one vector per input, and the inputs' token count.
    pub fn embeddings(
        custom_id: &str,
        vectors: &[Vec<f32>],
        base64: bool,
        prompt_tokens: u64,
        model: &str,
    ) -> Self {
        let data = vectors
            .iter()
            .enumerate()
            .map(|(index, v)| EmbeddingItem {
                object: "embedding".into(),
                index,
                embedding: Vector::encode(v, base64),
            })
            .collect();
        Self {
            id: line_id(custom_id),
            custom_id: Some(custom_id.to_owned()),
            response: Some(ResponseEnvelope {
                status_code: 200,
                request_id: request_id(custom_id),
                body: Body::Embedding(EmbeddingList {
                    object: "list".into(),
                    data,
                    model: model.to_owned(),
                    usage: EmbeddingUsage {
                        prompt_tokens,
                        total_tokens: prompt_tokens,
                    },
                }),
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
            match &mut r.body {
                Body::Chat(c) => {
                    c.id = completion_id(custom_id);
                    c.created = created;
                    model.clone_into(&mut c.model);
                }
                Body::Embedding(e) => model.clone_into(&mut e.model),
                Body::Text(t) => {
                    t.id = text_completion_id(custom_id);
                    t.created = created;
                    model.clone_into(&mut t.model);
                }
                Body::Response(o) => {
                    o.id = response_id(custom_id);
                    o.created_at = created;
                    model.clone_into(&mut o.model);
                    for item in &mut o.output {
                        match item {
                            OutputItem::Message(m) => m.id = message_id(custom_id),
                            OutputItem::Reasoning(r) => r.id = reasoning_id(custom_id),
                        }
                    }
                }
            }
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

/// A chat request's `chat.completion`.
fn chat_completion(c: &Completion, model: &str, created: u64) -> ChatCompletion {
    let choices = c
        .choices
        .iter()
        .enumerate()
        .map(|(index, choice)| ChoiceBody {
            index,
            message: MessageBody {
                role: "assistant".into(),
                content: choice.content.clone(),
                reasoning_content: choice.reasoning.clone(),
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
    ChatCompletion {
        id: completion_id(&c.custom_id),
        object: "chat.completion".into(),
        created,
        model: model.to_owned(),
        choices,
        usage: usage_body(c.usage, thinks(c)),
    }
}

/// Whether the request thought before it answered.
fn thinks(c: &Completion) -> bool {
    c.choices.iter().any(|ch| ch.reasoning.is_some())
}

/// The usage every body but a `response` reports.
fn usage_body(u: Usage, thinks: bool) -> UsageBody {
    UsageBody {
        prompt_tokens: u.prompt_tokens,
        completion_tokens: u.completion_tokens,
        total_tokens: u.prompt_tokens + u.completion_tokens,
        prompt_tokens_details: PromptTokensDetails {
            cached_tokens: u.cached_tokens,
        },
        completion_tokens_details: thinks.then_some(CompletionTokensDetails {
            reasoning_tokens: u.reasoning_tokens,
        }),
    }
}

/// A completions request's `text_completion`.
fn text_completion(c: &Completion, model: &str, created: u64) -> TextCompletion {
    let choices = c
        .choices
        .iter()
        .enumerate()
        .map(|(index, choice)| TextChoice {
            text: choice.content.clone(),
            index,
            logprobs: choice
                .logprobs
                .as_deref()
                .map(|t| legacy_logprobs(t, &choice.content)),
            finish_reason: choice.reason.to_string(),
        })
        .collect();
    TextCompletion {
        id: text_completion_id(&c.custom_id),
        object: "text_completion".into(),
        created,
        model: model.to_owned(),
        choices,
        usage: usage_body(c.usage, false),
    }
}

/// The legacy log probabilities of `tokens`, whose bytes produced `text`.
fn legacy_logprobs(tokens: &[TokenLogprob], text: &str) -> LegacyLogprobs {
    let mut out = LegacyLogprobs {
        tokens: Vec::with_capacity(tokens.len()),
        token_logprobs: Vec::with_capacity(tokens.len()),
        top_logprobs: Vec::with_capacity(tokens.len()),
        text_offset: text_offsets(tokens, text),
    };
    for t in tokens {
        out.tokens.push(t.sampled.token.clone());
        out.token_logprobs.push(f64::from(t.sampled.logprob));
        let mut top = Map::new();
        for alt in &t.top {
            // Most likely first: a text two tokens share keeps the likelier.
            top.entry(alt.token.clone())
                .or_insert_with(|| Value::from(f64::from(alt.logprob)));
        }
        out.top_logprobs.push(top);
    }
    out
}

/// Where each token starts in `text`, in characters: the index of the character that the
/// token's first byte belongs to. One character may span several tokens (a byte-level piece
/// of a multi-byte character is not text by itself): the tokens that continue it point at it
/// too, so the offsets never run ahead of the text. Bytes that are not UTF-8 count as the one
/// U+FFFD that `text` holds for them. No offset exceeds the text's length: tokens past a stop
/// string that was cut from the text point at its end.
fn text_offsets(tokens: &[TokenLogprob], text: &str) -> Vec<u64> {
    let bytes: Vec<u8> = tokens
        .iter()
        .flat_map(|t| t.sampled.bytes.iter().copied())
        .collect();
    // The character each byte belongs to, in the lossy decoding of all of them (the one the
    // text was built with), and one past the last byte.
    let mut char_of = Vec::with_capacity(bytes.len() + 1);
    let mut chars = 0u64;
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            char_of.extend(std::iter::repeat_n(chars, c.len_utf8()));
            chars += 1;
        }
        if !chunk.invalid().is_empty() {
            char_of.extend(std::iter::repeat_n(chars, chunk.invalid().len()));
            chars += 1;
        }
    }
    char_of.push(chars);
    let end = text.chars().count() as u64;
    let mut at = 0;
    tokens
        .iter()
        .map(|t| {
            let offset = char_of[at].min(end);
            at += t.sampled.bytes.len();
            offset
        })
        .collect()
}

/// A Responses request's `response` object: its one choice as an assistant message.
fn response_object(
    c: &Completion,
    echo: &ResponsesEcho,
    model: &str,
    created: u64,
) -> ResponseObject {
    let choice = c.choices.first();
    let cut = choice.is_some_and(|ch| ch.reason == StopReason::Length);
    let status = if cut { "incomplete" } else { "completed" };
    ResponseObject {
        id: response_id(&c.custom_id),
        object: "response".into(),
        created_at: created,
        status: status.into(),
        error: None,
        incomplete_details: cut.then(|| IncompleteDetails {
            reason: "max_output_tokens".into(),
        }),
        instructions: echo.instructions.clone(),
        max_output_tokens: echo.max_output_tokens,
        metadata: echo.metadata.clone(),
        model: model.to_owned(),
        output: choice
            .and_then(|ch| ch.reasoning.clone())
            .map(|text| {
                OutputItem::Reasoning(ReasoningItem {
                    kind: "reasoning".into(),
                    id: reasoning_id(&c.custom_id),
                    summary: Vec::new(),
                    content: vec![ReasoningText {
                        kind: "reasoning_text".into(),
                        text,
                    }],
                })
            })
            .into_iter()
            .chain([OutputItem::Message(OutputMessage {
                kind: "message".into(),
                id: message_id(&c.custom_id),
                status: status.into(),
                role: "assistant".into(),
                content: vec![OutputText {
                    kind: "output_text".into(),
                    text: choice.map(|ch| ch.content.clone()).unwrap_or_default(),
                    annotations: Vec::new(),
                }],
            })])
            .collect(),
        parallel_tool_calls: true,
        temperature: widen(echo.temperature),
        tool_choice: "none".into(),
        tools: Vec::new(),
        top_p: widen(echo.top_p),
        text: echo.text.clone(),
        usage: ResponseUsage {
            input_tokens: c.usage.prompt_tokens,
            input_tokens_details: InputTokensDetails {
                cached_tokens: c.usage.cached_tokens,
                cache_write_tokens: 0,
            },
            output_tokens: c.usage.completion_tokens,
            output_tokens_details: OutputTokensDetails {
                reasoning_tokens: c.usage.reasoning_tokens,
            },
            total_tokens: c.usage.prompt_tokens + c.usage.completion_tokens,
        },
    }
}

/// A setting as the request wrote it: `0.8`, not the `0.800000011920929` its f32 widens to.
fn widen(x: f32) -> f64 {
    x.to_string().parse().unwrap_or(f64::from(x))
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
    pub usage: Option<UsageHead>,
}

/// The counts readers need from a body's usage, under either API's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct UsageHead {
    /// Prompt tokens (`input_tokens` in a `response`).
    #[serde(default, alias = "input_tokens")]
    pub prompt_tokens: u64,
    /// Generated tokens (`output_tokens` in a `response`).
    #[serde(default, alias = "output_tokens")]
    pub completion_tokens: u64,
    /// Of the prompt, the cached part (`input_tokens_details` in a `response`).
    #[serde(default, alias = "input_tokens_details")]
    pub prompt_tokens_details: Option<PromptTokensDetails>,
}

impl UsageHead {
    /// Prompt tokens taken from a shared prefix.
    pub fn cached_tokens(&self) -> u64 {
        self.prompt_tokens_details.map_or(0, |d| d.cached_tokens)
    }
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
    pub fn usage(&self) -> Option<UsageHead> {
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
                    reasoning: None,
                    logprobs: None,
                },
                Choice {
                    content: "yo".into(),
                    reason: StopReason::Stop,
                    reasoning: None,
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
                reasoning_tokens: 0,
                cached_tokens: 7,
            },
            time_to_first_token: 0.1,
            endpoint: Endpoint::Chat,
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

    /// A sampled token of these bytes, its text lossy as the sequence builds it.
    fn piece(bytes: &[u8]) -> TokenLogprob {
        TokenLogprob {
            sampled: TopLogprob {
                token: String::from_utf8_lossy(bytes).into_owned(),
                bytes: bytes.to_vec(),
                logprob: -1.0,
            },
            top: Vec::new(),
        }
    }

    #[test]
    fn text_offsets_count_characters_of_byte_level_pieces() {
        // "A可好😀x中!" with 可 and 😀 split into byte-level pieces, a piece that completes
        // one character and starts the next, and one that starts another.
        let pieces: Vec<&[u8]> = vec![
            b"A",
            b"\xe5",
            b"\x8f",
            b"\xaf",
            "好".as_bytes(),
            b"\xf0\x9f",
            b"\x98\x80x",
            b"\xe4",
            b"\xb8\xad!",
        ];
        let tokens: Vec<TokenLogprob> = pieces.iter().map(|p| piece(p)).collect();
        let all = pieces.concat();
        let text = String::from_utf8(all.clone()).unwrap();
        assert_eq!(text, "A可好😀x中!");
        // Independently: the characters wholly decoded before the token's first byte, which
        // is the index of the character that byte belongs to.
        let mut at = 0;
        let expected: Vec<u64> = pieces
            .iter()
            .map(|p| {
                let before = &all[..at];
                at += p.len();
                let whole = match std::str::from_utf8(before) {
                    Ok(s) => s,
                    Err(e) => std::str::from_utf8(&before[..e.valid_up_to()]).unwrap(),
                };
                whole.chars().count() as u64
            })
            .collect();
        assert_eq!(expected, [0, 1, 1, 1, 2, 3, 3, 5, 5]);
        let lp = legacy_logprobs(&tokens, &text);
        assert_eq!(lp.text_offset, expected);
        let chars: Vec<char> = text.chars().collect();
        assert_eq!(chars[lp.text_offset[1] as usize], '可');
        assert_eq!(chars[lp.text_offset[8] as usize], '中');

        // A stop string cut from the text: the tokens that made it point at the text's end.
        let lp = legacy_logprobs(&tokens, "A可");
        assert_eq!(lp.text_offset, [0, 1, 1, 1, 2, 2, 2, 2, 2]);
        // Bytes that never become UTF-8 are one U+FFFD each run, as in the text.
        let bad = [piece(b"a\xff"), piece(b"\xfeb"), piece(b"c")];
        let lp = legacy_logprobs(&bad, "a\u{fffd}\u{fffd}bc");
        assert_eq!(lp.text_offset, [0, 2, 4]);
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
                reasoning: None,
                logprobs: Some(vec![TokenLogprob {
                    sampled: logprob(-0.1),
                    top: vec![logprob(-0.1), logprob(-1.234_567_9e-7), logprob(-23.5)],
                }]),
            }],
            usage: Usage {
                prompt_tokens: 40,
                completion_tokens: 2,
                reasoning_tokens: 0,
                cached_tokens: 31,
            },
            time_to_first_token: 0.5,
            endpoint: Endpoint::Chat,
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
    fn a_responses_request_gets_a_response_object_and_reissues_exactly() {
        let completion = |id: &str, reason| Completion {
            line: 2,
            custom_id: id.into(),
            choices: vec![Choice {
                content: "ok".into(),
                reason,
                reasoning: None,
                logprobs: None,
            }],
            usage: Usage {
                prompt_tokens: 20,
                completion_tokens: 5,
                reasoning_tokens: 0,
                cached_tokens: 12,
            },
            time_to_first_token: 0.0,
            endpoint: Endpoint::Responses(Box::new(ResponsesEcho {
                instructions: Some("grade".into()),
                max_output_tokens: Some(5),
                temperature: 0.8,
                top_p: 1.0,
                text: serde_json::json!({"format": {"type": "text"}}),
                metadata: None,
            })),
        };
        let v = serde_json::to_value(ResultLine::success(
            &completion("a", StopReason::Length),
            "m",
            7,
        ))
        .unwrap();
        let body = &v["response"]["body"];
        assert_eq!(body["object"], "response");
        assert_eq!(body["status"], "incomplete");
        assert_eq!(body["incomplete_details"]["reason"], "max_output_tokens");
        assert_eq!(body["output"][0]["status"], "incomplete");
        assert_eq!(body["output"][0]["content"][0]["text"], "ok");
        assert_eq!(
            body["temperature"], 0.8,
            "the setting as written, not its f32"
        );
        assert_eq!(body["usage"]["input_tokens_details"]["cached_tokens"], 12);
        assert_eq!(body["usage"]["total_tokens"], 25);
        let done = ResultLine::success(&completion("a", StopReason::Stop), "m", 7);
        let v = serde_json::to_value(&done).unwrap();
        assert_eq!(v["response"]["body"]["status"], "completed");
        assert_eq!(v["response"]["body"]["incomplete_details"], Value::Null);

        let text = serde_json::to_string(&done).unwrap();
        let copy = serde_json::from_str::<ResultLine>(&text)
            .unwrap()
            .reissue("b", "n", 9);
        let fresh = ResultLine::success(&completion("b", StopReason::Stop), "n", 9);
        assert_eq!(
            serde_json::to_string(&copy).unwrap(),
            serde_json::to_string(&fresh).unwrap()
        );
        let head = LineHead::parse(text.as_bytes()).unwrap().usage().unwrap();
        assert_eq!(
            (
                head.prompt_tokens,
                head.completion_tokens,
                head.cached_tokens()
            ),
            (20, 5, 12)
        );
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
