//! Reasoning models on the real model: SmolLM2 under a chat template that opens a think block
//! in the generation prompt, as DeepSeek-R1's does (tests/templates/think.jinja), with
//! `--reasoning-format deepseek`. SmolLM2 never closes the block itself, so every budget is
//! spent and the engine writes `</think>`; then the answer follows the schema.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::endpoints::assert_openai_types;
use crate::harness::*;
use crate::kv_types::{answers, run};
use crate::resume::args;

fn template() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/templates/think.jinja")
        .to_string_lossy()
        .into_owned()
}

/// The run's flags: the template, the markers, and budgets of 6, 12 and 24 tokens.
fn flags() -> Vec<String> {
    [
        "--chat-template",
        &template(),
        "--reasoning-format",
        "deepseek",
        "--reasoning-budget",
        "6,12,24",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn grade() -> Value {
    json!({"type": "json_schema", "json_schema": {"name": "grade", "strict": true, "schema": {
        "type": "object",
        "properties": {"score": {"type": "integer", "minimum": 0, "maximum": 3}},
        "required": ["score"],
        "additionalProperties": false
    }}})
}

/// Requests that think with each effort, some answering under the schema.
fn input(s: &Scratch) -> PathBuf {
    let system = rubric(120);
    let efforts = ["low", "medium", "high", "none"];
    let lines: Vec<String> = (0..12)
        .map(|i| {
            let mut body = json!({"max_tokens": 64, "temperature": 0.6, "seed": i,
                                  "reasoning_effort": efforts[i % 4]});
            if i % 2 == 0 {
                body["response_format"] = grade();
            }
            request(&format!("t{i}"), Some(&system), &profile(i), body)
        })
        .collect();
    s.write_lines("in.jsonl", &lines)
}

fn run_with(s: &Scratch, input: &Path, out: &Path, parallel: &str) -> Vec<String> {
    let mut a = args(s, input, out, parallel);
    a.extend(flags());
    a
}

#[test]
fn the_budget_closes_the_thinking_and_the_schema_answer_parses_identically_across_parallel_and_a_kill(
) {
    let _lock = model_lock();
    let s = Scratch::new();
    let input = input(&s);
    let base = s.path("p1.jsonl");
    run(&run_with(&s, &input, &base, "1"));
    let lines = by_key(&base);
    assert_eq!(lines.len(), 12);
    assert_openai_types(&base);
    let mut parsed = 0;
    for (id, v) in &lines {
        let i: usize = id[1..].parse().unwrap();
        let body = &v["response"]["body"];
        let message = &body["choices"][0]["message"];
        if i % 4 == 3 {
            // `none`, and the template reads `enable_thinking`: it renders the block closed,
            // and the request answers at once.
            assert!(message.get("reasoning_content").is_none(), "{id}: {v}");
            assert!(
                body["usage"].get("completion_tokens_details").is_none(),
                "{id}: {v}"
            );
            continue;
        }
        let reasoning = message["reasoning_content"]
            .as_str()
            .unwrap_or_else(|| panic!("{v}"));
        let thought = body["usage"]["completion_tokens_details"]["reasoning_tokens"]
            .as_u64()
            .unwrap();
        let budget = [6, 12, 24][i % 4];
        // The engine closed the block after `budget` tokens; the close marker's tokens count.
        assert!(
            thought > budget && thought <= budget + 8,
            "{id}: {thought} reasoning tokens for a budget of {budget}: {v}"
        );
        assert!(!reasoning.is_empty(), "{id}: {v}");
        assert!(
            !message["content"].as_str().unwrap().contains("think>"),
            "{v}"
        );
        assert!(body["usage"]["completion_tokens"].as_u64().unwrap() > thought);
        // An answer under the schema that ends with `stop` parses and follows it (one cut
        // by max_tokens may not: SmolLM2 sometimes pads its JSON with whitespace).
        if i.is_multiple_of(2) && body["choices"][0]["finish_reason"] == "stop" {
            let answer: Value = serde_json::from_str(message["content"].as_str().unwrap())
                .unwrap_or_else(|e| panic!("{id}: the answer does not parse ({e}): {v}"));
            assert!(
                answer["score"].as_u64().is_some_and(|n| n <= 3),
                "{id}: {answer}"
            );
            parsed += 1;
        }
    }
    assert!(parsed >= 2, "only {parsed} schema answers ended with stop");
    let want = answers(&base);

    let wide = s.path("p4.jsonl");
    run(&run_with(&s, &input, &wide, "4"));
    assert_eq!(answers(&wide), want, "--parallel 4 against 1");

    let killed = s.path("killed.jsonl");
    let a = run_with(&s, &input, &killed, "4");
    let mut child = spawn(&a);
    assert!(
        wait_until(&mut child, || line_count(&killed) >= 2),
        "the run ended before two lines"
    );
    send_signal("-KILL", i64::from(child.id()));
    child.wait().unwrap();
    assert!(line_count(&killed) < 12, "the kill landed after the end");
    run(&a);
    assert_eq!(answers(&killed), want, "after a kill and resume");
}

#[test]
fn responses_carry_a_reasoning_item_and_bad_reasoning_fields_get_error_lines() {
    let _lock = model_lock();
    let s = Scratch::new();
    let system = rubric(40);
    let mut lines = vec![
        json!({"custom_id": "r", "method": "POST", "url": "/v1/responses", "body": {
            "instructions": system, "input": profile(1), "max_output_tokens": 40,
            "reasoning": {"effort": "low"}}})
        .to_string(),
    ];
    let bad = [
        (
            "kwargs",
            json!({"chat_template_kwargs": ["enable_thinking"]}),
            "chat_template_kwargs",
        ),
        (
            "effort",
            json!({"reasoning_effort": "extreme"}),
            "reasoning_effort",
        ),
        (
            "budget",
            json!({"reasoning_effort": "high", "max_tokens": 20}),
            "max_tokens",
        ),
    ];
    for (id, body, _) in &bad {
        lines.push(request(id, Some(&system), &profile(2), body.clone()));
    }
    // Thinking turned off through the template's own switch: the prompt closes the block.
    lines.push(request(
        "off",
        Some(&system),
        &profile(3),
        json!({"max_tokens": 8, "chat_template_kwargs": {"enable_thinking": false}}),
    ));
    let input = s.write_lines("in.jsonl", &lines);
    let out = s.path("out.jsonl");
    let o = spawn(&run_with(&s, &input, &out, "2"))
        .wait_with_output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    let lines = by_key(&out);
    let r = &lines["r"]["response"]["body"];
    assert_eq!(r["output"][0]["type"], "reasoning", "{r}");
    assert_eq!(
        r["output"][0]["content"][0]["type"], "reasoning_text",
        "{r}"
    );
    assert!(
        !r["output"][0]["content"][0]["text"]
            .as_str()
            .unwrap()
            .is_empty(),
        "{r}"
    );
    assert_eq!(r["output"][1]["type"], "message", "{r}");
    let thought = r["usage"]["output_tokens_details"]["reasoning_tokens"]
        .as_u64()
        .unwrap();
    assert!(thought > 6 && thought <= 14, "{r}");
    assert_openai_types(&out);
    let off = &lines["off"]["response"]["body"];
    assert!(
        off["choices"][0]["message"]
            .get("reasoning_content")
            .is_none(),
        "{off}"
    );
    for (id, _, field) in &bad {
        let e = lines
            .values()
            .find(|v| v["custom_id"] == *id)
            .unwrap_or_else(|| panic!("no line for {id}"));
        let message = e["error"]["message"]
            .as_str()
            .unwrap_or_else(|| panic!("{e}"));
        assert!(message.contains(field), "{id}: {message}");
    }

    // A model with no thinking markers (SmolLM2's own vocabulary, no --reasoning-format).
    let plain = s.write_lines(
        "plain.jsonl",
        &[request(
            "p",
            None,
            "Hi",
            json!({"reasoning_effort": "low", "max_tokens": 8}),
        )],
    );
    let out = s.path("plain.out.jsonl");
    let o = spawn(&args(&s, &plain, &out, "1"))
        .wait_with_output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    let line = &read_results(&out)[0];
    let message = line["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("reasoning_effort") && message.contains("--reasoning-format"),
        "{message}"
    );
}
