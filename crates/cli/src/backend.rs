//! Tokens for the command line's own clients: SMART Backend Services
//! (`client_credentials` with an ES256 `private_key_jwt` assertion) and the
//! password + TOTP grant. The demo and the benchmark use these over HTTP,
//! exactly as an outside system would.
use anyhow::{Context, bail};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use serde_json::{Value, json};

use crate::client::FhirClient;

/// A backend client's ES256 key pair.
pub struct BackendKey {
    kid: String,
    encoding: EncodingKey,
    public_jwk: Value,
}

impl BackendKey {
    pub fn generate() -> anyhow::Result<BackendKey> {
        let rng = SystemRandom::new();
        let doc = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .map_err(|_| anyhow::anyhow!("cannot generate a key"))?;
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, doc.as_ref(), &rng)
            .map_err(|_| anyhow::anyhow!("generated key does not load"))?;
        let kid = custos_auth::random_token(9);
        Ok(BackendKey {
            public_jwk: custos_auth::tokens::p256_public_jwk(pair.public_key().as_ref(), &kid),
            kid,
            encoding: EncodingKey::from_ec_der(doc.as_ref()),
        })
    }

    /// The public key set to register.
    pub fn jwks(&self) -> Value {
        json!({ "keys": [self.public_jwk] })
    }

    /// A fresh client assertion for `token_url`.
    pub fn assertion(&self, client_id: &str, token_url: &str) -> anyhow::Result<String> {
        let now = custos_auth::now_secs();
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        let claims = json!({
            "iss": client_id, "sub": client_id, "aud": token_url,
            "exp": now + 240, "iat": now, "jti": custos_auth::random_token(16),
        });
        Ok(jsonwebtoken::encode(&header, &claims, &self.encoding)?)
    }
}

/// SMART Backend Services: exchange a signed assertion for an access token.
///
/// The assertion's audience is the token endpoint of `issuer` (the server's
/// public address, which may differ from the node `c` talks to).
pub async fn client_credentials(
    c: &FhirClient,
    issuer: &str,
    client_id: &str,
    key: &BackendKey,
    scope: &str,
) -> anyhow::Result<String> {
    let token_url = format!("{issuer}/auth/token");
    let assertion = key.assertion(client_id, &token_url)?;
    let (status, v) = c
        .form(
            "/auth/token",
            &[
                ("grant_type", "client_credentials"),
                (
                    "client_assertion_type",
                    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                ),
                ("client_assertion", &assertion),
                ("scope", scope),
            ],
        )
        .await?;
    if status != 200 {
        bail!("the token endpoint refused the client ({status}): {v}");
    }
    v["access_token"]
        .as_str()
        .map(str::to_string)
        .context("no access_token in the answer")
}

/// The password + TOTP grant of the command line; the full token answer.
pub async fn password_grant(
    c: &FhirClient,
    username: &str,
    password: &str,
    totp: Option<&str>,
    scope: &str,
    extra: &[(&str, &str)],
) -> anyhow::Result<Value> {
    let mut pairs = vec![
        ("grant_type", "password"),
        ("client_id", custos_auth::service::CLI_CLIENT),
        ("username", username),
        ("password", password),
        ("scope", scope),
    ];
    if let Some(t) = totp {
        pairs.push(("totp", t));
    }
    pairs.extend_from_slice(extra);
    let (status, v) = c.form("/auth/token", &pairs).await?;
    if status != 200 {
        bail!(
            "sign-in refused: {}",
            v["error_description"].as_str().unwrap_or("unknown error")
        );
    }
    Ok(v)
}

/// Register an in-process backend client (`system/*.cruds`, role service)
/// and return `client` carrying its access token.
pub async fn sign_in_as_system(
    auth: &custos_auth::AuthService,
    client: &FhirClient,
    id: &str,
    name: &str,
) -> anyhow::Result<(FhirClient, String)> {
    let key = BackendKey::generate()?;
    auth.register_client(custos_auth::service::Client {
        id: id.into(),
        name: name.into(),
        jwks: Some(key.jwks()),
        redirect_uris: Vec::new(),
        role: Some(custos_auth::Role::Service),
        scope: "system/*.cruds".into(),
        disabled: false,
        created: 0,
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let token = client_credentials(client, auth.issuer(), id, &key, "system/*.cruds").await?;
    Ok((client.with_token(&token), token))
}
