//! The OpenAI Batch input line and a line-numbered JSONL reader.
//!
//! A line is either the full batch form (`custom_id`, `method`, `url`, `body`) or the short form
//! (`custom_id`, `messages` and the sampling fields at the top level). Parsing never panics:
//! every fault becomes a [`LineError`] that names the line, the field and what to do, so one bad
//! line yields one error line and the batch goes on.

use std::io::BufRead;

use serde_json::{Map, Value};

use crate::digest::hash64;
use crate::formats::line_error::{ErrorCode, LineError};
use crate::formats::message::Message;
use crate::formats::result::Endpoint;
use crate::formats::shard::Shard;
use crate::input::embeddings::EmbedInput;
use crate::input::fields::{
    check_body, check_object, Fault, FieldPolicy, Honoured, CHAT, COMPLETIONS, EMBEDDINGS,
    ENVELOPE, MESSAGE, RESPONSES,
};
use crate::input::reasoning::{self, ReasoningAsk};
use crate::input::sampling::{parse_sampling, SamplingParams};
use crate::input::{completions, embeddings, responses};

/// The Chat Completions endpoint, and the one a short-form line targets.
pub const CHAT_COMPLETIONS_URL: &str = "/v1/chat/completions";

/// The Responses endpoint.
pub const RESPONSES_URL: &str = "/v1/responses";

/// The (legacy) Completions endpoint: raw text, no chat template.
pub const COMPLETIONS_URL: &str = "/v1/completions";

/// The Embeddings endpoint.
pub const EMBEDDINGS_URL: &str = "/v1/embeddings";

/// The endpoints a batch line may target.
const URLS: [&str; 4] = [
    CHAT_COMPLETIONS_URL,
    RESPONSES_URL,
    COMPLETIONS_URL,
    EMBEDDINGS_URL,
];

/// Roles a chat message may carry.
const ROLES: [&str; 4] = ["system", "developer", "user", "assistant"];

/// What a request asks the model to continue.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    /// A conversation of at least one message, rendered through the chat template.
    Chat(Vec<Message>),
    /// Raw text (`/v1/completions`), tokenized as it is.
    Text(String),
    /// Inputs to embed (`/v1/embeddings`), not to continue.
    Embed(Vec<EmbedInput>),
}

impl Prompt {
    /// The conversation's messages; none for raw text.
    pub fn messages(&self) -> &[Message] {
        match self {
            Self::Chat(m) => m,
            Self::Text(_) | Self::Embed(_) => &[],
        }
    }
}

/// A valid request from one input line.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// 1-based line number in the input file.
    pub line: u64,
    /// The caller's identifier, unique within the file.
    pub custom_id: String,
    /// What the model continues.
    pub prompt: Prompt,
    /// Sampling settings given by the request.
    pub sampling: SamplingParams,
    /// Unknown fields skipped under `--ignore-unknown-fields`, by path.
    pub ignored_fields: Vec<String>,
    /// The endpoint it came through.
    pub endpoint: Endpoint,
    /// What it asks of a reasoning model.
    pub reasoning: ReasoningAsk,
}

