//! Prefix KV states on disk: saved after the first prefill, restored by later runs.
//!
//! A file is self-describing and checked whole before anything reaches llama.cpp's loader,
//! which can abort the process on bad input:
//!
//! ```text
//! magic "IBPREFIX" | format version u32 LE | header length u32 LE | header (bincode)
//! | payload (llama.cpp sequence state) | SHA-256 of everything before it
//! ```
//!
//! The header names what the state depends on ([`StateIdentity`]: the computation identity but
//! for the requests' defaults, and the model's memory layout) and the exact prefix tokens. Writes go to a
//! unique temporary file that is synced and then renamed, so a crash never leaves a file that
//! looks valid, and runs sharing the directory never see each other's half-written files.

use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::digest::{parse_hex32, sha256, sha256_file, short_hex, Hasher};
use crate::durability::durable::{remove_stale_temps, write_atomic};
use crate::engine::Token;
use crate::error::{AtPath, FileError};
use crate::identity::{self, Identity};

/// Version of the file layout; a file of another version is rebuilt, never read.
pub const FORMAT_VERSION: u32 = 2;
const MAGIC: &[u8; 8] = b"IBPREFIX";
const EXTENSION: &str = "ibprefix";
const PREAMBLE: usize = 8 + 4 + 4;
const CHECKSUM: usize = 32;

/// Everything besides the tokens that makes a saved state valid for a run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateIdentity {
    /// SHA-256 of the model file's content.
    pub model_sha256: [u8; 32],
    /// The computation identity's part a state depends on ([`Identity::state_key`]).
    pub computation: String,
    /// How the model's memory lays out a state.
    pub layout: String,
}

impl StateIdentity {
    /// The identity of states computed under `identity`, for a model whose memory is `layout`.
    pub fn new(identity: &Identity, layout: &str) -> Self {
        let mut model_sha256 = [0; 32];
        if let Some(bytes) = parse_hex32(&identity.model) {
            model_sha256 = bytes;
        }
        Self {
            model_sha256,
            computation: identity.state_key(),
            layout: layout.to_owned(),
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Header {
    identity: StateIdentity,
    tokens: Vec<i32>,
    payload_len: u64,
    created_unix: u64,
}

/// Why a stored file was not used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    /// Shorter than its own header says.
    #[error("truncated: {found} bytes, expected {expected}")]
    Truncated {
        /// Actual size.
        found: u64,
        /// Size the header implies.
        expected: u64,
    },
    /// Not one of our files.
    #[error("not a prefix state file (bad magic)")]
    Magic,
    /// Written by another format version.
    #[error("format version {found}, this build reads {FORMAT_VERSION}")]
    Version {
        /// Version in the file.
        found: u32,
    },
    /// The header does not decode.
    #[error("unreadable header: {0}")]
    Header(String),
    /// The content does not match its checksum.
    #[error("checksum mismatch (corrupted file)")]
    Checksum,
    /// Another model wrote it.
    #[error("written for another model")]
    Model,
    /// Another computation wrote it: another machine, build or setting.
    #[error("computed differently: {0}")]
    Computation(String),
    /// Another KV layout wrote it.
    #[error("KV layout {found:?} differs from {expected:?}")]
    Layout {
        /// Layout in the file.
        found: String,
        /// Our layout.
        expected: String,
    },
    /// Its tokens are not this prefix's tokens.
    #[error("its tokens differ from the prefix's tokens")]
    Tokens,
}

/// The result of looking a prefix up.
#[derive(Debug)]
pub enum Lookup {
    /// No file for this prefix.
    Miss,
    /// A valid file; the payload is the llama.cpp sequence state.
    Hit {
        /// The state bytes.
        payload: Vec<u8>,
        /// Size of the whole file.
        file_bytes: u64,
    },
    /// A file exists but must not be used.
    Invalid {
        /// Its path.
        path: PathBuf,
        /// Why.
        reason: Invalid,
    },
}

/// The file name of a prefix: a hash of the format version, the identity and the tokens.
pub fn file_name(identity: &StateIdentity, tokens: &[Token]) -> String {
    let mut h = Hasher::new();
    h.update(FORMAT_VERSION.to_le_bytes());
    h.update(identity.model_sha256);
    for part in [&identity.computation, &identity.layout] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    for t in tokens {
        h.update(t.0.to_le_bytes());
    }
    format!("{}.{EXTENSION}", short_hex(&h.finish(), 16))
}

/// What differs between two [`Identity::state_key`]s, in words.
fn computation_changes(now: &str, was: &str) -> String {
    let parse = |s: &str| match serde_json::from_str(s) {
        Ok(serde_json::Value::Object(map)) => map,
        _ => serde_json::Map::new(),
    };
    let named: Vec<String> = identity::differences(&parse(now), &parse(was))
        .into_iter()
        .map(|d| d.text)
        .collect();
    if named.is_empty() {
        "its identity does not read".to_owned()
    } else {
        named.join("; ")
    }
}

fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard()
        .with_little_endian()
        .with_fixed_int_encoding()
        .with_limit::<{ 64 << 20 }>()
}

/// Why a state could not be stored.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file operation failed.
    #[error(transparent)]
    File(#[from] FileError),
    /// The header could not be encoded.
    #[error("cannot encode a state file's header: {0}")]
    Encode(String),
}

/// Serialises a state file.
///
/// # Errors
/// Only if the header cannot be encoded, which a valid identity never causes.
pub fn encode(
    identity: &StateIdentity,
    tokens: &[Token],
    payload: &[u8],
) -> Result<Vec<u8>, StoreError> {
    let header = Header {
        identity: identity.clone(),
        tokens: tokens.iter().map(|t| t.0).collect(),
        payload_len: payload.len() as u64,
        created_unix: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    };
    let header = bincode::serde::encode_to_vec(&header, bincode_config())
        .map_err(|e| StoreError::Encode(e.to_string()))?;
    let header_len = u32::try_from(header.len()).map_err(|e| StoreError::Encode(e.to_string()))?;
    let mut out = Vec::with_capacity(PREAMBLE + header.len() + payload.len() + CHECKSUM);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&header_len.to_le_bytes());
    out.extend_from_slice(&header);
    out.extend_from_slice(payload);
    let sum = sha256(&out);
    out.extend_from_slice(&sum);
    Ok(out)
}

