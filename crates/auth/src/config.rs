//! Configuration of authentication and access control (`[auth]` in the TOML file).
use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::roles::RolePolicy;

/// Settings of identity, tokens and the access policy.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Lifetime of access tokens.
    pub access_token_secs: i64,
    /// Absolute lifetime of a refresh-token family.
    pub refresh_token_days: i64,
    /// A token-signing key signs for this many days, then a new one takes over.
    pub signing_key_days: i64,
    /// Failed password or TOTP attempts in a row that lock an account.
    pub lockout_threshold: u32,
    /// How long such a lock lasts (a security officer can unlock sooner).
    pub lockout_minutes: i64,
    /// A clinician who took part in one of the patient's encounters keeps
    /// access this many days after it ended.
    pub encounter_window_days: i64,
    /// How long a break-the-glass grant lasts.
    pub break_glass_minutes: i64,
    /// Whether breaking the glass also overrides a patient's Consent deny.
    pub break_glass_overrides_consent: bool,
    /// How long a cached relationship answer may be reused when no local
    /// write invalidated it (other nodes' writes are seen after this).
    pub relationship_cache_secs: i64,
    /// External OpenID Connect providers whose tokens are accepted.
    pub oidc: Vec<OidcProvider>,
    /// Replacements for the default permission table, by role name.
    pub roles: BTreeMap<String, RolePolicy>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            access_token_secs: 300,
            refresh_token_days: 30,
            signing_key_days: 30,
            lockout_threshold: 5,
            lockout_minutes: 15,
            encounter_window_days: 30,
            break_glass_minutes: 60,
            break_glass_overrides_consent: false,
            relationship_cache_secs: 5,
            oidc: Vec::new(),
            roles: BTreeMap::new(),
        }
    }
}

impl AuthConfig {
    /// The lockout rule of this configuration.
    pub(crate) fn lockout(&self) -> Lockout {
        Lockout {
            threshold: self.lockout_threshold,
            secs: self.lockout_minutes * 60,
        }
    }
}

/// The lockout rule, one for accounts and for names that are no account
/// alike (so that both answer the same).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Lockout {
    threshold: u32,
    secs: i64,
}

impl Lockout {
    /// Count one failed attempt; at the threshold, lock until `now` plus the
    /// lockout time and start the count again. Whether this attempt locked.
    pub(crate) fn count(self, failed_attempts: &mut u32, locked_until: &mut i64, now: i64) -> bool {
        *failed_attempts += 1;
        let lock = *failed_attempts >= self.threshold;
        if lock {
            *locked_until = now + self.secs;
            *failed_attempts = 0;
        }
        lock
    }
}

/// An external OpenID Connect provider.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OidcProvider {
    /// The `iss` its tokens carry.
    pub issuer: String,
    /// The `aud` its tokens must carry for Custos.
    pub audience: String,
    /// Where its JWKS is fetched (HTTPS, or loopback HTTP for tests).
    #[serde(default)]
    pub jwks_uri: Option<String>,
    /// Or a local JWKS file.
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
    /// The claim holding the user's role(s) (a string or an array).
    #[serde(default = "default_role_claim")]
    pub role_claim: String,
    /// Claim value → Custos role name.
    #[serde(default)]
    pub roles: BTreeMap<String, String>,
    /// The claim naming the Practitioner id of a clinician.
    #[serde(default)]
    pub practitioner_claim: Option<String>,
    /// The claim naming the Patient id of a patient.
    #[serde(default)]
    pub patient_claim: Option<String>,
    /// The claim with the SMART scopes granted (default `scope`).
    #[serde(default = "default_scope_claim")]
    pub scope_claim: String,
}

fn default_role_claim() -> String {
    "roles".into()
}

fn default_scope_claim() -> String {
    "scope".into()
}
