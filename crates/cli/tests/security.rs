//! Security, end to end: the real `custos` binary over HTTP. Each test
//! tries an attack — no token, forged or expired tokens, revoked accounts,
//! password guessing, refresh-token replay, scope escalation, reading
//! another patient's data by every route the API offers, a SMART
//! authorization code without its PKCE verifier — and asserts that it fails.
//!
//! Users and clients are made with the command line (`custos user add`,
//! `custos client add`) on the server's data directory, and tokens are
//! obtained the way real clients obtain them.
use std::collections::BTreeSet;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

mod support;
use support::{
    BackendClient, Resp, SYSTEM_SCOPE, Server, User, b64_json, custos_ok, http, is_outcome,
    jwt_part, now_secs, post_form, random,
};

const PATIENT_SCOPE: &str = "patient/*.rs launch/patient";
const USER_SCOPE: &str = "user/*.cruds";

// ----------------------------------------------------------------- helpers

/// A server on a fresh data dir with a `system/*.cruds` token in `s.token`.
async fn start() -> Server {
    let mut s = Server::start();
    s.sign_in_system().await;
    s
}

fn system(s: &Server) -> Option<&str> {
    s.token.as_deref()
}

/// Create a resource with the system token; its id.
async fn create(s: &Server, resource: Value) -> String {
    let r = s
        .call(
            system(s),
            "POST",
            resource["resourceType"].as_str().unwrap(),
            Some(resource.clone()),
            &[],
        )
        .await;
    assert_eq!(r.status, 201, "create {resource}: {}", r.text);
    r.body["id"].as_str().unwrap().to_string()
}

fn practitioner(family: &str) -> Value {
    json!({ "resourceType": "Practitioner", "name": [{ "family": family }] })
}

fn patient(family: &str, gp: Option<&str>) -> Value {
    let mut p = json!({
        "resourceType": "Patient",
        "name": [{ "family": family, "given": ["Test"] }],
        "birthDate": "1970-01-01",
    });
    if let Some(gp) = gp {
        p["generalPractitioner"] = json!([{ "reference": format!("Practitioner/{gp}") }]);
    }
    p
}

fn observation(subject: &str, performer: Option<&str>) -> Value {
    let mut o = json!({
        "resourceType": "Observation",
        "status": "final",
        "code": { "coding": [{ "system": "http://loinc.org", "code": "8867-4" }] },
        "subject": { "reference": format!("Patient/{subject}") },
        "effectiveDateTime": "2024-03-01T10:00:00Z",
        "valueQuantity": { "value": 72, "unit": "/min", "system": "http://unitsofmeasure.org", "code": "/min" },
    });
    if let Some(p) = performer {
        o["performer"] = json!([{ "reference": p }]);
    }
    o
}

fn care_team(patient: &str, practitioner: &str, status: &str) -> Value {
    json!({
        "resourceType": "CareTeam",
        "status": status,
        "subject": { "reference": format!("Patient/{patient}") },
        "participant": [{ "member": { "reference": format!("Practitioner/{practitioner}") } }],
    })
}

fn encounter(patient: &str, practitioner: &str, period: Value) -> Value {
    json!({
        "resourceType": "Encounter",
        "status": "finished",
        "class": { "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB" },
        "subject": { "reference": format!("Patient/{patient}") },
        "participant": [{ "individual": { "reference": format!("Practitioner/{practitioner}") } }],
        "period": period,
    })
}

/// `type/id` of every entry of a Bundle (any search mode).
fn entry_refs(bundle: &Value) -> BTreeSet<String> {
    bundle["entry"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| {
            let r = &e["resource"];
            Some(format!(
                "{}/{}",
                r["resourceType"].as_str()?,
                r["id"].as_str()?
            ))
        })
        .collect()
}

fn set(items: &[String]) -> BTreeSet<String> {
    items.iter().cloned().collect()
}

fn token_of(r: &Resp) -> String {
    assert_eq!(r.status, 200, "token refused: {}", r.text);
    r.body["access_token"].as_str().unwrap().to_string()
}

/// Refused at the token endpoint: an OAuth error, no token.
fn assert_refused(r: &Resp, what: &str) {
    assert!(
        (400..500).contains(&r.status),
        "{what}: expected a 4xx OAuth error, got {}: {}",
        r.status,
        r.text
    );
    assert!(
        r.body["error"].is_string(),
        "{what}: OAuth error body: {}",
        r.text
    );
    assert!(r.body.get("access_token").is_none(), "{what}: {}", r.text);
}

/// 401 with a Bearer challenge and an OperationOutcome.
fn assert_unauthorized(r: &Resp, what: &str) {
    assert_eq!(r.status, 401, "{what}: {}", r.text);
    let challenge = r.header("www-authenticate").unwrap_or_default();
    assert!(
        challenge.starts_with("Bearer"),
        "{what}: WWW-Authenticate {challenge:?}"
    );
    assert!(is_outcome(&r.body), "{what}: {}", r.text);
}

async fn refresh(s: &Server, refresh_token: &str, scope: Option<&str>) -> Resp {
    let mut pairs = vec![
        ("grant_type", "refresh_token"),
        ("refresh_token", refresh_token),
    ];
    if let Some(sc) = scope {
        pairs.push(("scope", sc));
    }
    post_form(&http(), &s.url("auth/token"), &pairs).await
}

// ------------------------------------------------------- authentication

#[tokio::test]
async fn requests_without_a_token_are_refused() {
    let s = start().await;
    let pid = create(&s, patient("Anon", None)).await;
    for (method, path, body) in [
        ("GET", "Patient".to_string(), None),
        ("GET", format!("Patient/{pid}"), None),
        ("GET", format!("Patient/{pid}/_history"), None),
        ("GET", format!("Patient/{pid}/_history/1"), None),
        ("GET", "Patient/_history".to_string(), None),
        ("GET", "_history".to_string(), None),
        ("POST", "Patient".to_string(), Some(patient("Anon", None))),
        ("PUT", format!("Patient/{pid}"), Some(patient("Anon", None))),
        ("DELETE", format!("Patient/{pid}"), None),
        (
            "POST",
            String::new(),
            Some(json!({ "resourceType": "Bundle", "type": "batch", "entry": [] })),
        ),
    ] {
        let r = s.call(None, method, &path, body, &[]).await;
        assert_unauthorized(&r, &format!("{method} /{path} without a token"));
    }
    let r = http()
        .post(s.url("Patient/_search"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("family=Anon")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401, "POST _search without a token");
    // Other schemes, an empty bearer, a token in the query string: no access.
    let basic = s
        .call(
            None,
            "GET",
            "Patient",
            None,
            &[("authorization", "Basic dXNlcjpwYXNz")],
        )
        .await;
    assert_unauthorized(&basic, "Basic authentication");
    let empty = s
        .call(
            None,
            "GET",
            "Patient",
            None,
            &[("authorization", "Bearer ")],
        )
        .await;
    assert_unauthorized(&empty, "an empty bearer token");
    let token = s.token.clone().unwrap();
    let query = s
        .call(
            None,
            "GET",
            &format!("Patient?access_token={token}"),
            None,
            &[],
        )
        .await;
    assert_unauthorized(&query, "a token in the query string");
    // The administration API needs a token too.
    let admin = s.call(None, "GET", "admin/users", None, &[]).await;
    assert_eq!(admin.status, 401, "{}", admin.text);
    // What is public stays public, and the data is there for a token.
    assert_eq!(s.call(None, "GET", "metadata", None, &[]).await.status, 200);
    let ok = s
        .call(Some(&token), "GET", &format!("Patient/{pid}"), None, &[])
        .await;
    assert_eq!(ok.status, 200, "{}", ok.text);
}

/// Tokens that were not issued by this server, or were altered, are refused.
#[tokio::test]
async fn forged_and_altered_tokens_are_refused() {
    let s = start().await;
    let pid = create(&s, patient("Forge", None)).await;
    let path = format!("Patient/{pid}");
    let valid = s.token.clone().unwrap();
    let header = jwt_part(&valid, 0);
    let claims = jwt_part(&valid, 1);
    let parts: Vec<&str> = valid.split('.').collect();
    let kid = header["kid"].as_str().unwrap().to_string();
    assert_eq!(header["alg"], "ES256");

    let mut forged: Vec<(String, String)> = Vec::new();
    // `alg: none`, no signature (and with the real signature left on).
    for alg in ["none", "None", "NONE"] {
        let h = b64_json(&json!({ "alg": alg, "typ": "JWT", "kid": kid }));
        forged.push((
            format!("alg {alg}, no signature"),
            format!("{h}.{}.", parts[1]),
        ));
        forged.push((
            format!("alg {alg}, signature kept"),
            format!("{h}.{}.{}", parts[1], parts[2]),
        ));
    }
    // HS256 with the server's public key material as the HMAC secret.
    let jwks = s
        .call(None, "GET", ".well-known/jwks.json", None, &[])
        .await;
    assert_eq!(jwks.status, 200);
    let jwk = jwks.body["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kid"] == kid.as_str())
        .expect("the token's key is published")
        .clone();
    let x = URL_SAFE_NO_PAD.decode(jwk["x"].as_str().unwrap()).unwrap();
    let y = URL_SAFE_NO_PAD.decode(jwk["y"].as_str().unwrap()).unwrap();
    let mut point = vec![4u8];
    point.extend_from_slice(&x);
    point.extend_from_slice(&y);
    // SubjectPublicKeyInfo of a P-256 key: a fixed prefix, then the point.
    let mut spki = vec![
        0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08,
        0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
    ];
    spki.extend_from_slice(&point);
    let pem = format!(
        "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
        base64::engine::general_purpose::STANDARD.encode(&spki)
    );
    let secrets: Vec<(&str, Vec<u8>)> = vec![
        ("the JWKS document", jwks.text.as_bytes().to_vec()),
        ("the JWK", serde_json::to_vec(&jwk).unwrap()),
        ("the uncompressed point", point.clone()),
        ("the SPKI DER", spki.clone()),
        ("the PEM public key", pem.as_bytes().to_vec()),
        (
            "x in base64url",
            jwk["x"].as_str().unwrap().as_bytes().to_vec(),
        ),
    ];
    for alg in [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512] {
        for (what, secret) in &secrets {
            let mut h = Header::new(alg);
            h.kid = Some(kid.clone());
            let t = jsonwebtoken::encode(&h, &claims, &EncodingKey::from_secret(secret)).unwrap();
            forged.push((format!("{alg:?} keyed with {what}"), t));
        }
    }
    // One character of the payload changed: in the encoded form, and a
    // digit of `exp` in the decoded form (a longer-lived token).
    let mut chars: Vec<char> = parts[1].chars().collect();
    let i = chars.len() / 2;
    chars[i] = if chars[i] == 'A' { 'B' } else { 'A' };
    forged.push((
        "one base64url character of the payload changed".into(),
        format!(
            "{}.{}.{}",
            parts[0],
            chars.into_iter().collect::<String>(),
            parts[2]
        ),
    ));
    let text = serde_json::to_string(&claims).unwrap();
    let exp = claims["exp"].as_i64().unwrap().to_string();
    let mut longer = exp.clone().into_bytes();
    longer[3] = if longer[3] == b'9' { b'8' } else { b'9' };
    let altered = text.replacen(
        &format!("\"exp\":{exp}"),
        &format!("\"exp\":{}", String::from_utf8(longer).unwrap()),
        1,
    );
    assert_ne!(altered, text);
    forged.push((
        "one digit of exp changed".into(),
        format!(
            "{}.{}.{}",
            parts[0],
            URL_SAFE_NO_PAD.encode(altered.as_bytes()),
            parts[2]
        ),
    ));
    // Elevated claims, re-encoded, with the original signature.
    let mut elevated = claims.clone();
    elevated["role"] = json!("admin");
    forged.push((
        "role changed to admin".into(),
        format!("{}.{}.{}", parts[0], b64_json(&elevated), parts[2]),
    ));
    let mut future = claims.clone();
    future["nbf"] = json!(now_secs() + 3600);
    forged.push((
        "nbf moved into the future".into(),
        format!("{}.{}.{}", parts[0], b64_json(&future), parts[2]),
    ));
    // Truncated and garbage tokens.
    forged.push((
        "signature removed".into(),
        format!("{}.{}.", parts[0], parts[1]),
    ));
    forged.push(("two segments".into(), format!("{}.{}", parts[0], parts[1])));
    forged.push(("garbage".into(), "not-a-token".into()));

    // A genuine token of another Custos server.
    let mut other = start().await;
    let foreign = other.sign_in_system().await;
    forged.push(("a token of another server".into(), foreign));
    // A token signed by a key the server never published, with its kid.
    let attacker = BackendClient::generate("attacker");
    let mut h = Header::new(Algorithm::ES256);
    h.kid = Some(kid.clone());
    let t = {
        let mut parts_by_attacker: Vec<String> = attacker
            .sign(&claims)
            .split('.')
            .map(str::to_string)
            .collect();
        parts_by_attacker[0] = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&h).unwrap());
        parts_by_attacker.join(".")
    };
    forged.push(("ES256 by another key under the server's kid".into(), t));

    for (what, token) in &forged {
        let r = s.call(Some(token), "GET", &path, None, &[]).await;
        assert_unauthorized(&r, what);
        let w = s
            .call(
                Some(token),
                "POST",
                "Patient",
                Some(patient("Forged", None)),
                &[],
            )
            .await;
        assert_eq!(w.status, 401, "{what} (write): {}", w.text);
    }
    // The genuine token still works.
    let ok = s.call(Some(&valid), "GET", &path, None, &[]).await;
    assert_eq!(ok.status, 200, "{}", ok.text);
}

