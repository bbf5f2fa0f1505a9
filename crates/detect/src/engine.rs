//! The detectors: one pass over each committed event, keeping the state
//! that makes them judge — windows, baselines, what each user usually
//! does — as plain serializable data, so that a restart resumes it.
//!
//! Everything here is synchronous and does no I/O: the live pipeline
//! (`live.rs`), the simulator's direct feed and the benchmarks drive the
//! same [`Engine`].
use std::collections::{HashMap, HashSet, VecDeque};

use serde::{Deserialize, Serialize};

use crate::alerts::{Detector, Finding, Severity};
use crate::config::DetectConfig;
use crate::facts::{Facts, Tok};
use crate::hst::{Forest, Model};
use crate::observe::{Kind, Observed};

const HOUR: i64 = 3_600_000_000;
const DAY: i64 = 24 * HOUR;
const MINUTE: i64 = 60_000_000;

/// Policy rules that explain an access by care.
const CARE_RULES: [&str; 5] = [
    "care-team",
    "encounter",
    "general-practitioner",
    "own-record",
    "new-patient",
];

/// The features of a user-window, in this order.
pub const FEATURES: [&str; 8] = [
    "records",
    "distinct patients",
    "unexplained share",
    "new-patient share",
    "hour of day (sin)",
    "hour of day (cos)",
    "writes",
    "denied share",
];

/// An exponentially weighted mean and variance.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Ewm {
    pub n: u32,
    pub mean: f64,
    pub var: f64,
}

impl Ewm {
    fn prior(mean: f64) -> Ewm {
        Ewm {
            n: 1,
            mean,
            var: (mean / 3.0).powi(2),
        }
    }

    fn update(&mut self, x: f64) {
        self.n = self.n.saturating_add(1);
        let a = 1.0 / (self.n.min(60) as f64);
        let d = x - self.mean;
        self.mean += a * d;
        self.var = (1.0 - a) * (self.var + a * d * d);
    }

    /// `mean + k·σ`.
    fn limit(&self, k: f64) -> f64 {
        self.mean + k * self.var.sqrt()
    }
}

/// One user-window (a clock hour of one user's activity).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Window {
    start: i64,
    events: u32,
    records: u32,
    patients: HashSet<String>,
    unexplained: u32,
    new_patients: u32,
    writes: u32,
    denied: u32,
    denied_patients: HashSet<String>,
    evidence: Vec<u64>,
    fired: bool,
}

impl Window {
    fn features(&self) -> [f32; 8] {
        let hour = ((self.start / HOUR) % 24) as f64;
        let angle = hour / 24.0 * std::f64::consts::TAU;
        let patients = self.patients.len().max(1) as f64;
        let share = |n: u32| (n as f64 / patients).min(1.0) as f32;
        let log = |n: f64, max: f64| ((1.0 + n).ln() / (1.0 + max).ln()).min(1.0) as f32;
        [
            log(self.records as f64, 5000.0),
            log(self.patients.len() as f64, 1000.0),
            share(self.unexplained),
            share(self.new_patients),
            ((angle.sin() + 1.0) / 2.0) as f32,
            ((angle.cos() + 1.0) / 2.0) as f32,
            log(self.writes as f64, 1000.0),
            (self.denied as f64 / self.events.max(1) as f64) as f32,
        ]
    }
}

/// What detection remembers of one principal.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct UserState {
    role: String,
    first_seen: i64,
    last_seen: i64,
    days: u32,
    day: i64,
    hours: [u32; 24],
    networks: Vec<String>,
    /// Patients opened, with when last (pruned after 90 days).
    seen: HashMap<String, i64>,
    hour: Window,
    day_patients: HashSet<String>,
    day_evidence: Vec<u64>,
    day_fired: bool,
    hourly: Option<Ewm>,
    daily: Option<Ewm>,
    model: Option<Model>,
    writes: VecDeque<i64>,
    entropy: VecDeque<i64>,
    /// Keys of findings already raised today (de-duplication).
    fired: HashSet<String>,
    /// Patients whose access was dismissed as explained (feedback).
    explained: HashSet<String>,
}

/// What detection remembers of a role.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct RoleState {
    hourly: Option<Ewm>,
    daily: Option<Ewm>,
    model: Option<Model>,
}

/// The whole detection state, saved and restored as one value.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EngineState {
    /// The next audit index to process.
    pub cursor: u64,
    users: HashMap<String, UserState>,
    roles: HashMap<String, RoleState>,
    /// Failures per account (µs).
    failures: HashMap<String, VecDeque<i64>>,
    totp_failures: HashMap<String, VecDeque<i64>>,
    /// Failures per network: (µs, account).
    network_failures: HashMap<String, VecDeque<(i64, String)>>,
    /// Networks seen per department (site).
    site_networks: HashMap<String, HashSet<String>>,
    /// Identifier → (identity, patient) as first registered. Grows with the
    /// patients, so it is saved entry by entry ([`RegistryEntry`]), never in
    /// the global state (read from a global state of an earlier release).
    #[serde(default, skip_serializing)]
    identifiers: HashMap<Tok, (Option<Tok>, String)>,
    /// Patient → (site, start µs) of its latest encounter (saved as the identifiers are).
    #[serde(default, skip_serializing)]
    encounters: HashMap<String, (String, i64)>,
    /// Server-wide updates and deletes (µs), the last minute.
    server_writes: VecDeque<i64>,
    server_minute: Option<Ewm>,
    server_minute_start: i64,
    server_minute_count: u32,
    server_fired_until: i64,
    /// Security events seen since (de-duplication of credential alerts).
    credential_fired: HashMap<String, i64>,
}

