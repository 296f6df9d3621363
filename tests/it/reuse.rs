//! Result reuse. A rerun with `--reuse` copies the results whose computation did not change,
//! byte for byte but for the ids, and computes only the rest; a kill, shards and the merge keep
//! every request's line exactly once. Identical requests within one file are computed once.
//! An earlier output that cannot prove the same computation is refused, naming why.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::harness::*;

/// The first batch: greedy requests, a seeded sampled one, one with log probabilities (floats
/// that must copy exactly) and a JSON-constrained one.
fn first(system: &str) -> Vec<String> {
    (0..10)
        .map(|i| {
            let body = match i {
                3 => json!({"max_tokens": 12, "temperature": 0.9, "seed": 5}),
                4 => {
                    json!({"max_tokens": 6, "temperature": 0, "logprobs": true, "top_logprobs": 2})
                }
                5 => json!({"max_tokens": 24, "temperature": 0,
                            "response_format": {"type": "json_object"}}),
                _ => json!({"max_tokens": 12, "temperature": 0}),
            };
            request(&format!("r{i}"), Some(system), &profile(i), body)
        })
        .collect()
}

/// The rerun: r2 and r7 edited, r10 new, and `twin-of-r1`, r1's request under another id.
fn second(system: &str) -> Vec<String> {
    let mut lines = first(system);
    let greedy = json!({"max_tokens": 12, "temperature": 0});
    lines[2] = request(
        "r2",
        Some(system),
        "Candidate 2: edited profile.",
        greedy.clone(),
    );
    lines[7] = request("r7", Some(system), &profile(70), greedy.clone());
    lines.push(request("r10", Some(system), &profile(10), greedy.clone()));
    lines.push(request("twin-of-r1", Some(system), &profile(1), greedy));
    lines
}

/// Requests the rerun must compute.
const CHANGED: [&str; 3] = ["r2", "r7", "r10"];

fn run(s: &Scratch, input: &Path, out: &str, extra: &[&str]) -> BTreeMap<String, Value> {
    let mut args = vec!["--parallel", "2"];
    args.extend_from_slice(extra);
    let (o, lines) = run_batch(s, input, out, &args);
    assert!(o.status.success(), "{o:?}");
    lines
}

/// Every output line by `custom_id`, as text, with the run's `created` time set to 0: what two
/// runs of the same computation must agree on byte for byte.
fn texts(path: &Path) -> BTreeMap<String, String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|line| {
            let v: Value = serde_json::from_str(line).unwrap();
            let mut text = line.to_owned();
            // Chat and completions say `created`, a Responses object `created_at`.
            for key in ["created", "created_at"] {
                let at = &v["response"]["body"][key];
                if !at.is_null() {
                    text = text.replacen(&format!("\"{key}\":{at}"), &format!("\"{key}\":0"), 1);
                }
            }
            (v["custom_id"].as_str().unwrap().to_owned(), text)
        })
        .collect()
}

fn counts(s: &Scratch, out: &str) -> (u64, u64, u64, u64) {
    let r = &summary(s, out)["requests"];
    let n = |k: &str| r[k].as_u64().unwrap();
    (n("ok"), n("failed"), n("reused"), n("deduplicated"))
}

fn completion_tokens(lines: &BTreeMap<String, Value>, ids: &[&str]) -> u64 {
    ids.iter()
        .map(|id| usage(&lines[*id], "completion_tokens"))
        .sum()
}

/// Runs the first batch; returns the rerun's input and the first run's output.
fn first_run(s: &Scratch) -> (PathBuf, PathBuf) {
    let system = rubric(100);
    let a = s.write_lines("a.jsonl", &first(&system));
    let b = s.write_lines("b.jsonl", &second(&system));
    run(s, &a, "a.out.jsonl", &[]);
    (b, s.path("a.out.jsonl"))
}

