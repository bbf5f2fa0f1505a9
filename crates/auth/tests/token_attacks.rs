//! Attacks on tokens and sign-in: each must be refused by the service.
mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use common::*;
use custos_auth::scopes::Context;
use custos_auth::{AuthConfig, AuthError, AuthService, OidcProvider, PrincipalKind, Role};
use custos_fhir::ErrorKind;
use custos_records::Records;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

// ------------------------------------------------------------ JWT helpers

fn b64(v: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(v)
}

fn parts(token: &str) -> (Value, Value, String) {
    let p: Vec<&str> = token.split('.').collect();
    assert_eq!(p.len(), 3, "a JWS has three parts");
    let header = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(p[0]).unwrap()).unwrap();
    let payload = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(p[1]).unwrap()).unwrap();
    (header, payload, p[2].to_string())
}

fn join(header: &Value, payload: &Value, signature: &str) -> String {
    format!(
        "{}.{}.{}",
        b64(header.to_string().as_bytes()),
        b64(payload.to_string().as_bytes()),
        signature
    )
}

/// The server's current signing key, read from its sealed store — only to
/// forge tokens whose signature is right, so that a refusal can only come
/// from the claim checks.
async fn server_signing_key(records: &Records) -> (String, Vec<u8>) {
    let vault = custos_auth::vault::Vault::open(records).await.unwrap();
    let keys: Vec<(String, i64, Value)> = vault
        .list(custos_auth::tokens::SIGNING_KEY_KIND)
        .await
        .unwrap();
    let (_, _, k) = keys
        .iter()
        .find(|(_, _, k)| k["retired"].is_null())
        .expect("a signing key");
    (
        k["kid"].as_str().unwrap().to_string(),
        STANDARD.decode(k["pkcs8"].as_str().unwrap()).unwrap(),
    )
}

fn es256(kid: &str, pkcs8: &[u8], claims: &Value) -> String {
    let mut h = Header::new(Algorithm::ES256);
    h.kid = Some(kid.to_string());
    jsonwebtoken::encode(&h, claims, &EncodingKey::from_ec_der(pkcs8)).unwrap()
}

fn hs256(kid: Option<&str>, secret: &[u8], claims: &Value) -> String {
    let mut h = Header::new(Algorithm::HS256);
    h.kid = kid.map(str::to_string);
    jsonwebtoken::encode(&h, claims, &EncodingKey::from_secret(secret)).unwrap()
}

async fn refused(auth: &AuthService, token: &str, what: &str) -> AuthError {
    match auth.authenticate(token).await {
        Ok((p, _)) => panic!("{what}: accepted as {} ({:?})", p.subject(), p.role),
        Err(e) => e,
    }
}

/// Claims of a Custos access token for `user_id`, valid now.
fn user_claims(user_id: &str, role: &str, scope: &str) -> Value {
    let now = now_secs();
    json!({
        "iss": ISSUER, "sub": user_id, "aud": ISSUER,
        "exp": now + 300, "nbf": now, "iat": now,
        "jti": custos_auth::random_token(16),
        "scope": scope, "client_id": "custos-cli", "role": role,
    })
}

struct Setup {
    env: Env,
    pa: String,
    pb: String,
    obs_a: String,
    obs_b: String,
    doc: TestUser,
    prac: String,
}

/// A physician caring for patient A (not B), with one observation each.
async fn setup(config: AuthConfig) -> Setup {
    let env = env(config).await;
    let records = &env.records;
    let prac = create(records, practitioner_body("Physician")).await;
    let pa = create(records, patient_body("Alpha")).await;
    let pb = create(records, patient_body("Beta")).await;
    create(records, care_team_body(&pa, "active", &[&prac])).await;
    let obs_a = create(records, observation_body(&pa)).await;
    let obs_b = create(records, observation_body(&pb)).await;
    let doc = add_user(&env.auth, "doc", Role::Physician, Some(&prac), None).await;
    Setup {
        env,
        pa,
        pb,
        obs_a,
        obs_b,
        doc,
        prac,
    }
}

