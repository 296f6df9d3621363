//! Checkpoint and exact resume: kill the run anywhere, run it again, and the output equals an
//! uninterrupted run's, with no request missing or repeated.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::harness::*;

/// Input with greedy and seeded-sampling requests, and one bad line.
fn input(s: &Scratch) -> PathBuf {
    let system = rubric(120);
    let mut lines: Vec<String> = (0..8)
        .map(|i| {
            let body = if i % 2 == 0 {
                json!({"max_tokens": 16, "temperature": 0})
            } else {
                json!({"max_tokens": 16, "temperature": 0.8, "seed": 100 + i})
            };
            request(&format!("r{i}"), Some(&system), &profile(i), body)
        })
        .collect();
    lines.insert(3, "{broken".to_owned());
    s.write_lines("in.jsonl", &lines)
}

fn args(s: &Scratch, input: &Path, out: &Path, parallel: &str) -> Vec<String> {
    let model = model_path();
    [
        "--model",
        model.to_str().unwrap(),
        "--parallel",
        parallel,
        "--prefix-cache-dir",
        s.path("cache").to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        input.to_str().unwrap(),
    ]
    .iter()
    .map(|a| a.to_string())
    .collect()
}

fn spawn(args: &[String]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_infer-batch"))
        .args(args)
        .env("INFER_BATCH_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn line_count(path: &Path) -> usize {
    std::fs::read_to_string(path)
        .map(|t| t.matches('\n').count())
        .unwrap_or(0)
}

/// Waits until the output has at least `lines` lines (or the process ends).
fn wait_for_lines(child: &mut Child, out: &Path, lines: usize) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while line_count(out) < lines && Instant::now() < deadline {
        if child.try_wait().unwrap().is_some() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What must match an uninterrupted run: content, finish reason, usage, or the error code.
fn essence(v: &Value) -> Value {
    if v["error"].is_null() {
        let body = &v["response"]["body"];
        json!([
            body["choices"][0]["message"]["content"],
            body["choices"][0]["finish_reason"],
            body["usage"]
        ])
    } else {
        json!([v["error"]["code"], v["error"]["line"]])
    }
}

/// The output's lines by key, asserting that no key appears twice.
fn by_key(out: &Path) -> BTreeMap<String, Value> {
    let mut map = BTreeMap::new();
    for v in read_results(out) {
        let key = v["custom_id"]
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| format!("line:{}", v["error"]["line"]));
        assert!(
            map.insert(key.clone(), essence(&v)).is_none(),
            "{key} written twice"
        );
    }
    map
}

fn status_json(out: &Path) -> Value {
    let o = infer_batch(&["status", "--json", out.to_str().unwrap()]);
    assert!(o.status.success(), "{o:?}");
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn killed_anywhere_and_resumed_equals_uninterrupted_at_parallel_1_and_4() {
    let _lock = model_lock();
    let s = Scratch::new();
    let input = input(&s);
    let baseline_out = s.path("baseline.jsonl");
    let status = spawn(&args(&s, &input, &baseline_out, "1")).wait().unwrap();
    assert_eq!(status.code(), Some(1), "one bad line");
    let baseline = by_key(&baseline_out);
    assert_eq!(baseline.len(), 9);

    for parallel in ["1", "4"] {
        // Before the first result, mid-run, and mid-run again with a torn last line.
        for (case, kill_after) in [("early", 0), ("mid", 4), ("torn", 6)] {
            let out = s.path(&format!("p{parallel}-{case}.jsonl"));
            let a = args(&s, &input, &out, parallel);
            let mut child = spawn(&a);
            wait_for_lines(&mut child, &out, kill_after);
            child.kill().unwrap(); // SIGKILL: no chance to clean up
            child.wait().unwrap();
            if case == "torn" {
                let mut f = std::fs::OpenOptions::new().append(true).open(&out).unwrap();
                std::io::Write::write_all(&mut f, br#"{"id":"batch_req_x","custom_id":"r9","resp"#)
                    .unwrap();
            }
            let resumed = spawn(&a).wait().unwrap();
            assert_eq!(resumed.code(), Some(1), "p{parallel} {case}");
            assert_eq!(
                by_key(&out),
                baseline,
                "p{parallel} {case}: differs from uninterrupted"
            );
        }
    }

    // After the last result but before the run recorded its end: nothing is redone.
    let out = s.path("late.jsonl");
    let a = args(&s, &input, &out, "4");
    spawn(&a).wait().unwrap();
    let manifest = s.path("late.manifest.json");
    let text = std::fs::read_to_string(&manifest).unwrap();
    std::fs::write(&manifest, text.replace("\"finished\"", "\"running\"")).unwrap();
    let before = std::fs::read(&out).unwrap();
    spawn(&a).wait().unwrap();
    assert_eq!(
        std::fs::read(&out).unwrap(),
        before,
        "a finished output is left alone"
    );
    assert_eq!(by_key(&out), baseline);
}

#[test]
fn resume_refuses_a_changed_input_and_status_counts() {
    let _lock = model_lock();
    let s = Scratch::new();
    let input = input(&s);
    let out = s.path("out.jsonl");
    let a = args(&s, &input, &out, "2");
    let mut child = spawn(&a);
    wait_for_lines(&mut child, &out, 3);
    child.kill().unwrap();
    child.wait().unwrap();

    let mid = status_json(&out);
    let written = line_count(&out) as u64;
    assert_eq!(mid["status"], "in_progress");
    assert_eq!(mid["request_counts"]["total"], 9);
    let c = &mid["request_counts"];
    assert_eq!(
        c["completed"].as_u64().unwrap() + c["failed"].as_u64().unwrap(),
        written
    );
    assert_eq!(mid["remaining"].as_u64().unwrap(), 9 - written);

    // A changed input is refused, with what changed and how to start over.
    let mut text = std::fs::read_to_string(&input).unwrap();
    text.push_str(&request("extra", None, "Hi", json!({"max_tokens": 2})));
    text.push('\n');
    let changed = s.path("changed.jsonl");
    std::fs::write(&changed, &text).unwrap();
    std::fs::rename(&changed, &input).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_infer-batch"))
        .args(&a)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("input file changed") && err.contains("--restart"),
        "{err}"
    );

    // --restart starts over on the new input and finishes it.
    let mut restart = a.clone();
    restart.push("--restart".into());
    assert_eq!(spawn(&restart).wait().unwrap().code(), Some(1));
    let end = status_json(&out);
    assert_eq!(end["status"], "completed");
    assert_eq!(
        end["request_counts"],
        json!({"total": 10, "completed": 9, "failed": 1})
    );
    assert_eq!(end["remaining"], 0);

    // Failed requests are not retried unless asked; retried, they are not duplicated.
    let before = std::fs::read(&out).unwrap();
    spawn(&a).wait().unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), before);
    let mut retry = a.clone();
    retry.push("--retry-failed".into());
    spawn(&retry).wait().unwrap();
    assert_eq!(by_key(&out).len(), 10);
    assert_eq!(status_json(&out)["request_counts"]["failed"], 1);
}

