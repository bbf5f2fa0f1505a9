//! What an audit event records, how it becomes a sealed log leaf, and how
//! it reads back as a FHIR AuditEvent (IHE Basic Audit Log Patterns).
use std::borrow::Cow;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// One decision of the access policy about one resource or type.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Decision {
    /// `read`, `search`, `create`, … or `login`, `token`, `admin`.
    pub interaction: Cow<'static, str>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtype: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The patient whose compartment was concerned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patient: Option<String>,
    pub allowed: bool,
    /// The rule that decided (`scope`, `role`, `care-team`, `encounter`,
    /// `general-practitioner`, `own-record`, `consent-deny`, `break-glass`, …).
    pub rule: Cow<'static, str>,
}

/// What kind of event: a FHIR REST interaction or a security event.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum EventKind {
    /// A request to the FHIR API.
    #[default]
    Rest,
    /// A sign-in (password, second factor).
    Login,
    /// A token issued or refused at the token endpoint.
    Token,
    /// An administrative action (users, clients, read-only switch).
    Admin,
    /// A key rotation (KEK, data keys, signing keys).
    KeyRotation,
    /// An export of data or of the audit trail.
    Export,
    /// A configuration change or a server start/stop.
    Config,
}

impl EventKind {
    fn code(self) -> (&'static str, &'static str, &'static str) {
        // (system, code, display) of AuditEvent.type
        const DCM: &str = "http://dicom.nema.org/resources/ontology/DCM";
        const REST: &str = "http://terminology.hl7.org/CodeSystem/audit-event-type";
        match self {
            EventKind::Rest => (REST, "rest", "RESTful Operation"),
            EventKind::Login => (DCM, "110114", "User Authentication"),
            EventKind::Token => (DCM, "110114", "User Authentication"),
            EventKind::Admin => (DCM, "110136", "Security Roles Changed"),
            EventKind::KeyRotation => (DCM, "110137", "User Security Attributes Changed"),
            EventKind::Export => (DCM, "110106", "Export"),
            EventKind::Config => (DCM, "110100", "Application Activity"),
        }
    }
}

/// Who acted.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct Agent {
    /// The principal's stable subject (`user:…`, `client:…`, `oidc:…`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// The linked Practitioner or Patient (`Practitioner/…`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fhir_user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_agent: Option<String>,
}

/// A resource the event concerns.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct Entity {
    pub rtype: String,
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patient: Option<String>,
}

/// Everything recorded about one request or one security event. Sealed as a
/// whole: a path, a query or a reason may hold PHI.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct AuditRecord {
    /// UTC microseconds.
    pub at: i64,
    #[serde(default)]
    pub kind: EventKind,
    /// HTTP method and route template (`GET /Patient/{id}`), or a command.
    pub action: String,
    /// The FHIR interaction (`read`, `search-type`, `create`, …) or the
    /// security operation (`login`, `token`, `user-lock`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interaction: Option<String>,
    /// HTTP status (or 200/400/500-style for non-HTTP events).
    pub status: u16,
    #[serde(default)]
    pub agent: Agent,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub purpose: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub break_glass_reason: Option<String>,
    /// The query string of a search, as sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub entities: Vec<Entity>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub decisions: Vec<Decision>,
    /// How many resources the response carried (a search or history page,
    /// an export), for detection of bulk reads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub results: Option<u32>,
    /// Free text for security events (never PHI in clear: it is sealed too).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl AuditRecord {
    /// FHIR AuditEvent.action: C, R, U, D or E.
    pub fn action_code(&self) -> &'static str {
        match self.interaction.as_deref() {
            Some("create") => "C",
            Some("read" | "vread" | "history-instance" | "history-type" | "history-system")
            | Some("search-type" | "search-system" | "search" | "capabilities") => "R",
            Some("update" | "patch") => "U",
            Some("delete") => "D",
            Some(_) => "E",
            None => match self.action.split(' ').next() {
                Some("GET" | "HEAD") => "R",
                Some("POST") if self.kind == EventKind::Rest => "C",
                Some("PUT" | "PATCH") => "U",
                Some("DELETE") => "D",
                _ => "E",
            },
        }
    }

    /// FHIR AuditEvent.outcome: 0 success, 4 minor failure (refused or bad
    /// request), 8 serious failure (server error).
    pub fn outcome_code(&self) -> u8 {
        match self.status {
            0..=399 => 0,
            400..=499 => 4,
            _ => 8,
        }
    }

    /// Every patient the event concerns: those of its entities and of its
    /// decisions, each once.
    pub fn patients(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        let all = self
            .entities
            .iter()
            .filter_map(|e| e.patient.as_deref())
            .chain(self.decisions.iter().filter_map(|d| d.patient.as_deref()));
        for p in all {
            if !out.contains(&p) {
                out.push(p);
            }
        }
        out
    }

    /// Whether a break-the-glass grant was used.
    pub fn break_glass(&self) -> bool {
        self.break_glass_reason.is_some() || self.decisions.iter().any(|d| d.rule == "break-glass")
    }

    /// The rule that decided, as one string (`care-team`, `role;consent-deny`).
    pub fn rules(&self) -> String {
        let mut rules: Vec<&str> = Vec::new();
        for d in &self.decisions {
            if !rules.contains(&d.rule.as_ref()) {
                rules.push(&d.rule);
            }
        }
        rules.join(";")
    }
}

