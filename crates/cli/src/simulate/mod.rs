//! `custos simulate`: a hospital at work, with labelled attacks of every
//! kind detection knows, and a scorecard of what was caught.
//!
//! Two drives share one hospital model ([`hospital`]):
//! - over HTTP (the default): a Custos server in this process on a fresh
//!   data dir, real staff signing in with password and TOTP, real FHIR
//!   reads, searches and writes, attacks as real requests ([`http`]);
//! - `--direct`: the same kind of day fed straight into the detection
//!   engine as distilled audit events, in simulated time, so that a month
//!   of a large hospital runs in minutes ([`direct`]).
pub mod direct;
pub mod hospital;
pub mod http;

use std::collections::BTreeMap;

use clap::Args;
use custos_detect::{Detector, Finding};
use serde::Serialize;

/// `custos simulate` options.
#[derive(Debug, Clone, Args)]
pub struct SimulateArgs {
    /// Days of hospital work.
    #[arg(long, default_value_t = 1)]
    pub days: u32,
    /// Members of staff.
    #[arg(long, default_value_t = 40)]
    pub staff: usize,
    /// Patients.
    #[arg(long, default_value_t = 120)]
    pub patients: usize,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Attacks injected per kind.
    #[arg(long, default_value_t = 3)]
    pub attacks: usize,
    /// Feed the detection engine directly, in simulated time (no server).
    #[arg(long)]
    pub direct: bool,
    /// Print the scorecard as JSON.
    #[arg(long)]
    pub json: bool,
    /// A config file whose `[detect]` section tunes detection (thresholds,
    /// baselines, responses) for the run.
    #[arg(long)]
    pub config: Option<std::path::PathBuf>,
    /// Also print up to this many alerts on normal work, to see why they fired.
    #[arg(long, default_value_t = 0)]
    pub show_false: usize,
}

/// The kinds of attack, with the detectors that may catch each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AttackKind {
    SnoopingFamily,
    SnoopingCoworker,
    SnoopingSelf,
    SnoopingSlow,
    VipRecord,
    BulkFast,
    BulkSlow,
    UnusualTimePlace,
    PasswordGuessing,
    PasswordSpraying,
    TotpGuessing,
    RevokedToken,
    DormantAccount,
    RansomwareFast,
    RansomwarePartial,
    RansomwareDeletes,
    IdentityReuse,
    ImpossibleTravel,
    BreakGlassMisuse,
}

impl AttackKind {
    pub const ALL: [AttackKind; 19] = [
        AttackKind::SnoopingFamily,
        AttackKind::SnoopingCoworker,
        AttackKind::SnoopingSelf,
        AttackKind::SnoopingSlow,
        AttackKind::VipRecord,
        AttackKind::BulkFast,
        AttackKind::BulkSlow,
        AttackKind::UnusualTimePlace,
        AttackKind::PasswordGuessing,
        AttackKind::PasswordSpraying,
        AttackKind::TotpGuessing,
        AttackKind::RevokedToken,
        AttackKind::DormantAccount,
        AttackKind::RansomwareFast,
        AttackKind::RansomwarePartial,
        AttackKind::RansomwareDeletes,
        AttackKind::IdentityReuse,
        AttackKind::ImpossibleTravel,
        AttackKind::BreakGlassMisuse,
    ];

    pub fn name(self) -> String {
        serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default()
    }

