//! The GPU path on a real Vulkan device: Mesa's lavapipe, which runs on the CPU (`make
//! test-vulkan`: the `vulkan` build, with `GGML_VK_VISIBLE_DEVICES=0`). lavapipe decodes a few
//! tokens a second, so the batch is tiny: a short system prompt, four requests, a few tokens
//! each. Every run offloads to the device unless a test says otherwise, and every check is one
//! the CPU suite makes too: exact outputs across `--parallel`, prefix states saved from device
//! memory and restored, kill and resume, partial offload, and state identities that keep GPU and
//! CPU states apart.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde_json::{json, Value};

use crate::harness::*;

/// The device the suite runs on, as ggml describes it.
const DEVICE: &str = "llvmpipe";

fn input(s: &Scratch) -> PathBuf {
    let system = "You grade candidate profiles for a backend role. Reply with a score from 1 to 5 \
                  and one short reason. Judge only what the profile says.";
    let lines: Vec<String> = (0..4)
        .map(|i| {
            // Greedy and seeded sampling, with log probabilities: equal outputs mean equal bits.
            let body = if i % 2 == 0 {
                json!({"max_tokens": 4, "temperature": 0, "logprobs": true, "top_logprobs": 2})
            } else {
                json!({"max_tokens": 4, "temperature": 0.8, "seed": i, "logprobs": true})
            };
            request(&format!("c{i}"), Some(system), &short_profile(i), body)
        })
        .collect();
    s.write_lines("in.jsonl", &lines)
}

fn short_profile(i: usize) -> String {
    let langs = ["Rust", "Python", "Go", "C++"];
    format!("{} years of {}.", 2 + i, langs[i % langs.len()])
}

/// Tokens a call holds in these tests: it also caps the decode-group probe at 8 rows, where a
/// GPU run's default would try every size up to 64, minutes of lavapipe's time each run.
const BATCH: &str = "8";

/// A run's arguments on the device: the batch into `out`, with the prefix states in `cache`.
fn args(input: &Path, out: &Path, cache: &Path, extra: &[&str]) -> Vec<String> {
    let model = model_path();
    let mut args: Vec<String> = [
        "--model",
        model.to_str().unwrap(),
        "--threads",
        "2",
        "--batch-size",
        BATCH,
        "--prefix-cache-dir",
        cache.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        input.to_str().unwrap(),
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    args.extend(extra.iter().map(|a| a.to_string()));
    args
}

/// Runs to the end, with the device visible, and returns the summary.
fn run(exe: &Path, args: &[String], visible: bool) -> Value {
    let mut cmd = std::process::Command::new(exe);
    cmd.args(args)
        .env("INFER_BATCH_LOG", "info")
        .env("XDG_CACHE_HOME", test_cache_home());
    if visible {
        cmd.env("GGML_VK_VISIBLE_DEVICES", "0");
    } else {
        cmd.env_remove("GGML_VK_VISIBLE_DEVICES");
    }
    let o = cmd.output().expect("run infer-batch");
    assert!(o.status.success(), "{args:?}: {o:?}");
    let out = Path::new(&args[args.iter().position(|a| a == "-o").unwrap() + 1]);
    summary_of(out)
}

fn summary_of(out: &Path) -> Value {
    let name = out.file_name().unwrap().to_string_lossy();
    let path = out.with_file_name(format!(
        "{}.summary.json",
        name.strip_suffix(".jsonl").unwrap()
    ));
    serde_json::from_str(&std::fs::read_to_string(path).expect("a summary")).unwrap()
}

fn vulkan_exe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_infer-batch"))
}

/// What must be equal between two runs of one request: the whole response body but its ids
/// and clock (text, finish reason, usage, every log probability).
fn bodies(out: &Path) -> BTreeMap<String, Value> {
    by_key(out)
        .into_iter()
        .map(|(k, v)| {
            let mut body = v["response"]["body"].clone();
            assert!(body.is_object(), "{k} failed: {v}");
            for volatile in ["id", "created"] {
                body.as_object_mut().unwrap().remove(volatile);
            }
            (k, body)
        })
        .collect()
}

fn tokens(summary: &Value, field: &str) -> u64 {
    summary["tokens"][field].as_u64().unwrap()
}

