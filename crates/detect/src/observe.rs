//! What the detectors see of one committed audit event: the [`Observed`]
//! event, distilled from an [`AuditRecord`] and enriched with the facts of
//! what it wrote (see `live.rs`).
use custos_audit::{AuditRecord, EventKind};
use serde::{Deserialize, Serialize};

use crate::facts::Tok;

/// One access to a patient compartment, as the policy decided it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Access {
    pub patient: String,
    pub allowed: bool,
    /// The policy rule (`care-team`, `encounter`, `role-any-patient`, …).
    pub rule: String,
}

/// What one committed write did, with the facts the enricher read.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Written {
    pub rtype: String,
    pub id: String,
    pub version: i64,
    pub patient: Option<String>,
    /// `create`, `update` or `delete`.
    pub interaction: String,
    /// An update that rewrote text values into high-entropy strings
    /// (encrypted or random-looking), as ransomware does.
    #[serde(default)]
    pub high_entropy: bool,
    /// For a Patient (or Coverage) write: the identity it states
    /// (family, given, birth date) and its identifiers (MRN, SSN, member id).
    #[serde(default)]
    pub identity: Option<Tok>,
    #[serde(default)]
    pub identifiers: Vec<Tok>,
    /// For an Encounter: the site (Organization) and when it started (µs).
    #[serde(default)]
    pub site: Option<String>,
    #[serde(default)]
    pub site_at: Option<i64>,
}

/// A committed audit event, as the detectors see it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Observed {
    /// Its index in the Merkle log (what an inclusion proof is asked for).
    pub index: u64,
    /// UTC microseconds.
    pub at: i64,
    pub kind: Kind,
    /// The principal (`user:…`, `client:…`), if known.
    pub subject: Option<String>,
    pub username: Option<String>,
    pub role: Option<String>,
    /// The network the request came from (`10.1.2.0/24`).
    pub network: Option<String>,
    /// `read`, `search-type`, `update`, `login`, `token`, …
    pub interaction: String,
    pub status: u16,
    pub accesses: Vec<Access>,
    pub writes: Vec<Written>,
    /// Resources returned (a search, a history, an export).
    pub results: u32,
    pub break_glass: Option<String>,
    /// Every rule that decided (for security events: `password-failed`, …).
    pub rules: Vec<String>,
}

/// The kind of event, as far as detection cares.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    #[default]
    Rest,
    Login,
    Token,
    Admin,
    Export,
    Other,
}

/// The network of a source address: the /24 of an IPv4 address, the /48 of
/// an IPv6 one. Ports and brackets are ignored; anything unparsable is kept as is.
pub fn network_of(source: &str) -> String {
    let s = source.trim();
    let host = if let Some(rest) = s.strip_prefix('[') {
        rest.split(']').next().unwrap_or(rest)
    } else if s.matches(':').count() == 1 {
        s.split(':').next().unwrap_or(s)
    } else {
        s
    };
    match host.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(v4)) => {
            let o = v4.octets();
            format!("{}.{}.{}.0/24", o[0], o[1], o[2])
        }
        Ok(std::net::IpAddr::V6(v6)) => {
            let s = v6.segments();
            format!("{:x}:{:x}:{:x}::/48", s[0], s[1], s[2])
        }
        Err(_) => host.to_string(),
    }
}

