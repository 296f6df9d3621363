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
use serde_json::Value;

use crate::digest::hash64;
use crate::durability::checkpoint::scan_output;
use crate::durability::durable::{write_atomic_with, write_json_atomic};
use crate::durability::lock::OutputLock;
use crate::formats::manifest::{Manifest, RunState};
use crate::formats::result::LineHead;
use crate::formats::shard::{find_outputs, Shard};
use crate::formats::summary::{
    MergeSummary, MergedTokens, RequestCounts, RunSummary, ShardRecord, ShardRun, SummaryKind,
};
use crate::identity::Section;
use crate::input::fields::FieldPolicy;
use crate::input::request::RequestReader;
use crate::report::summary::summary_path;

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
    let (count, by_index) = find_shards(main, dir)?;
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
        .collect::<Result<_, _>>()
        .context("a shard is still running; merge once it ends")?;
    let shards = read_manifests(by_index)?;
    check_agreement(&shards)?;
    let reference = &shards[0].1;
    let index = InputIndex::read(reference)?;
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
    let placement = place(&shards, &maps, &index);
    check_complete(main, &shards, &index, &placement)?;

    let lines = placement.placed.len() as u64;
    let mut sequence: Vec<&Placed> = placement.placed.values().flatten().collect();
    if order == Order::Completion {
        sequence.sort_by_key(|p| (p.shard, p.start));
    }
    write_atomic_with(main, |out| {
        for p in sequence {
            out.write_all(&maps[p.shard][p.start..p.end])?;
        }
        Ok(())
    })?;
    merged_manifest(reference, &shards, lines, count).write(main)?;
    write_summary(main, &shards, &placement.totals)?;
    Ok(Merged {
        shards: count,
        lines,
        failed: placement.totals.failed(),
    })
}

/// The shard outputs of `main`: their count, and each one's path by index. All must be there.
fn find_shards(main: &Path, dir: Option<&Path>) -> Result<(u32, BTreeMap<u32, PathBuf>)> {
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
    Ok((count, by_index))
}

fn read_manifests(by_index: BTreeMap<u32, PathBuf>) -> Result<Vec<(PathBuf, Manifest)>> {
    by_index
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
        .collect()
}

/// Every input line, and the line of each id's first use.
struct InputIndex {
    line_of: HashMap<u64, u64>,
    ids: Vec<Option<String>>,
    expected: Vec<u64>,
}

impl InputIndex {
    /// Reads the input the shards were computed from.
    fn read(reference: &Manifest) -> Result<Self> {
        let policy = FieldPolicy {
            ignore_unknown: reference.setting("output", "ignore-unknown-fields")
                == Some(&Value::Bool(true)),
        };
        let input = File::open(&reference.input.path).with_context(|| {
            format!(
                "cannot read the input {} that the shards were computed from",
                reference.input.path.display()
            )
        })?;
        let mut index = Self {
            line_of: HashMap::new(),
            ids: Vec::new(),
            expected: Vec::new(),
        };
        for item in RequestReader::new(BufReader::new(input), policy) {
            let item = item.context("cannot read the input")?;
            let (line, id) = match &item {
                Ok(r) => {
                    index.line_of.insert(hash64(&r.custom_id), r.line);
                    (r.line, Some(r.custom_id.clone()))
                }
                Err(e) => (e.line, e.custom_id.clone()),
            };
            index.expected.push(line);
            if index.ids.len() <= line as usize {
                index.ids.resize(line as usize + 1, None);
            }
            index.ids[line as usize] = id;
        }
        Ok(index)
    }

    /// An input line as the refusal names it.
    fn name(&self, l: u64) -> String {
        match self.ids.get(l as usize).cloned().flatten() {
            Some(id) => format!("line {l} ({id:?})"),
            None => format!("line {l}"),
        }
    }
}

/// The shards' result lines, matched to input lines.
struct Placement {
    placed: BTreeMap<u64, Vec<Placed>>,
    totals: Totals,
    strays: Vec<String>,
}

fn place(shards: &[(PathBuf, Manifest)], maps: &[memmap2::Mmap], index: &InputIndex) -> Placement {
    let mut placement = Placement {
        placed: BTreeMap::new(),
        totals: Totals::default(),
        strays: Vec::new(),
    };
    for (shard, map) in maps.iter().enumerate() {
        let mut start = 0;
        for line in map.split_inclusive(|&b| b == b'\n') {
            let end = start + line.len();
            let Some(head) = line
                .ends_with(b"\n")
                .then(|| LineHead::parse(line))
                .flatten()
            else {
                // A torn last line is not a result; the request counts as missing.
                start = end;
                continue;
            };
            placement.totals.count(&head);
            let input_line = match &head.error {
                None => head
                    .custom_id
                    .as_ref()
                    .and_then(|id| index.line_of.get(&hash64(id)).copied()),
                Some(e) => e.line,
            };
            match input_line {
                Some(l) => {
                    placement
                        .placed
                        .entry(l)
                        .or_default()
                        .push(Placed { shard, start, end })
                }
                None => placement.strays.push(format!(
                    "{}: a line for {} that the input does not hold",
                    shards[shard].0.display(),
                    head.custom_id
                        .as_ref()
                        .map_or_else(|| "null".to_owned(), |id| format!("{id:?}"))
                )),
            }
            start = end;
        }
    }
    placement
}

