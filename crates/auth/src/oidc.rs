//! Tokens from external OpenID Connect providers: verified against the
//! provider's JWKS (fetched and cached, refetched on an unknown key id),
//! with a configured issuer, audience and claim-to-role mapping.
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use parking_lot::RwLock;
use serde_json::Value;

use crate::AuthError;
use crate::config::OidcProvider;
use crate::roles::Role;
use crate::tokens::token_error;

/// Asymmetric algorithms only: a shared-secret (HS*) token from outside is never accepted.
const ALLOWED: [Algorithm; 6] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::PS256,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

/// What an external token says about its user, after verification and mapping.
#[derive(Debug, Clone)]
pub struct ExternalIdentity {
    pub issuer: String,
    pub subject: String,
    pub role: Role,
    pub practitioner: Option<String>,
    pub patient: Option<String>,
    pub scope: String,
    pub exp: i64,
    pub iat: i64,
}

struct Provider {
    config: OidcProvider,
    keys: RwLock<(Option<JwkSet>, Option<Instant>)>,
}

/// Verifies tokens of the configured external providers.
pub struct OidcVerifier {
    providers: Vec<Provider>,
    http: reqwest::Client,
}

impl OidcVerifier {
    pub fn new(configs: &[OidcProvider]) -> Result<OidcVerifier, AuthError> {
        for c in configs {
            if c.jwks_uri.is_none() && c.jwks_file.is_none() {
                return Err(AuthError::InvalidRequest(format!(
                    "OIDC provider {} needs jwks_uri or jwks_file",
                    c.issuer
                )));
            }
            for role in c.roles.values() {
                if Role::parse(role).is_none() {
                    return Err(AuthError::InvalidRequest(format!(
                        "OIDC provider {}: unknown role '{role}'",
                        c.issuer
                    )));
                }
            }
        }
        Ok(OidcVerifier {
            providers: configs
                .iter()
                .map(|c| Provider {
                    config: c.clone(),
                    keys: RwLock::new((None, None)),
                })
                .collect(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .map_err(|e| AuthError::Internal(e.to_string()))?,
        })
    }

    /// Whether `iss` is a configured provider.
    pub fn knows(&self, iss: &str) -> bool {
        self.providers.iter().any(|p| p.config.issuer == iss)
    }

    async fn fetch(&self, p: &Provider) -> Result<JwkSet, AuthError> {
        let text = if let Some(file) = &p.config.jwks_file {
            std::fs::read_to_string(file)
                .map_err(|e| AuthError::Internal(format!("JWKS file: {e}")))?
        } else {
            let uri = p.config.jwks_uri.as_deref().unwrap_or_default();
            self.http
                .get(uri)
                .send()
                .await
                .and_then(|r| r.error_for_status())
                .map_err(|e| AuthError::Internal(format!("JWKS fetch: {e}")))?
                .text()
                .await
                .map_err(|e| AuthError::Internal(format!("JWKS fetch: {e}")))?
        };
        serde_json::from_str(&text).map_err(|_| AuthError::Internal("JWKS does not parse".into()))
    }

    async fn key_for(
        &self,
        p: &Provider,
        kid: Option<&str>,
    ) -> Result<jsonwebtoken::jwk::Jwk, AuthError> {
        let find = |set: &JwkSet| match kid {
            Some(k) => set.find(k).cloned(),
            None if set.keys.len() == 1 => set.keys.first().cloned(),
            None => None,
        };
        let (cached, fetched) = {
            let g = p.keys.read();
            (g.0.as_ref().and_then(find), g.1)
        };
        if let Some(k) = cached {
            return Ok(k);
        }
        // Unknown key id: refetch, at most every 30 seconds.
        if fetched.is_some_and(|t| t.elapsed() < Duration::from_secs(30)) {
            return Err(AuthError::InvalidToken("unknown signing key".into()));
        }
        let set = self.fetch(p).await?;
        let found = find(&set);
        *p.keys.write() = (Some(set), Some(Instant::now()));
        found.ok_or_else(|| AuthError::InvalidToken("unknown signing key".into()))
    }

    /// Verify an external token whose (unverified) issuer is `iss`.
    pub async fn verify(&self, token: &str, iss: &str) -> Result<ExternalIdentity, AuthError> {
        let p = self
            .providers
            .iter()
            .find(|p| p.config.issuer == iss)
            .ok_or_else(|| AuthError::InvalidToken("unknown issuer".into()))?;
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| AuthError::InvalidToken("malformed token".into()))?;
        if !ALLOWED.contains(&header.alg) {
            return Err(AuthError::InvalidToken(
                "unexpected signing algorithm".into(),
            ));
        }
        let jwk = self.key_for(p, header.kid.as_deref()).await?;
        let key = DecodingKey::from_jwk(&jwk)
            .map_err(|_| AuthError::InvalidToken("unusable provider key".into()))?;
        let mut v = Validation::new(header.alg);
        v.leeway = 5;
        v.validate_nbf = true;
        v.set_issuer(&[&p.config.issuer]);
        v.set_audience(&[&p.config.audience]);
        v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        let claims: Value = jsonwebtoken::decode::<Value>(token, &key, &v)
            .map_err(|e| AuthError::InvalidToken(format!("token refused: {}", token_error(&e))))?
            .claims;
        let role_values: Vec<String> = match claims.get(&p.config.role_claim) {
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect(),
            _ => Vec::new(),
        };
        let role = role_values
            .iter()
            .find_map(|r| p.config.roles.get(r).and_then(|name| Role::parse(name)))
            .ok_or_else(|| AuthError::Forbidden("the token carries no mapped role".into()))?;
        let text = |name: &Option<String>| {
            name.as_ref()
                .and_then(|n| claims.get(n))
                .and_then(Value::as_str)
                .map(str::to_string)
        };
        Ok(ExternalIdentity {
            issuer: p.config.issuer.clone(),
            subject: claims
                .get("sub")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            role,
            practitioner: text(&p.config.practitioner_claim),
            patient: text(&p.config.patient_claim),
            scope: claims
                .get(&p.config.scope_claim)
                .and_then(Value::as_str)
                .unwrap_or("user/*.cruds")
                .to_string(),
            exp: claims.get("exp").and_then(Value::as_i64).unwrap_or(0),
            iat: claims.get("iat").and_then(Value::as_i64).unwrap_or(0),
        })
    }
}

/// The issuer of a JWT, read without verification (only to route it to a verifier).
pub fn unverified_issuer(token: &str) -> Option<String> {
    unverified_claim(token, "iss")
}

/// A string claim of a JWT, read without verification (only to route it).
pub fn unverified_claim(token: &str, name: &str) -> Option<String> {
    use base64::Engine;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let v: Value = serde_json::from_slice(&bytes).ok()?;
    v.get(name)?.as_str().map(str::to_string)
}
