//! Data keys and sealing.
use crate::error::CryptoError;

/// An unwrapped AES-256 data key, zeroized on drop, never printed.
pub struct DataKey {
    _private: (),
}

impl DataKey {
    /// A fresh random key.
    pub fn generate() -> DataKey {
        todo!("HELPER")
    }
    /// From raw bytes (for example the index key).
    pub fn from_bytes(bytes: [u8; 32]) -> DataKey {
        let _ = bytes;
        todo!("HELPER")
    }
    /// The raw bytes, for deriving an HMAC key (the blind index key).
    pub fn expose_bytes(&self) -> &[u8; 32] {
        todo!("HELPER")
    }
}

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DataKey(..)")
    }
}

/// A data key wrapped under a KEK, as stored in the database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrappedKey {
    pub kek_id: String,
    /// nonce ‖ ciphertext ‖ tag.
    pub blob: Vec<u8>,
}

/// Seals and opens record bodies. [`GcmSealer`] is the only production
/// implementation; [`CopySealer`] exists so that benchmarks can measure the
/// cost of sealing against a plain copy.
pub trait Sealer: Send + Sync {
    /// Seal `plaintext` under `key` with associated data `aad`.
    /// Output: version byte ‖ 12-byte nonce ‖ ciphertext ‖ 16-byte tag.
    fn seal(&self, key: &DataKey, aad: &[u8], plaintext: &[u8]) -> Vec<u8>;
    /// Open what [`Sealer::seal`] produced with the same key and `aad`.
    fn open(&self, key: &DataKey, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, CryptoError>;
}

/// AES-256-GCM with random 96-bit nonces.
#[derive(Debug, Default, Clone, Copy)]
pub struct GcmSealer;

impl Sealer for GcmSealer {
    fn seal(&self, key: &DataKey, aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
        let _ = (key, aad, plaintext);
        todo!("HELPER")
    }
    fn open(&self, key: &DataKey, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let _ = (key, aad, sealed);
        todo!("HELPER")
    }
}

/// Benchmark baseline only: copies the plaintext (with a distinct version
/// byte so that it can never be mistaken for a sealed body). Never selectable
/// from configuration.
#[derive(Debug, Default, Clone, Copy)]
pub struct CopySealer;

impl Sealer for CopySealer {
    fn seal(&self, key: &DataKey, aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
        let _ = (key, aad, plaintext);
        todo!("HELPER")
    }
    fn open(&self, key: &DataKey, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let _ = (key, aad, sealed);
        todo!("HELPER")
    }
}
