//! Exact resume: what an output already holds, and what a resumed run skips.
//!
//! The output file is the checkpoint: a request is done exactly when its line is in the file.
//! A crash can only tear the last line, which is cut off before anything is appended. The
//! [`Manifest`] beside it says what the lines were computed from, so a run is only ever resumed
//! into results that the same computation produced.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader};
use std::path::Path;

use crate::digest::hash64;
use crate::durability::durable::write_atomic_with;
use crate::durability::StateError;
use crate::error::{AtPath, FileError};
use crate::formats::manifest::{manifest_path, Manifest};
use crate::formats::result::LineHead;
use crate::identity::Section;

/// Deletes an output and its manifest, for `--restart`.
///
/// # Errors
/// When a file exists but cannot be removed.
pub fn remove_output(output: &Path) -> Result<(), FileError> {
    for path in [output.to_owned(), manifest_path(output)] {
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(FileError::new("remove", &path, e)),
        }
    }
    Ok(())
}

/// Readies the output for a run and returns what it already holds.
///
/// - `restart`: the output and its manifest are removed; everything runs.
/// - no output, or an empty one: a fresh start.
/// - otherwise the stored manifest must describe the same computation; a torn last line is
///   cut off, and with `retry_failed` the error lines are dropped so those requests run again.
///
/// The machine is not compared here: it is known only once the engine has started, and
/// [`check_machine`] compares it then.
///
/// # Errors
/// When the output holds results without a manifest, or of another computation: the message
/// says what changed and how to start over.
pub fn prepare(
    output: &Path,
    manifest: &mut Manifest,
    restart: bool,
    retry_failed: bool,
) -> Result<Done, StateError> {
    if restart {
        remove_output(output)?;
        return Ok(Done::default());
    }
    let has_results = fs::metadata(output).is_ok_and(|m| m.len() > 0);
    if !has_results {
        return Ok(Done::default());
    }
    let Some(stored) = Manifest::read(output)? else {
        return Err(StateError::NoManifest {
            output: output.to_owned(),
            manifest: manifest_path(output),
        });
    };
    let differences: Vec<String> = manifest
        .differences(&stored)
        .into_iter()
        .filter(|d| d.section != Section::Machine)
        .map(|d| d.text)
        .collect();
    manifest.runs = stored.runs;
    if !differences.is_empty() {
        return Err(StateError::OtherComputation {
            output: output.to_owned(),
            differences,
        });
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

/// Compares the machine of `manifest`, now known, with the one that computed the lines the
/// output already holds. Another machine is refused unless `manifest` accepts it
/// (`--resume-anywhere`); then the manifest records it among its other machines.
///
/// # Errors
/// When the output holds lines of another machine and they are not accepted.
pub fn check_machine(output: &Path, manifest: &mut Manifest) -> Result<(), StateError> {
    let has_results = fs::metadata(output).is_ok_and(|m| m.len() > 0);
    let Some(stored) = Manifest::read(output)?.filter(|_| has_results) else {
        return Ok(());
    };
    manifest.other_machines = stored.other_machines.clone();
    let accepted = manifest.resume_anywhere;
    manifest.resume_anywhere |= stored.resume_anywhere;
    let differences: Vec<String> = manifest
        .differences(&stored)
        .into_iter()
        .filter(|d| d.section == Section::Machine)
        .map(|d| d.text)
        .collect();
    if differences.is_empty() {
        return Ok(());
    }
    if !accepted {
        return Err(StateError::OtherMachine {
            output: output.to_owned(),
            differences,
        });
    }
    tracing::warn!(
        "resuming {} on another machine ({}): its lines will come from both",
        output.display(),
        differences.join("; ")
    );
    if let Some(machine) = stored.identity.get("machine") {
        if !manifest.other_machines.contains(machine) {
            manifest.other_machines.push(machine.clone());
        }
    }
    Ok(())
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
        self.failed.contains(&line) || custom_id.is_some_and(|id| self.ok.contains(&hash64(id)))
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
pub fn scan_output(path: &Path) -> Result<(Done, u64), StateError> {
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
        let n = reader.read_until(b'\n', &mut buf).at("read", path)?;
        if n == 0 {
            break;
        }
        line_no += 1;
        let complete = buf.ends_with(b"\n");
        let Some(head) = LineHead::parse(&buf).filter(|_| complete) else {
            // Only the last line may be torn: anything after it means a corrupt file.
            if reader.fill_buf().at("read", path)?.is_empty() {
                done.torn_bytes = n as u64;
                break;
            }
            return Err(StateError::NotAResultLine {
                path: path.to_owned(),
                line: line_no,
            });
        };
        match (&head.error, &head.custom_id) {
            (None, Some(id)) => {
                done.ok.insert(hash64(id));
            }
            (None, None) => {}
            (Some(e), _) => {
                if let Some(line) = e.line {
                    done.failed.insert(line);
                }
            }
        }
        good_end += n as u64;
    }
    Ok((done, good_end))
}

/// Cuts the output back to `len` bytes (dropping a torn last line).
///
/// # Errors
/// When the file cannot be truncated.
pub fn truncate(path: &Path, len: u64) -> Result<(), FileError> {
    let f = OpenOptions::new().write(true).open(path).at("open", path)?;
    f.set_len(len)
        .and_then(|()| f.sync_all())
        .at("truncate", path)
}

/// Rewrites the output without its error lines, so those requests run again.
///
/// # Errors
/// When the file cannot be rewritten.
pub fn drop_error_lines(path: &Path) -> Result<u64, FileError> {
    let mut dropped = 0;
    let reader = BufReader::new(File::open(path).at("read", path)?);
    write_atomic_with(path, |out| {
        for line in reader.lines() {
            let line = line?;
            let head = LineHead::parse(line.as_bytes()).ok_or_else(|| {
                std::io::Error::other("a line of the output is not a result line")
            })?;
            if head.error.is_none() {
                out.write_all(line.as_bytes())?;
                out.write_all(b"\n")?;
            } else {
                dropped += 1;
            }
        }
        Ok(())
    })?;
    Ok(dropped)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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
        let (done, end) = scan_output(&p).unwrap();
        assert!(
            !done.contains(Some("b"), 2),
            "unterminated line is not trusted"
        );
        // The line before it is read, and the unterminated one is what gets cut.
        assert!(done.contains(Some("a"), 1));
        assert_eq!(done.len(), 1);
        assert_eq!(end, ok_line("a").len() as u64);
        assert_eq!(done.torn_bytes, last.trim_end().len() as u64);
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
}
