//! Checkpoint and resume: a changed input is refused, `status` counts what is there, failed
//! requests are retried only when asked, and SIGTERM stops a run cleanly. Kills at every stage,
//! supervised or not, are in `chaos`.

use std::path::{Path, PathBuf};

use serde_json::json;

use crate::harness::*;

/// Input with greedy and seeded-sampling requests, and one bad line (line 4).
pub fn input(s: &Scratch) -> PathBuf {
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

/// The arguments of a run of `input` into `out`.
pub fn args(s: &Scratch, input: &Path, out: &Path, parallel: &str) -> Vec<String> {
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

#[test]
fn resume_refuses_a_changed_input_and_status_counts() {
    let _lock = model_lock();
    let s = Scratch::new();
    let input = input(&s);
    let out = s.path("out.jsonl");
    let a = args(&s, &input, &out, "2");
    let mut child = spawn(&a);
    assert!(wait_until(&mut child, || line_count(&out) >= 3));
    child.kill().unwrap();
    child.wait().unwrap();

    let mid = status_json(&out);
    let written = line_count(&out) as u64;
    assert!(
        written < 9,
        "the kill interrupted the run ({written} lines)"
    );
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
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_infer-batch"))
        .args(&a)
        .env("XDG_CACHE_HOME", test_cache_home())
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
    assert!(wait_until(&mut child, || line_count(&out) >= 2));
    send_signal("-TERM", i64::from(child.id()));
    let stopped = child.wait_with_output().unwrap();
    // Seven requests of sixteen tokens were left: the signal lands long before the end.
    assert_eq!(
        stopped.status.code(),
        Some(75),
        "{}",
        String::from_utf8_lossy(&stopped.stderr)
    );
    let written = line_count(&out);
    assert!(written < 9, "stopped before the end ({written} lines)");
    assert_eq!(status_json(&out)["status"], "interrupted");
    assert!(
        s.path("out.summary.json").is_file(),
        "summary written on interrupt"
    );
    assert_eq!(spawn(&a).wait().unwrap().code(), Some(1));
    assert_eq!(by_key(&out).len(), 9);
    assert_eq!(status_json(&out)["status"], "completed");
}

/// Runs `args` with the run's log on, and once it starts embedding sends `signal` when one is
/// given. Returns the exit code, and the time from the start of embedding (the signal) to the
/// exit.
fn run_from_embedding(
    args: &[String],
    signal: Option<&str>,
) -> (Option<i32>, std::time::Duration, String) {
    use std::io::BufRead;
    let mut child = spawn_with(args, &[("INFER_BATCH_LOG", "info")]);
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    // Reads to the end, so the child never blocks on a full pipe.
    let reader = std::thread::spawn(move || {
        let mut log = String::new();
        for line in std::io::BufReader::new(stderr).lines() {
            let line = line.unwrap();
            if line.contains("embedding context") {
                tx.send(std::time::Instant::now()).ok();
            }
            log.push_str(&line);
            log.push('\n');
        }
        log
    });
    let embedding = rx.recv_timeout(std::time::Duration::from_secs(600));
    let embedding = embedding.expect("the run made its embedding context");
    if let Some(signal) = signal {
        send_signal(signal, i64::from(child.id()));
    }
    let code = child.wait().unwrap().code();
    let took = embedding.elapsed();
    (code, took, reader.join().unwrap())
}

#[test]
fn sigint_during_a_large_embeddings_request_stops_promptly_and_resumes() {
    let _lock = model_lock();
    let s = Scratch::new();
    let inputs: Vec<String> = (0..80).map(|i| format!("item {i}")).collect();
    let lines = [
        request(
            "before",
            None,
            "Say hi.",
            json!({"max_tokens": 4, "temperature": 0}),
        ),
        json!({"custom_id": "many", "method": "POST", "url": "/v1/embeddings",
               "body": {"input": inputs}})
        .to_string(),
        request(
            "after",
            None,
            "Say bye.",
            json!({"max_tokens": 4, "temperature": 0}),
        ),
    ];
    let input = s.write_lines("in.jsonl", &lines);

    // Uninterrupted: how long embedding every input takes.
    let reference = s.path("reference.jsonl");
    let (code, whole, log) = run_from_embedding(&args(&s, &input, &reference, "1"), None);
    assert_eq!(code, Some(0), "{log}");

    // Interrupted as the first input is embedded: it stops within a piece, not at the end of
    // the request, and writes nothing of it.
    let out = s.path("out.jsonl");
    let a = args(&s, &input, &out, "1");
    let (code, stopping, log) = run_from_embedding(&a, Some("-INT"));
    assert_eq!(code, Some(75), "{log}");
    assert!(
        stopping < whole / 4,
        "stopped {stopping:?} after the signal; the whole request takes {whole:?}"
    );
    assert!(
        !by_key(&out).contains_key("many"),
        "an interrupted request is not written"
    );
    assert_eq!(status_json(&out)["status"], "interrupted");

    // The resumed run completes it: every line once, the same vectors as without a stop.
    assert_eq!(spawn(&a).wait().unwrap().code(), Some(0));
    let (got, want) = (by_key(&out), by_key(&reference));
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        ["after", "before", "many"],
        "every line exactly once"
    );
    let data = |v: &serde_json::Value| v["response"]["body"]["data"].clone();
    assert_eq!(data(&got["many"]).as_array().unwrap().len(), 80);
    assert_eq!(data(&got["many"]), data(&want["many"]));
    assert_eq!(status_json(&out)["status"], "completed");
}
