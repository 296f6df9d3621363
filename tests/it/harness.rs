//! A temp dir per test, the binary via `CARGO_BIN_EXE_infer-batch`, and result-line helpers.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::{Mutex, MutexGuard, OnceLock};

use serde_json::{json, Value};

/// The default model, fetched by `models/fetch.sh`.
pub fn model_path() -> PathBuf {
    fetched("SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// The second model, Gemma 3 270M (sliding-window attention, no chat template), fetched by
/// `models/fetch.sh`.
pub fn gemma_path() -> PathBuf {
    fetched("gemma-3-270m-q4_k_m.gguf")
}

fn fetched(name: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("models")
        .join(name);
    assert!(
        path.is_file(),
        "{} is missing: run ./models/fetch.sh (or `make test`) first",
        path.display()
    );
    path
}

/// Serialises the tests that run the model.
pub fn model_lock() -> MutexGuard<'static, ()> {
    static LOCK: OnceLock<Mutex<()>> = OnceLock::new();
    LOCK.get_or_init(|| Mutex::new(()))
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// One test's scratch directory.
pub struct Scratch {
    pub dir: tempfile::TempDir,
}

impl Scratch {
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes lines (already serialised) to `name`.
    pub fn write_lines(&self, name: &str, lines: &[String]) -> PathBuf {
        let path = self.path(name);
        let mut text = lines.join("\n");
        text.push('\n');
        std::fs::write(&path, text).expect("write input");
        path
    }
}

/// Runs the binary with `args`; the model lock must be held by the caller when it loads one.
pub fn infer_batch(args: &[&str]) -> Output {
    let mut cmd = assert_cmd::Command::cargo_bin("infer-batch").expect("binary");
    // Quiet unless the test asks for llama.cpp's logs with -v.
    let level = if args.contains(&"-v") {
        "debug"
    } else {
        "warn"
    };
    cmd.args(args)
        .env("INFER_BATCH_LOG", level)
        .env("XDG_CACHE_HOME", test_cache_home());
    cmd.output().expect("run infer-batch")
}

/// The user cache directory every test run shares (the decode-group probe's findings live
/// there), never the user's own.
pub fn test_cache_home() -> PathBuf {
    std::env::temp_dir().join("infer-batch-tests-xdg")
}

/// Runs a batch on the default model and returns its output lines by `custom_id`.
pub fn run_batch(
    scratch: &Scratch,
    input: &Path,
    out_name: &str,
    extra: &[&str],
) -> (Output, BTreeMap<String, Value>) {
    let model = model_path();
    let mut args = vec!["--model", model.to_str().unwrap()];
    args.extend_from_slice(extra);
    run_batch_with_model(scratch, input, out_name, &args)
}

/// [`run_batch`] on the model that `args` names with `--model`.
pub fn run_batch_with_model(
    scratch: &Scratch,
    input: &Path,
    out_name: &str,
    extra: &[&str],
) -> (Output, BTreeMap<String, Value>) {
    let out = scratch.path(out_name);
    let cache = scratch.path("prefix-cache");
    let mut args = vec!["-o", out.to_str().unwrap(), input.to_str().unwrap()];
    if !extra.contains(&"--prefix-cache-dir") {
        args.extend_from_slice(&["--prefix-cache-dir", cache.to_str().unwrap()]);
    }
    args.extend_from_slice(extra);
    let output = infer_batch(&args);
    let lines = read_results(&out);
    (output, lines.into_iter().map(|v| (key_of(&v), v)).collect())
}

fn key_of(v: &Value) -> String {
    v["custom_id"]
        .as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| format!("line:{}", v["error"]["line"]))
}

/// The summary a run wrote next to `out_name`.
pub fn summary(scratch: &Scratch, out_name: &str) -> Value {
    let name = out_name.strip_suffix(".jsonl").unwrap_or(out_name);
    let text = std::fs::read_to_string(scratch.path(&format!("{name}.summary.json")))
        .expect("the run wrote a summary");
    serde_json::from_str(&text).expect("summary is JSON")
}

/// Every line of a results file, parsed.
pub fn read_results(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("each output line is JSON"))
        .collect()
}

/// A chat request line in the full batch form.
pub fn request(custom_id: &str, system: Option<&str>, user: &str, body: Value) -> String {
    let mut messages = Vec::new();
    if let Some(s) = system {
        messages.push(json!({"role": "system", "content": s}));
    }
    messages.push(json!({"role": "user", "content": user}));
    let mut body_obj = body.as_object().cloned().unwrap_or_default();
    body_obj.insert("messages".into(), Value::Array(messages));
    json!({
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": body_obj,
    })
    .to_string()
}

