//! The manifest beside an output (`out.jsonl` → `out.manifest.json`): what its lines were
//! computed from, so a run only ever resumes into results of the same computation.
//!
//! It records the input's hash, the model's path and the computation's [`Identity`] (compared on
//! resume, by `--reuse` and by `merge`), and, for the record only, the `--parallel` each run
//! actually used (`runs`). Reading and writing it durably is [`crate::durability::manifest`]'s
//! job.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::formats::paths::sibling_path;
use crate::formats::shard::Shard;
use crate::identity::{self, Difference, Identity, Section};

/// Version of the manifest layout.
pub const MANIFEST_VERSION: u64 = 2;

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

/// The model a manifest describes (its content hash is the identity's `model`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelRecord {
    /// Where it was loaded from.
    pub path: PathBuf,
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
    /// The computation's [`Identity`], as [`Identity::to_map`] writes it; a resume must not mix
    /// two of them.
    pub identity: Map<String, Value>,
    /// Whether a run into it accepted another machine's results (`--resume-anywhere`): then
    /// its lines may come from several machines, whose bits can differ.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub resume_anywhere: bool,
    /// The other machines whose lines it holds, as their identities' `machine` sections.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub other_machines: Vec<Value>,
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

    /// Sets the identity's machine, once the engine has started and probed.
    pub fn set_machine(&mut self, identity: &Identity) {
        self.identity = identity.to_map();
    }

    /// A field of the identity's settings or output defaults (`deterministic`,
    /// `ignore-unknown-fields`), as stored.
    pub fn setting(&self, section: &str, field: &str) -> Option<&Value> {
        self.identity.get(section)?.get(field)
    }

    /// What differs between the manifest a run would write and the stored one, each named and
    /// placed in its section: the input and the shard count as settings.
    pub fn differences(&self, stored: &Self) -> Vec<Difference> {
        let mut out = Vec::new();
        if self.input.sha256 != stored.input.sha256 {
            out.push(Difference {
                section: Section::Settings,
                text: "the input file changed".to_owned(),
            });
        }
        if self.shard != stored.shard {
            let name =
                |s: Option<Shard>| s.map_or("the whole input".to_owned(), |s| format!("shard {s}"));
            out.push(Difference {
                section: Section::Settings,
                text: format!(
                    "it holds {}, this run is {}",
                    name(stored.shard),
                    name(self.shard)
                ),
            });
        }
        out.extend(identity::differences(&self.identity, &stored.identity));
        out
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;
    use serde_json::json;

    pub fn manifest(input_sha: &str, settings: Value) -> Manifest {
        let mut identity = crate::identity::tests::identity().to_map();
        for (k, v) in settings.as_object().cloned().unwrap_or_default() {
            identity["settings"].as_object_mut().unwrap().insert(k, v);
        }
        Manifest {
            version: MANIFEST_VERSION,
            input: InputRecord {
                path: "in.jsonl".into(),
                sha256: input_sha.into(),
                total: 3,
            },
            model: ModelRecord {
                path: "m.gguf".into(),
            },
            identity,
            resume_anywhere: false,
            other_machines: Vec::new(),
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
        b.identity = manifest("y", json!({"seed": 2, "max-tokens": 8})).identity;
        let d = a.differences(&b);
        assert_eq!(d.len(), 2, "{d:?}");
        assert!(d[0].text.contains("input"));
        assert_eq!(d[1].text, "--seed was 2, now 1");
        let flagged = manifest("x", json!({"seed": 1, "max-tokens": 8, "strict": true}));
        let texts = |d: Vec<Difference>| d.into_iter().map(|d| d.text).collect::<Vec<_>>();
        assert_eq!(
            texts(a.differences(&flagged)),
            vec!["--strict was true, now null".to_owned()]
        );
        assert_eq!(
            texts(flagged.differences(&a)),
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

        fs::write(manifest_path(&out), r#"{"version": 2, "what": 2}"#).unwrap();
        let e = format!("{:#}", Manifest::read(&out).unwrap_err());
        assert!(e.contains("not a valid"), "{e}");
    }
}
