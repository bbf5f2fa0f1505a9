//! Settings of detection (`[detect]` in the TOML file): thresholds, the
//! learned baseline, the response policy and the webhook.
use serde::{Deserialize, Serialize};

use crate::alerts::{Detector, Severity};

/// What to do about a finding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    /// Raise the alert only.
    Notify,
    /// Lock the account and revoke all its tokens.
    Lock,
    /// Switch the principal to read-only.
    ReadOnly,
    /// Switch the whole server to read-only.
    ServerReadOnly,
    /// The principal must break the glass (state a reason) for its next
    /// access to any patient.
    RequireBreakGlass,
}

impl Action {
    pub fn name(self) -> &'static str {
        match self {
            Action::Notify => "notify",
            Action::Lock => "lock",
            Action::ReadOnly => "read-only",
            Action::ServerReadOnly => "server-read-only",
            Action::RequireBreakGlass => "require-break-glass",
        }
    }
}

/// One rule of the response policy: findings of `detector` (any, if
/// unset) at `min_severity` or above get `action`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResponseRule {
    #[serde(default)]
    pub detector: Option<Detector>,
    /// Only this kind within the detector (`password-guessing`, `server-wide`, …).
    #[serde(default)]
    pub kind: Option<String>,
    pub min_severity: Severity,
    pub action: Action,
}

/// Detection settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DetectConfig {
    pub enabled: bool,
    /// Distinct patients per user-hour never alerted below this.
    pub bulk_min_patients_hour: f64,
    /// Distinct patients per user-day never alerted below this.
    pub bulk_min_patients_day: f64,
    /// How many standard deviations above a baseline is "far above".
    pub bulk_sigmas: f64,
    /// The same for a user-day against the daily baselines.
    pub bulk_sigmas_day: f64,
    /// A single response carrying this many resources is a huge search.
    pub huge_search_results: u32,
    /// What a new role expects per user-hour before it has learned (patients).
    pub role_prior_patients_hour: f64,
    pub role_prior_patients_day: f64,
    /// Failed sign-ins on one account within `attack_window_secs`.
    pub guessing_failures: usize,
    /// Failed second factors on one account within the window.
    pub totp_failures: usize,
    /// Distinct accounts failing from one network within the window.
    pub spraying_accounts: usize,
    pub attack_window_secs: i64,
    /// An account unused this long is dormant.
    pub dormant_days: i64,
    /// Updates or deletes per principal per minute that are always suspicious.
    pub ransomware_writes_per_minute: usize,
    /// High-entropy rewrites per principal per minute.
    pub ransomware_entropy_writes: usize,
    /// Updates and deletes per minute across the server, at least.
    pub ransomware_server_per_minute: usize,
    /// Two encounters of one patient at different sites closer than this.
    pub travel_minutes: i64,
    /// Anomaly score (0–1) of a user-window that raises an alert.
    pub anomaly_threshold: f64,
    /// User-windows a user's own model needs before it is trusted.
    pub anomaly_window: u32,
    /// An hour of day holding less than this share of a user's history is unusual.
    pub unusual_hour_share: f64,
    /// Days of history a user needs before time and place are judged.
    pub unusual_min_days: u32,
    /// Distinct patients denied to one user within an hour that count as probing.
    pub probing_denials: usize,
    /// The response policy: every matching rule's action is taken.
    pub responses: Vec<ResponseRule>,
    /// Whether responses act on systems (clients) too, not only on people.
    /// Off by default: a hospital's integration engine locked by a false
    /// positive stops admissions; its alerts still go out.
    pub respond_to_systems: bool,
    /// A URL every new case and every escalation is POSTed to, signed.
    pub webhook_url: Option<String>,
    /// The HMAC-SHA256 key of the webhook signature (environment
    /// `CUSTOS_DETECT_WEBHOOK_SECRET` overrides).
    pub webhook_secret: Option<String>,
    /// Seconds between saves of the detection state.
    pub save_secs: u64,
}

impl Default for DetectConfig {
    fn default() -> Self {
        use Action::*;
        use Detector::*;
        let rule = |d: Detector, kind: Option<&str>, s: Severity, a: Action| ResponseRule {
            detector: Some(d),
            kind: kind.map(str::to_string),
            min_severity: s,
            action: a,
        };
        DetectConfig {
            enabled: true,
            bulk_min_patients_hour: 40.0,
            bulk_min_patients_day: 120.0,
            bulk_sigmas: 6.0,
            bulk_sigmas_day: 4.0,
            huge_search_results: 1000,
            role_prior_patients_hour: 15.0,
            role_prior_patients_day: 60.0,
            guessing_failures: 5,
            totp_failures: 3,
            spraying_accounts: 5,
            attack_window_secs: 600,
            dormant_days: 30,
            ransomware_writes_per_minute: 8,
            ransomware_entropy_writes: 3,
            ransomware_server_per_minute: 600,
            travel_minutes: 120,
            anomaly_threshold: 0.75,
            anomaly_window: 48,
            unusual_hour_share: 0.01,
            unusual_min_days: 5,
            probing_denials: 3,
            responses: vec![
                rule(
                    Ransomware,
                    Some("server-wide"),
                    Severity::Critical,
                    ServerReadOnly,
                ),
                rule(Ransomware, None, Severity::Critical, ReadOnly),
                rule(BulkExfiltration, None, Severity::High, Lock),
                rule(RestrictedRecord, None, Severity::High, RequireBreakGlass),
                rule(Snooping, None, Severity::High, RequireBreakGlass),
            ],
            respond_to_systems: false,
            webhook_url: None,
            webhook_secret: None,
            save_secs: 5,
        }
    }
}

impl DetectConfig {
    /// The actions the policy takes for a finding (without duplicates;
    /// `Notify` is implied and not listed).
    pub fn actions_for(&self, detector: Detector, kind: &str, severity: Severity) -> Vec<Action> {
        let mut out = Vec::new();
        for r in &self.responses {
            if r.detector.is_none_or(|d| d == detector)
                && r.kind.as_deref().is_none_or(|k| k == kind)
                && severity >= r.min_severity
                && r.action != Action::Notify
                && !out.contains(&r.action)
            {
                out.push(r.action);
            }
        }
        // A server-wide switch makes a principal's own redundant.
        if out.contains(&Action::ServerReadOnly) {
            out.retain(|a| *a != Action::ReadOnly);
        }
        out
    }
}
