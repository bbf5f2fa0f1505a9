//! Findings (what a detector raised) and cases (findings de-duplicated into
//! one piece of work for the security officer, with its workflow).
use serde::{Deserialize, Serialize};

/// The detectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Detector {
    UnexplainedAccess,
    Snooping,
    RestrictedRecord,
    BulkExfiltration,
    UnusualTimePlace,
    CredentialAttack,
    Ransomware,
    IdentityTheft,
    BreakGlass,
    /// The learned baseline (Half-Space Trees) found a user-window unusual.
    Anomaly,
}

impl Detector {
    pub const ALL: [Detector; 10] = [
        Detector::UnexplainedAccess,
        Detector::Snooping,
        Detector::RestrictedRecord,
        Detector::BulkExfiltration,
        Detector::UnusualTimePlace,
        Detector::CredentialAttack,
        Detector::Ransomware,
        Detector::IdentityTheft,
        Detector::BreakGlass,
        Detector::Anomaly,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Detector::UnexplainedAccess => "unexplained-access",
            Detector::Snooping => "snooping",
            Detector::RestrictedRecord => "restricted-record",
            Detector::BulkExfiltration => "bulk-exfiltration",
            Detector::UnusualTimePlace => "unusual-time-place",
            Detector::CredentialAttack => "credential-attack",
            Detector::Ransomware => "ransomware",
            Detector::IdentityTheft => "identity-theft",
            Detector::BreakGlass => "break-glass",
            Detector::Anomaly => "anomaly",
        }
    }

    pub fn parse(s: &str) -> Option<Detector> {
        Detector::ALL.into_iter().find(|d| d.name() == s)
    }
}

impl std::fmt::Display for Detector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// How bad.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default,
)]
#[serde(rename_all = "kebab-case")]
pub enum Severity {
    #[default]
    Low,
    Medium,
    High,
    Critical,
}

impl Severity {
    pub fn parse(s: &str) -> Option<Severity> {
        match s {
            "low" => Some(Severity::Low),
            "medium" => Some(Severity::Medium),
            "high" => Some(Severity::High),
            "critical" => Some(Severity::Critical),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Severity::Low => "low",
            Severity::Medium => "medium",
            Severity::High => "high",
            Severity::Critical => "critical",
        }
    }
}

/// One thing a detector raised, explaining itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Finding {
    pub detector: Detector,
    /// The kind within the detector (`family`, `password-spraying`, …).
    pub kind: String,
    pub severity: Severity,
    /// UTC microseconds of the event that raised it.
    pub at: i64,
    /// The principal it concerns, if one.
    pub subject: Option<String>,
    pub username: Option<String>,
    pub patient: Option<String>,
    /// What was seen.
    pub summary: String,
    /// Against which baseline or rule.
    pub baseline: String,
    /// The audit log indexes of the events behind it (each provable with an
    /// inclusion proof).
    pub evidence: Vec<u64>,
    /// For the learned baseline: the features that drove the score.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub features: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score: Option<f64>,
}

impl Finding {
    /// Findings with the same key belong to one case while it is open.
    pub fn case_key(&self) -> String {
        format!(
            "{}|{}|{}",
            self.detector,
            self.subject.as_deref().unwrap_or("-"),
            self.patient.as_deref().unwrap_or("-")
        )
    }
}

/// Where a case stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum CaseStatus {
    #[default]
    Open,
    Investigating,
    Confirmed,
    /// Dismissed as a false positive: fed back into the baseline.
    Dismissed,
}

impl CaseStatus {
    pub fn parse(s: &str) -> Option<CaseStatus> {
        match s {
            "open" => Some(CaseStatus::Open),
            "investigating" => Some(CaseStatus::Investigating),
            "confirmed" => Some(CaseStatus::Confirmed),
            "dismissed" | "false-positive" => Some(CaseStatus::Dismissed),
            _ => None,
        }
    }
    /// Whether new findings still join the case.
    pub fn is_active(self) -> bool {
        matches!(self, CaseStatus::Open | CaseStatus::Investigating)
    }
}

/// How a case ended for the person concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    Educated,
    Sanctioned,
    Reported,
    NoAction,
}

impl Outcome {
    pub fn parse(s: &str) -> Option<Outcome> {
        match s {
            "educated" => Some(Outcome::Educated),
            "sanctioned" => Some(Outcome::Sanctioned),
            "reported" => Some(Outcome::Reported),
            "no-action" => Some(Outcome::NoAction),
            _ => None,
        }
    }
}

/// A note on a case.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Note {
    pub at: i64,
    pub by: String,
    pub text: String,
}

/// A response that was taken.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Taken {
    pub at: i64,
    pub action: String,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Findings de-duplicated into one piece of work.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Case {
    pub id: String,
    pub key: String,
    pub detector: Detector,
    pub severity: Severity,
    pub status: CaseStatus,
    pub subject: Option<String>,
    pub username: Option<String>,
    pub patient: Option<String>,
    pub opened: i64,
    pub updated: i64,
    /// Findings joined (the first and the most recent are kept in full).
    pub count: u64,
    pub findings: Vec<Finding>,
    pub responses: Vec<Taken>,
    #[serde(default)]
    pub assignee: Option<String>,
    #[serde(default)]
    pub notes: Vec<Note>,
    #[serde(default)]
    pub outcome: Option<Outcome>,
}

/// Findings kept in full per case; the rest are counted.
pub const FINDINGS_KEPT: usize = 20;

impl Case {
    pub fn open(id: String, f: Finding) -> Case {
        Case {
            id,
            key: f.case_key(),
            detector: f.detector,
            severity: f.severity,
            status: CaseStatus::Open,
            subject: f.subject.clone(),
            username: f.username.clone(),
            patient: f.patient.clone(),
            opened: f.at,
            updated: f.at,
            count: 1,
            findings: vec![f],
            responses: Vec::new(),
            assignee: None,
            notes: Vec::new(),
            outcome: None,
        }
    }

    /// Join a finding to the case.
    pub fn join(&mut self, f: Finding) {
        self.count += 1;
        self.updated = self.updated.max(f.at);
        self.severity = self.severity.max(f.severity);
        if self.findings.len() >= FINDINGS_KEPT {
            self.findings.remove(1);
        }
        self.findings.push(f);
    }

    /// A one-line summary (the latest finding's).
    pub fn summary(&self) -> &str {
        self.findings
            .last()
            .map(|f| f.summary.as_str())
            .unwrap_or("")
    }
}