/// The detectors with their state.
pub struct Engine {
    /// Shared so that a detector holds it across `&mut self` calls without
    /// copying its response rules and strings for every event.
    config: std::sync::Arc<DetectConfig>,
    forest: Forest,
    state: EngineState,
    /// Principals whose state changed since [`Engine::take_dirty`].
    dirty: HashSet<String>,
    /// Identifiers registered since [`Engine::take_dirty_registry`].
    dirty_identifiers: HashSet<Tok>,
    /// Patients whose latest encounter changed since [`Engine::take_dirty_registry`].
    dirty_encounters: HashSet<String>,
}

/// One entry of detection's registry of patients (identifiers as first
/// registered, latest encounters), saved on its own: the registry grows
/// with the patients (two identifiers each, say), so saving it whole, as
/// the global state is saved, would rewrite tens of megabytes at 100,000
/// patients every time; entry by entry, a save writes only what changed
/// since the last.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RegistryEntry {
    /// An identifier as first registered: its token, the identity token of
    /// the demographics it came with, the patient.
    Identifier {
        identifier: Tok,
        identity: Option<Tok>,
        patient: String,
    },
    /// A patient's latest encounter: where and when it started (µs).
    Encounter {
        patient: String,
        site: String,
        start: i64,
    },
}

/// Seed of the shared Half-Space Trees structure (fixed: every model of
/// every deployment uses the same, so saved models stay valid).
const FOREST_SEED: u64 = 0x0c05_7050;

fn day_of(at: i64) -> i64 {
    at.div_euclid(DAY)
}

fn push_evidence(v: &mut Vec<u64>, i: u64) {
    if v.len() < 50 {
        v.push(i);
    } else {
        *v.last_mut().expect("non-empty") = i;
    }
}

impl Engine {
    pub fn new(config: DetectConfig) -> Engine {
        Engine::with_state(config, EngineState::default())
    }

    pub fn with_state(config: DetectConfig, state: EngineState) -> Engine {
        Engine {
            config: std::sync::Arc::new(config),
            forest: Forest::new(FEATURES.len(), 25, 7, FOREST_SEED),
            state,
            dirty: HashSet::new(),
            dirty_identifiers: HashSet::new(),
            dirty_encounters: HashSet::new(),
        }
    }

    /// Restore from what [`Engine::global_state`], [`Engine::take_dirty`]
    /// and [`Engine::take_dirty_registry`] saved.
    pub fn restore(
        config: DetectConfig,
        global: &[u8],
        users: impl IntoIterator<Item = (String, Vec<u8>)>,
        registry: impl IntoIterator<Item = RegistryEntry>,
    ) -> Result<Engine, serde_json::Error> {
        let mut state: EngineState = serde_json::from_slice(global)?;
        for (subject, bytes) in users {
            state.users.insert(subject, serde_json::from_slice(&bytes)?);
        }
        // A global state saved by an earlier release carries the registry
        // itself: its entries are saved again, one by one, at the next save.
        let (old_identifiers, old_encounters) = (
            state.identifiers.keys().copied().collect::<HashSet<_>>(),
            state.encounters.keys().cloned().collect::<HashSet<_>>(),
        );
        for entry in registry {
            match entry {
                RegistryEntry::Identifier {
                    identifier,
                    identity,
                    patient,
                } => {
                    state.identifiers.insert(identifier, (identity, patient));
                }
                RegistryEntry::Encounter {
                    patient,
                    site,
                    start,
                } => {
                    state.encounters.insert(patient, (site, start));
                }
            }
        }
        let mut engine = Engine::with_state(config, state);
        engine.dirty_identifiers = old_identifiers;
        engine.dirty_encounters = old_encounters;
        Ok(engine)
    }

    /// The registry entries added or changed since the last call.
    pub fn take_dirty_registry(&mut self) -> Vec<RegistryEntry> {
        let identifiers = std::mem::take(&mut self.dirty_identifiers);
        let encounters = std::mem::take(&mut self.dirty_encounters);
        let mut out = Vec::with_capacity(identifiers.len() + encounters.len());
        for identifier in identifiers {
            if let Some((identity, patient)) = self.state.identifiers.get(&identifier) {
                out.push(RegistryEntry::Identifier {
                    identifier,
                    identity: *identity,
                    patient: patient.clone(),
                });
            }
        }
        for patient in encounters {
            if let Some((site, start)) = self.state.encounters.get(&patient) {
                out.push(RegistryEntry::Encounter {
                    site: site.clone(),
                    start: *start,
                    patient,
                });
            }
        }
        out
    }

    /// Everything but the principals' own state, serialized.
    pub fn global_state(&mut self) -> Vec<u8> {
        let users = std::mem::take(&mut self.state.users);
        let out = serde_json::to_vec(&self.state).expect("detection state serializes");
        self.state.users = users;
        out
    }

