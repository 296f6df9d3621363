//! One home for hashing: SHA-256 of files and strings, the 64-bit id hashes that resume and
//! duplicate detection keep per request, and hex.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

/// SHA-256 of a file, streamed.
///
/// # Errors
/// When the file cannot be read.
pub fn sha256_file(path: &Path) -> Result<[u8; 32]> {
    let mut f = File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("cannot read {}", path.display()))?;
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
pub fn sha256_file_hex(path: &Path) -> Result<String> {
    sha256_file(path).map(hex::encode)
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
    fn hash64_is_stable_and_distinguishes() {
        assert_eq!(hash64("a"), hash64("a"));
        assert_ne!(hash64("a"), hash64("b"));
    }
}
