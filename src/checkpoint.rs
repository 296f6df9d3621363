//! Exact resume: the manifest next to the output, and what a resumed run skips.
//!
//! The output file is the checkpoint: a request is done exactly when its line is in the file.
//! A crash can only tear the last line, which is cut off before anything is appended. The
//! manifest (`out.manifest.json`) records what the lines were computed from (the input's hash,
//! the model's hash and every setting that changes outputs), so a run is only ever resumed
//! into results that the same computation produced.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::output::sibling_path;
use crate::prefix_store::{hex, sha256_file};
use crate::request::id_hash;

/// Version of the manifest layout.
pub const MANIFEST_VERSION: u64 = 1;

/// `dir/out.jsonl` → `dir/out.manifest.json`.
pub fn manifest_path(output: &Path) -> PathBuf {
    sibling_path(output, "manifest.json")
}

/// Where a run stands, as the manifest records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    /// A run is (or was, if it died) working on it.
    Running,
    /// Stopped by a signal; resumable.
    Interrupted,
    /// Every request has its line.
    Finished,
}

impl RunState {
    fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Interrupted => "interrupted",
            Self::Finished => "finished",
        }
    }
}

/// What the output's lines were computed from.
#[derive(Debug, Clone, PartialEq)]
pub struct Manifest {
    /// SHA-256 of the input file.
    pub input_sha256: String,
    /// SHA-256 of the model file.
    pub model_sha256: String,
    /// Every setting that changes outputs, by flag name.
    pub params: Value,
    /// Input lines that get an output line (blank lines excluded); 0 until counted.
    pub total: u64,
    /// Where the run stands.
    pub state: RunState,
}

impl Manifest {
    fn to_json(&self, input: &Path, model: &Path) -> Value {
        json!({
            "version": MANIFEST_VERSION,
            "input": {"path": input, "sha256": self.input_sha256, "total": self.total},
            "model": {"path": model, "sha256": self.model_sha256},
            "params": self.params,
            "state": self.state.as_str(),
        })
    }

    /// Writes the manifest atomically.
    ///
    /// # Errors
    /// When the file cannot be written.
    pub fn write(&self, output: &Path, input: &Path, model: &Path) -> Result<()> {
        let path = manifest_path(output);
        let tmp = path.with_extension("json.tmp");
        let mut f = File::create(&tmp)?;
        f.write_all(&serde_json::to_vec_pretty(&self.to_json(input, model))?)?;
        f.sync_all()?;
        fs::rename(&tmp, &path).with_context(|| format!("cannot write {}", path.display()))
    }

    /// Reads a manifest, if one is there.
    ///
    /// # Errors
    /// When it exists but cannot be parsed.
    pub fn read(output: &Path) -> Result<Option<Self>> {
        let path = manifest_path(output);
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(_) => return Ok(None),
        };
        let v: Value = serde_json::from_str(&text)
            .with_context(|| format!("manifest {} is not valid JSON", path.display()))?;
        let s = |p: &str| {
            v.pointer(p)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned()
        };
        if v["version"].as_u64() != Some(MANIFEST_VERSION) {
            bail!(
                "manifest {} has version {}, this build writes {MANIFEST_VERSION}",
                path.display(),
                v["version"]
            );
        }
        Ok(Some(Self {
            input_sha256: s("/input/sha256"),
            model_sha256: s("/model/sha256"),
            params: v["params"].clone(),
            total: v
                .pointer("/input/total")
                .and_then(Value::as_u64)
                .unwrap_or(0),
            state: match s("/state").as_str() {
                "finished" => RunState::Finished,
                "interrupted" => RunState::Interrupted,
                _ => RunState::Running,
            },
        }))
    }

    /// What differs between the manifest a run would write and the stored one, in words.
    pub fn differences(&self, stored: &Self) -> Vec<String> {
        let mut out = Vec::new();
        if self.input_sha256 != stored.input_sha256 {
            out.push("the input file changed".to_owned());
        }
        if self.model_sha256 != stored.model_sha256 {
            out.push("the model file changed".to_owned());
        }
        if let (Some(now), Some(then)) = (self.params.as_object(), stored.params.as_object()) {
            for (k, v) in now {
                let old = then.get(k).unwrap_or(&Value::Null);
                if old != v {
                    out.push(format!("--{k} was {old}, now {v}"));
                }
            }
        }
        out
    }
}