/// Reads the header of a state file without checking the payload.
fn decode_header(bytes: &[u8]) -> Result<(Header, usize), Invalid> {
    let len = bytes.len() as u64;
    if bytes.len() < PREAMBLE {
        return Err(Invalid::Truncated {
            found: len,
            expected: (PREAMBLE + CHECKSUM) as u64,
        });
    }
    if &bytes[..8] != MAGIC {
        return Err(Invalid::Magic);
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    if version != FORMAT_VERSION {
        return Err(Invalid::Version { found: version });
    }
    let header_len = u32::from_le_bytes(bytes[12..16].try_into().expect("4 bytes")) as usize;
    let header_end = PREAMBLE + header_len;
    if bytes.len() < header_end {
        return Err(Invalid::Truncated {
            found: len,
            expected: header_end as u64,
        });
    }
    let (header, _): (Header, usize) =
        bincode::serde::decode_from_slice(&bytes[PREAMBLE..header_end], bincode_config())
            .map_err(|e| Invalid::Header(e.to_string()))?;
    Ok((header, header_end))
}

/// Checks a whole state file against the expected identity and tokens; returns the payload.
///
/// # Errors
/// The first [`Invalid`] reason found.
pub fn decode<'a>(
    bytes: &'a [u8],
    identity: &StateIdentity,
    tokens: &[Token],
) -> Result<&'a [u8], Invalid> {
    let (header, header_end) = decode_header(bytes)?;
    let expected = (header_end as u64)
        .saturating_add(header.payload_len)
        .saturating_add(CHECKSUM as u64);
    if bytes.len() as u64 != expected {
        return Err(Invalid::Truncated {
            found: bytes.len() as u64,
            expected,
        });
    }
    let (body, sum) = bytes.split_at(bytes.len() - CHECKSUM);
    if sha256(body).as_slice() != sum {
        return Err(Invalid::Checksum);
    }
    let found = &header.identity;
    if found.model_sha256 != identity.model_sha256 {
        return Err(Invalid::Model);
    }
    if found.computation != identity.computation {
        return Err(Invalid::Computation(computation_changes(
            &identity.computation,
            &found.computation,
        )));
    }
    if found.layout != identity.layout {
        return Err(Invalid::Layout {
            found: found.layout.clone(),
            expected: identity.layout.clone(),
        });
    }
    if header.tokens.len() != tokens.len()
        || header.tokens.iter().zip(tokens).any(|(a, b)| *a != b.0)
    {
        return Err(Invalid::Tokens);
    }
    Ok(&body[header_end..])
}