    /// The state of each principal changed since the last call, serialized.
    pub fn take_dirty(&mut self) -> Vec<(String, Vec<u8>)> {
        let dirty = std::mem::take(&mut self.dirty);
        dirty
            .into_iter()
            .filter_map(|s| {
                let u = self.state.users.get(&s)?;
                Some((s, serde_json::to_vec(u).expect("user state serializes")))
            })
            .collect()
    }

    pub fn config(&self) -> &DetectConfig {
        &self.config
    }

    pub fn state(&self) -> &EngineState {
        &self.state
    }

    /// Principals known.
    pub fn users(&self) -> usize {
        self.state.users.len()
    }

    /// Run every detector over one event; findings go to `out`.
    pub fn process(&mut self, ev: &Observed, facts: &dyn Facts, out: &mut Vec<Finding>) {
        self.state.cursor = self.state.cursor.max(ev.index + 1);
        match ev.kind {
            Kind::Login | Kind::Token => self.credentials(ev, out),
            Kind::Rest | Kind::Export if ev.status == 401 => self.credentials(ev, out),
            _ => {}
        }
        self.identity_theft(ev, out);
        let Some(subject) = ev.subject.clone() else {
            return;
        };
        if ev.status == 401 {
            return;
        }
        self.server_writes(ev, out);
        self.user_event(&subject, ev, facts, out);
    }

    /// Close user-windows that ended before `now` (µs): each is scored by
    /// the learned baseline and learned. The live pipeline calls this now
    /// and then, so that a quiet user's last hour is judged too.
    pub fn tick(&mut self, now: i64, out: &mut Vec<Finding>) {
        let subjects: Vec<String> = self
            .state
            .users
            .iter()
            .filter(|(_, u)| u.hour.events > 0 && u.hour.start + HOUR <= now)
            .map(|(s, _)| s.clone())
            .collect();
        for s in subjects {
            self.close_hour(&s, out);
        }
    }

    /// Feedback from a case dismissed as a false positive: what raised it
    /// is learned as normal.
    pub fn dismissed(&mut self, f: &Finding) {
        let Some(subject) = &f.subject else { return };
        self.dirty.insert(subject.clone());
        let Some(u) = self.state.users.get_mut(subject) else {
            return;
        };
        match f.detector {
            Detector::UnexplainedAccess | Detector::Snooping | Detector::RestrictedRecord => {
                if let Some(p) = &f.patient {
                    u.explained.insert(p.clone());
                }
            }
            Detector::BulkExfiltration | Detector::Anomaly => {
                // Learn the user's recent level as normal: widen the baselines.
                if let Some(h) = &mut u.hourly {
                    h.var = h.var.max((h.mean * 0.5).powi(2)) * 4.0;
                }
                if let Some(d) = &mut u.daily {
                    d.var = d.var.max((d.mean * 0.5).powi(2)) * 4.0;
                }
                let x = u.hour.features();
                if let Some(m) = &mut u.model {
                    m.learn(&self.forest, &x, 4);
                }
            }
            Detector::UnusualTimePlace => {
                if let Some(net) = f.kind.strip_prefix("network:") {
                    u.networks.push(net.to_string());
                }
            }
            _ => {}
        }
    }

    #[allow(clippy::too_many_arguments)] // one named slot per field of a Finding
    fn finding(
        &self,
        detector: Detector,
        kind: &str,
        severity: Severity,
        ev: &Observed,
        patient: Option<&str>,
        summary: String,
        baseline: String,
        evidence: Vec<u64>,
    ) -> Finding {
        Finding {
            detector,
            kind: kind.to_string(),
            severity,
            at: ev.at,
            subject: ev.subject.clone(),
            username: ev.username.clone(),
            patient: patient.map(str::to_string),
            summary,
            baseline,
            evidence,
            features: Vec::new(),
            score: None,
        }
    }

    // ------------------------------------------------------------ credentials