// ------------------------------------------------------------- the tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsigned_and_symmetric_tokens_are_refused() {
    let s = setup(AuthConfig::default()).await;
    let auth = &s.env.auth;
    let good = s.doc.token(auth).await;
    auth.authenticate(&good)
        .await
        .expect("the real token works");
    let (header, payload, _) = parts(&good);

    // alg: none, with and without a signature part, in several spellings.
    for alg in ["none", "None", "NONE", "nOnE"] {
        let mut h = header.clone();
        h["alg"] = json!(alg);
        refused(auth, &join(&h, &payload, ""), "alg none, empty signature").await;
        let (_, _, sig) = parts(&good);
        refused(auth, &join(&h, &payload, &sig), "alg none, old signature").await;
        let mut h2 = json!({ "alg": alg, "typ": "JWT" });
        h2["kid"] = header["kid"].clone();
        refused(
            auth,
            &format!(
                "{}.{}.",
                b64(h2.to_string().as_bytes()),
                b64(payload.to_string().as_bytes())
            ),
            "alg none",
        )
        .await;
    }

    // HS256 keyed with what the server publishes: the JWKS, the JWK, the
    // raw coordinates, the uncompressed point.
    let jwks = auth.jwks();
    let jwk = jwks["keys"][0].clone();
    let x = URL_SAFE_NO_PAD.decode(jwk["x"].as_str().unwrap()).unwrap();
    let y = URL_SAFE_NO_PAD.decode(jwk["y"].as_str().unwrap()).unwrap();
    let mut point = vec![4u8];
    point.extend(&x);
    point.extend(&y);
    let secrets: Vec<Vec<u8>> = vec![
        jwks.to_string().into_bytes(),
        jwk.to_string().into_bytes(),
        [x.clone(), y.clone()].concat(),
        point,
        jwk["x"].as_str().unwrap().as_bytes().to_vec(),
    ];
    let kid = header["kid"].as_str().unwrap();
    for secret in &secrets {
        for k in [Some(kid), None] {
            let t = hs256(k, secret, &payload);
            let e = refused(auth, &t, "HS256 keyed with public material").await;
            assert!(matches!(e, AuthError::InvalidToken(_)), "{e:?}");
        }
    }
    // Other asymmetric algorithm names with the ES256 signature.
    for alg in ["ES384", "RS256", "PS256", "EdDSA"] {
        let (_, _, sig) = parts(&good);
        let mut h = header.clone();
        h["alg"] = json!(alg);
        refused(auth, &join(&h, &payload, &sig), "algorithm swapped").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_tokens_are_refused() {
    let s = setup(AuthConfig {
        access_token_secs: 1,
        ..AuthConfig::default()
    })
    .await;
    let auth = &s.env.auth;
    let seen = s
        .doc
        .login(auth, "user/*.rs", None)
        .await
        .unwrap()
        .access_token;
    let unseen = s
        .doc
        .login(auth, "user/*.rs", None)
        .await
        .unwrap()
        .access_token;
    // One verified (and cached) while fresh, one never presented.
    auth.authenticate(&seen).await.expect("fresh");
    tokio::time::sleep(Duration::from_secs(7)).await;
    let e = refused(auth, &seen, "expired, verified before").await;
    assert!(e.to_string().contains("expired"), "{e}");
    let e = refused(auth, &unseen, "expired, never verified").await;
    assert!(e.to_string().contains("expired"), "{e}");
}

/// Tokens signed with the server's own key whose claims are wrong.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_claims_are_refused_even_with_the_real_key() {
    let s = setup(AuthConfig::default()).await;
    let auth = &s.env.auth;
    let (kid, pkcs8) = server_signing_key(&s.env.records).await;
    let uid = s.doc.created.user.id.clone();
    let now = now_secs();
    let base = user_claims(&uid, "physician", "user/*.rs");
    // Control: right claims, right key → accepted (so every refusal below
    // is the claim check at work, not the signature).
    let (p, _) = auth
        .authenticate(&es256(&kid, &pkcs8, &base))
        .await
        .expect("a correct token from the real key");
    assert_eq!(p.role, Role::Physician);

    let cases: Vec<(&str, Value)> = vec![
        ("expired a minute ago", json!({ "exp": now - 60 })),
        ("not valid for another minute", json!({ "nbf": now + 60 })),
        ("wrong audience", json!({ "aud": "http://other.test" })),
        ("wrong issuer", json!({ "iss": "http://other.test" })),
        ("unknown subject", json!({ "sub": "no-such-user" })),
        ("unknown role", json!({ "role": "superuser" })),
        ("audience as an array", json!({ "aud": [ISSUER, "x"] })),
    ];
    for (what, change) in cases {
        let mut c = base.clone();
        for (k, v) in change.as_object().unwrap() {
            c[k] = v.clone();
        }
        refused(auth, &es256(&kid, &pkcs8, &c), what).await;
    }
    for missing in ["exp", "nbf", "iss", "aud", "sub"] {
        let mut c = base.clone();
        c.as_object_mut().unwrap().remove(missing);
        refused(auth, &es256(&kid, &pkcs8, &c), &format!("no {missing}")).await;
    }
}

