//! Which request fields infer-batch honours, which it accepts because they change nothing about
//! the output, and which it refuses. A field is never silently ignored: a user who asked for two
//! samples or JSON output must not silently get something else.
//!
//! Fields the sampling code reads (`max_tokens`, `temperature`, `stop`, ...) are checked there;
//! this module decides everything else, and what to say when a field is refused.

use serde_json::{Map, Value};

use crate::formats::line_error::ErrorCode;

/// A fault of one line: its code and what to do.
pub type Fault = (ErrorCode, String);

/// How strictly unknown fields are treated.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FieldPolicy {
    /// Skip fields this version does not know instead of refusing the request.
    pub ignore_unknown: bool,
}

/// The body fields of one endpoint: which are honoured, which change nothing, which are known
/// but refused when they ask for something.
pub struct BodyFields {
    /// Read and honoured by the parser.
    pub honoured: &'static [&'static str],
    /// Accepted with any value because they change nothing about the output.
    no_effect: &'static [&'static str],
    /// Why a known field's value cannot be honoured; `None` when it asks for nothing.
    unsupported: fn(&str, &Value) -> Option<&'static str>,
    /// Known fields besides the honoured and no-effect ones.
    known: &'static [&'static str],
}

impl BodyFields {
    /// Every field the endpoint knows: honoured, free of effect, or known but not honoured.
    pub fn names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.honoured
            .iter()
            .chain(self.no_effect)
            .chain(self.known)
            .copied()
    }
}

/// `/v1/chat/completions`.
pub const CHAT: BodyFields = BodyFields {
    honoured: &HONOURED,
    no_effect: &NO_EFFECT,
    unsupported: chat_unsupported,
    known: &[
        "tools",
        "functions",
        "tool_choice",
        "function_call",
        "parallel_tool_calls",
        "logit_bias",
        "modalities",
    ],
};

/// `/v1/responses`.
pub const RESPONSES: BodyFields = BodyFields {
    honoured: &[
        "input",
        "instructions",
        "max_output_tokens",
        "temperature",
        "top_p",
        "text",
        "stream",
        "metadata",
        "reasoning",
        "chat_template_kwargs",
    ],
    no_effect: &[
        "model",
        "user",
        "store",
        "service_tier",
        "safety_identifier",
        "prompt_cache_key",
        "prompt_cache_retention",
        "parallel_tool_calls",
        "max_tool_calls",
    ],
    unsupported: responses_unsupported,
    known: &[
        "tools",
        "tool_choice",
        "previous_response_id",
        "conversation",
        "background",
        "prompt",
        "include",
        "truncation",
        "top_logprobs",
        "stream_options",
    ],
};

/// `/v1/completions`.
pub const COMPLETIONS: BodyFields = BodyFields {
    honoured: &[
        "prompt",
        "max_tokens",
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "seed",
        "stop",
        "n",
        "frequency_penalty",
        "presence_penalty",
        "logprobs",
        "stream",
        "echo",
        "suffix",
        "best_of",
    ],
    no_effect: &["model", "user"],
    unsupported: completions_unsupported,
    known: &["logit_bias", "stream_options"],
};

/// `/v1/embeddings`.
pub const EMBEDDINGS: BodyFields = BodyFields {
    honoured: &["input", "encoding_format", "stream"],
    no_effect: &["model", "user"],
    unsupported: embeddings_unsupported,
    known: &["dimensions"],
};

/// Body fields that the chat request parser reads and honours.
const HONOURED: [&str; 20] = [
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "stop",
    "frequency_penalty",
    "presence_penalty",
    "stream",
    "n",
    "logprobs",
    "top_logprobs",
    "response_format",
    "json_schema",
    "grammar",
    "reasoning_effort",
    "chat_template_kwargs",
];

/// Body fields accepted with any value because they change nothing about the output.
const NO_EFFECT: [&str; 7] = [
    "model",
    "user",
    "metadata",
    "store",
    "service_tier",
    "safety_identifier",
    "prompt_cache_key",
];

