//! File and batch ids: unguessable (128 random bits) and checked against one strict shape
//! before any of them names a path, so that `../` and friends can never reach the disk.

/// What an id names; its prefix says which.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdKind {
    /// `file-...`
    File,
    /// `batch_...`
    Batch,
}

impl IdKind {
    fn prefix(self) -> &'static str {
        match self {
            Self::File => "file-",
            Self::Batch => "batch_",
        }
    }
}

/// Hex digits after the prefix: 16 random bytes.
const RANDOM_HEX: usize = 32;

/// A fresh id of `kind`.
///
/// # Errors
/// When the operating system gives no random bytes.
pub fn new_id(kind: IdKind) -> std::io::Result<String> {
    let mut bytes = [0u8; RANDOM_HEX / 2];
    getrandom::fill(&mut bytes).map_err(std::io::Error::other)?;
    Ok(format!("{}{}", kind.prefix(), hex::encode(bytes)))
}

/// Whether `id` has exactly the shape [`new_id`] makes: the prefix, then lowercase hex.
pub fn is_valid(kind: IdKind, id: &str) -> bool {
    id.strip_prefix(kind.prefix()).is_some_and(|rest| {
        rest.len() == RANDOM_HEX && rest.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_ids_are_valid_and_differ() {
        let a = new_id(IdKind::File).unwrap();
        let b = new_id(IdKind::File).unwrap();
        assert_ne!(a, b);
        assert!(is_valid(IdKind::File, &a), "{a}");
        assert!(!is_valid(IdKind::Batch, &a), "a file id is not a batch id");
        assert!(is_valid(IdKind::Batch, &new_id(IdKind::Batch).unwrap()));
    }

    #[test]
    fn traversal_and_odd_shapes_are_refused() {
        let good = new_id(IdKind::File).unwrap();
        for bad in [
            "file-../../etc/passwd".to_string(),
            format!("{good}/../x"),
            good[..good.len() - 1].to_string(),
            format!("{good}0"),
            good.to_uppercase(),
            "file-".to_string(),
            String::new(),
            format!("{}%2e", &good[..good.len() - 3]),
        ] {
            assert!(!is_valid(IdKind::File, &bad), "{bad}");
        }
    }
}
