//! The batch command end to end: line accounting, error codes, exit codes, equality of the
//! shared and naive paths, usage numbers and seeded sampling.

use serde_json::json;

use crate::harness::*;

const EXIT_OK: i32 = 0;
const EXIT_SOME_FAILED: i32 = 1;
const EXIT_FATAL: i32 = 2;

#[test]
fn mixed_batch_gives_one_line_per_request_with_error_codes() {
    let _lock = model_lock();
    let s = Scratch::new();
    let greedy = json!({"max_tokens": 8, "temperature": 0});
    let sys_a = rubric(60);
    let sys_b = "You answer in one short sentence.";
    let lines = vec![
        request("a1", Some(&sys_a), &profile(1), greedy.clone()),
        request("b1", Some(sys_b), "Name a colour.", greedy.clone()),
        "{this is not json".to_owned(),
        json!({"method": "POST", "url": "/v1/chat/completions", "body": {"messages": [{"role": "user", "content": "x"}]}}).to_string(),
        request("a1", Some(&sys_a), &profile(2), greedy.clone()),
        json!({"custom_id": "url", "method": "POST", "url": "/v1/moderations", "body": {"input": "x"}}).to_string(),
        request("stream", None, "x", json!({"stream": true})),
        json!({"custom_id": "empty", "messages": []}).to_string(),
        json!({"custom_id": "role", "messages": [{"role": "wizard", "content": "x"}]}).to_string(),
        json!({"custom_id": "content", "messages": [{"role": "user", "content": {"text": "x"}}]}).to_string(),
        request("long", None, "x", json!({"max_tokens": 100_000})),
        String::new(),
        request("a2", Some(&sys_a), &profile(3), greedy.clone()),
        request("nosys", None, "Say hello.", greedy.clone()),
        request("b2", Some(sys_b), "Name a fruit.", greedy),
    ];
    let input = s.write_lines("in.jsonl", &lines);
    let (out, results) = run_batch(&s, &input, "out.jsonl", &["--parallel", "2"]);
    assert_eq!(out.status.code(), Some(EXIT_SOME_FAILED), "{out:?}");

    let all = read_results(&s.path("out.jsonl"));
    let non_blank = lines.iter().filter(|l| !l.trim().is_empty()).count();
    assert_eq!(all.len(), non_blank, "one output line per request");

    let error_at = |line: u64| {
        all.iter()
            .find(|v| v["error"]["line"] == line)
            .unwrap_or_else(|| panic!("no error line for input line {line}"))
    };
    let expect = [
        (3, "invalid_json"),
        (4, "missing_custom_id"),
        (5, "duplicate_custom_id"),
        (6, "invalid_url"),
        (7, "stream_unsupported"),
        (8, "invalid_messages"),
        (9, "invalid_role"),
        (10, "invalid_content"),
        (11, "context_length_exceeded"),
    ];
    for (line, code) in expect {
        let e = error_at(line);
        assert_eq!(e["error"]["code"], code, "line {line}: {e}");
        assert_eq!(e["response"], serde_json::Value::Null);
        let message = e["error"]["message"].as_str().unwrap();
        assert!(message.starts_with(&format!("line {line}:")), "{message}");
    }
    assert_eq!(error_at(5)["custom_id"], "a1");
    assert!(error_at(11)["error"]["message"]
        .as_str()
        .unwrap()
        .contains("100000"));

    for id in ["a1", "b1", "a2", "nosys", "b2"] {
        let v = all
            .iter()
            .find(|v| v["custom_id"] == id && v["error"].is_null())
            .unwrap_or_else(|| panic!("no success line for {id}"));
        assert_eq!(v["response"]["status_code"], 200);
        assert!(usage(v, "completion_tokens") >= 1);
    }
    // Requests that share a system prompt take its prefix from the cache; one without does not.
    assert!(usage(&results["a2"], "cached_tokens") > 60);
    assert!(usage(&results["b2"], "cached_tokens") > 5);
    assert_eq!(usage(&results["nosys"], "cached_tokens"), 0);
}

