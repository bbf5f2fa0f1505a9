//! Keyed blind indexes: HMAC-SHA256 of a search value, truncated.
use ring::hmac;

/// Length in bytes of a blind token (128 bits: collisions are negligible).
pub const BLIND_LEN: usize = 16;

/// A blind index token.
pub type BlindToken = [u8; BLIND_LEN];

/// Computes blind tokens under the index key.
///
/// A token is the first [`BLIND_LEN`] bytes of
/// `HMAC-SHA256(index_key, len(p1) ‖ p1 ‖ len(p2) ‖ p2 ‖ …)`, each length a
/// big-endian `u32`.
#[derive(Clone)]
pub struct BlindIndexer {
    /// The prepared HMAC key (ring keeps the padded key state, so each token
    /// costs only the message blocks).
    key: hmac::Key,
}

impl BlindIndexer {
    /// From the 32-byte index key.
    pub fn new(index_key: &[u8; 32]) -> BlindIndexer {
        BlindIndexer {
            key: hmac::Key::new(hmac::HMAC_SHA256, index_key),
        }
    }
    /// The token of a value given as parts (for example
    /// `[b"Patient", b"family", b"p", b"smi"]`). Parts are length-prefixed
    /// before hashing so that no two part lists collide.
    ///
    /// Panics if a part is 4 GiB or longer.
    pub fn token(&self, parts: &[&[u8]]) -> BlindToken {
        let mut ctx = hmac::Context::with_key(&self.key);
        for part in parts {
            let len = u32::try_from(part.len()).expect("blind index part of 4 GiB or more");
            ctx.update(&len.to_be_bytes());
            ctx.update(part);
        }
        let tag = ctx.sign();
        let mut token = [0u8; BLIND_LEN];
        token.copy_from_slice(&tag.as_ref()[..BLIND_LEN]);
        token
    }
}

impl std::fmt::Debug for BlindIndexer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BlindIndexer(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic() {
        let ix = BlindIndexer::new(&[7u8; 32]);
        let a = ix.token(&[b"Patient", b"family", b"p", b"smi"]);
        let b = ix.token(&[b"Patient", b"family", b"p", b"smi"]);
        assert_eq!(a, b);
        // A second indexer with the same key agrees.
        assert_eq!(
            BlindIndexer::new(&[7u8; 32]).token(&[b"Patient", b"family", b"p", b"smi"]),
            a
        );
    }

    #[test]
    fn matches_reference_construction() {
        let key = [9u8; 32];
        let ix = BlindIndexer::new(&key);
        let mut msg = Vec::new();
        for p in [&b"ab"[..], b"", b"xyz"] {
            msg.extend_from_slice(&(p.len() as u32).to_be_bytes());
            msg.extend_from_slice(p);
        }
        let full = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, &key), &msg);
        assert_eq!(
            ix.token(&[b"ab", b"", b"xyz"])[..],
            full.as_ref()[..BLIND_LEN]
        );
    }

    #[test]
    fn splits_do_not_collide() {
        let ix = BlindIndexer::new(&[1u8; 32]);
        let t1 = ix.token(&[b"ab", b"c"]);
        let t2 = ix.token(&[b"a", b"bc"]);
        let t3 = ix.token(&[b"abc"]);
        let t4 = ix.token(&[b"abc", b""]);
        let t5 = ix.token(&[]);
        let t6 = ix.token(&[b""]);
        let all = [t1, t2, t3, t4, t5, t6];
        for i in 0..all.len() {
            for j in i + 1..all.len() {
                assert_ne!(all[i], all[j], "tokens {i} and {j} collide");
            }
        }
    }

    #[test]
    fn key_matters() {
        let a = BlindIndexer::new(&[1u8; 32]).token(&[b"smith"]);
        let b = BlindIndexer::new(&[2u8; 32]).token(&[b"smith"]);
        assert_ne!(a, b);
    }

    #[test]
    fn debug_hides_key() {
        let ix = BlindIndexer::new(&[0xabu8; 32]);
        let dbg = format!("{ix:?}");
        assert_eq!(dbg, "BlindIndexer(..)");
        assert!(!dbg.to_lowercase().contains("ab,") && !dbg.contains("171"));
    }

    #[test]
    fn send_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<BlindIndexer>();
    }
}