/// The first run: every layer on the device, `--parallel 1`, the prefix prefilled there and
/// its state saved from device memory into the cache.
struct Baseline {
    _scratch: Scratch,
    input: PathBuf,
    cache: PathBuf,
    bodies: BTreeMap<String, Value>,
    prefix_tokens: u64,
    /// The summary's `decode_groups`: the probe's decision, sizes and classes.
    decode_groups: Value,
}

fn baseline() -> &'static Baseline {
    static BASE: OnceLock<Baseline> = OnceLock::new();
    BASE.get_or_init(|| {
        let s = Scratch::new();
        let input = input(&s);
        let cache = s.path("cache");
        let out = s.path("base.jsonl");
        let sum = run(
            &vulkan_exe(),
            &args(
                &input,
                &out,
                &cache,
                &["--gpu-layers", "all", "--parallel", "1"],
            ),
            true,
        );
        let gpu = &sum["memory"]["vram_use"][0];
        assert!(
            gpu["name"].as_str().unwrap().starts_with(DEVICE),
            "the run did not see lavapipe: {sum}"
        );
        assert_eq!(gpu["device"], "Vulkan0", "{sum}");
        assert_eq!(
            sum["memory"]["gpu_layers"], 31,
            "every layer and the output layer: {sum}"
        );
        // lavapipe reports its size as free whatever is allocated: no use, rather than 0.
        assert!(
            gpu["peak_used_bytes"].is_null() || gpu["peak_used_bytes"].as_u64().unwrap() > 0,
            "{sum}"
        );
        eprintln!("lavapipe decode groups: {}", sum["decode_groups"]);
        let prefix_tokens = tokens(&sum, "prefix_prefilled");
        assert!(prefix_tokens > 20, "{sum}");
        Baseline {
            decode_groups: sum["decode_groups"].clone(),
            bodies: bodies(&out),
            _scratch: s,
            input,
            cache,
            prefix_tokens,
        }
    })
}

#[test]
fn outputs_are_equal_across_parallel_and_a_device_state_restores_without_prefill() {
    let _lock = model_lock();
    let base = baseline();
    let s = Scratch::new();
    // In memory: the prefix computed once on the device and copied to 4 slots.
    let out = s.path("p4.jsonl");
    let sum = run(
        &vulkan_exe(),
        &args(
            &base.input,
            &out,
            &s.path("own-cache"),
            &["--parallel", "4", "--no-disk-cache"],
        ),
        true,
    );
    assert_eq!(sum["memory"]["gpu_layers"], 31, "{sum}");
    assert_eq!(bodies(&out), base.bodies, "--parallel 4 differs from 1");
    // From disk: the baseline's state, saved from device memory, restored onto the device.
    let out = s.path("restored.jsonl");
    let sum = run(
        &vulkan_exe(),
        &args(&base.input, &out, &base.cache, &["--parallel", "2"]),
        true,
    );
    assert_eq!(tokens(&sum, "prefix_prefilled"), 0, "{sum}");
    assert_eq!(tokens(&sum, "prefix_restored"), base.prefix_tokens, "{sum}");
    assert_eq!(
        bodies(&out),
        base.bodies,
        "a restored prefix changed outputs"
    );
}