#[test]
fn shared_prefix_output_equals_naive_token_for_token() {
    let _lock = model_lock();
    let s = Scratch::new();
    // A prefix longer than one 128-token chunk, so the chunk cuts matter.
    let system = rubric(220);
    let body = json!({"max_tokens": 24, "temperature": 0});
    let lines: Vec<String> = (0..8)
        .map(|i| request(&format!("c{i}"), Some(&system), &profile(i), body.clone()))
        .collect();
    let input = s.write_lines("in.jsonl", &lines);
    let common = ["--parallel", "1", "--batch-size", "128"];
    let (o1, shared) = run_batch(&s, &input, "shared.jsonl", &common);
    let mut naive_args = common.to_vec();
    naive_args.push("--no-prefix-cache");
    let (o2, naive) = run_batch(&s, &input, "naive.jsonl", &naive_args);
    assert_eq!(o1.status.code(), Some(EXIT_OK), "{o1:?}");
    assert_eq!(o2.status.code(), Some(EXIT_OK), "{o2:?}");
    assert_eq!(shared.len(), 8);
    for (id, a) in &shared {
        let b = &naive[id];
        assert_eq!(content(a), content(b), "{id}: shared and naive diverge");
        assert_eq!(usage(a, "completion_tokens"), usage(b, "completion_tokens"));
        assert_eq!(usage(a, "prompt_tokens"), usage(b, "prompt_tokens"));
        assert!(usage(a, "cached_tokens") > 128, "{id}: prefix spans chunks");
        assert_eq!(usage(b, "cached_tokens"), 0, "naive shares nothing");
    }
}

#[test]
fn seeded_sampling_is_reproducible_across_runs_and_orders() {
    let _lock = model_lock();
    let s = Scratch::new();
    let system = rubric(40);
    let lines: Vec<String> = (0..5)
        .map(|i| {
            let mut body = json!({"max_tokens": 16, "temperature": 0.9, "top_p": 0.95});
            if i == 0 {
                body["seed"] = json!(1234);
            }
            request(&format!("s{i}"), Some(&system), &profile(i), body)
        })
        .collect();
    let forward = s.write_lines("fwd.jsonl", &lines);
    let reversed: Vec<String> = lines.iter().rev().cloned().collect();
    let backward = s.write_lines("bwd.jsonl", &reversed);
    let args = ["--parallel", "1", "--seed", "7"];
    let (_, a) = run_batch(&s, &forward, "a.jsonl", &args);
    let (_, b) = run_batch(&s, &forward, "b.jsonl", &args);
    let (_, c) = run_batch(&s, &backward, "c.jsonl", &args);
    let (_, d) = run_batch(&s, &forward, "d.jsonl", &["--parallel", "1", "--seed", "8"]);
    assert_eq!(a.len(), 5);
    let mut differs = 0;
    for (id, v) in &a {
        assert_eq!(content(v), content(&b[id]), "{id}: same run twice");
        assert_eq!(content(v), content(&c[id]), "{id}: reversed order");
        if content(v) != content(&d[id]) {
            differs += 1;
        }
    }
    // The request with its own seed ignores --seed; the others follow it.
    assert_eq!(content(&a["s0"]), content(&d["s0"]));
    assert!(differs >= 1, "another --seed changes the sampled output");
}

#[test]
fn usage_counts_are_measured_token_counts() {
    use infer_batch::engine::{Model, ModelSettings};

    let _lock = model_lock();
    let s = Scratch::new();
    let system = rubric(80);
    let users: Vec<String> = (0..3).map(profile).collect();
    let lines: Vec<String> = users
        .iter()
        .enumerate()
        .map(|(i, u)| {
            request(
                &format!("u{i}"),
                Some(&system),
                u,
                json!({"max_tokens": 12, "temperature": 0}),
            )
        })
        .collect();
    let input = s.write_lines("in.jsonl", &lines);
    let (o, results) = run_batch(&s, &input, "out.jsonl", &[]);
    assert_eq!(o.status.code(), Some(EXIT_OK), "{o:?}");

    let model = Model::load(&ModelSettings {
        path: model_path(),
        gpu_layers: 0,
        verbose: false,
    })
    .unwrap();
    // SmolLM2's template is ChatML: written out by hand here, independently of the renderer.
    // The shared part is everything before the user's own text, its turn's opening included.
    let shared = format!("<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n");
    let prefix = model.tokenize(&shared);
    for (i, u) in users.iter().enumerate() {
        let v = &results[&format!("u{i}")];
        let full = model.tokenize(&format!("{shared}{u}<|im_end|>\n<|im_start|>assistant\n"));
        assert!(
            full.starts_with(&prefix),
            "the shared part renders as a token prefix"
        );
        assert_eq!(usage(v, "prompt_tokens"), full.len() as u64);
        assert_eq!(usage(v, "cached_tokens"), prefix.len() as u64);
        assert_eq!(
            usage(v, "total_tokens"),
            usage(v, "prompt_tokens") + usage(v, "completion_tokens")
        );
        assert!(usage(v, "completion_tokens") <= 12);
    }
}