/// Readies the output for a run and returns what it already holds.
///
/// - `restart`: the output and its manifest are removed; everything runs.
/// - no output, or an empty one: a fresh start.
/// - otherwise the stored manifest must describe the same computation; a torn last line is
///   cut off, and with `retry_failed` the error lines are dropped so those requests run again.
///
/// # Errors
/// When the output holds results without a manifest, or of another computation: the message
/// says what changed and how to start over.
pub fn prepare(
    output: &Path,
    manifest: &Manifest,
    restart: bool,
    retry_failed: bool,
) -> Result<Done> {
    if restart {
        for path in [output.to_owned(), manifest_path(output)] {
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(e).with_context(|| format!("cannot remove {}", path.display()))
                }
            }
        }
        return Ok(Done::default());
    }
    let has_results = fs::metadata(output).is_ok_and(|m| m.len() > 0);
    if !has_results {
        return Ok(Done::default());
    }
    let Some(stored) = Manifest::read(output)? else {
        bail!(
            "output {} already holds results but has no manifest ({}), so it cannot be \
             resumed safely; pass --restart to replace it, or -o to write elsewhere",
            output.display(),
            manifest_path(output).display()
        );
    };
    let differences = manifest.differences(&stored);
    if !differences.is_empty() {
        bail!(
            "cannot resume into {}: {}. Pass --restart to start over, or -o to write elsewhere",
            output.display(),
            differences.join("; ")
        );
    }
    let (mut done, good_end) = scan_output(output)?;
    if done.torn_bytes > 0 {
        tracing::warn!(
            bytes = done.torn_bytes,
            "dropping a torn last line left by an interrupted write"
        );
        truncate(output, good_end)?;
    }
    if retry_failed && !done.failed.is_empty() {
        let dropped = drop_error_lines(output)?;
        done.failed.clear();
        tracing::info!("retrying {dropped} failed requests");
    }
    tracing::info!(
        "resuming {}: {} requests already done",
        output.display(),
        done.len()
    );
    Ok(done)
}

/// SHA-256 of a file, streamed, in hex.
///
/// # Errors
/// When the file cannot be read.
pub fn file_sha256(path: &Path) -> Result<String> {
    sha256_file(path).map(|h| hex(&h))
}

/// `request_counts` of an output, as `infer-batch status` prints them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// Input lines that get an output line.
    pub total: u64,
    /// Success lines.
    pub completed: u64,
    /// Error lines.
    pub failed: u64,
    /// Where the run stands.
    pub state: RunState,
}

impl Status {
    /// Requests with no line yet.
    pub fn remaining(&self) -> u64 {
        self.total.saturating_sub(self.completed + self.failed)
    }

    /// `in_progress`, `interrupted` or `completed`, after the OpenAI batch `status`.
    pub fn label(&self) -> &'static str {
        match self.state {
            RunState::Finished if self.remaining() == 0 => "completed",
            RunState::Interrupted => "interrupted",
            _ => "in_progress",
        }
    }

    /// The same as one JSON object.
    pub fn to_json(&self, output: &Path) -> Value {
        json!({
            "output": output,
            "status": self.label(),
            "request_counts": {"total": self.total, "completed": self.completed, "failed": self.failed},
            "remaining": self.remaining(),
        })
    }
}

/// Reads an output's state from its manifest and lines, without loading any model.
///
/// # Errors
/// When the output has no manifest or cannot be read.
pub fn status(output: &Path) -> Result<Status> {
    let manifest = Manifest::read(output)?.with_context(|| {
        format!(
            "no manifest for {} ({}): not an infer-batch output, or no run has started",
            output.display(),
            manifest_path(output).display()
        )
    })?;
    let (done, _) = scan_output(output)?;
    Ok(Status {
        total: manifest.total,
        completed: done.ok.len() as u64,
        failed: done.failed.len() as u64,
        state: manifest.state,
    })
}

/// What an existing output already holds.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Done {
    /// `custom_id` hashes of completed requests.
    pub ok: HashSet<u64>,
    /// Input line numbers that got an error line.
    pub failed: HashSet<u64>,
    /// Bytes of a torn last line that were cut off.
    pub torn_bytes: u64,
}

impl Done {
    /// Whether the request `custom_id` on `line` already has its line.
    pub fn contains(&self, custom_id: Option<&str>, line: u64) -> bool {
        self.failed.contains(&line) || custom_id.is_some_and(|id| self.ok.contains(&id_hash(id)))
    }

    /// Lines accounted for.
    pub fn len(&self) -> u64 {
        (self.ok.len() + self.failed.len()) as u64
    }