/// Parses one non-blank input line.
///
/// # Errors
/// A [`LineError`] naming the field at fault. Duplicate ids are the reader's concern, not this.
pub fn parse_line(line_no: u64, text: &str, policy: FieldPolicy) -> Result<Request, LineError> {
    let obj =
        parse_object(text).map_err(|m| LineError::new(line_no, None, ErrorCode::InvalidJson, m))?;
    let custom_id = read_custom_id(&obj)
        .map_err(|m| LineError::new(line_no, None, ErrorCode::MissingCustomId, m))?;
    let fail = |(code, message): (ErrorCode, String)| {
        LineError::new(line_no, Some(&custom_id), code, message)
    };
    let mut ignored_fields = Vec::new();
    let mut ignore = |f: &str| ignored_fields.push(f.to_owned());
    let (body, url) = request_body(obj, policy, &mut ignore).map_err(fail)?;
    let fields = match url {
        RESPONSES_URL => &RESPONSES,
        COMPLETIONS_URL => &COMPLETIONS,
        EMBEDDINGS_URL => &EMBEDDINGS,
        _ => &CHAT,
    };
    // From here on only the endpoint's honoured fields exist: one that was skipped as unknown
    // or accepted as free of effect cannot be read.
    let honoured = check_body(body, fields, policy, &mut ignore).map_err(|r| fail(r.fault()))?;
    let body = &honoured;
    check_stream(body).map_err(fail)?;
    let reasoning = match url {
        RESPONSES_URL => reasoning::parse_responses(body).map_err(fail)?,
        COMPLETIONS_URL | EMBEDDINGS_URL => ReasoningAsk::default(),
        _ => reasoning::parse_chat(body).map_err(fail)?,
    };
    let (prompt, sampling, endpoint) = match url {
        RESPONSES_URL => {
            let r = responses::parse(body, policy, &mut ignore).map_err(fail)?;
            let echo = Endpoint::Responses(Box::new(r.echo));
            (Prompt::Chat(r.messages), r.sampling, echo)
        }
        COMPLETIONS_URL => {
            let r = completions::parse(body).map_err(fail)?;
            (Prompt::Text(r.prompt), r.sampling, Endpoint::Completions)
        }
        EMBEDDINGS_URL => {
            let r = embeddings::parse(body).map_err(fail)?;
            let endpoint = Endpoint::Embeddings { base64: r.base64 };
            (Prompt::Embed(r.inputs), SamplingParams::default(), endpoint)
        }
        _ => {
            let messages = parse_messages(body).map_err(fail)?;
            check_message_fields(body, policy, &mut ignore).map_err(fail)?;
            let sampling = parse_sampling(body)
                .map_err(|message| fail((ErrorCode::InvalidParameter, message)))?;
            (Prompt::Chat(messages), sampling, Endpoint::Chat)
        }
    };
    Ok(Request {
        line: line_no,
        custom_id,
        prompt,
        sampling,
        ignored_fields,
        endpoint,
        reasoning,
    })
}

fn parse_object(text: &str) -> Result<Map<String, Value>, String> {
    match serde_json::from_str(text) {
        Ok(Value::Object(obj)) => Ok(obj),
        Ok(_) => Err("expected a JSON object per line".into()),
        Err(e) => Err(format!(
            "not valid JSON ({e}); each line must hold one JSON object"
        )),
    }
}

fn read_custom_id(obj: &Map<String, Value>) -> Result<String, String> {
    match obj.get("custom_id") {
        Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        Some(Value::String(_)) => {
            Err("field `custom_id` is empty; give each request a unique non-empty id".into())
        }
        Some(_) => Err("field `custom_id` must be a string".into()),
        None => Err("field `custom_id` is missing; give each request a unique id".into()),
    }
}

