//! Key-encryption keys and where they come from.
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::CryptoError;
use crate::seal::{DataKey, WrappedKey};

/// The life-cycle state of a KEK in a key file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KekState {
    /// Wraps new data keys (exactly one KEK is primary).
    Primary,
    /// Only unwraps keys not yet re-wrapped after a rotation.
    Retired,
}

/// One key-encryption key. The key bytes are zeroized on drop and never
/// printed (its `Debug` shows the id only).
pub struct Kek {
    _private: (),
}

impl Kek {
    /// The KEK's id (stored next to every key it wraps).
    pub fn id(&self) -> &str {
        todo!("HELPER")
    }
    /// Wrap `dek` under this KEK; `key_name` (for example `patient/123`) is
    /// bound as associated data so that a wrapped key cannot be swapped
    /// between rows.
    pub fn wrap(&self, dek: &DataKey, key_name: &str) -> WrappedKey {
        let _ = (dek, key_name);
        todo!("HELPER")
    }
    /// Unwrap a key wrapped by [`Kek::wrap`] with the same `key_name`.
    pub fn unwrap(&self, wrapped: &WrappedKey, key_name: &str) -> Result<DataKey, CryptoError> {
        let _ = (wrapped, key_name);
        todo!("HELPER")
    }
}

impl std::fmt::Debug for Kek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kek").field("id", &self.id()).finish_non_exhaustive()
    }
}

/// Where KEKs come from. Implementations must be cheap to call per request.
pub trait KekProvider: Send + Sync {
    /// The KEK that wraps new data keys.
    fn primary(&self) -> Result<Arc<Kek>, CryptoError>;
    /// The KEK with this id (primary or retired). A file provider re-reads its
    /// file once when the id is unknown, so a rotation done by another process
    /// is picked up without restart.
    fn get(&self, id: &str) -> Result<Arc<Kek>, CryptoError>;
    /// Re-read the source if it changed (called before wrapping new keys).
    fn refresh(&self) -> Result<(), CryptoError> {
        Ok(())
    }
}

/// KEKs in a JSON key file (created owner-only, mode 0600):
/// `{"version":1,"keks":[{"id":"kek-…","state":"primary","key":"<base64>","created":"…"}]}`.
pub struct FileKekProvider {
    _private: (),
}

impl FileKekProvider {
    /// Create a new key file holding one fresh primary KEK; fails if it exists.
    pub fn create(path: &Path) -> Result<(), CryptoError> {
        let _ = path;
        todo!("HELPER")
    }
    /// Open an existing key file (refusing one readable by group or others).
    pub fn open(path: &Path) -> Result<Self, CryptoError> {
        let _ = path;
        todo!("HELPER")
    }
    /// Rotation step 1: add a fresh KEK as primary and mark the old primary
    /// retired, atomically (write to a temp file, fsync, rename). Returns the new id.
    pub fn add_primary(&self) -> Result<String, CryptoError> {
        todo!("HELPER")
    }
    /// Rotation last step: drop retired KEKs whose ids are in `ids`
    /// (the caller checks that no wrapped key still uses them).
    pub fn remove_retired(&self, ids: &[String]) -> Result<(), CryptoError> {
        let _ = ids;
        todo!("HELPER")
    }
    /// Ids and states of all KEKs in the file.
    pub fn list(&self) -> Vec<(String, KekState)> {
        todo!("HELPER")
    }
    pub fn path(&self) -> &PathBuf {
        todo!("HELPER")
    }
}

impl KekProvider for FileKekProvider {
    fn primary(&self) -> Result<Arc<Kek>, CryptoError> {
        todo!("HELPER")
    }
    fn get(&self, id: &str) -> Result<Arc<Kek>, CryptoError> {
        let _ = id;
        todo!("HELPER")
    }
}

/// KEKs from an environment variable: `id:base64key[,id:base64key…]`, the
/// first being primary (for containers that inject secrets as variables).
pub struct EnvKekProvider {
    _private: (),
}

impl EnvKekProvider {
    /// Read the variable `var` (for example `CUSTOS_KEK`).
    pub fn from_env(var: &str) -> Result<Self, CryptoError> {
        let _ = var;
        todo!("HELPER")
    }
}

impl KekProvider for EnvKekProvider {
    fn primary(&self) -> Result<Arc<Kek>, CryptoError> {
        todo!("HELPER")
    }
    fn get(&self, id: &str) -> Result<Arc<Kek>, CryptoError> {
        let _ = id;
        todo!("HELPER")
    }
}