    /// Whether nothing is done yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Reads an output file: which requests are done, and where its last complete line ends.
/// A last line without its newline, or that does not parse, is a torn write.
///
/// # Errors
/// When a line before the last is not a result line: the file was edited or is not ours.
pub fn scan_output(path: &Path) -> Result<(Done, u64)> {
    let mut done = Done::default();
    let file = match File::open(path) {
        Ok(f) => f,
        Err(_) => return Ok((done, 0)),
    };
    let mut reader = BufReader::new(file);
    let mut buf = Vec::new();
    let mut good_end = 0u64;
    let mut line_no = 0u64;
    loop {
        buf.clear();
        let n = reader.read_until(b'\n', &mut buf)?;
        if n == 0 {
            break;
        }
        line_no += 1;
        let complete = buf.ends_with(b"\n");
        let parsed: Option<Value> = serde_json::from_slice(&buf).ok();
        let Some(v) = parsed.filter(|_| complete) else {
            // Only the last line may be torn: anything after it means a corrupt file.
            if reader.fill_buf()?.is_empty() {
                done.torn_bytes = n as u64;
                break;
            }
            bail!(
                "{} line {line_no} is not a result line; the file was edited or is not an \
                 infer-batch output. Use --restart to start over, or -o to write elsewhere",
                path.display()
            );
        };
        if v["error"].is_null() {
            if let Some(id) = v["custom_id"].as_str() {
                done.ok.insert(id_hash(id));
            }
        } else if let Some(line) = v["error"]["line"].as_u64() {
            done.failed.insert(line);
        }
        good_end += n as u64;
    }
    Ok((done, good_end))
}

/// Cuts the output back to `len` bytes (dropping a torn last line).
///
/// # Errors
/// When the file cannot be truncated.
pub fn truncate(path: &Path, len: u64) -> Result<()> {
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    f.set_len(len)?;
    f.sync_all()?;
    Ok(())
}

/// Rewrites the output without its error lines, so those requests run again.
///
/// # Errors
/// When the file cannot be rewritten.
pub fn drop_error_lines(path: &Path) -> Result<u64> {
    let text = fs::read_to_string(path)?;
    let mut kept = String::with_capacity(text.len());
    let mut dropped = 0;
    for line in text.lines() {
        let v: Value = serde_json::from_str(line)?;
        if v["error"].is_null() {
            kept.push_str(line);
            kept.push('\n');
        } else {
            dropped += 1;
        }
    }
    let tmp = path.with_extension("jsonl.tmp");
    let mut f = File::create(&tmp)?;
    f.write_all(kept.as_bytes())?;
    f.sync_all()?;
    fs::rename(&tmp, path)?;
    Ok(dropped)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok_line(id: &str) -> String {
        format!(
            "{}\n",
            json!({"custom_id": id, "response": {}, "error": null})
        )
    }

    fn err_line(line: u64) -> String {
        format!(
            "{}\n",
            json!({"custom_id": null, "response": null, "error": {"code": "invalid_json", "line": line}})
        )
    }

    #[test]
    fn scan_collects_done_ids_and_failed_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("o.jsonl");
        fs::write(&p, [ok_line("a"), err_line(3), ok_line("b")].concat()).unwrap();
        let (done, end) = scan_output(&p).unwrap();
        assert_eq!(end, fs::metadata(&p).unwrap().len());
        assert!(done.contains(Some("a"), 1));
        assert!(done.contains(Some("b"), 9));
        assert!(done.contains(None, 3));
        assert!(!done.contains(Some("c"), 4));
        assert_eq!((done.len(), done.torn_bytes), (3, 0));
    }

    #[test]
    fn a_torn_last_line_is_cut_not_parsed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("o.jsonl");
        let whole = ok_line("a");
        let torn = &ok_line("b")[..10];
        fs::write(&p, format!("{whole}{torn}")).unwrap();
        let (done, end) = scan_output(&p).unwrap();
        assert_eq!(end, whole.len() as u64);
        assert_eq!(done.torn_bytes, 10);
        assert!(!done.contains(Some("b"), 2));
        truncate(&p, end).unwrap();
        assert_eq!(fs::read_to_string(&p).unwrap(), whole);
    }

    #[test]
    fn a_complete_line_without_newline_counts_as_torn() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("o.jsonl");
        let last = ok_line("b");
        fs::write(&p, format!("{}{}", ok_line("a"), last.trim_end())).unwrap();
        let (done, _) = scan_output(&p).unwrap();
        assert!(
            !done.contains(Some("b"), 2),
            "unterminated line is not trusted"
        );
    }

    #[test]
    fn garbage_before_the_last_line_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("o.jsonl");
        fs::write(&p, format!("garbage\n{}", ok_line("a"))).unwrap();
        let e = scan_output(&p).unwrap_err().to_string();
        assert!(e.contains("line 1") && e.contains("--restart"), "{e}");
    }

    #[test]
    fn retry_failed_drops_error_lines_only() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("o.jsonl");
        fs::write(&p, [ok_line("a"), err_line(2), ok_line("b")].concat()).unwrap();
        assert_eq!(drop_error_lines(&p).unwrap(), 1);
        assert_eq!(
            fs::read_to_string(&p).unwrap(),
            [ok_line("a"), ok_line("b")].concat()
        );
    }

    #[test]
    fn manifest_differences_name_what_changed() {
        let a = Manifest {
            input_sha256: "x".into(),
            model_sha256: "m".into(),
            params: json!({"seed": 1, "max-tokens": 8}),
            total: 3,
            state: RunState::Running,
        };
        let mut b = a.clone();
        assert!(a.differences(&b).is_empty());
        b.input_sha256 = "y".into();
        b.params = json!({"seed": 2, "max-tokens": 8});
        let d = a.differences(&b);
        assert_eq!(d.len(), 2, "{d:?}");
        assert!(d[0].contains("input"));
        assert!(d[1].contains("--seed was 2, now 1"));
    }

    #[test]
    fn manifest_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("o.jsonl");
        let m = Manifest {
            input_sha256: "x".into(),
            model_sha256: "m".into(),
            params: json!({"seed": 1}),
            total: 5,
            state: RunState::Interrupted,
        };
        m.write(&out, Path::new("in.jsonl"), Path::new("m.gguf"))
            .unwrap();
        assert_eq!(Manifest::read(&out).unwrap(), Some(m));
        assert!(manifest_path(&out).ends_with("o.manifest.json"));
    }
}
