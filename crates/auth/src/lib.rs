//! Custos identity and access control.
//!
//! Users and roles, Argon2id passwords with TOTP, OAuth 2.0 / SMART on FHIR
//! tokens (ES256 JWTs, rotating refresh tokens, client assertions, PKCE,
//! external OpenID Connect providers), and the access policy — scope ∧ role
//! ∧ relationship, overridden by Consent, with break-the-glass — that the
//! record service consults through [`custos_records::Guard`]. Every decision
//! is recorded in the audit trail (`custos-audit`). No HTTP here: the server crate
//! translates requests into these calls.

pub mod config;
pub mod oidc;
pub mod policy;
pub mod roles;
pub mod scopes;
pub mod service;
pub mod state;
pub mod tokens;
pub mod users;
pub mod vault;

pub use config::{AuthConfig, OidcProvider};
pub use custos_audit::{AuditRecord, Decision};
pub use policy::{Policy, Principal, PrincipalKind, RequestGuard};
pub use roles::{Permissions, Relationship, Role, RolePolicy};
pub use scopes::Scopes;
pub use service::{AuthService, Grant, NewUser, TokenResponse};

/// Errors of authentication and administration. Messages never contain
/// secrets; the server maps each kind to an OAuth error or an HTTP status.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AuthError {
    /// Wrong credentials (deliberately unspecific).
    #[error("{0}")]
    InvalidGrant(String),
    /// A malformed or unsupported request.
    #[error("{0}")]
    InvalidRequest(String),
    /// The client is unknown or failed to authenticate.
    #[error("{0}")]
    InvalidClient(String),
    /// A bearer token was refused.
    #[error("{0}")]
    InvalidToken(String),
    /// Authenticated but not allowed.
    #[error("{0}")]
    Forbidden(String),
    /// The account is locked.
    #[error("account locked")]
    Locked,
    #[error("not found: {0}")]
    NotFound(String),
    /// A concurrent change won; retry.
    #[error("conflict")]
    Conflict,
    #[error("internal: {0}")]
    Internal(String),
}

/// UTC seconds now.
pub fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// UTC microseconds now.
pub fn now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// Random bytes, URL-safe base64 (tokens, codes, ids).
pub fn random_token(bytes: usize) -> String {
    use base64::Engine;
    let mut b = vec![0u8; bytes];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
        .expect("OS random generator");
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

/// SHA-256, hex: how one-time secrets (refresh tokens, codes) are looked up.
pub fn sha256_hex(s: &str) -> String {
    custos_crypto::to_hex(ring::digest::digest(&ring::digest::SHA256, s.as_bytes()).as_ref())
}
