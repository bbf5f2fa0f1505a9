/// Errors of key handling and sealing. Messages never contain key material.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    /// A ciphertext failed authentication: tampered, truncated, moved to
    /// another row (associated data differs) or sealed under another key.
    #[error("integrity check failed: the sealed data was altered or does not belong here")]
    Integrity,
    /// The KEK a wrapped key names is not known to the provider.
    #[error("unknown key-encryption key {0:?}")]
    UnknownKek(String),
    /// The key file or variable is missing or malformed.
    #[error("key material unavailable: {0}")]
    KeyMaterial(String),
    /// Reading or writing the key file failed (the message names the file).
    #[error("key file I/O: {0}")]
    Io(#[from] std::io::Error),
}
