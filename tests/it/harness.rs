//! A temp dir per test, the binary via `CARGO_BIN_EXE_infer-batch`, and result-line helpers.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::{Mutex, MutexGuard, OnceLock};

use serde_json::{json, Value};

/// The default model, fetched by `models/fetch.sh`.
pub fn model_path() -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
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
    cmd.args(args).env("INFER_BATCH_LOG", level).env(
        "XDG_CACHE_HOME",
        std::env::temp_dir().join("infer-batch-tests-xdg"),
    );
    cmd.output().expect("run infer-batch")
}

/// Runs a batch on the default model and returns its output lines by `custom_id`.
pub fn run_batch(
    scratch: &Scratch,
    input: &Path,
    out_name: &str,
    extra: &[&str],
) -> (Output, BTreeMap<String, Value>) {
    let out = scratch.path(out_name);
    let model = model_path();
    let cache = scratch.path("prefix-cache");
    let mut args = vec![
        "--model",
        model.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        input.to_str().unwrap(),
    ];
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