#[test]
fn a_rerun_copies_what_did_not_change_and_equals_a_fresh_run() {
    let _lock = model_lock();
    let s = Scratch::new();
    let (b, a_out) = first_run(&s);

    let reran = run(&s, &b, "b.out.jsonl", &["--reuse", a_out.to_str().unwrap()]);
    // Eight unchanged requests and the twin of r1 are copied; three are computed.
    assert_eq!(counts(&s, "b.out.jsonl"), (12, 0, 9, 0));
    let tokens = &summary(&s, "b.out.jsonl")["tokens"];
    assert_eq!(
        tokens["completion"].as_u64().unwrap(),
        completion_tokens(&reran, &CHANGED),
        "the token counters count only what was computed: {tokens}"
    );

    // A fresh run of the same batch, every request computed, writes the same bytes.
    let fresh = run(&s, &b, "fresh.out.jsonl", &["--no-dedup"]);
    assert_eq!(counts(&s, "fresh.out.jsonl"), (12, 0, 0, 0));
    let want = texts(&s.path("fresh.out.jsonl"));
    assert_eq!(texts(&s.path("b.out.jsonl")), want);
    assert_ne!(content(&fresh["r4"]), "", "{:?}", fresh["r4"]);
    assert!(fresh["r4"]["response"]["body"]["choices"][0]["logprobs"].is_object());
    assert!(fresh["r1"]["computation"].is_string());
    assert_eq!(
        fresh["r1"]["computation"],
        fresh["twin-of-r1"]["computation"]
    );
    assert_ne!(fresh["r1"]["computation"], fresh["r2"]["computation"]);

    // Without --reuse, identical requests in one file are computed once: the twin waits for
    // r1 (or copies its line) and gets what it would have computed.
    run(&s, &b, "dedup.out.jsonl", &[]);
    assert_eq!(counts(&s, "dedup.out.jsonl"), (12, 0, 0, 1));
    assert_eq!(texts(&s.path("dedup.out.jsonl")), want);

    // Shards reuse too, and their merge equals the fresh run.
    let main = s.path("sharded.jsonl");
    for k in 0..2 {
        let shard = format!("{k}/2");
        let args = ["--shard", &shard, "--reuse", a_out.to_str().unwrap()];
        run(&s, &b, "sharded.jsonl", &args);
    }
    let o = infer_batch(&["merge", main.to_str().unwrap()]);
    assert!(o.status.success(), "{o:?}");
    assert_eq!(texts(&main), want);
}

fn line(custom_id: &str, url: &str, body: Value) -> String {
    json!({"custom_id": custom_id, "method": "POST", "url": url, "body": body}).to_string()
}

#[test]
fn completions_responses_and_embeddings_are_reused_exactly() {
    let _lock = model_lock();
    let s = Scratch::new();
    let system = rubric(30);
    let header = format!("{system}\nGrade each profile from 0 to 3.\n");
    let batch = |edited: &str| {
        vec![
            line(
                "c1",
                "/v1/completions",
                json!({"prompt": format!("{header}Profile: {}\nScore:", profile(1)),
                       "max_tokens": 6, "temperature": 0, "logprobs": 2}),
            ),
            line(
                "c2",
                "/v1/completions",
                json!({"prompt": format!("{header}Profile: {edited}\nScore:"),
                       "max_tokens": 6, "temperature": 0}),
            ),
            line(
                "p1",
                "/v1/responses",
                json!({"instructions": system, "input": profile(3),
                       "max_output_tokens": 8, "temperature": 0}),
            ),
            line(
                "e1",
                "/v1/embeddings",
                json!({"input": [profile(4), "a second input"], "encoding_format": "base64"}),
            ),
            line("e2", "/v1/embeddings", json!({"input": profile(5)})),
        ]
    };
    let a = s.write_lines("a.jsonl", &batch(&profile(2)));
    let b = s.write_lines("b.jsonl", &batch("an edited profile"));
    run(&s, &a, "a.out.jsonl", &[]);
    let a_out = s.path("a.out.jsonl");
    let reran = run(&s, &b, "b.out.jsonl", &["--reuse", a_out.to_str().unwrap()]);
    assert_eq!(counts(&s, "b.out.jsonl"), (5, 0, 4, 0), "{reran:?}");
    run(&s, &b, "fresh.out.jsonl", &["--no-dedup"]);
    let want = texts(&s.path("fresh.out.jsonl"));
    assert_eq!(texts(&s.path("b.out.jsonl")), want);
    assert!(
        want["e1"].contains("\"embedding\":\""),
        "base64: {}",
        want["e1"]
    );
    assert!(want["c1"].contains("\"text_offset\""), "{}", want["c1"]);
}

