//! The files that live beside an output, named after it.

use std::path::{Path, PathBuf};

/// A file beside `path` named after it: `dir/out.jsonl` with `summary.json` gives
/// `dir/out.summary.json`; a name without `.jsonl` keeps its whole name as the stem.
pub fn sibling_path(path: &Path, suffix: &str) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let stem = name.strip_suffix(".jsonl").unwrap_or(&name);
    path.with_file_name(format!("{stem}.{suffix}"))
}

/// The directory a path sits in (`.` for a bare file name).
pub fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}
