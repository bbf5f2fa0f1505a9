//! Signed tree heads: [C2SP tlog-checkpoint](https://c2sp.org/tlog-checkpoint)
//! bodies in [C2SP signed-note](https://c2sp.org/signed-note) envelopes,
//! signed with Ed25519.
//!
//! A signed checkpoint looks like this (the key name is the log origin):
//!
//! ```text
//! custos.example/audit
//! 42
//! <base64 root hash>
//!
//! — custos.example/audit <base64(key id ‖ Ed25519 signature)>
//! ```
//!
//! Formatting, parsing and signatures come from `tlog_tiles::Checkpoint` and
//! `signed_note`; this module only wires them together and classifies
//! failures.

use std::fmt;
use std::fmt::Write as _;

use base64::prelude::*;
use ring::rand::{SecureRandom, SystemRandom};
use signed_note::{
    Note, NoteError, Signer as _, SignerError, StandardSigner, StandardVerifier, Verifier as _,
    VerifierList,
};
use tlog_tiles::Checkpoint;
use tlog_tiles::tlog::Hash;
use zeroize::Zeroizing;

use crate::merkle::Hash32;

/// signed-note algorithm identifier for Ed25519.
const ALG_ED25519: u8 = 1;

/// Errors from signing and opening checkpoints. Never contain key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckpointError {
    /// The origin is not a valid signed-note key name.
    #[error("invalid origin {0:?}: must be non-empty, without spaces or '+'")]
    InvalidOrigin(String),
    /// A signer or verifier key string could not be used.
    #[error("invalid key: {0}")]
    InvalidKey(&'static str),
    /// The note or the checkpoint inside it is not well formed.
    #[error("malformed checkpoint: {0}")]
    Malformed(String),
    /// The note carries no signature by the given key.
    #[error("checkpoint is not signed by key {0}")]
    UnknownKey(String),
    /// The note carries a signature by the given key that does not verify.
    #[error("bad signature by key {0}")]
    BadSignature(String),
    /// The signature verifies but the checkpoint names another origin.
    #[error("checkpoint origin {origin:?} does not match key name {key_name:?}")]
    OriginMismatch {
        /// Origin line of the checkpoint.
        origin: String,
        /// Name of the verifier key.
        key_name: String,
    },
    /// The system random number generator failed.
    #[error("random number generator failed")]
    Rng,
    /// Producing the signature failed.
    #[error("signing failed: {0}")]
    Signing(String),
}

/// Checks that `origin` is usable as a signed-note key name.
fn validate_origin(origin: &str) -> Result<(), CheckpointError> {
    if signed_note::is_key_name_valid(origin) {
        Ok(())
    } else {
        Err(CheckpointError::InvalidOrigin(origin.to_owned()))
    }
}

/// A log's checkpoint signer: a signed-note Ed25519 key whose name is the
/// log origin. `Debug` shows only the public parts.
#[derive(Clone)]
pub struct LogSigner {
    signer: StandardSigner,
    verifier_key: String,
}

impl fmt::Debug for LogSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LogSigner")
            .field("verifier_key", &self.verifier_key)
            .finish_non_exhaustive()
    }
}

impl LogSigner {
    /// Generates a new key for `origin` from the system RNG. Returns the
    /// signer and its secret signer key string
    /// (`PRIVATE+KEY+<origin>+<id>+<base64>`), to be stored securely.
    pub fn generate(origin: &str) -> Result<(LogSigner, Zeroizing<String>), CheckpointError> {
        validate_origin(origin)?;
        let mut seed = Zeroizing::new([0u8; 32]);
        SystemRandom::new()
            .fill(&mut seed[..])
            .map_err(|_| CheckpointError::Rng)?;
        let signing_key = ed25519_dalek::SigningKey::from_bytes(&seed);

        let mut pubkey = [0u8; 33];
        pubkey[0] = ALG_ED25519;
        pubkey[1..].copy_from_slice(signing_key.verifying_key().as_bytes());
        let id = signed_note::key_id(origin, &pubkey);

        let mut privkey = Zeroizing::new([0u8; 33]);
        privkey[0] = ALG_ED25519;
        privkey[1..].copy_from_slice(&seed[..]);
        let key64 = Zeroizing::new(BASE64_STANDARD.encode(&privkey[..]));

        // Reserve the exact length so the secret is never reallocated (and
        // left behind) while being built.
        let mut skey = Zeroizing::new(String::with_capacity(
            "PRIVATE+KEY+".len() + origin.len() + 10 + key64.len(),
        ));
        skey.push_str("PRIVATE+KEY+");
        skey.push_str(origin);
        let _ = write!(skey, "+{id:08x}+");
        skey.push_str(&key64);

        let signer = Self::from_secret(&skey)?;
        Ok((signer, skey))
    }