/// The request's fields and endpoint: under `body` in the full batch form (whose envelope is
/// checked here), the line itself less its `custom_id` in the short form, which is a chat
/// request.
fn request_body(
    mut obj: Map<String, Value>,
    policy: FieldPolicy,
    ignore: &mut impl FnMut(&str),
) -> Result<(Map<String, Value>, &'static str), Fault> {
    if !(obj.contains_key("body") || obj.contains_key("url") || obj.contains_key("method")) {
        obj.shift_remove("custom_id");
        return Ok((obj, CHAT_COMPLETIONS_URL));
    }
    if let Some(method) = obj.get("method") {
        if method.as_str() != Some("POST") {
            return Err((
                ErrorCode::InvalidUrl,
                format!("field `method` is {method}; only \"POST\" is supported"),
            ));
        }
    }
    let supported = URLS.map(|u| format!("\"{u}\"")).join(", ");
    let url = match obj.get("url") {
        Some(Value::String(u)) => URLS.into_iter().find(|known| known == u).ok_or_else(|| {
            (
                ErrorCode::InvalidUrl,
                format!("field `url` is {u:?}; supported: {supported}"),
            )
        })?,
        Some(u) => {
            return Err((
                ErrorCode::InvalidUrl,
                format!("field `url` is {u}; supported: {supported}"),
            ))
        }
        None => {
            return Err((
                ErrorCode::InvalidUrl,
                format!("field `url` is missing; set it to one of {supported}"),
            ))
        }
    };
    check_object(&obj, &ENVELOPE, None, policy, ignore).map_err(|r| r.fault())?;
    match obj.shift_remove("body") {
        Some(Value::Object(b)) => Ok((b, url)),
        _ => Err((
            ErrorCode::InvalidMessages,
            "field `body` must be an object holding the request".into(),
        )),
    }
}

fn check_stream(body: &Honoured) -> Result<(), Fault> {
    match body.get("stream") {
        None | Some(Value::Null | Value::Bool(false)) => Ok(()),
        Some(Value::Bool(true)) => Err((
            ErrorCode::StreamUnsupported,
            "field `stream` is true; batch requests cannot stream, remove it".into(),
        )),
        Some(v) => Err((
            ErrorCode::InvalidParameter,
            format!("field `stream` is {v}; expected false (or leave it out)"),
        )),
    }
}

/// Refuses message fields the tool does not honour; under `--ignore-unknown-fields` unknown
/// ones go to `ignore` instead.
fn check_message_fields(
    body: &Honoured,
    policy: FieldPolicy,
    ignore: &mut impl FnMut(&str),
) -> Result<(), Fault> {
    if let Some(Value::Array(list)) = body.get("messages") {
        for (i, m) in list.iter().enumerate() {
            if let Value::Object(m) = m {
                let path = format!("messages[{i}]");
                check_object(m, &MESSAGE, Some(&path), policy, &mut *ignore)
                    .map_err(|r| r.fault())?;
            }
        }
    }
    Ok(())
}

fn parse_messages(body: &Honoured) -> Result<Vec<Message>, (ErrorCode, String)> {
    let list = match body.get("messages") {
        Some(Value::Array(list)) if !list.is_empty() => list,
        Some(Value::Array(_)) => {
            return Err((
                ErrorCode::InvalidMessages,
                "field `messages` is empty; give at least one message".into(),
            ))
        }
        Some(_) => {
            return Err((
                ErrorCode::InvalidMessages,
                "field `messages` must be an array of {role, content} objects".into(),
            ))
        }
        None => {
            return Err((
                ErrorCode::InvalidMessages,
                "field `messages` is missing".into(),
            ))
        }
    };
    let mut messages = Vec::with_capacity(list.len());
    for (i, item) in list.iter().enumerate() {
        let Value::Object(m) = item else {
            return Err((
                ErrorCode::InvalidMessages,
                format!("`messages[{i}]` must be an object with `role` and `content`"),
            ));
        };
        let role = match m.get("role") {
            Some(Value::String(r)) if ROLES.contains(&r.as_str()) => {
                if r == "developer" {
                    "system".to_owned()
                } else {
                    r.clone()
                }
            }
            Some(r) => {
                return Err((
                    ErrorCode::InvalidRole,
                    format!("`messages[{i}].role` is {r}; use one of system, user, assistant"),
                ))
            }
            None => {
                return Err((
                    ErrorCode::InvalidRole,
                    format!("`messages[{i}].role` is missing"),
                ))
            }
        };
        let content = match m.get("content") {
            Some(Value::String(c)) => c.clone(),
            Some(Value::Array(parts)) => text_parts(parts).ok_or_else(|| {
                (
                    ErrorCode::InvalidContent,
                    format!(
                        "`messages[{i}].content` must be a string or a list of {{\"type\":\"text\"}} parts"
                    ),
                )
            })?,
            _ => {
                return Err((
                    ErrorCode::InvalidContent,
                    format!("`messages[{i}].content` must be a string"),
                ))
            }
        };
        if content.contains('\0') {
            return Err((
                ErrorCode::InvalidContent,
                format!("`messages[{i}].content` contains a NUL character"),
            ));
        }
        messages.push(Message { role, content });
    }
    Ok(messages)
}

