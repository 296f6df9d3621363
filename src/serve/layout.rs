//! Where the server keeps things under `--data-dir`: the database, the files, one folder per
//! batch (its input, the engine's output and checkpoint, its log) and unfinished uploads.
//! Paths are only ever made from ids that [`crate::serve::ids::is_valid`] accepted.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// The data directory.
#[derive(Debug, Clone)]
pub struct DataDir {
    root: PathBuf,
}

impl DataDir {
    /// Creates the folders, and removes uploads that a crash left half-written.
    ///
    /// # Errors
    /// When the folders cannot be made.
    pub fn create(root: &Path) -> Result<Self> {
        let dir = Self {
            root: root.to_owned(),
        };
        for sub in [dir.files(), dir.root.join("batches")] {
            std::fs::create_dir_all(&sub)
                .with_context(|| format!("cannot create {}", sub.display()))?;
        }
        let uploads = dir.uploads();
        if uploads.exists() {
            std::fs::remove_dir_all(&uploads)
                .with_context(|| format!("cannot clear {}", uploads.display()))?;
        }
        std::fs::create_dir_all(&uploads)?;
        Ok(dir)
    }

    /// The SQLite database.
    pub fn database(&self) -> PathBuf {
        self.root.join("infer-batch.sqlite3")
    }

    /// Where stored files live.
    pub fn files(&self) -> PathBuf {
        self.root.join("files")
    }

    /// The bytes of file `id`.
    pub fn file(&self, id: &str) -> PathBuf {
        self.files().join(id)
    }

    /// Uploads in progress; moved into [`DataDir::files`] once whole.
    pub fn uploads(&self) -> PathBuf {
        self.root.join("uploads")
    }

    /// Batch `id`'s own folder.
    pub fn batch(&self, id: &str) -> PathBuf {
        self.root.join("batches").join(id)
    }
}