#[test]
fn rows_far_deeper_in_the_same_call_leave_a_rows_bits_as_they_were() {
    let _lock = model_lock();
    // The baseline's probe ran on the device: every group size from 1 to 8, each once with
    // shallow rows beside rows 257 positions deeper (so the call attends over the next
    // 256-cell step) and once with shallow rows only, the rows compared bit for bit.
    let groups = &baseline().decode_groups;
    assert_eq!(groups["sizes_tried"], json!([1, 8]), "{groups}");
    assert!(groups["classes"].as_array().is_some_and(|c| !c.is_empty()));
    // The end-to-end check of whatever it decided: an answer written far deeper than another
    // (its profile alone is more than 256 tokens) generates beside it at --parallel 2 and alone
    // at --parallel 1, with the same bits. Exact mode computes one prompt chunk a step, so the
    // short answer is still generating (64 tokens) when the deep one starts: on lavapipe,
    // decoding the two in one call changes the short row's bits from its 50th token on.
    let s = Scratch::new();
    let system = "Grade the profile from 1 to 5.";
    let long = (0..28)
        .map(|i| format!("Project {i}: a service in Rust, tested and shipped."))
        .collect::<Vec<_>>()
        .join(" ");
    let greedy = |n: u32| json!({"max_tokens": n, "temperature": 0, "logprobs": true});
    let lines = vec![
        request("short", Some(system), "2 years of Go.", greedy(64)),
        request("deep", Some(system), &long, greedy(4)),
    ];
    let input = s.write_lines("depths.jsonl", &lines);
    let outputs = |parallel: &str| {
        let out = s.path(&format!("p{parallel}.jsonl"));
        run(
            &vulkan_exe(),
            &args(
                &input,
                &out,
                &s.path("cache"),
                &["--gpu-layers", "all", "--parallel", parallel],
            ),
            true,
        );
        bodies(&out)
    };
    let alone = outputs("1");
    let usage = |id: &str, field: &str| alone[id]["usage"][field].as_u64().unwrap();
    assert!(
        usage("deep", "prompt_tokens") > usage("short", "prompt_tokens") + 256,
        "the deep profile is too short: {alone:?}"
    );
    assert_eq!(
        usage("short", "completion_tokens"),
        64,
        "the short answer ended before the deep one could join it: {alone:?}"
    );
    let together = outputs("2");
    assert_eq!(
        together, alone,
        "a row's bits changed beside a far deeper one (decode groups: {groups})"
    );
}

#[test]
fn a_run_killed_on_the_device_resumes_to_the_uninterrupted_output() {
    let _lock = model_lock();
    let base = baseline();
    let s = Scratch::new();
    let out = s.path("killed.jsonl");
    let a = args(&base.input, &out, &base.cache, &["--parallel", "1"]);
    let mut child = spawn_with(&a, &[("GGML_VK_VISIBLE_DEVICES", "0")]);
    let reached = wait_until_secs(&mut child, 600, || line_count(&out) >= 1);
    assert!(reached, "the run ended before its first line");
    send_signal("-KILL", i64::from(child.id()));
    child.wait().unwrap();
    let written = line_count(&out);
    assert!(written < 4, "killed too late: {written} lines");
    // Resumed at another --parallel: deterministic mode allows it, and the outputs must not
    // change.
    let resumed = args(&base.input, &out, &base.cache, &["--parallel", "3"]);
    run(&vulkan_exe(), &resumed, true);
    assert_eq!(bodies(&out), base.bodies, "the resumed output differs");
}

#[test]
fn partial_offload_runs_and_keeps_its_own_state_identity() {
    let _lock = model_lock();
    let base = baseline();
    let s = Scratch::new();
    let out = s.path("partial.jsonl");
    // The baseline's cache holds the full-offload state: 10 layers compute other bits, so
    // that state must not be taken.
    let sum = run(
        &vulkan_exe(),
        &args(&base.input, &out, &base.cache, &["--gpu-layers", "10"]),
        true,
    );
    assert_eq!(sum["memory"]["gpu_layers"], 10, "{sum}");
    assert_eq!(sum["requests"]["ok"], 4, "{sum}");
    assert_eq!(
        tokens(&sum, "prefix_prefilled"),
        base.prefix_tokens,
        "{sum}"
    );
    assert_eq!(tokens(&sum, "prefix_restored"), 0, "{sum}");
}

