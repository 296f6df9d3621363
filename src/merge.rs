//! `infer-batch merge OUT`: joins the shard outputs of a batch into `OUT`, with proof that
//! every input request appears exactly once.
//!
//! The shards must all be there, and their manifests must agree on the input, the model and
//! every output-affecting setting. The input is read again to list its requests; each result
//! line is matched to its input line (by `custom_id`, or by the line an error names). A request
//! missing or present twice stops the merge with exit 2 and a list: a partial result is never
//! written as if it were whole. The merged output is written atomically, with a manifest (so
//! `status` and a resume see it as finished) and a summary whose token counts are summed from
//! the result lines themselves.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::checkpoint::scan_output;
use crate::digest::hash64;
use crate::durable::write_atomic_with;
use crate::fields::FieldPolicy;
use crate::lock::OutputLock;
use crate::manifest::{Manifest, RunState};
use crate::request::RequestReader;
use crate::shard::{find_outputs, Shard};
use crate::summary::summary_path;

/// The order of the merged lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Order {
    /// Shard by shard, each in its completion order.
    #[default]
    Completion,
    /// The input's order.
    Input,
}

/// What a merge wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Merged {
    /// Shards joined.
    pub shards: u32,
    /// Lines written: one per input request.
    pub lines: u64,
    /// Of those, error lines.
    pub failed: u64,
}

/// One result line of a shard: where it sits, and the input line it answers.
struct Placed {
    shard: usize,
    start: usize,
    end: usize,
}

/// Most missing or duplicated requests named in the refusal; the rest are counted.
const LISTED: usize = 20;

