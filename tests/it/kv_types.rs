//! KV cache types (`--cache-type-k`, `--cache-type-v`) and flash attention in deterministic
//! mode: a request's output is the same at any `--parallel` and after a kill, prefix states are
//! kept apart by type, and the plan counts the chosen types' bytes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::harness::*;
use crate::resume::args;

/// Requests with log probabilities, greedy and seeded, whose streams grow past 256 cells: there
/// llama.cpp's CPU flash attention splits a lone row's keys between the threads.
fn input(s: &Scratch) -> PathBuf {
    let system = rubric(200);
    let lines: Vec<String> = (0..8)
        .map(|i| {
            let mut body = json!({"max_tokens": 24, "logprobs": true, "top_logprobs": 2});
            body["temperature"] = if i % 3 == 2 { json!(0.8) } else { json!(0) };
            body["seed"] = json!(7 + i);
            request(&format!("k{i}"), Some(&system), &profile(i), body)
        })
        .collect();
    s.write_lines("in.jsonl", &lines)
}

/// Each request's choices (text, log probabilities, finish reason) and usage.
pub fn answers(out: &Path) -> BTreeMap<String, Value> {
    by_key(out)
        .into_iter()
        .map(|(k, v)| {
            let body = &v["response"]["body"];
            (k, json!([body["choices"], body["usage"]]))
        })
        .collect()
}

/// Asserts that two runs answered alike, naming the requests that did not.
fn assert_same(got: &BTreeMap<String, Value>, want: &BTreeMap<String, Value>, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lines lost or added");
    let differ: Vec<&String> = want
        .keys()
        .filter(|k| got.get(*k) != want.get(*k))
        .collect();
    assert!(differ.is_empty(), "{what}: {differ:?} differ");
}

/// Runs the binary with `a`, which must succeed.
pub fn run(a: &[String]) {
    let o = spawn(a).wait_with_output().unwrap();
    assert!(o.status.success(), "{a:?}: {o:?}");
}

#[test]
fn quantized_kv_and_flash_attention_are_exact_across_parallel_and_a_kill() {
    let _lock = model_lock();
    let s = Scratch::new();
    let input = input(&s);
    let configs: [(&str, &[&str]); 2] = [
        (
            "q8_0",
            &["--cache-type-k", "q8_0", "--cache-type-v", "q8_0"],
        ),
        ("fa", &["--flash-attn", "on"]),
    ];
    let mut baselines = Vec::new();
    for (name, flags) in configs {
        let with = |out: &Path, parallel: &str| {
            let mut a = args(&s, &input, out, parallel);
            a.extend(flags.iter().map(|f| f.to_string()));
            a
        };
        let base = s.path(&format!("{name}-p1.jsonl"));
        run(&with(&base, "1"));
        let want = answers(&base);
        assert_eq!(want.len(), 8, "{name}");
        let sum = summary(&s, &format!("{name}-p1.jsonl"));
        let kv = &sum["memory"]["kv_cache"];
        let quantized = name == "q8_0";
        assert_eq!(
            kv["type_v"],
            if quantized { "q8_0" } else { "f16" },
            "{sum}"
        );
        // A quantized value cache needs flash attention: it is on in both.
        assert_eq!(sum["identity"]["machine"]["flash-attn"], "on", "{sum}");

        let wide = s.path(&format!("{name}-p4.jsonl"));
        run(&with(&wide, "4"));
        assert_same(
            &answers(&wide),
            &want,
            &format!("{name}: --parallel 4 against 1"),
        );

        let killed = s.path(&format!("{name}-killed.jsonl"));
        let a = with(&killed, "4");
        let mut child = spawn(&a);
        assert!(
            wait_until(&mut child, || line_count(&killed) >= 2),
            "{name}: the run ended before two lines"
        );
        send_signal("-KILL", i64::from(child.id()));
        child.wait().unwrap();
        assert!(
            line_count(&killed) < 8,
            "{name}: the kill landed after the end"
        );
        run(&a);
        assert_same(
            &answers(&killed),
            &want,
            &format!("{name}: killed and resumed"),
        );
        baselines.push(want);
    }
    // The types took effect: q8_0 keys and values move the log probabilities.
    assert_ne!(baselines[0], baselines[1]);
}

#[test]
fn a_prefix_state_is_restored_only_into_a_cache_of_its_types() {
    let _lock = model_lock();
    let s = Scratch::new();
    let system = rubric(100);
    let lines: Vec<String> = (0..2)
        .map(|i| {
            request(
                &format!("p{i}"),
                Some(&system),
                &profile(i),
                json!({"max_tokens": 4, "temperature": 0}),
            )
        })
        .collect();
    let input = s.write_lines("in.jsonl", &lines);
    let source = |types: &str, out: &str| {
        let (o, _) = run_batch(
            &s,
            &input,
            out,
            &["--cache-type-k", types, "--cache-type-v", types],
        );
        assert!(o.status.success(), "{o:?}");
        let sum = summary(&s, out);
        let prefix = &sum["prefixes"][0];
        (
            prefix["source"].as_str().unwrap().to_owned(),
            prefix["file_bytes"].as_u64().unwrap_or(0),
        )
    };
    let (f16_first, f16_bytes) = source("f16", "a.jsonl");
    assert_eq!(f16_first, "prefilled");
    // Another type never reads the f16 state: it prefills its own beside it.
    let (q8_first, q8_bytes) = source("q8_0", "b.jsonl");
    assert_eq!(q8_first, "prefilled");
    assert_eq!(source("q8_0", "c.jsonl").0, "restored");
    assert_eq!(source("f16", "d.jsonl").0, "restored");
    // q8_0 stores 34 bytes for every 64 of f16, plus the same cell metadata.
    assert!(
        q8_bytes * 10 < f16_bytes * 6 && q8_bytes * 2 > f16_bytes,
        "q8_0 state {q8_bytes} bytes against f16 {f16_bytes}"
    );
}

#[test]
fn the_plan_counts_the_types_bytes_and_fits_more_slots_at_q8_0() {
    let s = Scratch::new();
    let system = rubric(100);
    let lines: Vec<String> = (0..64)
        .map(|i| {
            request(
                &format!("d{i}"),
                Some(&system),
                &profile(i),
                json!({"max_tokens": 2048, "temperature": 0}),
            )
        })
        .collect();
    let input = s.write_lines("in.jsonl", &lines);
    let model = model_path();
    let plan = |types: &str| {
        let o = infer_batch(&[
            "--model",
            model.to_str().unwrap(),
            "--dry-run",
            "--parallel",
            "64",
            "--no-deterministic",
            "--memory-budget",
            "1073741824",
            "--cache-type-k",
            types,
            "--cache-type-v",
            types,
            input.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{o:?}");
        serde_json::from_slice::<Value>(&o.stdout).unwrap()
    };
    let f16 = plan("f16");
    let q8 = plan("q8_0");
    // SmolLM2: 30 layers × 3 KV heads × 64 wide, keys and values.
    assert_eq!(f16["kv_cache"]["bytes_per_token"], 30 * 3 * 2 * 64 * 2);
    assert_eq!(q8["kv_cache"]["bytes_per_token"], 30 * 3 * 2 * 2 * 34);
    assert_eq!(q8["kv_cache"]["type_k"], "q8_0");
    let slots = |p: &Value| p["parallel"].as_u64().unwrap();
    assert!(slots(&f16) < 64, "the budget must bind: {f16}");
    assert!(
        slots(&q8) * 10 >= slots(&f16) * 17,
        "q8_0 fits {} slots, f16 {}",
        slots(&q8),
        slots(&f16)
    );
}
