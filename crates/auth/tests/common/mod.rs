//! Shared scaffolding of the custos-auth integration tests: a store, a
//! record service and an auth service in a temporary directory; users who
//! sign in with password + TOTP; backend clients with ES256 keys; FHIR
//! fixtures; helpers to act as an authenticated caller.
#![allow(dead_code)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use custos_audit::{AuditConfig, AuditTrail};
use custos_auth::service::{Client, CreatedUser, Origin};
use custos_auth::{AuthConfig, AuthError, AuthService, Grant, NewUser, RequestGuard, Role};
use custos_crypto::{FileKekProvider, GcmSealer};
use custos_fhir::query::Handling;
use custos_fhir::{ErrorKind, FhirError};
use custos_records::{Guard, Records, RecordsConfig};
use custos_store::{SqliteConfig, SqliteStore, Store, Synchronous};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use serde_json::{Value, json};

pub const ISSUER: &str = "http://custos.test";
pub const BASE: &str = "http://custos.test/fhir";
pub const PASSWORD: &str = "correct horse battery staple";

/// A data directory with its store, record service and auth service.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub records: Records,
    pub auth: Arc<AuthService>,
}

impl Env {
    pub fn db_path(&self) -> std::path::PathBuf {
        self.dir.path().join("custos.db")
    }
}

/// Open a fresh environment with `config`.
pub async fn env(config: AuthConfig) -> Env {
    let dir = tempfile::tempdir().expect("temp dir");
    let kf = dir.path().join("keys.json");
    FileKekProvider::create(&kf).expect("key file");
    let mut sc = SqliteConfig::new(dir.path().join("custos.db"));
    sc.synchronous = Synchronous::Normal;
    sc.cache_mib = 16;
    let store = Arc::new(SqliteStore::open(sc).expect("store"));
    let records = Records::open(
        store as Arc<dyn Store>,
        Arc::new(FileKekProvider::open(&kf).expect("key file opens")),
        Arc::new(GcmSealer),
        RecordsConfig::default(),
    )
    .await
    .expect("records");
    let auth = Arc::new(open_auth(&records, config, ISSUER).await);
    Env { dir, records, auth }
}

/// The audit trail over `records` (one per auth service, as the server has).
pub async fn trail(records: &Records) -> AuditTrail {
    AuditTrail::open(records, AuditConfig::default())
        .await
        .expect("audit trail")
}

/// An auth service over `records`, recording into a trail on the same store.
pub async fn open_auth(records: &Records, config: AuthConfig, issuer: &str) -> AuthService {
    AuthService::open(records, config, issuer, trail(records).await)
        .await
        .expect("auth service")
}

pub fn now_secs() -> i64 {
    custos_auth::now_secs()
}

// ------------------------------------------------------------------ users

/// A user of the tests: credentials and the authenticator app.
pub struct TestUser {
    pub username: String,
    pub password: String,
    pub totp_secret: Option<String>,
    pub created: CreatedUser,
    /// The last TOTP time step this test used (each is accepted once).
    last_step: Mutex<u64>,
}

