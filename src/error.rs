//! The error of a file operation, naming the file and what was being done to it: the one typed
//! I/O error the library's file-keeping modules share.

use std::path::{Path, PathBuf};

/// A file operation the OS refused.
#[derive(Debug, thiserror::Error)]
#[error("cannot {action} {}", path.display())]
pub struct FileError {
    /// What was being done: `read`, `write`, `create directory`, ...
    pub action: &'static str,
    /// The file.
    pub path: PathBuf,
    /// The OS's reason.
    #[source]
    pub source: std::io::Error,
}

impl FileError {
    /// `action` on `path` failed with `source`.
    pub fn new(action: &'static str, path: &Path, source: std::io::Error) -> Self {
        Self {
            action,
            path: path.to_owned(),
            source,
        }
    }
}

/// Names the file an I/O result is about.
pub trait AtPath<T> {
    /// The result, with its error as a [`FileError`] that says `action` on `path`.
    ///
    /// # Errors
    /// The I/O error, located.
    fn at(self, action: &'static str, path: &Path) -> Result<T, FileError>;
}

impl<T> AtPath<T> for std::io::Result<T> {
    fn at(self, action: &'static str, path: &Path) -> Result<T, FileError> {
        self.map_err(|source| FileError::new(action, path, source))
    }
}