/// Access tokens stop working once they expire (the server allows five
/// seconds of clock skew).
#[tokio::test]
async fn expired_tokens_are_refused() {
    let mut s = Server::start_with_config("[auth]\naccess_token_secs = 1\n");
    let token = s.sign_in_system().await;
    let claims = jwt_part(&token, 1);
    assert_eq!(
        claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(),
        1
    );
    let first = s.call(Some(&token), "GET", "Patient", None, &[]).await;
    assert_eq!(first.status, 200, "{}", first.text);
    // Past exp plus the skew allowance.
    let wait = claims["exp"].as_i64().unwrap() + 7 - now_secs();
    tokio::time::sleep(std::time::Duration::from_secs(wait.max(0) as u64)).await;
    let r = s.call(Some(&token), "GET", "Patient", None, &[]).await;
    assert_unauthorized(&r, "an expired token");
    assert!(
        r.header("www-authenticate")
            .unwrap()
            .contains("invalid_token"),
        "{:?}",
        r.header("www-authenticate")
    );
    // A token never used before it expired is refused too (no cache involved).
    let unused = {
        let c = BackendClient::generate("late");
        c.register(&s.dir, SYSTEM_SCOPE);
        c.token(&s.base, SYSTEM_SCOPE).await
    };
    tokio::time::sleep(std::time::Duration::from_secs(7)).await;
    let r = s.call(Some(&unused), "GET", "Patient", None, &[]).await;
    assert_unauthorized(&r, "an expired, never used token");
}

/// Client assertions (SMART Backend Services) are checked like tokens:
/// signature with a registered key, audience, lifetime, one use.
#[tokio::test]
async fn forged_client_assertions_are_refused() {
    let s = start().await;
    let client = BackendClient::generate("backend");
    client.register(&s.dir, SYSTEM_SCOPE);
    let base = s.base.clone();
    let exchange = |assertion: String| {
        let client = &client;
        let base = base.clone();
        async move {
            client
                .exchange(&http(), &base, &assertion, SYSTEM_SCOPE)
                .await
        }
    };
    let now = now_secs();
    let with = |changes: Value| {
        let mut c = client.claims(&base);
        for (k, v) in changes.as_object().unwrap() {
            if v.is_null() {
                c.as_object_mut().unwrap().remove(k);
            } else {
                c[k] = v.clone();
            }
        }
        client.sign(&c)
    };
    let cases: Vec<(&str, String)> = vec![
        (
            "expired",
            with(json!({ "exp": now - 60, "iat": now - 120 })),
        ),
        (
            "lives longer than five minutes",
            with(json!({ "exp": now + 3600 })),
        ),
        (
            "wrong audience",
            with(json!({ "aud": format!("{base}/other") })),
        ),
        (
            "audience of the FHIR base",
            with(json!({ "aud": base.clone() })),
        ),
        (
            "iss is another client",
            with(json!({ "iss": "test-system" })),
        ),
        (
            "sub is not the client",
            with(json!({ "sub": "someone-else" })),
        ),
        ("no jti", with(json!({ "jti": null }))),
        ("no exp", with(json!({ "exp": null }))),
    ];
    for (what, assertion) in cases {
        let r = exchange(assertion).await;
        assert_refused(&r, what);
    }
    // Signed by a key that is not registered (under the registered kid).
    let stranger = BackendClient::generate("backend");
    let forged = {
        let mut parts: Vec<String> = stranger
            .sign(&client.claims(&base))
            .split('.')
            .map(str::to_string)
            .collect();
        parts[0] = b64_json(&json!({ "alg": "ES256", "typ": "JWT", "kid": client.kid }));
        parts.join(".")
    };
    assert_refused(&exchange(forged).await, "an unregistered key");
    // alg none, and HS256 keyed with the client's public JWK.
    let claims = client.claims(&base);
    let none = format!(
        "{}.{}.",
        b64_json(&json!({ "alg": "none", "typ": "JWT", "kid": client.kid })),
        b64_json(&claims)
    );
    assert_refused(&exchange(none).await, "alg none");
    let jwk = client.jwks()["keys"][0].clone();
    let mut h = Header::new(Algorithm::HS256);
    h.kid = Some(client.kid.clone());
    let hs = jsonwebtoken::encode(
        &h,
        &claims,
        &EncodingKey::from_secret(&serde_json::to_vec(&jwk).unwrap()),
    )
    .unwrap();
    assert_refused(&exchange(hs).await, "HS256 keyed with the public JWK");
    // A proper assertion works once; replayed, it is refused.
    let good = client.sign(&client.claims(&base));
    let r = exchange(good.clone()).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["token_type"], "Bearer");
    assert_refused(&exchange(good).await, "a replayed assertion");
}

/// RFC 7523 §3: an assertion with `nbf` in the future MUST NOT be accepted.
#[tokio::test]
async fn client_assertions_not_yet_valid_are_refused() {
    let s = start().await;
    let client = BackendClient::generate("backend");
    client.register(&s.dir, SYSTEM_SCOPE);
    let mut claims = client.claims(&s.base);
    claims["nbf"] = json!(now_secs() + 120);
    let r = client
        .exchange(&http(), &s.base, &client.sign(&claims), SYSTEM_SCOPE)
        .await;
    assert_refused(&r, "an assertion with nbf two minutes ahead");
}

// ----------------------------------------------------------- accounts

