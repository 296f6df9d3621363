//! Sharding a batch across processes or hosts: which requests shard K of N runs, and where it
//! writes them.
//!
//! A request belongs to shard `hash64(custom_id) mod N`, a hash of its id alone, so a
//! reordered input shards the same and a duplicate id lands in the shard of its first use. A
//! line without a readable `custom_id` is placed by a hash of its bytes. Shard K of N writes
//! `out.shard-000K-of-000N.jsonl` beside the main output, with its own manifest, summary and
//! lock, so resume, `--retry-failed` and `--supervise` work per shard unchanged.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::digest::hash64;
use crate::formats::paths::sibling_path;

/// A `--shard` value, or an array task's environment, that names no shard.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ShardError(String);

impl From<String> for ShardError {
    fn from(message: String) -> Self {
        Self(message)
    }
}

impl From<&str> for ShardError {
    fn from(message: &str) -> Self {
        Self(message.to_owned())
    }
}

/// Shard `index` of `count`, 0-based.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Shard {
    /// Which shard, from 0.
    pub index: u32,
    /// How many shards.
    pub count: u32,
}

impl Shard {
    /// Reads `K/N` (0 ≤ K < N).
    ///
    /// # Errors
    /// A message that names the expected form.
    pub fn parse(text: &str) -> Result<Self, ShardError> {
        let bad = || {
            ShardError(format!(
                "--shard {text:?}: expected K/N with 0 <= K < N, such as 3/16, or auto"
            ))
        };
        let (k, n) = text.split_once('/').ok_or_else(bad)?;
        let index: u32 = k.trim().parse().map_err(|_| bad())?;
        let count: u32 = n.trim().parse().map_err(|_| bad())?;
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(Self { index, count })
    }

    /// Reads `--shard`: `K/N`, `auto`, or `auto/N` (see [`Self::from_env`]).
    ///
    /// # Errors
    /// A message that names the expected form, or what the environment lacks.
    pub fn resolve(text: &str, env: &HashMap<String, String>) -> Result<Self, ShardError> {
        match text.strip_prefix("auto") {
            Some("") => Self::from_env(env, None),
            Some(rest) => {
                let count = rest
                    .strip_prefix('/')
                    .and_then(|n| n.trim().parse::<u32>().ok())
                    .ok_or_else(|| {
                        ShardError(format!("--shard {text:?}: expected auto or auto/N"))
                    })?;
                Self::from_env(env, Some(count))
            }
            None => Self::parse(text),
        }
    }

    /// The shard of an array task. With `count` given (`--shard auto/N`), the index is the
    /// task's own (`SLURM_ARRAY_TASK_ID`, or Kubernetes' `JOB_COMPLETION_INDEX`), so a rerun of
    /// one index (`sbatch --array=3`) is the same shard. Without it (`--shard auto`), the array
    /// must be whole: the index counts from `SLURM_ARRAY_TASK_MIN` and the count is
    /// `SLURM_ARRAY_TASK_COUNT` (or from `SLURM_ARRAY_TASK_MIN` to `SLURM_ARRAY_TASK_MAX`), or
    /// Kubernetes' `JOB_COMPLETIONS`, which the Job sets.
    ///
    /// # Errors
    /// When neither set of variables is there, or they do not describe a shard.
    pub fn from_env(env: &HashMap<String, String>, count: Option<u32>) -> Result<Self, ShardError> {
        let get = |k: &str| -> Result<Option<u32>, String> {
            env.get(k)
                .map(|v| {
                    v.trim()
                        .parse::<u32>()
                        .map_err(|_| format!("{k}={v:?} is not a whole number"))
                })
                .transpose()
        };
        if let (Some(id), Some(count)) = (
            get("SLURM_ARRAY_TASK_ID")?.or(get("JOB_COMPLETION_INDEX")?),
            count,
        ) {
            return Self::parse(&format!("{id}/{count}"));
        }
        if let Some(id) = get("SLURM_ARRAY_TASK_ID")? {
            if get("SLURM_ARRAY_TASK_STEP")?.is_some_and(|step| step != 1) {
                return Err("a stepped --array is not a shard set: use --shard auto/N".into());
            }
            let min = get("SLURM_ARRAY_TASK_MIN")?.unwrap_or(0);
            let count = match (get("SLURM_ARRAY_TASK_COUNT")?, get("SLURM_ARRAY_TASK_MAX")?) {
                (Some(c), _) => c,
                (None, Some(max)) if max >= min => max - min + 1,
                _ => {
                    return Err(
                        "SLURM_ARRAY_TASK_ID is set but neither SLURM_ARRAY_TASK_COUNT \
                                nor SLURM_ARRAY_TASK_MAX is"
                            .into(),
                    )
                }
            };
            let index = id
                .checked_sub(min)
                .ok_or("SLURM_ARRAY_TASK_ID is below SLURM_ARRAY_TASK_MIN")?;
            return Self::parse(&format!("{index}/{count}"))
                .map_err(|e| ShardError(format!("{e} (from SLURM_ARRAY_TASK_ID {id})")));
        }
        if let Some(index) = get("JOB_COMPLETION_INDEX")? {
            let count = get("JOB_COMPLETIONS")?.ok_or(
                "JOB_COMPLETION_INDEX is set but JOB_COMPLETIONS is not: set it in the Job's env \
                 to spec.completions",
            )?;
            return Self::parse(&format!("{index}/{count}"));
        }
        Err(
            "--shard auto found no array task: set SLURM_ARRAY_TASK_ID (an sbatch --array job) \
             or JOB_COMPLETION_INDEX with JOB_COMPLETIONS (a Kubernetes Indexed Job), or pass \
             --shard K/N"
                .into(),
        )
    }