/// Joins OpenAI content parts when all of them are text.
fn text_parts(parts: &[Value]) -> Option<String> {
    let mut out = String::new();
    for p in parts {
        if p.get("type")?.as_str()? != "text" {
            return None;
        }
        out.push_str(p.get("text")?.as_str()?);
    }
    Some(out)
}

/// One item read from the input: a request, or the error its line gets.
pub type Item = Result<Request, LineError>;

/// Streams requests from JSONL input, one line at a time, with 1-based line numbers.
///
/// Blank lines are skipped. Duplicate `custom_id`s are detected with a set of 64-bit hashes,
/// so memory stays small on a million-line file.
pub struct RequestReader<R> {
    input: R,
    line_no: u64,
    buf: Vec<u8>,
    seen: std::collections::HashSet<u64>,
    policy: FieldPolicy,
    /// Only the lines of this shard are read; the others are skipped.
    shard: Option<Shard>,
    /// Unknown fields already logged as skipped, so each is logged once; `None` logs nothing.
    warned: Option<std::collections::BTreeSet<String>>,
}

impl<R: BufRead> RequestReader<R> {
    /// Wraps a buffered input; `policy` says what unknown fields get.
    pub fn new(input: R, policy: FieldPolicy) -> Self {
        Self {
            policy,
            warned: None,
            shard: None,
            input,
            line_no: 0,
            buf: Vec::new(),
            seen: std::collections::HashSet::new(),
        }
    }

    /// Reads only the requests of `shard` (all when `None`).
    #[must_use]
    pub fn shard(mut self, shard: Option<Shard>) -> Self {
        self.shard = shard;
        self
    }

    /// Logs each unknown field skipped under `--ignore-unknown-fields`, once.
    #[must_use]
    pub fn log_ignored_fields(mut self) -> Self {
        self.warned = Some(std::collections::BTreeSet::new());
        self
    }

    fn log_ignored(&mut self, line: u64, fields: &[String]) {
        let Some(warned) = self.warned.as_mut() else {
            return;
        };
        for f in fields {
            // Paths hold message indexes; the set is bounded by what a typo can produce.
            if warned.len() < 64 && warned.insert(f.clone()) {
                tracing::warn!(
                    "ignoring unknown field `{f}` (first on line {line}): --ignore-unknown-fields"
                );
            }
        }
    }
}

impl<R: BufRead> Iterator for RequestReader<R> {
    type Item = std::io::Result<Item>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            self.buf.clear();
            self.line_no += 1;
            match self.input.read_until(b'\n', &mut self.buf) {
                Ok(0) => return None,
                Ok(_) => {}
                Err(e) => return Some(Err(e)),
            }
            // A line that is not UTF-8 is the line's fault, not the run's.
            let Ok(text) = std::str::from_utf8(&self.buf) else {
                if self.shard.is_some_and(|s| !s.holds(&self.buf)) {
                    continue;
                }
                return Some(Ok(Err(LineError::new(
                    self.line_no,
                    None,
                    ErrorCode::InvalidJson,
                    "line is not valid UTF-8".into(),
                ))));
            };
            let text = text.trim();
            if text.is_empty() {
                continue;
            }
            let parsed = parse_line(self.line_no, text, self.policy);
            if let Some(shard) = self.shard {
                // The id decides; a line without a readable one goes by its bytes.
                let key = match &parsed {
                    Ok(r) => r.custom_id.as_bytes(),
                    Err(e) => e.custom_id.as_deref().unwrap_or(text).as_bytes(),
                };
                if !shard.holds(key) {
                    continue;
                }
            }
            let item = parsed.and_then(|req| {
                if self.seen.insert(hash64(&req.custom_id)) {
                    Ok(req)
                } else {
                    Err(LineError::new(
                        req.line,
                        Some(&req.custom_id),
                        ErrorCode::DuplicateCustomId,
                        format!(
                            "`custom_id` {:?} was used by an earlier line; ids must be unique",
                            req.custom_id
                        ),
                    ))
                }
            });
            if let Ok(req) = &item {
                let (line, fields) = (req.line, req.ignored_fields.clone());
                self.log_ignored(line, &fields);
            }
            return Some(Ok(item));
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::input::sampling::ConstraintSpec;

