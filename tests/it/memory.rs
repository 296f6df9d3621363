//! Memory safety: the preflight plan against llama.cpp's own numbers, degrading or refusing a
//! plan that does not fit, bounded memory on huge inputs, and a summary that adds up.

use std::io::Write;
use std::path::Path;

use serde_json::{json, Value};

use crate::harness::*;

fn dry_run(input: &Path, extra: &[&str]) -> (std::process::Output, Option<Value>) {
    let model = model_path();
    let mut args = vec![
        "--model",
        model.to_str().unwrap(),
        "--dry-run",
        input.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let out = infer_batch(&args);
    let plan = serde_json::from_slice(&out.stdout).ok();
    (out, plan)
}

fn small_batch(s: &Scratch, n: usize) -> std::path::PathBuf {
    let system = rubric(100);
    let lines: Vec<String> = (0..n)
        .map(|i| {
            request(
                &format!("m{i}"),
                Some(&system),
                &profile(i),
                json!({"max_tokens": 8, "temperature": 0}),
            )
        })
        .collect();
    s.write_lines("in.jsonl", &lines)
}

/// The largest number after `marker` in llama.cpp's log, in MiB: a deterministic run makes the
/// decode-group probe's context, then its own, and the plan holds the larger of the two.
fn logged_mib(log: &str, marker: &str) -> f64 {
    let sizes: Vec<f64> = log
        .match_indices(marker)
        .filter_map(|(at, _)| {
            log[at + marker.len()..]
                .split(|c: char| !(c.is_ascii_digit() || c == '.'))
                .find(|t| !t.is_empty())
                .and_then(|t| t.parse().ok())
        })
        .collect();
    assert!(
        !sizes.is_empty(),
        "llama.cpp did not log {marker:?}:\n{}",
        &log[log.len().saturating_sub(3000)..]
    );
    sizes.into_iter().fold(0.0, f64::max)
}

#[test]
fn preflight_matches_llama_cpp_buffer_sizes() {
    let _lock = model_lock();
    let s = Scratch::new();
    let input = small_batch(&s, 2);
    for mode in [&[][..], &["--no-deterministic"][..]] {
        let mut extra = vec!["-v"];
        extra.extend_from_slice(mode);
        let (o, results) = run_batch(
            &s,
            &input,
            "out.jsonl",
            &[&extra[..], &["--restart"]].concat(),
        );
        assert!(o.status.success(), "{o:?}");
        assert_eq!(results.len(), 2);
        let log = String::from_utf8_lossy(&o.stderr);
        let planned = &summary(&s, "out.jsonl")["memory"]["planned"];
        let mib = |v: &Value| v.as_f64().unwrap() / f64::from(1 << 20);
        let kv = logged_mib(&log, "CPU KV buffer size =");
        let compute = logged_mib(&log, "CPU compute buffer size =");
        // The KV cache is exact arithmetic; the compute buffer is an estimate within 20%.
        let kv_planned = mib(&planned["kv_bytes"]);
        assert!(
            (kv_planned - kv).abs() <= kv * 0.01 + 0.1,
            "{mode:?}: KV planned {kv_planned} vs {kv}"
        );
        let compute_planned = mib(&planned["compute_bytes"]);
        assert!(
            (compute_planned - compute).abs() <= compute * 0.2,
            "{mode:?}: compute planned {compute_planned} vs {compute}"
        );
    }
}

#[test]
fn a_plan_that_does_not_fit_degrades_parallel_or_exits_2() {
    let _lock = model_lock();
    let s = Scratch::new();
    let input = small_batch(&s, 4);
    // Enough slots that their KV cache outgrows the decode-group probe's, which the plan holds
    // at any --parallel.
    let (o, plan) = dry_run(&input, &["--parallel", "128"]);
    assert!(o.status.success(), "{o:?}");
    let plan = plan.unwrap();
    assert_eq!(plan["parallel"], 128);
    let total = plan["memory"]["total_bytes"].as_u64().unwrap();
    let weights = plan["memory"]["weights_bytes"].as_u64().unwrap();

    // A budget just under the 128-slot plan: fewer slots, same job.
    let budget = (total - 1).to_string();
    let (o, lowered) = dry_run(&input, &["--parallel", "128", "--memory-budget", &budget]);
    assert!(o.status.success(), "{o:?}");
    let lowered = lowered.unwrap();
    let p = lowered["parallel"].as_u64().unwrap();
    assert!((1..128).contains(&p), "{lowered}");
    assert!(lowered["memory"]["total_bytes"].as_u64().unwrap() < total);
    assert!(String::from_utf8_lossy(&o.stderr).contains("lowered --parallel from 128"));

    // A budget under the weights alone: exit 2, with the numbers and what to change.
    let tiny = (weights / 2).to_string();
    let (o, _) = dry_run(&input, &["--memory-budget", &tiny]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("not enough memory")
            && err.contains("weights")
            && err.contains("--memory-budget"),
        "{err}"
    );
}

#[test]
fn peak_rss_does_not_grow_with_the_number_of_requests() {
    let _lock = model_lock();
    let s = Scratch::new();
    let write = |name: &str, n: usize| {
        let path = s.path(name);
        let mut f = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
        for i in 0..n {
            let line = json!({"custom_id": format!("c{i}"), "messages": [
                {"role": "system", "content": "Grade the candidate from 0 to 3."},
                {"role": "user", "content": format!("Candidate {i}: {} years of Rust.", i % 17)}
            ], "max_tokens": 1});
            writeln!(f, "{line}").unwrap();
        }
        path
    };
    let small = write("small.jsonl", 1_000);
    let huge = write("huge.jsonl", 200_000);
    let peak = |input: &Path| {
        let (o, plan) = dry_run(input, &[]);
        assert!(o.status.success(), "{o:?}");
        let plan = plan.unwrap();
        (
            plan["requests"].as_u64().unwrap(),
            plan["peak_rss_bytes"].as_u64().unwrap(),
        )
    };
    let (n_small, rss_small) = peak(&small);
    let (n_huge, rss_huge) = peak(&huge);
    assert_eq!((n_small, n_huge), (1_000, 200_000));
    // Stated bound: 200 times the requests cost under 32 MiB more, and the whole process stays
    // under the model plus 160 MiB.
    let model_bytes = std::fs::metadata(model_path()).unwrap().len();
    assert!(
        rss_huge <= rss_small + (32 << 20),
        "{rss_small} -> {rss_huge}"
    );
    assert!(rss_huge <= model_bytes + (160 << 20), "{rss_huge}");
}

#[test]
fn summary_agrees_with_the_result_lines() {
    let _lock = model_lock();
    let s = Scratch::new();
    let mut lines: Vec<String> = (0..5)
        .map(|i| {
            request(
                &format!("u{i}"),
                Some(&rubric(60)),
                &profile(i),
                json!({"max_tokens": 6, "temperature": 0}),
            )
        })
        .collect();
    lines.push("not json".into());
    let input = s.write_lines("in.jsonl", &lines);
    let (o, results) = run_batch(&s, &input, "out.jsonl", &[]);
    assert_eq!(o.status.code(), Some(1));
    let sum = summary(&s, "out.jsonl");
    let ok: Vec<&Value> = results.values().filter(|v| v["error"].is_null()).collect();
    let total = |f: &str| ok.iter().map(|v| usage(v, f)).sum::<u64>();
    assert_eq!(sum["requests"]["ok"], ok.len());
    assert_eq!(sum["requests"]["failed"], 1);
    assert_eq!(sum["requests"]["failed_by_code"]["invalid_json"], 1);
    assert_eq!(sum["tokens"]["completion"], total("completion_tokens"));
    assert_eq!(sum["tokens"]["prompt_reused"], total("cached_tokens"));
    let computed = sum["tokens"]["prompt_computed"].as_u64().unwrap();
    let prefix = sum["tokens"]["prefix_prefilled"].as_u64().unwrap();
    // Every prompt token was either reused or computed; the prefix was computed once.
    assert_eq!(
        computed + total("cached_tokens"),
        total("prompt_tokens") + prefix
    );
    assert!(sum["memory"]["peak_rss_bytes"].as_u64().unwrap() > 0);
    assert!(sum["time_to_first_token_seconds"]["p50"].as_f64().unwrap() > 0.0);
}

#[test]
fn offloaded_layers_are_planned_against_vram_or_said_to_be_cpu_only() {
    let _lock = model_lock();
    let s = Scratch::new();
    let input = small_batch(&s, 2);
    let (o, plan) = dry_run(&input, &["--gpu-layers", "10"]);
    assert!(o.status.success(), "{o:?}");
    let plan = plan.unwrap();
    match infer_batch::plan::memory::gpu_memory() {
        devices if !devices.is_empty() => {
            assert_eq!(plan["gpu_layers"], 10, "{plan}");
            assert!(
                plan["vram"]["planned_bytes"].as_u64().unwrap() > 0,
                "{plan}"
            );
        }
        _ => {
            // No GPU backend or device here: one clear line, and a plan for the CPU.
            assert!(plan["vram"].is_null(), "{plan}");
            assert_eq!(plan["gpu_layers"], 0, "{plan}");
            let err = String::from_utf8_lossy(&o.stderr);
            assert_eq!(err.matches("no GPU:").count(), 1, "{err}");
            assert!(err.contains("running on the CPU"), "{err}");
        }
    }
}

#[test]
fn the_plan_counts_the_embedding_context_only_when_the_input_has_embeddings() {
    let _lock = model_lock();
    // Without the decode-group probe, whose session (where it will run) can be the larger
    // and hide the sum; the embedding context is counted alike in both modes.
    const ND: &str = "--no-deterministic";
    let s = Scratch::new();
    let chat = small_batch(&s, 2);
    let mut lines: Vec<String> = std::fs::read_to_string(&chat)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    lines.push(
        json!({"custom_id": "e", "method": "POST", "url": "/v1/embeddings",
               "body": {"input": "Embed me."}})
        .to_string(),
    );
    let mixed = s.write_lines("mixed.jsonl", &lines);
    let (o, without) = dry_run(&chat, &[ND]);
    assert!(o.status.success(), "{o:?}");
    let (o, with) = dry_run(&mixed, &[ND]);
    assert!(o.status.success(), "{o:?}");
    let (without, with) = (without.unwrap(), with.unwrap());
    assert!(without["embedding_context"].is_null(), "{without}");
    let e = &with["embedding_context"];
    assert_eq!(
        e["n_ctx"], 2048,
        "SmolLM2's trained context, capped: {with}"
    );
    let part = |plan: &Value, f: &str| plan["memory"][f].as_u64().unwrap();
    let (kv, compute) = (
        e["kv_bytes"].as_u64().unwrap(),
        e["compute_bytes"].as_u64().unwrap(),
    );
    // Its cache: 2,048 cells of 23,040 bytes (30 layers, K and V, 3 heads of 64, f16).
    assert_eq!(kv, 2048 * 23_040);
    assert!(compute > 0);
    // The same plan otherwise, with its buffers on top; the weights are shared.
    assert_eq!(with["parallel"], without["parallel"]);
    assert_eq!(
        part(&with, "weights_bytes"),
        part(&without, "weights_bytes")
    );
    assert_eq!(part(&with, "kv_bytes"), part(&without, "kv_bytes") + kv);
    assert_eq!(
        part(&with, "compute_bytes"),
        part(&without, "compute_bytes") + compute
    );
    assert_eq!(
        part(&with, "total_bytes"),
        part(&without, "total_bytes") + kv + compute
    );
    // A budget that holds one slot of the chat plan but not the embedding context beside it:
    // the chat input fits, the mixed one does not, and the message says why.
    let (_, one) = dry_run(&chat, &[ND, "--parallel", "1"]);
    let budget = (part(&one.unwrap(), "total_bytes") + kv + compute - 1).to_string();
    let (o, _) = dry_run(&chat, &[ND, "--parallel", "1", "--memory-budget", &budget]);
    assert!(o.status.success(), "{o:?}");
    let (o, _) = dry_run(&mixed, &[ND, "--parallel", "1", "--memory-budget", &budget]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("the embedding context's"),
        "{o:?}"
    );
}

#[test]
fn the_embedding_context_is_planned_as_llama_cpp_allocates_it() {
    let _lock = model_lock();
    let s = Scratch::new();
    let line = json!({"custom_id": "e", "method": "POST", "url": "/v1/embeddings",
                      "body": {"input": "Embed me."}});
    let input = s.write_lines("in.jsonl", &[line.to_string()]);
    let (_, plan) = dry_run(&input, &[]);
    let plan = plan.unwrap();
    let (o, results) = run_batch(&s, &input, "out.jsonl", &["-v", "--parallel", "1"]);
    assert!(o.status.success(), "{o:?}");
    assert_eq!(results.len(), 1);
    // The embedding context is the second one made: its buffers are logged after the run's.
    let log = String::from_utf8_lossy(&o.stderr);
    let at = log
        .find("embedding context:")
        .expect("the run says when it makes the embedding context");
    let log = &log[at..];
    let kv = logged_mib(log, "CPU KV buffer size =");
    let compute = logged_mib(log, "CPU compute buffer size =");
    let mib = |v: &Value| v.as_f64().unwrap() / f64::from(1 << 20);
    let e = &plan["embedding_context"];
    assert!(
        (mib(&e["kv_bytes"]) - kv).abs() <= 0.1,
        "KV {e} vs {kv} MiB"
    );
    assert!(
        (mib(&e["compute_bytes"]) - compute).abs() <= compute * 0.2,
        "compute {e} vs {compute} MiB"
    );
}

#[test]
fn the_plan_holds_the_probes_session_only_where_the_probe_will_run() {
    let _lock = model_lock();
    let s = Scratch::new();
    let input = small_batch(&s, 2);
    let model = model_path();
    // An own cache directory: nothing is remembered in it at first.
    let xdg = s.path("xdg");
    let run = |extra: &[&str]| {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_infer-batch"))
            .args(["--model", model.to_str().unwrap(), input.to_str().unwrap()])
            .args(extra)
            .env("INFER_BATCH_LOG", "warn")
            .env("XDG_CACHE_HOME", &xdg)
            .output()
            .unwrap();
        assert!(o.status.success(), "{o:?}");
        o
    };
    let kv = |o: &std::process::Output| {
        let plan: Value = serde_json::from_slice(&o.stdout).unwrap();
        plan["memory"]["kv_bytes"].as_u64().unwrap()
    };
    let before = kv(&run(&["--dry-run", "--parallel", "1"]));
    // The probe's session: 33 streams of 512 cells of 23,040 bytes (SmolLM2, f16).
    assert_eq!(before, 33 * 512 * 23_040);
    run(&[
        "-o",
        s.path("out.jsonl").to_str().unwrap(),
        "--parallel",
        "1",
    ]);
    let after = kv(&run(&["--dry-run", "--parallel", "1"]));
    assert!(
        after < before / 4,
        "the run's own cache: {after} of {before}"
    );
    let sum = summary(&s, "out.jsonl");
    assert!(sum["decode_groups"]["remembered_from"].is_null(), "{sum}");
}
