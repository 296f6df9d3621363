//! Durable result lines: each one is written and flushed to the OS as its request completes,
//! and synced to disk at least every `fsync_every`, and at the end.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::Value;

/// The output file, one JSON line per request, opened for appending.
pub struct Sink {
    path: PathBuf,
    out: BufWriter<File>,
    fsync_every: Duration,
    last_sync: Instant,
}

impl Sink {
    /// Opens (creating) the output for appending.
    ///
    /// # Errors
    /// When the file or its directory cannot be created.
    pub fn open(path: &Path, fsync_every: Duration) -> Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create directory {}", dir.display()))?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("cannot open output {}", path.display()))?;
        Ok(Self {
            path: path.to_owned(),
            out: BufWriter::new(file),
            fsync_every,
            last_sync: Instant::now(),
        })
    }

    /// Appends one result line and flushes it to the OS; syncs when the interval has passed.
    ///
    /// # Errors
    /// When the write fails (disk full, file removed).
    pub fn write(&mut self, line: &Value) -> Result<()> {
        // One buffer, one write: a crash tears at most this line, never an earlier one.
        let mut bytes = serde_json::to_vec(line)?;
        bytes.push(b'\n');
        self.out.write_all(&bytes)?;
        self.out
            .flush()
            .with_context(|| format!("cannot write to {}", self.path.display()))?;
        if self.last_sync.elapsed() >= self.fsync_every {
            self.sync()?;
        }
        Ok(())
    }

    fn sync(&mut self) -> Result<()> {
        self.out
            .get_ref()
            .sync_data()
            .with_context(|| format!("cannot sync {}", self.path.display()))?;
        self.last_sync = Instant::now();
        Ok(())
    }

    /// Flushes and syncs the file to disk.
    ///
    /// # Errors
    /// When the sync fails.
    pub fn finish(mut self) -> Result<()> {
        self.out.flush()?;
        self.sync()
    }
}
