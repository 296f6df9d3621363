//! The manifest beside an output (`out.jsonl` → `out.manifest.json`): what its lines were
//! computed from, so a run only ever resumes into results of the same computation.
//!
//! It records the input's hash, the model's hash and every setting that changes outputs
//! (`params`, compared on resume), and, for the record only, the `--parallel` each run actually
//! used (`runs`). Reading and writing it durably is [`crate::durability::manifest`]'s job.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::formats::paths::sibling_path;
use crate::formats::shard::Shard;

/// Version of the manifest layout.
pub const MANIFEST_VERSION: u64 = 1;

/// Run records kept; older ones are dropped first.
const MAX_RUN_RECORDS: usize = 100;

/// `dir/out.jsonl` → `dir/out.manifest.json`.
pub fn manifest_path(output: &Path) -> PathBuf {
    sibling_path(output, "manifest.json")
}

/// Where a run stands, as the manifest records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    /// A run is (or was, if it died) working on it.
    Running,
    /// Stopped by a signal; resumable.
    Interrupted,
    /// Every request has its line.
    Finished,
}

/// The input a manifest describes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputRecord {
    /// Where it was read from.
    pub path: PathBuf,
    /// SHA-256 of its bytes, in hex.
    pub sha256: String,
    /// Input lines that get an output line (blank lines excluded); 0 until counted.
    pub total: u64,
}

/// The model a manifest describes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelRecord {
    /// Where it was loaded from.
    pub path: PathBuf,
    /// SHA-256 of its bytes, in hex.
    pub sha256: String,
}

/// One run (or resumed run) into the output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunRecord {
    /// When it started, in seconds since the epoch.
    pub started_unix: u64,
    /// The `--parallel` it ran with, after any lowering for memory.
    pub parallel: u32,
}

/// The `params` key of `--ignore-unknown-fields`, which the merge reads back.
pub const IGNORE_UNKNOWN_FIELDS: &str = "ignore-unknown-fields";

/// The settings that change what a request's line says, by flag name: a manifest's `params`.
/// `--parallel` is not among them: in deterministic mode it changes nothing, and without it
/// batch-mates change the last bits anyway, resumed or not. The manifest records it per run.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct OutputParams {
    /// `--max-tokens`.
    pub max_tokens: u32,
    /// `--temperature`.
    pub temperature: f32,
    /// `--seed`.
    pub seed: u64,
    /// `--batch-size`.
    pub batch_size: u32,
    /// `--flash-attn`, lower-case.
    pub flash_attn: String,
    /// `--gpu-layers` as asked.
    pub gpu_layers: u32,
    /// `--no-prefix-cache`.
    pub no_prefix_cache: bool,
    /// `--ctx-size`.
    pub ctx_size: Option<u32>,
    /// Whether outputs are independent of batch-mates.
    pub deterministic: bool,
    /// The chat template's identity.
    pub chat_template: String,
    /// `--ignore-unknown-fields`, written only when set, so that outputs written before the
    /// flag existed still resume.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub ignore_unknown_fields: bool,
    /// `--pooling`, written only when given (so outputs written before it existed resume).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pooling: Option<String>,
    /// `--no-normalize-embeddings`, written only when set.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub no_normalize_embeddings: bool,
}

impl OutputParams {
    /// As the manifest stores them: a map, compared key by key on resume, so a manifest with
    /// settings this build does not know still reads, and the change is named.
    pub fn to_map(&self) -> Map<String, Value> {
        match serde_json::to_value(self) {
            Ok(Value::Object(map)) => map,
            _ => unreachable!("a struct of plain fields serialises to an object"),
        }
    }
}

/// What an output's lines were computed from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// [`MANIFEST_VERSION`].
    pub version: u64,
    /// The input.
    pub input: InputRecord,
    /// The model.
    pub model: ModelRecord,
    /// Every setting that changes outputs, by flag name; a resume must not mix two of them.
    pub params: Map<String, Value>,
    /// The runs so far, oldest first.
    #[serde(default)]
    pub runs: Vec<RunRecord>,
    /// Where the run stands.
    pub state: RunState,
    /// The shard of the input this output holds; `None` for the whole input.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard: Option<Shard>,
    /// When the last run finished every request, in seconds since the epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_unix: Option<u64>,
    /// For the output of `infer-batch merge`: how many shards it joined.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merged_shards: Option<u32>,
}

impl Manifest {
    /// Marks where the run stands as it ends: interrupted, or finished at `now_unix`.
    pub fn finish(&mut self, interrupted: bool, now_unix: u64) {
        if interrupted {
            self.state = RunState::Interrupted;
        } else {
            self.state = RunState::Finished;
            self.finished_unix = Some(now_unix);
        }
    }