    fn credentials(&mut self, ev: &Observed, out: &mut Vec<Finding>) {
        let cfg = std::sync::Arc::clone(&self.config);
        let window = cfg.attack_window_secs * 1_000_000;
        let failed: Vec<&str> = ev
            .rules
            .iter()
            .map(String::as_str)
            .filter(|r| {
                r.starts_with("password-failed")
                    || r.starts_with("totp-failed")
                    || r.starts_with("unknown-user")
            })
            .collect();
        // A genuine token presented after its revocation, a rotated refresh
        // token presented again, or a locked account's token still in use.
        let reuse = ev.rules.iter().find_map(|r| {
            if r.contains("already used")
                || r == "token-revoked"
                || r == "session-revoked"
                || r.contains("was revoked")
            {
                Some("revoked-token-reuse")
            } else if r == "account-locked" {
                Some("locked-account-use")
            } else {
                None
            }
        });
        let account = ev.account().unwrap_or("unknown").to_string();
        let net = ev.network.clone().unwrap_or_else(|| "unknown".into());
        if let Some(kind) = reuse {
            let key = format!("{kind}|{account}|{net}");
            if self.credential_once(&key, ev.at, HOUR) {
                out.push(self.finding(
                    Detector::CredentialAttack,
                    kind,
                    Severity::High,
                    ev,
                    None,
                    format!(
                        "a token that no longer counts was presented again from {net} ({})",
                        ev.rules.join(", ")
                    ),
                    "a revoked token is never presented by its rightful holder after a revocation"
                        .into(),
                    vec![ev.index],
                ));
            }
        }
        if failed.is_empty() {
            return;
        }
        let totp = failed.iter().any(|r| r.starts_with("totp"));
        let q = if totp {
            self.state.totp_failures.entry(account.clone()).or_default()
        } else {
            self.state.failures.entry(account.clone()).or_default()
        };
        q.push_back(ev.at);
        while q.front().is_some_and(|&t| t < ev.at - window) {
            q.pop_front();
        }
        let n = q.len();
        let limit = if totp {
            cfg.totp_failures
        } else {
            cfg.guessing_failures
        };
        let kind = if totp {
            "totp-guessing"
        } else {
            "password-guessing"
        };
        if n >= limit && account != "unknown" {
            let key = format!("{kind}|{account}");
            if self.credential_once(&key, ev.at, window) {
                out.push(self.finding(
                    Detector::CredentialAttack,
                    kind,
                    Severity::High,
                    ev,
                    None,
                    format!(
                        "{n} failed {} for one account within {} minutes",
                        if totp { "second factors" } else { "sign-ins" },
                        window / MINUTE
                    ),
                    format!("at most {} expected from a user who mistyped", limit - 1),
                    vec![ev.index],
                ));
            }
        }
        let nq = self.state.network_failures.entry(net.clone()).or_default();
        nq.push_back((ev.at, account.clone()));
        while nq.front().is_some_and(|(t, _)| *t < ev.at - window) {
            nq.pop_front();
        }
        // Unknown usernames are each a distinct account tried.
        let mut accounts: HashSet<&str> = HashSet::new();
        let mut unknown = 0usize;
        for (_, a) in nq.iter() {
            if a == "unknown" {
                unknown += 1;
            } else {
                accounts.insert(a);
            }
        }
        let distinct = accounts.len() + unknown;
        if distinct >= self.config.spraying_accounts {
            let key = format!("spraying|{net}");
            if self.credential_once(&key, ev.at, window) {
                let mut f = self.finding(
                    Detector::CredentialAttack,
                    "password-spraying",
                    Severity::High,
                    ev,
                    None,
                    format!(
                        "failed sign-ins on {distinct} different accounts from {net} within {} minutes",
                        window / MINUTE
                    ),
                    format!(
                        "fewer than {} accounts fail from one network in that time",
                        self.config.spraying_accounts
                    ),
                    vec![ev.index],
                );
                // The attack is the network's, not the account's.
                f.subject = None;
                f.username = None;
                out.push(f);
            }
        }
    }

    fn credential_once(&mut self, key: &str, at: i64, quiet: i64) -> bool {
        match self.state.credential_fired.get(key) {
            Some(&t) if at - t < quiet => false,
            _ => {
                if self.state.credential_fired.len() > 100_000 {
                    self.state.credential_fired.retain(|_, t| at - *t < DAY);
                }
                self.state.credential_fired.insert(key.to_string(), at);
                true
            }
        }
    }

    // ---------------------------------------------------------- identity theft

    fn identity_theft(&mut self, ev: &Observed, out: &mut Vec<Finding>) {
        for w in &ev.writes {
            if w.interaction == "delete" {
                continue;
            }
            let Some(patient) = w
                .patient
                .clone()
                .or_else(|| (w.rtype == "Patient").then(|| w.id.clone()))
            else {
                continue;
            };
            for id in &w.identifiers {
                match self.state.identifiers.get(id) {
                    Some((identity, owner)) if *owner != patient => {
                        let other = w.rtype == "Coverage"
                            || (identity.is_some()
                                && w.identity.is_some()
                                && *identity != w.identity);
                        if other {
                            let f = self.finding(
                                Detector::IdentityTheft,
                                "identifier-reused",
                                Severity::High,
                                ev,
                                Some(&patient),
                                format!(
                                    "an identifier of Patient/{owner} was registered on {} {}/{} with other demographics",
                                    if w.rtype == "Coverage" { "coverage of" } else { "" },
                                    w.rtype, w.id
                                ),
                                "an MRN, SSN or member id belongs to one person".into(),
                                vec![ev.index],
                            );
                            out.push(f);
                        }
                    }
                    Some(_) => {}
                    None => {
                        if self.state.identifiers.len() < 5_000_000 {
                            self.state
                                .identifiers
                                .insert(*id, (w.identity, patient.clone()));
                            self.dirty_identifiers.insert(*id);
                        }
                    }
                }
            }
            if let (Some(site), Some(start)) = (&w.site, w.site_at) {
                if let Some((prev, at)) = self.state.encounters.get(&patient)
                    && prev != site
                    && (start - at).abs() < self.config.travel_minutes * MINUTE
                {
                    let f = self.finding(
                        Detector::IdentityTheft,
                        "impossible-travel",
                        Severity::High,
                        ev,
                        Some(&patient),
                        format!(
                            "Patient/{patient} was seen at {site} {} minutes after an encounter at {prev}",
                            (start - at).abs() / MINUTE
                        ),
                        format!(
                            "one person cannot be at two sites within {} minutes",
                            self.config.travel_minutes
                        ),
                        vec![ev.index],
                    );
                    out.push(f);
                }
                self.state
                    .encounters
                    .insert(patient.clone(), (site.clone(), start));
                self.dirty_encounters.insert(patient.clone());
            }
        }
    }

