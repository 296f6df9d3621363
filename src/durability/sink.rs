//! Durable result lines: each one is written and flushed to the OS as its request completes,
//! and synced to disk at least every `fsync_every`, and at the end.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::error::{AtPath, FileError};

/// The output file, one JSON line per request, opened for appending.
pub struct Sink {
    path: PathBuf,
    out: BufWriter<File>,
    /// Bytes in the file: where the next line starts.
    end: u64,
    fsync_every: Duration,
    last_sync: Instant,
}

/// Where a written line lies in the output: its first byte and its length, newline excluded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placed {
    /// Offset of its first byte.
    pub offset: u64,
    /// Its length in bytes.
    pub len: u64,
}

impl Sink {
    /// Opens (creating) the output for appending.
    ///
    /// # Errors
    /// When the file or its directory cannot be created.
    pub fn open(path: &Path, fsync_every: Duration) -> Result<Self, FileError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).at("create directory", dir)?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .at("open output", path)?;
        let end = file.metadata().at("read", path)?.len();
        Ok(Self {
            path: path.to_owned(),
            out: BufWriter::new(file),
            end,
            fsync_every,
            last_sync: Instant::now(),
        })
    }

    /// Appends one result line and flushes it to the OS, so a reader of the file sees it at
    /// once; syncs when the interval has passed. Returns where the line lies.
    ///
    /// # Errors
    /// When the write fails (disk full, file removed).
    pub fn write(&mut self, line: &impl Serialize) -> Result<Placed, FileError> {
        // One buffer, one write: a crash tears at most this line, never an earlier one.
        let mut bytes = serde_json::to_vec(line)
            .map_err(std::io::Error::other)
            .at("write to", &self.path)?;
        bytes.push(b'\n');
        self.out
            .write_all(&bytes)
            .and_then(|()| self.out.flush())
            .at("write to", &self.path)?;
        let placed = Placed {
            offset: self.end,
            len: bytes.len() as u64 - 1,
        };
        self.end += bytes.len() as u64;
        if self.last_sync.elapsed() >= self.fsync_every {
            self.sync()?;
        }
        Ok(placed)
    }

    fn sync(&mut self) -> Result<(), FileError> {
        self.out.get_ref().sync_data().at("sync", &self.path)?;
        self.last_sync = Instant::now();
        Ok(())
    }

    /// Flushes and syncs the file to disk.
    ///
    /// # Errors
    /// When the sync fails.
    pub fn finish(mut self) -> Result<(), FileError> {
        self.out.flush().at("write to", &self.path)?;
        self.sync()
    }
}
