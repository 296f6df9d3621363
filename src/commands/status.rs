//! `infer-batch status`: an output's progress, read from its manifest and lines without
//! loading a model; for a sharded batch, each shard's and all of them together.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::durability::checkpoint::scan_output;
use crate::durability::lock::lock_holder;
use crate::formats::manifest::{manifest_path, Manifest, RunState};
use crate::formats::shard::{find_outputs, Shard};

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
    /// The pid of the process running it now, when one holds the output's lock.
    pub held_by: Option<String>,
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

    /// The same as one line of text.
    pub fn line(&self) -> String {
        let running = match (&self.held_by, self.label()) {
            (Some(pid), _) => format!("; process {pid} is running it"),
            (None, "completed") => String::new(),
            (None, _) => "; no process is running it: run the same command again to resume".into(),
        };
        format!(
            "{}: {} of {} done ({} completed, {} failed), {} remaining{running}",
            self.label(),
            self.completed + self.failed,
            self.total,
            self.completed,
            self.failed,
            self.remaining()
        )
    }

    /// The same as `status --json` prints it.
    pub fn report(&self, output: &Path) -> StatusReport {
        StatusReport {
            output: output.to_owned(),
            status: self.label().to_owned(),
            request_counts: self.counts(),
            remaining: self.remaining(),
            running_pid: self.held_by.as_ref().and_then(|p| p.parse::<u64>().ok()),
            shard: None,
        }
    }

    fn counts(&self) -> RequestCountsReport {
        RequestCountsReport {
            total: self.total,
            completed: self.completed,
            failed: self.failed,
        }
    }
}

/// `request_counts`, after the OpenAI batch object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestCountsReport {
    /// Requests in the input.
    pub total: u64,
    /// With a result line.
    pub completed: u64,
    /// With an error line.
    pub failed: u64,
}

/// What `status --json` prints for one output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReport {
    /// The output.
    pub output: PathBuf,
    /// `in_progress`, `interrupted` or `completed`.
    pub status: String,
    /// Requests by outcome.
    pub request_counts: RequestCountsReport,
    /// Requests with no line yet.
    pub remaining: u64,
    /// The process running it now.
    pub running_pid: Option<u64>,
    /// For a shard: which, `K/N`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard: Option<String>,
}

/// What `status --json` prints for a sharded output: every shard, then all together.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardedReport {
    /// The main output the shards belong to.
    pub output: PathBuf,
    /// `in_progress`, `interrupted` or `completed`, over all shards.
    pub status: String,
    /// Requests by outcome, over the shards started.
    pub request_counts: RequestCountsReport,
    /// Requests with no line yet, in the shards started.
    pub remaining: u64,
    /// Each shard started.
    pub shards: Vec<StatusReport>,
    /// Shards with no output yet.
    pub shards_not_started: Vec<String>,
}

/// Reads an output's state from its manifest and lines, without loading any model.
///
/// # Errors
/// When the output has no manifest or cannot be read.
pub fn read(output: &Path) -> Result<Status> {
    let manifest = Manifest::read(output)?.with_context(|| {
        format!(
            "no manifest for {} ({}): not an infer-batch output, or no run has started",
            output.display(),
            manifest_path(output).display()
        )
    })?;
    let (done, _) = scan_output(output)?;
    Ok(Status {
        total: manifest.input.total,
        completed: done.ok.len() as u64,
        failed: done.failed.len() as u64,
        state: manifest.state,
        held_by: lock_holder(output),
    })
}

/// The status of `output` as text, or as JSON with `json`. An output with no manifest but
/// shard outputs beside it reports its shards.
///
/// # Errors
/// When there is neither a manifest nor a shard output.
pub fn report(output: &Path, json: bool) -> Result<String> {
    let shards = find_outputs(output, None);
    if !manifest_path(output).exists() && !shards.is_empty() {
        return sharded(output, &shards, json);
    }
    let s = read(output)?;
    Ok(if json {
        serde_json::to_string(&s.report(output))?
    } else {
        s.line()
    })
}

/// Each shard, then all of them.
fn sharded(main: &Path, shards: &[(Shard, PathBuf)], json: bool) -> Result<String> {
    let count = shards[0].0.count;
    let mut total = Status {
        total: 0,
        completed: 0,
        failed: 0,
        state: RunState::Finished,
        held_by: None,
    };
    let (mut reports, mut lines) = (Vec::new(), Vec::new());
    let (mut labels, mut missing) = (Vec::new(), Vec::new());
    for index in 0..count {
        let shard = Shard { index, count };
        let Some(s) = shards
            .iter()
            .find(|(s, _)| *s == shard)
            .and_then(|(_, path)| read(path).ok().map(|s| (path, s)))
        else {
            missing.push(shard.to_string());
            continue;
        };
        let (path, s) = s;
        total.total += s.total;
        total.completed += s.completed;
        total.failed += s.failed;
        labels.push((s.label(), s.held_by.is_some()));
        reports.push(StatusReport {
            shard: Some(shard.to_string()),
            ..s.report(path)
        });
        lines.push(format!("shard {shard}: {}", s.line()));
    }
    let overall = if missing.is_empty() && labels.iter().all(|(l, _)| *l == "completed") {
        "completed"
    } else if !labels.iter().any(|(_, running)| *running)
        && labels.iter().any(|(l, _)| *l == "interrupted")
    {
        "interrupted"
    } else {
        "in_progress"
    };
    if json {
        let report = ShardedReport {
            output: main.to_owned(),
            status: overall.to_owned(),
            request_counts: total.counts(),
            remaining: total.remaining(),
            shards: reports,
            shards_not_started: missing,
        };
        return Ok(serde_json::to_string(&report)?);
    }
    let mut text = lines;
    if !missing.is_empty() {
        text.push(format!("not started: shards {}", missing.join(", ")));
    }
    text.push(format!(
        "all shards: {overall}: {} of {} done ({} completed, {} failed), {} remaining{}; \
         `infer-batch merge {}` joins them",
        total.completed + total.failed,
        total.total,
        total.completed,
        total.failed,
        total.remaining(),
        if missing.is_empty() {
            ""
        } else {
            " in the shards started"
        },
        main.display()
    ));
    Ok(text.join("\n"))
}
