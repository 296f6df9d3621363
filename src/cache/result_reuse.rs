//! Result reuse: the success lines of earlier outputs (`--reuse`) and of this run's own output,
//! found by the key of the computation that produced them.
//!
//! A line qualifies only when its output's manifest proves it was computed in deterministic
//! mode, on the same model file, with the same engine settings: then a request with the same
//! [`ComputationKey`] gets the same line but for its ids, and copying it is exact. The index
//! keeps where each line lies, not the line, so a pool of a million results costs tens of MB.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use crate::durability::sink::Placed;
use crate::durability::StateError;
use crate::error::{AtPath, FileError};
use crate::formats::manifest::{manifest_path, Manifest};
use crate::formats::result::{ComputationKey, ResultLine};

/// The manifest settings, besides the model and deterministic mode, that change a line for the
/// same key. The rest (`--max-tokens`, `--temperature`, `--seed` defaults, the chat template)
/// are folded into the key itself, request by request.
const ENGINE_PARAMS: [&str; 5] = [
    "batch-size",
    "flash-attn",
    "gpu-layers",
    "ctx-size",
    "no-prefix-cache",
];

/// Why an earlier output cannot serve `--reuse`.
#[derive(Debug, thiserror::Error)]
pub enum ReuseError {
    /// A file operation failed.
    #[error(transparent)]
    File(#[from] FileError),
    /// Its manifest is unreadable.
    #[error(transparent)]
    State(#[from] StateError),
    /// It has no manifest, so nothing proves what computed it.
    #[error(
        "--reuse {}: no manifest beside it ({}), so nothing proves how its lines were computed; \
         give an output that infer-batch wrote",
        output.display(), manifest.display()
    )]
    NoManifest {
        /// The output.
        output: PathBuf,
        /// Where its manifest should be.
        manifest: PathBuf,
    },
    /// Its manifest shows another computation.
    #[error(
        "--reuse {}: its results were computed differently, so none can be reused: {}",
        output.display(), reasons.join("; ")
    )]
    Ineligible {
        /// The output.
        output: PathBuf,
        /// What differs, in words.
        reasons: Vec<String>,
    },
}

/// Why lines of the output `earlier` describes differ from what a run described by `run` would
/// write for the same key; empty when they can be reused.
pub fn differences(run: &Manifest, earlier: &Manifest) -> Vec<String> {
    let mut out = Vec::new();
    if earlier.params.get("deterministic") != Some(&Value::Bool(true)) {
        out.push(
            "it was written with --no-deterministic, whose lines depend on their batch-mates"
                .to_owned(),
        );
    }
    if run.model.sha256 != earlier.model.sha256 {
        out.push(format!(
            "it was computed by another model file (sha256 {})",
            earlier.model.sha256
        ));
    }
    for k in ENGINE_PARAMS {
        let now = run.params.get(k).unwrap_or(&Value::Null);
        let old = earlier.params.get(k).unwrap_or(&Value::Null);
        if old != now {
            out.push(format!("--{k} was {old}, now {now}"));
        }
    }
    out
}

/// Where a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// An earlier output given to `--reuse`.
    Earlier,
    /// This run's own output: a duplicate of a request computed before in this file.
    ThisOutput,
}

#[derive(Debug, Clone, Copy)]
struct Location {
    source: usize,
    place: Placed,
}

/// An output whose lines the index points into.
struct Source {
    path: PathBuf,
    file: File,
    origin: Origin,
}

/// Reusable result lines by computation key.
#[derive(Default)]
pub struct ResultIndex {
    sources: Vec<Source>,
    lines: HashMap<ComputationKey, Location>,
    own: Option<usize>,
}

/// The one field the scan reads of a line.
#[derive(Deserialize)]
struct Tagged {
    #[serde(default)]
    computation: Option<String>,
}

impl ResultIndex {
    /// An empty index.
    pub fn new() -> Self {
        Self::default()
    }

