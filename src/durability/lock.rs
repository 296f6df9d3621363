//! One run per output: an exclusive lock on `out.lock` beside the output, held for the whole
//! run.
//!
//! The lock is the kernel's (`flock`, through the standard library's `File::try_lock`), so it
//! goes away with the process that holds it: a run killed by any means never blocks the next
//! one. The file holds the holder's pid, for the message a second run prints. Under
//! `--supervise` the supervisor takes the lock and its workers inherit the open file, so the
//! lock stays held across worker restarts.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};

use crate::durability::StateError;
use crate::error::{AtPath, FileError};

use crate::formats::paths::sibling_path;

/// `dir/out.jsonl` → `dir/out.lock`.
pub fn lock_path(output: &Path) -> PathBuf {
    sibling_path(output, "lock")
}

/// Who holds the lock of `output` now: the pid it recorded (`""` if none was recorded), or
/// `None` when no process does.
pub fn lock_holder(output: &Path) -> Option<String> {
    let mut file = File::open(lock_path(output)).ok()?;
    if file.try_lock_shared().is_ok() {
        return None;
    }
    let mut holder = String::new();
    let _ = file.read_to_string(&mut holder);
    Some(holder.trim().to_owned())
}

/// The exclusive right to write an output, released when dropped or when the process ends.
#[derive(Debug)]
pub struct OutputLock {
    path: PathBuf,
    /// `None` when the lock is held through a file descriptor inherited from a supervisor.
    file: Option<File>,
}

impl OutputLock {
    /// Takes the lock of `output`, creating its directory if needed.
    ///
    /// # Errors
    /// When another process holds it (the message names that process), or the lock file
    /// cannot be created.
    pub fn acquire(output: &Path) -> Result<Self, StateError> {
        let path = lock_path(output);
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).at("create directory", dir)?;
        }
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .at("open lock file", &path)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                let who = if holder.is_empty() {
                    "another process".to_owned()
                } else {
                    format!("process {holder}")
                };
                return Err(StateError::InUse {
                    output: output.to_owned(),
                    lock: path,
                    holder: who,
                });
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(FileError::new("lock", &path, e).into())
            }
        }
        let mut stamp = || -> std::io::Result<()> {
            file.set_len(0)?;
            file.rewind()?;
            write!(file, "{}", std::process::id())?;
            file.flush()
        };
        stamp().at("write lock file", &path)?;
        Ok(Self {
            path,
            file: Some(file),
        })
    }

    /// Takes over the lock of `output` that a supervisor holds and passed down as the open
    /// file descriptor `fd`.
    ///
    /// # Errors
    /// When `fd` is not an open lock file of `output`, or the lock is not held: then this
    /// process has no right to write the output.
    pub fn inherit(output: &Path, fd: RawFd) -> Result<Self, StateError> {
        let path = lock_path(output);
        let expected = path.canonicalize().at("find lock file", &path)?;
        let open = std::fs::read_link(format!("/proc/self/fd/{fd}")).ok();
        if open.as_deref() != Some(expected.as_path()) {
            return Err(StateError::NotInherited(format!(
                "the supervisor's lock (descriptor {fd}) is not {}",
                path.display()
            )));
        }
        // Our descriptor holds it; any other open of the file must be refused.
        if File::open(&path)
            .at("open lock file", &path)?
            .try_lock()
            .is_ok()
        {
            return Err(StateError::NotInherited(format!(
                "{} is not locked by the supervisor",
                path.display()
            )));
        }
        Ok(Self { path, file: None })
    }

    /// The descriptor a worker inherits, after [`Self::share_with_children`].
    pub fn fd(&self) -> Option<RawFd> {
        self.file.as_ref().map(AsRawFd::as_raw_fd)
    }

    /// Lets child processes inherit the locked descriptor (it is close-on-exec otherwise).
    ///
    /// # Errors
    /// When the descriptor's flags cannot be changed.
    pub fn share_with_children(&self) -> Result<(), FileError> {
        use nix::fcntl::{fcntl, FcntlArg, FdFlag};
        if let Some(file) = &self.file {
            fcntl(file, FcntlArg::F_SETFD(FdFlag::empty()))
                .map_err(std::io::Error::from)
                .at("pass to the worker", &self.path)?;
        }
        Ok(())
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_with_the_first_ones_pid() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("sub/out.jsonl");
        let first = OutputLock::acquire(&out).unwrap();
        assert!(first.path().ends_with("out.lock"));
        let e = OutputLock::acquire(&out).unwrap_err().to_string();
        assert!(
            e.contains(&format!("process {}", std::process::id())),
            "{e}"
        );
        assert_eq!(lock_holder(&out), Some(std::process::id().to_string()));
        drop(first);
        assert_eq!(lock_holder(&out), None);
        OutputLock::acquire(&out).expect("released on drop");
    }

    #[test]
    fn inheriting_needs_the_held_lock_file() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out.jsonl");
        assert!(OutputLock::inherit(&out, 0).is_err(), "no lock file yet");
        let held = OutputLock::acquire(&out).unwrap();
        let fd = held.fd().unwrap();
        OutputLock::inherit(&out, fd).expect("our own descriptor");
        assert!(
            OutputLock::inherit(&out, 0).is_err(),
            "stdin is not the lock"
        );
        drop(held);
        let stray = File::open(lock_path(&out)).unwrap();
        assert!(
            OutputLock::inherit(&out, stray.as_raw_fd()).is_err(),
            "an unlocked descriptor"
        );
    }
}