/// Top-level fields of the full batch form.
pub const ENVELOPE: [&str; 4] = ["custom_id", "method", "url", "body"];

/// Fields of a chat message that are read.
pub const MESSAGE: [&str; 2] = ["role", "content"];

/// Why a field of a request is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// A known field, with a value this version cannot honour: what to do instead.
    Unsupported {
        /// The field's path, such as `logprobs` or `messages[1].name`.
        field: String,
        /// Why, and what to do.
        reason: String,
    },
    /// A field this version does not know.
    Unknown {
        /// The field's path.
        field: String,
    },
}

impl Refusal {
    /// The line's fault: an invalid parameter, with what to do.
    pub fn fault(&self) -> Fault {
        (ErrorCode::InvalidParameter, self.to_string())
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unsupported { field, reason } => {
                write!(f, "field `{field}` is not supported: {reason}")
            }
            Self::Unknown { field } => write!(
                f,
                "unknown field `{field}`; remove it, or pass --ignore-unknown-fields to skip \
                 fields this version does not know"
            ),
        }
    }
}

/// The body fields an endpoint honours, and no others: all that its parser may read. Only
/// [`check_body`] makes one, so a field it skipped as unknown, or accepted because it changes
/// nothing, cannot reach a parser.
#[derive(Debug, Clone, PartialEq)]
pub struct Honoured(Map<String, Value>);

impl Honoured {
    /// The field's value, if the body gives it.
    pub fn get(&self, name: &str) -> Option<&Value> {
        self.0.get(name)
    }

    /// The fields that `keep` selects, for a reader that endpoints share.
    #[must_use]
    pub fn only(&self, keep: impl Fn(&str) -> bool) -> Self {
        Self(
            self.0
                .iter()
                .filter(|(k, _)| keep(k))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        )
    }
}

/// Checks the body fields that are neither honoured by the parser nor free of effect, and
/// returns the honoured ones: all that the endpoint's parser may read. A field whose value
/// asks for nothing beyond the default (`"tools": []`, `"tool_choice": "none"`, null) is
/// accepted.
///
/// The parser reads what this returns, never the body itself, so a field skipped as unknown or
/// accepted as free of effect cannot change the request: what the parser honours and what it
/// may read are one list.
///
/// # Errors
/// The first field refused, in the order the body lists them. Unknown fields are refused
/// unless `policy` ignores them; `unknown` then sees each one.
pub fn check_body(
    body: Map<String, Value>,
    fields: &BodyFields,
    policy: FieldPolicy,
    mut unknown: impl FnMut(&str),
) -> Result<Honoured, Refusal> {
    let mut honoured = Map::new();
    for (name, value) in body {
        if fields.honoured.contains(&name.as_str()) {
            honoured.insert(name, value);
            continue;
        }
        let name = name.as_str();
        if fields.no_effect.contains(&name) || value.is_null() {
            continue;
        }
        if let Some(reason) = (fields.unsupported)(name, &value) {
            return Err(Refusal::Unsupported {
                field: name.to_owned(),
                reason: reason.to_owned(),
            });
        }
        if !fields.known.contains(&name) {
            if !policy.ignore_unknown {
                return Err(Refusal::Unknown {
                    field: name.to_owned(),
                });
            }
            unknown(name);
        }
    }
    Ok(Honoured(honoured))
}

/// Checks the fields of the full form's envelope, or of a chat message (`path` names it, such
/// as `messages[1]`), against the `allowed` ones.
///
/// # Errors
/// The first field that is not allowed and not null. `name` on a message is a known field
/// that chat templates drop, so it is refused as unsupported, not unknown.
pub fn check_object(
    object: &Map<String, Value>,
    allowed: &[&str],
    path: Option<&str>,
    policy: FieldPolicy,
    mut unknown: impl FnMut(&str),
) -> Result<(), Refusal> {
    for (name, value) in object {
        if allowed.contains(&name.as_str()) || value.is_null() {
            continue;
        }
        let field = path.map_or_else(|| name.clone(), |p| format!("{p}.{name}"));
        if path.is_some() && MESSAGE_UNSUPPORTED.contains(&name.as_str()) {
            return Err(Refusal::Unsupported {
                field,
                reason: "messages carry only `role` and `content` here; participant names, \
                         tool calls and audio are not rendered"
                    .into(),
            });
        }
        if !policy.ignore_unknown {
            return Err(Refusal::Unknown { field });
        }
        unknown(&field);
    }
    Ok(())
}