/// `custos user lock` and `custos user revoke`, run while the server is up,
/// refuse the user's tokens from the next request on.
#[tokio::test]
async fn lock_and_revoke_take_effect_on_the_next_request() {
    let s = start().await;
    let pid = create(&s, patient("Locked", None)).await;
    let read = format!("Patient/{pid}");
    let locked = s.add_user("pat.lock", "patient", &[("--patient", &pid)]);
    let revoked = s.add_user("pat.revoke", "patient", &[("--patient", &pid)]);

    let t = locked.token(&s.base, PATIENT_SCOPE).await;
    assert_eq!(s.call(Some(&t), "GET", &read, None, &[]).await.status, 200);
    custos_ok(&["user", "lock", "--data-dir", &s.data(), "pat.lock"]);
    let r = s.call(Some(&t), "GET", &read, None, &[]).await;
    assert_unauthorized(&r, "a token of a locked account");
    // The right password and the current code (not taken from the
    // test's supply of fresh codes: a locked account never gets to use it).
    let now_code = locked.code_at_step(now_secs() as u64 / 30);
    let again = locked
        .password_grant(
            &s.base,
            &locked.password,
            Some(&now_code),
            PATIENT_SCOPE,
            &[],
        )
        .await;
    assert_refused(&again, "sign-in of a locked account");
    custos_ok(&["user", "unlock", "--data-dir", &s.data(), "pat.lock"]);
    // The lock revoked every token issued up to the second after it
    // (tokens carry whole seconds): sign in again after that second.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let fresh = locked.token(&s.base, PATIENT_SCOPE).await;
    assert_eq!(
        s.call(Some(&fresh), "GET", &read, None, &[]).await.status,
        200,
        "unlocked, the user signs in again"
    );

    let answer = revoked
        .sign_in(&s.base, &format!("{PATIENT_SCOPE} offline_access"), &[])
        .await;
    let t = token_of(&answer);
    let refresh_token = answer.body["refresh_token"].as_str().unwrap().to_string();
    assert_eq!(s.call(Some(&t), "GET", &read, None, &[]).await.status, 200);
    custos_ok(&["user", "revoke", "--data-dir", &s.data(), "pat.revoke"]);
    let r = s.call(Some(&t), "GET", &read, None, &[]).await;
    assert_unauthorized(&r, "a revoked token");
    assert_refused(
        &refresh(&s, &refresh_token, None).await,
        "a refresh token issued before the revocation",
    );
    // Tokens issued after the revocation work.
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let fresh = revoked.token(&s.base, PATIENT_SCOPE).await;
    assert_eq!(
        s.call(Some(&fresh), "GET", &read, None, &[]).await.status,
        200
    );
}

/// A lock is a response to a compromise: the tokens it refused must not
/// come back to life when the account is unlocked.
#[tokio::test]
async fn tokens_refused_by_a_lock_stay_refused_after_unlock() {
    let s = start().await;
    let pid = create(&s, patient("Relock", None)).await;
    let user = s.add_user("pat.relock", "patient", &[("--patient", &pid)]);
    let t = user.token(&s.base, PATIENT_SCOPE).await;
    let read = format!("Patient/{pid}");
    assert_eq!(s.call(Some(&t), "GET", &read, None, &[]).await.status, 200);
    custos_ok(&["user", "lock", "--data-dir", &s.data(), "pat.relock"]);
    assert_eq!(s.call(Some(&t), "GET", &read, None, &[]).await.status, 401);
    custos_ok(&["user", "unlock", "--data-dir", &s.data(), "pat.relock"]);
    let r = s.call(Some(&t), "GET", &read, None, &[]).await;
    assert_unauthorized(&r, "a token issued before the lock, after unlock");
}