/// A directory of prefix states with a size bound.
#[derive(Debug, Clone)]
pub struct PrefixStore {
    dir: PathBuf,
    max_bytes: u64,
    identity: StateIdentity,
}

impl PrefixStore {
    /// Opens (creating) the directory.
    ///
    /// # Errors
    /// When the directory cannot be created.
    pub fn open(dir: &Path, max_bytes: u64, identity: StateIdentity) -> Result<Self, FileError> {
        create_private_dir(dir)?;
        Ok(Self {
            dir: dir.to_owned(),
            max_bytes,
            identity,
        })
    }

    /// The path a prefix's state lives at.
    pub fn path_of(&self, tokens: &[Token]) -> PathBuf {
        self.dir.join(file_name(&self.identity, tokens))
    }

    /// Looks up and validates the state of `tokens`.
    pub fn load(&self, tokens: &[Token]) -> Lookup {
        let path = self.path_of(tokens);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(_) => return Lookup::Miss,
        };
        match decode(&bytes, &self.identity, tokens) {
            Ok(payload) => {
                // Touch it: eviction drops the least recently used files first.
                if let Ok(f) = File::options().append(true).open(&path) {
                    let _ = f.set_modified(SystemTime::now());
                }
                Lookup::Hit {
                    payload: payload.to_vec(),
                    file_bytes: bytes.len() as u64,
                }
            }
            Err(reason) => Lookup::Invalid { path, reason },
        }
    }

    /// Saves the state of `tokens` atomically, then evicts old files over the size bound.
    /// Returns the file's size.
    ///
    /// # Errors
    /// When the file cannot be written; the run goes on without it.
    pub fn save(&self, tokens: &[Token], payload: &[u8]) -> Result<u64, StoreError> {
        let path = self.path_of(tokens);
        let bytes = encode(&self.identity, tokens, payload)?;
        write_atomic(&path, &bytes)?;
        self.evict(&path);
        Ok(bytes.len() as u64)
    }

    /// Deletes least recently used files until the directory fits its bound; `keep` stays.
    fn evict(&self, keep: &Path) {
        let mut files = entries(&self.dir);
        let mut total: u64 = files.iter().map(|e| e.bytes).sum();
        files.sort_by_key(|e| e.last_used);
        for e in files {
            if total <= self.max_bytes {
                break;
            }
            if e.path != keep && fs::remove_file(&e.path).is_ok() {
                tracing::info!(file = %e.path.display(), bytes = e.bytes, "evicted prefix state");
                total -= e.bytes;
            }
        }
    }
}

/// One stored file, as `cache ls` shows it.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Its path.
    pub path: PathBuf,
    /// Its size.
    pub bytes: u64,
    /// Last use (modification time).
    pub last_used: SystemTime,
    /// Prefix tokens, when the header reads.
    pub tokens: Option<usize>,
    /// Model hash prefix, when the header reads.
    pub model: Option<String>,
    /// Why the header does not read.
    pub problem: Option<String>,
}

/// The state files of a directory (ours: named `*.ibprefix` and opening with our magic), with
/// what their headers say. Anything else in the directory is not ours and is left alone.
pub fn entries(dir: &Path) -> Vec<Entry> {
    let Ok(read) = fs::read_dir(dir) else {
        return Vec::new();
    };
    read.filter_map(Result::ok)
        .filter(|e| e.path().extension().is_some_and(|x| x == EXTENSION))
        .filter_map(|e| {
            let path = e.path();
            let meta = e.metadata().ok()?;
            if !meta.is_file() {
                return None;
            }
            let mut head = Vec::with_capacity(64 << 10);
            File::open(&path)
                .and_then(|f| f.take(64 << 10).read_to_end(&mut head))
                .ok()?;
            let (tokens, model, problem) = match decode_header(&head) {
                Ok((h, _)) => (
                    Some(h.tokens.len()),
                    Some(short_hex(&h.identity.model_sha256, 6)),
                    None,
                ),
                Err(Invalid::Magic) => return None,
                Err(_) if !head.starts_with(MAGIC) => return None,
                Err(e) => (None, None, Some(e.to_string())),
            };
            Some(Entry {
                path,
                bytes: meta.len(),
                last_used: meta.modified().unwrap_or(UNIX_EPOCH),
                tokens,
                model,
                problem,
            })
        })
        .collect()
}