    /// The detectors whose finding counts as catching it.
    pub fn caught_by(self) -> &'static [Detector] {
        use AttackKind::*;
        use Detector as D;
        match self {
            SnoopingFamily | SnoopingCoworker | SnoopingSelf => &[D::Snooping],
            SnoopingSlow => &[D::UnexplainedAccess],
            VipRecord => &[D::RestrictedRecord],
            BulkFast | BulkSlow => &[D::BulkExfiltration, D::Anomaly],
            UnusualTimePlace => &[D::UnusualTimePlace, D::Anomaly],
            PasswordGuessing | PasswordSpraying | TotpGuessing | RevokedToken | DormantAccount => {
                &[D::CredentialAttack]
            }
            RansomwareFast | RansomwarePartial | RansomwareDeletes => &[D::Ransomware],
            IdentityReuse | ImpossibleTravel => &[D::IdentityTheft],
            BreakGlassMisuse => &[D::BreakGlass],
        }
    }

    /// The kind (within the detector) that names a network-wide attack with
    /// no principal: such findings are matched by kind and time.
    fn anonymous_kind(self) -> Option<&'static str> {
        match self {
            AttackKind::PasswordSpraying => Some("password-spraying"),
            AttackKind::RevokedToken => Some("revoked-token-reuse"),
            _ => None,
        }
    }
}

/// One injected attack, as the scorecard knows it.
#[derive(Debug, Clone)]
pub struct Injected {
    pub kind: AttackKind,
    /// When it began and when its last step was (µs, the simulation's clock).
    pub start: i64,
    pub end: i64,
    pub subject: Option<String>,
    pub patient: Option<String>,
    /// Records an attacker changed before a response stopped them (ransomware).
    pub changed: Option<usize>,
    /// Of those, how many were checked readable at their previous version.
    pub restorable: Option<usize>,
}

/// Per kind of attack.
#[derive(Debug, Clone, Default, Serialize)]
pub struct KindScore {
    pub injected: usize,
    pub detected: usize,
    pub recall: f64,
    /// Median time from the attack's start to its first alert, in seconds.
    pub median_seconds_to_detect: Option<f64>,
}

/// What `custos simulate` prints.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Scorecard {
    pub mode: String,
    pub days: u32,
    pub staff: usize,
    pub patients: usize,
    pub seed: u64,
    pub events: u64,
    pub events_per_second: f64,
    pub kinds: BTreeMap<String, KindScore>,
    /// Alerts not explained by any injected attack.
    pub false_alerts: usize,
    pub false_alerts_per_100_users_per_day: f64,
    /// Records changed by each ransomware attack before the response took effect.
    pub ransomware_changed: Vec<usize>,
    pub ransomware_restorable: Vec<usize>,
    /// Detector counts of the false alerts.
    pub false_alerts_by_detector: BTreeMap<String, usize>,
    /// Commit-to-alert latency, p99 (HTTP drive only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alert_latency_p99_ms: Option<f64>,
}

const DETECT_WINDOW: i64 = 3 * 24 * 3_600_000_000;

