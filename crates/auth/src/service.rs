//! The authentication service: accounts, the OAuth 2.0 token endpoint
//! (password + TOTP, SMART Backend Services client credentials with a
//! `private_key_jwt` assertion, authorization code with PKCE, refresh
//! tokens that rotate and are revoked as a family when reused), bearer-token
//! authentication, and the response hooks (lock, revoke, read-only).
use std::num::NonZeroUsize;
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use custos_records::Records;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use lru::LruCache;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use subtle::ConstantTimeEq;

use crate::config::AuthConfig;
use crate::oidc::{OidcVerifier, unverified_claim, unverified_issuer};
use crate::policy::{Policy, Principal, PrincipalKind, RequestGuard};
use crate::roles::{AdminRight, Permissions, Role};
use crate::scopes::{Context, Scopes};
use crate::state::{
    CONTROL_KIND, FAMILY_KIND, PrincipalControl, READ_ONLY_KEY, ReadOnlyMode, SETTING_KIND,
    SecurityState, Snapshot, bump_epoch,
};
use crate::tokens::{Claims, TokenSigner};
use crate::users::{
    USER_KIND, USERNAME_KIND, User, check_password_strength, check_totp, dummy_hash, hash_password,
    new_totp_secret, totp_url, verify_password,
};
use crate::vault::{Vault, backend};
use crate::{AuthError, now_micros, now_secs, random_token, sha256_hex};
use custos_audit::{Agent, AuditRecord, AuditTrail, Decision, EventKind};

pub const CLIENT_KIND: &str = "client";
pub const REFRESH_KIND: &str = "refresh-token";
pub const CODE_KIND: &str = "authorization-code";
pub const TICKET_KIND: &str = "login-ticket";
pub const ASSERTION_KIND: &str = "client-assertion";
/// The public client of the `custos` command line.
pub const CLI_CLIENT: &str = "custos-cli";

/// A registered OAuth client.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Client {
    pub id: String,
    pub name: String,
    /// For SMART Backend Services: the public keys its assertions are signed with.
    #[serde(default)]
    pub jwks: Option<Value>,
    /// For SMART apps: where authorization codes may be sent.
    #[serde(default)]
    pub redirect_uris: Vec<String>,
    /// The role a backend client acts with.
    #[serde(default)]
    pub role: Option<Role>,
    /// The most a client may be granted.
    pub scope: String,
    #[serde(default)]
    pub disabled: bool,
    pub created: i64,
}

/// A new user to create. (`Debug` leaves out the password.)
#[derive(Clone, Serialize, Deserialize)]
pub struct NewUser {
    pub username: String,
    pub password: String,
    pub role: Role,
    #[serde(default)]
    pub practitioner: Option<String>,
    #[serde(default)]
    pub patient: Option<String>,
    #[serde(default)]
    pub organization: Option<String>,
}

impl std::fmt::Debug for NewUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewUser")
            .field("username", &self.username)
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

/// What an administrator may see of a user (never secrets).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct UserSummary {
    pub id: String,
    pub username: String,
    pub role: Role,
    pub practitioner: Option<String>,
    pub patient: Option<String>,
    pub organization: Option<String>,
    pub mfa: bool,
    pub locked: bool,
    pub locked_reason: Option<String>,
    pub locked_until: Option<i64>,
    pub read_only: bool,
    /// Every access to a patient needs a stated break-the-glass reason.
    #[serde(default)]
    pub require_break_glass: bool,
    pub failed_attempts: u32,
    pub last_login: Option<i64>,
}

impl From<&User> for UserSummary {
    fn from(u: &User) -> Self {
        UserSummary {
            id: u.id.clone(),
            username: u.username.clone(),
            role: u.role,
            practitioner: u.practitioner.clone(),
            patient: u.patient.clone(),
            organization: u.organization.clone(),
            mfa: u.totp_secret.is_some(),
            locked: u.locked,
            locked_reason: u.locked_reason.clone(),
            locked_until: (u.locked_until > now_secs()).then_some(u.locked_until),
            read_only: u.read_only,
            require_break_glass: u.require_break_glass,
            failed_attempts: u.failed_attempts,
            last_login: u.last_login,
        }
    }
}

/// A created user and, for MFA roles, the TOTP enrollment (shown once).
#[derive(Debug, Clone, Serialize)]
pub struct CreatedUser {
    pub user: UserSummary,
    /// `otpauth://` URL for an authenticator app.
    pub totp_url: Option<String>,
    /// The secret in base32, for manual entry.
    pub totp_secret: Option<String>,
}

/// A grant presented at the token endpoint. (`Debug` shows the kind only:
/// every grant carries a secret.)
#[derive(Clone)]
pub enum Grant {
    /// Resource-owner password with the TOTP code (the command line).
    Password {
        username: String,
        password: String,
        totp: Option<String>,
        scope: String,
        /// Launch patient for `patient/` scopes (clinicians).
        patient: Option<String>,
        break_glass: Option<String>,
    },
    /// SMART Backend Services.
    ClientCredentials {
        assertion_type: String,
        assertion: String,
        scope: String,
    },
    /// A SMART app exchanging its code.
    AuthorizationCode {
        code: String,
        redirect_uri: String,
        code_verifier: String,
        client_id: String,
    },
    RefreshToken {
        refresh_token: String,
        scope: Option<String>,
    },
}

impl std::fmt::Debug for Grant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self {
            Grant::Password { .. } => "password",
            Grant::ClientCredentials { .. } => "client_credentials",
            Grant::AuthorizationCode { .. } => "authorization_code",
            Grant::RefreshToken { .. } => "refresh_token",
        };
        write!(f, "Grant({kind}, <redacted>)")
    }
}

/// The token endpoint's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenResponse {
    pub access_token: String,
    pub token_type: String,
    pub expires_in: i64,
    pub scope: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refresh_token: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub patient: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id_token: Option<String>,
}

/// A stored refresh token (looked up by the SHA-256 of its value).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RefreshRecord {
    family: String,
    user_id: String,
    client_id: String,
    scope: String,
    patient: Option<String>,
    issued: i64,
    family_expires: i64,
    used: bool,
}

/// A pending SMART authorization request, carried through the login page.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AuthorizeRequest {
    pub client_id: String,
    pub redirect_uri: String,
    pub scope: String,
    pub state: Option<String>,
    pub code_challenge: String,
    pub code_challenge_method: String,
    pub aud: Option<String>,
    /// The launch patient chosen on the login page (clinicians).
    #[serde(default)]
    pub patient: Option<String>,
}

/// What the first step of the login page leads to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoginStep {
    /// Signed in: the authorization code for the redirect.
    Code(String),
    /// The password was right; the TOTP step follows with this ticket.
    SecondFactor(String),
}

/// A sign-in between its password and TOTP steps.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Ticket {
    user_id: String,
    request: AuthorizeRequest,
    expires: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct CodeRecord {
    user_id: String,
    request: AuthorizeRequest,
    expires: i64,
}

/// Where a request comes from, for the record.
#[derive(Debug, Clone, Default)]
pub struct Origin {
    pub source: Option<String>,
    pub user_agent: Option<String>,
}

struct VerifiedToken {
    /// The whole token, compared on a cache hit.
    token: String,
    principal: Arc<Principal>,
    exp: i64,
    iat: i64,
    sid: Option<String>,
}

/// Identity, tokens and the access policy of one Custos deployment.
pub struct AuthService {
    config: AuthConfig,
    issuer: String,
    vault: Vault,
    signer: TokenSigner,
    state: SecurityState,
    policy: Arc<Policy>,
    audit: AuditTrail,
    oidc: OidcVerifier,
    /// Verified tokens, keyed by their signature part (unforgeable and
    /// unique per token) and compared in full, in constant time, on a hit:
    /// a signature is checked once per token.
    verified: Mutex<LruCache<String, Arc<VerifiedToken>>>,
    /// Failed sign-ins under names that are no account, counted and locked
    /// out exactly as an account's are, so that the lockout answer does not
    /// tell an attacker which names exist. Keyed by the name's blind key;
    /// bounded, the least recently tried name forgotten first.
    unknown_names: Mutex<LruCache<String, UnknownName>>,
}