    // ---------------------------------------------------------------- writes

    fn server_writes(&mut self, ev: &Observed, out: &mut Vec<Finding>) {
        let n = ev
            .writes
            .iter()
            .filter(|w| w.interaction != "create")
            .count();
        let minute = ev.at.div_euclid(MINUTE);
        if self.state.server_minute_start != minute {
            if self.state.server_minute_start != 0 {
                let c = self.state.server_minute_count as f64;
                self.state
                    .server_minute
                    .get_or_insert_with(|| Ewm::prior(c))
                    .update(c);
            }
            self.state.server_minute_start = minute;
            self.state.server_minute_count = 0;
        }
        if n == 0 {
            return;
        }
        self.state.server_minute_count += n as u32;
        let q = &mut self.state.server_writes;
        for _ in 0..n {
            q.push_back(ev.at);
        }
        while q.front().is_some_and(|&t| t < ev.at - MINUTE) {
            q.pop_front();
        }
        let count = q.len();
        let base = self
            .state
            .server_minute
            .map(|e| e.limit(8.0) * 4.0)
            .unwrap_or(0.0);
        let limit = (self.config.ransomware_server_per_minute as f64).max(base);
        if count as f64 > limit && ev.at > self.state.server_fired_until {
            self.state.server_fired_until = ev.at + 10 * MINUTE;
            let mut f = self.finding(
                Detector::Ransomware,
                "server-wide",
                Severity::Critical,
                ev,
                None,
                format!("{count} records updated or deleted across the server in one minute"),
                format!("limit {limit:.0} per minute (server baseline and configured floor)"),
                vec![ev.index],
            );
            f.subject = None;
            f.username = None;
            out.push(f);
        }
    }

    // ------------------------------------------------------------------ users