impl TestUser {
    /// A TOTP code for a step not used yet (waits for the next step if the
    /// current and the next one are used up).
    pub async fn fresh_totp(&self) -> Option<String> {
        let secret = self.totp_secret.as_ref()?;
        loop {
            let cur = now_secs() as u64 / 30;
            let step = {
                let mut last = self.last_step.lock().unwrap();
                let candidate = (*last + 1).max(cur);
                if candidate <= cur + 1 {
                    *last = candidate;
                    Some(candidate)
                } else {
                    None
                }
            };
            match step {
                Some(s) => {
                    return Some(
                        custos_auth::users::totp_code_base32(secret, s * 30).expect("code"),
                    );
                }
                None => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        }
    }

    /// The code of the step used last (for replay tests).
    pub fn last_totp(&self) -> Option<String> {
        let secret = self.totp_secret.as_ref()?;
        let s = *self.last_step.lock().unwrap();
        custos_auth::users::totp_code_base32(secret, s * 30)
    }

    /// A wrong TOTP code (the right one plus one, mod 10^6).
    pub fn wrong_totp(&self) -> String {
        let secret = self.totp_secret.as_ref().expect("enrolled");
        let now = now_secs() as u64;
        // Differs from the codes of the previous, current and next steps.
        let codes: Vec<u32> = [now - 30, now, now + 30]
            .iter()
            .map(|t| {
                custos_auth::users::totp_code_base32(secret, *t)
                    .unwrap()
                    .parse()
                    .unwrap()
            })
            .collect();
        let mut c = (codes[1] + 1) % 1_000_000;
        while codes.contains(&c) {
            c = (c + 1) % 1_000_000;
        }
        format!("{c:06}")
    }

    /// Sign in with password + a fresh TOTP code.
    pub async fn login(
        &self,
        auth: &AuthService,
        scope: &str,
        patient: Option<&str>,
    ) -> Result<custos_auth::TokenResponse, AuthError> {
        let totp = self.fresh_totp().await;
        self.login_with(auth, &self.password, totp, scope, patient, None)
            .await
    }

    pub async fn login_with(
        &self,
        auth: &AuthService,
        password: &str,
        totp: Option<String>,
        scope: &str,
        patient: Option<&str>,
        break_glass: Option<&str>,
    ) -> Result<custos_auth::TokenResponse, AuthError> {
        auth.token(
            Grant::Password {
                username: self.username.clone(),
                password: password.to_string(),
                totp,
                scope: scope.to_string(),
                patient: patient.map(str::to_string),
                break_glass: break_glass.map(str::to_string),
            },
            &Origin::default(),
        )
        .await
    }

    /// Sign in asking `user/*.cruds` and return the access token.
    pub async fn token(&self, auth: &AuthService) -> String {
        self.login(auth, "user/*.cruds", None)
            .await
            .unwrap_or_else(|e| panic!("{} cannot sign in: {e}", self.username))
            .access_token
    }
}

/// Create a user.
pub async fn add_user(
    auth: &AuthService,
    username: &str,
    role: Role,
    practitioner: Option<&str>,
    patient: Option<&str>,
) -> TestUser {
    let created = auth
        .add_user(NewUser {
            username: username.to_string(),
            password: PASSWORD.to_string(),
            role,
            practitioner: practitioner.map(str::to_string),
            patient: patient.map(str::to_string),
            organization: None,
        })
        .await
        .unwrap_or_else(|e| panic!("add user {username}: {e}"));
    TestUser {
        username: username.to_string(),
        password: PASSWORD.to_string(),
        totp_secret: created.totp_secret.clone(),
        created,
        last_step: Mutex::new(0),
    }
}

// ---------------------------------------------------------------- clients

/// An ES256 key pair of a backend client (or an outside party).
pub struct EcKey {
    pub pkcs8: Vec<u8>,
    pub kid: String,
    pub x: String,
    pub y: String,
}

impl EcKey {
    pub fn generate(kid: &str) -> EcKey {
        let rng = SystemRandom::new();
        let doc = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let pair =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, doc.as_ref(), &rng).unwrap();
        let public = pair.public_key().as_ref();
        EcKey {
            pkcs8: doc.as_ref().to_vec(),
            kid: kid.to_string(),
            x: URL_SAFE_NO_PAD.encode(&public[1..33]),
            y: URL_SAFE_NO_PAD.encode(&public[33..65]),
        }
    }

    pub fn jwk(&self) -> Value {
        json!({
            "kty": "EC", "crv": "P-256", "x": self.x, "y": self.y,
            "kid": self.kid, "use": "sig", "alg": "ES256",
        })
    }

    pub fn jwks(&self) -> Value {
        json!({ "keys": [self.jwk()] })
    }

    /// Sign `claims` with ES256 under header `kid`.
    pub fn sign(&self, kid: Option<&str>, claims: &Value) -> String {
        let mut h = Header::new(Algorithm::ES256);
        h.kid = kid.map(str::to_string);
        jsonwebtoken::encode(&h, claims, &EncodingKey::from_ec_der(&self.pkcs8)).unwrap()
    }
}

/// A registered SMART Backend Services client.
pub struct TestClient {
    pub id: String,
    pub key: EcKey,
}

impl TestClient {
    /// The client assertion for the token endpoint.
    pub fn assertion(&self, jti: &str) -> String {
        let now = now_secs();
        self.key.sign(
            Some(&self.key.kid),
            &json!({
                "iss": self.id, "sub": self.id,
                "aud": format!("{ISSUER}/auth/token"),
                "exp": now + 240, "iat": now, "jti": jti,
            }),
        )
    }