/// Joins the shards of `main` (found beside it, or in `dir`) into `main`.
///
/// # Errors
/// When a shard is missing or unfinished, the shards disagree on what they computed, a request
/// is missing or duplicated, or `main` holds the results of a run rather than of a merge. The
/// message lists what is wrong.
pub fn merge(main: &Path, dir: Option<&Path>, order: Order) -> Result<Merged> {
    let found = find_outputs(main, dir);
    let Some((first, _)) = found.first() else {
        bail!(
            "no shard outputs ({}) found{}",
            Shard { index: 0, count: 1 }
                .output(main)
                .file_name()
                .map_or_else(String::new, |n| n
                    .to_string_lossy()
                    .replace("0000-of-0001", "K-of-N")),
            dir.map_or_else(String::new, |d| format!(" in {}", d.display()))
        );
    };
    let count = first.count;
    if let Some((other, _)) = found.iter().find(|(s, _)| s.count != count) {
        bail!(
            "shard outputs of different shard counts sit together ({} and {}); merge one set",
            first.count,
            other.count
        );
    }
    let by_index: BTreeMap<u32, PathBuf> = found.into_iter().map(|(s, p)| (s.index, p)).collect();
    let absent: Vec<String> = (0..count)
        .filter(|k| !by_index.contains_key(k))
        .map(|k| Shard { index: k, count }.to_string())
        .collect();
    if !absent.is_empty() {
        bail!(
            "{} of {count} shards have no output: {}; run them, then merge again",
            absent.len(),
            absent.join(", ")
        );
    }
    let _lock = OutputLock::acquire(main)?;
    if let Some(existing) = Manifest::read(main)? {
        if existing.merged_shards.is_none() {
            bail!(
                "{} holds the results of a run, not of a merge; merge into another name",
                main.display()
            );
        }
    }

    // Each shard's lock, held to the end: no run can write a shard while it is read.
    let _shard_locks: Vec<OutputLock> = by_index
        .values()
        .map(|path| OutputLock::acquire(path))
        .collect::<Result<_>>()
        .context("a shard is still running; merge once it ends")?;
    let shards: Vec<(PathBuf, Manifest)> = by_index
        .into_values()
        .map(|path| {
            let manifest = Manifest::read(&path)?.with_context(|| {
                format!(
                    "{} has no manifest: that shard never got going",
                    path.display()
                )
            })?;
            Ok((path, manifest))
        })
        .collect::<Result<_>>()?;
    check_agreement(&shards)?;
    let reference = &shards[0].1;

    // Every input line, and the line of each id's first use.
    let policy = FieldPolicy {
        ignore_unknown: reference.params.get("ignore-unknown-fields") == Some(&Value::Bool(true)),
    };
    let input = File::open(&reference.input.path).with_context(|| {
        format!(
            "cannot read the input {} that the shards were computed from",
            reference.input.path.display()
        )
    })?;
    let mut line_of: HashMap<u64, u64> = HashMap::new();
    let mut ids: Vec<Option<String>> = Vec::new();
    let mut expected: Vec<u64> = Vec::new();
    for item in RequestReader::new(BufReader::new(input), policy) {
        let item = item.context("cannot read the input")?;
        let (line, id) = match &item {
            Ok(r) => {
                line_of.insert(hash64(&r.custom_id), r.line);
                (r.line, Some(r.custom_id.clone()))
            }
            Err(e) => (e.line, e.custom_id.clone()),
        };
        expected.push(line);
        if ids.len() <= line as usize {
            ids.resize(line as usize + 1, None);
        }
        ids[line as usize] = id;
    }

    // Each shard's lines, matched to input lines.
    let maps: Vec<memmap2::Mmap> = shards
        .iter()
        .map(|(path, _)| {
            let file = File::open(path)?;
            // SAFETY: we hold the shard's lock, so no infer-batch run changes the file while
            // it is mapped; every line read from it is parsed and checked.
            unsafe { memmap2::Mmap::map(&file) }
                .with_context(|| format!("cannot read {}", path.display()))
        })
        .collect::<Result<_>>()?;
    let mut placed: BTreeMap<u64, Vec<Placed>> = BTreeMap::new();
    let mut totals = Totals::default();
    let mut strays = Vec::new();
    for (shard, map) in maps.iter().enumerate() {
        let mut start = 0;
        for line in map.split_inclusive(|&b| b == b'\n') {
            let end = start + line.len();
            let Some(v) = line
                .ends_with(b"\n")
                .then(|| serde_json::from_slice::<Value>(line).ok())
                .flatten()
            else {
                // A torn last line is not a result; the request counts as missing.
                start = end;
                continue;
            };
            totals.count(&v);
            let input_line = if v["error"].is_null() {
                v["custom_id"]
                    .as_str()
                    .and_then(|id| line_of.get(&hash64(id)).copied())
            } else {
                v["error"]["line"].as_u64()
            };
            match input_line {
                Some(l) => placed
                    .entry(l)
                    .or_default()
                    .push(Placed { shard, start, end }),
                None => strays.push(format!(
                    "{}: a line for {} that the input does not hold",
                    shards[shard].0.display(),
                    v["custom_id"]
                )),
            }
            start = end;
        }
    }
    let name = |l: u64| match ids.get(l as usize).cloned().flatten() {
        Some(id) => format!("line {l} ({id:?})"),
        None => format!("line {l}"),
    };
    let missing: Vec<u64> = expected
        .iter()
        .copied()
        .filter(|l| !placed.contains_key(l))
        .collect();
    let twice: Vec<u64> = placed
        .iter()
        .filter(|(_, p)| p.len() > 1)
        .map(|(l, _)| *l)
        .collect();
    if !missing.is_empty() || !twice.is_empty() || !strays.is_empty() {
        let mut problems = Vec::new();
        let unfinished: Vec<String> = shards
            .iter()
            .filter(|(path, m)| {
                m.state != RunState::Finished
                    || scan_output(path).map_or(true, |(d, _)| d.len() < m.input.total)
            })
            .map(|(_, m)| m.shard.map_or("?".into(), |s| s.to_string()))
            .collect();
        if !unfinished.is_empty() {
            problems.push(format!(
                "unfinished shards: {} (run them again: they resume)",
                unfinished.join(", ")
            ));
        }
        for (what, lines) in [("missing", &missing), ("written twice", &twice)] {
            if !lines.is_empty() {
                let mut listed: Vec<String> = lines.iter().take(LISTED).map(|&l| name(l)).collect();
                if lines.len() > LISTED {
                    listed.push(format!("and {} more", lines.len() - LISTED));
                }
                problems.push(format!(
                    "{} requests {what}: {}",
                    lines.len(),
                    listed.join(", ")
                ));
            }
        }
        problems.extend(strays.into_iter().take(LISTED));
        bail!(
            "not merged, {} holds nothing new: {}",
            main.display(),
            problems.join("; ")
        );
    }

    let lines = placed.len() as u64;
    let mut sequence: Vec<&Placed> = placed.values().flatten().collect();
    if order == Order::Completion {
        sequence.sort_by_key(|p| (p.shard, p.start));
    }
    write_atomic_with(main, |out| {
        for p in sequence {
            out.write_all(&maps[p.shard][p.start..p.end])?;
        }
        Ok(())
    })?;

    let mut manifest = reference.clone();
    manifest.input.total = lines;
    manifest.shard = None;
    manifest.state = RunState::Finished;
    manifest.runs = shards.iter().flat_map(|(_, m)| m.runs.clone()).collect();
    manifest.runs.sort_by_key(|r| r.started_unix);
    manifest.finished_unix = shards.iter().filter_map(|(_, m)| m.finished_unix).max();
    manifest.merged_shards = Some(count);
    manifest.write(main)?;
    write_summary(main, &shards, &totals)?;
    Ok(Merged {
        shards: count,
        lines,
        failed: totals.failed(),
    })
}