/// Version byte of a leaf.
const LEAF_V1: u8 = 0x01;

/// A log leaf: `0x01 ‖ at (8 bytes, big-endian µs) ‖ key-name length (1
/// byte) ‖ key name ‖ sealed JSON`. The time and the data key's name are in
/// clear (neither is PHI); everything else is sealed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leaf<'a> {
    pub at: i64,
    pub key_name: &'a str,
    pub sealed: &'a [u8],
}

impl<'a> Leaf<'a> {
    /// Encode.
    pub fn encode(&self) -> Vec<u8> {
        let name = self.key_name.as_bytes();
        let mut out = Vec::with_capacity(10 + name.len() + self.sealed.len());
        out.push(LEAF_V1);
        out.extend_from_slice(&self.at.to_be_bytes());
        out.push(name.len() as u8);
        out.extend_from_slice(name);
        out.extend_from_slice(self.sealed);
        out
    }

    /// Decode (no decryption).
    pub fn decode(data: &'a [u8]) -> Option<Leaf<'a>> {
        let (&v, rest) = data.split_first()?;
        if v != LEAF_V1 || rest.len() < 9 {
            return None;
        }
        let at = i64::from_be_bytes(rest[..8].try_into().ok()?);
        let n = rest[8] as usize;
        let rest = &rest[9..];
        if rest.len() < n {
            return None;
        }
        let key_name = std::str::from_utf8(&rest[..n]).ok()?;
        Some(Leaf {
            at,
            key_name,
            sealed: &rest[n..],
        })
    }

    /// The associated data the leaf's JSON is sealed with.
    pub fn aad(at: i64, key_name: &str) -> Vec<u8> {
        format!("custos-audit-v1|{at}|{key_name}").into_bytes()
    }
}

/// The name of the data key sealing events of the UTC hour containing `at`
/// (µs). A key per hour keeps every key far below the 2³² random-nonce limit
/// of AES-GCM at any request rate, and lets retention shred whole hours.
pub fn key_name_for(at: i64) -> String {
    let secs = at.div_euclid(1_000_000);
    let t =
        time::OffsetDateTime::from_unix_timestamp(secs).unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!(
        "system/audit/{:04}{:02}{:02}{:02}",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour()
    )
}

/// RFC 3339 of UTC microseconds.
pub fn instant(at: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(at) * 1000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Where an event sits in the log, so that a reader can prove it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position<'a> {
    pub index: u64,
    pub leaf: &'a [u8],
}

/// The extension URL carrying the log position of an AuditEvent.
pub const LOG_ENTRY_EXTENSION: &str = "https://custos.dev/fhir/StructureDefinition/audit-log-entry";

/// Render an event as a FHIR R4 AuditEvent (IHE BALP shaped). The id is
/// the leaf index; an extension carries the leaf itself and its hash, so a
/// reader can fetch an inclusion proof and check it against a checkpoint.
pub fn to_audit_event(rec: &AuditRecord, pos: &Position<'_>) -> Value {
    let (system, code, display) = rec.kind.code();
    let mut ev = json!({
        "resourceType": "AuditEvent",
        "id": pos.index.to_string(),
        "type": {"system": system, "code": code, "display": display},
        "action": rec.action_code(),
        "recorded": instant(rec.at),
        "outcome": rec.outcome_code().to_string(),
    });
    if let Some(i) = &rec.interaction {
        ev["subtype"] = json!([{"system": "http://hl7.org/fhir/restful-interaction", "code": i}]);
    }
    let mut outcome_desc = format!("HTTP {}", rec.status);
    let rules = rec.rules();
    if !rules.is_empty() {
        outcome_desc.push_str(&format!("; rule: {rules}"));
    }
    ev["outcomeDesc"] = json!(outcome_desc);
    if let Some(p) = &rec.purpose {
        ev["purposeOfEvent"] = json!([{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": p}]}]);
    }
    let mut agent = json!({
        "type": {"coding": [{"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "110153", "display": "Source Role ID"}]},
        "requestor": true,
    });
    let mut who = serde_json::Map::new();
    if let Some(f) = &rec.agent.fhir_user {
        who.insert("reference".into(), json!(f));
    }
    if let Some(s) = &rec.agent.subject {
        who.insert(
            "identifier".into(),
            json!({"system": "urn:custos:subject", "value": s}),
        );
    }
    if let Some(u) = rec.agent.username.as_ref().or(rec.agent.client_id.as_ref()) {
        who.insert("display".into(), json!(u));
    }
    if !who.is_empty() {
        agent["who"] = Value::Object(who);
    }
    if let Some(r) = &rec.agent.role {
        agent["role"] = json!([{"coding": [{"system": "urn:custos:role", "code": r}]}]);
    }
    if let Some(c) = &rec.agent.client_id {
        agent["altId"] = json!(c);
    }
    if let Some(src) = &rec.agent.source {
        agent["network"] = json!({"address": src, "type": "2"});
    }
    if rec.break_glass() {
        let reason = rec.break_glass_reason.clone().unwrap_or_default();
        agent["purposeOfUse"] = json!([{
            "coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "ETREAT", "display": "Emergency Treatment"}],
            "text": reason,
        }]);
    }
    let mut agents = vec![agent];
    if let Some(ua) = &rec.agent.user_agent {
        agents.push(json!({
            "type": {"coding": [{"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "110150", "display": "Application"}]},
            "who": {"display": ua},
            "requestor": false,
        }));
    }
    ev["agent"] = Value::Array(agents);
    ev["source"] = json!({
        "observer": {"display": "Custos"},
        "type": [{"system": "http://terminology.hl7.org/CodeSystem/security-source-type", "code": "4", "display": "Application Server"}],
    });
    let mut entities = Vec::new();
    for p in rec.patients() {
        entities.push(json!({
            "what": {"reference": format!("Patient/{p}")},
            "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "1", "display": "Person"},
            "role": {"system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "1", "display": "Patient"},
        }));
    }
    for e in &rec.entities {
        let what = match e.version {
            Some(v) => format!("{}/{}/_history/{v}", e.rtype, e.id),
            None => format!("{}/{}", e.rtype, e.id),
        };
        entities.push(json!({
            "what": {"reference": what},
            "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "2", "display": "System Object"},
            "role": {"system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "4", "display": "Domain Resource"},
        }));
    }
    if let Some(q) = &rec.query {
        entities.push(json!({
            "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "2", "display": "System Object"},
            "role": {"system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "24", "display": "Query"},
            "query": B64.encode(q.as_bytes()),
            "description": rec.action,
        }));
    } else if !rec.action.is_empty() {
        entities.push(json!({
            "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "4", "display": "Other"},
            "description": rec.action,
        }));
    }
    if let Some(d) = &rec.detail {
        entities.push(json!({
            "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "4", "display": "Other"},
            "detail": [{"type": "detail", "valueString": d}],
        }));
    }
    if !entities.is_empty() {
        ev["entity"] = Value::Array(entities);
    }
    ev["extension"] = json!([{
        "url": LOG_ENTRY_EXTENSION,
        "extension": [
            {"url": "index", "valueInteger64": pos.index.to_string()},
            {"url": "leaf", "valueBase64Binary": B64.encode(pos.leaf)},
            {"url": "leafHash", "valueBase64Binary": B64.encode(leaf_hash(pos.leaf))},
        ],
    }]);
    ev
}

/// RFC 6962 leaf hash: SHA-256(0x00 ‖ data).
pub fn leaf_hash(data: &[u8]) -> [u8; 32] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(&[0]);
    ctx.update(data);
    ctx.finish()
        .as_ref()
        .try_into()
        .expect("SHA-256 is 32 bytes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaf_round_trip_and_garbage() {
        let leaf = Leaf {
            at: 1_700_000_000_000_000,
            key_name: "system/audit/2023111422",
            sealed: b"sealed bytes",
        };
        let enc = leaf.encode();
        assert_eq!(Leaf::decode(&enc), Some(leaf));
        assert!(Leaf::decode(&[]).is_none());
        assert!(Leaf::decode(&[2, 0, 0]).is_none());
        assert!(Leaf::decode(&enc[..12]).is_none());
    }

    #[test]
    fn key_per_hour() {
        assert_eq!(key_name_for(0), "system/audit/1970010100");
        assert_eq!(key_name_for(3_600_000_000 * 25), "system/audit/1970010201");
    }

    #[test]
    fn codes() {
        let mut r = AuditRecord {
            action: "GET /Patient/{id}".into(),
            interaction: Some("read".into()),
            status: 200,
            ..Default::default()
        };
        assert_eq!((r.action_code(), r.outcome_code()), ("R", 0));
        r.status = 403;
        assert_eq!(r.outcome_code(), 4);
        r.interaction = Some("delete".into());
        assert_eq!(r.action_code(), "D");
        r.status = 500;
        assert_eq!(r.outcome_code(), 8);
    }
}