/// The lockout state of a name that is no account (see `unknown_names`).
#[derive(Clone, Copy, Default)]
struct UnknownName {
    failed_attempts: u32,
    locked_until: i64,
}

/// How many unknown names the lockout remembers.
const UNKNOWN_NAMES: usize = 65_536;

/// Check a password against an Argon2id hash on the blocking pool: a hash
/// costs tens of milliseconds and must not hold a runtime thread.
async fn verify_off_runtime(password: &str, hash: &str) -> bool {
    let (pw, hash) = (password.to_string(), hash.to_string());
    tokio::task::spawn_blocking(move || verify_password(&pw, &hash))
        .await
        .unwrap_or(false)
}

/// Whether a cached token is the presented one, in constant time (for
/// tokens of one length). `subtle`'s byte-slice comparison puts an
/// optimization barrier on every byte (about 0.7 µs for a bearer token, on
/// every request); with one per machine word, authentication and policy
/// took 1.4 µs (p50, `custos bench`), with one per 64-byte block 1.3 µs
/// (three alternating runs). A block's word differences are folded with
/// `|` (no branch can leave early) and only its result passes through
/// `subtle`.
fn same_token(cached: &str, presented: &str) -> bool {
    let (a, b) = (cached.as_bytes(), presented.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let word = |c: &[u8]| {
        let mut w = [0u8; 8];
        w[..c.len()].copy_from_slice(c);
        u64::from_le_bytes(w)
    };
    let mut same = subtle::Choice::from(1);
    for (x, y) in a.chunks(64).zip(b.chunks(64)) {
        let diff = x
            .chunks(8)
            .zip(y.chunks(8))
            .fold(0u64, |d, (p, q)| d | (word(p) ^ word(q)));
        same &= diff.ct_eq(&0);
    }
    bool::from(same)
}

/// The signature segment of a JWT (what the verified-token cache is keyed by).
fn signature_part(token: &str) -> &str {
    token.rsplit('.').next().unwrap_or(token)
}

impl AuthService {
    /// Open over the record service (unrestricted handle). `issuer` is the
    /// server's public base URL; tokens carry it as `iss` and `aud`.
    pub async fn open(
        records: &Records,
        config: AuthConfig,
        issuer: &str,
        audit: AuditTrail,
    ) -> Result<AuthService, AuthError> {
        let permissions = Permissions::new(&config.roles).map_err(AuthError::InvalidRequest)?;
        let vault = Vault::open(records).await?;
        let signer = TokenSigner::open(
            vault.clone(),
            config.signing_key_days * 86_400,
            config.access_token_secs * 4 + 86_400,
        )
        .await?;
        let state = SecurityState::open(vault.clone()).await?;
        let policy = Arc::new(
            Policy::new(config.clone(), permissions, records.clone(), vault.clone()).await?,
        );
        let oidc = OidcVerifier::new(&config.oidc)?;
        let svc = AuthService {
            issuer: issuer.trim_end_matches('/').to_string(),
            config,
            vault,
            signer,
            state,
            policy,
            audit,
            oidc,
            verified: Mutex::new(LruCache::new(NonZeroUsize::new(100_000).expect("non-zero"))),
            unknown_names: Mutex::new(LruCache::new(
                NonZeroUsize::new(UNKNOWN_NAMES).expect("non-zero"),
            )),
        };
        svc.ensure_cli_client().await?;
        Ok(svc)
    }

    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    pub fn token_endpoint(&self) -> String {
        format!("{}/auth/token", self.issuer)
    }

    pub fn config(&self) -> &AuthConfig {
        &self.config
    }

    pub fn policy(&self) -> &Arc<Policy> {
        &self.policy
    }

    /// The audit trail every request and security event is recorded in.
    /// The sealed system records (other services keep their state there too).
    pub fn vault(&self) -> &Vault {
        &self.vault
    }

    pub fn audit(&self) -> &AuditTrail {
        &self.audit
    }

    pub fn jwks(&self) -> Value {
        self.signer.jwks()
    }

    /// The security state now (one point read; reloads if anything changed).
    pub async fn snapshot(&self) -> Result<Arc<Snapshot>, AuthError> {
        self.state.current().await
    }

    async fn ensure_cli_client(&self) -> Result<(), AuthError> {
        if self
            .vault
            .get::<Client>(CLIENT_KIND, CLI_CLIENT)
            .await?
            .is_none()
        {
            let c = Client {
                id: CLI_CLIENT.into(),
                name: "custos command line".into(),
                jwks: None,
                redirect_uris: Vec::new(),
                role: None,
                scope: "user/*.cruds patient/*.cruds launch/patient openid fhirUser offline_access"
                    .into(),
                disabled: false,
                created: now_secs(),
            };
            match self.vault.put(CLIENT_KIND, CLI_CLIENT, &c, Some(0)).await {
                Ok(_) | Err(AuthError::Conflict) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    // ---------------------------------------------------------------- users

    fn username_key(&self, username: &str) -> String {
        self.vault
            .blind_key("username", &username.trim().to_lowercase())
    }

    async fn user_by_name(&self, username: &str) -> Result<Option<(i64, User)>, AuthError> {
        let Some((_, id)) = self
            .vault
            .get::<String>(USERNAME_KIND, &self.username_key(username))
            .await?
        else {
            return Ok(None);
        };
        self.vault.get::<User>(USER_KIND, &id).await
    }

    /// Create a user. Roles that read clinical data get a TOTP secret,
    /// returned once for enrollment.
    pub async fn add_user(&self, new: NewUser) -> Result<CreatedUser, AuthError> {
        let username = new.username.trim().to_string();
        if username.is_empty()
            || username.len() > 128
            || !username
                .chars()
                .all(|c| c.is_alphanumeric() || "._-@".contains(c))
        {
            return Err(AuthError::InvalidRequest(
                "a username is 1–128 letters, digits, '.', '_', '-' or '@'".into(),
            ));
        }
        check_password_strength(&new.password).map_err(AuthError::InvalidRequest)?;
        if new.role == Role::Service {
            return Err(AuthError::InvalidRequest(
                "systems are clients, not users: register a client with its public keys".into(),
            ));
        }
        if new.role.is_clinical() && new.practitioner.is_none() {
            return Err(AuthError::InvalidRequest(format!(
                "a {} must be linked to a Practitioner (--practitioner)",
                new.role
            )));
        }
        if new.role == Role::Patient && new.patient.is_none() {
            return Err(AuthError::InvalidRequest(
                "a patient user must be linked to a Patient (--patient)".into(),
            ));
        }
        for id in [&new.practitioner, &new.patient, &new.organization]
            .into_iter()
            .flatten()
        {
            if !custos_fhir::types::is_valid_id(id) {
                return Err(AuthError::InvalidRequest(format!(
                    "'{id}' is not a valid id"
                )));
            }
        }
        let mfa = self.policy.permissions().of(new.role).mfa;
        let secret = mfa.then(new_totp_secret);
        let user = User {
            id: custos_records::new_id(),
            username: username.clone(),
            role: new.role,
            practitioner: new.practitioner,
            patient: new.patient,
            organization: new.organization,
            password_hash: hash_password(&new.password),
            totp_secret: secret.as_ref().map(|s| s.to_vec()),
            totp_last_step: 0,
            failed_attempts: 0,
            locked: false,
            locked_reason: None,
            locked_until: 0,
            read_only: false,
            require_break_glass: false,
            tokens_valid_after: 0,
            created: now_secs(),
            last_login: None,
        };
        let name_key = self.username_key(&username);
        let (u, nk) = (user.clone(), name_key.clone());
        self.vault
            .write(move |tx, v| {
                let sealed_name = v.seal(USERNAME_KIND, &nk, &u.id);
                match tx.sys_put(USERNAME_KIND, &nk, &sealed_name, Some(0)) {
                    Ok(_) => {}
                    Err(custos_store::StoreError::Conflict { .. }) => {
                        return Err(AuthError::InvalidRequest("that username is taken".into()));
                    }
                    Err(e) => return Err(backend(e)),
                }
                tx.sys_put(USER_KIND, &u.id, &v.seal(USER_KIND, &u.id, &u), Some(0))
                    .map_err(backend)?;
                bump_epoch(tx)
            })
            .await?;
        self.audit_admin("user-add", None, true).await?;
        Ok(CreatedUser {
            user: UserSummary::from(&user),
            totp_url: secret.as_ref().map(|s| totp_url(s, &username)),
            totp_secret: secret.as_ref().map(|s| crate::users::totp_base32(s)),
        })
    }

    pub async fn list_users(&self) -> Result<Vec<UserSummary>, AuthError> {
        let mut users: Vec<UserSummary> = self
            .vault
            .list::<User>(USER_KIND)
            .await?
            .iter()
            .map(|(_, _, u)| UserSummary::from(u))
            .collect();
        users.sort_by(|a, b| a.username.cmp(&b.username));
        Ok(users)
    }

    pub async fn user(&self, username: &str) -> Result<UserSummary, AuthError> {
        self.user_by_name(username)
            .await?
            .map(|(_, u)| UserSummary::from(&u))
            .ok_or_else(|| AuthError::NotFound(format!("no user '{username}'")))
    }

    /// Read-modify-write of one user, bumping the security epoch.
    async fn update_user(
        &self,
        username: &str,
        f: impl Fn(&mut User) + Send + Sync + 'static,
    ) -> Result<User, AuthError> {
        let f = Arc::new(f);
        for _ in 0..5 {
            let (version, mut user) = self
                .user_by_name(username)
                .await?
                .ok_or_else(|| AuthError::NotFound(format!("no user '{username}'")))?;
            f(&mut user);
            let u = user.clone();
            let r = self
                .vault
                .write(move |tx, v| {
                    tx.sys_put(
                        USER_KIND,
                        &u.id,
                        &v.seal(USER_KIND, &u.id, &u),
                        Some(version),
                    )
                    .map_err(|e| match e {
                        custos_store::StoreError::Conflict { .. } => AuthError::Conflict,
                        e => backend(e),
                    })?;
                    bump_epoch(tx)
                })
                .await;
            match r {
                Ok(()) => return Ok(user),
                Err(AuthError::Conflict) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(AuthError::Conflict)
    }

    /// Lock an account: sign-in and every token of it are refused from the next request.
    pub async fn lock_user(&self, username: &str, reason: &str) -> Result<(), AuthError> {
        let reason = reason.to_string();
        // Every token issued until now is revoked with the lock, so that
        // unlocking does not bring them back.
        let after = now_secs() + 1;
        self.update_user(username, move |u| {
            u.locked = true;
            u.locked_reason = Some(reason.clone());
            u.tokens_valid_after = u.tokens_valid_after.max(after);
        })
        .await?;
        self.audit_admin("user-lock", Some(username), true).await?;
        Ok(())
    }

    pub async fn unlock_user(&self, username: &str) -> Result<(), AuthError> {
        self.update_user(username, |u| {
            u.locked = false;
            u.locked_reason = None;
            u.locked_until = 0;
            u.failed_attempts = 0;
        })
        .await?;
        self.audit_admin("user-unlock", Some(username), true)
            .await?;
        Ok(())
    }

    pub async fn set_role(&self, username: &str, role: Role) -> Result<(), AuthError> {
        if role == Role::Service {
            return Err(AuthError::InvalidRequest(
                "systems are clients, not users".into(),
            ));
        }
        let current = self.user(username).await?;
        if role.is_clinical() && current.practitioner.is_none() {
            return Err(AuthError::InvalidRequest(format!(
                "a {role} must be linked to a Practitioner"
            )));
        }
        if role == Role::Patient && current.patient.is_none() {
            return Err(AuthError::InvalidRequest(
                "a patient user must be linked to a Patient".into(),
            ));
        }
        if self.policy.permissions().of(role).mfa && !current.mfa {
            return Err(AuthError::InvalidRequest(format!(
                "the role {role} requires multi-factor authentication; this user has no TOTP enrolled"
            )));
        }
        self.update_user(username, move |u| u.role = role).await?;
        self.audit_admin("user-set-role", Some(username), true)
            .await?;
        Ok(())
    }

    /// Revoke every token of a user (access and refresh) issued until now.
    pub async fn revoke_user_tokens(&self, username: &str) -> Result<(), AuthError> {
        // Tokens carry whole seconds; one second past now refuses every
        // token issued up to this instant.
        let after = now_secs() + 1;
        self.update_user(username, move |u| u.tokens_valid_after = after)
            .await?;
        self.audit_admin("user-revoke-tokens", Some(username), true)
            .await?;
        Ok(())
    }

    pub async fn set_user_read_only(&self, username: &str, on: bool) -> Result<(), AuthError> {
        self.update_user(username, move |u| u.read_only = on)
            .await?;
        self.audit_admin("user-read-only", Some(username), true)
            .await?;
        Ok(())
    }

    /// Require (or stop requiring) a break-the-glass reason for every access
    /// of a user to a patient.
    pub async fn set_user_require_break_glass(
        &self,
        username: &str,
        on: bool,
    ) -> Result<(), AuthError> {
        self.update_user(username, move |u| u.require_break_glass = on)
            .await?;
        self.audit_admin("user-require-break-glass", Some(username), true)
            .await?;
        Ok(())
    }

    /// Lock, revoke or restrict a principal that is not a local user
    /// (`client:{id}` or `oidc:{issuer}#{subject}`).
    pub async fn control_principal(
        &self,
        subject: &str,
        f: impl Fn(&mut PrincipalControl) + Send + 'static,
    ) -> Result<(), AuthError> {
        let key = subject.to_string();
        self.vault
            .write(move |tx, v| {
                let mut c: PrincipalControl =
                    match tx.sys_get(CONTROL_KIND, &key).map_err(backend)? {
                        Some(r) => v.open_record(&r)?,
                        None => PrincipalControl::default(),
                    };
                f(&mut c);
                tx.sys_put(CONTROL_KIND, &key, &v.seal(CONTROL_KIND, &key, &c), None)
                    .map_err(backend)?;
                bump_epoch(tx)
            })
            .await?;
        self.audit_admin("principal-control", Some(subject), true)
            .await?;
        Ok(())
    }

    /// Switch the whole server (every node) to read-only, or back.
    pub async fn set_server_read_only(
        &self,
        on: bool,
        reason: Option<String>,
    ) -> Result<(), AuthError> {
        let mode = ReadOnlyMode {
            on,
            reason,
            since: now_secs(),
        };
        self.vault
            .write(move |tx, v| {
                tx.sys_put(
                    SETTING_KIND,
                    READ_ONLY_KEY,
                    &v.seal(SETTING_KIND, READ_ONLY_KEY, &mode),
                    None,
                )
                .map_err(backend)?;
                bump_epoch(tx)
            })
            .await?;
        self.audit_admin("server-read-only", None, true).await?;
        Ok(())
    }

    // -------------------------------------------------------------- clients

    /// Register (or replace) a client.
    pub async fn register_client(&self, mut client: Client) -> Result<Client, AuthError> {
        if client.id.is_empty()
            || client.id.len() > 128
            || !client
                .id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
        {
            return Err(AuthError::InvalidRequest(
                "a client id is 1–128 ASCII letters, digits, '.', '_' or '-'".into(),
            ));
        }
        if let Some(jwks) = &client.jwks {
            let set: JwkSet = serde_json::from_value(jwks.clone())
                .map_err(|_| AuthError::InvalidRequest("jwks is not a JWK Set".into()))?;
            if set.keys.is_empty() {
                return Err(AuthError::InvalidRequest("jwks holds no key".into()));
            }
            for k in &set.keys {
                if matches!(
                    k.algorithm,
                    jsonwebtoken::jwk::AlgorithmParameters::OctetKey(_)
                ) {
                    return Err(AuthError::InvalidRequest(
                        "client keys must be public keys (RSA, EC or OKP)".into(),
                    ));
                }
            }
            if client.role.is_none() {
                client.role = Some(Role::Service);
            }
        } else if client.redirect_uris.is_empty() {
            return Err(AuthError::InvalidRequest(
                "a client needs either a JWKS (backend service) or redirect URIs (SMART app)"
                    .into(),
            ));
        }
        let scopes = Scopes::parse(&client.scope);
        if !scopes.dropped.is_empty() {
            return Err(AuthError::InvalidRequest(format!(
                "unsupported scopes: {}",
                scopes.dropped.join(" ")
            )));
        }
        client.created = now_secs();
        self.vault
            .put(CLIENT_KIND, &client.id, &client, None)
            .await?;
        self.audit_admin("client-register", Some(&client.id), true)
            .await?;
        Ok(client)
    }

    pub async fn client(&self, id: &str) -> Result<Option<Client>, AuthError> {
        Ok(self
            .vault
            .get::<Client>(CLIENT_KIND, id)
            .await?
            .map(|(_, c)| c))
    }

    pub async fn list_clients(&self) -> Result<Vec<Client>, AuthError> {
        Ok(self
            .vault
            .list::<Client>(CLIENT_KIND)
            .await?
            .into_iter()
            .map(|(_, _, c)| c)
            .collect())
    }

    // ---------------------------------------------------------------- login

    /// Check a password and, where the role requires it, a TOTP code.
    /// Every failure counts towards the lockout; unknown users cost the same time.
    pub async fn check_credentials(
        &self,
        username: &str,
        password: &str,
        totp: Option<&str>,
        origin: &Origin,
    ) -> Result<User, AuthError> {
        let (version, user) = self.password_step(username, password, origin).await?;
        self.second_factor_step(version, user, totp, origin).await
    }

    /// Whether the user's role requires a second factor (or they enrolled one).
    fn needs_second_factor(&self, user: &User) -> bool {
        self.policy.permissions().of(user.role).mfa || user.totp_secret.is_some()
    }

    /// The first step of sign-in: the account exists, is not locked, and the password is right.
    async fn password_step(
        &self,
        username: &str,
        password: &str,
        origin: &Origin,
    ) -> Result<(i64, User), AuthError> {
        let found = self.user_by_name(username).await?;
        let now = now_secs();
        let (version, user) = match found {
            Some(f) => f,
            None => {
                verify_off_runtime(password, dummy_hash()).await;
                let locked = self.count_unknown_failure(username, now);
                let rule = if locked {
                    "unknown-user-locked"
                } else {
                    "unknown-user"
                };
                self.audit_login(None, "password", false, rule, origin)
                    .await?;
                return Err(if locked {
                    AuthError::Locked
                } else {
                    AuthError::InvalidGrant("invalid username or password".into())
                });
            }
        };
        if user.is_locked(now) {
            verify_off_runtime(password, dummy_hash()).await;
            self.audit_login(Some(&user), "password", false, "locked", origin)
                .await?;
            return Err(AuthError::Locked);
        }
        let pw_ok = verify_off_runtime(password, &user.password_hash).await;
        if !pw_ok {
            self.count_failure(&user, origin, "password").await?;
            return Err(AuthError::InvalidGrant(
                "invalid username or password".into(),
            ));
        }
        Ok((version, user))
    }

    /// The second step of sign-in: the TOTP code (where the role requires
    /// one), then the account's sign-in state is saved.
    async fn second_factor_step(
        &self,
        version: i64,
        user: User,
        totp: Option<&str>,
        origin: &Origin,
    ) -> Result<User, AuthError> {
        let now = now_secs();
        let mut step = user.totp_last_step;
        if self.needs_second_factor(&user) {
            let Some(secret) = &user.totp_secret else {
                self.audit_login(Some(&user), "totp", false, "mfa-not-enrolled", origin)
                    .await?;
                return Err(AuthError::InvalidGrant(
                    "this account needs a TOTP enrollment; ask an administrator".into(),
                ));
            };
            let Some(code) = totp.filter(|c| !c.trim().is_empty()) else {
                return Err(AuthError::InvalidGrant("a TOTP code is required".into()));
            };
            match check_totp(secret, code, now as u64, user.totp_last_step) {
                Some(s) => step = s,
                None => {
                    self.count_failure(&user, origin, "totp").await?;
                    return Err(AuthError::InvalidGrant("invalid TOTP code".into()));
                }
            }
        }
        let mut u = user.clone();
        u.failed_attempts = 0;
        u.totp_last_step = step;
        u.last_login = Some(now);
        let id = u.id.clone();
        let uu = u.clone();
        let saved = self
            .vault
            .write(move |tx, v| {
                tx.sys_put(USER_KIND, &id, &v.seal(USER_KIND, &id, &uu), Some(version))
                    .map_err(|e| match e {
                        custos_store::StoreError::Conflict { .. } => AuthError::Conflict,
                        e => backend(e),
                    })
            })
            .await;
        match saved {
            Ok(_) => {}
            // A concurrent sign-in used the same record: refuse rather
            // than let one TOTP code count twice.
            Err(AuthError::Conflict) => {
                return Err(AuthError::InvalidGrant(
                    "concurrent sign-in; try again".into(),
                ));
            }
            Err(e) => return Err(e),
        }
        self.audit_login(Some(&u), "login", true, "credentials", origin)
            .await?;
        Ok(u)
    }

    /// A failed sign-in under a name that is no account, counted as
    /// `count_failure` counts an account's: whether the name is locked out
    /// (already, in which case nothing is counted, as for a locked account).
    /// The state lives in this process only; it is not a security boundary
    /// (an unknown name opens nothing), only the same answer as an account.
    fn count_unknown_failure(&self, username: &str, now: i64) -> bool {
        let key = self.username_key(username);
        let mut names = self.unknown_names.lock();
        let name = names.get_or_insert_mut(key, UnknownName::default);
        if name.locked_until > now {
            return true;
        }
        self.config
            .lockout()
            .count(&mut name.failed_attempts, &mut name.locked_until, now);
        false
    }

    /// Count one failed attempt. The read, the count and the write happen
    /// in one job on the store's single writer, so parallel guesses each
    /// count (none is lost to a race).
    async fn count_failure(
        &self,
        user: &User,
        origin: &Origin,
        what: &str,
    ) -> Result<(), AuthError> {
        let id = user.id.clone();
        let lockout = self.config.lockout();
        let (u, locked_now) = self
            .vault
            .write(move |tx, v| {
                let rec = tx
                    .sys_get(USER_KIND, &id)
                    .map_err(backend)?
                    .ok_or_else(|| AuthError::NotFound("user".into()))?;
                let mut u: User = v.open_record(&rec)?;
                let lock = lockout.count(&mut u.failed_attempts, &mut u.locked_until, now_secs());
                tx.sys_put(
                    USER_KIND,
                    &id,
                    &v.seal(USER_KIND, &id, &u),
                    Some(rec.version),
                )
                .map_err(backend)?;
                // No epoch bump: a lockout stops sign-in, which reads the
                // account itself; tokens already issued are not affected.
                Ok((u, lock))
            })
            .await?;
        let rule = if locked_now {
            format!("{what}-failed-locked")
        } else {
            format!("{what}-failed")
        };
        self.audit_login(Some(&u), what, false, &rule, origin)
            .await?;
        if locked_now {
            tracing::warn!("account locked after repeated failed sign-ins");
        }
        Ok(())
    }

    // --------------------------------------------------------------- tokens

    /// The token endpoint.
    pub async fn token(&self, grant: Grant, origin: &Origin) -> Result<TokenResponse, AuthError> {
        let r = match grant {
            Grant::Password {
                username,
                password,
                totp,
                scope,
                patient,
                break_glass,
            } => {
                let user = self
                    .check_credentials(&username, &password, totp.as_deref(), origin)
                    .await?;
                let scopes =
                    Scopes::parse(&scope).restrict_contexts(&[Context::User, Context::Patient]);
                let client = self.client(CLI_CLIENT).await?;
                let scopes = within_client(scopes, client.as_ref())?;
                self.issue_for_user(&user, CLI_CLIENT, scopes, patient, None, break_glass)
                    .await
            }
            Grant::ClientCredentials {
                assertion_type,
                assertion,
                scope,
            } => {
                self.client_credentials(&assertion_type, &assertion, &scope, origin)
                    .await
            }
            Grant::AuthorizationCode {
                code,
                redirect_uri,
                code_verifier,
                client_id,
            } => {
                self.exchange_code(&code, &redirect_uri, &code_verifier, &client_id)
                    .await
            }
            Grant::RefreshToken {
                refresh_token,
                scope,
            } => self.refresh(&refresh_token, scope.as_deref()).await,
        };
        if let Err(e) = &r {
            self.audit_event("token", None, false, &format!("{e}"), origin)
                .await?;
        }
        r
    }

    async fn issue_for_user(
        &self,
        user: &User,
        client_id: &str,
        scopes: Scopes,
        patient: Option<String>,
        family: Option<(String, i64)>,
        break_glass: Option<String>,
    ) -> Result<TokenResponse, AuthError> {
        let launch_patient = if scopes.launch_patient
            || scopes
                .resources
                .iter()
                .any(|r| r.context == Context::Patient)
        {
            match user.role {
                Role::Patient => user.patient.clone(),
                _ => patient.filter(|p| custos_fhir::types::is_valid_id(p)),
            }
        } else {
            None
        };
        if scopes
            .resources
            .iter()
            .any(|r| r.context == Context::Patient)
            && launch_patient.is_none()
        {
            return Err(AuthError::InvalidRequest(
                "patient/ scopes need a launch patient (the 'patient' parameter)".into(),
            ));
        }
        if scopes.resources.is_empty() {
            return Err(AuthError::InvalidRequest(
                "no resource scope requested (for example user/*.rs)".into(),
            ));
        }
        let now = now_secs();
        let wants_refresh = scopes.offline_access || scopes.online_access;
        let family = match family {
            Some(f) => Some(f),
            None if wants_refresh => Some((
                custos_records::new_id(),
                now + self.config.refresh_token_days * 86_400,
            )),
            None => None,
        };
        let fhir_user = match (&user.practitioner, &user.patient) {
            (Some(p), _) => Some(format!("Practitioner/{p}")),
            (_, Some(p)) => Some(format!("Patient/{p}")),
            _ => None,
        };
        let claims = Claims {
            iss: self.issuer.clone(),
            sub: user.id.clone(),
            aud: self.issuer.clone(),
            exp: now + self.config.access_token_secs,
            nbf: now,
            iat: now,
            jti: random_token(16),
            scope: scopes.granted_string(),
            client_id: client_id.to_string(),
            role: user.role.name().to_string(),
            patient: launch_patient.clone(),
            sid: family.as_ref().map(|(f, _)| f.clone()),
            btg: break_glass.filter(|b| !b.trim().is_empty()),
            fhir_user: fhir_user.clone(),
        };
        let access_token = self.signer.sign(&claims)?;
        let refresh_token = match &family {
            Some((fam, expires)) => {
                let token = random_token(32);
                let rec = RefreshRecord {
                    family: fam.clone(),
                    user_id: user.id.clone(),
                    client_id: client_id.to_string(),
                    scope: scopes.granted_string(),
                    patient: launch_patient.clone(),
                    issued: now,
                    family_expires: *expires,
                    used: false,
                };
                self.vault
                    .put(REFRESH_KIND, &sha256_hex(&token), &rec, Some(0))
                    .await?;
                Some(token)
            }
            None => None,
        };
        let id_token = if scopes.openid && scopes.fhir_user {
            Some(self.signer.sign(&json!({
                "iss": self.issuer, "sub": user.id, "aud": client_id,
                "exp": now + self.config.access_token_secs, "iat": now,
                "fhirUser": fhir_user.map(|f| format!("{}/{f}", self.issuer)),
            }))?)
        } else {
            None
        };
        Ok(TokenResponse {
            access_token,
            token_type: "Bearer".into(),
            expires_in: self.config.access_token_secs,
            scope: scopes.granted_string(),
            refresh_token,
            patient: launch_patient,
            id_token,
        })
    }

    async fn client_credentials(
        &self,
        assertion_type: &str,
        assertion: &str,
        scope: &str,
        origin: &Origin,
    ) -> Result<TokenResponse, AuthError> {
        if assertion_type != "urn:ietf:params:oauth:client-assertion-type:jwt-bearer" {
            return Err(AuthError::InvalidClient(
                "client_assertion_type must be urn:ietf:params:oauth:client-assertion-type:jwt-bearer".into(),
            ));
        }
        let header = jsonwebtoken::decode_header(assertion)
            .map_err(|_| AuthError::InvalidClient("malformed client assertion".into()))?;
        const ALLOWED: [Algorithm; 6] = [
            Algorithm::RS384,
            Algorithm::ES384,
            Algorithm::RS256,
            Algorithm::ES256,
            Algorithm::PS384,
            Algorithm::EdDSA,
        ];
        if !ALLOWED.contains(&header.alg) {
            return Err(AuthError::InvalidClient(
                "unsupported assertion algorithm".into(),
            ));
        }
        let client_id = unverified_claim(assertion, "iss")
            .ok_or_else(|| AuthError::InvalidClient("the assertion names no client".into()))?;
        let client = self
            .client(&client_id)
            .await?
            .filter(|c| !c.disabled)
            .ok_or_else(|| AuthError::InvalidClient("unknown client".into()))?;
        let jwks: JwkSet = client
            .jwks
            .clone()
            .and_then(|j| serde_json::from_value(j).ok())
            .ok_or_else(|| AuthError::InvalidClient("the client has no registered keys".into()))?;
        let jwk = match &header.kid {
            Some(kid) => jwks.find(kid).cloned(),
            None if jwks.keys.len() == 1 => jwks.keys.first().cloned(),
            None => None,
        }
        .ok_or_else(|| AuthError::InvalidClient("the assertion's key is not registered".into()))?;
        let key = DecodingKey::from_jwk(&jwk)
            .map_err(|_| AuthError::InvalidClient("unusable client key".into()))?;
        let mut v = Validation::new(header.alg);
        v.leeway = 5;
        v.validate_nbf = true;
        v.set_issuer(&[&client.id]);
        v.set_audience(&[self.token_endpoint()]);
        v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        let claims: Value = jsonwebtoken::decode::<Value>(assertion, &key, &v)
            .map_err(|e| {
                AuthError::InvalidClient(format!(
                    "client assertion refused: {}",
                    crate::tokens::token_error(&e)
                ))
            })?
            .claims;
        let now = now_secs();
        let exp = claims.get("exp").and_then(Value::as_i64).unwrap_or(0);
        if claims.get("sub").and_then(Value::as_str) != Some(client.id.as_str()) {
            return Err(AuthError::InvalidClient(
                "assertion sub must be the client id".into(),
            ));
        }
        if exp > now + 300 {
            return Err(AuthError::InvalidClient(
                "client assertions may live at most five minutes".into(),
            ));
        }
        let jti = claims
            .get("jti")
            .and_then(Value::as_str)
            .filter(|j| !j.is_empty() && j.len() <= 256)
            .ok_or_else(|| AuthError::InvalidClient("the assertion needs a jti".into()))?;
        // One use per assertion: its jti is remembered until it expires.
        let key = sha256_hex(&format!("{}|{jti}", client.id));
        match self.vault.put(ASSERTION_KIND, &key, &exp, Some(0)).await {
            Ok(_) => {}
            Err(AuthError::Conflict) => {
                return Err(AuthError::InvalidClient("client assertion replayed".into()));
            }
            Err(e) => return Err(e),
        }
        let scopes = Scopes::parse(scope).restrict_contexts(&[Context::System]);
        let scopes = within_client(scopes, Some(&client))?;
        if scopes.resources.is_empty() {
            return Err(AuthError::InvalidRequest(
                "no system/ scope requested within the client's registration".into(),
            ));
        }
        let role = client.role.unwrap_or(Role::Service);
        let claims = Claims {
            iss: self.issuer.clone(),
            sub: format!("client:{}", client.id),
            aud: self.issuer.clone(),
            exp: now + self.config.access_token_secs,
            nbf: now,
            iat: now,
            jti: random_token(16),
            scope: scopes.granted_string(),
            client_id: client.id.clone(),
            role: role.name().into(),
            patient: None,
            sid: None,
            btg: None,
            fhir_user: None,
        };
        self.audit_event(
            "token",
            Some(&format!("client:{}", client.id)),
            true,
            "client-credentials",
            origin,
        )
        .await?;
        Ok(TokenResponse {
            access_token: self.signer.sign(&claims)?,
            token_type: "Bearer".into(),
            expires_in: self.config.access_token_secs,
            scope: scopes.granted_string(),
            refresh_token: None,
            patient: None,
            id_token: None,
        })
    }

    async fn refresh(&self, token: &str, scope: Option<&str>) -> Result<TokenResponse, AuthError> {
        let key = sha256_hex(token);
        let k2 = key.clone();
        let narrower = scope.map(str::to_string);
        let now = now_secs();
        // Mark used in one job; a second use finds it used and burns the family.
        let rec: RefreshRecord = self
            .vault
            .write(move |tx, v| {
                let Some(r) = tx.sys_get(REFRESH_KIND, &k2).map_err(backend)? else {
                    return Err(AuthError::InvalidGrant("unknown refresh token".into()));
                };
                let mut rec: RefreshRecord = v.open_record(&r)?;
                if let Some(narrower) = &narrower
                    && Scopes::parse(narrower)
                        .within(&Scopes::parse(&rec.scope))
                        .resources
                        .is_empty()
                {
                    // Refused before the token is spent: the client keeps its session.
                    return Err(AuthError::InvalidRequest(
                        "a refresh may narrow the granted scopes, never widen them".into(),
                    ));
                }
                if rec.used {
                    tx.sys_put(
                        FAMILY_KIND,
                        &rec.family,
                        &v.seal(FAMILY_KIND, &rec.family, &true),
                        None,
                    )
                    .map_err(backend)?;
                    bump_epoch(tx)?;
                    return Ok(Err(rec));
                }
                rec.used = true;
                tx.sys_put(
                    REFRESH_KIND,
                    &k2,
                    &v.seal(REFRESH_KIND, &k2, &rec),
                    Some(r.version),
                )
                .map_err(backend)?;
                Ok(Ok(rec))
            })
            .await?
            .map_err(|_| {
                tracing::warn!(
                    "a rotated refresh token was presented again; its family is revoked"
                );
                AuthError::InvalidGrant("refresh token already used; the session is revoked".into())
            })?;
        let snap = self.snapshot().await?;
        if snap.revoked_families.contains(&rec.family) {
            return Err(AuthError::InvalidGrant("the session was revoked".into()));
        }
        if rec.family_expires <= now {
            return Err(AuthError::InvalidGrant(
                "the session expired; sign in again".into(),
            ));
        }
        let user = snap
            .users
            .get(&rec.user_id)
            .cloned()
            .ok_or_else(|| AuthError::InvalidGrant("the account no longer exists".into()))?;
        if user.locked || rec.issued < user.tokens_valid_after {
            return Err(AuthError::InvalidGrant(
                "the account's tokens were revoked".into(),
            ));
        }
        let client = self.client(&rec.client_id).await?;
        if client.as_ref().is_none_or(|c| c.disabled) {
            return Err(AuthError::InvalidGrant(
                "the client is no longer registered or enabled".into(),
            ));
        }
        let mut scopes = Scopes::parse(&rec.scope);
        if let Some(narrower) = scope {
            // A refresh may narrow the grant, never widen it.
            let asked = Scopes::parse(narrower);
            let limit = Scopes::parse(&rec.scope);
            scopes = asked.within(&limit);
            scopes.offline_access |= limit.offline_access;
        }
        self.issue_for_user(
            &user,
            &rec.client_id,
            scopes,
            rec.patient.clone(),
            Some((rec.family.clone(), rec.family_expires)),
            None,
        )
        .await
    }

    // --------------------------------------------- authorization code + PKCE

    /// Check a SMART authorization request before showing the login page.
    pub async fn check_authorize(&self, req: &AuthorizeRequest) -> Result<Client, AuthError> {
        let client = self
            .client(&req.client_id)
            .await?
            .filter(|c| !c.disabled)
            .ok_or_else(|| AuthError::InvalidClient("unknown client".into()))?;
        if !client.redirect_uris.iter().any(|u| u == &req.redirect_uri) {
            return Err(AuthError::InvalidRequest(
                "redirect_uri is not registered for this client".into(),
            ));
        }
        if req.code_challenge_method != "S256" || req.code_challenge.len() < 43 {
            return Err(AuthError::InvalidRequest(
                "PKCE with code_challenge_method=S256 is required".into(),
            ));
        }
        if let Some(aud) = &req.aud
            && aud.trim_end_matches('/') != self.issuer
        {
            return Err(AuthError::InvalidRequest(
                "aud is not this FHIR server".into(),
            ));
        }
        Ok(client)
    }

    /// Step one of the login page: the password (and the TOTP code, if the
    /// form carried it). Answers with an authorization code when sign-in is
    /// complete, or with a ticket for the TOTP step.
    pub async fn login_password(
        &self,
        req: &AuthorizeRequest,
        username: &str,
        password: &str,
        totp: Option<&str>,
        origin: &Origin,
    ) -> Result<LoginStep, AuthError> {
        self.check_authorize(req).await?;
        let (version, user) = self.password_step(username, password, origin).await?;
        let has_code = totp.is_some_and(|c| !c.trim().is_empty());
        if self.needs_second_factor(&user) && !has_code {
            let ticket = random_token(32);
            let rec = Ticket {
                user_id: user.id.clone(),
                request: req.clone(),
                expires: now_secs() + 300,
            };
            self.vault
                .put(TICKET_KIND, &sha256_hex(&ticket), &rec, Some(0))
                .await?;
            return Ok(LoginStep::SecondFactor(ticket));
        }
        let user = self.second_factor_step(version, user, totp, origin).await?;
        Ok(LoginStep::Code(self.new_code(&user, req).await?))
    }

    /// Step two of the login page: the TOTP code for a ticket from step one.
    /// Wrong codes count towards the account's lockout; the ticket is good
    /// for five minutes and is spent by success.
    pub async fn login_second_factor(
        &self,
        ticket: &str,
        totp: &str,
        origin: &Origin,
    ) -> Result<(AuthorizeRequest, String), AuthError> {
        let key = sha256_hex(ticket);
        let (_, t) = self
            .vault
            .get::<Ticket>(TICKET_KIND, &key)
            .await?
            .ok_or_else(|| AuthError::InvalidGrant("the sign-in expired; start again".into()))?;
        if t.expires <= now_secs() {
            return Err(AuthError::InvalidGrant(
                "the sign-in expired; start again".into(),
            ));
        }
        self.check_authorize(&t.request).await?;
        let (version, user) = self
            .vault
            .get::<User>(USER_KIND, &t.user_id)
            .await?
            .ok_or_else(|| AuthError::InvalidGrant("the account no longer exists".into()))?;
        if user.is_locked(now_secs()) {
            self.audit_login(Some(&user), "totp", false, "locked", origin)
                .await?;
            return Err(AuthError::Locked);
        }
        let user = self
            .second_factor_step(version, user, Some(totp), origin)
            .await?;
        let k = key.clone();
        let spent = self
            .vault
            .write(move |tx, _| tx.sys_delete(TICKET_KIND, &k).map_err(backend))
            .await?;
        if !spent {
            return Err(AuthError::InvalidGrant(
                "the sign-in was already completed".into(),
            ));
        }
        let code = self.new_code(&user, &t.request).await?;
        Ok((t.request, code))
    }

    async fn new_code(&self, user: &User, req: &AuthorizeRequest) -> Result<String, AuthError> {
        let code = random_token(32);
        let rec = CodeRecord {
            user_id: user.id.clone(),
            request: req.clone(),
            expires: now_secs() + 60,
        };
        self.vault
            .put(CODE_KIND, &sha256_hex(&code), &rec, Some(0))
            .await?;
        Ok(code)
    }

    async fn exchange_code(
        &self,
        code: &str,
        redirect_uri: &str,
        verifier: &str,
        client_id: &str,
    ) -> Result<TokenResponse, AuthError> {
        let key = sha256_hex(code);
        // One use: the code is deleted by the exchange that reads it.
        let k2 = key.clone();
        let rec: CodeRecord = self
            .vault
            .write(move |tx, v| {
                let Some(r) = tx.sys_get(CODE_KIND, &k2).map_err(backend)? else {
                    return Err(AuthError::InvalidGrant(
                        "unknown or used authorization code".into(),
                    ));
                };
                tx.sys_delete(CODE_KIND, &k2).map_err(backend)?;
                v.open_record(&r)
            })
            .await?;
        if rec.expires <= now_secs() {
            return Err(AuthError::InvalidGrant(
                "the authorization code expired".into(),
            ));
        }
        if rec.request.client_id != client_id || rec.request.redirect_uri != redirect_uri {
            return Err(AuthError::InvalidGrant(
                "the code was issued to another client or redirect".into(),
            ));
        }
        let challenge = URL_SAFE_NO_PAD
            .encode(ring::digest::digest(&ring::digest::SHA256, verifier.as_bytes()).as_ref());
        if !bool::from(
            challenge
                .as_bytes()
                .ct_eq(rec.request.code_challenge.as_bytes()),
        ) {
            return Err(AuthError::InvalidGrant("PKCE verification failed".into()));
        }
        let snap = self.snapshot().await?;
        let user = snap
            .users
            .get(&rec.user_id)
            .cloned()
            .ok_or_else(|| AuthError::InvalidGrant("the account no longer exists".into()))?;
        // Issued 60 s before it expires; refused if the account was locked
        // or its tokens revoked since.
        if user.locked || rec.expires - 60 < user.tokens_valid_after {
            return Err(AuthError::InvalidGrant(
                "the account's sign-ins were revoked".into(),
            ));
        }
        let client = self.client(client_id).await?;
        let scopes =
            Scopes::parse(&rec.request.scope).restrict_contexts(&[Context::User, Context::Patient]);
        let scopes = within_client(scopes, client.as_ref())?;
        self.issue_for_user(
            &user,
            client_id,
            scopes,
            rec.request.patient.clone(),
            None,
            None,
        )
        .await
    }

    // ------------------------------------------------------- authentication

    /// The principal of a token whose signature was verified (it is in the
    /// verified-token cache): `(subject, username, role)`. For the record of
    /// a refusal after a revocation or a lock, which names who presented it.
    pub fn verified_subject(&self, token: &str) -> Option<(String, Option<String>, String)> {
        let key = signature_part(token);
        let v = self
            .verified
            .lock()
            .get(key)
            .filter(|v| same_token(&v.token, token))
            .cloned()?;
        let p = &v.principal;
        Some((
            p.subject(),
            p.username().map(str::to_string),
            p.role.name().to_string(),
        ))
    }

    /// Authenticate a bearer token: signature (once per token, then cached),
    /// issuer, audience, lifetime, and — on every request — the security
    /// state: account locked, tokens revoked, session revoked, role now.
    pub async fn authenticate(
        &self,
        token: &str,
    ) -> Result<(Arc<Principal>, Arc<Snapshot>), AuthError> {
        let snap = self.snapshot().await?;
        let now = now_secs();
        let key = signature_part(token);
        let cached = self
            .verified
            .lock()
            .get(key)
            .filter(|v| same_token(&v.token, token))
            .cloned();
        let verified = match cached {
            Some(v) if v.exp > now - 5 => v,
            Some(_) => {
                self.verified.lock().pop(key);
                return Err(AuthError::InvalidToken("token refused: expired".into()));
            }
            None => {
                let v = Arc::new(self.verify_fresh(token, &snap).await?);
                self.verified.lock().put(key.to_string(), v.clone());
                v
            }
        };
        // What may have changed since the token was issued.
        if let Some(sid) = &verified.sid
            && snap.revoked_families.contains(sid)
        {
            return Err(AuthError::InvalidToken("the session was revoked".into()));
        }
        match &verified.principal.kind {
            PrincipalKind::User { id, .. } => {
                let user = snap.users.get(id).ok_or_else(|| {
                    AuthError::InvalidToken("the account no longer exists".into())
                })?;
                if user.locked {
                    return Err(AuthError::InvalidToken("the account is locked".into()));
                }
                if verified.iat < user.tokens_valid_after {
                    return Err(AuthError::InvalidToken("the token was revoked".into()));
                }
                if user.role != verified.principal.role
                    || user.read_only != verified.principal.read_only
                    || user.require_break_glass != verified.principal.require_break_glass
                {
                    let mut p = (*verified.principal).clone();
                    p.role = user.role;
                    p.read_only = user.read_only;
                    p.require_break_glass = user.require_break_glass;
                    return Ok((Arc::new(p), snap));
                }
            }
            PrincipalKind::Client { .. } | PrincipalKind::External { .. } => {
                if let Some(c) = snap.controls.get(&verified.principal.subject()) {
                    if c.locked {
                        return Err(AuthError::InvalidToken("the principal is locked".into()));
                    }
                    if verified.iat < c.tokens_valid_after {
                        return Err(AuthError::InvalidToken("the token was revoked".into()));
                    }
                    if (c.read_only && !verified.principal.read_only)
                        || (c.require_break_glass && !verified.principal.require_break_glass)
                    {
                        let mut p = (*verified.principal).clone();
                        p.read_only |= c.read_only;
                        p.require_break_glass |= c.require_break_glass;
                        return Ok((Arc::new(p), snap));
                    }
                }
            }
        }
        Ok((verified.principal.clone(), snap))
    }

    async fn verify_fresh(&self, token: &str, snap: &Snapshot) -> Result<VerifiedToken, AuthError> {
        let iss = unverified_issuer(token)
            .ok_or_else(|| AuthError::InvalidToken("malformed token".into()))?;
        if iss != self.issuer && self.oidc.knows(&iss) {
            let ext = self.oidc.verify(token, &iss).await?;
            let scopes =
                Scopes::parse(&ext.scope).restrict_contexts(&[Context::User, Context::Patient]);
            let principal = Principal {
                kind: PrincipalKind::External {
                    issuer: ext.issuer.clone(),
                    subject: ext.subject.clone(),
                },
                role: ext.role,
                practitioner: ext.practitioner.clone(),
                patient: ext.patient.clone(),
                organization: None,
                launch_patient: if ext.role == Role::Patient {
                    ext.patient.clone()
                } else {
                    None
                },
                scopes,
                client_id: format!("oidc:{}", ext.issuer),
                token_break_glass: None,
                read_only: false,
                require_break_glass: false,
            };
            return Ok(VerifiedToken {
                token: token.to_string(),
                principal: Arc::new(principal),
                exp: ext.exp,
                iat: ext.iat,
                sid: None,
            });
        }
        let claims = self.signer.verify(token, &self.issuer, &self.issuer)?;
        let role = Role::parse(&claims.role)
            .ok_or_else(|| AuthError::InvalidToken("token refused: unknown role".into()))?;
        let scopes = Scopes::parse(&claims.scope);
        let principal = if let Some(client_id) = claims.sub.strip_prefix("client:") {
            Principal {
                kind: PrincipalKind::Client {
                    id: client_id.to_string(),
                },
                role,
                practitioner: None,
                patient: None,
                organization: None,
                scopes: scopes.restrict_contexts(&[Context::System]),
                launch_patient: None,
                client_id: claims.client_id.clone(),
                token_break_glass: None,
                read_only: false,
                require_break_glass: false,
            }
        } else {
            let user = snap
                .users
                .get(&claims.sub)
                .ok_or_else(|| AuthError::InvalidToken("the account no longer exists".into()))?;
            Principal {
                kind: PrincipalKind::User {
                    id: user.id.clone(),
                    username: user.username.clone(),
                },
                role: user.role,
                practitioner: user.practitioner.clone(),
                patient: user.patient.clone(),
                organization: user.organization.clone(),
                scopes: scopes.restrict_contexts(&[Context::User, Context::Patient]),
                launch_patient: claims.patient.clone(),
                client_id: claims.client_id.clone(),
                token_break_glass: claims.btg.clone(),
                read_only: user.read_only,
                require_break_glass: user.require_break_glass,
            }
        };
        Ok(VerifiedToken {
            token: token.to_string(),
            principal: Arc::new(principal),
            exp: claims.exp,
            iat: claims.iat,
            sid: claims.sid,
        })
    }

    /// The policy for one request of an authenticated caller.
    pub fn guard(
        &self,
        principal: Arc<Principal>,
        snapshot: Arc<Snapshot>,
        purpose: Option<String>,
        break_glass: Option<String>,
    ) -> Arc<RequestGuard> {
        Arc::new(RequestGuard::new(
            self.policy.clone(),
            principal,
            snapshot,
            purpose,
            break_glass,
        ))
    }

    /// Whether the principal's role holds an administrative right.
    pub fn has_right(&self, principal: &Principal, right: AdminRight) -> bool {
        self.policy.permissions().of(principal.role).has(right)
    }

    /// Rotate the token-signing key now.
    pub async fn rotate_signing_key(&self) -> Result<String, AuthError> {
        let kid = self.signer.rotate(now_secs()).await?;
        self.audit_admin("signing-key-rotate", None, true).await?;
        Ok(kid)
    }

    // ---------------------------------------------------------------- audit

    async fn audit_login(
        &self,
        user: Option<&User>,
        what: &str,
        ok: bool,
        rule: &str,
        origin: &Origin,
    ) -> Result<(), AuthError> {
        self.record(AuditRecord {
            kind: EventKind::Login,
            agent: Agent {
                subject: user.map(|u| format!("user:{}", u.id)),
                username: user.map(|u| u.username.clone()),
                role: user.map(|u| u.role.name().to_string()),
                fhir_user: user.and_then(|u| {
                    u.practitioner
                        .as_ref()
                        .map(|p| format!("Practitioner/{p}"))
                        .or_else(|| u.patient.as_ref().map(|p| format!("Patient/{p}")))
                }),
                source: origin.source.clone(),
                user_agent: origin.user_agent.clone(),
                ..Agent::default()
            },
            action: format!("login:{what}"),
            interaction: Some("login".into()),
            status: if ok { 200 } else { 401 },
            decisions: vec![Decision {
                interaction: "login".into(),
                rtype: None,
                id: None,
                patient: None,
                allowed: ok,
                rule: rule.to_string().into(),
            }],
            ..AuditRecord::default()
        })
        .await
    }

    async fn audit_event(
        &self,
        what: &str,
        subject: Option<&str>,
        ok: bool,
        rule: &str,
        origin: &Origin,
    ) -> Result<(), AuthError> {
        self.record(AuditRecord {
            kind: EventKind::Token,
            agent: Agent {
                subject: subject.map(str::to_string),
                source: origin.source.clone(),
                user_agent: origin.user_agent.clone(),
                ..Agent::default()
            },
            action: what.to_string(),
            interaction: Some(what.to_string()),
            status: if ok { 200 } else { 400 },
            decisions: vec![Decision {
                interaction: what.to_string().into(),
                rtype: None,
                id: None,
                patient: None,
                allowed: ok,
                rule: rule.chars().take(200).collect::<String>().into(),
            }],
            ..AuditRecord::default()
        })
        .await
    }

    async fn audit_admin(
        &self,
        what: &str,
        target: Option<&str>,
        ok: bool,
    ) -> Result<(), AuthError> {
        self.record(AuditRecord {
            kind: if what.contains("key") {
                EventKind::KeyRotation
            } else {
                EventKind::Admin
            },
            action: format!("admin:{what}"),
            interaction: Some(what.to_string()),
            status: if ok { 200 } else { 400 },
            detail: target.map(|t| format!("target: {t}")),
            decisions: vec![Decision {
                interaction: "admin".into(),
                rtype: None,
                id: target.map(str::to_string),
                patient: None,
                allowed: ok,
                rule: what.to_string().into(),
            }],
            ..AuditRecord::default()
        })
        .await
    }

    /// Append a security event to the audit trail; failing to record it
    /// fails the operation (fail closed).
    pub async fn record(&self, mut rec: AuditRecord) -> Result<(), AuthError> {
        if rec.at == 0 {
            rec.at = now_micros();
        }
        self.audit
            .append(rec)
            .await
            .map(|_| ())
            .map_err(|e| AuthError::Internal(format!("the audit trail refused the event: {e}")))
    }

    /// `/.well-known/smart-configuration`.
    pub fn smart_configuration(&self) -> Value {
        let base = &self.issuer;
        json!({
            "issuer": base,
            "jwks_uri": format!("{base}/.well-known/jwks.json"),
            "authorization_endpoint": format!("{base}/auth/authorize"),
            "token_endpoint": self.token_endpoint(),
            "token_endpoint_auth_methods_supported": ["private_key_jwt", "none"],
            "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384", "RS256", "ES256", "PS384", "EdDSA"],
            "grant_types_supported": ["authorization_code", "client_credentials", "refresh_token", "password"],
            "scopes_supported": [
                "openid", "fhirUser", "launch/patient", "offline_access", "online_access",
                "patient/*.rs", "user/*.cruds", "system/*.cruds", "patient/*.read", "user/*.read", "user/*.write", "system/*.read"
            ],
            "response_types_supported": ["code"],
            "code_challenge_methods_supported": ["S256"],
            "id_token_signing_alg_values_supported": ["ES256"],
            "capabilities": [
                "launch-standalone", "client-public", "client-confidential-asymmetric",
                "context-standalone-patient", "permission-patient", "permission-user",
                "permission-offline", "permission-online", "permission-v1", "permission-v2",
                "sso-openid-connect"
            ],
        })
    }
}

/// Keep only the requested scopes that the client's registration covers.
fn within_client(scopes: Scopes, client: Option<&Client>) -> Result<Scopes, AuthError> {
    let Some(client) = client else {
        return Err(AuthError::InvalidClient("unknown client".into()));
    };
    if client.disabled {
        return Err(AuthError::InvalidClient("the client is disabled".into()));
    }
    let limit = Scopes::parse(&client.scope);
    Ok(scopes.within(&limit))
}

#[cfg(test)]
mod tests {
    use super::same_token;

    #[test]
    fn tokens_compare_equal_only_when_every_byte_is() {
        let t = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJjbGllbnQ6eCJ9.c2lnbmF0dXJl";
        assert!(same_token(t, t));
        assert!(same_token("", ""));
        // A difference in the partial last word, in the first, in the middle.
        let mut last = t.to_string();
        last.pop();
        last.push('m');
        assert!(!same_token(t, &last));
        assert!(!same_token(t, &t.replacen('e', "f", 1)));
        assert!(!same_token(t, &t.replace("eyJzdWIi", "eyJzdWIj")));
        // Lengths differ: never equal, even as a prefix.
        assert!(!same_token(t, &t[..t.len() - 1]));
        assert!(!same_token(&t[..8], t));
        // A token of several 64-byte blocks: a difference at any byte, in
        // any block (the last one partial), is seen.
        let long = t.repeat(9);
        assert!(same_token(&long, &long.clone()));
        for i in 0..long.len() {
            let mut other = long.clone().into_bytes();
            other[i] ^= 0x01;
            let other = String::from_utf8(other).unwrap();
            assert!(
                !same_token(&long, &other),
                "a difference at byte {i} was missed"
            );
        }
    }
}
