//! Access tokens: ES256-signed JWTs, signing keys kept sealed in the store,
//! rotated, and published as a JWKS.
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use parking_lot::RwLock;
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use zeroize::Zeroizing;

use crate::AuthError;
use crate::vault::Vault;

pub const SIGNING_KEY_KIND: &str = "signing-key";

/// The claims of a Custos access token.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Claims {
    pub iss: String,
    /// The user id, or the client id for a system.
    pub sub: String,
    pub aud: String,
    pub exp: i64,
    pub nbf: i64,
    pub iat: i64,
    pub jti: String,
    pub scope: String,
    pub client_id: String,
    pub role: String,
    /// The launch patient of patient-context scopes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patient: Option<String>,
    /// The refresh-token family this token belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sid: Option<String>,
    /// A break-the-glass reason stated when the token was requested.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub btg: Option<String>,
    /// `fhirUser`: the Practitioner or Patient the user is.
    #[serde(default, rename = "fhirUser", skip_serializing_if = "Option::is_none")]
    pub fhir_user: Option<String>,
}

/// A signing key as stored (sealed).
#[derive(Serialize, Deserialize)]
struct StoredKey {
    kid: String,
    /// PKCS#8 document, base64.
    pkcs8: String,
    created: i64,
    /// When it stopped signing (it still verifies for a while).
    retired: Option<i64>,
}

struct LiveKey {
    kid: String,
    created: i64,
    retired: Option<i64>,
    encoding: EncodingKey,
    decoding: DecodingKey,
    jwk: Value,
}

/// Signs and verifies Custos access tokens.
pub struct TokenSigner {
    vault: Vault,
    keys: RwLock<Vec<Arc<LiveKey>>>,
    /// A key signs for this long before a new one replaces it.
    rotate_after_secs: i64,
    /// A retired key keeps verifying for this long (longer than any token lives).
    verify_for_secs: i64,
}

fn live(stored: &StoredKey) -> Result<LiveKey, AuthError> {
    let der = Zeroizing::new(
        base64::engine::general_purpose::STANDARD
            .decode(&stored.pkcs8)
            .map_err(|_| AuthError::Internal("signing key does not decode".into()))?,
    );
    let pair =
        EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &der, &SystemRandom::new())
            .map_err(|_| AuthError::Internal("signing key is not a P-256 key".into()))?;
    let jwk = p256_public_jwk(pair.public_key().as_ref(), &stored.kid);
    let coordinate = |c: &str| jwk[c].as_str().unwrap_or_default().to_string();
    let decoding = DecodingKey::from_ec_components(&coordinate("x"), &coordinate("y"))
        .map_err(|_| AuthError::Internal("signing key public part".into()))?;
    Ok(LiveKey {
        kid: stored.kid.clone(),
        created: stored.created,
        retired: stored.retired,
        encoding: EncodingKey::from_ec_der(&der),
        decoding,
        jwk,
    })
}

/// The public JWK (ES256, for signatures) of a P-256 key from its
/// uncompressed point `0x04 ‖ x (32) ‖ y (32)`.
pub fn p256_public_jwk(uncompressed_point: &[u8], kid: &str) -> Value {
    let (x, y) = match uncompressed_point {
        [0x04, rest @ ..] if rest.len() == 64 => (&rest[..32], &rest[32..]),
        _ => (&[][..], &[][..]),
    };
    json!({
        "kty": "EC", "crv": "P-256", "kid": kid, "use": "sig", "alg": "ES256",
        "x": URL_SAFE_NO_PAD.encode(x), "y": URL_SAFE_NO_PAD.encode(y),
    })
}

fn new_key(now: i64) -> Result<StoredKey, AuthError> {
    let doc = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new())
        .map_err(|_| AuthError::Internal("cannot generate a signing key".into()))?;
    // The key id is a digest of the public key (stable, reveals nothing).
    let pair = EcdsaKeyPair::from_pkcs8(
        &ECDSA_P256_SHA256_FIXED_SIGNING,
        doc.as_ref(),
        &SystemRandom::new(),
    )
    .map_err(|_| AuthError::Internal("generated key does not load".into()))?;
    let digest = ring::digest::digest(&ring::digest::SHA256, pair.public_key().as_ref());
    Ok(StoredKey {
        kid: URL_SAFE_NO_PAD.encode(&digest.as_ref()[..12]),
        pkcs8: base64::engine::general_purpose::STANDARD.encode(doc.as_ref()),
        created: now,
        retired: None,
    })
}

impl TokenSigner {
    /// Load the signing keys, creating the first one (or a replacement for
    /// an old one) as needed.
    pub async fn open(
        vault: Vault,
        rotate_after_secs: i64,
        verify_for_secs: i64,
    ) -> Result<TokenSigner, AuthError> {
        let s = TokenSigner {
            vault,
            keys: RwLock::new(Vec::new()),
            rotate_after_secs,
            verify_for_secs,
        };
        s.reload().await?;
        s.rotate_if_due(crate::now_secs()).await?;
        Ok(s)
    }

