//! The body of a `/v1/embeddings` request: one input or a list of them, as text or token ids.

use serde_json::Value;

use crate::formats::line_error::ErrorCode;
use crate::input::fields::{Fault, Honoured};

/// Most inputs one request may embed, as in OpenAI's API.
pub const MAX_INPUTS: usize = 2048;

/// One input to embed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EmbedInput {
    /// Text, tokenized as it is.
    Text(String),
    /// Token ids, taken as they are.
    Tokens(Vec<i32>),
}

/// What an embeddings body asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmbeddingsRequest {
    /// The inputs, in order.
    pub inputs: Vec<EmbedInput>,
    /// `encoding_format: base64`: little-endian f32 bytes in base64, instead of numbers.
    pub base64: bool,
}

/// Reads an embeddings body as [`crate::input::fields::check_body`] left it: the fields
/// [`crate::input::fields::EMBEDDINGS`] honours, and no others.
///
/// # Errors
/// The field at fault, with its code.
pub fn parse(body: &Honoured) -> Result<EmbeddingsRequest, Fault> {
    let bad = |m: String| (ErrorCode::InvalidMessages, m);
    let inputs = match body.get("input") {
        Some(Value::String(s)) => vec![text(s, "input")?],
        Some(Value::Array(items)) if items.is_empty() => {
            return Err(bad("field `input` is an empty list".into()))
        }
        // A list of numbers is one input of token ids.
        Some(Value::Array(items)) if items.iter().all(Value::is_number) => {
            vec![EmbedInput::Tokens(token_ids(items, "input")?)]
        }
        Some(Value::Array(items)) => {
            if items.len() > MAX_INPUTS {
                return Err(bad(format!(
                    "field `input` holds {} inputs; at most {MAX_INPUTS} per request",
                    items.len()
                )));
            }
            items
                .iter()
                .enumerate()
                .map(|(i, item)| {
                    let field = format!("input[{i}]");
                    match item {
                        Value::String(s) => text(s, &field),
                        Value::Array(ids) => token_ids(ids, &field).map(EmbedInput::Tokens),
                        v => Err(bad(format!(
                            "`{field}` is {v}; expected a string or a list of token ids"
                        ))),
                    }
                })
                .collect::<Result<_, _>>()?
        }
        Some(v) => {
            return Err(bad(format!(
                "field `input` is {v}; expected a string, a list of strings, or token ids"
            )))
        }
        None => return Err(bad("field `input` is missing".into())),
    };
    let base64 = match body.get("encoding_format") {
        None | Some(Value::Null) => false,
        Some(Value::String(f)) if f == "float" => false,
        Some(Value::String(f)) if f == "base64" => true,
        Some(v) => {
            return Err((
                ErrorCode::InvalidParameter,
                format!("field `encoding_format` is {v}; expected \"float\" or \"base64\""),
            ))
        }
    };
    Ok(EmbeddingsRequest { inputs, base64 })
}

fn text(s: &str, field: &str) -> Result<EmbedInput, Fault> {
    if s.is_empty() {
        return Err((
            ErrorCode::InvalidMessages,
            format!("`{field}` is an empty string; there is nothing to embed"),
        ));
    }
    if s.contains('\0') {
        return Err((
            ErrorCode::InvalidContent,
            format!("`{field}` contains a NUL character"),
        ));
    }
    Ok(EmbedInput::Text(s.to_owned()))
}

fn token_ids(items: &[Value], field: &str) -> Result<Vec<i32>, Fault> {
    if items.is_empty() {
        return Err((
            ErrorCode::InvalidMessages,
            format!("`{field}` is an empty list of token ids"),
        ));
    }
    items
        .iter()
        .map(|v| v.as_u64().and_then(|t| i32::try_from(t).ok()))
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| {
            (
                ErrorCode::InvalidMessages,
                format!("`{field}` must hold token ids: non-negative integers"),
            )
        })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::input::fields::{check_body, FieldPolicy, EMBEDDINGS};

    fn parse_body(v: Value) -> Result<EmbeddingsRequest, Fault> {
        let body = v.as_object().unwrap().clone();
        parse(&check_body(body, &EMBEDDINGS, FieldPolicy::default(), |_| {}).unwrap())
    }

    #[test]
    fn every_input_shape_parses() {
        let one = parse_body(json!({"input": "a"})).unwrap();
        assert_eq!(one.inputs, [EmbedInput::Text("a".into())]);
        assert!(!one.base64);
        let many =
            parse_body(json!({"input": ["a", [1, 2]], "encoding_format": "base64"})).unwrap();
        assert_eq!(
            many.inputs,
            [EmbedInput::Text("a".into()), EmbedInput::Tokens(vec![1, 2])]
        );
        assert!(many.base64);
        let ids = parse_body(json!({"input": [5, 6, 7]})).unwrap();
        assert_eq!(ids.inputs, [EmbedInput::Tokens(vec![5, 6, 7])]);
    }

    #[test]
    fn bad_inputs_name_the_field() {
        for (body, needle) in [
            (json!({}), "`input` is missing"),
            (json!({"input": []}), "empty list"),
            (json!({"input": ""}), "empty string"),
            (json!({"input": ["a", ""]}), "input[1]"),
            (json!({"input": ["a", 3]}), "input[1]"),
            (json!({"input": [[1, -2]]}), "input[0]"),
            (json!({"input": {"a": 1}}), "expected a string"),
            (
                json!({"input": "a", "encoding_format": "hex"}),
                "encoding_format",
            ),
        ] {
            let (_, m) = parse_body(body.clone())
                .err()
                .unwrap_or_else(|| panic!("{body}"));
            assert!(m.contains(needle), "{body}: {m}");
        }
        let many: Vec<String> = (0..=MAX_INPUTS).map(|i| i.to_string()).collect();
        let (_, m) = parse_body(json!({ "input": many })).err().unwrap();
        assert!(m.contains("at most 2048"), "{m}");
    }
}
