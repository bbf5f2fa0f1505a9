//! Data keys and sealing.
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroize;

use crate::error::CryptoError;

/// Version byte of a body sealed by [`GcmSealer`].
pub const SEAL_VERSION_GCM: u8 = 0x01;
/// Version byte of a body "sealed" by [`CopySealer`] (a plain copy).
pub const SEAL_VERSION_COPY: u8 = 0x00;
/// Length of the AES-GCM authentication tag.
pub(crate) const TAG_LEN: usize = 16;
/// Bytes a [`GcmSealer`] adds to a plaintext: version byte, nonce and tag.
pub const SEAL_OVERHEAD: usize = 1 + NONCE_LEN + TAG_LEN;

/// A fresh random 96-bit nonce from the OS generator.
///
/// Panics if the OS generator fails: sealing with a predictable nonce would
/// be far worse than stopping.
pub(crate) fn random_nonce() -> [u8; NONCE_LEN] {
    let mut nonce = [0u8; NONCE_LEN];
    SystemRandom::new()
        .fill(&mut nonce)
        .expect("the OS random generator failed");
    nonce
}

/// Fill `buf` with random bytes from the OS generator (panics if it fails).
pub(crate) fn random_fill(buf: &mut [u8]) {
    SystemRandom::new()
        .fill(buf)
        .expect("the OS random generator failed");
}

/// A prepared AES-256-GCM key.
pub(crate) fn prepare_key(bytes: &[u8; 32]) -> LessSafeKey {
    // AES-256-GCM accepts any 32-byte key: this cannot fail.
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, bytes).expect("AES-256 key length is 32"))
}

/// AES-256-GCM seal under a prepared key: `prefix ‖ nonce ‖ ct ‖ tag`.
pub(crate) fn gcm_seal(key: &LessSafeKey, prefix: &[u8], aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
    let nonce = random_nonce();
    let start = prefix.len() + NONCE_LEN;
    let mut out = Vec::with_capacity(start + plaintext.len() + TAG_LEN);
    out.extend_from_slice(prefix);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(plaintext);
    let tag = key
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad),
            &mut out[start..],
        )
        // Only fails for plaintexts beyond GCM's 64 GiB limit.
        .expect("AES-GCM plaintext too long");
    out.extend_from_slice(tag.as_ref());
    out
}

/// AES-256-GCM open of `nonce ‖ ct ‖ tag` into `out` (cleared first).
/// Any failure is [`CryptoError::Integrity`].
pub(crate) fn gcm_open_into(
    key: &LessSafeKey,
    aad: &[u8],
    sealed: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), CryptoError> {
    if sealed.len() < NONCE_LEN + TAG_LEN {
        return Err(CryptoError::Integrity);
    }
    let (nonce, ct_tag) = sealed.split_at(NONCE_LEN);
    let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| CryptoError::Integrity)?;
    out.clear();
    out.extend_from_slice(ct_tag);
    match key.open_in_place(nonce, Aad::from(aad), out) {
        Ok(plain) => {
            let n = plain.len();
            out.truncate(n);
            Ok(())
        }
        Err(_) => {
            out.zeroize();
            Err(CryptoError::Integrity)
        }
    }
}

/// An unwrapped AES-256 data key, zeroized on drop, never printed.
pub struct DataKey {
    /// The raw key, boxed so that moving a `DataKey` never copies it.
    bytes: Box<[u8; 32]>,
    /// The expanded AES key, prepared once.
    key: LessSafeKey,
}

impl DataKey {
    /// A fresh random key.
    pub fn generate() -> DataKey {
        let mut bytes = Box::new([0u8; 32]);
        random_fill(&mut bytes[..]);
        DataKey::from_boxed(bytes)
    }
    /// From raw bytes (for example the index key).
    pub fn from_bytes(mut bytes: [u8; 32]) -> DataKey {
        let key = DataKey::from_boxed(Box::new(bytes));
        bytes.zeroize();
        key
    }
    /// The raw bytes, for deriving an HMAC key (the blind index key).
    pub fn expose_bytes(&self) -> &[u8; 32] {
        &self.bytes
    }

