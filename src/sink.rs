//! Durable result lines: each one is written and flushed as its request completes.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::Value;

/// The output file, one JSON line per request.
pub struct Sink {
    path: PathBuf,
    out: BufWriter<File>,
    lines: u64,
}

impl Sink {
    /// Creates (or, with `replace`, truncates) the output.
    ///
    /// # Errors
    /// When the output already holds results and `replace` is off: completed work is never
    /// thrown away without being asked. Also when the file cannot be created.
    pub fn create(path: &Path, replace: bool) -> Result<Self> {
        if !replace {
            if let Ok(meta) = std::fs::metadata(path) {
                if meta.len() > 0 {
                    anyhow::bail!(
                        "output {} already holds {} bytes of results; pass --restart to replace \
                         them, or -o to write elsewhere",
                        path.display(),
                        meta.len()
                    );
                }
            }
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create directory {}", dir.display()))?;
        }
        let file = File::create(path)
            .with_context(|| format!("cannot create output {}", path.display()))?;
        Ok(Self {
            path: path.to_owned(),
            out: BufWriter::new(file),
            lines: 0,
        })
    }

    /// Appends one result line and flushes it to the OS.
    ///
    /// # Errors
    /// When the write fails (disk full, file removed).
    pub fn write(&mut self, line: &Value) -> Result<()> {
        serde_json::to_writer(&mut self.out, line)?;
        self.out.write_all(b"\n")?;
        self.out
            .flush()
            .with_context(|| format!("cannot write to {}", self.path.display()))?;
        self.lines += 1;
        Ok(())
    }

    /// Lines written so far.
    pub fn lines(&self) -> u64 {
        self.lines
    }

    /// Flushes and syncs the file to disk.
    ///
    /// # Errors
    /// When the sync fails.
    pub fn finish(mut self) -> Result<()> {
        self.out.flush()?;
        self.out
            .get_ref()
            .sync_all()
            .with_context(|| format!("cannot sync {}", self.path.display()))
    }
}