#[test]
fn sigterm_stops_cleanly_with_exit_75_and_resumes() {
    let _lock = model_lock();
    let s = Scratch::new();
    let input = input(&s);
    let out = s.path("out.jsonl");
    let a = args(&s, &input, &out, "2");
    let mut child = spawn(&a);
    wait_for_lines(&mut child, &out, 2);
    let sent = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let code = child.wait().unwrap().code();
    if code == Some(1) {
        return; // it finished before the signal landed: nothing to resume
    }
    assert_eq!(code, Some(75));
    assert_eq!(status_json(&out)["status"], "interrupted");
    assert_eq!(spawn(&a).wait().unwrap().code(), Some(1));
    assert_eq!(by_key(&out).len(), 9);
    assert_eq!(status_json(&out)["status"], "completed");
}

#[test]
fn supervise_restarts_a_killed_worker_and_finishes() {
    let _lock = model_lock();
    let s = Scratch::new();
    let input = input(&s);
    let out = s.path("out.jsonl");
    let mut a = args(&s, &input, &out, "2");
    a.push("--supervise".into());
    let mut supervisor = Command::new(env!("CARGO_BIN_EXE_infer-batch"))
        .args(&a)
        .env("INFER_BATCH_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_lines(&mut supervisor, &out, 2);
    let workers = Command::new("pgrep")
        .args(["-P", &supervisor.id().to_string()])
        .output()
        .unwrap();
    let worker = String::from_utf8_lossy(&workers.stdout).trim().to_owned();
    assert!(!worker.is_empty(), "the supervisor runs a worker");
    Command::new("kill")
        .args(["-KILL", &worker])
        .status()
        .unwrap();
    let result = supervisor.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert_eq!(result.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("restart 1 of"), "{stderr}");
    assert!(stderr.contains("--parallel 2 -> 1"), "{stderr}");
    assert_eq!(by_key(&out).len(), 9, "every request once");
    assert_eq!(status_json(&out)["status"], "completed");
}
