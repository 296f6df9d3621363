//! What graders need: JSON-schema and grammar-constrained answers, log probabilities, several
//! choices per prompt. All of them exact across `--parallel` and across a kill and resume, and
//! their bad inputs turned into error lines that name the field.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::harness::*;
use crate::resume::args;

/// The grade schema every JSON request uses.
fn schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "score": {"type": "integer", "minimum": 1, "maximum": 5},
            "reason": {"type": "string", "maxLength": 40},
        },
        "required": ["score", "reason"],
        "additionalProperties": false,
    })
}

/// Checks an answer against [`schema`] by hand: an object of exactly an integer score in
/// [1, 5] and a reason of at most 40 characters.
fn valid_grade(text: &str) -> bool {
    let Ok(Value::Object(o)) = serde_json::from_str::<Value>(text) else {
        return false;
    };
    o.len() == 2
        && o["score"].as_i64().is_some_and(|s| (1..=5).contains(&s))
        && o["reason"]
            .as_str()
            .is_some_and(|r| r.chars().count() <= 40)
}

/// Ten requests on one rubric: JSON schema, JSON object, GBNF, log probabilities, n = 3 and
/// plain, greedy and seeded.
fn graders_input(s: &Scratch) -> PathBuf {
    let system = format!(
        "{}\nReply with a grade from 1 to 5 and a short reason.",
        rubric(100)
    );
    let grade = json!({"type": "json_schema", "json_schema": {"name": "grade", "schema": schema(), "strict": true}});
    let bodies = [
        json!({"max_tokens": 48, "temperature": 0, "response_format": grade}),
        json!({"max_tokens": 48, "temperature": 0.8, "seed": 11, "response_format": grade}),
        json!({"max_tokens": 48, "temperature": 0, "json_schema": schema()}),
        json!({"max_tokens": 32, "temperature": 0, "response_format": {"type": "json_object"}}),
        json!({"max_tokens": 4, "temperature": 0, "grammar": "root ::= [1-5]"}),
        json!({"max_tokens": 6, "temperature": 0, "logprobs": true, "top_logprobs": 5}),
        json!({"max_tokens": 6, "temperature": 0.9, "seed": 5, "logprobs": true}),
        json!({"max_tokens": 8, "temperature": 0.9, "seed": 3, "n": 3}),
        json!({"max_tokens": 24, "temperature": 0, "n": 2, "logprobs": true, "top_logprobs": 2, "response_format": grade}),
        json!({"max_tokens": 8, "temperature": 0}),
    ];
    let lines: Vec<String> = bodies
        .into_iter()
        .enumerate()
        .map(|(i, body)| request(&format!("g{i}"), Some(&system), &profile(i), body))
        .collect();
    s.write_lines("in.jsonl", &lines)
}

/// Every choice's content, finish reason and log probabilities, and the usage, by request.
fn everything(out: &Path) -> std::collections::BTreeMap<String, Value> {
    by_key(out)
        .into_iter()
        .map(|(k, v)| {
            let body = &v["response"]["body"];
            (k, json!([body["choices"], body["usage"], v["error"]]))
        })
        .collect()
}

