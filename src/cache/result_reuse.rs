//! Result reuse: the success lines of earlier outputs (`--reuse`) and of this run's own output,
//! found by the key of the computation that produced them.
//!
//! A line qualifies only when its output's manifest proves it was computed in deterministic
//! mode under the same computation [`Identity`](crate::identity::Identity) but for the
//! requests' defaults (which each line's [`ComputationKey`] holds): the same model, machine
//! and settings. Then a request with the same key gets the same line but for its ids, and
//! copying it is exact. The index keeps where each line lies, not the line, so a pool of a
//! million results costs tens of MB.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use crate::durability::sink::Placed;
use crate::durability::StateError;
use crate::error::{AtPath, FileError};
use crate::formats::manifest::{manifest_path, Manifest};
use crate::formats::result::{ComputationKey, ResultLine};
use crate::identity::{self, Section};

/// The longest line the index reads; a longer one is skipped (and its request computed), so
/// that a file with no line breaks cannot exhaust memory.
pub const MAX_LINE_BYTES: u64 = 64 << 20;

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
    /// Not a regular file (a FIFO, a device, a directory): it is never read.
    #[error("--reuse {}: not a regular file; give an output that infer-batch wrote", output.display())]
    NotAFile {
        /// The output.
        output: PathBuf,
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

/// Which part of the identities [`differences`] compares: the machine is known only once the
/// engine has started, everything else before the model loads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// The model and the settings.
    BeforeLoad,
    /// The machine.
    Machine,
}

/// Why lines of the output `earlier` describes differ from what a run described by `run` would
/// write for the same key, at `stage`; empty when they can be reused. The requests' defaults
/// are left out: each line's key holds what its request resolved.
pub fn differences(run: &Manifest, earlier: &Manifest, stage: Stage) -> Vec<String> {
    let mut out = Vec::new();
    let deterministic = earlier.setting("settings", "deterministic") == Some(&Value::Bool(true));
    if stage == Stage::BeforeLoad && !deterministic {
        out.push(
            "it was written with --no-deterministic, whose lines depend on their batch-mates"
                .to_owned(),
        );
    }
    for d in identity::differences(&run.identity, &earlier.identity) {
        let wanted = match d.section {
            Section::Output => false,
            Section::Machine => stage == Stage::Machine,
            Section::Model => stage == Stage::BeforeLoad,
            Section::Settings => stage == Stage::BeforeLoad && !d.text.contains("deterministic"),
        };
        if wanted {
            out.push(d.text);
        }
    }
    out
}

/// An earlier output given to `--reuse`, its file and manifest checked.
#[derive(Debug)]
pub struct Earlier {
    /// As given.
    given: PathBuf,
    /// The real file, symbolic links followed.
    path: PathBuf,
    manifest: Manifest,
}

impl Earlier {
    /// Checks `output` before the model loads: a regular file (symbolic links followed), with
    /// a manifest beside the real file that shows the same model and settings as `run`.
    ///
    /// # Errors
    /// When it is not a regular file, has no manifest, or was computed differently.
    pub fn open(output: &Path, run: &Manifest) -> Result<Self, ReuseError> {
        let path = fs::canonicalize(output).at("read", output)?;
        let meta = fs::metadata(&path).at("read", &path)?;
        if !meta.is_file() {
            return Err(ReuseError::NotAFile {
                output: output.to_owned(),
            });
        }
        let Some(manifest) = Manifest::read(&path)? else {
            return Err(ReuseError::NoManifest {
                output: output.to_owned(),
                manifest: manifest_path(&path),
            });
        };
        let earlier = Self {
            given: output.to_owned(),
            path,
            manifest,
        };
        earlier.check(run, Stage::BeforeLoad)?;
        Ok(earlier)
    }

    /// Checks the earlier output's machine against `run`'s, once the engine has started.
    ///
    /// # Errors
    /// When another machine computed it.
    pub fn check_machine(&self, run: &Manifest) -> Result<(), ReuseError> {
        self.check(run, Stage::Machine)
    }

    fn check(&self, run: &Manifest, stage: Stage) -> Result<(), ReuseError> {
        let reasons = differences(run, &self.manifest, stage);
        if reasons.is_empty() {
            return Ok(());
        }
        Err(ReuseError::Ineligible {
            output: self.given.clone(),
            reasons,
        })
    }