    /// Records a run; past 100 records the oldest go.
    pub fn record_run(&mut self, run: RunRecord) {
        self.runs.push(run);
        if self.runs.len() > MAX_RUN_RECORDS {
            self.runs.remove(0);
        }
    }

    /// What differs between the manifest a run would write and the stored one, in words.
    pub fn differences(&self, stored: &Self) -> Vec<String> {
        let mut out = Vec::new();
        if self.input.sha256 != stored.input.sha256 {
            out.push("the input file changed".to_owned());
        }
        if self.model.sha256 != stored.model.sha256 {
            out.push("the model file changed".to_owned());
        }
        if self.shard != stored.shard {
            let name =
                |s: Option<Shard>| s.map_or("the whole input".to_owned(), |s| format!("shard {s}"));
            out.push(format!(
                "it holds {}, this run is {}",
                name(stored.shard),
                name(self.shard)
            ));
        }
        // A setting missing on one side reads as null, so one dropped or added is a change too.
        let dropped = stored
            .params
            .keys()
            .filter(|k| !self.params.contains_key(*k));
        for k in self.params.keys().chain(dropped) {
            let now = self.params.get(k).unwrap_or(&Value::Null);
            let old = stored.params.get(k).unwrap_or(&Value::Null);
            if old != now {
                out.push(format!("--{k} was {old}, now {now}"));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;
    use serde_json::json;

    pub fn manifest(input_sha: &str, params: Value) -> Manifest {
        Manifest {
            version: MANIFEST_VERSION,
            input: InputRecord {
                path: "in.jsonl".into(),
                sha256: input_sha.into(),
                total: 3,
            },
            model: ModelRecord {
                path: "m.gguf".into(),
                sha256: "m".into(),
            },
            params: params.as_object().cloned().unwrap_or_default(),
            runs: Vec::new(),
            state: RunState::Running,
            shard: None,
            finished_unix: None,
            merged_shards: None,
        }
    }

    #[test]
    fn differences_name_what_changed() {
        let a = manifest("x", json!({"seed": 1, "max-tokens": 8}));
        let mut b = a.clone();
        assert!(a.differences(&b).is_empty());
        b.input.sha256 = "y".into();
        b.params = manifest("y", json!({"seed": 2, "max-tokens": 8})).params;
        let d = a.differences(&b);
        assert_eq!(d.len(), 2, "{d:?}");
        assert!(d[0].contains("input"));
        assert!(d[1].contains("--seed was 2, now 1"));
        let flagged = manifest("x", json!({"seed": 1, "max-tokens": 8, "strict": true}));
        assert_eq!(
            a.differences(&flagged),
            vec!["--strict was true, now null".to_owned()]
        );
        assert_eq!(
            flagged.differences(&a),
            vec!["--strict was null, now true".to_owned()]
        );
    }

    #[test]
    fn runs_are_a_record_not_a_difference() {
        let a = manifest("x", json!({"seed": 1}));
        let mut b = a.clone();
        b.record_run(RunRecord {
            started_unix: 1,
            parallel: 8,
        });
        assert!(a.differences(&b).is_empty());
        for i in 0..(MAX_RUN_RECORDS + 5) {
            b.record_run(RunRecord {
                started_unix: i as u64,
                parallel: 2,
            });
        }
        assert_eq!(b.runs.len(), MAX_RUN_RECORDS);
        assert_eq!(b.runs[0].started_unix, 5);
    }

    #[test]
    fn round_trips_and_refuses_other_versions_and_shapes() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("o.jsonl");
        let mut m = manifest("x", json!({"seed": 1}));
        m.state = RunState::Interrupted;
        m.write(&out).unwrap();
        assert_eq!(Manifest::read(&out).unwrap(), Some(m.clone()));
        assert!(manifest_path(&out).ends_with("o.manifest.json"));
        assert_eq!(
            Manifest::read(&dir.path().join("none.jsonl")).unwrap(),
            None
        );

        let mut v = serde_json::to_value(&m).unwrap();
        v["version"] = json!(9);
        fs::write(manifest_path(&out), v.to_string()).unwrap();
        let e = Manifest::read(&out).unwrap_err().to_string();
        assert!(e.contains("version 9") && e.contains("--restart"), "{e}");

        fs::write(manifest_path(&out), r#"{"version": 1, "what": 2}"#).unwrap();
        let e = format!("{:#}", Manifest::read(&out).unwrap_err());
        assert!(e.contains("not a valid"), "{e}");
    }
}
