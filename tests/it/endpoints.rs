//! The endpoints besides chat. Every success body of a mixed batch validates against the openai
//! SDK's own types (tests/openai/validate.py, which also refuses fields the types do not
//! declare). A `/v1/responses` request computes what the same conversation computes on chat,
//! its `instructions` shared as the prefix, and what it cannot honour gets an error line.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::harness::*;

/// The SDK's virtual environment, made by scripts/openai-sdk.sh (part of `make test`).
fn sdk_python() -> PathBuf {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv-openai/bin/python");
    assert!(
        python.is_file(),
        "{} is missing: run ./scripts/openai-sdk.sh (or `make test`) first",
        python.display()
    );
    python
}

/// Validates every success body of `output` against the openai types.
pub fn assert_openai_types(output: &Path) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/openai/validate.py");
    let o = std::process::Command::new(sdk_python())
        .arg(script)
        .arg(output)
        .output()
        .expect("run validate.py");
    assert!(
        o.status.success(),
        "a body does not validate against the openai types:\n{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

fn line(custom_id: &str, url: &str, body: Value) -> String {
    json!({"custom_id": custom_id, "method": "POST", "url": url, "body": body}).to_string()
}

fn responses(custom_id: &str, body: Value) -> String {
    line(custom_id, "/v1/responses", body)
}

#[test]
fn responses_and_chat_bodies_validate_against_the_openai_types() {
    let _lock = model_lock();
    let s = Scratch::new();
    let system = rubric(80);
    let schema = json!({"type": "object", "properties": {"score": {"type": "integer"}},
                        "required": ["score"]});
    let lines = vec![
        request(
            "chat",
            Some(&system),
            &profile(1),
            json!({"max_tokens": 16, "temperature": 0}),
        ),
        request(
            "chat-extras",
            Some(&system),
            &profile(2),
            json!({"max_tokens": 4, "temperature": 0.7, "seed": 3, "n": 2, "logprobs": true,
                   "top_logprobs": 2}),
        ),
        responses(
            "resp",
            json!({"instructions": system, "input": profile(1), "max_output_tokens": 16,
                   "temperature": 0, "metadata": {"batch": "7"}}),
        ),
        responses(
            "resp-items",
            json!({"instructions": system, "max_output_tokens": 3,
                   "input": [{"type": "message", "role": "user",
                              "content": [{"type": "input_text", "text": profile(3)}]}]}),
        ),
        responses(
            "resp-json",
            json!({"instructions": system, "input": profile(4), "max_output_tokens": 40,
                   "temperature": 0,
                   "text": {"format": {"type": "json_schema", "name": "grade", "schema": schema,
                                       "strict": true}}}),
        ),
        responses(
            "resp-tools",
            json!({"input": "x", "tools": [{"type": "web_search"}]}),
        ),
        responses(
            "resp-chain",
            json!({"input": "x", "previous_response_id": "resp_1"}),
        ),
        responses("resp-background", json!({"input": "x", "background": true})),
        responses("resp-stream", json!({"input": "x", "stream": true})),
        responses(
            "resp-call",
            json!({"input": [{"type": "function_call_output", "output": "1"}]}),
        ),
        line("embed", "/v1/moderations", json!({"input": "x"})),
    ];
    let input = s.write_lines("in.jsonl", &lines);
    let (o, out) = run_batch(&s, &input, "out.jsonl", &["--parallel", "2"]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert_openai_types(&s.path("out.jsonl"));

    // The same conversation through either endpoint is the same computation.
    let chat = &out["chat"]["response"]["body"];
    let resp = &out["resp"]["response"]["body"];
    assert_eq!(
        resp["output"][0]["content"][0]["text"],
        chat["choices"][0]["message"]["content"]
    );
    assert_eq!(
        resp["usage"]["input_tokens"],
        chat["usage"]["prompt_tokens"]
    );
    assert_eq!(
        resp["usage"]["output_tokens"],
        chat["usage"]["completion_tokens"]
    );
    let cached = &resp["usage"]["input_tokens_details"]["cached_tokens"];
    assert_eq!(
        cached,
        &chat["usage"]["prompt_tokens_details"]["cached_tokens"]
    );
    assert!(
        cached.as_u64().unwrap() > 50,
        "instructions are the shared prefix: {resp}"
    );
    let status = match chat["choices"][0]["finish_reason"].as_str() {
        Some("length") => "incomplete",
        _ => "completed",
    };
    assert_eq!(resp["status"], status);
    assert_eq!(resp["metadata"], json!({"batch": "7"}));
    assert_eq!(
        (resp["temperature"].as_f64(), resp["top_p"].as_f64()),
        (Some(0.0), Some(1.0))
    );
    assert_ne!(out["resp"]["computation"], out["chat"]["computation"]);

    let cut = &out["resp-items"]["response"]["body"];
    assert_eq!(cut["status"], "incomplete", "{cut}");
    assert_eq!(cut["incomplete_details"]["reason"], "max_output_tokens");
    assert_eq!(cut["usage"]["output_tokens"], 3);

    let structured = &out["resp-json"]["response"]["body"];
    assert_eq!(structured["text"]["format"]["name"], "grade");

    for (id, code, field) in [
        ("resp-tools", "invalid_parameter", "tools"),
        ("resp-chain", "invalid_parameter", "previous_response_id"),
        ("resp-background", "invalid_parameter", "background"),
        ("resp-stream", "stream_unsupported", "stream"),
        ("resp-call", "invalid_messages", "input[0].type"),
        ("embed", "invalid_url", "/v1/moderations"),
    ] {
        let e = &out[id]["error"];
        assert_eq!(e["code"], code, "{id}: {e}");
        assert!(e["message"].as_str().unwrap().contains(field), "{id}: {e}");
    }
}