/// The generated text of a success line.
pub fn content(v: &Value) -> &str {
    v["response"]["body"]["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_else(|| panic!("not a success line: {v}"))
}

/// A usage field of a success line.
pub fn usage(v: &Value, field: &str) -> u64 {
    let u = &v["response"]["body"]["usage"];
    if field == "cached_tokens" {
        u["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap()
    } else {
        u[field].as_u64().unwrap()
    }
}

/// A rubric-like system prompt of roughly `words` words.
pub fn rubric(words: usize) -> String {
    let criteria = [
        "clarity of reasoning",
        "evidence of shipped work",
        "depth in systems programming",
        "care for testing and reliability",
        "communication with peers",
        "ownership of outcomes",
    ];
    let mut text = String::from(
        "You evaluate one candidate profile against this rubric and reply with a score and one sentence.\n",
    );
    let mut i = 0;
    while text.split_whitespace().count() < words {
        let c = criteria[i % criteria.len()];
        text.push_str(&format!(
            "Criterion {}: rate the candidate's {c} from 0 to 3, citing only what the profile says.\n",
            i + 1
        ));
        i += 1;
    }
    text
}

/// A short candidate profile, varied by `i`.
pub fn profile(i: usize) -> String {
    let roles = [
        "backend engineer",
        "data scientist",
        "site reliability engineer",
        "frontend developer",
    ];
    let langs = ["Rust", "Python", "Go", "TypeScript", "C++"];
    format!(
        "Candidate {i}: {} years as a {} working mostly in {}. Led {} projects and mentored {} people.",
        2 + i % 9,
        roles[i % roles.len()],
        langs[i % langs.len()],
        1 + i % 4,
        i % 3
    )
}

/// Starts the binary with `args`, quiet, stdout and stderr discarded.
pub fn spawn(args: &[String]) -> std::process::Child {
    spawn_with(args, &[])
}

/// Starts the binary with `args` and extra environment variables; stderr is piped so a test
/// can show it when a check fails.
pub fn spawn_with(args: &[String], env: &[(&str, &str)]) -> std::process::Child {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_infer-batch"));
    cmd.args(args)
        .env("INFER_BATCH_LOG", "warn")
        .env("XDG_CACHE_HOME", test_cache_home())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().expect("start infer-batch")
}

/// Lines in a file (0 when it does not exist).
pub fn line_count(path: &Path) -> usize {
    std::fs::read_to_string(path)
        .map(|t| t.matches('\n').count())
        .unwrap_or(0)
}

/// Waits until `ready` holds, for at most two minutes; false when `child` ended first.
pub fn wait_until(child: &mut std::process::Child, ready: impl FnMut() -> bool) -> bool {
    wait_until_secs(child, 120, ready)
}

/// [`wait_until`], for at most `secs` seconds.
pub fn wait_until_secs(
    child: &mut std::process::Child,
    secs: u64,
    mut ready: impl FnMut() -> bool,
) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while std::time::Instant::now() < deadline {
        if ready() {
            return true;
        }
        if child.try_wait().unwrap().is_some() {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    panic!("timed out waiting for a run");
}

/// Whether the run into `out` has loaded its model and planned: its manifest counts the input.
pub fn planned(out: &Path) -> bool {
    let name = out.file_name().unwrap().to_string_lossy();
    let manifest = out.with_file_name(format!(
        "{}.manifest.json",
        name.strip_suffix(".jsonl").unwrap_or(&name)
    ));
    std::fs::read_to_string(manifest)
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .is_some_and(|m| m["input"]["total"].as_u64().unwrap_or(0) > 0)
}

/// What must match an uninterrupted run: content, finish reason, usage; or the error code and
/// line.
pub fn essence(v: &Value) -> Value {
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

/// The output's lines by the request they answer: a success line by its `custom_id`, an error
/// line by the input line it names (`line:N`), asserting that none appears twice.
pub fn by_key(out: &Path) -> BTreeMap<String, Value> {
    let mut map = BTreeMap::new();
    for v in read_results(out) {
        let key = if v["error"].is_null() {
            key_of(&v)
        } else {
            format!("line:{}", v["error"]["line"])
        };
        assert!(map.insert(key.clone(), v).is_none(), "{key} written twice");
    }
    map
}

/// [`by_key`], reduced to what must match an uninterrupted run.
pub fn essences(out: &Path) -> BTreeMap<String, Value> {
    by_key(out)
        .into_iter()
        .map(|(k, v)| (k, essence(&v)))
        .collect()
}

/// `infer-batch status --json` of an output.
pub fn status_json(out: &Path) -> Value {
    let o = infer_batch(&["status", "--json", out.to_str().unwrap()]);
    assert!(o.status.success(), "{o:?}");
    serde_json::from_slice(&o.stdout).unwrap()
}

/// Sends `signal` (such as `-KILL`) to a process, or with a negative pid to a process group.
pub fn send_signal(signal: &str, pid: i64) {
    let ok = std::process::Command::new("kill")
        .args([signal, "--", &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {signal} {pid}");
}

/// The pid of the worker a supervisor runs now.
pub fn worker_of(supervisor: u32) -> Option<i64> {
    let o = std::process::Command::new("pgrep")
        .args(["-P", &supervisor.to_string()])
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
}
