//! The endpoints besides chat. Every success body of a mixed batch validates against the openai
//! SDK's own types (tests/openai/validate.py, which also refuses fields the types do not
//! declare). A `/v1/responses` request computes what the same conversation computes on chat,
//! its `instructions` shared as the prefix, and what it cannot honour gets an error line.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::harness::*;

/// The SDK's virtual environment, made by scripts/openai-sdk.sh (part of `make test`).
pub fn sdk_python() -> PathBuf {
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

/// Checks a legacy `logprobs` against its choice's `text`, independently of how the offsets
/// are computed: they never decrease and stay inside the text, each token whose piece is whole
/// UTF-8 is found in the text at its offset, and a byte-level piece of a character points at a
/// multi-byte character. Returns the tokens.
fn check_text_offsets<'a>(lp: &'a Value, text: &str) -> Vec<&'a str> {
    let tokens: Vec<&str> = lp["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    let offsets: Vec<usize> = lp["text_offset"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| usize::try_from(o.as_u64().unwrap()).unwrap())
        .collect();
    assert_eq!(offsets.len(), tokens.len(), "{lp}");
    let chars: Vec<char> = text.chars().collect();
    assert!(offsets.is_sorted(), "{offsets:?}");
    for (t, &at) in tokens.iter().zip(&offsets) {
        // No stop string was cut, so every token has text: its offset is inside it.
        assert!(at < chars.len(), "{t:?} at {at} of {text:?}");
        let whole: String = t.chars().take_while(|&c| c != '\u{fffd}').collect();
        let found: String = chars[at..].iter().take(whole.chars().count()).collect();
        assert_eq!(found, whole, "{t:?} at {at} of {text:?}");
        if whole.is_empty() {
            assert!(chars[at].len_utf8() > 1, "{t:?} at {at} of {text:?}");
        }
    }
    if !tokens.concat().contains('\u{fffd}') {
        assert_eq!(tokens.concat(), text, "{lp}");
    }
    tokens
}

#[test]
fn completions_text_offsets_count_characters_of_multibyte_text() {
    let _lock = model_lock();
    let s = Scratch::new();
    // SmolLM2 answers these in Chinese, many characters as byte-level pieces, one per token.
    let prompts = [
        "用中文回答：什么是机器学习？\n答：",
        "English: thank you\nChinese: 谢谢\n\nEnglish: good morning\nChinese: 早上好\n\n\
         English: I love you\nChinese:",
    ];
    let lines: Vec<String> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            completion(
                &format!("zh{i}"),
                json!({"prompt": p, "max_tokens": 16, "temperature": 0, "logprobs": 0}),
            )
        })
        .collect();
    let input = s.write_lines("in.jsonl", &lines);
    let (o, out) = run_batch(&s, &input, "out.jsonl", &[]);
    assert!(o.status.success(), "{o:?}");
    for id in ["zh0", "zh1"] {
        let text = text(&out[id], 0);
        let lp = &out[id]["response"]["body"]["choices"][0]["logprobs"];
        let tokens = check_text_offsets(lp, text);
        assert!(
            tokens.iter().any(|t| t.contains('\u{fffd}')) && !text.contains('\u{fffd}'),
            "{id}: the answer should hold characters split into byte pieces: {text:?} {tokens:?}"
        );
    }
}

fn completion(custom_id: &str, body: Value) -> String {
    line(custom_id, "/v1/completions", body)
}

/// The text of a `text_completion` choice.
fn text(v: &Value, choice: usize) -> &str {
    v["response"]["body"]["choices"][choice]["text"]
        .as_str()
        .unwrap_or_else(|| panic!("not a text completion: {v}"))
}