    /// Loads a signer from its secret signer key string.
    pub fn from_secret(skey: &str) -> Result<LogSigner, CheckpointError> {
        let signer = StandardSigner::new(skey).map_err(|e| match e {
            SignerError::Format => CheckpointError::InvalidKey("malformed signer key"),
            SignerError::Alg => CheckpointError::InvalidKey("unsupported signer key algorithm"),
            SignerError::Id => CheckpointError::InvalidKey("signer key ID does not match key"),
        })?;
        // StandardSigner does not expose its public key: derive it again.
        // Format (checked above): PRIVATE+KEY+<name>+<id>+<base64>; the base64
        // part may itself contain '+'.
        let key64 = skey
            .splitn(5, '+')
            .nth(4)
            .ok_or(CheckpointError::InvalidKey("malformed signer key"))?;
        let key = Zeroizing::new(
            BASE64_STANDARD
                .decode(key64)
                .map_err(|_| CheckpointError::InvalidKey("malformed signer key"))?,
        );
        let seed: Zeroizing<[u8; 32]> = Zeroizing::new(
            key.get(1..)
                .and_then(|k| k.try_into().ok())
                .ok_or(CheckpointError::InvalidKey("malformed signer key"))?,
        );
        let signing_key = ed25519_dalek::SigningKey::from_bytes(&seed);
        let verifier_key =
            signed_note::new_ed25519_verifier_key(signer.name(), &signing_key.verifying_key());
        Ok(LogSigner {
            signer,
            verifier_key,
        })
    }

    /// The public verifier key string, `<origin>+<key id hex>+<base64>`.
    pub fn verifier_key(&self) -> String {
        self.verifier_key.clone()
    }

    /// The log origin (the key name).
    pub fn origin(&self) -> &str {
        self.signer.name()
    }

    /// Signs a checkpoint for the tree of `size` leaves with root `root`;
    /// returns the complete signed note.
    pub fn sign(&self, size: u64, root: Hash32) -> Result<Vec<u8>, CheckpointError> {
        let body = Checkpoint::new(self.origin(), size, Hash(root), "")
            .map_err(|e| CheckpointError::Malformed(e.to_string()))?;
        let mut note = Note::new(&body.to_bytes(), &[])
            .map_err(|e| CheckpointError::Malformed(e.to_string()))?;
        note.add_sigs(&[&self.signer])
            .map_err(|e| CheckpointError::Signing(e.to_string()))?;
        Ok(note.to_bytes())
    }
}

/// A checkpoint whose signature has been verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedCheckpoint {
    /// Log origin (equals the verifier key name).
    pub origin: String,
    /// Tree size.
    pub size: u64,
    /// Tree root.
    pub root: Hash32,
    /// The signed note as received.
    pub note: Vec<u8>,
}

/// Verifies a signed checkpoint note with `verifier_key` and parses it. The
/// checkpoint origin must equal the key name. Signatures by other keys
/// (e.g. witnesses) are ignored.
pub fn open_checkpoint(
    note: &[u8],
    verifier_key: &str,
) -> Result<SignedCheckpoint, CheckpointError> {
    let verifier = StandardVerifier::new(verifier_key)
        .map_err(|_| CheckpointError::InvalidKey("malformed verifier key"))?;
    let key_name = verifier.name().to_owned();
    let key = format!("{key_name}+{:08x}", verifier.key_id());

    let parsed = Note::from_bytes(note).map_err(|e| CheckpointError::Malformed(e.to_string()))?;
    match parsed.verify(&VerifierList::new(vec![Box::new(verifier)])) {
        Ok(_) => {}
        Err(NoteError::UnverifiedNote) => return Err(CheckpointError::UnknownKey(key)),
        Err(NoteError::InvalidSignature { .. }) => return Err(CheckpointError::BadSignature(key)),
        Err(e) => return Err(CheckpointError::Malformed(e.to_string())),
    }

    let cp = Checkpoint::from_bytes(parsed.text())
        .map_err(|e| CheckpointError::Malformed(e.to_string()))?;
    if cp.origin() != key_name {
        return Err(CheckpointError::OriginMismatch {
            origin: cp.origin().to_owned(),
            key_name,
        });
    }
    Ok(SignedCheckpoint {
        origin: key_name,
        size: cp.size(),
        root: cp.hash().0,
        note: note.to_vec(),
    })
}

