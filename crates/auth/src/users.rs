//! User accounts: Argon2id password hashes, TOTP (RFC 6238) second factor,
//! lockout state. Stored as sealed system records (kind `user`, keyed by a
//! random id; kind `username` maps a keyed hash of the name to the id).
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;
use totp_rs::TOTP;
use zeroize::Zeroizing;

use crate::roles::Role;

pub const USER_KIND: &str = "user";
pub const USERNAME_KIND: &str = "username";

/// A user account as stored (sealed). `Debug` leaves out the secrets.
#[derive(Clone, Serialize, Deserialize, PartialEq)]
pub struct User {
    pub id: String,
    pub username: String,
    pub role: Role,
    /// The Practitioner a clinical user acts as.
    #[serde(default)]
    pub practitioner: Option<String>,
    /// The Patient a patient user is.
    #[serde(default)]
    pub patient: Option<String>,
    /// The Organization the user works for (consent rules may name it).
    #[serde(default)]
    pub organization: Option<String>,
    /// Argon2id PHC string.
    pub password_hash: String,
    /// The TOTP shared secret (20 random bytes), once enrolled.
    #[serde(default)]
    pub totp_secret: Option<Vec<u8>>,
    /// The last TOTP time step accepted (a code is good once).
    #[serde(default)]
    pub totp_last_step: u64,
    /// Consecutive failed password or TOTP attempts.
    #[serde(default)]
    pub failed_attempts: u32,
    /// Locked by an administrator or a response (until unlocked).
    #[serde(default)]
    pub locked: bool,
    #[serde(default)]
    pub locked_reason: Option<String>,
    /// Locked after failed attempts until this time (UTC seconds).
    #[serde(default)]
    pub locked_until: i64,
    /// Only read interactions allowed.
    #[serde(default)]
    pub read_only: bool,
    /// Every access to a patient needs a stated break-the-glass reason (a
    /// response to an alert).
    #[serde(default)]
    pub require_break_glass: bool,
    /// Tokens issued before this time (UTC seconds) are refused.
    #[serde(default)]
    pub tokens_valid_after: i64,
    pub created: i64,
    #[serde(default)]
    pub last_login: Option<i64>,
}

impl std::fmt::Debug for User {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("User")
            .field("id", &self.id)
            .field("username", &self.username)
            .field("role", &self.role)
            .field("locked", &self.locked)
            .finish_non_exhaustive()
    }
}

impl User {
    /// Whether sign-in is refused now.
    pub fn is_locked(&self, now: i64) -> bool {
        self.locked || self.locked_until > now
    }
}

/// The Argon2id hasher: OWASP's recommended parameters (19 MiB, 2 passes).
fn argon2() -> Argon2<'static> {
    Argon2::new(
        Algorithm::Argon2id,
        Version::V0x13,
        Params::new(19 * 1024, 2, 1, None).expect("valid Argon2 parameters"),
    )
}

/// Hash a password as an Argon2id PHC string.
pub fn hash_password(password: &str) -> String {
    let salt = SaltString::generate(&mut argon2::password_hash::rand_core::OsRng);
    argon2()
        .hash_password(password.as_bytes(), &salt)
        .expect("Argon2 hashing with valid parameters")
        .to_string()
}

/// Check a password against its PHC string (constant time inside Argon2).
pub fn verify_password(password: &str, phc: &str) -> bool {
    match PasswordHash::new(phc) {
        Ok(h) => argon2().verify_password(password.as_bytes(), &h).is_ok(),
        Err(_) => false,
    }
}

/// A hash to verify against when the user does not exist, so that an
/// unknown username takes as long as a wrong password.
pub fn dummy_hash() -> &'static str {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DUMMY.get_or_init(|| hash_password("custos-no-such-user"))
}

/// Password rules: long enough to resist guessing, not absurdly long.
pub fn check_password_strength(password: &str) -> Result<(), String> {
    let n = password.chars().count();
    if n < 12 {
        return Err("passwords need at least 12 characters".into());
    }
    if n > 256 {
        return Err("passwords may have at most 256 characters".into());
    }
    Ok(())
}

/// A new random TOTP secret (160 bits, as RFC 4226 recommends).
pub fn new_totp_secret() -> Zeroizing<Vec<u8>> {
    let mut s = vec![0u8; 20];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut s)
        .expect("OS random generator");
    Zeroizing::new(s)
}

fn totp(secret: &[u8], account: &str) -> TOTP {
    TOTP::new_unchecked(
        totp_rs::Algorithm::SHA1,
        6,
        1,
        30,
        secret.to_vec(),
        Some("Custos".to_string()),
        account.to_string(),
    )
}

/// The `otpauth://` URL an authenticator app enrolls from.
pub fn totp_url(secret: &[u8], account: &str) -> String {
    totp(secret, account).get_url()
}

/// The base32 form of a TOTP secret (for manual entry).
pub fn totp_base32(secret: &[u8]) -> String {
    totp(secret, "-").get_secret_base32()
}

/// The current code (for tests and the demo, which play the authenticator).
pub fn totp_code(secret: &[u8], unix_secs: u64) -> String {
    totp(secret, "-").generate(unix_secs)
}

/// Check a TOTP code at `unix_secs`, allowing one step of clock skew either
/// way. Returns the matching time step, which must be later than
/// `last_step` (a code is accepted once). Comparison is constant-time.
pub fn check_totp(secret: &[u8], code: &str, unix_secs: u64, last_step: u64) -> Option<u64> {
    let code = code.trim();
    if code.len() != 6 || !code.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let t = totp(secret, "-");
    let step = unix_secs / 30;
    let mut found = None;
    for s in [step.saturating_sub(1), step, step + 1] {
        let expected = t.generate(s * 30);
        if bool::from(expected.as_bytes().ct_eq(code.as_bytes())) && s > last_step {
            found = Some(s);
        }
    }
    found
}

/// The current code for a base32 secret as an enrollment shows it (for
/// scripts and tests that play the authenticator app).
pub fn totp_code_base32(secret_base32: &str, unix_secs: u64) -> Option<String> {
    let bytes = totp_rs::Secret::Encoded(secret_base32.to_string())
        .to_bytes()
        .ok()?;
    Some(totp_code(&bytes, unix_secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_hash_and_verify() {
        let h = hash_password("correct horse battery");
        assert!(h.starts_with("$argon2id$"));
        assert!(verify_password("correct horse battery", &h));
        assert!(!verify_password("correct horse batterY", &h));
        assert!(!verify_password("x", "not a hash"));
        assert!(check_password_strength("short").is_err());
    }

    #[test]
    fn totp_matches_rfc6238_and_is_single_use() {
        // RFC 6238 appendix B, SHA-1 secret "12345678901234567890", T = 59 s → 94287082 (8 digits);
        // with 6 digits the code is the last six: 287082.
        let secret = b"12345678901234567890";
        assert_eq!(totp_code(secret, 59), "287082");
        assert_eq!(totp_code(secret, 1111111109), "081804");
        let step = check_totp(secret, "081804", 1111111109, 0).expect("valid");
        assert!(
            check_totp(secret, "081804", 1111111109, step).is_none(),
            "replayed code"
        );
        assert!(check_totp(secret, "081805", 1111111109, 0).is_none());
        assert!(check_totp(secret, "abc", 1111111109, 0).is_none());
        // One step of skew is tolerated, two are not.
        assert!(check_totp(secret, "081804", 1111111109 + 30, 0).is_some());
        assert!(check_totp(secret, "081804", 1111111109 + 90, 0).is_none());
    }
}