    fn user_event(
        &mut self,
        subject: &str,
        ev: &Observed,
        facts: &dyn Facts,
        out: &mut Vec<Finding>,
    ) {
        let role = ev.role.clone().unwrap_or_default();
        // Close the user's window first if this event starts a new hour.
        let needs_close = self
            .state
            .users
            .get(subject)
            .is_some_and(|u| u.hour.events > 0 && ev.at >= u.hour.start + HOUR);
        if needs_close {
            self.close_hour(subject, out);
        }
        let staff = ev.is_staff();
        let staff_facts = facts.staff(subject);
        let cfg = std::sync::Arc::clone(&self.config);
        // Taken out of its slot (not removed: putting it back then needs no
        // new key, no rehash) while the detectors below also borrow `self`.
        let mut u = match self.state.users.get_mut(subject) {
            Some(slot) => std::mem::take(slot),
            None => UserState {
                role: role.clone(),
                first_seen: ev.at,
                ..UserState::default()
            },
        };
        u.role = role.clone();
        let mut found: Vec<Finding> = Vec::new();

        // Day roll.
        let day = day_of(ev.at);
        if u.day != day {
            if u.day != 0 && !u.day_patients.is_empty() {
                let n = u.day_patients.len() as f64;
                u.daily.get_or_insert_with(|| Ewm::prior(n)).update(n);
                let r = self.state.roles.entry(role.clone()).or_default();
                r.daily
                    .get_or_insert_with(|| Ewm::prior(cfg.role_prior_patients_day))
                    .update(n);
            }
            // Dormant account: a long silence, then activity.
            if u.last_seen > 0 && ev.at - u.last_seen > cfg.dormant_days * DAY {
                found.push(self.finding(
                    Detector::CredentialAttack,
                    "dormant-account",
                    Severity::Medium,
                    ev,
                    None,
                    format!(
                        "an account unused for {} days is active again",
                        (ev.at - u.last_seen) / DAY
                    ),
                    format!("dormant after {} days", cfg.dormant_days),
                    vec![ev.index],
                ));
            }
            if u.day != 0 {
                u.days += 1;
            }
            u.day = day;
            u.day_patients.clear();
            u.day_evidence.clear();
            u.day_fired = false;
            u.fired.clear();
            let cutoff = ev.at - 90 * DAY;
            u.seen.retain(|_, t| *t >= cutoff);
        }
        u.last_seen = ev.at;

        // Time and place.
        let hour = ((ev.at / HOUR) % 24) as usize;
        if staff && u.days >= cfg.unusual_min_days {
            let total: u32 = u.hours.iter().sum();
            let near = u.hours[hour] + u.hours[(hour + 1) % 24] + u.hours[(hour + 23) % 24];
            if total > 0
                && (near as f64) < cfg.unusual_hour_share * total as f64
                && u.fired.insert(format!("hour|{hour}"))
            {
                found.push(self.finding(
                    Detector::UnusualTimePlace,
                    "unusual-hour",
                    Severity::Low,
                    ev,
                    None,
                    format!(
                        "activity at {hour:02}:00 UTC, an hour this user is almost never active"
                    ),
                    format!(
                        "{near} of {total} events of {} days fall within an hour of it",
                        u.days
                    ),
                    vec![ev.index],
                ));
            }
        }
        u.hours[hour] = u.hours[hour].saturating_add(1);
        if let Some(net) = &ev.network
            && !u.networks.contains(net)
        {
            let dept = staff_facts.as_ref().and_then(|s| s.department.clone());
            let site_known = dept
                .as_ref()
                .and_then(|d| self.state.site_networks.get(d))
                .is_some_and(|n| n.contains(net));
            if staff && u.days >= cfg.unusual_min_days && !site_known {
                found.push(self.finding(
                    Detector::UnusualTimePlace,
                    &format!("network:{net}"),
                    Severity::Medium,
                    ev,
                    None,
                    format!("access from network {net}, never seen for this user or their site"),
                    format!("{} networks known for the user", u.networks.len()),
                    vec![ev.index],
                ));
            }
            if u.networks.len() >= 32 {
                u.networks.remove(0);
            }
            u.networks.push(net.clone());
            if let Some(d) = dept {
                let set = self.state.site_networks.entry(d).or_default();
                if set.len() < 1024 {
                    set.insert(net.clone());
                }
            }
        }

        // The hour window.
        if u.hour.events == 0 {
            u.hour.start = ev.at - ev.at.rem_euclid(HOUR);
        }
        u.hour.events += 1;
        u.hour.records += ev.results.max(ev.accesses.len() as u32).max(1);
        push_evidence(&mut u.hour.evidence, ev.index);
        let writes = ev
            .writes
            .iter()
            .filter(|w| w.interaction != "create")
            .count();
        u.hour.writes += writes as u32;

        let reads = ev.is_read();
        for a in &ev.accesses {
            if !a.allowed {
                u.hour.denied += 1;
                u.hour.denied_patients.insert(a.patient.clone());
                continue;
            }
            let care = CARE_RULES
                .iter()
                .any(|r| a.rule.split(';').any(|x| x == *r));
            let pf = facts.patient(&a.patient);
            let dept_shared = match (&staff_facts, &pf) {
                (Some(s), Some(p)) => s
                    .department
                    .as_ref()
                    .is_some_and(|d| p.departments.contains(d)),
                _ => false,
            };
            let break_glass = a.rule.contains("break-glass") || ev.break_glass.is_some();
            let explained = care || dept_shared || u.explained.contains(&a.patient);
            let is_new = !u.seen.contains_key(&a.patient);
            u.seen.insert(a.patient.clone(), ev.at);
            if reads && u.hour.patients.insert(a.patient.clone()) && is_new {
                u.hour.new_patients += 1;
            }
            if reads && u.day_patients.insert(a.patient.clone()) {
                push_evidence(&mut u.day_evidence, ev.index);
            }
            if !staff || role == "patient" {
                continue;
            }
            if !explained && !break_glass {
                u.hour.unexplained += 1;
                if u.fired.insert(format!("unexplained|{}", a.patient)) {
                    found.push(self.finding(
                        Detector::UnexplainedAccess,
                        "no-care-reason",
                        Severity::Medium,
                        ev,
                        Some(&a.patient),
                        format!(
                            "opened Patient/{} with no care reason (rule {}: no encounter, care team, general practitioner or shared department)",
                            a.patient, a.rule
                        ),
                        "accesses are explained by a care relationship or a shared department".into(),
                        vec![ev.index],
                    ));
                }
            }
            if break_glass && u.fired.insert(format!("btg|{}", a.patient)) {
                found.push(self.finding(
                    Detector::BreakGlass,
                    "break-glass",
                    Severity::Medium,
                    ev,
                    Some(&a.patient),
                    format!(
                        "broke the glass on Patient/{}: {}",
                        a.patient,
                        ev.break_glass.as_deref().unwrap_or("(reason in the audit event)")
                    ),
                    "every break-the-glass access is reviewed".into(),
                    vec![ev.index],
                ));
            }
            if let Some(p) = &pf {
                if (p.labels.vip || p.labels.restricted)
                    && !care
                    && !dept_shared
                    && u.fired.insert(format!("restricted|{}", a.patient))
                {
                    found.push(self.finding(
                        Detector::RestrictedRecord,
                        if p.labels.vip { "vip" } else { "restricted" },
                        Severity::High,
                        ev,
                        Some(&a.patient),
                        format!(
                            "opened the {} record Patient/{} without being in the patient's care",
                            if p.labels.vip { "VIP" } else { "restricted" },
                            a.patient
                        ),
                        "labelled records are opened only by their care team".into(),
                        vec![ev.index],
                    ));
                }
                if let Some(s) = &staff_facts {
                    let tie = if s.patient.as_deref() == Some(a.patient.as_str()) {
                        Some((
                            "self",
                            "the patient is the user".to_string(),
                            Severity::Medium,
                        ))
                    } else {
                        relation_to(s, p, facts, explained)
                    };
                    if let Some((kind, why, sev)) = tie
                        && u.fired.insert(format!("snoop|{}", a.patient))
                    {
                        found.push(self.finding(
                            Detector::Snooping,
                            kind,
                            sev,
                            ev,
                            Some(&a.patient),
                            format!("opened Patient/{}: {why}", a.patient),
                            if explained {
                                "even with a care reason, staff do not treat their own family"
                                    .into()
                            } else {
                                "no care reason, and a personal tie to the patient".into()
                            },
                            vec![ev.index],
                        ));
                    }
                }
            }
        }
        if u.hour.denied_patients.len() >= cfg.probing_denials && u.fired.insert("probing".into()) {
            found.push(self.finding(
                Detector::UnexplainedAccess,
                "probing",
                Severity::Medium,
                ev,
                None,
                format!(
                    "refused on {} patients' records within the hour (no relationship)",
                    u.hour.denied_patients.len()
                ),
                format!(
                    "fewer than {} refusals an hour are usual",
                    cfg.probing_denials
                ),
                u.hour.evidence.clone(),
            ));
        }

        // Bulk reads: the hour and the day against the user's and the role's baselines.
        if staff || role == "service" {
            let r = self.state.roles.entry(role.clone()).or_default();
            let role_hour = r
                .hourly
                .filter(|e| e.n >= 8)
                .map(|e| e.limit(cfg.bulk_sigmas));
            // Days vary less than hours (more events each): fewer sigmas.
            let role_day = r
                .daily
                .filter(|e| e.n >= 5)
                .map(|e| e.limit(cfg.bulk_sigmas_day));
            let own_hour = u
                .hourly
                .filter(|e| e.n >= 8)
                .map(|e| e.limit(cfg.bulk_sigmas) + 5.0);
            let own_day = u
                .daily
                .filter(|e| e.n >= 5)
                .map(|e| e.limit(cfg.bulk_sigmas_day) + 10.0);
            // Far above both the user's own baseline and the role's; until
            // the user's own is learned, the role's and a floor.
            let limit = |own: Option<f64>, role: Option<f64>, floor: f64| match own {
                Some(o) => o.max(role.unwrap_or(0.0)).max(floor / 4.0),
                None => role.unwrap_or(0.0).max(floor),
            };
            let hour_limit = limit(own_hour, role_hour, cfg.bulk_min_patients_hour);
            let day_limit = limit(own_day, role_day, cfg.bulk_min_patients_day);
            let role_hour = role_hour.unwrap_or(0.0);
            let role_day = role_day.unwrap_or(0.0);
            let hour_n = u.hour.patients.len() as f64;
            let day_n = u.day_patients.len() as f64;
            if hour_n > hour_limit && !u.hour.fired {
                u.hour.fired = true;
                found.push(self.finding(
                    Detector::BulkExfiltration,
                    "hourly-volume",
                    Severity::High,
                    ev,
                    None,
                    format!("{hour_n} distinct patients opened within the hour"),
                    format!(
                            "limit {hour_limit:.0}: own baseline {}, role {role} {:.0}",
                            own_hour
                                .map(|l| format!("{l:.0}"))
                                .unwrap_or_else(|| "not yet learned".into()),
                            role_hour
                        ),
                    u.hour.evidence.clone(),
                ));
            } else if day_n > day_limit && !u.day_fired {
                u.day_fired = true;
                found.push(self.finding(
                    Detector::BulkExfiltration,
                    "daily-volume",
                    Severity::High,
                    ev,
                    None,
                    format!("{day_n} distinct patients opened today"),
                    format!(
                            "limit {day_limit:.0}: own baseline {}, role {role} {:.0}",
                            own_day
                                .map(|l| format!("{l:.0}"))
                                .unwrap_or_else(|| "not yet learned".into()),
                            role_day
                        ),
                    u.day_evidence.clone(),
                ));
            }
            if (ev.results >= cfg.huge_search_results || ev.kind == Kind::Export)
                && u.fired.insert(format!("huge|{}", ev.at / HOUR))
            {
                found.push(self.finding(
                    Detector::BulkExfiltration,
                    if ev.kind == Kind::Export {
                        "export"
                    } else {
                        "huge-search"
                    },
                    Severity::High,
                    ev,
                    None,
                    format!(
                        "one request returned {} resources ({})",
                        ev.results, ev.interaction
                    ),
                    format!(
                        "searches above {} results are reviewed",
                        cfg.huge_search_results
                    ),
                    vec![ev.index],
                ));
            }
        }

        // Ransomware-like change by this principal.
        if writes > 0 {
            for _ in 0..writes {
                u.writes.push_back(ev.at);
            }
            while u.writes.front().is_some_and(|&t| t < ev.at - MINUTE) {
                u.writes.pop_front();
            }
            let entropy = ev.writes.iter().filter(|w| w.high_entropy).count();
            for _ in 0..entropy {
                u.entropy.push_back(ev.at);
            }
            while u.entropy.front().is_some_and(|&t| t < ev.at - MINUTE) {
                u.entropy.pop_front();
            }
            let burst = u.writes.len() >= cfg.ransomware_writes_per_minute;
            let scrambled = u.entropy.len() >= cfg.ransomware_entropy_writes;
            if (burst || scrambled) && u.fired.insert(format!("ransom|{}", ev.at / (10 * MINUTE))) {
                found.push(self.finding(
                    Detector::Ransomware,
                    if scrambled {
                        "high-entropy-rewrite"
                    } else {
                        "write-burst"
                    },
                    Severity::Critical,
                    ev,
                    None,
                    if scrambled {
                        format!(
                            "{} records rewritten into high-entropy text within a minute",
                            u.entropy.len()
                        )
                    } else {
                        format!(
                            "{} records updated or deleted within a minute",
                            u.writes.len()
                        )
                    },
                    format!(
                        "at most {} updates or deletes a minute, no encrypted-looking values",
                        cfg.ransomware_writes_per_minute - 1
                    ),
                    vec![ev.index],
                ));
            }
        }
        match self.state.users.get_mut(subject) {
            Some(slot) => *slot = u,
            None => {
                self.state.users.insert(subject.to_string(), u);
            }
        }
        if !self.dirty.contains(subject) {
            self.dirty.insert(subject.to_string());
        }
        out.extend(found);
    }

