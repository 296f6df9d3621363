//! One home for hashing: SHA-256 of files and strings, the 64-bit id hashes that resume and
//! duplicate detection keep per request, the seeds requests sample with, and hex. No other
//! module uses the `sha2` crate.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::error::{AtPath, FileError};

/// SHA-256 of a file, streamed.
///
/// # Errors
/// When the file cannot be read.
pub fn sha256_file(path: &Path) -> Result<[u8; 32], FileError> {
    let mut f = File::open(path).at("read", path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).at("read", path)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().into())
}

/// SHA-256 of a file in hex.
///
/// # Errors
/// When the file cannot be read.
pub fn sha256_file_hex(path: &Path) -> Result<String, FileError> {
    sha256_file(path).map(hex::encode)
}

/// SHA-256 fed piece by piece, for formats that frame their own parts.
#[derive(Default)]
pub struct Hasher(Sha256);

impl Hasher {
    /// An empty hash.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds `bytes`, unframed.
    pub fn update(&mut self, bytes: impl AsRef<[u8]>) -> &mut Self {
        self.0.update(bytes.as_ref());
        self
    }

    /// The digest.
    pub fn finish(self) -> [u8; 32] {
        self.0.finalize().into()
    }
}

/// SHA-256 of bytes.
pub fn sha256(data: impl AsRef<[u8]>) -> [u8; 32] {
    Sha256::digest(data.as_ref()).into()
}

/// SHA-256 of length-prefixed parts, so that `["ab", "c"]` and `["a", "bc"]` differ.
pub fn sha256_parts<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> [u8; 32] {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    h.finalize().into()
}

/// A stable 64-bit hash of a string: 8 bytes kept per request (a `custom_id`), enough to tell
/// a million ids apart with a collision chance of about 3e-8.
pub fn hash64(data: impl AsRef<[u8]>) -> u64 {
    let digest = Sha256::digest(data.as_ref());
    u64::from_le_bytes(digest[..8].try_into().expect("sha256 has 32 bytes"))
}

/// The sampling seed of a request: its own `seed` folded to 32 bits, or one derived from the
/// run's base seed and its `custom_id`, so a request samples the same tokens whatever its
/// position, slot or batch-mates.
pub fn request_seed(own: Option<u64>, base: u64, custom_id: &str) -> u32 {
    match own {
        Some(s) => (s ^ (s >> 32)) as u32,
        None => {
            let mut h = Hasher::new();
            h.update(base.to_le_bytes()).update(custom_id);
            seed_of(&h.finish())
        }
    }
}

/// The seed of choice `k` (`k` > 0) of a request seeded with `seed`: its own, so each choice
/// draws differently and the same way every run.
pub fn choice_seed(seed: u32, k: u32) -> u32 {
    seed_of(&sha256_parts([
        seed.to_le_bytes().as_slice(),
        k.to_le_bytes().as_slice(),
    ]))
}

fn seed_of(digest: &[u8; 32]) -> u32 {
    u32::from_le_bytes([digest[0], digest[1], digest[2], digest[3]])
}

/// Lower-case hex of the first `n` bytes of `bytes` (all of them when shorter).
pub fn short_hex(bytes: &[u8], n: usize) -> String {
    hex::encode(&bytes[..n.min(bytes.len())])
}

/// 32 bytes from 64 hex characters.
pub fn parse_hex32(text: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(text.trim(), &mut out).ok()?;
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_are_length_prefixed() {
        assert_ne!(
            sha256_parts([&b"ab"[..], b"c"]),
            sha256_parts([&b"a"[..], b"bc"])
        );
    }

    #[test]
    fn hex_round_trips() {
        let h = sha256_parts([&b"x"[..]]);
        assert_eq!(parse_hex32(&hex::encode(h)), Some(h));
        assert_eq!(parse_hex32("zz"), None);
        assert_eq!(short_hex(&h, 4).len(), 8);
    }

    #[test]
    fn file_hash_matches_the_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"weights").unwrap();
        assert_eq!(
            sha256_file(&p).unwrap(),
            <[u8; 32]>::from(Sha256::digest(b"weights"))
        );
        assert!(sha256_file(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn seed_comes_from_the_request_or_its_id() {
        assert_eq!(request_seed(Some(7), 1, "a"), 7);
        assert_eq!(request_seed(None, 1, "a"), request_seed(None, 1, "a"));
        assert_ne!(request_seed(None, 1, "a"), request_seed(None, 1, "b"));
        assert_ne!(request_seed(None, 1, "a"), request_seed(None, 2, "a"));
        assert_ne!(choice_seed(5, 1), choice_seed(5, 2));
    }

    #[test]
    fn hash64_is_stable_and_distinguishes() {
        assert_eq!(hash64("a"), hash64("a"));
        assert_ne!(hash64("a"), hash64("b"));
    }
}
