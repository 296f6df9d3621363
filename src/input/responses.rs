//! The body of a `/v1/responses` request: `instructions` and `input` become the conversation
//! (the instructions its system message, so the shared prefix), `max_output_tokens`,
//! `temperature`, `top_p` and `text.format` its sampling and constraint.

use serde_json::{json, Value};

use crate::formats::line_error::ErrorCode;
use crate::formats::message::Message;
use crate::formats::result::ResponsesEcho;
use crate::input::fields::{check_object, Fault, FieldPolicy, Honoured};
use crate::input::sampling::{parse_sampling, ConstraintSpec, SamplingParams};

/// Fields of an input message item that are read (`id` and `status` describe an item that
/// came from an earlier response and change nothing).
const ITEM: [&str; 5] = ["type", "role", "content", "id", "status"];

/// What a Responses body asks for.
pub struct ResponsesRequest {
    /// The conversation: the instructions as a system message, then the input.
    pub messages: Vec<Message>,
    /// Its sampling settings and constraint.
    pub sampling: SamplingParams,
    /// What its `response` repeats; temperature and top_p are resolved later.
    pub echo: ResponsesEcho,
}

/// Reads a Responses body as [`crate::input::fields::check_body`] left it: the fields
/// [`crate::input::fields::RESPONSES`] honours, and no others.
///
/// # Errors
/// The field at fault, with its code.
pub fn parse(
    body: &Honoured,
    policy: FieldPolicy,
    ignore: &mut impl FnMut(&str),
) -> Result<ResponsesRequest, Fault> {
    let invalid = |m: String| (ErrorCode::InvalidParameter, m);
    let instructions = match body.get("instructions") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(v) => {
            return Err(invalid(format!(
                "field `instructions` is {v}; expected a string"
            )))
        }
    };
    let mut messages: Vec<Message> = instructions
        .iter()
        .map(|s| Message {
            role: "system".into(),
            content: s.clone(),
        })
        .collect();
    messages.extend(input_messages(body, policy, ignore)?);
    if let Some(i) = messages.iter().position(|m| m.content.contains('\0')) {
        return Err((
            ErrorCode::InvalidContent,
            format!("message {i} of `instructions` and `input` contains a NUL character"),
        ));
    }
    let max_output_tokens = match body.get("max_output_tokens") {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_u64().and_then(|n| u32::try_from(n).ok()) {
            Some(n) if n > 0 => Some(n),
            _ => {
                return Err(invalid(format!(
                    "field `max_output_tokens` is {v}; expected an integer of at least 1"
                )))
            }
        },
    };
    let (text, constraint) = text_format(body.get("text")).map_err(invalid)?;
    // The sampling fields Responses shares with chat, read and bounded the same way.
    let shared = body.only(|k| matches!(k, "temperature" | "top_p"));
    Ok(ResponsesRequest {
        messages,
        sampling: SamplingParams {
            max_tokens: max_output_tokens,
            constraint,
            ..parse_sampling(&shared).map_err(invalid)?
        },
        echo: ResponsesEcho {
            instructions,
            max_output_tokens,
            temperature: 0.0,
            top_p: 1.0,
            text,
            metadata: body.get("metadata").filter(|m| !m.is_null()).cloned(),
        },
    })
}

/// `input`: a string (one user message) or a list of message items.
fn input_messages(
    body: &Honoured,
    policy: FieldPolicy,
    ignore: &mut impl FnMut(&str),
) -> Result<Vec<Message>, Fault> {
    let bad = |m: String| (ErrorCode::InvalidMessages, m);
    let items = match body.get("input") {
        Some(Value::String(s)) => {
            return Ok(vec![Message {
                role: "user".into(),
                content: s.clone(),
            }])
        }
        Some(Value::Array(items)) if !items.is_empty() => items,
        Some(Value::Array(_)) => return Err(bad("field `input` is an empty list".into())),
        Some(v) => {
            return Err(bad(format!(
                "field `input` is {v}; expected a string or a list of message items"
            )))
        }
        None => return Err(bad("field `input` is missing".into())),
    };
    let mut messages = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let path = format!("input[{i}]");
        let Value::Object(m) = item else {
            return Err(bad(format!(
                "`{path}` must be a message item with `role` and `content`"
            )));
        };
        match m.get("type").and_then(Value::as_str) {
            None | Some("message") => {}
            Some(t) => {
                return Err(bad(format!(
                    "`{path}.type` is {t:?}; only message items are supported (no tool calls \
                     or their outputs)"
                )))
            }
        }
        check_object(m, &ITEM, Some(&path), policy, &mut *ignore).map_err(|r| r.fault())?;
        let role = match m.get("role").and_then(Value::as_str) {
            Some("developer" | "system") => "system",
            Some(r @ ("user" | "assistant")) => r,
            _ => {
                return Err((
                    ErrorCode::InvalidRole,
                    format!(
                        "`{path}.role` is {}; use one of system, developer, user, assistant",
                        m.get("role").unwrap_or(&Value::Null)
                    ),
                ))
            }
        };
        let content = match m.get("content") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(parts)) => text_parts(parts, &path)?,
            _ => {
                return Err((
                    ErrorCode::InvalidContent,
                    format!("`{path}.content` must be a string or a list of text parts"),
                ))
            }
        };
        messages.push(Message {
            role: role.into(),
            content,
        });
    }
    Ok(messages)
}