impl Observed {
    /// Distill an audit record committed at `index`.
    pub fn from_record(index: u64, rec: &AuditRecord) -> Observed {
        let kind = match rec.kind {
            EventKind::Rest => Kind::Rest,
            EventKind::Login => Kind::Login,
            EventKind::Token => Kind::Token,
            EventKind::Admin => Kind::Admin,
            EventKind::Export => Kind::Export,
            _ => Kind::Other,
        };
        let mut accesses: Vec<Access> = Vec::new();
        for d in &rec.decisions {
            if let Some(p) = &d.patient
                && !accesses
                    .iter()
                    .any(|a| &a.patient == p && a.allowed == d.allowed)
            {
                accesses.push(Access {
                    patient: p.clone(),
                    allowed: d.allowed,
                    rule: d.rule.to_string(),
                });
            }
        }
        // Entities of a read name the version read; only a write's are changes.
        let wrote = match rec.interaction.as_deref() {
            Some("create" | "update" | "delete" | "patch" | "transaction" | "batch") => true,
            Some(_) => false,
            None => matches!(
                rec.action.split(' ').next(),
                Some("POST" | "PUT" | "PATCH" | "DELETE")
            ),
        };
        let writes = if wrote && rec.status < 300 {
            rec.entities
                .iter()
                .filter(|e| e.version.is_some())
                .map(|e| Written {
                    rtype: e.rtype.clone(),
                    id: e.id.clone(),
                    version: e.version.unwrap_or(0),
                    patient: e.patient.clone(),
                    interaction: match rec.interaction.as_deref() {
                        Some(i @ ("create" | "update" | "delete")) => i.to_string(),
                        _ if e.version == Some(1) => "create".into(),
                        _ => "update".into(),
                    },
                    ..Written::default()
                })
                .collect()
        } else {
            Vec::new()
        };
        // A resource read in a compartment is an access to it, even when no
        // decision named the patient (a role allowed to reach any patient).
        if !wrote && rec.status < 300 {
            for e in &rec.entities {
                if let Some(p) = &e.patient
                    && !accesses.iter().any(|a| &a.patient == p)
                {
                    accesses.push(Access {
                        patient: p.clone(),
                        allowed: true,
                        rule: rec.rules(),
                    });
                }
            }
        }
        // An allowed write into a compartment is an access too, even when
        // the decision did not name the patient.
        for w in &writes {
            if let Some(p) = &w.patient
                && !accesses.iter().any(|a| &a.patient == p)
            {
                accesses.push(Access {
                    patient: p.clone(),
                    allowed: true,
                    rule: rec.rules(),
                });
            }
        }
        let mut rules: Vec<String> = Vec::new();
        for d in &rec.decisions {
            if !rules.iter().any(|r| r == d.rule.as_ref()) {
                rules.push(d.rule.to_string());
            }
        }
        Observed {
            index,
            at: rec.at,
            kind,
            subject: rec.agent.subject.clone(),
            username: rec.agent.username.clone(),
            role: rec.agent.role.clone(),
            network: rec.agent.source.as_deref().map(network_of),
            interaction: rec
                .interaction
                .clone()
                .unwrap_or_else(|| rec.action.clone()),
            status: rec.status,
            accesses,
            writes,
            results: rec.results.unwrap_or(0),
            break_glass: rec.break_glass_reason.clone(),
            rules,
        }
    }

    /// Whether the event read data (what bulk exfiltration counts).
    pub fn is_read(&self) -> bool {
        matches!(
            self.interaction.as_str(),
            "read"
                | "vread"
                | "search-type"
                | "search-system"
                | "history-instance"
                | "history-type"
                | "history-system"
                | "operation"
        ) || self.kind == Kind::Export
    }

    /// The account the event is about: its subject, else the username tried.
    pub fn account(&self) -> Option<&str> {
        self.subject.as_deref().or(self.username.as_deref())
    }

    /// Whether the principal is a person working in the hospital (not a
    /// patient, not a system).
    pub fn is_staff(&self) -> bool {
        matches!(
            self.role.as_deref(),
            Some(
                "physician"
                    | "nurse"
                    | "registration-clerk"
                    | "billing"
                    | "admin"
                    | "security-officer"
                    | "auditor"
                    | "researcher"
            )
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn networks() {
        assert_eq!(network_of("10.1.2.3:5555"), "10.1.2.0/24");
        assert_eq!(network_of("10.1.2.3"), "10.1.2.0/24");
        assert_eq!(network_of("[2001:db8:1:2::1]:80"), "2001:db8:1::/48");
        assert_eq!(network_of("2001:db8:1:2::1"), "2001:db8:1::/48");
        assert_eq!(network_of("unix"), "unix");
    }
}