/// Every shard must describe the same computation as the first, and be the shard its name says.
fn check_agreement(shards: &[(PathBuf, Manifest)]) -> Result<()> {
    let reference = &shards[0].1;
    let mut problems = Vec::new();
    for (k, (path, m)) in shards.iter().enumerate() {
        let mut whole = m.clone();
        whole.shard = reference.shard;
        let differences = whole.differences(reference);
        if !differences.is_empty() {
            problems.push(format!(
                "{} differs from shard 0: {}",
                path.display(),
                differences.join("; ")
            ));
        }
        if m.shard.map(|s| s.index as usize) != Some(k) {
            problems.push(format!(
                "{} does not record itself as shard {k}",
                path.display()
            ));
        }
    }
    if !problems.is_empty() {
        bail!("the shards do not agree: {}", problems.join("; "));
    }
    Ok(())
}

/// Counts summed from the result lines themselves.
#[derive(Debug, Default)]
struct Totals {
    ok: u64,
    by_code: BTreeMap<String, u64>,
    prompt: u64,
    cached: u64,
    completion: u64,
}

impl Totals {
    fn count(&mut self, v: &Value) {
        if v["error"].is_null() {
            self.ok += 1;
            let u = &v["response"]["body"]["usage"];
            self.prompt += u["prompt_tokens"].as_u64().unwrap_or(0);
            self.completion += u["completion_tokens"].as_u64().unwrap_or(0);
            self.cached += u["prompt_tokens_details"]["cached_tokens"]
                .as_u64()
                .unwrap_or(0);
        } else {
            let code = v["error"]["code"].as_str().unwrap_or("?").to_owned();
            *self.by_code.entry(code).or_default() += 1;
        }
    }

    fn failed(&self) -> u64 {
        self.by_code.values().sum()
    }
}

/// The merged summary: counts from the result lines, times and prefix work from the shards.
fn write_summary(main: &Path, shards: &[(PathBuf, Manifest)], t: &Totals) -> Result<()> {
    let per_shard: Vec<Value> = shards
        .iter()
        .map(|(path, m)| {
            let s: Value = std::fs::read_to_string(summary_path(path))
                .ok()
                .and_then(|t| serde_json::from_str(&t).ok())
                .unwrap_or(Value::Null);
            json!({
                "shard": m.shard.map(|s| s.to_string()),
                "requests": m.input.total,
                "runs": m.runs.len(),
                "last_run": {
                    "wall_seconds": s["wall_seconds"],
                    "prefix_prefilled_tokens": s["tokens"]["prefix_prefilled"],
                    "prefix_restored_tokens": s["tokens"]["prefix_restored"],
                    "prompt_computed_tokens": s["tokens"]["prompt_computed"],
                },
            })
        })
        .collect();
    let first_start = shards
        .iter()
        .filter_map(|(_, m)| m.runs.first().map(|r| r.started_unix))
        .min();
    let last_end = shards.iter().filter_map(|(_, m)| m.finished_unix).max();
    let summary = json!({
        "merged_shards": shards.len(),
        // From the first shard's start to the last one's end, queueing between them included.
        "wall_seconds": first_start.zip(last_end).map(|(a, b)| b.saturating_sub(a)),
        "requests": {"ok": t.ok, "failed": t.failed(), "failed_by_code": t.by_code},
        "tokens": {
            "prompt": t.prompt,
            "prompt_cached": t.cached,
            "completion": t.completion,
        },
        "shards": per_shard,
    });
    crate::summary::write(&summary_path(main), &summary)
}