    /// The real file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Reads past the rest of a line without keeping it; returns the bytes read.
fn skip_line(reader: &mut impl BufRead) -> std::io::Result<u64> {
    let mut skipped = 0u64;
    loop {
        let buf = reader.fill_buf()?;
        if buf.is_empty() {
            return Ok(skipped);
        }
        match buf.iter().position(|&b| b == b'\n') {
            Some(i) => {
                reader.consume(i + 1);
                return Ok(skipped + i as u64 + 1);
            }
            None => {
                let n = buf.len();
                reader.consume(n);
                skipped += n as u64;
            }
        }
    }
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
pub struct ResultIndex {
    sources: Vec<Source>,
    lines: HashMap<ComputationKey, Location>,
    own: Option<usize>,
    max_line: u64,
}

impl Default for ResultIndex {
    fn default() -> Self {
        Self {
            sources: Vec::new(),
            lines: HashMap::new(),
            own: None,
            max_line: MAX_LINE_BYTES,
        }
    }
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

    /// Indexes an earlier output given to `--reuse`, checked by [`Earlier::open`] and
    /// [`Earlier::check_machine`]. Returns the lines it added.
    ///
    /// # Errors
    /// When the output cannot be read.
    pub fn add_earlier(&mut self, earlier: &Earlier) -> Result<usize, ReuseError> {
        self.add(&earlier.path, Origin::Earlier)
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
            let n = (&mut reader)
                .take(self.max_line + 1)
                .read_until(b'\n', &mut buf)
                .at("read", path)? as u64;
            if n > self.max_line {
                let rest = skip_line(&mut reader).at("read", path)?;
                tracing::warn!(
                    "{}: a line at byte {offset} is longer than {} bytes; not reused",
                    path.display(),
                    self.max_line
                );
                offset += n + rest;
                continue;
            }
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

    fn manifest(model: &str, deterministic: bool, batch: u32, seed: u64) -> Manifest {
        let mut id = crate::identity::tests::identity();
        id.model = model.into();
        id.settings.deterministic = deterministic;
        id.settings.batch_size = batch;
        id.output.seed = seed;
        Manifest {
            version: MANIFEST_VERSION,
            input: InputRecord {
                path: "in.jsonl".into(),
                sha256: "i".into(),
                total: 2,
            },
            model: ModelRecord {
                path: "m.gguf".into(),
            },
            identity: id.to_map(),
            resume_anywhere: false,
            other_machines: Vec::new(),
            runs: Vec::new(),
            state: RunState::Finished,
            shard: None,
            finished_unix: None,
            merged_shards: None,
        }
    }

    fn line(custom_id: &str, text: &str, key: u8) -> String {
        let c = Completion {
            line: 1,
            custom_id: custom_id.into(),
            choices: vec![Choice {
                content: text.into(),
                reason: StopReason::Stop,
                reasoning: None,
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
    fn only_deterministic_outputs_of_the_same_model_machine_and_settings_qualify() {
        let run = manifest("m", true, 512, 1);
        // The defaults requests resolve are in the key, not here.
        for stage in [Stage::BeforeLoad, Stage::Machine] {
            assert!(differences(&run, &manifest("m", true, 512, 7), stage).is_empty());
        }
        let d = differences(&run, &manifest("other", false, 256, 1), Stage::BeforeLoad);
        assert_eq!(d.len(), 3, "{d:?}");
        assert!(d[0].contains("--no-deterministic"));
        assert!(d[1].contains("model file changed"));
        assert!(d[2].contains("--batch-size was 256, now 512"));
        // Another machine shows once the engine has started, and only then.
        let mut gpu = manifest("m", true, 512, 1);
        gpu.identity["machine"]["gpu-layers"] = json!(31);
        gpu.identity["machine"]["devices"] = json!(["Vulkan0: llvmpipe"]);
        assert!(differences(&run, &gpu, Stage::BeforeLoad).is_empty());
        let d = differences(&run, &gpu, Stage::Machine);
        assert_eq!(d.len(), 2, "{d:?}");
        assert!(
            d.iter().any(|d| d.contains("gpu-layers was 31, now 0")),
            "{d:?}"
        );
    }

    #[test]
    fn only_regular_files_are_read_and_the_manifest_is_the_real_files() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real.jsonl");
        std::fs::write(&real, line("a", "x", 1) + "\n").unwrap();
        let run = manifest("m", true, 512, 1);
        run.write(&real).unwrap();
        // A link elsewhere finds the manifest beside its target, not beside itself.
        let other = dir.path().join("elsewhere");
        std::fs::create_dir(&other).unwrap();
        let link = other.join("link.jsonl");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let earlier = Earlier::open(&link, &run).unwrap();
        assert_eq!(earlier.path(), std::fs::canonicalize(&real).unwrap());
        let mut index = ResultIndex::new();
        assert_eq!(index.add_earlier(&earlier).unwrap(), 1);
        // A FIFO is refused before anything reads it (reading would block).
        let fifo = dir.path().join("fifo.jsonl");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let e = Earlier::open(&fifo, &run).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
        let e = Earlier::open(dir.path(), &run).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
    }

    #[test]
    fn a_line_past_the_cap_is_skipped_and_the_next_still_read() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("big.jsonl");
        let mut f = File::create(&out).unwrap();
        writeln!(f, "{}", line("a", "x", 1)).unwrap();
        // Past a small cap, as past the real one: no line break for a long way.
        f.write_all(&[b'x'; 5000]).unwrap();
        writeln!(f).unwrap();
        writeln!(f, "{}", line("b", "y", 2)).unwrap();
        drop(f);
        let run = manifest("m", true, 512, 1);
        run.write(&out).unwrap();
        let mut index = ResultIndex::new();
        index.max_line = 4096;
        let earlier = Earlier::open(&out, &run).unwrap();
        assert_eq!(index.add_earlier(&earlier).unwrap(), 2);
        let (found, _) = index.find(&ComputationKey([2; 32])).unwrap();
        assert_eq!(found.custom_id.as_deref(), Some("b"), "offsets stay right");
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
        let run = manifest("m", true, 512, 1);

        let mut index = ResultIndex::new();
        let e = Earlier::open(&out, &run).unwrap_err().to_string();
        assert!(e.contains("no manifest"), "{e}");
        manifest("m", false, 512, 1).write(&out).unwrap();
        let e = Earlier::open(&out, &run).unwrap_err().to_string();
        assert!(e.contains("--no-deterministic"), "{e}");

        run.write(&out).unwrap();
        let earlier = Earlier::open(&out, &run).unwrap();
        assert_eq!(index.add_earlier(&earlier).unwrap(), 2);
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