/// Message fields of the OpenAI API that are known but not honoured.
const MESSAGE_UNSUPPORTED: [&str; 6] = [
    "name",
    "tool_calls",
    "tool_call_id",
    "function_call",
    "refusal",
    "audio",
];

/// Whether a value asks for nothing: false, or an empty list or object.
fn is_empty(value: &Value) -> bool {
    match value {
        Value::Bool(b) => !b,
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    }
}

/// Known chat fields that are not honoured, with the values that ask for nothing and are
/// accepted.
fn chat_unsupported(name: &str, value: &Value) -> Option<&'static str> {
    let empty = is_empty(value);
    let reason = match name {
        "tools" | "functions" if !empty => "tool calling is not supported; remove it",
        "tool_choice" | "function_call" if value.as_str() != Some("none") => {
            "tool calling is not supported; remove it"
        }
        "logit_bias" if !empty => "logit biases are not supported; remove it",
        "modalities" if value != &serde_json::json!(["text"]) => {
            "only the text modality is supported"
        }
        "audio" | "prediction" | "web_search_options" | "verbosity" | "stream_options" => {
            "this version does not honour it; remove it"
        }
        _ => return None,
    };
    Some(reason)
}

/// Known embeddings fields that are not honoured.
fn embeddings_unsupported(name: &str, _value: &Value) -> Option<&'static str> {
    (name == "dimensions").then_some(
        "this model's vectors cannot be shortened: it was not trained for fewer dimensions; \
         remove it",
    )
}

/// Known completions fields that are not honoured, with the values that ask for nothing.
fn completions_unsupported(name: &str, value: &Value) -> Option<&'static str> {
    match name {
        "logit_bias" if !is_empty(value) => Some("logit biases are not supported; remove it"),
        "stream_options" => Some("this version does not honour it; remove it"),
        _ => None,
    }
}

