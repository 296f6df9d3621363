//! Where the server keeps things under `--data-dir`: the database, the files, one folder per
//! batch (its input, the engine's output and checkpoint, its log) and unfinished uploads.
//! Paths are only ever made from ids that [`crate::serve::ids::is_valid`] accepted.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};

/// The data directory, held by one server at a time.
#[derive(Debug, Clone)]
pub struct DataDir {
    root: PathBuf,
    /// The server's exclusive lock on `server.lock`, released when the process ends.
    _held: Arc<File>,
}

impl DataDir {
    /// Takes the directory for this server, creates the folders, and removes uploads that a
    /// crash left half-written.
    ///
    /// # Errors
    /// When another server holds it, or the folders cannot be made.
    pub fn create(root: &Path) -> Result<Self> {
        std::fs::create_dir_all(root)
            .with_context(|| format!("cannot create {}", root.display()))?;
        let lock_path = root.join("server.lock");
        let mut lock = File::options()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&lock_path)
            .with_context(|| format!("cannot open {}", lock_path.display()))?;
        if lock.try_lock().is_err() {
            let pid = std::fs::read_to_string(&lock_path).unwrap_or_default();
            bail!(
                "another server (process {}) uses the data directory {}: stop it, or pass \
                 another --data-dir",
                pid.trim(),
                root.display()
            );
        }
        lock.set_len(0)?;
        write!(lock, "{}", std::process::id())?;
        let dir = Self {
            root: root.to_owned(),
            _held: Arc::new(lock),
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