#[test]
fn a_killed_rerun_with_reuse_resumes_to_every_line_once() {
    let _lock = model_lock();
    let s = Scratch::new();
    let (b, a_out) = first_run(&s);
    let out = s.path("b.out.jsonl");
    let mut args = crate::resume::args(&s, &b, &out, "1");
    args.extend(["--reuse".to_owned(), a_out.to_str().unwrap().to_owned()]);

    // Copies and computed lines interleave (a copy is read when a slot frees); kill midway.
    let mut child = spawn(&args);
    assert!(wait_until(&mut child, || line_count(&out) >= 4));
    send_signal("-KILL", i64::from(child.id()));
    child.wait().unwrap();
    let before = line_count(&out);
    assert!(before < 12, "the kill landed after the end");

    assert_eq!(spawn(&args).wait().unwrap().code(), Some(0));
    let lines = read_results(&out);
    let mut ids: Vec<&str> = lines
        .iter()
        .map(|v| v["custom_id"].as_str().unwrap())
        .collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!((ids.len(), lines.len()), (12, 12), "every request once");
    let (ok, failed, _, _) = counts(&s, "b.out.jsonl");
    assert_eq!(
        (ok + failed) as usize,
        12 - before,
        "the resumed run wrote only what was missing"
    );

    run(&s, &b, "fresh.out.jsonl", &["--no-dedup"]);
    assert_eq!(texts(&out), texts(&s.path("fresh.out.jsonl")));
}