    pub async fn token_with(
        &self,
        auth: &AuthService,
        assertion: String,
        scope: &str,
    ) -> Result<custos_auth::TokenResponse, AuthError> {
        auth.token(
            Grant::ClientCredentials {
                assertion_type: "urn:ietf:params:oauth:client-assertion-type:jwt-bearer".into(),
                assertion,
                scope: scope.to_string(),
            },
            &Origin::default(),
        )
        .await
    }

    pub async fn token(
        &self,
        auth: &AuthService,
        scope: &str,
    ) -> Result<custos_auth::TokenResponse, AuthError> {
        let jti = custos_auth::random_token(16);
        self.token_with(auth, self.assertion(&jti), scope).await
    }
}

/// Register a backend client allowed `scope` (role: service).
pub async fn register_client(auth: &AuthService, id: &str, scope: &str) -> TestClient {
    let key = EcKey::generate(&format!("{id}-key"));
    auth.register_client(Client {
        id: id.to_string(),
        name: format!("test client {id}"),
        jwks: Some(key.jwks()),
        redirect_uris: Vec::new(),
        role: None,
        scope: scope.to_string(),
        disabled: false,
        created: 0,
    })
    .await
    .unwrap_or_else(|e| panic!("register client {id}: {e}"));
    TestClient {
        id: id.to_string(),
        key,
    }
}

// ---------------------------------------------------------------- callers

/// The record service acting for the bearer of `token`, as the server's
/// middleware builds it for one request.
pub async fn caller(
    auth: &AuthService,
    records: &Records,
    token: &str,
    purpose: Option<&str>,
    break_glass: Option<&str>,
) -> (Records, Arc<RequestGuard>) {
    let (principal, snapshot) = auth
        .authenticate(token)
        .await
        .unwrap_or_else(|e| panic!("token refused: {e}"));
    let guard = auth.guard(
        principal,
        snapshot,
        purpose.map(str::to_string),
        break_glass.map(str::to_string),
    );
    (records.guarded(guard.clone() as Arc<dyn Guard>), guard)
}

/// Just the guarded handle.
pub async fn as_user(auth: &AuthService, records: &Records, token: &str) -> Records {
    caller(auth, records, token, None, None).await.0
}

/// `(type, id)` of every resource in a Bundle.
pub fn bundle_refs(bundle: &Value) -> Vec<(String, String)> {
    bundle
        .get("entry")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|e| {
                    let r = e.get("resource")?;
                    Some((
                        r.get("resourceType")?.as_str()?.to_string(),
                        r.get("id")?.as_str()?.to_string(),
                    ))
                })
                .collect()
        })
        .unwrap_or_default()
}

pub fn bundle_has(bundle: &Value, rtype: &str, id: &str) -> bool {
    bundle_refs(bundle)
        .iter()
        .any(|(t, i)| t == rtype && i == id)
}

pub fn total(bundle: &Value) -> Option<u64> {
    bundle.get("total").and_then(Value::as_u64)
}

/// Search through `records` (Strict parameter handling).
pub async fn search(
    records: &Records,
    rtype: &str,
    params: &[(&str, &str)],
) -> Result<Value, FhirError> {
    records
        .search(
            rtype,
            params
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            Handling::Strict,
            BASE,
        )
        .await
}

pub fn is_kind<T: std::fmt::Debug>(r: &Result<T, FhirError>, kind: ErrorKind) -> bool {
    matches!(r, Err(e) if e.kind == kind)
}

// --------------------------------------------------------------- fixtures

/// Create through the unrestricted handle; returns the id.
pub async fn create(records: &Records, body: Value) -> String {
    let rtype = body["resourceType"]
        .as_str()
        .expect("resourceType")
        .to_string();
    let (o, _) = records
        .create(&rtype, body, None)
        .await
        .unwrap_or_else(|e| panic!("create {rtype}: {e:?}"));
    o.id
}

pub fn patient_body(family: &str) -> Value {
    json!({
        "resourceType": "Patient",
        "name": [{ "family": family, "given": ["Test"] }],
        "gender": "unknown",
        "birthDate": "1970-01-01",
    })
}

pub fn practitioner_body(family: &str) -> Value {
    json!({
        "resourceType": "Practitioner",
        "name": [{ "family": family, "given": ["Doc"] }],
    })
}