    async fn reload(&self) -> Result<(), AuthError> {
        let stored: Vec<(String, i64, StoredKey)> = self.vault.list(SIGNING_KEY_KIND).await?;
        let mut keys = stored
            .iter()
            .map(|(_, _, k)| live(k).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        keys.sort_by_key(|k| std::cmp::Reverse(k.created));
        *self.keys.write() = keys;
        Ok(())
    }

    /// Start signing with a new key now; the old one keeps verifying.
    pub async fn rotate(&self, now: i64) -> Result<String, AuthError> {
        let fresh = new_key(now)?;
        let kid = fresh.kid.clone();
        let old: Vec<(String, i64, StoredKey)> = self.vault.list(SIGNING_KEY_KIND).await?;
        for (key, version, mut k) in old {
            if now - k.retired.unwrap_or(now) > self.verify_for_secs {
                let kk = key.clone();
                self.vault
                    .write(move |tx, _| {
                        tx.sys_delete(SIGNING_KEY_KIND, &kk)
                            .map_err(crate::vault::backend)
                    })
                    .await?;
            } else if k.retired.is_none() {
                k.retired = Some(now);
                self.vault
                    .put(SIGNING_KEY_KIND, &key, &k, Some(version))
                    .await?;
            }
        }
        self.vault
            .put(SIGNING_KEY_KIND, &kid, &fresh, Some(0))
            .await?;
        self.reload().await?;
        tracing::info!(kid = %kid, "token signing key rotated");
        Ok(kid)
    }

    /// Rotate if there is no key or the signing key is older than the rotation period.
    pub async fn rotate_if_due(&self, now: i64) -> Result<(), AuthError> {
        let due = match self.signing_key() {
            None => true,
            Some(k) => now - k.created >= self.rotate_after_secs,
        };
        if due {
            self.rotate(now).await?;
        }
        Ok(())
    }

    fn signing_key(&self) -> Option<Arc<LiveKey>> {
        self.keys
            .read()
            .iter()
            .find(|k| k.retired.is_none())
            .cloned()
    }

    /// Sign claims with the current key.
    pub fn sign<T: Serialize>(&self, claims: &T) -> Result<String, AuthError> {
        let key = self
            .signing_key()
            .ok_or_else(|| AuthError::Internal("no signing key".into()))?;
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(key.kid.clone());
        jsonwebtoken::encode(&header, claims, &key.encoding)
            .map_err(|e| AuthError::Internal(format!("signing: {e}")))
    }

    /// Verify a Custos token: ES256 only, a known key id, the signature,
    /// issuer, audience, expiry and not-before (no leeway beyond 5 s).
    pub fn verify(&self, token: &str, issuer: &str, audience: &str) -> Result<Claims, AuthError> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| AuthError::InvalidToken("malformed token".into()))?;
        if header.alg != Algorithm::ES256 {
            return Err(AuthError::InvalidToken(
                "unexpected signing algorithm".into(),
            ));
        }
        let kid = header
            .kid
            .ok_or_else(|| AuthError::InvalidToken("token names no key".into()))?;
        let key = self
            .keys
            .read()
            .iter()
            .find(|k| k.kid == kid)
            .cloned()
            .ok_or_else(|| AuthError::InvalidToken("unknown signing key".into()))?;
        let mut v = Validation::new(Algorithm::ES256);
        v.leeway = 5;
        v.validate_nbf = true;
        v.set_issuer(&[issuer]);
        v.set_audience(&[audience]);
        v.set_required_spec_claims(&["exp", "nbf", "iss", "aud", "sub"]);
        jsonwebtoken::decode::<Claims>(token, &key.decoding, &v)
            .map(|d| d.claims)
            .map_err(|e| AuthError::InvalidToken(format!("token refused: {}", token_error(&e))))
    }

    /// The public keys, as a JWKS document.
    pub fn jwks(&self) -> Value {
        let keys: Vec<Value> = self.keys.read().iter().map(|k| k.jwk.clone()).collect();
        json!({ "keys": keys })
    }
}

/// A short, safe description of why a JWT was refused.
pub fn token_error(e: &jsonwebtoken::errors::Error) -> &'static str {
    use jsonwebtoken::errors::ErrorKind as K;
    match e.kind() {
        K::ExpiredSignature => "expired",
        K::ImmatureSignature => "not yet valid",
        K::InvalidIssuer => "wrong issuer",
        K::InvalidAudience => "wrong audience",
        K::InvalidSignature => "bad signature",
        K::InvalidAlgorithm | K::InvalidAlgorithmName => "unexpected algorithm",
        K::MissingRequiredClaim(_) => "missing claim",
        _ => "malformed",
    }
}