#[test]
fn an_output_that_cannot_prove_the_same_computation_is_refused() {
    let _lock = model_lock();
    let s = Scratch::new();
    let system = rubric(20);
    let input = s.write_lines("in.jsonl", &first(&system)[..1]);
    run(&s, &input, "a.out.jsonl", &[]);
    let refused = |earlier: &Path, extra: &[&str]| {
        let mut args = vec!["--reuse", earlier.to_str().unwrap(), "--restart"];
        args.extend_from_slice(extra);
        let (o, _) = run_batch(&s, &input, "b.out.jsonl", &args);
        assert_eq!(o.status.code(), Some(2), "{o:?}");
        String::from_utf8_lossy(&o.stderr).into_owned()
    };

    let bare = copy_output(&s, "a.out.jsonl", "bare.jsonl", None);
    let e = refused(&bare, &[]);
    assert!(e.contains("no manifest"), "{e}");

    let other = copy_output(
        &s,
        "a.out.jsonl",
        "other.jsonl",
        Some(("settings", "batch-size", json!(64))),
    );
    let e = refused(&other, &[]);
    assert!(e.contains("--batch-size was 64"), "{e}");

    let mixed = copy_output(
        &s,
        "a.out.jsonl",
        "mixed.jsonl",
        Some(("settings", "deterministic", json!(false))),
    );
    let e = refused(&mixed, &[]);
    assert!(e.contains("--no-deterministic"), "{e}");

    // Computed on another machine (here: every layer on a GPU): its bits may differ, so
    // nothing is copied, and the refusal comes before anything is written.
    let gpu = copy_output(
        &s,
        "a.out.jsonl",
        "gpu.jsonl",
        Some(("machine", "gpu-layers", json!(31))),
    );
    let e = refused(&gpu, &[]);
    assert!(e.contains("the machine's gpu-layers was 31, now 0"), "{e}");
    let device = copy_output(
        &s,
        "a.out.jsonl",
        "device.jsonl",
        Some(("machine", "devices", json!(["Vulkan0: llvmpipe"]))),
    );
    let e = refused(&device, &[]);
    assert!(
        e.contains("the machine's devices was [\"Vulkan0: llvmpipe\"]"),
        "{e}"
    );
    for leftover in ["b.out.jsonl", "b.out.manifest.json", "b.out.summary.json"] {
        assert!(!s.path(leftover).exists(), "{leftover} left behind");
    }

    // A FIFO is never read (it would block), a link finds the manifest beside its target.
    let fifo = s.path("fifo.jsonl");
    assert!(std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let e = refused(&fifo, &[]);
    assert!(e.contains("not a regular file"), "{e}");
    std::fs::create_dir(s.path("links")).unwrap();
    let link = s.path("links/a.jsonl");
    std::os::unix::fs::symlink(s.path("a.out.jsonl"), &link).unwrap();
    let (o, _) = run_batch(
        &s,
        &input,
        "c.out.jsonl",
        &["--reuse", link.to_str().unwrap()],
    );
    assert!(o.status.success(), "{o:?}");
    assert_eq!(
        counts(&s, "c.out.jsonl").2,
        1,
        "the linked output's line was copied"
    );

    let e = refused(&s.path("a.out.jsonl"), &["--no-deterministic"]);
    assert!(e.contains("--reuse") && e.contains("deterministic"), "{e}");
}

#[test]
fn a_resume_on_another_machine_is_refused_unless_accepted() {
    let _lock = model_lock();
    let s = Scratch::new();
    let input = s.write_lines("in.jsonl", &first(&rubric(20))[..2]);
    run(&s, &input, "a.out.jsonl", &[]);
    // The output's lines as another machine would have left them.
    let manifest = s.path("a.out.manifest.json");
    let mut m: Value = serde_json::from_str(&std::fs::read_to_string(&manifest).unwrap()).unwrap();
    let ours = m["identity"]["machine"].clone();
    m["identity"]["machine"]["backend"] = json!("cpu+vulkan");
    m["identity"]["machine"]["gpu-layers"] = json!(31);
    std::fs::write(&manifest, m.to_string()).unwrap();
    let (o, _) = run_batch(&s, &input, "a.out.jsonl", &[]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("another machine")
            && e.contains("the machine's backend was \"cpu+vulkan\", now \"cpu\"")
            && e.contains("--resume-anywhere"),
        "{e}"
    );
    let (o, _) = run_batch(&s, &input, "a.out.jsonl", &["--resume-anywhere"]);
    assert!(o.status.success(), "{o:?}");
    let summary = summary(&s, "a.out.jsonl");
    assert_eq!(summary["other_machines"][0]["backend"], json!("cpu+vulkan"));
    assert_eq!(summary["identity"]["machine"], ours);
    let m: Value = serde_json::from_str(&std::fs::read_to_string(&manifest).unwrap()).unwrap();
    assert_eq!(m["resume_anywhere"], json!(true));
}

/// Copies an output, with its manifest (one field of its identity's `section` changed) unless
/// `manifest` is `None`.
fn copy_output(
    s: &Scratch,
    from: &str,
    to: &str,
    manifest: Option<(&str, &str, Value)>,
) -> PathBuf {
    let path = s.path(to);
    std::fs::copy(s.path(from), &path).unwrap();
    if let Some((section, key, value)) = manifest {
        let name = |f: &str| s.path(&f.replace(".jsonl", ".manifest.json"));
        let mut m: Value =
            serde_json::from_str(&std::fs::read_to_string(name(from)).unwrap()).unwrap();
        m["identity"][section][key] = value;
        std::fs::write(name(to), m.to_string()).unwrap();
    }
    path
}
