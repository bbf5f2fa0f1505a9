//! Keys and sealing for Custos.
//!
//! * A **key-encryption key** (KEK) lives outside the database, behind the
//!   [`KekProvider`] trait (a key file or an environment variable today, an
//!   external KMS later).
//! * **Data keys** (DEKs) are random AES-256 keys, one per patient
//!   compartment, stored only wrapped (AES-256-GCM under a KEK, the key's
//!   name as associated data).
//! * Resource bodies are **sealed** with AES-256-GCM under a DEK, with
//!   associated data binding resource type, id and version.
//! * Search values become **blind indexes**: HMAC-SHA256 under a separate
//!   index key, truncated to 16 bytes.
//!
//! All primitives come from `ring`; nothing here is home-made. Nonces are 96
//! random bits from the OS generator for every seal: a DEK seals at most one
//! compartment's versions, far below the 2^32 messages per key that random
//! GCM nonces allow.

#![warn(missing_docs)]

mod blind;
mod error;
mod kek;
mod seal;

pub use blind::{BLIND_LEN, BlindIndexer, BlindToken};

/// Lower-case hex of `bytes` (lookup keys, ids: on hot paths, so no `format!` per byte).
pub fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 15)] as char);
    }
    s
}
pub use error::CryptoError;
pub use kek::{EnvKekProvider, FileKekProvider, Kek, KekProvider, KekState};
pub use seal::{
    CopySealer, DataKey, GcmSealer, SEAL_OVERHEAD, SEAL_VERSION_COPY, SEAL_VERSION_GCM, Sealer,
    WrappedKey,
};