    /// Judge and learn a user's finished hour.
    fn close_hour(&mut self, subject: &str, out: &mut Vec<Finding>) {
        let Some(u) = self.state.users.get_mut(subject) else {
            return;
        };
        self.dirty.insert(subject.to_string());
        let w = std::mem::take(&mut u.hour);
        let x = w.features();
        let n = w.patients.len() as f64;
        u.hourly
            .get_or_insert_with(|| Ewm::prior(self.config.role_prior_patients_hour))
            .update(n);
        let role = u.role.clone();
        let r = self.state.roles.entry(role.clone()).or_default();
        r.hourly
            .get_or_insert_with(|| Ewm::prior(self.config.role_prior_patients_hour))
            .update(n);
        let window = self.config.anomaly_window;
        let user_model = u.model.get_or_insert_with(|| self.forest.model(window));
        let role_model = r.model.get_or_insert_with(|| self.forest.model(window * 8));
        let (model, against) = if user_model.ready() {
            (&*user_model, "the user's own baseline")
        } else {
            (&*role_model, "the role's baseline (new user)")
        };
        if model.ready() && w.events >= 3 {
            // Two views of one learned baseline: the trees' novelty of the
            // whole window, and the largest deviation of one feature from
            // the user's (or role's) own running mean, which the trees
            // resolve only coarsely on eight features; the higher decides.
            let novelty = model.score(&self.forest, &x);
            // A quieter hour than usual is no threat: volumes count upwards
            // only; the hour of day both ways.
            let why_raw: Vec<(usize, f64)> = model
                .explain(&x)
                .into_iter()
                .filter(|(d, z)| *z > 0.0 || *d == 4 || *d == 5)
                .collect();
            let deviation = why_raw
                .first()
                .map(|(_, z)| ((z.abs() - 3.0) / 6.0).clamp(0.0, 1.0))
                .unwrap_or(0.0);
            let score = novelty.max(deviation);
            if score >= self.config.anomaly_threshold {
                let why: Vec<String> = why_raw
                    .iter()
                    .map(|(d, z)| format!("{} {z:+.1}σ", FEATURES[*d]))
                    .collect();
                if !why.is_empty() {
                    out.push(Finding {
                        detector: Detector::Anomaly,
                        kind: "user-window".into(),
                        severity: Severity::Medium,
                        at: w.start + HOUR - 1,
                        subject: Some(subject.to_string()),
                        username: None,
                        patient: None,
                        summary: format!(
                            "an unusual hour of activity ({} events, {} patients, {} writes): {}",
                            w.events,
                            w.patients.len(),
                            w.writes,
                            why.join(", ")
                        ),
                        baseline: format!("Half-Space Trees over {against}"),
                        evidence: w.evidence.clone(),
                        features: why,
                        score: Some(score),
                    });
                }
            }
        }
        user_model.learn(&self.forest, &x, 1);
        role_model.learn(&self.forest, &x, 1);
    }
}