    fn code(text: &str) -> ErrorCode {
        parse_line(7, text, FieldPolicy::default())
            .unwrap_err()
            .code
    }

    #[test]
    fn full_batch_form_parses() {
        let r = parse_line(
            3,
            r#"{"custom_id":"a","method":"POST","url":"/v1/chat/completions","body":{"model":"m","messages":[{"role":"system","content":"S"},{"role":"user","content":"U"}],"max_tokens":5,"temperature":0,"stop":"\n"}}"#,
            FieldPolicy::default(),
        )
        .unwrap();
        assert_eq!(r.line, 3);
        assert_eq!(r.custom_id, "a");
        assert_eq!(r.prompt.messages().len(), 2);
        assert_eq!(r.prompt.messages()[1].content, "U");
        assert_eq!(r.sampling.max_tokens, Some(5));
        assert_eq!(r.sampling.temperature, Some(0.0));
        assert_eq!(r.sampling.stop, vec!["\n".to_owned()]);
    }

    #[test]
    fn short_form_and_max_completion_tokens() {
        let r = parse_line(
            1,
            r#"{"custom_id":"b","messages":[{"role":"developer","content":[{"type":"text","text":"x"},{"type":"text","text":"y"}]}],"max_completion_tokens":9,"max_tokens":3,"seed":42}"#,
            FieldPolicy::default(),
        )
        .unwrap();
        assert_eq!(r.prompt.messages()[0].role, "system");
        assert_eq!(r.prompt.messages()[0].content, "xy");
        assert_eq!(r.sampling.max_tokens, Some(9));
        assert_eq!(r.sampling.seed, Some(42));
    }