#[test]
fn completions_compute_their_common_header_once_and_equal_naive() {
    let _lock = model_lock();
    let s = Scratch::new();
    // A few-shot header longer than one 128-token chunk, common to every prompt.
    let mut header = rubric(120);
    header.push_str("\nProfile: 3 years of Go, built a cache.\nScore: 2\n\n");
    let prompt = |i: usize| format!("{header}Profile: {}\nScore:", profile(i));
    let greedy = json!({"max_tokens": 10, "temperature": 0});
    let mut lines: Vec<String> = (0..4)
        .map(|i| {
            let mut body = greedy.clone();
            body["prompt"] = json!(prompt(i));
            completion(&format!("c{i}"), body)
        })
        .collect();
    lines.push(completion(
        "c-logprobs",
        json!({"prompt": [prompt(4)], "max_tokens": 6, "temperature": 0, "logprobs": 2}),
    ));
    lines.push(completion(
        "c-n",
        json!({"prompt": prompt(5), "max_tokens": 6, "temperature": 0.8, "seed": 4, "n": 2,
               "best_of": 2, "stop": ["\n"]}),
    ));
    for (id, extra) in [
        ("c-echo", json!({"echo": true})),
        ("c-suffix", json!({"suffix": "end"})),
        ("c-best-of", json!({"best_of": 3})),
        ("c-two", json!({"prompt": ["a", "b"]})),
    ] {
        let mut body = json!({"prompt": prompt(6)});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        lines.push(completion(id, body));
    }
    let input = s.write_lines("in.jsonl", &lines);
    let args = ["--parallel", "2", "--batch-size", "128"];
    let (o, shared) = run_batch(&s, &input, "shared.jsonl", &args);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert_openai_types(&s.path("shared.jsonl"));
    let mut naive_args = args.to_vec();
    naive_args.push("--no-prefix-cache");
    let (_, naive) = run_batch(&s, &input, "naive.jsonl", &naive_args);

    let ok = ["c0", "c1", "c2", "c3", "c-logprobs", "c-n"];
    let cached: Vec<u64> = ok
        .iter()
        .map(|id| usage(&shared[*id], "cached_tokens"))
        .collect();
    // The header is computed once: every prompt reports the same measured share of it.
    assert!(cached.iter().all(|&c| c == cached[0]), "{cached:?}");
    assert!(
        cached[0] > 128,
        "the shared header spans chunks: {cached:?}"
    );
    for id in ok {
        let (a, b) = (&shared[id], &naive[id]);
        assert!(usage(a, "prompt_tokens") > cached[0], "{id}");
        assert_eq!(usage(b, "cached_tokens"), 0, "{id}: naive shares nothing");
        assert_eq!(
            a["response"]["body"]["choices"], b["response"]["body"]["choices"],
            "{id}"
        );
        assert_eq!(a["response"]["body"]["object"], "text_completion");
    }
    let two = &shared["c-n"]["response"]["body"]["choices"];
    assert_eq!(two.as_array().unwrap().len(), 2);
    assert!(
        !text(&shared["c-n"], 0).contains('\n'),
        "stop string honoured"
    );

    let lp = &shared["c-logprobs"]["response"]["body"]["choices"][0]["logprobs"];
    let tokens = check_text_offsets(lp, text(&shared["c-logprobs"], 0));
    assert_eq!(lp["token_logprobs"].as_array().unwrap().len(), tokens.len());
    for top in lp["top_logprobs"].as_array().unwrap() {
        let n = top.as_object().unwrap().len();
        assert!((1..=2).contains(&n), "{top}");
    }

    for (id, field) in [
        ("c-echo", "echo"),
        ("c-suffix", "suffix"),
        ("c-best-of", "best_of"),
        ("c-two", "one prompt per line"),
    ] {
        let e = &shared[id]["error"];
        assert!(e["message"].as_str().unwrap().contains(field), "{id}: {e}");
    }
}

#[test]
fn completions_run_on_a_model_without_a_chat_template() {
    let _lock = model_lock();
    let s = Scratch::new();
    let header =
        "Continue each list with one more item.\nfruits: apple, pear\ncolours: red, blue\n";
    let lines: Vec<String> = ["animals: cat,", "cities: Paris,", "metals: iron,"]
        .iter()
        .enumerate()
        .map(|(i, tail)| {
            completion(
                &format!("g{i}"),
                json!({"prompt": format!("{header}{tail}"), "max_tokens": 4, "temperature": 0}),
            )
        })
        .collect();
    let input = s.write_lines("in.jsonl", &lines);
    let gemma = gemma_path();
    let args = ["--model", gemma.to_str().unwrap()];
    let (o, out) = run_batch_with_model(&s, &input, "out.jsonl", &args);
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    assert_openai_types(&s.path("out.jsonl"));
    let cached: Vec<u64> = out.values().map(|v| usage(v, "cached_tokens")).collect();
    assert_eq!(cached.len(), 3);
    assert!(
        cached.iter().all(|&c| c == cached[0] && c > 10),
        "{cached:?}"
    );

    // A conversation on the same model still needs a template, and says so before anything runs.
    let mixed = s.write_lines(
        "mixed.jsonl",
        &[lines[0].clone(), request("chat", None, "hi", json!({}))],
    );
    let (o, _) = run_batch_with_model(&s, &mixed, "mixed.jsonl.out", &args);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("--chat-template"));
}