/// Match findings to attacks and score.
pub fn score(
    mode: &str,
    args: &SimulateArgs,
    attacks: &[Injected],
    findings: &[Finding],
    events: u64,
    seconds: f64,
) -> Scorecard {
    let mut matched = vec![false; findings.len()];
    let mut kinds: BTreeMap<String, KindScore> = BTreeMap::new();
    let mut delays: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for a in attacks {
        let entry = kinds.entry(a.kind.name()).or_default();
        entry.injected += 1;
        let mut first: Option<i64> = None;
        for (i, f) in findings.iter().enumerate() {
            if f.at < a.start || f.at > a.end.max(a.start) + DETECT_WINDOW {
                continue;
            }
            let by_principal = a.subject.is_some() && f.subject == a.subject;
            let by_patient = a.patient.is_some() && f.patient == a.patient;
            let by_kind = a.kind.anonymous_kind().is_some_and(|k| f.kind == k);
            if !(by_principal || by_patient || by_kind) {
                continue;
            }
            // Any alert about the attack is not an alert on normal work;
            // it catches the attack only from one of the detectors meant for it.
            matched[i] = true;
            if a.kind.caught_by().contains(&f.detector) {
                first = Some(first.map_or(f.at, |t: i64| t.min(f.at)));
            }
        }
        if first.is_none() && args.show_false > 0 {
            eprintln!(
                "missed attack: {} by {:?} on {:?} at {}",
                a.kind.name(),
                a.subject,
                a.patient,
                a.start
            );
        }
        if let Some(t) = first {
            entry.detected += 1;
            delays
                .entry(a.kind.name())
                .or_default()
                .push((t - a.start) as f64 / 1e6);
        }
    }
    for (k, s) in kinds.iter_mut() {
        s.recall = if s.injected == 0 {
            0.0
        } else {
            s.detected as f64 / s.injected as f64
        };
        if let Some(d) = delays.get_mut(k) {
            d.sort_by(f64::total_cmp);
            s.median_seconds_to_detect = d.get(d.len() / 2).copied();
        }
    }
    let mut false_by: BTreeMap<String, usize> = BTreeMap::new();
    for (i, f) in findings.iter().enumerate() {
        if !matched[i] {
            *false_by.entry(f.detector.name().to_string()).or_default() += 1;
        }
    }
    let false_alerts = matched.iter().filter(|m| !**m).count();
    for (f, _) in findings
        .iter()
        .zip(&matched)
        .filter(|(_, m)| !**m)
        .take(args.show_false)
    {
        eprintln!(
            "normal-work alert: {} {} {:?} {:?}: {} [{}]",
            f.detector, f.kind, f.subject, f.patient, f.summary, f.baseline
        );
    }
    let user_days = (args.staff as f64 / 100.0) * args.days.max(1) as f64;
    Scorecard {
        mode: mode.to_string(),
        days: args.days,
        staff: args.staff,
        patients: args.patients,
        seed: args.seed,
        events,
        events_per_second: if seconds > 0.0 {
            events as f64 / seconds
        } else {
            0.0
        },
        kinds,
        false_alerts,
        false_alerts_per_100_users_per_day: false_alerts as f64 / user_days,
        ransomware_changed: attacks.iter().filter_map(|a| a.changed).collect(),
        ransomware_restorable: attacks.iter().filter_map(|a| a.restorable).collect(),
        false_alerts_by_detector: false_by,
        alert_latency_p99_ms: None,
    }
}

impl Scorecard {
    pub fn print(&self) {
        println!(
            "== scorecard ({}: {} days, {} staff, {} patients, seed {}) ==",
            self.mode, self.days, self.staff, self.patients, self.seed
        );
        println!(
            "events     {} judged ({:.0} events/s)",
            self.events, self.events_per_second
        );
        println!(
            "{:<22} {:>8} {:>8} {:>7} {:>14}",
            "attack", "injected", "detected", "recall", "time to detect"
        );
        for (k, s) in &self.kinds {
            println!(
                "{:<22} {:>8} {:>8} {:>7.2} {:>14}",
                k,
                s.injected,
                s.detected,
                s.recall,
                s.median_seconds_to_detect
                    .map(|t| format!("{t:.1} s"))
                    .unwrap_or_else(|| "-".into())
            );
        }
        println!(
            "normal     {} alerts on normal work = {:.2} per 100 users per day {:?}",
            self.false_alerts,
            self.false_alerts_per_100_users_per_day,
            self.false_alerts_by_detector
        );
        if let Some(l) = self.alert_latency_p99_ms {
            println!("latency    commit to alert p99 {l:.1} ms");
        }
        if !self.ransomware_changed.is_empty() {
            println!(
                "contained  ransomware changed {:?} records before the response; restorable {:?}",
                self.ransomware_changed, self.ransomware_restorable
            );
        }
    }
}

/// Run `custos simulate`.
pub async fn run(args: SimulateArgs) -> anyhow::Result<()> {
    if args.staff < 12 || args.patients < 30 {
        anyhow::bail!("a simulated hospital needs at least 12 staff and 30 patients");
    }
    if args.days == 0 || args.days > 366 {
        anyhow::bail!("--days must be between 1 and 366");
    }
    let detect = match &args.config {
        Some(path) => crate::config::FileConfig::load(path)?
            .detect
            .unwrap_or_default(),
        None => custos_detect::DetectConfig::default(),
    };
    let card = if args.direct {
        direct::run(&args, detect)?
    } else {
        http::run(&args, detect).await?
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&card)?);
    } else {
        card.print();
    }
    Ok(())
}