pub fn organization_body(name: &str) -> Value {
    json!({ "resourceType": "Organization", "name": name })
}

pub fn observation_body(patient: &str) -> Value {
    json!({
        "resourceType": "Observation",
        "status": "final",
        "code": { "coding": [{ "system": "http://loinc.org", "code": "8867-4" }] },
        "subject": { "reference": format!("Patient/{patient}") },
        "effectiveDateTime": "2024-01-01T10:00:00Z",
        "valueQuantity": { "value": 72, "unit": "/min" },
    })
}

pub fn condition_body(patient: &str) -> Value {
    json!({
        "resourceType": "Condition",
        "code": { "coding": [{ "system": "http://snomed.info/sct", "code": "44054006" }] },
        "subject": { "reference": format!("Patient/{patient}") },
    })
}

pub fn encounter_body(patient: &str) -> Value {
    json!({
        "resourceType": "Encounter",
        "status": "finished",
        "class": { "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB" },
        "subject": { "reference": format!("Patient/{patient}") },
        "period": { "start": "2020-01-01T10:00:00Z", "end": "2020-01-01T11:00:00Z" },
    })
}

/// An encounter with `practitioner` as participant, `start_days_ago` to `end_days_ago`.
pub fn encounter_with(
    patient: &str,
    practitioner: &str,
    start_days_ago: i64,
    end_days_ago: i64,
) -> Value {
    let at =
        |days: i64| custos_fhir::date::format_instant((now_secs() - days * 86_400) * 1_000_000);
    json!({
        "resourceType": "Encounter",
        "status": "finished",
        "class": { "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB" },
        "subject": { "reference": format!("Patient/{patient}") },
        "participant": [{ "individual": { "reference": format!("Practitioner/{practitioner}") } }],
        "period": { "start": at(start_days_ago), "end": at(end_days_ago) },
    })
}

pub fn medication_request_body(patient: &str) -> Value {
    json!({
        "resourceType": "MedicationRequest",
        "status": "active",
        "intent": "order",
        "medicationCodeableConcept": { "coding": [{ "system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "197361" }] },
        "subject": { "reference": format!("Patient/{patient}") },
    })
}

/// A CareTeam for `patient` with the practitioners as participants.
pub fn care_team_body(patient: &str, status: &str, practitioners: &[&str]) -> Value {
    let mut v = json!({
        "resourceType": "CareTeam",
        "status": status,
        "subject": { "reference": format!("Patient/{patient}") },
    });
    if !practitioners.is_empty() {
        v["participant"] = Value::Array(
            practitioners
                .iter()
                .map(|p| json!({ "member": { "reference": format!("Practitioner/{p}") } }))
                .collect(),
        );
    }
    v
}

/// A Consent of `patient` with the given top-level provision.
pub fn consent_body(patient: &str, provision: Value) -> Value {
    json!({
        "resourceType": "Consent",
        "status": "active",
        "scope": { "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy" }] },
        "category": [{ "coding": [{ "system": "http://loinc.org", "code": "59284-0" }] }],
        "patient": { "reference": format!("Patient/{patient}") },
        "provision": provision,
    })
}

/// A provision actor naming `reference` (for example `Practitioner/x`).
pub fn actor(reference: &str) -> Value {
    json!({
        "role": { "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "code": "PRCP" }] },
        "reference": { "reference": reference },
    })
}

pub fn purpose(code: &str) -> Value {
    json!({ "system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": code })
}

pub fn claim_body(patient: &str) -> Value {
    json!({
        "resourceType": "Claim",
        "status": "active",
        "type": { "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/claim-type", "code": "professional" }] },
        "use": "claim",
        "patient": { "reference": format!("Patient/{patient}") },
        "created": "2024-01-01",
        "provider": { "display": "Test clinic" },
        "priority": { "coding": [{ "code": "normal" }] },
    })
}

pub fn audit_event_body(patient: &str) -> Value {
    json!({
        "resourceType": "AuditEvent",
        "type": { "system": "http://dicom.nema.org/resources/ontology/DCM", "code": "110110" },
        "recorded": "2024-01-01T10:00:00Z",
        "agent": [{ "requestor": false, "who": { "display": "test system" } }],
        "source": { "observer": { "display": "custos test" } },
        "entity": [{ "what": { "reference": format!("Patient/{patient}") } }],
    })
}