/// Deletes the state files this tool wrote in `dir`, and the temporary files of writers that
/// are gone; a file another run is writing right now stays. Returns how many were removed.
///
/// # Errors
/// When a file cannot be removed.
pub fn clear(dir: &Path) -> Result<usize, FileError> {
    let mut n = 0;
    for e in entries(dir) {
        fs::remove_file(&e.path).at("remove", &e.path)?;
        n += 1;
    }
    n += remove_stale_temps(dir, is_state_file_name)?;
    Ok(n)
}

/// Whether a file name is one [`file_name`] makes: 32 hex digits and our extension.
fn is_state_file_name(name: &str) -> bool {
    name.strip_suffix(&format!(".{EXTENSION}"))
        .is_some_and(|stem| stem.len() == 32 && stem.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Creates `dir` (and missing parents) readable by this user only: a state file is trusted
/// once its checksum and identity match, and the checksum guards against corruption, not
/// against a file someone else crafted. An existing directory keeps its permissions.
///
/// # Errors
/// When the directory cannot be created.
pub fn create_private_dir(dir: &Path) -> Result<(), FileError> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .at("create prefix cache", dir)
}

/// The default store directory: `$XDG_CACHE_HOME/infer-batch`, else `~/.cache/infer-batch`.
pub fn default_dir() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("infer-batch")
}