    /// Indexes an earlier output given to `--reuse`, after checking that its manifest
    /// describes the same model and engine settings as `run`. Returns the lines it added.
    ///
    /// # Errors
    /// When the output cannot be read, has no manifest, or was computed differently.
    pub fn add_earlier(&mut self, output: &Path, run: &Manifest) -> Result<usize, ReuseError> {
        let Some(earlier) = Manifest::read(output)? else {
            return Err(ReuseError::NoManifest {
                output: output.to_owned(),
                manifest: manifest_path(output),
            });
        };
        let reasons = differences(run, &earlier);
        if !reasons.is_empty() {
            return Err(ReuseError::Ineligible {
                output: output.to_owned(),
                reasons,
            });
        }
        self.add(output, Origin::Earlier)
    }

    /// Indexes this run's own output (lines earlier runs into it wrote) and makes it the home
    /// of the lines [`Self::record`] adds. Its manifest is this run's, checked on resume.
    ///
    /// # Errors
    /// When it cannot be read.
    pub fn add_own(&mut self, output: &Path) -> Result<usize, ReuseError> {
        let added = self.add(output, Origin::ThisOutput)?;
        self.own = Some(self.sources.len() - 1);
        Ok(added)
    }

    fn add(&mut self, path: &Path, origin: Origin) -> Result<usize, ReuseError> {
        let file = File::open(path).at("read", path)?;
        let source = self.sources.len();
        let mut reader = BufReader::new(&file);
        let mut buf = Vec::new();
        let mut offset = 0u64;
        let mut added = 0;
        loop {
            buf.clear();
            let n = reader.read_until(b'\n', &mut buf).at("read", path)? as u64;
            // A torn last line has no newline: it is not a result yet.
            if n == 0 || buf.last() != Some(&b'\n') {
                break;
            }
            let key = serde_json::from_slice::<Tagged>(&buf)
                .ok()
                .and_then(|t| t.computation)
                .and_then(|hex| ComputationKey::parse(&hex));
            if let Some(key) = key {
                let place = Placed { offset, len: n - 1 };
                self.lines.entry(key).or_insert_with(|| {
                    added += 1;
                    Location { source, place }
                });
            }
            offset += n;
        }
        drop(reader);
        self.sources.push(Source {
            path: path.to_owned(),
            file,
            origin,
        });
        Ok(added)
    }

    /// Records a line this run wrote to its own output.
    pub fn record(&mut self, key: ComputationKey, place: Placed) {
        if let Some(source) = self.own {
            self.lines.entry(key).or_insert(Location { source, place });
        }
    }

