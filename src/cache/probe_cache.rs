//! The decode-group probe's findings, remembered per machine and settings, so that a run does
//! not spend seconds (minutes on a slow device) measuring what it measured before.
//!
//! The findings depend on the kernels only: the key is the computation identity's part that
//! names them (the model, the machine, the settings) and the thread count. A file whose key is
//! not this run's, or that does not read, is ignored and probed again; it is never trusted
//! for another machine. The files live in the user's cache directory (`$XDG_CACHE_HOME/
//! infer-batch/probes`), not beside the prefix states: they describe this host, whatever
//! directory a run shares its states through.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::digest::{sha256, short_hex};
use crate::durability::durable::write_json_atomic;
use crate::engine::probe::Findings;

/// One remembered probe: its key in full (a file name is only a hash of it) and what it found.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Remembered {
    key: String,
    findings: Findings,
}

/// Where the findings for one key are remembered.
#[derive(Debug, Clone)]
pub struct ProbeCache {
    path: PathBuf,
    key: String,
}

impl ProbeCache {
    /// The cache entry for `key` under `dir`.
    pub fn new(dir: &Path, key: String) -> Self {
        let name = format!("{}.json", short_hex(&sha256(key.as_bytes()), 16));
        Self {
            path: dir.join("probes").join(name),
            key,
        }
    }

    /// Where the entry lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The remembered findings, when a file for exactly this key reads.
    pub fn load(&self) -> Option<Findings> {
        let text = std::fs::read_to_string(&self.path).ok()?;
        match serde_json::from_str::<Remembered>(&text) {
            Ok(r) if r.key == self.key => Some(r.findings),
            Ok(_) => None,
            Err(e) => {
                tracing::warn!(
                    "ignoring the remembered probe {} ({e}); probing again",
                    self.path.display()
                );
                None
            }
        }
    }

    /// Remembers `findings`; a failure only costs the next run a probe.
    pub fn save(&self, findings: Findings) {
        let stored = Remembered {
            key: self.key.clone(),
            findings,
        };
        let saved = self
            .path
            .parent()
            .map_or(Ok(()), crate::cache::prefix_store::create_private_dir)
            .and_then(|()| write_json_atomic(&self.path, &stored));
        if let Err(e) = saved {
            tracing::warn!("cannot remember the probe's findings: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::probe::Findings;

    #[test]
    fn findings_come_back_for_their_key_only() {
        let dir = tempfile::tempdir().unwrap();
        let findings: Findings =
            serde_json::from_str(r#"{"tried": 32, "starts": 1, "depth": 0, "place": 0}"#).unwrap();
        let cache = ProbeCache::new(dir.path(), "machine a".into());
        assert_eq!(cache.load(), None);
        cache.save(findings);
        assert_eq!(cache.load(), Some(findings));
        // Another key never reads it, even where its file name were the same.
        let other = ProbeCache {
            path: cache.path().to_owned(),
            key: "machine b".into(),
        };
        assert_eq!(other.load(), None);
        std::fs::write(cache.path(), "{not json").unwrap();
        assert_eq!(cache.load(), None);
    }
}
