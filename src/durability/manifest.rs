//! Reading and writing the manifest ([`Manifest`]) beside an output, atomically.

use std::fs;
use std::path::Path;

use serde_json::Value;

use crate::durability::durable::write_json_atomic;
use crate::durability::StateError;
use crate::error::FileError;
use crate::formats::manifest::{manifest_path, Manifest, MANIFEST_VERSION};

impl Manifest {
    /// Writes the manifest atomically.
    ///
    /// # Errors
    /// When the file cannot be written.
    pub fn write(&self, output: &Path) -> Result<(), FileError> {
        write_json_atomic(&manifest_path(output), self)
    }

    /// Reads a manifest, if one is there.
    ///
    /// # Errors
    /// When it exists but cannot be parsed, or has another version.
    pub fn read(output: &Path) -> Result<Option<Self>, StateError> {
        let path = manifest_path(output);
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(FileError::new("read", &path, e).into()),
        };
        let version = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v["version"].as_u64());
        if let Some(found) = version.filter(|&v| v != MANIFEST_VERSION) {
            return Err(StateError::ManifestVersion { path, found });
        }
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|source| StateError::ManifestInvalid { path, source })
    }
}