    /// The line an earlier computation with `key` produced, and where it came from. A line
    /// that no longer reads back as a success line with that key is left alone (with a
    /// warning): the request is computed instead.
    pub fn find(&self, key: &ComputationKey) -> Option<(ResultLine, Origin)> {
        let at = self.lines.get(key)?;
        let source = &self.sources[at.source];
        let read = || -> Result<ResultLine, String> {
            let len = usize::try_from(at.place.len).map_err(|e| e.to_string())?;
            let mut buf = vec![0; len];
            source
                .file
                .read_exact_at(&mut buf, at.place.offset)
                .map_err(|e| e.to_string())?;
            let line: ResultLine = serde_json::from_slice(&buf).map_err(|e| e.to_string())?;
            if line.response.is_none() || line.computation != Some(key.hex()) {
                return Err("it is not the line indexed there".into());
            }
            Ok(line)
        };
        match read() {
            Ok(line) => Some((line, source.origin)),
            Err(e) => {
                tracing::warn!(
                    "cannot reuse a line of {} at byte {} ({e}); computing it instead",
                    source.path.display(),
                    at.place.offset
                );
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use serde_json::json;

    use super::*;
    use crate::formats::manifest::{InputRecord, ModelRecord, RunState, MANIFEST_VERSION};
    use crate::formats::result::{Choice, Completion, StopReason, Usage};

    fn manifest(model: &str, params: Value) -> Manifest {
        Manifest {
            version: MANIFEST_VERSION,
            input: InputRecord {
                path: "in.jsonl".into(),
                sha256: "i".into(),
                total: 2,
            },
            model: ModelRecord {
                path: "m.gguf".into(),
                sha256: model.into(),
            },
            params: params.as_object().cloned().unwrap_or_default(),
            runs: Vec::new(),
            state: RunState::Finished,
            shard: None,
            finished_unix: None,
            merged_shards: None,
        }
    }

    fn params(deterministic: bool, batch: u32, seed: u64) -> Value {
        json!({"deterministic": deterministic, "batch-size": batch, "seed": seed,
               "flash-attn": "off", "gpu-layers": 0, "ctx-size": null, "no-prefix-cache": false})
    }

    fn line(custom_id: &str, text: &str, key: u8) -> String {
        let c = Completion {
            line: 1,
            custom_id: custom_id.into(),
            choices: vec![Choice {
                content: text.into(),
                reason: StopReason::Stop,
                logprobs: None,
            }],
            usage: Usage::default(),
            time_to_first_token: 0.0,
            endpoint: crate::formats::result::Endpoint::Chat,
        };
        let l = ResultLine::success(&c, "m", 1).with_computation(ComputationKey([key; 32]));
        serde_json::to_string(&l).unwrap()
    }

    #[test]
    fn only_deterministic_outputs_of_the_same_model_and_engine_settings_qualify() {
        let run = manifest("m", params(true, 512, 1));
        // The defaults requests resolve are in the key, not here.
        assert!(differences(&run, &manifest("m", params(true, 512, 7))).is_empty());
        let d = differences(&run, &manifest("other", params(false, 256, 1)));
        assert_eq!(d.len(), 3, "{d:?}");
        assert!(d[0].contains("--no-deterministic"));
        assert!(d[1].contains("another model"));
        assert!(d[2].contains("--batch-size was 256, now 512"));
    }

    #[test]
    fn the_index_finds_tagged_success_lines_and_skips_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("old.jsonl");
        let error_line = r#"{"id":"x","custom_id":"e","response":null,"error":{"code":"c","message":"m","line":2}}"#;
        let untagged = line("u", "untagged", 0).replace(r#","computation":"#, r#","other":"#);
        let text = [
            line("a", "first", 1),
            error_line.to_owned(),
            untagged,
            line("b", "second", 2),
            line("c", "later twin", 1),
        ]
        .join("\n")
            + "\n"
            + &line("torn", "torn", 3)[..40];
        std::fs::write(&out, text).unwrap();
        let run = manifest("m", params(true, 512, 1));

        let mut index = ResultIndex::new();
        let e = index.add_earlier(&out, &run).unwrap_err().to_string();
        assert!(e.contains("no manifest"), "{e}");
        manifest("m", params(false, 512, 1)).write(&out).unwrap();
        let e = index.add_earlier(&out, &run).unwrap_err().to_string();
        assert!(e.contains("--no-deterministic"), "{e}");

        run.write(&out).unwrap();
        assert_eq!(index.add_earlier(&out, &run).unwrap(), 2);
        let (found, origin) = index.find(&ComputationKey([1; 32])).unwrap();
        assert_eq!(origin, Origin::Earlier);
        assert_eq!(
            found.custom_id.as_deref(),
            Some("a"),
            "the first line of a key wins"
        );
        assert_eq!(
            found.response.unwrap().body.chat().unwrap().choices[0]
                .message
                .content,
            "first"
        );
        assert!(
            index.find(&ComputationKey([3; 32])).is_none(),
            "a torn line is not a result"
        );
        assert!(index.find(&ComputationKey([0; 32])).is_none());

        // Lines this run writes join the index as they are written.
        let own = dir.path().join("new.jsonl");
        std::fs::write(&own, "").unwrap();
        index.add_own(&own).unwrap();
        let fresh = line("d", "fresh", 4);
        let mut f = std::fs::OpenOptions::new().append(true).open(&own).unwrap();
        writeln!(f, "{fresh}").unwrap();
        index.record(
            ComputationKey([4; 32]),
            Placed {
                offset: 0,
                len: fresh.len() as u64,
            },
        );
        let (found, origin) = index.find(&ComputationKey([4; 32])).unwrap();
        assert_eq!(
            (found.custom_id.as_deref(), origin),
            (Some("d"), Origin::ThisOutput)
        );

        // A line changed under the index is not trusted: the request is computed instead.
        std::fs::write(&own, line("d", "fresh", 5) + "\n").unwrap();
        assert!(index.find(&ComputationKey([4; 32])).is_none());
    }
}