/// SHA-256 of a model file, remembered in `dir` (when given) by path, size and modification
/// time so a multi-gigabyte model is hashed once.
///
/// # Errors
/// When the model cannot be read.
pub fn model_sha256(model: &Path, dir: Option<&Path>) -> Result<[u8; 32], FileError> {
    let meta = fs::metadata(model).at("stat", model)?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    let canonical = fs::canonicalize(model).unwrap_or_else(|_| model.to_owned());
    let stamp = format!("{}\n{}\n{}\n", canonical.display(), meta.len(), mtime);
    let Some(dir) = dir else {
        return sha256_file(model);
    };
    let memo_dir = dir.join("model-ids");
    let memo = memo_dir.join(format!(
        "{}.id",
        short_hex(&sha256(canonical.to_string_lossy().as_bytes()), 16)
    ));
    if let Ok(text) = fs::read_to_string(&memo) {
        if let Some(hash) = text.strip_prefix(&stamp).and_then(parse_hex32) {
            return Ok(hash);
        }
    }
    let hash = sha256_file(model)?;
    // A failed memo only costs a re-hash next time.
    if create_private_dir(&memo_dir).is_ok() {
        write_atomic(&memo, format!("{stamp}{}", hex::encode(hash)).as_bytes()).ok();
    }
    Ok(hash)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn computation() -> Identity {
        let mut id = crate::identity::tests::identity();
        id.model = hex::encode([7u8; 32]);
        id
    }

    fn identity() -> StateIdentity {
        StateIdentity::new(&computation(), "memory=kv")
    }

    fn toks() -> Vec<Token> {
        (0..50).map(Token).collect()
    }

    fn file() -> Vec<u8> {
        encode(&identity(), &toks(), &[1, 2, 3, 4, 5, 6, 7, 8]).unwrap()
    }

    #[test]
    fn round_trip() {
        let f = file();
        assert_eq!(
            decode(&f, &identity(), &toks()).unwrap(),
            &[1, 2, 3, 4, 5, 6, 7, 8]
        );
    }

    #[test]
    fn truncation_is_detected_at_every_length() {
        let f = file();
        for cut in 0..f.len() {
            let e = decode(&f[..cut], &identity(), &toks()).unwrap_err();
            assert!(
                matches!(e, Invalid::Truncated { .. } | Invalid::Header(_)),
                "cut {cut}: {e}"
            );
        }
    }

    #[test]
    fn every_flipped_bit_is_detected() {
        let f = file();
        for i in 0..f.len() {
            for bit in 0..8 {
                let mut g = f.clone();
                g[i] ^= 1 << bit;
                assert!(
                    decode(&g, &identity(), &toks()).is_err(),
                    "byte {i} bit {bit}"
                );
            }
        }
    }

    #[test]
    fn other_model_build_version_layout_and_tokens_are_refused() {
        let f = file();
        let mut other = identity();
        other.model_sha256 = [8; 32];
        assert_eq!(decode(&f, &other, &toks()), Err(Invalid::Model));
        // Another machine or setting: the refusal names what changed.
        let mut id = computation();
        id.machine.backend = "cpu+vulkan".into();
        id.settings.cache_type_k = "q8_0".into();
        let other = StateIdentity::new(&id, "memory=kv");
        let Err(Invalid::Computation(why)) = decode(&f, &other, &toks()) else {
            panic!("another computation's state was accepted");
        };
        assert!(
            why.contains("the machine's backend was \"cpu\", now \"cpu+vulkan\"")
                && why.contains("--cache-type-k was \"f16\", now \"q8_0\""),
            "{why}"
        );
        // The requests' defaults do not change a state.
        let mut id = computation();
        id.output.max_tokens = 3;
        assert!(decode(&f, &StateIdentity::new(&id, "memory=kv"), &toks()).is_ok());
        let mut other = identity();
        other.layout = "q8/q8".into();
        assert!(matches!(
            decode(&f, &other, &toks()),
            Err(Invalid::Layout { .. })
        ));
        let mut fewer = toks();
        fewer.pop();
        assert_eq!(decode(&f, &identity(), &fewer), Err(Invalid::Tokens));
        let mut v1 = f.clone();
        v1[8..12].copy_from_slice(&1u32.to_le_bytes());
        assert_eq!(
            decode(&v1, &identity(), &toks()),
            Err(Invalid::Version { found: 1 })
        );
        assert_eq!(
            decode(b"GGUF and more bytes", &identity(), &toks()),
            Err(Invalid::Magic)
        );
    }

    #[test]
    fn file_name_depends_on_identity_and_tokens() {
        let a = file_name(&identity(), &toks());
        assert!(a.ends_with(".ibprefix"));
        let mut other = identity();
        other.layout = "x".into();
        assert_ne!(a, file_name(&other, &toks()));
        assert_ne!(a, file_name(&identity(), &toks()[1..]));
    }

    #[test]
    fn store_saves_loads_and_evicts_least_recently_used() {
        let dir = tempfile::tempdir().unwrap();
        let payload = vec![9u8; 1000];
        let one_file = encode(&identity(), &toks(), &payload).unwrap().len() as u64;
        let store = PrefixStore::open(dir.path(), 2 * one_file + 10, identity()).unwrap();
        let prefixes: Vec<Vec<Token>> = (0..3).map(|i| (i..i + 50).map(Token).collect()).collect();
        store.save(&prefixes[0], &payload).unwrap();
        store.save(&prefixes[1], &payload).unwrap();
        // Make prefix 0 the most recently used, then overflow the bound with prefix 2.
        let old = SystemTime::now() - std::time::Duration::from_secs(60);
        File::options()
            .append(true)
            .open(store.path_of(&prefixes[1]))
            .unwrap()
            .set_modified(old)
            .unwrap();
        assert!(matches!(store.load(&prefixes[0]), Lookup::Hit { .. }));
        store.save(&prefixes[2], &payload).unwrap();
        assert!(matches!(store.load(&prefixes[1]), Lookup::Miss));
        assert!(matches!(store.load(&prefixes[0]), Lookup::Hit { .. }));
        assert!(matches!(store.load(&prefixes[2]), Lookup::Hit { .. }));
        let total: u64 = entries(dir.path()).iter().map(|e| e.bytes).sum();
        assert!(total <= 2 * one_file + 10);
        assert_eq!(clear(dir.path()).unwrap(), 2);
        assert!(entries(dir.path()).is_empty());
    }

    #[test]
    fn corrupt_file_in_store_is_reported_invalid() {
        let dir = tempfile::tempdir().unwrap();
        let store = PrefixStore::open(dir.path(), u64::MAX, identity()).unwrap();
        store.save(&toks(), &[1, 2, 3]).unwrap();
        let path = store.path_of(&toks());
        let mut bytes = fs::read(&path).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x10;
        fs::write(&path, bytes).unwrap();
        assert!(matches!(store.load(&toks()), Lookup::Invalid { .. }));
    }

    #[test]
    fn model_hash_is_remembered_by_stamp() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("m.gguf");
        fs::write(&model, b"weights").unwrap();
        let a = model_sha256(&model, Some(dir.path())).unwrap();
        assert_eq!(a, sha256(b"weights"));
        assert_eq!(model_sha256(&model, Some(dir.path())).unwrap(), a);
        fs::write(&model, b"other weights").unwrap();
        assert_ne!(model_sha256(&model, Some(dir.path())).unwrap(), a);
    }
}