/// Known Responses fields that are not honoured, with the values that ask for nothing.
fn responses_unsupported(name: &str, value: &Value) -> Option<&'static str> {
    let empty = is_empty(value);
    let reason = match name {
        "tools" if !empty => "tool calling is not supported; remove it",
        "tool_choice" if !matches!(value.as_str(), Some("none" | "auto")) => {
            "tool calling is not supported; remove it"
        }
        "previous_response_id" | "conversation" => {
            "each request of a batch stands alone; send the whole conversation in `input`"
        }
        "background" if !empty => "a batch runs every request in the background already; remove it",
        "prompt" => "stored prompts are not available here; send `instructions` and `input`",
        "include" if !empty => "no extra output is produced; remove it",
        "truncation" if value.as_str() != Some("disabled") => {
            "a prompt that does not fit gets an error line, never a truncated context"
        }
        "top_logprobs" if value.as_u64() != Some(0) => {
            "log probabilities are returned on /v1/chat/completions (`logprobs`), not here"
        }
        "stream_options" => "this version does not honour it; remove it",
        _ => return None,
    };
    Some(reason)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn body(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    fn refusal(v: Value) -> Option<Refusal> {
        check_body(body(v), &CHAT, FieldPolicy::default(), |_| {}).err()
    }

    #[test]
    fn default_valued_and_no_effect_fields_are_accepted() {
        let ok = json!({
            "model": "x", "user": "u", "metadata": {"a": "b"}, "store": true,
            "logprobs": false, "tools": [], "tool_choice": "none", "parallel_tool_calls": true,
            "response_format": {"type": "text"}, "logit_bias": {}, "modalities": ["text"],
            "top_logprobs": null, "n": 1,
        });
        assert_eq!(refusal(ok), None);
    }

    #[test]
    fn fields_asking_for_more_are_refused_by_name() {
        for (v, field) in [
            (json!({"tools": [{"type": "function"}]}), "tools"),
            (json!({"tool_choice": "auto"}), "tool_choice"),
            (json!({"logit_bias": {"5": 1}}), "logit_bias"),
            (json!({"audio": {"voice": "x"}}), "audio"),
            (
                json!({"stream_options": {"include_usage": true}}),
                "stream_options",
            ),
        ] {
            match refusal(v) {
                Some(Refusal::Unsupported { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: {other:?}"),
            }
        }
    }

    #[test]
    fn responses_fields_that_need_a_server_or_tools_are_refused_by_name() {
        let check =
            |v: Value| check_body(body(v), &RESPONSES, FieldPolicy::default(), |_| {}).map(|_| ());
        let ok = json!({
            "model": "m", "input": "x", "instructions": "i", "store": false, "tools": [],
            "tool_choice": "auto", "background": false, "truncation": "disabled",
            "top_logprobs": 0, "include": [], "parallel_tool_calls": true, "metadata": {"k": "v"},
        });
        assert_eq!(check(ok), Ok(()));
        for (v, field) in [
            (json!({"tools": [{"type": "web_search"}]}), "tools"),
            (json!({"tool_choice": "required"}), "tool_choice"),
            (
                json!({"previous_response_id": "resp_1"}),
                "previous_response_id",
            ),
            (json!({"background": true}), "background"),
            (json!({"truncation": "auto"}), "truncation"),
            (json!({"top_logprobs": 3}), "top_logprobs"),
        ] {
            match check(v) {
                Err(Refusal::Unsupported { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: {other:?}"),
            }
        }
        // Chat's own fields are unknown here.
        assert_eq!(
            check(json!({"messages": []})),
            Err(Refusal::Unknown {
                field: "messages".into()
            })
        );
    }

    #[test]
    fn unknown_fields_are_refused_unless_ignored() {
        let b = body(json!({"temprature": 0.5, "messages": []}));
        let e = check_body(b.clone(), &CHAT, FieldPolicy::default(), |_| {}).unwrap_err();
        assert_eq!(
            e,
            Refusal::Unknown {
                field: "temprature".into()
            }
        );
        assert!(e.to_string().contains("--ignore-unknown-fields"));
        let mut seen = Vec::new();
        let lax = FieldPolicy {
            ignore_unknown: true,
        };
        let honoured = check_body(b, &CHAT, lax, |f| seen.push(f.to_owned())).unwrap();
        assert_eq!(seen, ["temprature"]);
        // The parser sees the honoured fields alone.
        assert_eq!(honoured, Honoured(body(json!({"messages": []}))));
        // Known but unsupported stays refused even then.
        assert!(check_body(
            body(json!({"tools": [{"type": "function"}]})),
            &CHAT,
            lax,
            |_| {}
        )
        .is_err());
    }

    #[test]
    fn envelope_and_message_fields_are_checked() {
        let env = body(json!({"custom_id": "a", "method": "POST", "url": "u", "body": {}, "x": 1}));
        assert_eq!(
            check_object(&env, &ENVELOPE, None, FieldPolicy::default(), |_| {}),
            Err(Refusal::Unknown { field: "x".into() })
        );
        let m = body(json!({"role": "user", "content": "hi", "name": "bob"}));
        let e = check_object(
            &m,
            &MESSAGE,
            Some("messages[1]"),
            FieldPolicy::default(),
            |_| {},
        )
        .unwrap_err();
        assert!(
            matches!(&e, Refusal::Unsupported { field, .. } if field == "messages[1].name"),
            "{e:?}"
        );
        let m = body(json!({"role": "user", "content": "hi", "name": null}));
        assert!(check_object(&m, &MESSAGE, Some("m"), FieldPolicy::default(), |_| {}).is_ok());
    }
}
