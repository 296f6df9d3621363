//! `infer-batch serve` on loopback, driven by the real openai SDK (tests/openai/batch_api.py):
//! results equal the command line's, a SIGKILL of the server or of its worker loses and repeats
//! nothing, cancel keeps what finished, bad requests get the right status, and the status page
//! renders a running batch in a real headless browser.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::endpoints::{assert_openai_types, sdk_python};
use crate::harness::*;

const FLAGS: [&str; 6] = ["--max-tokens", "24", "--parallel", "2", "--threads", "2"];

/// A running server and where it keeps its data.
struct Server {
    child: Child,
    base: String,
    log: PathBuf,
}

impl Server {
    fn start(scratch: &Scratch, data: &str, extra: &[&str]) -> Self {
        let model = model_path();
        let log = scratch.path(&format!("{data}.serve.log"));
        let mut args = vec![
            "serve".to_string(),
            "--model".into(),
            model.to_string_lossy().into(),
            "--port".into(),
            "0".into(),
            "--data-dir".into(),
            scratch.path(data).to_string_lossy().into(),
            "--prefix-cache-dir".into(),
            scratch.path("prefix-cache").to_string_lossy().into(),
        ];
        args.extend(FLAGS.iter().chain(extra).map(|s| s.to_string()));
        let child = Command::new(env!("CARGO_BIN_EXE_infer-batch"))
            .args(&args)
            .env("INFER_BATCH_LOG", "warn")
            .env("XDG_CACHE_HOME", test_cache_home())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start the server");
        let mut server = Self {
            child,
            base: String::new(),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while server.base.is_empty() {
            let text = std::fs::read_to_string(&server.log).unwrap_or_default();
            if let Some(rest) = text.split("serving the Batch API on ").nth(1) {
                server.base = rest.split_whitespace().next().unwrap().to_owned();
            }
            assert!(
                server.child.try_wait().unwrap().is_none() && Instant::now() < deadline,
                "the server did not start: {text}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }

    /// The engine process (the supervisor) the server runs now, and its worker.
    fn engine(&self) -> Option<(i64, i64)> {
        let supervisor = worker_of(self.child.id())?;
        Some((supervisor, worker_of(supervisor as u32)?))
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs batch_api.py with `args`; fails the test with its output when it fails.
fn sdk(args: &[&str], env: &[(&str, &str)]) -> Output {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/openai/batch_api.py");
    let o = Command::new(sdk_python())
        .arg(script)
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run batch_api.py");
    assert!(
        o.status.success(),
        "batch_api.py {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim().to_owned()
}

/// Requests sharing one rubric, each with its own profile; `bad` of them ask for a
/// temperature the engine refuses, so they end in the error file.
fn input(scratch: &Scratch, name: &str, n: usize, bad: &[usize]) -> PathBuf {
    let system = rubric(120);
    let lines: Vec<String> = (0..n)
        .map(|i| {
            let body = if bad.contains(&i) {
                json!({"temperature": "hot"})
            } else {
                json!({"temperature": 0.7, "seed": i})
            };
            request(&format!("req-{i}"), Some(&system), &profile(i), body)
        })
        .collect();
    scratch.write_lines(name, &lines)
}

/// The output and error files of a downloaded batch, as one output's essences.
fn downloaded(scratch: &Scratch, dir: &str) -> BTreeMap<String, Value> {
    let joined = scratch.path(&format!("{dir}.joined.jsonl"));
    let mut text = String::new();
    for name in ["output.jsonl", "error.jsonl"] {
        text += &std::fs::read_to_string(scratch.path(dir).join(name)).unwrap_or_default();
    }
    std::fs::write(&joined, text).unwrap();
    essences(&joined)
}

/// The command line's results on the same input and flags.
fn reference(scratch: &Scratch, input: &Path) -> BTreeMap<String, Value> {
    let (o, _) = run_batch(scratch, input, "cli.jsonl", &FLAGS);
    assert!(o.status.code().is_some_and(|c| c <= 1), "{o:?}");
    essences(&scratch.path("cli.jsonl"))
}

#[test]
fn the_sdk_round_trip_equals_the_command_line_and_a_second_batch_restores_the_prefix() {
    let _guard = model_lock();
    let scratch = Scratch::new();
    let input = input(&scratch, "in.jsonl", 5, &[3]);
    let server = Server::start(&scratch, "data", &[]);
    let first = sdk(
        &[
            "run",
            &server.base,
            input.to_str().unwrap(),
            "/v1/chat/completions",
            scratch.path("first").to_str().unwrap(),
        ],
        &[],
    );
    let batch: Value = serde_json::from_str(&stdout(&first)).unwrap();
    assert_eq!(batch["status"], "completed", "{batch}");
    assert_eq!(
        batch["request_counts"],
        json!({"total": 5, "completed": 4, "failed": 1})
    );
    for stamp in [
        "created_at",
        "in_progress_at",
        "finalizing_at",
        "completed_at",
    ] {
        assert!(batch[stamp].as_u64().is_some(), "{stamp}: {batch}");
    }
    let errors = read_results(&scratch.path("first").join("error.jsonl"));
    assert_eq!(errors.len(), 1, "the refused request is in the error file");
    assert_eq!(errors[0]["custom_id"], "req-3");
    assert_openai_types(&scratch.path("first").join("output.jsonl"));
    assert_eq!(downloaded(&scratch, "first"), reference(&scratch, &input));

    // The same rubric again: its prefix state is restored, none of it prefilled.
    let second = sdk(
        &[
            "run",
            &server.base,
            input.to_str().unwrap(),
            "/v1/chat/completions",
            scratch.path("second").to_str().unwrap(),
        ],
        &[],
    );
    let batch: Value = serde_json::from_str(&stdout(&second)).unwrap();
    let folder = scratch
        .path("data/batches")
        .join(batch["id"].as_str().unwrap());
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(folder.join("output.summary.json")).unwrap())
            .unwrap();
    assert_eq!(summary["tokens"]["prefix_prefilled"], 0, "{summary}");
    assert!(
        summary["tokens"]["prefix_restored"].as_u64().unwrap() > 0,
        "{summary}"
    );
    let out = read_results(&scratch.path("second").join("output.jsonl"));
    assert!(out.iter().all(|l| usage(l, "cached_tokens") > 0));
    assert_eq!(
        downloaded(&scratch, "second"),
        downloaded(&scratch, "first")
    );
}

#[test]
fn a_sigkill_of_the_worker_and_then_of_the_server_loses_and_repeats_nothing() {
    let _guard = model_lock();
    let scratch = Scratch::new();
    let input = input(&scratch, "in.jsonl", 12, &[5]);
    let expected = reference(&scratch, &input);
    let mut server = Server::start(&scratch, "data", &[]);
    let id = stdout(&sdk(
        &[
            "submit",
            &server.base,
            input.to_str().unwrap(),
            "/v1/chat/completions",
        ],
        &[],
    ));
    sdk(&["progress", &server.base, &id, "2"], &[]);
    let (_, worker) = server.engine().expect("an engine runs the batch");
    send_signal("-KILL", worker);
    sdk(&["progress", &server.base, &id, "6"], &[]);
    let before = get_json(&server.base, &format!("/v1/batches/{id}"));
    server.kill();
    assert_eq!(
        before["status"], "in_progress",
        "killed mid-batch: {before}"
    );
    let done = &before["request_counts"];
    let done = done["completed"].as_u64().unwrap() + done["failed"].as_u64().unwrap();
    assert!(done < 12, "killed mid-batch: {before}");
    let server = Server::start(&scratch, "data", &[]);
    let done = sdk(
        &[
            "wait",
            &server.base,
            &id,
            scratch.path("out").to_str().unwrap(),
        ],
        &[],
    );
    let batch: Value = serde_json::from_str(&stdout(&done)).unwrap();
    assert_eq!(batch["status"], "completed", "{batch}");
    assert_eq!(
        batch["request_counts"],
        json!({"total": 12, "completed": 11, "failed": 1})
    );
    // `essences` refuses a request written twice; equality means none is missing.
    assert_eq!(downloaded(&scratch, "out"), expected);
    let log =
        std::fs::read_to_string(scratch.path("data/batches").join(&id).join("engine.log")).unwrap();
    // Once after the worker's SIGKILL, once after the server's.
    assert!(
        log.matches("resumed:").count() >= 2,
        "the batch resumed twice: {log}"
    );
}

#[test]
fn a_cancelled_batch_keeps_what_it_finished() {
    let _guard = model_lock();
    let scratch = Scratch::new();
    let input = input(&scratch, "in.jsonl", 16, &[]);
    let server = Server::start(&scratch, "data", &[]);
    let id = stdout(&sdk(
        &[
            "submit",
            &server.base,
            input.to_str().unwrap(),
            "/v1/chat/completions",
        ],
        &[],
    ));
    sdk(&["progress", &server.base, &id, "2"], &[]);
    sdk(&["local-only", &server.base], &[]);
    let answered = stdout(&sdk(&["cancel", &server.base, &id], &[]));
    assert_eq!(answered, "cancelling");
    let done = sdk(
        &[
            "wait",
            &server.base,
            &id,
            scratch.path("out").to_str().unwrap(),
        ],
        &[],
    );
    let batch: Value = serde_json::from_str(&stdout(&done)).unwrap();
    assert_eq!(batch["status"], "cancelled", "{batch}");
    assert!(
        batch["cancelling_at"].is_u64() && batch["cancelled_at"].is_u64(),
        "{batch}"
    );
    let completed = batch["request_counts"]["completed"].as_u64().unwrap();
    assert!((2..16).contains(&completed), "{batch}");
    assert_eq!(batch["request_counts"]["total"], 16);
    let lines = read_results(&scratch.path("out").join("output.jsonl"));
    assert_eq!(
        lines.len() as u64,
        completed,
        "the counts agree with the file"
    );
    assert!(!scratch.path("out").join("error.jsonl").exists());
}

#[test]
fn bad_requests_get_openai_errors_and_the_server_keeps_serving() {
    let scratch = Scratch::new();
    let key = scratch.path("key");
    std::fs::write(&key, "s3cret-key\n").unwrap();
    let max = "200000";
    let server = Server::start(
        &scratch,
        "data",
        &[
            "--api-key-file",
            key.to_str().unwrap(),
            "--max-upload-bytes",
            max,
        ],
    );
    let scratch_dir = scratch.dir.path().to_str().unwrap();
    sdk(
        &["bad", &server.base],
        &[
            ("INFER_BATCH_KEY", "s3cret-key"),
            ("SCRATCH", scratch_dir),
            ("MAX_UPLOAD", max),
        ],
    );
    // One server a data directory.
    let err = serve_refused(&scratch.path("data"), &[]);
    assert!(err.contains("another server"), "{err}");
    // Refused uploads leave nothing behind.
    let leftovers: Vec<_> = std::fs::read_dir(scratch.path("data/uploads"))
        .unwrap()
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let stored: Vec<u64> = std::fs::read_dir(scratch.path("data/files"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .collect();
    assert!(stored.iter().all(|&b| b < 200_000), "{stored:?}");
}

#[test]
fn serving_beyond_loopback_without_a_key_or_on_a_newer_database_is_refused() {
    let scratch = Scratch::new();
    let data = scratch.path("data");
    let err = serve_refused(&data, &["--host", "0.0.0.0"]);
    assert!(err.contains("--api-key-file"), "{err}");
    assert!(!data.exists(), "nothing was created");

    let err = serve_refused(&data, &["in.jsonl"]);
    assert!(err.contains("serve takes no input file"), "{err}");

    std::fs::create_dir_all(&data).unwrap();
    let db = data.join("infer-batch.sqlite3");
    let made = Command::new(sdk_python())
        .args(["-c", "import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); c.execute('PRAGMA user_version=99'); c.commit()"])
        .arg(&db)
        .status()
        .unwrap();
    assert!(made.success());
    let before = std::fs::read(&db).unwrap();
    let err = serve_refused(&data, &[]);
    assert!(
        err.contains("schema version 99") && err.contains("newer"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(&db).unwrap(),
        before,
        "the database is left as it was"
    );
}

#[test]
fn the_status_page_shows_a_running_batch_in_a_browser_and_polling_holds_under_load() {
    let _guard = model_lock();
    let scratch = Scratch::new();
    let input = input(&scratch, "in.jsonl", 12, &[]);
    let small = input_small(&scratch);
    let server = Server::start(&scratch, "data", &[]);
    let id = stdout(&sdk(
        &[
            "submit",
            &server.base,
            input.to_str().unwrap(),
            "/v1/chat/completions",
        ],
        &[],
    ));
    sdk(&["progress", &server.base, &id, "1"], &[]);
    let dom = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--dump-dom",
            &format!("{}/", server.base),
        ])
        .stderr(Stdio::null())
        .output()
        .expect("chromium (make test installs it: scripts/deps.sh browser)");
    let dom = String::from_utf8_lossy(&dom.stdout);
    let row = dom
        .split("<tr")
        .find(|r| r.contains(&id))
        .unwrap_or_else(|| panic!("the page lists the batch: {dom}"));
    assert!(row.contains(">in_progress<"), "{row}");
    let value: u64 = row
        .split("value=\"")
        .nth(1)
        .and_then(|v| v.split('"').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("a progress bar: {row}"));
    assert!((1..12).contains(&value), "{row}");
    assert!(row.contains("of 12") && row.contains("tok/s"), "{row}");

    let load = sdk(
        &["load", &server.base, &id, "15", "32"],
        &[("SMALL_INPUT", small.to_str().unwrap())],
    );
    let stats: Value = serde_json::from_str(&stdout(&load)).unwrap();
    eprintln!("polling under load: {stats}");
    assert!(stats["polls"].as_u64().unwrap() > 100, "{stats}");
}

/// Runs `serve` on `data` with `extra` arguments, which must refuse to start (exit 2); its
/// stderr.
fn serve_refused(data: &Path, extra: &[&str]) -> String {
    let model = model_path();
    let mut args = vec![
        "serve",
        "--model",
        model.to_str().unwrap(),
        "--port",
        "0",
        "--data-dir",
        data.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let o = infer_batch(&args);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(2), "{err}");
    err
}

/// GET `path` of a server with no key, through batch_api.py's own client.
fn get_json(base: &str, path: &str) -> Value {
    let o = Command::new(sdk_python())
        .args([
            "-c",
            "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1]).read().decode())",
            &format!("{base}{path}"),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    serde_json::from_slice(&o.stdout).unwrap()
}

/// One short request: the load test's batches.
fn input_small(scratch: &Scratch) -> PathBuf {
    scratch.write_lines(
        "small.jsonl",
        &[request(
            "one",
            Some("Answer briefly."),
            "Say hi.",
            json!({"max_tokens": 2}),
        )],
    )
}