    #[test]
    fn each_fault_gets_its_code() {
        assert_eq!(code("{not json"), ErrorCode::InvalidJson);
        assert_eq!(code("[1,2]"), ErrorCode::InvalidJson);
        assert_eq!(code(r#"{"messages":[]}"#), ErrorCode::MissingCustomId);
        assert_eq!(code(r#"{"custom_id":5}"#), ErrorCode::MissingCustomId);
        assert_eq!(
            code(r#"{"custom_id":"a","url":"/v1/moderations","body":{}}"#),
            ErrorCode::InvalidUrl
        );
        assert_eq!(
            code(r#"{"custom_id":"a","method":"GET","url":"/v1/chat/completions","body":{}}"#),
            ErrorCode::InvalidUrl
        );
        assert_eq!(
            code(r#"{"custom_id":"a","stream":true,"messages":[{"role":"user","content":"x"}]}"#),
            ErrorCode::StreamUnsupported
        );
        assert_eq!(
            code(r#"{"custom_id":"a","messages":[]}"#),
            ErrorCode::InvalidMessages
        );
        assert_eq!(
            code(r#"{"custom_id":"a","messages":"hi"}"#),
            ErrorCode::InvalidMessages
        );
        assert_eq!(
            code(r#"{"custom_id":"a","messages":[{"role":"robot","content":"x"}]}"#),
            ErrorCode::InvalidRole
        );
        assert_eq!(
            code(r#"{"custom_id":"a","messages":[{"role":"user","content":7}]}"#),
            ErrorCode::InvalidContent
        );
        assert_eq!(
            code(
                r#"{"custom_id":"a","messages":[{"role":"user","content":"x"}],"temperature":"hot"}"#
            ),
            ErrorCode::InvalidParameter
        );
        assert_eq!(
            code(r#"{"custom_id":"a","messages":[{"role":"user","content":"x"}],"max_tokens":0}"#),
            ErrorCode::InvalidParameter
        );
    }

    #[test]
    fn unhonoured_fields_are_refused_by_name() {
        let base = r#""custom_id":"a","messages":[{"role":"user","content":"x"}]"#;
        let err = |extra: &str| {
            parse_line(4, &format!("{{{base},{extra}}}"), FieldPolicy::default()).unwrap_err()
        };
        for (extra, field) in [
            (r#""n":0"#, "`n`"),
            (r#""n":33"#, "`n`"),
            (r#""logprobs":"yes""#, "`logprobs`"),
            (r#""top_logprobs":3"#, "`top_logprobs`"),
            (r#""logprobs":true,"top_logprobs":21"#, "`top_logprobs`"),
            (
                r#""response_format":{"type":"xml"}"#,
                "`response_format.type`",
            ),
            (
                r#""response_format":{"type":"json_schema","json_schema":{"name":"x"}}"#,
                "`response_format.json_schema.schema`",
            ),
            (
                r#""response_format":{"type":"json_object"},"grammar":"root ::= \"a\"""#,
                "grammar",
            ),
            (r#""tools":[{"type":"function"}]"#, "`tools`"),
            (r#""stream":"True""#, "`stream`"),
            (r#""temprature":0"#, "`temprature`"),
        ] {
            let e = err(extra);
            assert_eq!(e.code, ErrorCode::InvalidParameter, "{extra}");
            assert!(e.message.contains(field), "{extra}: {}", e.message);
        }
        let full = |body: &str, top: &str| {
            format!(
                r#"{{"custom_id":"a","method":"POST","url":"/v1/chat/completions","body":{{"messages":[{{"role":"user","content":"x"{body}}}]}}{top}}}"#
            )
        };
        let e = parse_line(1, &full(r#","name":"bob""#, ""), FieldPolicy::default()).unwrap_err();
        assert!(e.message.contains("messages[0].name"), "{}", e.message);
        let e = parse_line(1, &full("", r#","extra":1"#), FieldPolicy::default()).unwrap_err();
        assert!(e.message.contains("`extra`"), "{}", e.message);
        // Accepted: no-effect fields, defaults, and unknown fields when told to skip them.
        let ok = format!(
            r#"{{{base},"model":"m","user":"u","metadata":{{}},"store":false,"n":1,"logprobs":false,"stream":false,"presence_penalty":0.5}}"#
        );
        let r = parse_line(1, &ok, FieldPolicy::default()).unwrap();
        assert_eq!(r.sampling.presence_penalty, Some(0.5));
        assert_eq!((r.sampling.n, r.sampling.logprobs), (1, None));
        let graded = format!(
            r#"{{{base},"n":4,"logprobs":true,"top_logprobs":5,"response_format":{{"type":"json_object"}}}}"#
        );
        let r = parse_line(1, &graded, FieldPolicy::default()).unwrap();
        assert_eq!((r.sampling.n, r.sampling.logprobs), (4, Some(5)));
        assert!(matches!(
            r.sampling.constraint,
            Some(ConstraintSpec::JsonSchema {
                field: "response_format",
                ..
            })
        ));
        let r = parse_line(
            1,
            &format!(r#"{{{base},"grammar":"root ::= \"a\""}}"#),
            FieldPolicy::default(),
        )
        .unwrap();
        assert_eq!(
            r.sampling.constraint,
            Some(ConstraintSpec::Gbnf("root ::= \"a\"".into()))
        );
        let lax = FieldPolicy {
            ignore_unknown: true,
        };
        let r = parse_line(1, &format!(r#"{{{base},"temprature":0}}"#), lax).unwrap();
        assert_eq!(r.ignored_fields, ["temprature"]);
        assert!(parse_line(1, &format!(r#"{{{base},"tools":[1]}}"#), lax).is_err());
    }

    /// A value for `field` that asks for something on an endpoint that honours it.
    fn asking(field: &str) -> Value {
        match field {
            "messages" => json!([{"role": "user", "content": "other"}]),
            "prompt" | "input" => json!("other"),
            "instructions" => json!("Be terse."),
            "max_tokens" | "max_completion_tokens" | "max_output_tokens" | "top_logprobs" => {
                json!(3)
            }
            "temperature" | "top_p" | "frequency_penalty" | "presence_penalty" => json!(0.5),
            "min_p" => json!(0.1),
            "top_k" | "seed" | "n" | "best_of" => json!(2),
            "stop" => json!(["x"]),
            "logprobs" | "stream" | "echo" => json!(true),
            "suffix" => json!("end"),
            "response_format" => json!({"type": "json_object"}),
            "text" => json!({"format": {"type": "json_object"}}),
            "json_schema" => json!({"type": "object"}),
            "grammar" => json!("root ::= \"a\""),
            "encoding_format" => json!("base64"),
            "metadata" => json!({"k": "v"}),
            _ => json!([{"type": "function"}]),
        }
    }

    #[test]
    fn an_ignored_unknown_field_changes_nothing_on_any_endpoint() {
        let lax = FieldPolicy {
            ignore_unknown: true,
        };
        let mut all: Vec<&str> = [&CHAT, &COMPLETIONS, &RESPONSES, &EMBEDDINGS]
            .iter()
            .flat_map(|f| f.names())
            .collect();
        all.sort_unstable();
        all.dedup();
        let mut skipped = Vec::new();
        for (url, fields, base) in [
            (
                CHAT_COMPLETIONS_URL,
                &CHAT,
                json!({"messages": [{"role": "user", "content": "hi"}]}),
            ),
            (COMPLETIONS_URL, &COMPLETIONS, json!({"prompt": "hi"})),
            (RESPONSES_URL, &RESPONSES, json!({"input": "hi"})),
            (EMBEDDINGS_URL, &EMBEDDINGS, json!({"input": "hi"})),
        ] {
            let line = |body: &Value| {
                json!({"custom_id": "a", "method": "POST", "url": url, "body": body}).to_string()
            };
            let expected = parse_line(1, &line(&base), FieldPolicy::default()).unwrap();
            let with = |field: &str| {
                let mut body = base.clone();
                body[field] = asking(field);
                line(&body)
            };
            for &field in &all {
                let strict = parse_line(1, &with(field), FieldPolicy::default());
                if fields.honoured.contains(&field) {
                    // The value asks for something, so the test would see it read.
                    assert_ne!(strict.as_ref().ok(), Some(&expected), "{url}: {field}");
                    continue;
                }
                let unknown = format!("unknown field `{field}`");
                if fields.names().any(|f| f == field)
                    || !strict.as_ref().is_err_and(|e| e.message.contains(&unknown))
                {
                    // Known there, or refused by name as not honoured.
                    continue;
                }
                let got = parse_line(1, &with(field), lax)
                    .unwrap_or_else(|e| panic!("{url}: {field}: {}", e.message));
                assert_eq!(got.ignored_fields, [field], "{url}");
                let got = Request {
                    ignored_fields: Vec::new(),
                    ..got
                };
                assert_eq!(got, expected, "{url}: `{field}` was skipped, and then read");
                skipped.push(format!("{url} {field}"));
            }
        }
        // What each endpoint knows and the others do not is skipped, when unknown, elsewhere.
        for case in [
            "/v1/completions grammar",
            "/v1/completions max_completion_tokens",
            "/v1/completions top_logprobs",
            "/v1/completions response_format",
            "/v1/completions json_schema",
            "/v1/completions messages",
            "/v1/completions input",
            "/v1/chat/completions prompt",
            "/v1/chat/completions input",
            "/v1/chat/completions max_output_tokens",
            "/v1/responses messages",
            "/v1/responses grammar",
            "/v1/responses max_tokens",
            "/v1/embeddings messages",
            "/v1/embeddings prompt",
            "/v1/embeddings temperature",
            "/v1/embeddings max_tokens",
        ] {
            assert!(skipped.iter().any(|s| s == case), "{case} not tried");
        }
    }

    #[test]
    fn ignored_message_and_item_fields_change_nothing() {
        let lax = FieldPolicy {
            ignore_unknown: true,
        };
        for (plain, extra, field) in [
            (
                r#"{"custom_id":"a","messages":[{"role":"user","content":"x"}]}"#,
                r#"{"custom_id":"a","messages":[{"role":"user","content":"x","mood":"glad"}]}"#,
                "messages[0].mood",
            ),
            (
                r#"{"custom_id":"a","url":"/v1/responses","body":{"input":[{"role":"user","content":"x"}]}}"#,
                r#"{"custom_id":"a","url":"/v1/responses","body":{"input":[{"role":"user","content":"x","mood":"glad"}]}}"#,
                "input[0].mood",
            ),
        ] {
            let expected = parse_line(1, plain, FieldPolicy::default()).unwrap();
            let got = parse_line(1, extra, lax).unwrap();
            assert_eq!(got.ignored_fields, [field]);
            let got = Request {
                ignored_fields: Vec::new(),
                ..got
            };
            assert_eq!(got, expected);
        }
    }

    #[test]
    fn errors_name_line_id_and_field() {
        let e = parse_line(
            12,
            r#"{"custom_id":"c9","messages":[{"role":"user","content":null}]}"#,
            FieldPolicy::default(),
        )
        .unwrap_err();
        assert_eq!(e.line, 12);
        assert_eq!(e.custom_id.as_deref(), Some("c9"));
        assert!(e.message.contains("messages[0].content"), "{}", e.message);
    }

    #[test]
    fn reader_numbers_lines_skips_blanks_and_flags_duplicates() {
        let input = concat!(
            r#"{"custom_id":"a","messages":[{"role":"user","content":"x"}]}"#,
            "\n\n   \n",
            r#"{"custom_id":"b","messages":[{"role":"user","content":"y"}]}"#,
            "\n",
            r#"{"custom_id":"a","messages":[{"role":"user","content":"z"}]}"#,
            "\n",
        );
        let items: Vec<Item> = RequestReader::new(input.as_bytes(), FieldPolicy::default())
            .map(Result::unwrap)
            .collect();
        assert_eq!(items.len(), 3);
        assert_eq!(items[0].as_ref().unwrap().line, 1);
        assert_eq!(items[1].as_ref().unwrap().line, 4);
        let dup = items[2].as_ref().unwrap_err();
        assert_eq!((dup.line, dup.code), (5, ErrorCode::DuplicateCustomId));
    }

    #[test]
    fn reader_survives_invalid_utf8() {
        let mut input = b"\xff\xfe garbage\n".to_vec();
        input.extend_from_slice(br#"{"custom_id":"a","messages":[{"role":"user","content":"x"}]}"#);
        let items: Vec<Item> = RequestReader::new(&input[..], FieldPolicy::default())
            .map(Result::unwrap)
            .collect();
        assert_eq!(items.len(), 2);
        assert_eq!(items[0].as_ref().unwrap_err().code, ErrorCode::InvalidJson);
        assert_eq!(items[1].as_ref().unwrap().line, 2);
    }
}