/// Tokens signed with a key that is not the server's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_keys_are_refused() {
    let s = setup(AuthConfig::default()).await;
    let auth = &s.env.auth;
    let server_kid = auth.jwks()["keys"][0]["kid"].as_str().unwrap().to_string();
    let attacker = EcKey::generate("attacker");
    let uid = s.doc.created.user.id.clone();
    let now = now_secs();
    let mut future = user_claims(&uid, "physician", "user/*.cruds");
    future["nbf"] = json!(now + 3600);
    future["exp"] = json!(now + 7200);
    let valid = user_claims(&uid, "physician", "user/*.cruds");
    for claims in [&valid, &future] {
        let e = refused(
            auth,
            &attacker.sign(Some(&server_kid), claims),
            "server kid",
        )
        .await;
        assert!(matches!(e, AuthError::InvalidToken(_)), "{e:?}");
        refused(auth, &attacker.sign(Some("attacker"), claims), "own kid").await;
        refused(auth, &attacker.sign(None, claims), "no kid").await;
    }
    // The attacker's key in a jwk/jku header changes nothing.
    let mut h = Header::new(Algorithm::ES256);
    h.kid = Some(server_kid.clone());
    h.jwk = Some(serde_json::from_value(attacker.jwk()).unwrap());
    h.jku = Some("http://attacker.test/jwks.json".into());
    let t = jsonwebtoken::encode(&h, &valid, &EncodingKey::from_ec_der(&attacker.pkcs8)).unwrap();
    refused(auth, &t, "embedded jwk").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_issuers_tokens_are_refused() {
    let s = setup(AuthConfig::default()).await;
    let auth = &s.env.auth;
    // A second service over the same data (same users, same signing keys),
    // announcing another issuer.
    let other = open_auth(&s.env.records, AuthConfig::default(), "http://other.test").await;
    let t_other = s
        .doc
        .login(&other, "user/*.rs", None)
        .await
        .unwrap()
        .access_token;
    other.authenticate(&t_other).await.expect("its own issuer");
    let e = refused(auth, &t_other, "token of another issuer").await;
    assert!(
        e.to_string().contains("issuer") || e.to_string().contains("audience"),
        "{e}"
    );
    let t_here = s.doc.token(auth).await;
    refused(&other, &t_here, "and the other way round").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_tokens_are_refused() {
    let s = setup(AuthConfig::default()).await;
    let auth = &s.env.auth;
    let records = &s.env.records;
    let pat = add_user(auth, "alpha", Role::Patient, None, Some(&s.pa)).await;
    let t_pat = pat
        .login(auth, "user/*.rs", None)
        .await
        .unwrap()
        .access_token;
    let t_doc = s.doc.token(auth).await;
    let (h, p, sig) = parts(&t_pat);
    let (_, _, doc_sig) = parts(&t_doc);
    let changes: Vec<(&str, &str, Value)> = vec![
        ("wider scope", "scope", json!("user/*.cruds")),
        ("system scope", "scope", json!("system/*.cruds")),
        ("another user", "sub", json!(s.doc.created.user.id)),
        ("another role", "role", json!("admin")),
        ("a client", "sub", json!("client:custos-cli")),
        ("longer life", "exp", json!(now_secs() + 86_400)),
        ("launch patient B", "patient", json!(s.pb)),
        ("break the glass", "btg", json!("emergency")),
    ];
    for (what, claim, value) in changes {
        let mut q = p.clone();
        q[claim] = value;
        refused(auth, &join(&h, &q, &sig), what).await;
    }
    // Header and payload of one token with the signature of another.
    let (hd, pd, _) = parts(&t_doc);
    refused(auth, &join(&h, &p, &doc_sig), "spliced signature").await;
    refused(auth, &join(&hd, &pd, &sig), "spliced signature 2").await;
    // Byte-level damage to the signature.
    let mut bytes = URL_SAFE_NO_PAD.decode(&sig).unwrap();
    bytes[10] ^= 1;
    refused(auth, &join(&h, &p, &b64(&bytes)), "flipped signature bit").await;
    // The untouched token still works and reaches only A.
    let g = as_user(auth, records, &t_pat).await;
    assert!(g.read("Observation", &s.obs_a).await.is_ok());
    let r = g.read("Observation", &s.obs_b).await;
    assert!(is_kind(&r, ErrorKind::NotFound), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_and_revoke_take_effect_on_the_next_request() {
    let s = setup(AuthConfig::default()).await;
    let auth = &s.env.auth;
    let first = s
        .doc
        .login(auth, "user/*.rs offline_access", None)
        .await
        .unwrap();
    auth.authenticate(&first.access_token).await.expect("valid");

    auth.lock_user("doc", "suspected compromise").await.unwrap();
    let e = refused(auth, &first.access_token, "after lock").await;
    assert!(e.to_string().contains("locked"), "{e}");
    let r = s
        .doc
        .login_with(auth, PASSWORD, s.doc.last_totp(), "user/*.rs", None, None)
        .await;
    assert!(
        matches!(r, Err(AuthError::Locked)),
        "sign-in while locked: {r:?}"
    );
    let r = auth
        .token(
            custos_auth::Grant::RefreshToken {
                refresh_token: first.refresh_token.clone().unwrap(),
                scope: None,
            },
            &custos_auth::service::Origin::default(),
        )
        .await;
    assert!(r.is_err(), "refresh while locked: {r:?}");

    auth.revoke_user_tokens("doc").await.unwrap();
    auth.unlock_user("doc").await.unwrap();
    // Tokens carry whole seconds: one issued in the second of the
    // revocation would be refused too.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let second = s
        .doc
        .login(auth, "user/*.rs", None)
        .await
        .expect("unlock restores sign-in");
    auth.authenticate(&second.access_token)
        .await
        .expect("a token issued after the revocation");
    let e = refused(auth, &first.access_token, "revoked token after unlock").await;
    assert!(e.to_string().contains("revoked"), "{e}");
    // Revocation alone (the account not locked) refuses the next request too.
    auth.revoke_user_tokens("doc").await.unwrap();
    let e = refused(auth, &second.access_token, "revoked, not locked").await;
    assert!(e.to_string().contains("revoked"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_token_reuse_revokes_the_family() {
    let s = setup(AuthConfig::default()).await;
    let auth = &s.env.auth;
    let origin = custos_auth::service::Origin::default();
    let refresh = |token: &str, scope: Option<&str>| {
        auth.token(
            custos_auth::Grant::RefreshToken {
                refresh_token: token.to_string(),
                scope: scope.map(str::to_string),
            },
            &origin,
        )
    };
    let first = s
        .doc
        .login(auth, "user/*.rs offline_access", None)
        .await
        .unwrap();
    let r1 = first
        .refresh_token
        .clone()
        .expect("offline_access gives a refresh token");
    let second = refresh(&r1, None).await.expect("first use");
    let r2 = second.refresh_token.clone().expect("rotated");
    assert_ne!(r1, r2);
    auth.authenticate(&second.access_token)
        .await
        .expect("valid");
    let e = refresh(&r1, None).await.expect_err("second use of r1");
    assert!(matches!(e, AuthError::InvalidGrant(_)), "{e:?}");
    let e = refresh(&r2, None).await.expect_err("r2 after the reuse");
    assert!(matches!(e, AuthError::InvalidGrant(_)), "{e:?}");
    refused(
        auth,
        &second.access_token,
        "access token of the revoked family",
    )
    .await;
    refused(
        auth,
        &first.access_token,
        "first access token of the family",
    )
    .await;
    // Garbage refresh tokens.
    assert!(refresh("", None).await.is_err());
    assert!(refresh("not-a-token", None).await.is_err());

    // A refresh cannot widen the grant.
    let third = s
        .doc
        .login(auth, "user/Observation.rs offline_access", None)
        .await
        .unwrap();
    match refresh(
        third.refresh_token.as_deref().unwrap(),
        Some("user/*.cruds offline_access"),
    )
    .await
    {
        Err(_) => {}
        Ok(t) => {
            assert!(
                !t.scope.contains("cruds") && !t.scope.contains("user/*"),
                "{}",
                t.scope
            );
            let (p, _) = auth.authenticate(&t.access_token).await.unwrap();
            assert_eq!(
                p.scopes
                    .allows(custos_records::Interaction::Read, "Patient"),
                None
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scopes_cannot_be_escalated() {
    let s = setup(AuthConfig::default()).await;
    let auth = &s.env.auth;
    let records = &s.env.records;
    // Care for B too, so that only the scope can keep the physician out.
    create(records, care_team_body(&s.pb, "active", &[&s.prac])).await;

    // A person never gets system/ scopes.
    match s.doc.login(auth, "system/*.cruds", None).await {
        Err(e) => assert!(matches!(e, AuthError::InvalidRequest(_)), "{e:?}"),
        Ok(t) => panic!("system scope granted to a user: {}", t.scope),
    }
    let t = s
        .doc
        .login(auth, "system/*.cruds user/Patient.rs", None)
        .await
        .unwrap();
    assert_eq!(t.scope, "user/Patient.rs");
    let (p, snap) = auth.authenticate(&t.access_token).await.unwrap();
    assert!(
        p.scopes
            .resources
            .iter()
            .all(|r| r.context != Context::System)
    );
    let g = records.guarded(auth.guard(p, snap, None, None));
    assert!(g.read("Patient", &s.pa).await.is_ok());
    let r = g.read("Observation", &s.obs_a).await;
    assert!(is_kind(&r, ErrorKind::Forbidden), "{r:?}");
    let r = g
        .update(
            "Patient",
            &s.pa,
            records.read("Patient", &s.pa).await.unwrap().resource,
            None,
        )
        .await;
    assert!(is_kind(&r, ErrorKind::Forbidden), "{r:?}");

    // A client gets no user/ or patient/ scopes, and nothing beyond its registration.
    let client = register_client(auth, "narrow", "system/Patient.rs").await;
    for ask in [
        "user/*.cruds",
        "patient/*.rs",
        "system/Observation.rs",
        "system/*.cruds",
        "system/Patient.cruds",
    ] {
        match client.token(auth, ask).await {
            Err(_) => {}
            Ok(t) => {
                let (p, snap) = auth.authenticate(&t.access_token).await.unwrap();
                let g = records.guarded(auth.guard(p, snap, None, None));
                let r = g.read("Observation", &s.obs_a).await;
                assert!(is_kind(&r, ErrorKind::Forbidden), "{ask}: {r:?}");
                let r = g.delete("Patient", &s.pb).await;
                assert!(is_kind(&r, ErrorKind::Forbidden), "{ask}: {r:?}");
                assert!(
                    t.scope.split_whitespace().all(|x| x == "system/Patient.rs"),
                    "{ask}: granted {}",
                    t.scope
                );
            }
        }
    }
    let t = client
        .token(auth, "system/Patient.rs system/Observation.rs")
        .await
        .unwrap();
    assert_eq!(t.scope, "system/Patient.rs");

    // A patient-scoped token reaches only its launch patient. (Another
    // physician on A's and B's care teams: each TOTP step signs in once.)
    let doc2 = add_user(auth, "doc2", Role::Physician, Some(&s.prac), None).await;
    let t = doc2
        .login(auth, "patient/*.rs launch/patient", Some(&s.pa))
        .await
        .unwrap();
    assert_eq!(t.patient.as_deref(), Some(s.pa.as_str()));
    let g = as_user(auth, records, &t.access_token).await;
    assert!(g.read("Observation", &s.obs_a).await.is_ok());
    // Refused (which error kind: see `patient_scoped_token_hides_other_patients`).
    let r = g.read("Observation", &s.obs_b).await;
    assert!(
        is_kind(&r, ErrorKind::NotFound) || is_kind(&r, ErrorKind::Forbidden),
        "outside the launch patient: {r:?}"
    );
    let r = g.read("Patient", &s.pb).await;
    assert!(
        is_kind(&r, ErrorKind::NotFound) || is_kind(&r, ErrorKind::Forbidden),
        "{r:?}"
    );
    let b = search(&g, "Observation", &[]).await.unwrap();
    assert!(bundle_has(&b, "Observation", &s.obs_a));
    assert!(!bundle_has(&b, "Observation", &s.obs_b));
    let r = g.create("Observation", observation_body(&s.pa), None).await;
    assert!(
        is_kind(&r, ErrorKind::Forbidden),
        "patient/*.rs writes: {r:?}"
    );
    // patient/ scopes without a launch patient are refused at the token endpoint.
    let r = doc2.login(auth, "patient/*.rs", None).await;
    assert!(r.is_err(), "{r:?}");
}

/// A patient-scoped app must not learn that other patients' records exist
/// (policy.rs: "Patients and patient-scoped apps must not learn that other
/// patients' records exist"), whatever the user's role.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patient_scoped_token_hides_other_patients() {
    let s = setup(AuthConfig::default()).await;
    let auth = &s.env.auth;
    let records = &s.env.records;
    let t = s
        .doc
        .login(auth, "patient/*.rs launch/patient", Some(&s.pa))
        .await
        .unwrap();
    let g = as_user(auth, records, &t.access_token).await;
    let r = g.read("Observation", &s.obs_b).await;
    assert!(
        is_kind(&r, ErrorKind::NotFound),
        "outside the launch patient: {r:?}"
    );
}

/// A token limited to one patient (an app launched for patient A) stays
/// limited to A when the request states a break-the-glass reason: breaking
/// the glass overrides the user's missing relationship, not the token's scope.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn break_glass_does_not_widen_a_patient_scoped_token() {
    let s = setup(AuthConfig::default()).await;
    let auth = &s.env.auth;
    let records = &s.env.records;
    let t = s
        .doc
        .login(auth, "patient/*.rs launch/patient", Some(&s.pa))
        .await
        .unwrap();
    let (g, _) = caller(auth, records, &t.access_token, None, Some("emergency")).await;
    let r = g.read("Observation", &s.obs_b).await;
    assert!(
        r.is_err(),
        "a patient/ token for A read B's observation: {r:?}"
    );
}

/// The narrowing the SMART specification allows: a wildcard request of a
/// client registered for less is granted what the registration covers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_wildcard_request_is_narrowed_to_its_registration() {
    let s = setup(AuthConfig::default()).await;
    let auth = &s.env.auth;
    let client = register_client(auth, "narrow", "system/Patient.rs").await;
    let t = client
        .token(auth, "system/*.cruds")
        .await
        .expect("a narrowed grant");
    assert_eq!(t.scope, "system/Patient.rs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn brute_force_locks_sign_in() {
    let s = setup(AuthConfig::default()).await;
    let auth = &s.env.auth;
    let threshold = auth.config().lockout_threshold;
    assert_eq!(threshold, 5);

    // Wrong passwords.
    let v = add_user(auth, "victim", Role::Nurse, Some(&s.prac), None).await;
    let unknown = auth
        .token(
            custos_auth::Grant::Password {
                username: "nobody".into(),
                password: "wrong password 123".into(),
                totp: Some("000000".into()),
                scope: "user/*.rs".into(),
                patient: None,
                break_glass: None,
            },
            &custos_auth::service::Origin::default(),
        )
        .await
        .expect_err("unknown user");
    for i in 0..threshold {
        let e = v
            .login_with(auth, "wrong password 123", None, "user/*.rs", None, None)
            .await
            .expect_err("wrong password");
        assert!(
            matches!(e, AuthError::InvalidGrant(_)),
            "attempt {i}: {e:?}"
        );
        // An unknown user and a wrong password look the same.
        assert_eq!(e.to_string(), unknown.to_string());
    }
    assert!(auth.user("victim").await.unwrap().locked_until.is_some());
    let e = v
        .login(auth, "user/*.rs", None)
        .await
        .expect_err("locked after the threshold");
    assert!(matches!(e, AuthError::Locked), "{e:?}");

    // Wrong TOTP codes count too.
    let w = add_user(auth, "victim2", Role::Physician, Some(&s.prac), None).await;
    for i in 0..threshold {
        let e = w
            .login_with(
                auth,
                PASSWORD,
                Some(w.wrong_totp()),
                "user/*.rs",
                None,
                None,
            )
            .await
            .expect_err("wrong TOTP");
        assert!(
            matches!(e, AuthError::InvalidGrant(_)),
            "attempt {i}: {e:?}"
        );
    }
    let e = w.login(auth, "user/*.rs", None).await.expect_err("locked");
    assert!(matches!(e, AuthError::Locked), "{e:?}");
    // No TOTP at all is refused (but is not a guess).
    let e = s
        .doc
        .login_with(auth, PASSWORD, None, "user/*.rs", None, None)
        .await
        .expect_err("no TOTP");
    assert!(matches!(e, AuthError::InvalidGrant(_)), "{e:?}");

    // A TOTP code is good once.
    s.doc
        .login(auth, "user/*.rs", None)
        .await
        .expect("first use");
    let e = s
        .doc
        .login_with(auth, PASSWORD, s.doc.last_totp(), "user/*.rs", None, None)
        .await
        .expect_err("replayed TOTP");
    assert!(matches!(e, AuthError::InvalidGrant(_)), "{e:?}");
    assert_eq!(
        auth.user("doc").await.unwrap().failed_attempts,
        1,
        "the replay counts as a failure"
    );
    // An unlock by a security officer restores sign-in.
    auth.unlock_user("victim").await.unwrap();
    v.login(auth, "user/*.rs", None).await.expect("unlocked");
}

/// Guessing under a name that is no account answers, attempt by attempt,
/// exactly as guessing under an account does: the lockout does not tell an
/// attacker which names exist.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lockout_does_not_tell_which_names_exist() {
    let s = setup(AuthConfig::default()).await;
    let auth = &s.env.auth;
    let threshold = auth.config().lockout_threshold;
    add_user(auth, "real.nurse", Role::Nurse, Some(&s.prac), None).await;
    let origin = custos_auth::service::Origin::default();
    let guess = |name: &str| {
        auth.token(
            custos_auth::Grant::Password {
                username: name.into(),
                password: "wrong password 123".into(),
                totp: Some("000000".into()),
                scope: "user/*.rs".into(),
                patient: None,
                break_glass: None,
            },
            &origin,
        )
    };
    let answer = |r: Result<_, AuthError>| match r {
        Ok(_) => panic!("a wrong password was accepted"),
        Err(e @ (AuthError::InvalidGrant(_) | AuthError::Locked)) => e.to_string(),
        Err(e) => panic!("unexpected refusal {e:?}"),
    };
    let mut answers = Vec::new();
    for attempt in 0..threshold + 2 {
        let real = answer(guess("real.nurse").await);
        // Case and surrounding blanks do not make another name.
        let unknown = if attempt % 2 == 0 {
            answer(guess("no.such.nurse").await)
        } else {
            answer(guess(" No.Such.Nurse ").await)
        };
        assert_eq!(real, unknown, "attempt {attempt}");
        answers.push(real);
    }
    assert!(
        answers[..threshold as usize]
            .iter()
            .all(|a| a.contains("invalid username or password")),
        "{answers:?}"
    );
    assert!(
        answers[threshold as usize..]
            .iter()
            .all(|a| a.contains("locked")),
        "{answers:?}"
    );
    // Another unknown name has its own count.
    assert!(answer(guess("someone.else").await).contains("invalid username"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_assertions_are_checked_and_single_use() {
    let s = setup(AuthConfig::default()).await;
    let auth = &s.env.auth;
    let client = register_client(auth, "backend", "system/*.rs").await;
    let assertion = client.assertion("jti-1");
    let t = client
        .token_with(auth, assertion.clone(), "system/*.rs")
        .await
        .expect("first use");
    let (p, _) = auth.authenticate(&t.access_token).await.unwrap();
    assert_eq!(
        p.kind,
        PrincipalKind::Client {
            id: "backend".into()
        }
    );
    assert_eq!(p.role, Role::Service);
    let e = client
        .token_with(auth, assertion, "system/*.rs")
        .await
        .expect_err("replayed assertion");
    assert!(matches!(e, AuthError::InvalidClient(_)), "{e:?}");
    client
        .token_with(auth, client.assertion("jti-2"), "system/*.rs")
        .await
        .expect("a new jti");

    let now = now_secs();
    let aud = format!("{ISSUER}/auth/token");
    let claims = |change: Value| {
        let mut c = json!({
            "iss": "backend", "sub": "backend", "aud": aud,
            "exp": now + 240, "iat": now, "jti": custos_auth::random_token(12),
        });
        for (k, v) in change.as_object().unwrap() {
            if v.is_null() {
                c.as_object_mut().unwrap().remove(k);
            } else {
                c[k] = v.clone();
            }
        }
        c
    };
    let kid = client.key.kid.clone();
    let cases: Vec<(&str, String)> = vec![
        (
            "lives too long",
            client
                .key
                .sign(Some(&kid), &claims(json!({ "exp": now + 3600 }))),
        ),
        (
            "expired",
            client
                .key
                .sign(Some(&kid), &claims(json!({ "exp": now - 60 }))),
        ),
        (
            "wrong audience",
            client
                .key
                .sign(Some(&kid), &claims(json!({ "aud": ISSUER }))),
        ),
        (
            "sub not the client",
            client
                .key
                .sign(Some(&kid), &claims(json!({ "sub": "someone" }))),
        ),
        (
            "no jti",
            client.key.sign(Some(&kid), &claims(json!({ "jti": null }))),
        ),
        (
            "unknown client",
            client.key.sign(
                Some(&kid),
                &claims(json!({ "iss": "nobody", "sub": "nobody" })),
            ),
        ),
        (
            "another key",
            EcKey::generate(&kid).sign(Some(&kid), &claims(json!({}))),
        ),
        (
            "HS256 with the JWK",
            hs256(
                Some(&kid),
                client.key.jwk().to_string().as_bytes(),
                &claims(json!({})),
            ),
        ),
    ];
    for (what, a) in cases {
        let r = client.token_with(auth, a, "system/*.rs").await;
        assert!(r.is_err(), "{what}: {r:?}");
    }
    let r = auth
        .token(
            custos_auth::Grant::ClientCredentials {
                assertion_type: "urn:ietf:params:oauth:client-assertion-type:saml2-bearer".into(),
                assertion: client.assertion("jti-3"),
                scope: "system/*.rs".into(),
            },
            &custos_auth::service::Origin::default(),
        )
        .await;
    assert!(r.is_err(), "wrong assertion type: {r:?}");
}

// ------------------------------------------------------------------- OIDC

const IDP: &str = "https://idp.example";
const IDP_AUD: &str = "custos-fhir";

async fn oidc_setup() -> (Setup, EcKey, tempfile::TempDir) {
    let key = EcKey::generate("idp-key-1");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("idp-jwks.json");
    std::fs::write(&file, key.jwks().to_string()).unwrap();
    let mut roles = BTreeMap::new();
    roles.insert("Doctor".to_string(), "physician".to_string());
    let config = AuthConfig {
        oidc: vec![OidcProvider {
            issuer: IDP.into(),
            audience: IDP_AUD.into(),
            jwks_uri: None,
            jwks_file: Some(file),
            role_claim: "roles".into(),
            roles,
            practitioner_claim: Some("practitioner".into()),
            patient_claim: None,
            scope_claim: "scope".into(),
        }],
        ..AuthConfig::default()
    };
    (setup(config).await, key, dir)
}

fn idp_claims(prac: &str, change: Value) -> Value {
    let now = now_secs();
    let mut c = json!({
        "iss": IDP, "aud": IDP_AUD, "sub": "ext-doctor-1",
        "exp": now + 300, "iat": now,
        "roles": ["Nurse", "Doctor"], "practitioner": prac, "scope": "user/*.rs",
    });
    for (k, v) in change.as_object().unwrap() {
        if v.is_null() {
            c.as_object_mut().unwrap().remove(k);
        } else {
            c[k] = v.clone();
        }
    }
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_oidc_tokens() {
    let (s, idp, dir) = oidc_setup().await;
    let auth = &s.env.auth;
    let records = &s.env.records;

    // A valid token: accepted with the mapped role and practitioner.
    let good = idp.sign(Some("idp-key-1"), &idp_claims(&s.prac, json!({})));
    let (p, snap) = auth
        .authenticate(&good)
        .await
        .expect("valid external token");
    assert_eq!(p.role, Role::Physician);
    assert_eq!(
        p.kind,
        PrincipalKind::External {
            issuer: IDP.into(),
            subject: "ext-doctor-1".into()
        }
    );
    assert_eq!(p.practitioner.as_deref(), Some(s.prac.as_str()));
    // The policy applies to it like to a local physician.
    let g = records.guarded(auth.guard(p, snap, None, None));
    assert!(g.read("Observation", &s.obs_a).await.is_ok());
    let r = g.read("Observation", &s.obs_b).await;
    assert!(is_kind(&r, ErrorKind::Forbidden), "{r:?}");
    let r = g.create("Observation", observation_body(&s.pa), None).await;
    assert!(
        is_kind(&r, ErrorKind::Forbidden),
        "user/*.rs does not write: {r:?}"
    );
    // A single role string works as well.
    let t = idp.sign(
        Some("idp-key-1"),
        &idp_claims(&s.prac, json!({ "roles": "Doctor" })),
    );
    auth.authenticate(&t).await.expect("role as a string");
    // A system scope in an external token is not honoured.
    let t = idp.sign(
        Some("idp-key-1"),
        &idp_claims(&s.prac, json!({ "scope": "system/*.cruds" })),
    );
    if let Ok((p, snap)) = auth.authenticate(&t).await {
        assert!(
            p.scopes
                .resources
                .iter()
                .all(|r| r.context != Context::System)
        );
        let g = records.guarded(auth.guard(p, snap, None, None));
        let r = g.read("Observation", &s.obs_a).await;
        assert!(is_kind(&r, ErrorKind::Forbidden), "{r:?}");
    }

    let jwks_bytes = std::fs::read(dir.path().join("idp-jwks.json")).unwrap();
    let now = now_secs();
    let stranger = EcKey::generate("idp-key-1");
    let cases: Vec<(&str, String)> = vec![
        (
            "wrong audience",
            idp.sign(
                Some("idp-key-1"),
                &idp_claims(&s.prac, json!({ "aud": "someone-else" })),
            ),
        ),
        (
            "wrong issuer",
            idp.sign(
                Some("idp-key-1"),
                &idp_claims(&s.prac, json!({ "iss": "https://evil.example" })),
            ),
        ),
        (
            "Custos as issuer",
            idp.sign(
                Some("idp-key-1"),
                &idp_claims(&s.prac, json!({ "iss": ISSUER, "aud": ISSUER })),
            ),
        ),
        (
            "HS256 keyed with the JWKS",
            hs256(
                Some("idp-key-1"),
                &jwks_bytes,
                &idp_claims(&s.prac, json!({})),
            ),
        ),
        (
            "HS256 keyed with the x coordinate",
            hs256(
                Some("idp-key-1"),
                idp.x.as_bytes(),
                &idp_claims(&s.prac, json!({})),
            ),
        ),
        (
            "no mapped role",
            idp.sign(
                Some("idp-key-1"),
                &idp_claims(&s.prac, json!({ "roles": ["Janitor"] })),
            ),
        ),
        (
            "no role claim",
            idp.sign(
                Some("idp-key-1"),
                &idp_claims(&s.prac, json!({ "roles": null })),
            ),
        ),
        (
            "role named directly",
            idp.sign(
                Some("idp-key-1"),
                &idp_claims(&s.prac, json!({ "roles": ["physician", "admin"] })),
            ),
        ),
        (
            "expired",
            idp.sign(
                Some("idp-key-1"),
                &idp_claims(&s.prac, json!({ "exp": now - 60 })),
            ),
        ),
        (
            "not yet valid",
            idp.sign(
                Some("idp-key-1"),
                &idp_claims(&s.prac, json!({ "nbf": now + 600 })),
            ),
        ),
        (
            "another key, same kid",
            stranger.sign(Some("idp-key-1"), &idp_claims(&s.prac, json!({}))),
        ),
        (
            "unknown kid",
            stranger.sign(Some("other-kid"), &idp_claims(&s.prac, json!({}))),
        ),
        (
            "no exp",
            idp.sign(
                Some("idp-key-1"),
                &idp_claims(&s.prac, json!({ "exp": null })),
            ),
        ),
    ];
    for (what, t) in cases {
        refused(auth, &t, what).await;
    }
    // alg: none for the provider's issuer.
    let (h, p, _) = parts(&good);
    let mut h2 = h.clone();
    h2["alg"] = json!("none");
    refused(auth, &join(&h2, &p, ""), "alg none").await;
    // A tampered external token.
    let (_, _, sig) = parts(&good);
    let mut p2 = p.clone();
    p2["sub"] = json!("ext-admin");
    refused(auth, &join(&h, &p2, &sig), "tampered external token").await;
}