    /// Whether the request keyed by `key` (its `custom_id`, or the line's bytes when it has
    /// none) belongs to this shard.
    pub fn holds(&self, key: &[u8]) -> bool {
        shard_of(key, self.count) == self.index
    }

    /// This shard's output, named after the main output: `out.jsonl` →
    /// `out.shard-0003-of-0016.jsonl`.
    pub fn output(&self, main: &Path) -> PathBuf {
        let width = self.count.to_string().len().max(4);
        sibling_path(
            main,
            &format!(
                "shard-{:0width$}-of-{:0width$}.jsonl",
                self.index, self.count
            ),
        )
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

/// The shard of `key` among `count`.
pub fn shard_of(key: &[u8], count: u32) -> u32 {
    (hash64(key) % u64::from(count.max(1))) as u32
}

/// The shard outputs beside `main` (`out.shard-K-of-N.jsonl`), as `(shard, path)`, sorted.
pub fn find_outputs(main: &Path, dir: Option<&Path>) -> Vec<(Shard, PathBuf)> {
    let name = main
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let stem = name.strip_suffix(".jsonl").unwrap_or(&name).to_owned();
    let dir = dir.unwrap_or_else(|| crate::formats::paths::parent(main));
    let Ok(read) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found: Vec<(Shard, PathBuf)> = read
        .filter_map(Result::ok)
        .filter_map(|e| {
            let file = e.file_name().to_string_lossy().into_owned();
            let rest = file
                .strip_prefix(&stem)?
                .strip_prefix(".shard-")?
                .strip_suffix(".jsonl")?;
            let (k, n) = rest.split_once("-of-")?;
            let shard = Shard::parse(&format!(
                "{}/{}",
                k.parse::<u32>().ok()?,
                n.parse::<u32>().ok()?
            ))
            .ok()?;
            // Only the exact name this shard writes, not `...-of-16.jsonl` beside `-of-0016`.
            (shard.output(main).file_name()? == e.file_name().as_os_str())
                .then(|| (shard, e.path()))
        })
        .collect();
    found.sort_by_key(|(s, _)| (s.count, s.index));
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn parses_k_of_n() {
        assert_eq!(
            Shard::parse("3/16"),
            Ok(Shard {
                index: 3,
                count: 16
            })
        );
        for bad in ["16/16", "1/0", "a/2", "3", "-1/4"] {
            assert!(Shard::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn reads_slurm_and_kubernetes_arrays() {
        let auto = |pairs: &[(&str, &str)]| Shard::resolve("auto", &env(pairs));
        let s = auto(&[
            ("SLURM_ARRAY_TASK_ID", "5"),
            ("SLURM_ARRAY_TASK_COUNT", "8"),
        ]);
        assert_eq!(s, Ok(Shard { index: 5, count: 8 }));
        // --array=1-4: ids from 1, shards from 0.
        let s = auto(&[
            ("SLURM_ARRAY_TASK_ID", "4"),
            ("SLURM_ARRAY_TASK_MIN", "1"),
            ("SLURM_ARRAY_TASK_MAX", "4"),
        ]);
        assert_eq!(s, Ok(Shard { index: 3, count: 4 }));
        let s = auto(&[("JOB_COMPLETION_INDEX", "2"), ("JOB_COMPLETIONS", "3")]);
        assert_eq!(s, Ok(Shard { index: 2, count: 3 }));
        let e = auto(&[]).unwrap_err().to_string();
        assert!(
            e.contains("SLURM_ARRAY_TASK_ID") && e.contains("--shard K/N"),
            "{e}"
        );
        assert!(auto(&[("JOB_COMPLETION_INDEX", "2")]).is_err());
        assert!(auto(&[("SLURM_ARRAY_TASK_ID", "x")]).is_err());
        assert!(auto(&[
            ("SLURM_ARRAY_TASK_ID", "2"),
            ("SLURM_ARRAY_TASK_COUNT", "4"),
            ("SLURM_ARRAY_TASK_STEP", "2"),
        ])
        .is_err());
        // A rerun of index 3 alone (`sbatch --array=3`) still is shard 3 of 16 with auto/16.
        let rerun = [
            ("SLURM_ARRAY_TASK_ID", "3"),
            ("SLURM_ARRAY_TASK_COUNT", "1"),
            ("SLURM_ARRAY_TASK_MIN", "3"),
            ("SLURM_ARRAY_TASK_MAX", "3"),
        ];
        assert_eq!(
            Shard::resolve("auto/16", &env(&rerun)),
            Ok(Shard {
                index: 3,
                count: 16
            })
        );
        assert_eq!(
            Shard::resolve("auto/2", &env(&[("JOB_COMPLETION_INDEX", "1")])),
            Ok(Shard { index: 1, count: 2 })
        );
        assert!(Shard::resolve("auto/x", &env(&rerun)).is_err());
        assert!(
            Shard::resolve("auto/2", &env(&rerun)).is_err(),
            "index 3 of 2"
        );
    }

    #[test]
    fn membership_depends_on_the_key_alone_and_covers_every_shard_once() {
        let keys: Vec<String> = (0..2000).map(|i| format!("cand-{i}")).collect();
        let mut per = [0u32; 4];
        for k in &keys {
            let owners: Vec<u32> = (0..4)
                .filter(|&i| Shard { index: i, count: 4 }.holds(k.as_bytes()))
                .collect();
            assert_eq!(owners.len(), 1, "{k}");
            per[owners[0] as usize] += 1;
        }
        // A fair hash: every shard gets about a quarter.
        assert!(per.iter().all(|&n| (400..600).contains(&n)), "{per:?}");
        assert_eq!(shard_of(b"cand-7", 4), shard_of(b"cand-7", 4));
    }

    #[test]
    fn shard_outputs_are_named_and_found_beside_the_main_output() {
        let dir = tempfile::tempdir().unwrap();
        let main = dir.path().join("out.jsonl");
        let s = Shard {
            index: 3,
            count: 16,
        };
        assert_eq!(
            s.output(&main),
            dir.path().join("out.shard-0003-of-0016.jsonl")
        );
        assert_eq!(
            Shard {
                index: 7,
                count: 12000
            }
            .output(&main),
            dir.path().join("out.shard-00007-of-12000.jsonl")
        );
        for name in [
            "out.shard-0001-of-0002.jsonl",
            "out.shard-0000-of-0002.jsonl",
            "out.shard-0000-of-0002.manifest.json",
            "other.shard-0000-of-0002.jsonl",
            "out.shard-1-of-2.jsonl",
        ] {
            std::fs::write(dir.path().join(name), "").unwrap();
        }
        let found: Vec<Shard> = find_outputs(&main, None)
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        assert_eq!(
            found,
            vec![Shard { index: 0, count: 2 }, Shard { index: 1, count: 2 }]
        );
    }
}