/// The vectors of an embeddings success line, decoded from numbers or base64.
fn vectors(v: &Value) -> Vec<Vec<f32>> {
    v["response"]["body"]["data"]
        .as_array()
        .unwrap_or_else(|| panic!("not an embeddings line: {v}"))
        .iter()
        .map(|item| match &item["embedding"] {
            Value::Array(xs) => xs.iter().map(|x| x.as_f64().unwrap() as f32).collect(),
            Value::String(b64) => {
                use base64::Engine as _;
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .unwrap();
                bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                    .collect()
            }
            other => panic!("not a vector: {other}"),
        })
        .collect()
}

fn norm(v: &[f32]) -> f64 {
    v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt()
}

#[test]
fn embeddings_share_a_file_with_chat_and_validate() {
    let _lock = model_lock();
    let s = Scratch::new();
    let embed = |id: &str, body: Value| line(id, "/v1/embeddings", body);
    // The embedding batch example other batch runners ship, as it is.
    let mut lines = vec![
        r#"{"custom_id": "request-1", "method": "POST", "url": "/v1/embeddings", "body": {"model": "intfloat/e5-mistral-7b-instruct", "input": "You are a helpful assistant."}}"#.to_owned(),
        r#"{"custom_id": "request-2", "method": "POST", "url": "/v1/embeddings", "body": {"model": "intfloat/e5-mistral-7b-instruct", "input": "You are an unhelpful assistant."}}"#.to_owned(),
    ];
    lines.extend([
        request("chat", Some("Be brief."), "Say hi.", json!({"max_tokens": 4, "temperature": 0})),
        embed(
            "list",
            json!({"input": ["You are an unhelpful assistant.", [1, 2, 3], "You are a helpful assistant."]}),
        ),
        embed(
            "b64",
            json!({"input": "You are a helpful assistant.", "encoding_format": "base64"}),
        ),
        embed("twin", json!({"model": "x", "input": "You are a helpful assistant."})),
        embed("dims", json!({"input": "x", "dimensions": 64})),
        embed("empty", json!({"input": ""})),
        embed("vocab", json!({"input": [[1, 99999999]]})),
    ]);
    let input = s.write_lines("in.jsonl", &lines);
    let (o, out) = run_batch(&s, &input, "out.jsonl", &[]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert_openai_types(&s.path("out.jsonl"));
    assert!(
        !content(&out["chat"]).is_empty(),
        "chat and embeddings share the run"
    );

    let one = &vectors(&out["request-1"])[0];
    let two = &vectors(&out["request-2"])[0];
    let list = vectors(&out["list"]);
    assert_eq!(one.len(), 576, "SmolLM2's width");
    assert!((norm(one) - 1.0).abs() < 1e-5, "normalized by default");
    assert_ne!(one, two);
    // Each input is embedded alone: the same text gives the same vector in any request.
    assert_eq!((&list[0], &list[2]), (two, one));
    assert_eq!(&vectors(&out["b64"])[0], one, "base64 is the same f32s");
    let body = &out["list"]["response"]["body"];
    assert_eq!(body["data"][1]["index"], 1);
    let tokens = |id: &str| {
        out[id]["response"]["body"]["usage"]["prompt_tokens"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(
        tokens("list"),
        tokens("request-1") + tokens("request-2") + 3
    );
    // The twin is the same computation as request-1: copied, not computed again.
    let sum = summary(&s, "out.jsonl");
    assert_eq!(sum["requests"]["deduplicated"], 1, "{sum}");
    assert_eq!(&vectors(&out["twin"])[0], one);
    let embedded = ["request-1", "request-2", "list", "b64"]
        .map(tokens)
        .iter()
        .sum::<u64>();
    assert_eq!(sum["tokens"]["embedded"], embedded, "{sum}");
    assert!(
        sum["rates"]["embedding_tokens_per_second"]
            .as_f64()
            .unwrap()
            > 0.0
    );

    for (id, code, needle) in [
        ("dims", "invalid_parameter", "dimensions"),
        ("empty", "invalid_messages", "empty string"),
        ("vocab", "invalid_messages", "99999999"),
    ] {
        let e = &out[id]["error"];
        assert_eq!(e["code"], code, "{id}: {e}");
        assert!(e["message"].as_str().unwrap().contains(needle), "{id}: {e}");
    }

    // Another pooling is another vector; unnormalized, its length is the model's own.
    let (_, last) = run_batch(
        &s,
        &input,
        "last.jsonl",
        &["--pooling", "last", "--no-normalize-embeddings"],
    );
    let raw = &vectors(&last["request-1"])[0];
    assert_ne!(raw, one);
    assert!((norm(raw) - 1.0).abs() > 1e-3, "{}", norm(raw));
}