#[test]
fn fatal_conditions_exit_2_with_a_hint() {
    let s = Scratch::new();
    let input = s.write_lines("in.jsonl", &[request("a", None, "x", json!({}))]);
    let out = infer_batch(&[
        "--model",
        "/nonexistent/model.gguf",
        input.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(EXIT_FATAL));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("models/fetch.sh"), "{err}");

    let model = model_path();
    let out = infer_batch(&["--model", model.to_str().unwrap(), "/nonexistent/in.jsonl"]);
    assert_eq!(out.status.code(), Some(EXIT_FATAL));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read input"));
}

#[test]
fn empty_input_gives_empty_output_and_exit_0() {
    let _lock = model_lock();
    let s = Scratch::new();
    let input = s.path("empty.jsonl");
    std::fs::write(&input, "\n\n").unwrap();
    let (out, results) = run_batch(&s, &input, "out.jsonl", &[]);
    assert_eq!(out.status.code(), Some(EXIT_OK), "{out:?}");
    assert!(results.is_empty());
    assert!(s.path("out.jsonl").is_file());
}

#[test]
fn existing_results_are_not_overwritten_without_restart() {
    let _lock = model_lock();
    let s = Scratch::new();
    let input = s.write_lines(
        "in.jsonl",
        &[request("a", None, "Hi", json!({"max_tokens": 2}))],
    );
    let out_path = s.path("out.jsonl");
    std::fs::write(&out_path, "precious\n").unwrap();
    let model = model_path();
    let args = [
        "--model",
        model.to_str().unwrap(),
        "-o",
        out_path.to_str().unwrap(),
        input.to_str().unwrap(),
    ];
    let out = infer_batch(&args);
    assert_eq!(out.status.code(), Some(EXIT_FATAL));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--restart"));
    assert_eq!(
        std::fs::read_to_string(s.path("out.jsonl")).unwrap(),
        "precious\n"
    );
    let (out, results) = run_batch(&s, &input, "out.jsonl", &["--restart"]);
    assert_eq!(out.status.code(), Some(EXIT_OK), "{out:?}");
    assert_eq!(results.len(), 1);
}

#[test]
fn runs_without_network() {
    let _lock = model_lock();
    let probe = std::process::Command::new("unshare")
        .args(["--net", "true"])
        .status();
    if !probe.map(|s| s.success()).unwrap_or(false) {
        // Without a network namespace this test would check nothing: it fails unless the
        // machine is declared unable, and then it says so.
        assert!(
            std::env::var_os("INFER_BATCH_SKIP_AIRGAP").is_some(),
            "`unshare --net` is refused here, so the air-gapped run cannot be checked; run as \
             root, or set INFER_BATCH_SKIP_AIRGAP=1 to skip this test knowingly"
        );
        eprintln!("SKIPPED runs_without_network: INFER_BATCH_SKIP_AIRGAP is set");
        return;
    }
    let s = Scratch::new();
    let input = s.write_lines(
        "in.jsonl",
        &[request(
            "a",
            Some("Be brief."),
            "Hi",
            json!({"max_tokens": 4}),
        )],
    );
    let out_path = s.path("out.jsonl");
    // The namespace has only a loopback that is down: nothing can be reached, not even here.
    let probe = std::process::Command::new("unshare")
        .args(["--net", "sh", "-c", "cat /proc/net/dev | grep -c ':'"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&probe.stdout).trim(),
        "1",
        "only lo"
    );
    let status = std::process::Command::new("unshare")
        .env("XDG_CACHE_HOME", test_cache_home())
        .arg("--net")
        .arg(env!("CARGO_BIN_EXE_infer-batch"))
        .args([
            "--model",
            model_path().to_str().unwrap(),
            "-o",
            out_path.to_str().unwrap(),
        ])
        .arg(&input)
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(EXIT_OK));
    assert_eq!(read_results(&out_path).len(), 1);
}

