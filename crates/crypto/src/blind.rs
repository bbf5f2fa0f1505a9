//! Keyed blind indexes: HMAC-SHA256 of a search value, truncated.

/// Length in bytes of a blind token (128 bits: collisions are negligible).
pub const BLIND_LEN: usize = 16;

/// A blind index token.
pub type BlindToken = [u8; BLIND_LEN];

/// Computes blind tokens under the index key.
pub struct BlindIndexer {
    _private: (),
}

impl BlindIndexer {
    /// From the 32-byte index key.
    pub fn new(index_key: &[u8; 32]) -> BlindIndexer {
        let _ = index_key;
        todo!("HELPER")
    }
    /// The token of a value given as parts (for example
    /// `[b"Patient", b"family", b"p", b"smi"]`). Parts are length-prefixed
    /// before hashing so that no two part lists collide.
    pub fn token(&self, parts: &[&[u8]]) -> BlindToken {
        let _ = parts;
        todo!("HELPER")
    }
}

impl std::fmt::Debug for BlindIndexer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BlindIndexer(..)")
    }
}