/// Refuses a merge where a request is missing, written twice, or not in the input.
fn check_complete(
    main: &Path,
    shards: &[(PathBuf, Manifest)],
    index: &InputIndex,
    placement: &Placement,
) -> Result<()> {
    let missing: Vec<u64> = index
        .expected
        .iter()
        .copied()
        .filter(|l| !placement.placed.contains_key(l))
        .collect();
    let twice: Vec<u64> = placement
        .placed
        .iter()
        .filter(|(_, p)| p.len() > 1)
        .map(|(l, _)| *l)
        .collect();
    if missing.is_empty() && twice.is_empty() && placement.strays.is_empty() {
        return Ok(());
    }
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
            let mut listed: Vec<String> =
                lines.iter().take(LISTED).map(|&l| index.name(l)).collect();
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
    problems.extend(placement.strays.iter().take(LISTED).cloned());
    bail!(
        "not merged, {} holds nothing new: {}",
        main.display(),
        problems.join("; ")
    )
}

/// The merged output's manifest: the shards' computation, finished, with all their runs.
fn merged_manifest(
    reference: &Manifest,
    shards: &[(PathBuf, Manifest)],
    lines: u64,
    count: u32,
) -> Manifest {
    let mut manifest = reference.clone();
    manifest.input.total = lines;
    manifest.shard = None;
    manifest.state = RunState::Finished;
    manifest.runs = shards.iter().flat_map(|(_, m)| m.runs.clone()).collect();
    manifest.runs.sort_by_key(|r| r.started_unix);
    manifest.finished_unix = shards.iter().filter_map(|(_, m)| m.finished_unix).max();
    manifest.merged_shards = Some(count);
    for (_, m) in shards {
        let machines = m.identity.get("machine").into_iter();
        for machine in machines.chain(&m.other_machines) {
            if reference.identity.get("machine") != Some(machine)
                && !manifest.other_machines.contains(machine)
            {
                manifest.other_machines.push(machine.clone());
            }
        }
    }
    manifest
}

/// Every shard must describe the same computation as the first, and be the shard its name says.
/// Shards computed on other machines agree only when every one of them accepted that
/// (`--resume-anywhere`).
fn check_agreement(shards: &[(PathBuf, Manifest)]) -> Result<()> {
    let reference = &shards[0].1;
    let anywhere = shards.iter().all(|(_, m)| m.resume_anywhere);
    let mut problems = Vec::new();
    for (k, (path, m)) in shards.iter().enumerate() {
        let mut whole = m.clone();
        whole.shard = reference.shard;
        let differences: Vec<String> = whole
            .differences(reference)
            .into_iter()
            .filter(|d| !(anywhere && d.section == Section::Machine))
            .map(|d| d.text)
            .collect();
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
    tokens: MergedTokens,
}

impl Totals {
    fn count(&mut self, head: &LineHead) {
        match &head.error {
            None => {
                self.ok += 1;
                if let Some(u) = head.usage() {
                    self.tokens.prompt += u.prompt_tokens;
                    self.tokens.completion += u.completion_tokens;
                    self.tokens.prompt_cached += u.cached_tokens();
                }
            }
            Some(e) => {
                let code = e.code.clone().unwrap_or_else(|| "?".to_owned());
                *self.by_code.entry(code).or_default() += 1;
            }
        }
    }

    fn failed(&self) -> u64 {
        self.by_code.values().sum()
    }
}

/// The merged summary: counts from the result lines, times and prefix work from the shards.
fn write_summary(main: &Path, shards: &[(PathBuf, Manifest)], t: &Totals) -> Result<()> {
    let per_shard = shards
        .iter()
        .map(|(path, m)| {
            let own: Option<RunSummary> = std::fs::read_to_string(summary_path(path))
                .ok()
                .and_then(|text| serde_json::from_str(&text).ok());
            ShardRecord {
                shard: m.shard.map(|s| s.to_string()),
                requests: m.input.total,
                runs: m.runs.len(),
                last_run: ShardRun::of(own.as_ref()),
            }
        })
        .collect();
    let first_start = shards
        .iter()
        .filter_map(|(_, m)| m.runs.first().map(|r| r.started_unix))
        .min();
    let last_end = shards.iter().filter_map(|(_, m)| m.finished_unix).max();
    let summary = MergeSummary {
        kind: SummaryKind::Merge,
        merged_shards: shards.len(),
        // From the first shard's start to the last one's end, queueing between them included.
        wall_seconds: first_start.zip(last_end).map(|(a, b)| b.saturating_sub(a)),
        requests: RequestCounts {
            ok: t.ok,
            failed: t.failed(),
            reused: None,
            deduplicated: None,
            failed_by_code: t.by_code.clone(),
        },
        tokens: t.tokens.clone(),
        shards: per_shard,
    };
    write_json_atomic(&summary_path(main), &summary)?;
    Ok(())
}