#[test]
fn cache_warm_and_run_agree_on_the_state_when_layers_are_fitted_down() {
    let _lock = model_lock();
    let base = baseline();
    let s = Scratch::new();
    let cache = s.path("cache");
    // What the plan needs on the device: the compute buffer comes with any offload, and each
    // layer brings its share of the weights and KV cache; room for half the layers fits fewer.
    let plan = std::process::Command::new(vulkan_exe())
        .args(args(
            &base.input,
            &s.path("dry.jsonl"),
            &cache,
            &["--parallel", "1", "--dry-run"],
        ))
        .env("GGML_VK_VISIBLE_DEVICES", "0")
        .env("XDG_CACHE_HOME", test_cache_home())
        .output()
        .unwrap();
    assert!(plan.status.success(), "{plan:?}");
    let plan: Value = serde_json::from_slice(&plan.stdout).unwrap();
    assert!(
        plan["vram"]["planned_bytes"].as_u64().unwrap() > 0,
        "{plan}"
    );
    let part = |name: &str| plan["memory"][name].as_u64().unwrap();
    let budget =
        (part("compute_bytes") + (part("weights_bytes") + part("kv_bytes")) / 2).to_string();
    let fitted = ["--parallel", "1", "--vram-budget", budget.as_str()];

    let mut warm = vec!["cache".to_owned(), "warm".to_owned()];
    warm.extend(args(&base.input, &s.path("warm.jsonl"), &cache, &fitted));
    let o = std::process::Command::new(vulkan_exe())
        .args(&warm)
        .env("GGML_VK_VISIBLE_DEVICES", "0")
        .env("XDG_CACHE_HOME", test_cache_home())
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");

    let out = s.path("fitted.jsonl");
    let sum = run(
        &vulkan_exe(),
        &args(&base.input, &out, &cache, &fitted),
        true,
    );
    let layers = sum["memory"]["gpu_layers"].as_u64().unwrap();
    assert!(layers > 0 && layers < 30, "not fitted down: {sum}");
    assert_eq!(
        tokens(&sum, "prefix_prefilled"),
        0,
        "warm's state missed: {sum}"
    );
    assert_eq!(tokens(&sum, "prefix_restored"), base.prefix_tokens, "{sum}");
}

#[test]
fn a_cpu_run_never_takes_a_state_the_device_wrote() {
    let _lock = model_lock();
    let base = baseline();
    let s = Scratch::new();
    // The plain CPU build (`cargo build --release`, which `make test-vulkan` makes first), and
    // this build with the device hidden: both prefill, beside the device's state.
    let cpu_exe = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/infer-batch");
    assert!(
        cpu_exe.is_file(),
        "{} is missing: build the CPU binary first (cargo build --release)",
        cpu_exe.display()
    );
    for (exe, visible) in [(cpu_exe, true), (vulkan_exe(), false)] {
        let out = s.path("cpu.jsonl");
        let sum = run(
            &exe,
            &args(&base.input, &out, &base.cache, &["--restart"]),
            visible,
        );
        assert_eq!(sum["memory"]["gpu_layers"], 0, "{exe:?}: {sum}");
        assert_eq!(
            tokens(&sum, "prefix_prefilled"),
            base.prefix_tokens,
            "{exe:?}: {sum}"
        );
        assert_eq!(tokens(&sum, "prefix_restored"), 0, "{exe:?}: {sum}");
    }
}

#[test]
fn quantized_keys_run_exactly_on_the_device_where_flash_attention_is_refused() {
    let _lock = model_lock();
    let base = baseline();
    let s = Scratch::new();
    // q8_0 keys with f16 values need no flash attention.
    let q8 = ["--cache-type-k", "q8_0", "--gpu-layers", "all"];
    let one = s.path("q8-p1.jsonl");
    let sum = run(
        &vulkan_exe(),
        &args(
            &base.input,
            &one,
            &s.path("cache"),
            &[&q8[..], &["--parallel", "1"]].concat(),
        ),
        true,
    );
    assert_eq!(sum["memory"]["gpu_layers"], 31, "{sum}");
    assert_eq!(sum["memory"]["kv_cache"]["type_k"], "q8_0", "{sum}");
    let two = s.path("q8-p2.jsonl");
    run(
        &vulkan_exe(),
        &args(
            &base.input,
            &two,
            &s.path("cache"),
            &[&q8[..], &["--parallel", "2"]].concat(),
        ),
        true,
    );
    assert_eq!(
        bodies(&two),
        bodies(&one),
        "q8_0 keys: --parallel 2 differs from 1"
    );
    assert_ne!(
        bodies(&one),
        base.bodies,
        "q8_0 keys left the log probabilities as f16's"
    );

    // lavapipe's shader compiler crashes on llama.cpp's flash-attention shaders: refused, named,
    // before any request runs.
    let out = s.path("fa.jsonl");
    let o = std::process::Command::new(vulkan_exe())
        .args(args(
            &base.input,
            &out,
            &s.path("cache"),
            &["--cache-type-v", "q8_0", "--gpu-layers", "all"],
        ))
        .env("GGML_VK_VISIBLE_DEVICES", "0")
        .env("XDG_CACHE_HOME", test_cache_home())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("llvmpipe") && err.contains("--gpu-layers 0"),
        "{err}"
    );
    assert_eq!(line_count(&out), 0);
}
