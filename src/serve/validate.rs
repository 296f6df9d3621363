//! A batch's input file checked as OpenAI checks it before a batch starts: every line a JSON
//! object with a unique `custom_id`, `method` `POST`, the batch's own `url` and a `body`
//! object. Any bad line fails the whole batch, and `errors.data` names each one. What is
//! wrong inside a body is the engine's to find: such a request gets its own error line.

use std::collections::HashSet;
use std::io::BufRead;

use serde_json::Value;

use crate::serve::batch::BatchError;

/// Errors listed in `errors.data`; past this, one more entry says how many were left out.
pub const MAX_LISTED_ERRORS: usize = 100;

/// What validation found: the requests, or why the file cannot run.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Every line is a request for the batch's endpoint; this many.
    Valid(u64),
    /// The lines at fault.
    Invalid(Vec<BatchError>),
}

/// Checks the lines of `input` for a batch on `endpoint`.
///
/// # Errors
/// When the file cannot be read.
pub fn validate(input: impl BufRead, endpoint: &str) -> std::io::Result<Verdict> {
    let mut seen = HashSet::new();
    let mut errors = Vec::new();
    let mut found = 0usize;
    let mut requests = 0u64;
    for (i, line) in input.split(b'\n').enumerate() {
        let line = line?;
        let line_no = i as u64 + 1;
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        requests += 1;
        if let Err((code, param, message)) = check_line(&line, endpoint, &mut seen) {
            found += 1;
            if errors.len() < MAX_LISTED_ERRORS {
                errors.push(BatchError {
                    code: code.into(),
                    message: format!("line {line_no}: {message}"),
                    param: param.map(Into::into),
                    line: Some(line_no),
                });
            }
        }
    }
    if found > errors.len() {
        errors.push(BatchError {
            code: "too_many_errors".into(),
            message: format!(
                "{} more lines are invalid; only the first {MAX_LISTED_ERRORS} are listed",
                found - errors.len()
            ),
            param: None,
            line: None,
        });
    }
    if requests == 0 {
        errors.push(BatchError {
            code: "empty_file".into(),
            message: "the input file holds no requests".into(),
            param: None,
            line: None,
        });
    }
    Ok(if errors.is_empty() {
        Verdict::Valid(requests)
    } else {
        Verdict::Invalid(errors)
    })
}

type LineFault = (&'static str, Option<&'static str>, String);

fn check_line(line: &[u8], endpoint: &str, seen: &mut HashSet<String>) -> Result<(), LineFault> {
    let value: Value = serde_json::from_slice(line)
        .map_err(|e| ("invalid_json_line", None, format!("not valid JSON: {e}")))?;
    let Value::Object(obj) = value else {
        return Err(("invalid_json_line", None, "not a JSON object".into()));
    };
    let custom_id = match obj.get("custom_id") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        _ => {
            return Err((
                "missing_required_parameter",
                Some("custom_id"),
                "`custom_id` must be a non-empty string".into(),
            ))
        }
    };
    match obj.get("method") {
        Some(Value::String(m)) if m == "POST" => {}
        _ => {
            return Err((
                "invalid_request",
                Some("method"),
                "`method` must be \"POST\"".into(),
            ))
        }
    }
    match obj.get("url") {
        Some(Value::String(u)) if u == endpoint => {}
        other => {
            return Err((
                "mismatched_endpoint",
                Some("url"),
                format!(
                    "`url` is {}, but the batch's endpoint is {endpoint}",
                    other.map_or("missing".into(), Value::to_string)
                ),
            ))
        }
    }
    if !obj.get("body").is_some_and(Value::is_object) {
        return Err((
            "missing_required_parameter",
            Some("body"),
            "`body` must be an object".into(),
        ));
    }
    if !seen.insert(custom_id.clone()) {
        return Err((
            "duplicate_custom_id",
            Some("custom_id"),
            format!("`custom_id` {custom_id:?} appears on an earlier line"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const URL: &str = "/v1/chat/completions";

    fn line(id: &str, url: &str) -> String {
        format!(r#"{{"custom_id":"{id}","method":"POST","url":"{url}","body":{{"messages":[]}}}}"#)
    }

    #[test]
    fn good_lines_count_and_blank_lines_are_skipped() {
        let text = format!("{}\n\n{}\n  \n", line("a", URL), line("b", URL));
        assert_eq!(validate(text.as_bytes(), URL).unwrap(), Verdict::Valid(2));
    }

    #[test]
    fn each_bad_line_is_named() {
        let text = [
            line("a", URL),
            "{not json".into(),
            line("b", "/v1/embeddings"),
            line("a", URL),
            r#"{"custom_id":"c","method":"GET","url":"/v1/chat/completions","body":{}}"#.into(),
            r#"{"custom_id":"d","method":"POST","url":"/v1/chat/completions"}"#.into(),
            r#"{"method":"POST","url":"/v1/chat/completions","body":{}}"#.into(),
            "[1]".into(),
        ]
        .join("\n");
        let Verdict::Invalid(errors) = validate(text.as_bytes(), URL).unwrap() else {
            panic!("should fail");
        };
        let got: Vec<_> = errors
            .iter()
            .map(|e| (e.line.unwrap(), e.code.as_str(), e.param.as_deref()))
            .collect();
        assert_eq!(
            got,
            [
                (2, "invalid_json_line", None),
                (3, "mismatched_endpoint", Some("url")),
                (4, "duplicate_custom_id", Some("custom_id")),
                (5, "invalid_request", Some("method")),
                (6, "missing_required_parameter", Some("body")),
                (7, "missing_required_parameter", Some("custom_id")),
                (8, "invalid_json_line", None),
            ]
        );
        assert!(
            errors[1].message.starts_with("line 3:"),
            "{}",
            errors[1].message
        );
    }

    #[test]
    fn an_empty_file_and_a_flood_of_errors_are_reported() {
        let Verdict::Invalid(e) = validate("\n\n".as_bytes(), URL).unwrap() else {
            panic!()
        };
        assert_eq!(e[0].code, "empty_file");
        let many = "x\n".repeat(MAX_LISTED_ERRORS + 5);
        let Verdict::Invalid(e) = validate(many.as_bytes(), URL).unwrap() else {
            panic!()
        };
        assert_eq!(e.len(), MAX_LISTED_ERRORS + 1);
        assert!(e.last().unwrap().message.starts_with("5 more"));
    }
}