    /// From a slice that must be exactly 32 bytes long (copied straight
    /// into the boxed key, leaving no extra copy behind).
    pub(crate) fn from_slice(bytes: &[u8]) -> Option<DataKey> {
        if bytes.len() != 32 {
            return None;
        }
        let mut boxed = Box::new([0u8; 32]);
        boxed.copy_from_slice(bytes);
        Some(DataKey::from_boxed(boxed))
    }

    fn from_boxed(bytes: Box<[u8; 32]>) -> DataKey {
        let key = prepare_key(&bytes);
        DataKey { bytes, key }
    }

    pub(crate) fn aead_key(&self) -> &LessSafeKey {
        &self.key
    }
}

impl Drop for DataKey {
    fn drop(&mut self) {
        self.bytes.zeroize();
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
    /// Id of the KEK that wrapped the key (see [`crate::KekProvider::get`]).
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
///
/// Format: `0x01 ‖ nonce (12) ‖ ciphertext ‖ tag (16)`. Opening fails with
/// [`CryptoError::Integrity`] on a wrong version byte (including the `0x00`
/// of [`CopySealer`]), a short input, a wrong key or associated data, or any
/// altered byte. Sealing panics only if the OS random generator fails.
#[derive(Debug, Default, Clone, Copy)]
pub struct GcmSealer;

impl Sealer for GcmSealer {
    fn seal(&self, key: &DataKey, aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
        gcm_seal(key.aead_key(), &[SEAL_VERSION_GCM], aad, plaintext)
    }
    fn open(&self, key: &DataKey, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, CryptoError> {
        match sealed.split_first() {
            Some((&SEAL_VERSION_GCM, rest)) => {
                let mut out = Vec::new();
                gcm_open_into(key.aead_key(), aad, rest, &mut out)?;
                Ok(out)
            }
            _ => Err(CryptoError::Integrity),
        }
    }
}

/// Benchmark baseline only: copies the plaintext (with a distinct version
/// byte so that it can never be mistaken for a sealed body). Never selectable
/// from configuration.
///
/// Format: `0x00 ‖ plaintext`; the key and associated data are ignored.
/// Opening refuses anything not starting with `0x00`.
#[derive(Debug, Default, Clone, Copy)]
pub struct CopySealer;

impl Sealer for CopySealer {
    fn seal(&self, _key: &DataKey, _aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(1 + plaintext.len());
        out.push(SEAL_VERSION_COPY);
        out.extend_from_slice(plaintext);
        out
    }
    fn open(&self, _key: &DataKey, _aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, CryptoError> {
        match sealed.split_first() {
            Some((&SEAL_VERSION_COPY, rest)) => Ok(rest.to_vec()),
            _ => Err(CryptoError::Integrity),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    const AAD: &[u8] = b"Patient|123|1";

    fn sample() -> Vec<u8> {
        (0..2048u32).map(|i| (i * 7 + 3) as u8).collect()
    }

    #[test]
    fn gcm_round_trip() {
        let key = DataKey::generate();
        for len in [0usize, 1, 15, 16, 17, 2048, 100_000] {
            let plain: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let sealed = GcmSealer.seal(&key, AAD, &plain);
            assert_eq!(sealed.len(), plain.len() + SEAL_OVERHEAD);
            assert_eq!(sealed[0], SEAL_VERSION_GCM);
            assert_eq!(GcmSealer.open(&key, AAD, &sealed).unwrap(), plain);
        }
    }

    #[test]
    fn gcm_ciphertext_hides_plaintext() {
        let key = DataKey::generate();
        let plain = vec![b'A'; 64];
        let sealed = GcmSealer.seal(&key, AAD, &plain);
        assert_ne!(&sealed[1 + NONCE_LEN..1 + NONCE_LEN + 64], &plain[..]);
        // Two seals of the same plaintext differ (fresh nonce).
        assert_ne!(sealed, GcmSealer.seal(&key, AAD, &plain));
    }

    #[test]
    fn gcm_tamper_any_region_fails() {
        let key = DataKey::generate();
        let plain = sample();
        let sealed = GcmSealer.seal(&key, AAD, &plain);
        let n = sealed.len();
        // version, every nonce byte, some ciphertext bytes, every tag byte
        let mut positions: Vec<usize> = (0..1 + NONCE_LEN).collect();
        positions.extend([1 + NONCE_LEN, 1 + NONCE_LEN + 1000, n - TAG_LEN - 1]);
        positions.extend(n - TAG_LEN..n);
        for pos in positions {
            for bit in [0x01u8, 0x80] {
                let mut bad = sealed.clone();
                bad[pos] ^= bit;
                assert!(
                    matches!(GcmSealer.open(&key, AAD, &bad), Err(CryptoError::Integrity)),
                    "tampered byte {pos} accepted"
                );
            }
        }
        // Truncation and extension.
        for cut in [0, 1, 12, 13, 28, 29, n - 1] {
            assert!(matches!(
                GcmSealer.open(&key, AAD, &sealed[..cut]),
                Err(CryptoError::Integrity)
            ));
        }
        let mut longer = sealed.clone();
        longer.push(0);
        assert!(matches!(
            GcmSealer.open(&key, AAD, &longer),
            Err(CryptoError::Integrity)
        ));
        // Still fine untampered.
        assert_eq!(GcmSealer.open(&key, AAD, &sealed).unwrap(), plain);
    }

    #[test]
    fn gcm_wrong_aad_or_key_fails() {
        let key = DataKey::generate();
        let sealed = GcmSealer.seal(&key, AAD, b"body");
        assert!(matches!(
            GcmSealer.open(&key, b"Patient|123|2", &sealed),
            Err(CryptoError::Integrity)
        ));
        assert!(matches!(
            GcmSealer.open(&key, b"", &sealed),
            Err(CryptoError::Integrity)
        ));
        let other = DataKey::generate();
        assert!(matches!(
            GcmSealer.open(&other, AAD, &sealed),
            Err(CryptoError::Integrity)
        ));
    }

    #[test]
    fn garbage_never_panics() {
        let key = DataKey::generate();
        let mut buf = [0u8; 64];
        for len in 0..64 {
            random_fill(&mut buf[..len]);
            let _ = GcmSealer.open(&key, AAD, &buf[..len]);
            let _ = CopySealer.open(&key, AAD, &buf[..len]);
            buf[0] = SEAL_VERSION_GCM;
            assert!(GcmSealer.open(&key, AAD, &buf[..len]).is_err());
        }
    }

    #[test]
    fn copy_and_gcm_never_confused() {
        let key = DataKey::generate();
        let copy = CopySealer.seal(&key, AAD, b"hello");
        assert_eq!(copy, b"\x00hello");
        assert_eq!(CopySealer.open(&key, AAD, &copy).unwrap(), b"hello");
        assert!(matches!(
            GcmSealer.open(&key, AAD, &copy),
            Err(CryptoError::Integrity)
        ));
        let sealed = GcmSealer.seal(&key, AAD, b"hello");
        assert!(matches!(
            CopySealer.open(&key, AAD, &sealed),
            Err(CryptoError::Integrity)
        ));
        assert!(matches!(
            CopySealer.open(&key, AAD, &[]),
            Err(CryptoError::Integrity)
        ));
        assert_eq!(CopySealer.open(&key, AAD, &[0]).unwrap(), b"");
    }

    #[test]
    fn nonces_unique_over_100k_seals() {
        let key = DataKey::generate();
        let mut seen = HashSet::with_capacity(100_000);
        for _ in 0..100_000 {
            let sealed = GcmSealer.seal(&key, b"", b"");
            let nonce: [u8; NONCE_LEN] = sealed[1..1 + NONCE_LEN].try_into().unwrap();
            assert!(seen.insert(nonce), "nonce repeated");
        }
    }

    #[test]
    fn data_key_bytes_and_debug() {
        let bytes = [0x5au8; 32];
        let key = DataKey::from_bytes(bytes);
        assert_eq!(key.expose_bytes(), &bytes);
        let dbg = format!("{key:?}");
        assert_eq!(dbg, "DataKey(..)");
        assert!(!dbg.contains("5a") && !dbg.contains("90"));
        // Same bytes, same key: interoperable.
        let sealed = GcmSealer.seal(&key, AAD, b"x");
        let again = DataKey::from_bytes(bytes);
        assert_eq!(GcmSealer.open(&again, AAD, &sealed).unwrap(), b"x");
        assert_ne!(DataKey::generate().expose_bytes(), key.expose_bytes());
    }

    #[test]
    fn send_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<DataKey>();
        assert_send_sync::<GcmSealer>();
        assert_send_sync::<CopySealer>();
    }
}