/// Joins `input_text` and `output_text` parts.
fn text_parts(parts: &[Value], path: &str) -> Result<String, Fault> {
    let mut out = String::new();
    for (j, p) in parts.iter().enumerate() {
        let kind = p.get("type").and_then(Value::as_str);
        match (kind, p.get("text").and_then(Value::as_str)) {
            (Some("input_text" | "output_text"), Some(t)) => out.push_str(t),
            _ => {
                return Err((
                    ErrorCode::InvalidContent,
                    format!(
                        "`{path}.content[{j}]` is not a text part; only `input_text` and \
                         `output_text` parts with `text` are supported"
                    ),
                ))
            }
        }
    }
    Ok(out)
}

/// `text`: as the response repeats it, and the constraint its `format` asks for.
fn text_format(text: Option<&Value>) -> Result<(Value, Option<ConstraintSpec>), String> {
    let plain = json!({"format": {"type": "text"}});
    let t = match text {
        None | Some(Value::Null) => return Ok((plain, None)),
        Some(Value::Object(t)) => t,
        Some(v) => return Err(format!("field `text` is {v}; expected an object")),
    };
    if let Some(k) = t
        .keys()
        .find(|k| !matches!(k.as_str(), "format" | "verbosity"))
    {
        return Err(format!("field `text.{k}` is not supported; remove it"));
    }
    let format = match t.get("format") {
        None | Some(Value::Null) => return Ok((Value::Object(t.clone()), None)),
        Some(Value::Object(f)) => f,
        Some(v) => return Err(format!("field `text.format` is {v}; expected an object")),
    };
    let constraint = match format.get("type").and_then(Value::as_str) {
        Some("text") => None,
        Some("json_object") => Some(ConstraintSpec::JsonSchema {
            schema: json!({"type": "object"}),
            field: "text.format",
        }),
        Some("json_schema") => match format.get("schema") {
            Some(schema @ (Value::Object(_) | Value::Bool(_))) => {
                Some(ConstraintSpec::JsonSchema {
                    schema: schema.clone(),
                    field: "text.format.schema",
                })
            }
            _ => return Err("field `text.format.schema` is missing or not a JSON schema".into()),
        },
        _ => {
            return Err(format!(
                "field `text.format.type` is {}; expected text, json_object or json_schema",
                format.get("type").unwrap_or(&Value::Null)
            ))
        }
    };
    Ok((Value::Object(t.clone()), constraint))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::input::fields::{check_body, RESPONSES};

    fn parse_body(v: Value) -> Result<ResponsesRequest, Fault> {
        let body = v.as_object().unwrap().clone();
        let body = check_body(body, &RESPONSES, FieldPolicy::default(), |_| {}).unwrap();
        parse(&body, FieldPolicy::default(), &mut |_| {})
    }

    #[test]
    fn instructions_lead_and_input_items_follow() {
        let r = parse_body(json!({
            "instructions": "Grade it.",
            "input": [
                {"role": "developer", "content": "Be brief."},
                {"type": "message", "role": "user",
                 "content": [{"type": "input_text", "text": "Profile "}, {"type": "input_text", "text": "A"}]},
                {"role": "assistant", "content": [{"type": "output_text", "text": "ok"}],
                 "id": "msg_1", "status": "completed"},
            ],
            "max_output_tokens": 7, "temperature": 0.5,
            "text": {"format": {"type": "json_schema", "name": "g", "schema": {"type": "object"}}},
        }))
        .unwrap_or_else(|e| panic!("{e:?}"));
        let roles: Vec<&str> = r.messages.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(roles, ["system", "system", "user", "assistant"]);
        assert_eq!(r.messages[0].content, "Grade it.");
        assert_eq!(r.messages[2].content, "Profile A");
        assert_eq!(r.sampling.max_tokens, Some(7));
        assert_eq!(r.sampling.temperature, Some(0.5));
        assert!(matches!(
            r.sampling.constraint,
            Some(ConstraintSpec::JsonSchema {
                field: "text.format.schema",
                ..
            })
        ));
        assert_eq!(r.echo.instructions.as_deref(), Some("Grade it."));
        assert_eq!(r.echo.text["format"]["name"], "g");

        let r = parse_body(json!({"input": "hi"})).unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!((r.messages.len(), r.messages[0].role.as_str()), (1, "user"));
        assert_eq!(r.echo.text, json!({"format": {"type": "text"}}));
        assert_eq!(r.sampling.constraint, None);
    }

    #[test]
    fn bad_input_names_the_item_and_field() {
        for (body, code, needle) in [
            (json!({}), ErrorCode::InvalidMessages, "`input` is missing"),
            (json!({"input": []}), ErrorCode::InvalidMessages, "empty"),
            (
                json!({"input": [{"type": "function_call_output", "output": "x"}]}),
                ErrorCode::InvalidMessages,
                "input[0].type",
            ),
            (
                json!({"input": [{"role": "robot", "content": "x"}]}),
                ErrorCode::InvalidRole,
                "input[0].role",
            ),
            (
                json!({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "u"}]}]}),
                ErrorCode::InvalidContent,
                "input[0].content[0]",
            ),
            (
                json!({"input": "x", "max_output_tokens": 0}),
                ErrorCode::InvalidParameter,
                "max_output_tokens",
            ),
            (
                json!({"input": "x", "text": {"format": {"type": "json_schema"}}}),
                ErrorCode::InvalidParameter,
                "text.format.schema",
            ),
            (
                json!({"input": "x", "instructions": 3}),
                ErrorCode::InvalidParameter,
                "instructions",
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