#[test]
fn fields_that_are_not_honoured_get_an_error_line_naming_them() {
    let _lock = model_lock();
    let s = Scratch::new();
    let ok = json!({"max_tokens": 2, "temperature": 0});
    let with = |extra: serde_json::Value| {
        let mut body = ok.clone();
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        body
    };
    let lines = vec![
        request(
            "plain",
            None,
            "Hi",
            with(json!({"user": "u1", "metadata": {"k": "v"}, "store": false, "n": 1})),
        ),
        request(
            "tools",
            None,
            "Hi",
            with(json!({"tools": [{"type": "function", "function": {"name": "f"}}]})),
        ),
        request("stream", None, "Hi", with(json!({"stream": "True"}))),
        request("typo", None, "Hi", with(json!({"temprature": 0.2}))),
        request("too-many", None, "Hi", with(json!({"n": 33}))),
        request(
            "audio",
            None,
            "Hi",
            with(json!({"modalities": ["text", "audio"]})),
        ),
        request(
            "penalty",
            None,
            "Hi",
            with(json!({"frequency_penalty": 0.5, "presence_penalty": 0.5})),
        ),
    ];
    let input = s.write_lines("in.jsonl", &lines);
    let (o, results) = run_batch(&s, &input, "out.jsonl", &["--parallel", "4"]);
    assert_eq!(o.status.code(), Some(EXIT_SOME_FAILED), "{o:?}");
    for (id, field) in [
        ("tools", "`tools`"),
        ("stream", "`stream`"),
        ("typo", "`temprature`"),
        ("too-many", "`n`"),
        ("audio", "`modalities`"),
    ] {
        let e = &results[id]["error"];
        assert_eq!(e["code"], "invalid_parameter", "{id}: {e}");
        assert!(e["message"].as_str().unwrap().contains(field), "{id}: {e}");
    }
    assert!(results["plain"]["error"].is_null());
    assert!(results["penalty"]["error"].is_null());

    // Told to skip unknown fields, the typo runs; the unsupported fields stay refused.
    let (o, lax) = run_batch(
        &s,
        &input,
        "lax.jsonl",
        &["--parallel", "4", "--ignore-unknown-fields"],
    );
    assert_eq!(o.status.code(), Some(EXIT_SOME_FAILED), "{o:?}");
    assert!(lax["typo"]["error"].is_null(), "{}", lax["typo"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("temprature"));
    assert_eq!(lax["tools"]["error"]["code"], "invalid_parameter");
}

#[test]
fn a_batch_size_too_small_for_one_decode_step_exits_2_before_loading() {
    let s = Scratch::new();
    let input = s.write_lines("in.jsonl", &[request("a", None, "x", json!({}))]);
    let model = model_path();
    for extra in [
        &["--parallel", "8", "--batch-size", "4"][..],
        &["--parallel", "8", "--batch-size", "4", "--no-deterministic"][..],
    ] {
        let mut args = vec!["--model", model.to_str().unwrap(), input.to_str().unwrap()];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["-o", "/nonexistent/dir/out.jsonl"]);
        let out = infer_batch(&args);
        assert_eq!(out.status.code(), Some(EXIT_FATAL));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("--batch-size 4") && err.contains("at least 8"),
            "{err}"
        );
    }
}

#[test]
fn a_batch_size_equal_to_parallel_runs_beside_the_pad_stream() {
    let _lock = model_lock();
    let s = Scratch::new();
    let input = s.write_lines(
        "in.jsonl",
        &[request("a", None, "Hi", json!({"max_tokens": 2}))],
    );
    // Four slots and exact mode's pad stream are five sequences, one more than the batch
    // holds tokens: llama.cpp reserves an output row per sequence and aborted there.
    let (o, results) = run_batch(
        &s,
        &input,
        "out.jsonl",
        &["--parallel", "4", "--batch-size", "4"],
    );
    assert!(o.status.success(), "{o:?}");
    assert_eq!(results["a"]["response"]["status_code"], 200, "{results:?}");
}