/// The personal tie between a member of staff and a patient, if any:
/// (kind, explanation, severity).
fn relation_to(
    s: &crate::facts::StaffFacts,
    p: &crate::facts::PatientFacts,
    facts: &dyn Facts,
    explained: bool,
) -> Option<(&'static str, String, Severity)> {
    let sp = &s.person;
    let pp = &p.person;
    if sp.identity.is_some() && sp.identity == pp.identity {
        return Some(("self", "the patient is the user".into(), Severity::Medium));
    }
    let sev = if explained {
        Severity::Medium
    } else {
        Severity::High
    };
    if sp.addresses.iter().any(|a| pp.addresses.contains(a)) {
        return Some((
            "family",
            "the patient lives at the user's address".into(),
            sev,
        ));
    }
    if sp.phones.iter().any(|a| pp.phones.contains(a)) {
        return Some((
            "family",
            "the patient shares the user's phone number".into(),
            sev,
        ));
    }
    if !explained && sp.family.is_some() && sp.family == pp.family {
        return Some((
            "family",
            "the patient shares the user's surname".into(),
            Severity::Medium,
        ));
    }
    if !explained && pp.identity.is_some_and(|i| facts.is_employee(i)) {
        return Some((
            "coworker",
            "the patient is an employee".into(),
            Severity::Medium,
        ));
    }
    None
}