/// Parses a checkpoint WITHOUT verifying any signature, for diagnostics
/// only. Accepts a signed note or a bare checkpoint body. Returns
/// `(origin, size, root)`.
pub fn parse_unverified(note: &[u8]) -> Result<(String, u64, Hash32), CheckpointError> {
    let cp = match Note::from_bytes(note) {
        Ok(n) => Checkpoint::from_bytes(n.text()),
        Err(_) => Checkpoint::from_bytes(note),
    }
    .map_err(|e| CheckpointError::Malformed(e.to_string()))?;
    Ok((cp.origin().to_owned(), cp.size(), cp.hash().0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merkle::leaf_hash;

    const ORIGIN: &str = "custos.example/audit";

    fn signer() -> LogSigner {
        LogSigner::generate(ORIGIN).expect("generate").0
    }

    #[test]
    fn sign_open_round_trip() {
        let s = signer();
        let root = leaf_hash(b"x");
        let note = s.sign(42, root).unwrap();
        let cp = open_checkpoint(&note, &s.verifier_key()).unwrap();
        assert_eq!(cp.origin, ORIGIN);
        assert_eq!(cp.size, 42);
        assert_eq!(cp.root, root);
        assert_eq!(cp.note, note);
        assert_eq!(
            parse_unverified(&note).unwrap(),
            (ORIGIN.to_owned(), 42, root)
        );
        assert_eq!(s.origin(), ORIGIN);
        assert!(s.verifier_key().starts_with("custos.example/audit+"));
    }

    #[test]
    fn text_format_is_c2sp() {
        let s = signer();
        let root = leaf_hash(b"x");
        let note = String::from_utf8(s.sign(7, root).unwrap()).unwrap();
        let (body, sigs) = note.split_once("\n\n").unwrap();
        let lines: Vec<&str> = body.split('\n').collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0], ORIGIN);
        assert_eq!(lines[1], "7");
        assert_eq!(lines[2], BASE64_STANDARD.encode(root));
        assert_eq!(
            parse_unverified(format!("{body}\n").as_bytes()).unwrap().1,
            7
        );

        // One signature line: em dash, space, key name, space, base64 of
        // 4-byte key ID ‖ 64-byte Ed25519 signature, newline.
        let sig_line = sigs.strip_suffix('\n').unwrap();
        assert!(!sig_line.contains('\n'));
        let rest = sig_line.strip_prefix("\u{2014} ").unwrap();
        let (name, b64) = rest.split_once(' ').unwrap();
        assert_eq!(name, ORIGIN);
        let raw = BASE64_STANDARD.decode(b64).unwrap();
        assert_eq!(raw.len(), 4 + 64);
        let vkey = s.verifier_key();
        let id_hex = vkey.split('+').nth(1).unwrap();
        assert_eq!(
            format!(
                "{:08x}",
                u32::from_be_bytes([raw[0], raw[1], raw[2], raw[3]])
            ),
            id_hex
        );
        // Verifier key: name + 8 hex digits + base64(0x01 ‖ 32-byte key).
        let vk = BASE64_STANDARD
            .decode(vkey.splitn(3, '+').nth(2).unwrap())
            .unwrap();
        assert_eq!(vk.len(), 33);
        assert_eq!(vk[0], 1);
    }

    #[test]
    fn known_key_from_secret() {
        // Key pair from the signed_note documentation (base64 contains '+').
        let skey = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz";
        let vkey = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW";
        let s = LogSigner::from_secret(skey).unwrap();
        assert_eq!(s.verifier_key(), vkey);
        assert_eq!(s.origin(), "PeterNeumann");
        let note = s.sign(1, leaf_hash(b"")).unwrap();
        assert_eq!(open_checkpoint(&note, vkey).unwrap().size, 1);
    }

    #[test]
    fn generated_secret_round_trips() {
        let (s, skey) = LogSigner::generate(ORIGIN).unwrap();
        assert!(skey.starts_with("PRIVATE+KEY+custos.example/audit+"));
        let s2 = LogSigner::from_secret(&skey).unwrap();
        assert_eq!(s.verifier_key(), s2.verifier_key());
        let note = s2.sign(3, [7; 32]).unwrap();
        open_checkpoint(&note, &s.verifier_key()).unwrap();
        // Debug never shows the secret.
        assert!(!format!("{s:?}").contains("PRIVATE"));
        let (other, _) = LogSigner::generate(ORIGIN).unwrap();
        assert_ne!(other.verifier_key(), s.verifier_key());
    }

    #[test]
    fn invalid_origins_and_keys() {
        for bad in ["", "a b", "a+b", "a\tb", "a\nb"] {
            assert!(matches!(
                LogSigner::generate(bad),
                Err(CheckpointError::InvalidOrigin(_))
            ));
        }
        for bad in [
            "",
            "PRIVATE+KEY+x",
            "x+00000000+AAAA",
            "PRIVATE+KEY+a+00000000+AXX=",
        ] {
            assert!(matches!(
                LogSigner::from_secret(bad),
                Err(CheckpointError::InvalidKey(_))
            ));
        }
        let note = signer().sign(1, [0; 32]).unwrap();
        assert!(matches!(
            open_checkpoint(&note, "garbage"),
            Err(CheckpointError::InvalidKey(_))
        ));
    }

    #[test]
    fn tampered_notes_fail() {
        let s = signer();
        let vkey = s.verifier_key();
        let note = String::from_utf8(s.sign(42, [9; 32]).unwrap()).unwrap();

        // Changed body: signature no longer verifies.
        let changed = note.replacen("\n42\n", "\n43\n", 1);
        assert!(matches!(
            open_checkpoint(changed.as_bytes(), &vkey),
            Err(CheckpointError::BadSignature(_))
        ));
        // Changed signature byte.
        let (body, sig) = note.split_once("\n\n").unwrap();
        let (prefix, b64) = sig.trim_end().rsplit_once(' ').unwrap();
        let mut raw = BASE64_STANDARD.decode(b64).unwrap();
        raw[10] ^= 1;
        let forged = format!("{body}\n\n{prefix} {}\n", BASE64_STANDARD.encode(&raw));
        assert!(matches!(
            open_checkpoint(forged.as_bytes(), &vkey),
            Err(CheckpointError::BadSignature(_))
        ));
        // Another key with the same name.
        let other = signer();
        assert!(matches!(
            open_checkpoint(note.as_bytes(), &other.verifier_key()),
            Err(CheckpointError::UnknownKey(_))
        ));
        // Garbage.
        for bad in [
            &b""[..],
            b"hello\n",
            b"\xff\xfe",
            note.trim_end().as_bytes(),
        ] {
            assert!(matches!(
                open_checkpoint(bad, &vkey),
                Err(CheckpointError::Malformed(_))
            ));
        }
        assert!(parse_unverified(b"not a checkpoint").is_err());
    }

    #[test]
    fn origin_must_match_key_name() {
        let (_, skey) = LogSigner::generate("log.a").unwrap();
        let s = LogSigner::from_secret(&skey).unwrap();
        let body = Checkpoint::new("log.b", 1, Hash([1; 32]), "").unwrap();
        let mut note = Note::new(&body.to_bytes(), &[]).unwrap();
        note.add_sigs(&[&StandardSigner::new(&skey).unwrap()])
            .unwrap();
        assert!(matches!(
            open_checkpoint(&note.to_bytes(), &s.verifier_key()),
            Err(CheckpointError::OriginMismatch { .. })
        ));
        // A validly signed note that is not a checkpoint is malformed.
        let mut note = Note::new(b"log.a\nnot a size\n", &[]).unwrap();
        note.add_sigs(&[&StandardSigner::new(&skey).unwrap()])
            .unwrap();
        assert!(matches!(
            open_checkpoint(&note.to_bytes(), &s.verifier_key()),
            Err(CheckpointError::Malformed(_))
        ));
    }
}
