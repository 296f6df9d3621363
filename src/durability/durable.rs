//! Files that survive a crash: atomic replacement, directory syncs, and the temporary files
//! that only their own writer may remove.
//!
//! A replacement is written to a temporary file beside its target, synced, renamed over the
//! target, and then the directory is synced, so after a crash the target holds either the old
//! or the new content, never a mix. The temporary file is named `.{target}.{random}.tmp` and
//! locked while it is written, so a cleaner can tell a live writer's file from a stale one.

use std::fs::{self, File};
use std::io::Write;
use std::path::Path;

use crate::error::{AtPath, FileError};
use crate::formats::paths::parent;

const TEMP_SUFFIX: &str = ".tmp";

/// Replaces `path` with `bytes` atomically and durably.
///
/// # Errors
/// When the directory cannot be written or synced.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), FileError> {
    write_atomic_with(path, |w| w.write_all(bytes))
}

/// Replaces `path` with `value` as pretty JSON, atomically and durably: the manifest and the
/// summaries.
///
/// # Errors
/// When the directory cannot be written or synced.
pub fn write_json_atomic(path: &Path, value: &impl serde::Serialize) -> Result<(), FileError> {
    let bytes = serde_json::to_vec_pretty(value)
        .map_err(std::io::Error::other)
        .at("write", path)?;
    write_atomic(path, &bytes)
}

/// Replaces `path` atomically and durably with what `fill` writes.
///
/// # Errors
/// When `fill` fails, or the directory cannot be written or synced.
pub fn write_atomic_with(
    path: &Path,
    fill: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> Result<(), FileError> {
    let dir = parent(path);
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other("the path names no file"))
        .at("write", path)?
        .to_string_lossy();
    let write = || -> std::io::Result<()> {
        let tmp = tempfile::Builder::new()
            .prefix(&format!(".{name}."))
            .suffix(TEMP_SUFFIX)
            .tempfile_in(dir)?;
        // Held until the rename: a cleaner that cannot take it knows a writer is alive.
        tmp.as_file().try_lock().map_err(std::io::Error::other)?;
        let mut out = std::io::BufWriter::new(tmp.as_file());
        fill(&mut out)?;
        out.flush()?;
        drop(out);
        tmp.as_file().sync_all()?;
        tmp.persist(path).map_err(|e| e.error)?;
        sync_dir(dir)
    };
    write().at("write", path)
}

/// Syncs a directory, so that renames and creations in it survive a power loss.
///
/// # Errors
/// When the directory cannot be opened or synced.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The target a temporary file of [`write_atomic`] was written for: `.{target}.{random}.tmp`
/// gives `target`. `None` for any other name.
pub fn temp_target(file_name: &str) -> Option<&str> {
    let inner = file_name.strip_prefix('.')?.strip_suffix(TEMP_SUFFIX)?;
    let (target, random) = inner.rsplit_once('.')?;
    let random_ok = !random.is_empty() && random.chars().all(|c| c.is_ascii_alphanumeric());
    (random_ok && !target.is_empty()).then_some(target)
}

/// Removes the temporary files in `dir` whose target satisfies `ours` and whose writer is gone
/// (nobody holds their lock). Returns how many were removed.
///
/// # Errors
/// When a stale file cannot be removed.
pub fn remove_stale_temps(dir: &Path, ours: impl Fn(&str) -> bool) -> Result<usize, FileError> {
    let Ok(read) = fs::read_dir(dir) else {
        return Ok(0);
    };
    let mut removed = 0;
    for entry in read.filter_map(Result::ok) {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !temp_target(&name).is_some_and(&ours) {
            continue;
        }
        let Ok(file) = File::open(entry.path()) else {
            continue;
        };
        if file.try_lock().is_err() {
            continue; // a live writer holds it
        }
        fs::remove_file(entry.path()).at("remove", &entry.path())?;
        removed += 1;
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_whole_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn temp_names_are_recognised_by_their_target() {
        assert_eq!(temp_target(".ab.ibprefix.Xy12Zq.tmp"), Some("ab.ibprefix"));
        assert_eq!(temp_target("ab.ibprefix"), None);
        assert_eq!(temp_target("notes.tmp"), None);
        assert_eq!(temp_target(".x.tmp"), None);
        assert_eq!(temp_target(".a.b-c.tmp"), None);
    }

    #[test]
    fn only_stale_temporaries_of_ours_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let stale = dir.path().join(".s.state.abc123.tmp");
        let live = dir.path().join(".l.state.def456.tmp");
        let foreign = dir.path().join(".f.other.ghi789.tmp");
        let unrelated = dir.path().join("build.tmp");
        for p in [&stale, &live, &foreign, &unrelated] {
            fs::write(p, b"x").unwrap();
        }
        let writer = File::open(&live).unwrap();
        writer.try_lock().unwrap();
        let n = remove_stale_temps(dir.path(), |t| t.ends_with(".state")).unwrap();
        assert_eq!(n, 1);
        assert!(!stale.exists());
        assert!(live.exists() && foreign.exists() && unrelated.exists());
    }
}