#[test]
fn graders_features_are_exact_across_parallel_and_a_kill() {
    let _lock = model_lock();
    let s = Scratch::new();
    let input = graders_input(&s);
    let three = s.path("p3.jsonl");
    assert_eq!(
        spawn(&args(&s, &input, &three, "3")).wait().unwrap().code(),
        Some(0)
    );
    let want = everything(&three);
    assert_eq!(want.len(), 10);
    let lines = by_key(&three);

    // Constrained answers that stopped parse and follow their schema; the GBNF one is a digit.
    // A choice cut by max_tokens holds a prefix only; g0 (greedy, 48 tokens) has room to
    // finish, so the check cannot pass by every answer being cut.
    let mut checked = Vec::new();
    for id in ["g0", "g1", "g2", "g8"] {
        for choice in lines[id]["response"]["body"]["choices"].as_array().unwrap() {
            if choice["finish_reason"] == "stop" {
                let text = choice["message"]["content"].as_str().unwrap();
                assert!(valid_grade(text), "{id}: {text:?}");
                checked.push(id);
            }
        }
    }
    assert!(
        checked.contains(&"g0") && checked.len() >= 2,
        "too few constrained answers finished to check: {checked:?}"
    );
    let object = content(&lines["g3"]);
    assert!(
        serde_json::from_str::<Value>(object).is_ok_and(|v| v.is_object())
            || lines["g3"]["response"]["body"]["choices"][0]["finish_reason"] == "length",
        "{object:?}"
    );
    let digit = content(&lines["g4"]);
    assert!(
        digit.len() == 1 && ("1"..="5").contains(&digit),
        "{digit:?}"
    );

    // Log probabilities: one entry per content token, alternatives sorted, the token's own
    // log probability among them when it was the most likely (greedy).
    let lp = &lines["g5"]["response"]["body"]["choices"][0]["logprobs"]["content"];
    let tokens = lp.as_array().unwrap();
    assert!(!tokens.is_empty());
    let joined: Vec<u8> = tokens
        .iter()
        .flat_map(|t| {
            t["bytes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| b.as_u64().unwrap() as u8)
        })
        .collect();
    assert!(String::from_utf8_lossy(&joined).starts_with(content(&lines["g5"])));
    for t in tokens {
        let top = t["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 5);
        assert_eq!(
            top[0]["logprob"], t["logprob"],
            "greedy takes the most likely"
        );
        let logprobs: Vec<f64> = top
            .iter()
            .map(|a| a["logprob"].as_f64().expect("a number"))
            .collect();
        assert!(logprobs.windows(2).all(|w| w[0] >= w[1]), "{logprobs:?}");
        assert!(t["logprob"].as_f64().unwrap() <= 0.0);
    }
    assert!(
        lines["g6"]["response"]["body"]["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
            .as_array()
            .unwrap()
            .is_empty()
    );

    // n: the prompt counted once, the choices' completions summed, choices that differ.
    let n3 = &lines["g7"]["response"]["body"];
    let choices = n3["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3);
    assert_eq!(
        choices
            .iter()
            .map(|c| c["index"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        vec![0, 1, 2]
    );
    let contents: std::collections::BTreeSet<&str> = choices
        .iter()
        .map(|c| c["message"]["content"].as_str().unwrap())
        .collect();
    assert!(contents.len() > 1, "seeded choices differ: {contents:?}");
    let summed: u64 = choices.len() as u64; // at least one token each
    assert!(usage(&lines["g7"], "completion_tokens") >= summed);

    // The same at another --parallel, and after a kill mid-run and a resume.
    let four = s.path("p4.jsonl");
    assert_eq!(
        spawn(&args(&s, &input, &four, "4")).wait().unwrap().code(),
        Some(0)
    );
    assert_eq!(everything(&four), want, "--parallel 3 and 4 differ");
    let killed = s.path("killed.jsonl");
    let args = args(&s, &input, &killed, "4");
    let mut child = spawn(&args);
    assert!(wait_until(&mut child, || line_count(&killed) >= 3));
    send_signal("-KILL", i64::from(child.id()));
    child.wait().unwrap();
    assert!(line_count(&killed) < 10, "the kill interrupted the run");
    assert_eq!(spawn(&args).wait().unwrap().code(), Some(0));
    assert_eq!(everything(&killed), want, "a resumed run differs");
}

#[test]
fn several_choices_compute_the_prompt_once() {
    let _lock = model_lock();
    let s = Scratch::new();
    let body = json!({"max_tokens": 6, "temperature": 1.0, "seed": 9, "n": 4});
    let input = s.write_lines("in.jsonl", &[request("one", None, &profile(2), body)]);
    let (o, results) = run_batch(
        &s,
        &input,
        "out.jsonl",
        &["--parallel", "4", "--no-prefix-cache"],
    );
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    let v = &results["one"];
    assert_eq!(
        v["response"]["body"]["choices"].as_array().unwrap().len(),
        4
    );
    let sum = summary(&s, "out.jsonl");
    assert_eq!(
        sum["tokens"]["prompt_computed"].as_u64(),
        Some(usage(v, "prompt_tokens")),
        "the prompt was computed once for four choices: {sum}"
    );
    assert_eq!(
        sum["tokens"]["completion"].as_u64(),
        Some(usage(v, "completion_tokens"))
    );
    assert!(
        usage(v, "completion_tokens") > 6,
        "four choices' tokens are summed"
    );
}

#[test]
fn choices_beyond_parallel_run_in_waves_with_the_outputs_of_a_wider_run() {
    let _lock = model_lock();
    let s = Scratch::new();
    let system = "Answer in one short sentence.";
    let lines = vec![
        request(
            "three",
            Some(system),
            &profile(1),
            json!({"max_tokens": 6, "temperature": 0.9, "seed": 4, "n": 3}),
        ),
        request(
            "five",
            Some(system),
            &profile(3),
            json!({"max_tokens": 5, "temperature": 1.0, "seed": 8, "n": 5, "logprobs": true}),
        ),
        request("one", Some(system), &profile(4), json!({"max_tokens": 4})),
    ];
    let input = s.write_lines("in.jsonl", &lines);
    let mut outputs = Vec::new();
    for parallel in ["1", "2", "5"] {
        let out = format!("p{parallel}.jsonl");
        let (o, results) = run_batch(&s, &input, &out, &["--parallel", parallel]);
        assert_eq!(o.status.code(), Some(0), "--parallel {parallel}: {o:?}");
        let five = &results["five"]["response"]["body"];
        assert_eq!(five["choices"].as_array().unwrap().len(), 5);
        // Usage counts the prompt once; the summary counts what was computed: the shared
        // prefix when it was prefilled (not when restored from an earlier run's state file),
        // and each request's own part once per wave of at most --parallel choices.
        let slots: u64 = parallel.parse().unwrap();
        let prefix = usage(&results["one"], "cached_tokens");
        assert!(prefix > 0);
        let own: u64 = [("three", 3), ("five", 5), ("one", 1)]
            .iter()
            .map(|&(id, n): &(&str, u64)| {
                let v = &results[id];
                assert_eq!(usage(v, "cached_tokens"), prefix, "{id}");
                (usage(v, "prompt_tokens") - prefix) * n.div_ceil(slots)
            })
            .sum();
        let sum = summary(&s, &out);
        let prefilled = sum["tokens"]["prefix_prefilled"].as_u64().unwrap();
        assert!(prefilled == 0 || prefilled == prefix, "{sum}");
        assert_eq!(
            sum["tokens"]["prompt_computed"].as_u64(),
            Some(prefilled + own),
            "--parallel {parallel}: {sum}"
        );
        outputs.push(everything(&s.path(&out)));
    }
    assert_eq!(outputs[0], outputs[2], "--parallel 1 and 5 differ");
    assert_eq!(outputs[1], outputs[2], "--parallel 2 and 5 differ");
}

#[test]
fn bad_grading_fields_get_error_lines_that_name_them() {
    let _lock = model_lock();
    let s = Scratch::new();
    let bad_schema = json!({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "(?<=a)b"}}});
    let lines = vec![
        request("schema", None, "x", json!({"response_format": bad_schema})),
        request("grammar", None, "x", json!({"grammar": "root ::= (("})),
        request(
            "top",
            None,
            "x",
            json!({"logprobs": true, "top_logprobs": 21}),
        ),
        request("n-max", None, "x", json!({"n": 33})),
        request("context", None, "x", json!({"n": 2, "max_tokens": 9000})),
        request(
            "ok",
            None,
            "x",
            json!({"max_tokens": 2, "response_format": {"type": "json_object"}}),
        ),
    ];
    let input = s.write_lines("in.jsonl", &lines);
    let (o, results) = run_batch(&s, &input, "out.jsonl", &["--parallel", "2"]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    for (id, code, words) in [
        (
            "schema",
            "invalid_parameter",
            "response_format.json_schema.schema",
        ),
        ("grammar", "invalid_parameter", "`grammar`"),
        ("top", "invalid_parameter", "`top_logprobs`"),
        ("n-max", "invalid_parameter", "`n`"),
        ("context", "context_length_exceeded", "max_tokens"),
    ] {
        let e = &results[id]["error"];
        assert_eq!(e["code"], code, "{id}: {e}");
        assert!(e["message"].as_str().unwrap().contains(words), "{id}: {e}");
    }
    assert!(results["ok"]["error"].is_null());
}