/// Server read-only mode (`custos read-only on`): writes answer 503 with an
/// OperationOutcome, reads go on; `off` restores writes. A read-only user
/// may only read.
#[tokio::test]
async fn read_only_mode_refuses_writes_and_keeps_reads() {
    let s = start().await;
    let gp = create(&s, practitioner("Readonly")).await;
    let pid = create(&s, patient("Readonly", Some(&gp))).await;
    let obs = create(&s, observation(&pid, None)).await;
    let doctor = s.add_user("dr.readonly", "physician", &[("--practitioner", &gp)]);
    let dt = doctor.token(&s.base, USER_SCOPE).await;
    let sys = system(&s);

    custos_ok(&[
        "read-only",
        "--data-dir",
        &s.data(),
        "on",
        "--reason",
        "incident",
    ]);
    let mut p = s
        .call(sys, "GET", &format!("Patient/{pid}"), None, &[])
        .await
        .body;
    p["gender"] = json!("other");
    let writes: Vec<(&str, String, Option<Value>)> = vec![
        ("POST", "Patient".into(), Some(patient("New", None))),
        ("PUT", format!("Patient/{pid}"), Some(p.clone())),
        ("DELETE", format!("Observation/{obs}"), None),
        (
            "POST",
            String::new(),
            Some(
                json!({ "resourceType": "Bundle", "type": "transaction", "entry": [
                    { "resource": patient("Txn", None), "request": { "method": "POST", "url": "Patient" } }
                ]}),
            ),
        ),
    ];
    for (method, path, body) in &writes {
        for (who, token) in [("system", sys), ("physician", Some(dt.as_str()))] {
            let r = s.call(token, method, path, body.clone(), &[]).await;
            assert_eq!(
                r.status, 503,
                "{who} {method} /{path} in read-only mode: {}",
                r.text
            );
            assert!(is_outcome(&r.body), "{}", r.text);
        }
    }
    for path in [
        format!("Patient/{pid}"),
        format!("Observation/{obs}"),
        "Patient?family=Readonly".to_string(),
        format!("Patient/{pid}/_history"),
    ] {
        let r = s.call(sys, "GET", &path, None, &[]).await;
        assert_eq!(r.status, 200, "GET /{path} in read-only mode: {}", r.text);
        let r = s.call(Some(&dt), "GET", &path, None, &[]).await;
        assert_eq!(
            r.status, 200,
            "physician GET /{path} in read-only mode: {}",
            r.text
        );
    }
    let r = s
        .call(sys, "GET", &format!("Observation/{obs}"), None, &[])
        .await;
    assert_eq!(r.status, 200, "the refused delete changed nothing");
    custos_ok(&["read-only", "--data-dir", &s.data(), "off"]);
    let r = s
        .call(sys, "POST", "Patient", Some(patient("After", None)), &[])
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    let r = s
        .call(
            Some(&dt),
            "POST",
            "Observation",
            Some(observation(&pid, None)),
            &[],
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);

    // One user restricted to reading.
    custos_ok(&[
        "user",
        "read-only",
        "--data-dir",
        &s.data(),
        "dr.readonly",
        "on",
    ]);
    let r = s
        .call(
            Some(&dt),
            "POST",
            "Observation",
            Some(observation(&pid, None)),
            &[],
        )
        .await;
    assert_eq!(r.status, 403, "a read-only user writes: {}", r.text);
    assert!(is_outcome(&r.body));
    let r = s
        .call(Some(&dt), "GET", &format!("Patient/{pid}"), None, &[])
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = s
        .call(sys, "POST", "Patient", Some(patient("Others", None)), &[])
        .await;
    assert_eq!(r.status, 201, "others still write: {}", r.text);
    custos_ok(&[
        "user",
        "read-only",
        "--data-dir",
        &s.data(),
        "dr.readonly",
        "off",
    ]);
    let r = s
        .call(
            Some(&dt),
            "POST",
            "Observation",
            Some(observation(&pid, None)),
            &[],
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
}

/// Five wrong passwords, or five wrong TOTP codes, lock the account: the
/// sixth attempt is refused even with the right password and code.
#[tokio::test]
async fn guessing_passwords_or_codes_locks_the_account() {
    let s = Server::start();
    let pw = s.add_user("guess.pw", "patient", &[("--patient", "p1")]);
    let code = s.add_user("guess.totp", "patient", &[("--patient", "p2")]);
    let mixed = s.add_user("guess.mixed", "patient", &[("--patient", "p3")]);

    // Unknown users and wrong passwords look the same.
    let unknown = User::unknown("nobody-here");
    let a = unknown
        .password_grant(
            &s.base,
            "a-wrong-password",
            Some("000000"),
            PATIENT_SCOPE,
            &[],
        )
        .await;
    let b = pw
        .password_grant(
            &s.base,
            "a-wrong-password",
            Some("000000"),
            PATIENT_SCOPE,
            &[],
        )
        .await;
    assert_refused(&a, "an unknown user");
    assert_refused(&b, "a wrong password");
    assert_eq!(
        (a.status, &a.body),
        (b.status, &b.body),
        "nothing tells them apart"
    );

    for i in 2..=5 {
        let r = pw
            .password_grant(
                &s.base,
                &format!("wrong-password-{i}"),
                None,
                PATIENT_SCOPE,
                &[],
            )
            .await;
        assert_refused(&r, &format!("wrong password {i}"));
    }
    let sixth = pw.sign_in(&s.base, PATIENT_SCOPE, &[]).await;
    assert_refused(&sixth, "the right password after five wrong ones");

    for i in 1..=5 {
        let wrong = code.wrong_code();
        let r = code
            .password_grant(&s.base, &code.password, Some(&wrong), PATIENT_SCOPE, &[])
            .await;
        assert_refused(&r, &format!("wrong TOTP code {i}"));
    }
    let sixth = code.sign_in(&s.base, PATIENT_SCOPE, &[]).await;
    assert_refused(&sixth, "the right password and code after five wrong codes");

    for i in 1..=5 {
        let r = if i % 2 == 0 {
            mixed
                .password_grant(&s.base, "not-the-password", None, PATIENT_SCOPE, &[])
                .await
        } else {
            let wrong = mixed.wrong_code();
            mixed
                .password_grant(&s.base, &mixed.password, Some(&wrong), PATIENT_SCOPE, &[])
                .await
        };
        assert_refused(&r, &format!("mixed failure {i}"));
    }
    assert_refused(
        &mixed.sign_in(&s.base, PATIENT_SCOPE, &[]).await,
        "the right credentials after five mixed failures",
    );

    let list: Value = serde_json::from_str(&custos_ok(&[
        "user",
        "list",
        "--data-dir",
        &s.data(),
        "--json",
    ]))
    .unwrap();
    for name in ["guess.pw", "guess.totp", "guess.mixed"] {
        let u = list
            .as_array()
            .unwrap()
            .iter()
            .find(|u| u["username"] == name)
            .unwrap();
        assert!(u["locked_until"].as_i64().unwrap() > now_secs(), "{u}");
    }
    // A security officer lifts the lockout.
    custos_ok(&["user", "unlock", "--data-dir", &s.data(), "guess.pw"]);
    let r = pw.sign_in(&s.base, PATIENT_SCOPE, &[]).await;
    assert_eq!(r.status, 200, "{}", r.text);
}

/// A refresh token is good once: presented again, it is refused and its
/// whole family — the token issued in exchange and the session's access
/// tokens — is revoked.
#[tokio::test]
async fn refresh_token_reuse_revokes_the_family() {
    let s = start().await;
    let pid = create(&s, patient("Refresh", None)).await;
    let read = format!("Patient/{pid}");
    let user = s.add_user("pat.refresh", "patient", &[("--patient", &pid)]);
    let first = user
        .sign_in(&s.base, &format!("{PATIENT_SCOPE} offline_access"), &[])
        .await;
    let a1 = token_of(&first);
    let r1 = first.body["refresh_token"].as_str().unwrap().to_string();
    let second = refresh(&s, &r1, None).await;
    let a2 = token_of(&second);
    let r2 = second.body["refresh_token"].as_str().unwrap().to_string();
    assert_ne!(r1, r2, "refresh tokens rotate");
    assert_eq!(s.call(Some(&a2), "GET", &read, None, &[]).await.status, 200);

    assert_refused(&refresh(&s, &r1, None).await, "a refresh token used twice");
    assert_refused(
        &refresh(&s, &r2, None).await,
        "the refresh token issued for the replayed one",
    );
    assert_unauthorized(
        &s.call(Some(&a2), "GET", &read, None, &[]).await,
        "an access token of the revoked session",
    );
    assert_unauthorized(
        &s.call(Some(&a1), "GET", &read, None, &[]).await,
        "the first access token of the revoked session",
    );
    assert_refused(
        &refresh(&s, "made-up-refresh-token", None).await,
        "an unknown refresh token",
    );

    // A refresh may narrow the grant, never widen it.
    let other = user
        .sign_in(&s.base, &format!("{PATIENT_SCOPE} offline_access"), &[])
        .await;
    let r3 = other.body["refresh_token"].as_str().unwrap().to_string();
    let wider = refresh(&s, &r3, Some("user/*.cruds patient/*.cruds system/*.cruds")).await;
    if wider.status == 200 {
        let scope = wider.body["scope"].as_str().unwrap();
        for asked in ["user/*.cruds", "patient/*.cruds", "system/*.cruds"] {
            assert!(
                !scope.split(' ').any(|g| g == asked),
                "refresh widened to {scope}"
            );
        }
        let t = token_of(&wider);
        let w = s
            .call(
                Some(&t),
                "POST",
                "Observation",
                Some(observation(&pid, None)),
                &[],
            )
            .await;
        assert_eq!(w.status, 403, "{}", w.text);
    }
}

/// Scopes are capped by the client's registration and by who asks: a
/// person never gets `system/`, a backend client never more than it was
/// registered with.
#[tokio::test]
async fn scopes_cannot_be_escalated() {
    let s = start().await;
    let pid = create(&s, patient("Scope", None)).await;
    let obs = create(&s, observation(&pid, None)).await;
    let clerk = s.add_user("clerk.scope", "registration-clerk", &[]);

    let only_system = clerk.sign_in(&s.base, "system/*.cruds", &[]).await;
    if only_system.status == 200 {
        let scope = only_system.body["scope"].as_str().unwrap_or_default();
        assert!(!scope.contains("system/"), "a person was granted {scope}");
    } else {
        assert_refused(&only_system, "a password grant for system/*.cruds only");
    }
    let answer = clerk
        .sign_in(&s.base, "system/*.cruds user/Patient.rs", &[])
        .await;
    let t = token_of(&answer);
    let scope = answer.body["scope"].as_str().unwrap();
    assert!(!scope.contains("system/"), "a person was granted {scope}");
    assert_eq!(scope, "user/Patient.rs");
    assert!(
        !jwt_part(&t, 1)["scope"]
            .as_str()
            .unwrap()
            .contains("system/")
    );
    assert_eq!(
        s.call(Some(&t), "GET", &format!("Patient/{pid}"), None, &[])
            .await
            .status,
        200
    );
    for (method, path, body) in [
        (
            "POST",
            "Patient".to_string(),
            Some(patient("Escalate", None)),
        ),
        ("DELETE", format!("Patient/{pid}"), None),
        ("GET", format!("Observation/{obs}"), None),
        ("GET", "Observation".to_string(), None),
        ("GET", "_history".to_string(), None),
    ] {
        let r = s.call(Some(&t), method, &path, body, &[]).await;
        assert_eq!(
            r.status, 403,
            "{method} /{path} beyond user/Patient.rs: {}",
            r.text
        );
    }

    // A backend client registered with system/Patient.rs.
    let narrow = BackendClient::generate("narrow");
    narrow.register(&s.dir, "system/Patient.rs");
    let wide = narrow.request_token(&s.base, "system/*.cruds").await;
    if wide.status == 200 {
        assert_eq!(wide.body["scope"], "system/Patient.rs", "{}", wide.text);
    } else {
        assert_refused(&wide, "system/*.cruds beyond the registration");
    }
    for asked in [
        "system/Patient.cruds",
        "system/Observation.rs",
        "user/*.cruds",
    ] {
        let r = narrow.request_token(&s.base, asked).await;
        if r.status == 200 {
            assert_eq!(
                r.body["scope"], "system/Patient.rs",
                "asked {asked}: {}",
                r.text
            );
        } else {
            assert_refused(&r, asked);
        }
    }
    let answer = narrow
        .request_token(
            &s.base,
            "system/*.cruds system/Patient.rs system/Observation.rs",
        )
        .await;
    let t = token_of(&answer);
    assert_eq!(answer.body["scope"], "system/Patient.rs");
    let ok = s
        .call(Some(&t), "GET", &format!("Patient/{pid}"), None, &[])
        .await;
    assert_eq!(ok.status, 200, "{}", ok.text);
    let ok = s
        .call(Some(&t), "GET", "Patient?family=Scope", None, &[])
        .await;
    assert_eq!(ok.status, 200, "{}", ok.text);
    for (method, path, body) in [
        (
            "POST",
            "Patient".to_string(),
            Some(patient("Escalate", None)),
        ),
        ("DELETE", format!("Patient/{pid}"), None),
        ("GET", format!("Observation/{obs}"), None),
        ("GET", "Observation".to_string(), None),
    ] {
        let r = s.call(Some(&t), method, &path, body, &[]).await;
        assert_eq!(
            r.status, 403,
            "{method} /{path} beyond system/Patient.rs: {}",
            r.text
        );
    }
    // An unregistered client gets nothing.
    let stranger = BackendClient::generate("never-registered");
    assert_refused(
        &stranger.request_token(&s.base, SYSTEM_SCOPE).await,
        "an unregistered client",
    );
}

// ------------------------------------------------------ patient data

/// Patient A's token never reaches patient B's data: not by read, search,
/// `_include`/`_revinclude`, history, batch or transaction.
#[tokio::test]
async fn a_patient_sees_only_their_own_record() {
    let s = start().await;
    let gp = create(&s, practitioner("Isolation")).await;
    let a = create(&s, patient("Alpha", Some(&gp))).await;
    let b = create(&s, patient("Bravo", None)).await;
    let a_obs = [
        create(&s, observation(&a, None)).await,
        // A's observation naming B as performer: B must not come with it.
        create(&s, observation(&a, Some(&format!("Patient/{b}")))).await,
    ];
    let b_obs = [
        create(&s, observation(&b, None)).await,
        create(&s, observation(&b, None)).await,
        // B's observation naming A as performer: still B's.
        create(&s, observation(&b, Some(&format!("Patient/{a}")))).await,
    ];
    let mut b_refs: BTreeSet<String> = b_obs.iter().map(|o| format!("Observation/{o}")).collect();
    b_refs.insert(format!("Patient/{b}"));
    let a_obs_refs: BTreeSet<String> = a_obs.iter().map(|o| format!("Observation/{o}")).collect();

    let user = s.add_user("pat.alpha", "patient", &[("--patient", &a)]);
    let answer = user
        .sign_in(&s.base, PATIENT_SCOPE, &[("patient", b.as_str())])
        .await;
    let t = token_of(&answer);
    assert_eq!(
        answer.body["patient"],
        a.as_str(),
        "a patient's launch patient is themself"
    );
    let me = Some(t.as_str());
    let no_b = |what: &str, r: &Resp| {
        let got = entry_refs(&r.body);
        let leaked: Vec<&String> = got.intersection(&b_refs).collect();
        assert!(leaked.is_empty(), "{what} leaked {leaked:?}: {}", r.text);
        assert!(
            !r.text.contains("Bravo"),
            "{what} shows B's name: {}",
            r.text
        );
    };

    // Direct reads: B does not exist for them.
    assert_eq!(
        s.call(me, "GET", &format!("Patient/{a}"), None, &[])
            .await
            .status,
        200
    );
    for path in [
        format!("Patient/{b}"),
        format!("Observation/{}", b_obs[0]),
        format!("Patient/{b}/_history/1"),
        format!("Observation/{}/_history/1", b_obs[2]),
    ] {
        let r = s.call(me, "GET", &path, None, &[]).await;
        assert_eq!(r.status, 404, "GET /{path}: {}", r.text);
        assert!(!r.text.contains("Bravo"), "{}", r.text);
        // Claiming an emergency changes nothing for a patient.
        let r = s
            .call(
                me,
                "GET",
                &path,
                None,
                &[("x-break-glass-reason", "emergency")],
            )
            .await;
        assert_eq!(r.status, 404, "GET /{path} breaking the glass: {}", r.text);
    }
    for path in [
        format!("Patient/{b}/_history"),
        format!("Observation/{}/_history", b_obs[0]),
    ] {
        let r = s.call(me, "GET", &path, None, &[]).await;
        assert!(
            r.status == 404 || r.status == 403,
            "GET /{path}: {} {}",
            r.status,
            r.text
        );
        no_b(&path, &r);
    }

    // Searches: only A's, and totals count only A's.
    let search = |q: &'static str| {
        let s = &s;
        async move {
            let r = s.call(me, "GET", q, None, &[]).await;
            assert_eq!(r.status, 200, "{q}: {}", r.text);
            r
        }
    };
    let r = search("Observation").await;
    no_b("Observation", &r);
    assert_eq!(entry_refs(&r.body), a_obs_refs);
    assert_eq!(r.body["total"], 2);
    let r = search("Observation?_summary=count").await;
    assert_eq!(r.body["total"], 2, "{}", r.text);
    let r = search("Patient").await;
    assert_eq!(entry_refs(&r.body), set(&[format!("Patient/{a}")]));
    assert_eq!(r.body["total"], 1);
    let r = s
        .call(me, "GET", &format!("Patient?_id={b}"), None, &[])
        .await;
    assert_eq!(
        (r.status, r.body["total"].as_u64()),
        (200, Some(0)),
        "{}",
        r.text
    );
    let r = s
        .call(
            me,
            "GET",
            &format!("Observation?patient=Patient/{b}"),
            None,
            &[],
        )
        .await;
    assert_eq!(
        (r.status, r.body["total"].as_u64()),
        (200, Some(0)),
        "{}",
        r.text
    );
    let r = s
        .call(
            me,
            "GET",
            &format!("Observation?performer=Patient/{a}"),
            None,
            &[],
        )
        .await;
    assert_eq!(r.status, 200);
    no_b("Observation?performer=A", &r);
    assert_eq!(
        r.body["total"], 0,
        "B's observation naming A stays B's: {}",
        r.text
    );
    let r = s
        .call(
            me,
            "POST",
            "Observation/_search",
            None,
            &[("content-type", "application/x-www-form-urlencoded")],
        )
        .await;
    assert!(r.status == 200 || r.status == 415, "{}", r.text);
    no_b("POST Observation/_search", &r);

    // _include and _revinclude bring nothing of B.
    for q in [
        "Observation?_include=Observation:performer",
        "Observation?_include=Observation:subject",
        "Observation?_include=Observation:performer:Patient",
        "Patient?_revinclude=Observation:subject",
        "Patient?_revinclude=Observation:performer",
        "Patient?_revinclude=Observation:performer:Patient",
    ] {
        let r = search(q).await;
        no_b(q, &r);
    }
    let r = search("Patient?_revinclude=Observation:subject").await;
    let mut want = a_obs_refs.clone();
    want.insert(format!("Patient/{a}"));
    assert_eq!(entry_refs(&r.body), want);
    assert_eq!(r.body["total"], 1, "the total counts matches only");

    // History.
    for q in ["Observation/_history", "Patient/_history", "_history"] {
        let r = s.call(me, "GET", q, None, &[]).await;
        if r.status == 200 {
            no_b(q, &r);
        } else {
            assert_eq!(r.status, 403, "{q}: {}", r.text);
        }
    }
    let r = search("Observation/_history").await;
    assert_eq!(entry_refs(&r.body), a_obs_refs);
    assert_eq!(r.body["total"], 2, "{}", r.text);
    let r = search("Patient/_history").await;
    assert_eq!(r.body["total"], 1, "{}", r.text);

    // Batch entries touching B are refused one by one.
    let batch = json!({ "resourceType": "Bundle", "type": "batch", "entry": [
        { "request": { "method": "GET", "url": format!("Patient/{b}") } },
        { "request": { "method": "GET", "url": format!("Observation/{}", b_obs[0]) } },
        { "request": { "method": "GET", "url": format!("Observation?patient=Patient/{b}") } },
        { "request": { "method": "GET", "url": format!("Patient/{b}/_history") } },
        { "request": { "method": "GET", "url": format!("Patient/{a}") } },
    ]});
    let r = s.call(me, "POST", "", Some(batch), &[]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    no_b("batch", &r);
    let entries = r.body["entry"].as_array().unwrap();
    for (i, e) in entries.iter().enumerate().take(2) {
        let status = e["response"]["status"].as_str().unwrap();
        assert!(
            status.starts_with("404") || status.starts_with("403"),
            "entry {i}: {e}"
        );
    }
    assert!(
        entry_refs(&entries[2]["resource"]).is_empty(),
        "{}",
        entries[2]
    );
    assert!(
        entries[4]["response"]["status"]
            .as_str()
            .unwrap()
            .starts_with("200")
    );

    // A transaction touching B is refused as a whole.
    let mut bravo = s
        .call(system(&s), "GET", &format!("Patient/{b}"), None, &[])
        .await
        .body;
    bravo["name"][0]["family"] = json!("Hijacked");
    let txn = json!({ "resourceType": "Bundle", "type": "transaction", "entry": [
        { "resource": bravo, "request": { "method": "PUT", "url": format!("Patient/{b}") } },
    ]});
    let r = s.call(me, "POST", "", Some(txn), &[]).await;
    assert!(r.status == 403 || r.status == 404, "{}", r.text);
    no_b("transaction", &r);
    let txn = json!({ "resourceType": "Bundle", "type": "transaction", "entry": [
        { "request": { "method": "GET", "url": format!("Patient/{b}") } },
    ]});
    let r = s.call(me, "POST", "", Some(txn), &[]).await;
    assert!(r.status == 403 || r.status == 404, "{}", r.text);
    no_b("transaction read", &r);

    // Asking for more scope does not help a patient either.
    let wide = user.token(&s.base, "user/*.cruds").await;
    let r = s
        .call(Some(&wide), "GET", &format!("Patient/{b}"), None, &[])
        .await;
    assert!(r.status == 404 || r.status == 403, "{}", r.text);
    let r = s
        .call(
            Some(&wide),
            "POST",
            "Observation",
            Some(observation(&a, None)),
            &[],
        )
        .await;
    assert_eq!(r.status, 403, "a patient writes: {}", r.text);
    let r = s.call(Some(&wide), "GET", "Observation", None, &[]).await;
    no_b("Observation with user/*.cruds", &r);

    // B is untouched.
    let r = s
        .call(system(&s), "GET", &format!("Patient/{b}"), None, &[])
        .await;
    assert_eq!(r.body["name"][0]["family"], "Bravo");
}

/// A clinician's writes reach only patients in their care: a transaction
/// touching another patient fails whole, a batch entry fails alone.
#[tokio::test]
async fn a_clinician_writes_only_for_patients_in_their_care() {
    let s = start().await;
    let gp = create(&s, practitioner("Writer")).await;
    let a = create(&s, patient("Cared", Some(&gp))).await;
    let b = create(&s, patient("Stranger", None)).await;
    let b_obs = create(&s, observation(&b, None)).await;
    let doctor = s.add_user("dr.writer", "physician", &[("--practitioner", &gp)]);
    let t = doctor.token(&s.base, USER_SCOPE).await;
    let me = Some(t.as_str());
    let count = |p: String| {
        let s = &s;
        async move {
            let r = s
                .call(
                    system(s),
                    "GET",
                    &format!("Observation?patient=Patient/{p}&_summary=count"),
                    None,
                    &[],
                )
                .await;
            r.body["total"].as_u64().unwrap()
        }
    };
    let (a0, b0) = (count(a.clone()).await, count(b.clone()).await);

    let txn = json!({ "resourceType": "Bundle", "type": "transaction", "entry": [
        { "resource": observation(&a, None), "request": { "method": "POST", "url": "Observation" } },
        { "resource": observation(&b, None), "request": { "method": "POST", "url": "Observation" } },
    ]});
    let r = s.call(me, "POST", "", Some(txn), &[]).await;
    assert_eq!(r.status, 403, "{}", r.text);
    assert!(is_outcome(&r.body));
    assert_eq!(
        (count(a.clone()).await, count(b.clone()).await),
        (a0, b0),
        "all or nothing"
    );

    let txn = json!({ "resourceType": "Bundle", "type": "transaction", "entry": [
        { "request": { "method": "DELETE", "url": format!("Patient/{b}") } },
    ]});
    let r = s.call(me, "POST", "", Some(txn), &[]).await;
    assert_eq!(r.status, 403, "{}", r.text);
    let r = s
        .call(system(&s), "GET", &format!("Patient/{b}"), None, &[])
        .await;
    assert_eq!(r.status, 200, "B survived");

    let batch = json!({ "resourceType": "Bundle", "type": "batch", "entry": [
        { "resource": observation(&a, None), "request": { "method": "POST", "url": "Observation" } },
        { "resource": observation(&b, None), "request": { "method": "POST", "url": "Observation" } },
    ]});
    let r = s.call(me, "POST", "", Some(batch), &[]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(
        r.body["entry"][0]["response"]["status"]
            .as_str()
            .unwrap()
            .starts_with("201")
    );
    assert!(
        r.body["entry"][1]["response"]["status"]
            .as_str()
            .unwrap()
            .starts_with("403"),
        "{}",
        r.body["entry"][1]
    );
    assert_eq!(
        (count(a.clone()).await, count(b.clone()).await),
        (a0 + 1, b0)
    );

    // Conditional creates and references that match B's records neither
    // hand them out nor write into B's record.
    let mut bp = patient("Stranger", None);
    bp["identifier"] = json!([{ "system": "urn:mrn", "value": "MRN-B" }]);
    let mut put = bp.clone();
    put["id"] = json!(b);
    let r = s
        .call(system(&s), "PUT", &format!("Patient/{b}"), Some(put), &[])
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    for (path, cond, body) in [
        (
            "Patient",
            "identifier=urn:mrn|MRN-B".to_string(),
            patient("Probe", None),
        ),
        ("Patient", format!("_id={b}"), patient("Probe", None)),
        (
            "Observation",
            format!("patient=Patient/{b}"),
            observation(&a, None),
        ),
    ] {
        let r = s
            .call(
                me,
                "POST",
                path,
                Some(body),
                &[("if-none-exist", cond.as_str())],
            )
            .await;
        assert_ne!(
            r.status, 200,
            "If-None-Exist {cond} returned B's record: {}",
            r.text
        );
        assert!(
            !r.text.contains("Stranger") && !r.text.contains(&b_obs),
            "{}",
            r.text
        );
    }
    let txn = json!({ "resourceType": "Bundle", "type": "transaction", "entry": [
        { "resource": { "resourceType": "Observation", "status": "final", "code": { "text": "x" },
                        "subject": { "reference": "Patient?identifier=urn:mrn|MRN-B" } },
          "request": { "method": "POST", "url": "Observation" } },
    ]});
    let r = s.call(me, "POST", "", Some(txn), &[]).await;
    // The criteria search only what the caller may see: B's record is not
    // found (412, "matches no resource"), as if it did not exist.
    assert_eq!(
        r.status, 412,
        "a conditional reference into B's record: {}",
        r.text
    );
    assert!(r.text.contains("matches no resource"), "{}", r.text);
    assert_eq!(count(b.clone()).await, b0);

    // Direct writes on B, or moving a resource into A's record from B's.
    let r = s
        .call(me, "POST", "Observation", Some(observation(&b, None)), &[])
        .await;
    assert_eq!(r.status, 403, "{}", r.text);
    let mut moved = observation(&a, None);
    moved["id"] = json!(b_obs);
    let r = s
        .call(me, "PUT", &format!("Observation/{b_obs}"), Some(moved), &[])
        .await;
    assert_eq!(r.status, 403, "taking over B's observation: {}", r.text);
    let r = s
        .call(me, "DELETE", &format!("Observation/{b_obs}"), None, &[])
        .await;
    assert_eq!(r.status, 403, "{}", r.text);
    let r = s
        .call(
            system(&s),
            "GET",
            &format!("Observation/{b_obs}"),
            None,
            &[],
        )
        .await;
    assert_eq!(r.body["subject"]["reference"], format!("Patient/{b}"));
}

/// A physician reaches the patients in their care — general practitioner,
/// active CareTeam, recent Encounter — and no one else, unless they break
/// the glass with a stated reason.
#[tokio::test]
async fn care_relationships_and_breaking_the_glass() {
    let s = start().await;
    let p1 = create(&s, practitioner("One")).await;
    let p2 = create(&s, practitioner("Two")).await;
    let p3 = create(&s, practitioner("Three")).await;
    let p4 = create(&s, practitioner("Four")).await;
    let a = create(&s, patient("GpOfOne", Some(&p1))).await;
    let b = create(&s, patient("Nobody", None)).await;
    let c = create(&s, patient("TeamOfTwo", None)).await;
    create(&s, care_team(&c, &p2, "active")).await;
    let d = create(&s, patient("SeenByThree", None)).await;
    create(
        &s,
        encounter(&d, &p3, json!({ "start": "2024-01-01T09:00:00Z" })),
    )
    .await;
    let e = create(&s, patient("FormerTeamOfFour", None)).await;
    create(&s, care_team(&e, &p4, "inactive")).await;
    let f = create(&s, patient("LongAgoFour", None)).await;
    create(
        &s,
        encounter(
            &f,
            &p4,
            json!({ "start": "2019-01-01T09:00:00Z", "end": "2019-01-01T10:00:00Z" }),
        ),
    )
    .await;
    let b_obs = create(&s, observation(&b, None)).await;

    let dr1 = s.add_user("dr.one", "physician", &[("--practitioner", &p1)]);
    let dr2 = s.add_user("dr.two", "physician", &[("--practitioner", &p2)]);
    let dr3 = s.add_user("dr.three", "physician", &[("--practitioner", &p3)]);
    let dr4 = s.add_user("dr.four", "physician", &[("--practitioner", &p4)]);
    let t1 = dr1.token(&s.base, USER_SCOPE).await;
    let t2 = dr2.token(&s.base, USER_SCOPE).await;
    let t3 = dr3.token(&s.base, USER_SCOPE).await;
    let t4 = dr4.token(&s.base, USER_SCOPE).await;
    let read = |t: &str, p: &str| {
        let s = &s;
        let (t, p) = (t.to_string(), p.to_string());
        async move {
            s.call(Some(&t), "GET", &format!("Patient/{p}"), None, &[])
                .await
        }
    };

    assert_eq!(read(&t1, &a).await.status, 200, "general practitioner");
    assert_eq!(read(&t2, &c).await.status, 200, "active CareTeam");
    assert_eq!(read(&t3, &d).await.status, 200, "Encounter");
    for (t, p, what) in [
        (&t1, &b, "no relationship"),
        (&t1, &c, "another physician's CareTeam"),
        (&t2, &a, "another physician's patient"),
        (&t4, &e, "an inactive CareTeam"),
        (&t4, &f, "an Encounter that ended years ago"),
    ] {
        let r = read(t, p).await;
        assert_eq!(r.status, 403, "{what}: {}", r.text);
        assert!(is_outcome(&r.body), "{}", r.text);
    }
    let r = s
        .call(Some(&t1), "GET", &format!("Observation/{b_obs}"), None, &[])
        .await;
    assert_eq!(r.status, 403, "{}", r.text);
    let r = s.call(Some(&t1), "GET", "Patient", None, &[]).await;
    assert_eq!(
        entry_refs(&r.body),
        set(&[format!("Patient/{a}")]),
        "{}",
        r.text
    );
    assert_eq!(r.body["total"], 1);

    // Naming B as the launch patient of patient/ scopes opens nothing.
    let launch = dr1
        .sign_in(&s.base, PATIENT_SCOPE, &[("patient", b.as_str())])
        .await;
    if launch.status == 200 {
        let lt = token_of(&launch);
        let r = s
            .call(Some(&lt), "GET", &format!("Patient/{b}"), None, &[])
            .await;
        assert!(
            r.status == 403 || r.status == 404,
            "launch patient B: {}",
            r.text
        );
        let r = s.call(Some(&lt), "GET", "Observation", None, &[]).await;
        assert!(
            entry_refs(&r.body).is_empty(),
            "launch patient B: {}",
            r.text
        );
    } else {
        assert_refused(&launch, "a launch patient without a relationship");
    }

    // Breaking the glass: a stated reason opens B (recorded, time-limited).
    let r = s
        .call(
            Some(&t1),
            "GET",
            &format!("Patient/{b}"),
            None,
            &[(
                "x-break-glass-reason",
                "unconscious patient in the emergency department",
            )],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["id"], b.as_str());
    assert_eq!(read(&t1, &b).await.status, 200, "the grant lasts a while");
    let r = s
        .call(Some(&t1), "GET", &format!("Observation/{b_obs}"), None, &[])
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = s.call(Some(&t1), "GET", "Patient", None, &[]).await;
    assert_eq!(
        entry_refs(&r.body),
        set(&[format!("Patient/{a}"), format!("Patient/{b}")]),
        "{}",
        r.text
    );
    // Only for that patient, and only for that physician.
    assert_eq!(read(&t1, &c).await.status, 403);
    assert_eq!(read(&t2, &b).await.status, 403);
    let r = s
        .call(
            Some(&t2),
            "GET",
            &format!("Patient/{b}"),
            None,
            &[("x-break-glass-reason", "  ")],
        )
        .await;
    assert_eq!(r.status, 403, "a blank reason is no reason: {}", r.text);
}

// ---------------------------------------------------------------- SMART

fn pkce_pair() -> (String, String) {
    let verifier = random(48);
    let challenge = URL_SAFE_NO_PAD
        .encode(ring::digest::digest(&ring::digest::SHA256, verifier.as_bytes()).as_ref());
    (verifier, challenge)
}

fn html_unescape(s: &str) -> String {
    s.replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
}

/// The hidden fields of the login form.
fn hidden_fields(html: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for chunk in html.split("<input type=\"hidden\" ").skip(1) {
        let attr = |name: &str| {
            let start = chunk.find(&format!("{name}=\""))? + name.len() + 2;
            let end = start + chunk[start..].find('"')?;
            Some(html_unescape(&chunk[start..end]))
        };
        if let (Some(n), Some(v)) = (attr("name"), attr("value")) {
            out.push((n, v));
        }
    }
    out
}

const APP: &str = "app";
const REDIRECT: &str = "http://127.0.0.1:9/cb";
const APP_SCOPE: &str = "user/*.rs patient/*.rs launch/patient openid fhirUser";

fn authorize_url(s: &Server, scope: &str, state: &str, challenge: &str, redirect: &str) -> String {
    let q = form_urlencoded::Serializer::new(String::new())
        .append_pair("response_type", "code")
        .append_pair("client_id", APP)
        .append_pair("redirect_uri", redirect)
        .append_pair("scope", scope)
        .append_pair("state", state)
        .append_pair("aud", &s.base)
        .append_pair("code_challenge", challenge)
        .append_pair("code_challenge_method", "S256")
        .finish();
    s.url(&format!("auth/authorize?{q}"))
}

/// The login page, then the form posted with the user's credentials: the
/// authorization code (from the redirect), checked against `state`.
async fn authorize(s: &Server, user: &User, scope: &str, challenge: &str) -> String {
    let state = format!("st-{}", random(8));
    let page = http()
        .get(authorize_url(s, scope, &state, challenge, REDIRECT))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status().as_u16(), 200);
    let html = page.text().await.unwrap();
    let mut form = hidden_fields(&html);
    assert!(
        form.iter().any(|(k, v)| k == "state" && *v == state),
        "{html}"
    );
    form.push(("username".into(), user.username.clone()));
    form.push(("password".into(), user.password.clone()));
    form.push(("totp".into(), user.fresh_code()));
    let pairs: Vec<(&str, &str)> = form.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let r = post_form(&http(), &s.url("auth/authorize"), &pairs).await;
    assert!(
        r.status == 302 || r.status == 303,
        "the login answers with a redirect (302 or 303, never 307): {} {}",
        r.status,
        r.text
    );
    let location = reqwest::Url::parse(r.header("location").unwrap()).unwrap();
    assert_eq!(
        format!(
            "{}://{}{}",
            location.scheme(),
            location.host_str().unwrap(),
            location.path()
        ),
        "http://127.0.0.1/cb"
    );
    assert_eq!(location.port(), Some(9));
    let q: std::collections::HashMap<String, String> =
        location.query_pairs().into_owned().collect();
    assert_eq!(q.get("state"), Some(&state));
    q.get("code").expect("a code").clone()
}

async fn exchange_code(s: &Server, code: &str, verifier: &str) -> Resp {
    post_form(
        &http(),
        &s.url("auth/token"),
        &[
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", REDIRECT),
            ("code_verifier", verifier),
            ("client_id", APP),
        ],
    )
    .await
}

/// The SMART App Launch (standalone) authorization-code flow with PKCE.
#[tokio::test]
async fn smart_authorization_code_flow_with_pkce() {
    let s = start().await;
    custos_ok(&[
        "client",
        "add",
        "--data-dir",
        &s.data(),
        "--id",
        APP,
        "--redirect-uri",
        REDIRECT,
        "--scope",
        APP_SCOPE,
    ]);
    let gp = create(&s, practitioner("Smart")).await;
    let a = create(&s, patient("SmartAlpha", Some(&gp))).await;
    let b = create(&s, patient("SmartBravo", None)).await;
    let pat = s.add_user("pat.smart", "patient", &[("--patient", &a)]);
    let doctor = s.add_user("dr.smart", "physician", &[("--practitioner", &gp)]);

    // The login page: HTML, not cacheable, not frameable, escaping what it echoes.
    let (_, challenge) = pkce_pair();
    let page = http()
        .get(authorize_url(
            &s,
            APP_SCOPE,
            "\"><script>alert(1)</script>",
            &challenge,
            REDIRECT,
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status().as_u16(), 200);
    let headers = page.headers().clone();
    assert!(
        headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    assert_eq!(headers["cache-control"], "no-store");
    assert_eq!(headers["x-frame-options"], "DENY");
    assert!(headers.contains_key("content-security-policy"));
    let html = page.text().await.unwrap();
    assert!(
        html.contains("<form") && html.contains("name=\"password\""),
        "{html}"
    );
    assert!(!html.contains("<script>"), "the state is escaped: {html}");

    // A wrong verifier is refused, and burns the code.
    let (verifier, challenge) = pkce_pair();
    let code = authorize(
        &s,
        &pat,
        "patient/*.rs launch/patient openid fhirUser",
        &challenge,
    )
    .await;
    let (other_verifier, _) = pkce_pair();
    assert_refused(
        &exchange_code(&s, &code, &other_verifier).await,
        "a wrong code_verifier",
    );
    assert_refused(
        &exchange_code(&s, &code, &challenge).await,
        "the challenge as verifier",
    );
    assert_refused(
        &exchange_code(&s, &code, &verifier).await,
        "the right verifier after a failed exchange",
    );

    // The right verifier gives a token, once.
    let (verifier, challenge) = pkce_pair();
    let code = authorize(&s, &doctor, "user/*.rs openid fhirUser", &challenge).await;
    let r = exchange_code(&s, &code, &verifier).await;
    let t = token_of(&r);
    assert_eq!(r.body["token_type"], "Bearer");
    assert_eq!(r.body["scope"], "user/*.rs openid fhirUser");
    assert!(r.body["id_token"].is_string(), "{}", r.text);
    assert_refused(
        &exchange_code(&s, &code, &verifier).await,
        "a code used twice",
    );
    let ok = s
        .call(Some(&t), "GET", &format!("Patient/{a}"), None, &[])
        .await;
    assert_eq!(ok.status, 200, "{}", ok.text);
    let r = s
        .call(Some(&t), "GET", &format!("Patient/{b}"), None, &[])
        .await;
    assert_eq!(
        r.status, 403,
        "the policy applies to app tokens: {}",
        r.text
    );
    let r = s
        .call(
            Some(&t),
            "POST",
            "Observation",
            Some(observation(&a, None)),
            &[],
        )
        .await;
    assert_eq!(
        r.status, 403,
        "the app was granted reading only: {}",
        r.text
    );

    // Patient context: the patient user's launch patient is their own record.
    let (verifier, challenge) = pkce_pair();
    let code = authorize(&s, &pat, "patient/*.rs launch/patient", &challenge).await;
    let r = exchange_code(&s, &code, &verifier).await;
    let t = token_of(&r);
    assert_eq!(r.body["patient"], a.as_str());
    assert_eq!(
        s.call(Some(&t), "GET", &format!("Patient/{a}"), None, &[])
            .await
            .status,
        200
    );
    assert_eq!(
        s.call(Some(&t), "GET", &format!("Patient/{b}"), None, &[])
            .await
            .status,
        404
    );

    // An unregistered redirect URI never redirects.
    let (_, challenge) = pkce_pair();
    for redirect in [
        "http://127.0.0.1:9/other",
        "https://attacker.example/cb",
        "http://127.0.0.1:9/cb/..",
    ] {
        let r = http()
            .get(authorize_url(&s, APP_SCOPE, "x", &challenge, redirect))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 400, "{redirect}");
        assert!(r.headers().get("location").is_none());
        let mut form: Vec<(&str, String)> = vec![
            ("response_type", "code".into()),
            ("client_id", APP.into()),
            ("redirect_uri", redirect.into()),
            ("scope", APP_SCOPE.into()),
            ("state", "x".into()),
            ("code_challenge", challenge.clone()),
            ("code_challenge_method", "S256".into()),
            ("username", doctor.username.clone()),
            ("password", doctor.password.clone()),
        ];
        form.push(("totp", doctor.wrong_code()));
        let pairs: Vec<(&str, &str)> = form.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let r = post_form(&http(), &s.url("auth/authorize"), &pairs).await;
        assert_eq!(r.status, 400, "POST with {redirect}: {}", r.text);
        assert!(r.header("location").is_none());
    }
    // Unknown client, missing or plain PKCE: refused before any login.
    let mut bad: Vec<String> = vec![
        authorize_url(&s, APP_SCOPE, "x", &challenge, REDIRECT)
            .replace("client_id=app", "client_id=nope"),
        authorize_url(&s, APP_SCOPE, "x", &challenge, REDIRECT)
            .replace("code_challenge_method=S256", "code_challenge_method=plain"),
    ];
    bad.push(
        authorize_url(&s, APP_SCOPE, "x", &challenge, REDIRECT)
            .replace(&format!("code_challenge={challenge}"), "code_challenge="),
    );
    for url in bad {
        let r = http().get(&url).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 400, "{url}");
        assert!(r.headers().get("location").is_none());
    }
    // Wrong credentials show the form again; no code.
    let (_, challenge) = pkce_pair();
    let page = http()
        .get(authorize_url(&s, APP_SCOPE, "x", &challenge, REDIRECT))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let mut form = hidden_fields(&page);
    form.push(("username".into(), doctor.username.clone()));
    form.push(("password".into(), "not-the-password".into()));
    form.push(("totp".into(), doctor.wrong_code()));
    let pairs: Vec<(&str, &str)> = form.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let r = post_form(&http(), &s.url("auth/authorize"), &pairs).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(r.header("location").is_none());
    assert!(r.text.contains("role=\"alert\""), "{}", r.text);
}

/// The discovery documents: `/.well-known/smart-configuration` and the
/// JWKS that verifies the server's tokens (public keys only).
#[tokio::test]
async fn discovery_documents_are_complete() {
    let s = start().await;
    let r = s
        .call(None, "GET", ".well-known/smart-configuration", None, &[])
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let c = &r.body;
    let base = s.base.as_str();
    assert_eq!(c["issuer"], base);
    assert_eq!(c["jwks_uri"], format!("{base}/.well-known/jwks.json"));
    assert_eq!(
        c["authorization_endpoint"],
        format!("{base}/auth/authorize")
    );
    assert_eq!(c["token_endpoint"], format!("{base}/auth/token"));
    let has = |field: &str, value: &str| {
        c[field]
            .as_array()
            .unwrap_or_else(|| panic!("{field} is a list: {c}"))
            .iter()
            .any(|v| v == value)
    };
    for g in ["authorization_code", "client_credentials", "refresh_token"] {
        assert!(has("grant_types_supported", g), "{g}");
    }
    assert!(has(
        "token_endpoint_auth_methods_supported",
        "private_key_jwt"
    ));
    assert!(has(
        "token_endpoint_auth_signing_alg_values_supported",
        "ES256"
    ));
    assert_eq!(c["code_challenge_methods_supported"], json!(["S256"]));
    assert!(has("response_types_supported", "code"));
    for cap in [
        "launch-standalone",
        "client-public",
        "client-confidential-asymmetric",
        "context-standalone-patient",
        "permission-patient",
        "permission-user",
        "permission-offline",
    ] {
        assert!(has("capabilities", cap), "{cap}");
    }
    for scope in ["openid", "fhirUser", "launch/patient", "offline_access"] {
        assert!(has("scopes_supported", scope), "{scope}");
    }

    let r = s
        .call(None, "GET", ".well-known/jwks.json", None, &[])
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let keys = r.body["keys"].as_array().unwrap();
    assert!(!keys.is_empty());
    for k in keys {
        assert_eq!(k["kty"], "EC");
        assert_eq!(k["crv"], "P-256");
        assert_eq!(k["alg"], "ES256");
        assert_eq!(k["use"], "sig");
        assert!(k["kid"].is_string() && k["x"].is_string() && k["y"].is_string());
        assert!(k.get("d").is_none(), "no private key material: {k}");
    }
    // The published key verifies the server's token.
    let token = s.token.clone().unwrap();
    let kid = jwt_part(&token, 0)["kid"].as_str().unwrap().to_string();
    let jwks: jsonwebtoken::jwk::JwkSet = serde_json::from_value(r.body.clone()).unwrap();
    let jwk = jwks.find(&kid).expect("the signing key is published");
    let mut v = jsonwebtoken::Validation::new(Algorithm::ES256);
    v.set_issuer(&[base]);
    v.set_audience(&[base]);
    let claims = jsonwebtoken::decode::<Value>(
        &token,
        &jsonwebtoken::DecodingKey::from_jwk(jwk).unwrap(),
        &v,
    )
    .unwrap()
    .claims;
    assert_eq!(claims["sub"], format!("client:{}", support::SYSTEM_CLIENT));
    assert_eq!(claims["scope"], SYSTEM_SCOPE);
    // The CapabilityStatement is public.
    let r = s.call(None, "GET", "metadata", None, &[]).await;
    assert_eq!(r.status, 200);
}

/// Guesses sent in parallel count like guesses sent one by one.
#[tokio::test]
async fn parallel_password_guesses_all_count() {
    let s = Server::start();
    let user = s.add_user("guess.parallel", "patient", &[("--patient", "p1")]);
    let mut tasks = Vec::new();
    for i in 0..20 {
        let url = s.url("auth/token");
        let name = user.username.clone();
        tasks.push(tokio::spawn(async move {
            let password = format!("wrong-password-{i}");
            let pairs = [
                ("grant_type", "password"),
                ("client_id", support::CLI_CLIENT),
                ("username", name.as_str()),
                ("password", password.as_str()),
                ("scope", PATIENT_SCOPE),
            ];
            post_form(&http(), &url, &pairs).await.status
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 400);
    }
    let r = user.sign_in(&s.base, PATIENT_SCOPE, &[]).await;
    assert_refused(&r, "the right password after 20 parallel wrong guesses");
}

/// The administration API: only the roles that hold the right may use it,
/// and what it changes applies at once.
#[tokio::test]
async fn administration_needs_an_administrative_role() {
    let s = start().await;
    let gp = create(&s, practitioner("Admin")).await;
    let pid = create(&s, patient("AdminCare", Some(&gp))).await;
    let obs = create(&s, observation(&pid, None)).await;
    let doctor = s.add_user("dr.admin", "physician", &[("--practitioner", &gp)]);
    let admin = s.add_user("admin.one", "admin", &[]);
    let officer = s.add_user("officer.one", "security-officer", &[]);
    let dt = doctor.token(&s.base, USER_SCOPE).await;
    let at = admin.token(&s.base, "user/*.rs").await;
    let ot = officer.token(&s.base, "user/*.rs").await;
    let sys = s.token.clone().unwrap();
    let new_user = json!({
        "username": "mallory", "password": "a-long-enough-password", "role": "admin"
    });

    for (who, t) in [("system", &sys), ("physician", &dt)] {
        let t = Some(t.as_str());
        let r = s.call(t, "GET", "admin/users", None, &[]).await;
        assert_eq!(r.status, 403, "{who} lists users: {}", r.text);
        let r = s
            .call(t, "POST", "admin/users", Some(new_user.clone()), &[])
            .await;
        assert_eq!(r.status, 403, "{who} adds an admin: {}", r.text);
        let r = s
            .call(
                t,
                "POST",
                "admin/read-only",
                Some(json!({ "on": true })),
                &[],
            )
            .await;
        assert_eq!(r.status, 403, "{who} switches to read-only: {}", r.text);
        let r = s
            .call(
                t,
                "POST",
                "admin/users/officer.one/lock",
                Some(json!({})),
                &[],
            )
            .await;
        assert_eq!(r.status, 403, "{who} locks a user: {}", r.text);
    }
    // A security officer responds but does not manage users.
    let officer_t = Some(ot.as_str());
    let r = s
        .call(
            officer_t,
            "POST",
            "admin/users",
            Some(new_user.clone()),
            &[],
        )
        .await;
    assert_eq!(r.status, 403, "{}", r.text);
    let r = s
        .call(
            officer_t,
            "POST",
            "admin/users/dr.admin/role",
            Some(json!({ "role": "admin" })),
            &[],
        )
        .await;
    assert_eq!(r.status, 403, "{}", r.text);
    // Administrators see no clinical data.
    for t in [&at, &ot] {
        let r = s
            .call(Some(t), "GET", &format!("Patient/{pid}"), None, &[])
            .await;
        assert_eq!(r.status, 403, "{}", r.text);
    }
    // The admin lists users, without secrets.
    let r = s.call(Some(&at), "GET", "admin/users", None, &[]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(r.text.contains("dr.admin"));
    for secret in ["argon2", "password", "totp_secret", &doctor.password] {
        assert!(!r.text.contains(secret), "{secret} in {}", r.text);
    }
    // The officer switches the server to read-only and back, and locks a user.
    let r = s
        .call(
            officer_t,
            "POST",
            "admin/read-only",
            Some(json!({ "on": true, "reason": "drill" })),
            &[],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = s
        .call(
            Some(&sys),
            "POST",
            "Patient",
            Some(patient("Blocked", None)),
            &[],
        )
        .await;
    assert_eq!(r.status, 503, "{}", r.text);
    let r = s
        .call(
            officer_t,
            "POST",
            "admin/read-only",
            Some(json!({ "on": false })),
            &[],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = s
        .call(
            Some(&sys),
            "POST",
            "Patient",
            Some(patient("Allowed", None)),
            &[],
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);

    // A role change applies to the tokens already issued.
    let r = s
        .call(
            Some(&dt),
            "DELETE",
            &format!("Observation/{obs}"),
            None,
            &[],
        )
        .await;
    assert_eq!(r.status, 204, "a physician deletes: {}", r.text);
    let obs = create(&s, observation(&pid, None)).await;
    custos_ok(&[
        "user",
        "set-role",
        "--data-dir",
        &s.data(),
        "dr.admin",
        "nurse",
    ]);
    let r = s
        .call(
            Some(&dt),
            "DELETE",
            &format!("Observation/{obs}"),
            None,
            &[],
        )
        .await;
    assert_eq!(r.status, 403, "now a nurse, who may not delete: {}", r.text);
    let r = s
        .call(Some(&dt), "GET", &format!("Observation/{obs}"), None, &[])
        .await;
    assert_eq!(r.status, 200, "{}", r.text);

    let r = s
        .call(
            officer_t,
            "POST",
            "admin/users/dr.admin/lock",
            Some(json!({ "reason": "drill" })),
            &[],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["locked"], true);
    let r = s
        .call(Some(&dt), "GET", &format!("Observation/{obs}"), None, &[])
        .await;
    assert_unauthorized(&r, "a token of a user locked over the API");
}

/// The login page asks for the TOTP code in a second step: the password
/// alone yields only a ticket for that step; a wrong code shows the step
/// again (and counts as a failure); the right one redirects with the code;
/// a ticket is spent by success.
#[tokio::test]
async fn login_page_takes_the_totp_code_in_a_second_step() {
    let s = start().await;
    custos_ok(&[
        "client",
        "add",
        "--data-dir",
        &s.data(),
        "--id",
        APP,
        "--redirect-uri",
        REDIRECT,
        "--scope",
        APP_SCOPE,
    ]);
    let a = create(&s, patient("TwoStep", None)).await;
    let pat = s.add_user("pat.twostep", "patient", &[("--patient", &a)]);
    let (verifier, challenge) = pkce_pair();
    let state = format!("st-{}", random(8));
    let html = http()
        .get(authorize_url(
            &s,
            "patient/*.rs launch/patient",
            &state,
            &challenge,
            REDIRECT,
        ))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        !html.contains("name=\"totp\""),
        "step one asks no code: {html}"
    );
    let mut form = hidden_fields(&html);
    form.push(("username".into(), pat.username.clone()));
    // A wrong password: step one again, no ticket.
    let mut wrong = form.clone();
    wrong.push(("password".into(), "not the password at all".into()));
    let pairs: Vec<(&str, &str)> = wrong
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let r = post_form(&http(), &s.url("auth/authorize"), &pairs).await;
    assert_eq!(r.status, 200);
    assert!(!r.text.contains("name=\"ticket\""), "{}", r.text);
    // The right password: the TOTP step with a ticket.
    form.push(("password".into(), pat.password.clone()));
    let pairs: Vec<(&str, &str)> = form.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let r = post_form(&http(), &s.url("auth/authorize"), &pairs).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(r.text.contains("name=\"totp\""), "{}", r.text);
    let ticket = hidden_fields(&r.text)
        .into_iter()
        .find(|(k, _)| k == "ticket")
        .map(|(_, v)| v)
        .expect("a ticket");
    // A wrong code: the same step, with an error.
    let r = post_form(
        &http(),
        &s.url("auth/authorize"),
        &[("ticket", &ticket), ("totp", "000000")],
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(r.text.contains("role=\"alert\"") && r.text.contains("name=\"ticket\""));
    // The right code: redirected with the code and the state.
    let code = pat.fresh_code();
    let r = post_form(
        &http(),
        &s.url("auth/authorize"),
        &[("ticket", &ticket), ("totp", &code)],
    )
    .await;
    assert!(
        r.status == 302 || r.status == 303,
        "{} {}",
        r.status,
        r.text
    );
    let location = reqwest::Url::parse(r.header("location").unwrap()).unwrap();
    let q: std::collections::HashMap<String, String> =
        location.query_pairs().into_owned().collect();
    assert_eq!(q.get("state"), Some(&state));
    let t = token_of(&exchange_code(&s, &q["code"], &verifier).await);
    assert_eq!(
        s.call(Some(&t), "GET", &format!("Patient/{a}"), None, &[])
            .await
            .status,
        200
    );
    // The ticket is spent.
    let again = post_form(
        &http(),
        &s.url("auth/authorize"),
        &[("ticket", &ticket), ("totp", &pat.fresh_code())],
    )
    .await;
    assert_eq!(again.status, 400, "{}", again.text);
    assert!(again.header("location").is_none());
}
