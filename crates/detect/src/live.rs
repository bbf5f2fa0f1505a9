//! The live pipeline of one Custos process.
//!
//! - **Source**: by default the audit log itself ([`Source::Log`]). The
//!   pipeline keeps a cursor (the next leaf index), wakes when the trail
//!   signals a commit (or every 250 ms), and reads the committed events from
//!   the cursor on, opened, in log order. Requests never wait for it; a
//!   restart resumes from the saved cursor, so nothing is lost and nothing
//!   is judged twice. With [`Source::External`] (the JetStream audit stream
//!   of a multi-node deployment) the pipeline asks the source for sealed
//!   leaves from its cursor on, opens them, and tells the source once a save
//!   has made the cursor durable (the source acknowledges only then, so a
//!   crash redelivers rather than loses).
//! - **Transform**: each event is distilled ([`Observed`]), enriched with
//!   facts read through the unrestricted record service (demographics as
//!   keyed tokens, labels, departments, what a write changed), and run
//!   through the [`Engine`].
//! - **Sinks**: findings join cases (de-duplicated, sealed in the store),
//!   the response policy acts through the account controls of
//!   `custos-auth` (each response audited), and the signed webhook is
//!   called.
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use custos_audit::{Agent, AuditRecord, AuditTrail, Decision, EventKind};
use custos_auth::{AuthService, now_micros};
use custos_fhir::Handling;
use custos_records::Records;
use custos_store::StoreExt;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::alerts::{Case, CaseStatus, Finding, Note, Outcome, Taken};
use crate::config::{Action, DetectConfig};
use crate::engine::{Engine, RegistryEntry};
use crate::facts::{MemoryFacts, StaffFacts, Tokenizer, rewritten_to_high_entropy};
use crate::observe::Observed;
use crate::source::{EXTERNAL_WAIT, EventSource, SealedEvent, Source};
use crate::webhook::Webhook;

/// System records of detection.
const CASE_KIND: &str = "detect-case";
const STATE_KIND: &str = "detect-state";
const USER_STATE_KIND: &str = "detect-user";
/// Kind of the saved [`RegistryEntry`]s, one record each: an identifier's
/// (keyed by its token, itself keyed) and a patient's latest encounter
/// (keyed by a blind token of the patient).
const IDENTIFIER_KIND: &str = "detect-identifier";
const ENCOUNTER_KIND: &str = "detect-encounter";
/// Events read per batch.
const BATCH: usize = 1024;
/// Least time between two passes over the local log, unless a write
/// commits (a mass change must be judged at once: ransomware is contained
/// within a few writes). Under a read load the trail commits thousands of
/// times a second; a pass per commit would spend more on its reads than on
/// judging. Waiting this long gathers the events of many commits into one
/// pass and keeps commit-to-judged latency of reads in tens of milliseconds
/// (the target is one second).
const LOG_PASS_EVERY: Duration = Duration::from_millis(20);

/// Events judged between two yields to the runtime. Judging runs on the
/// same tokio workers as the requests, and a pass takes up to [`BATCH`]
/// events without awaiting anything that suspends (enrichment mostly hits
/// its caches): at 20,000 audited reads a second a pass takes about 400
/// events, a millisecond or two at 3-5 µs an event, and the requests
/// queued on that worker waited that long. 32 events are about 0.1 ms.
const YIELD_EVERY: usize = 32;

/// Committed events the trail holds for the pipeline reading the local log
/// (so that it need not read them back and open them): well over what
/// commits between two passes at full load.
const HANDED_OVER: usize = 16_384;
/// Versions written in this process that the record service holds for the
/// pipeline (so that it need not read them back): over ten Bundles of a
/// bulk load of patients.
const WRITTEN_HANDED_OVER: usize = 12_000;
/// The types of the versions whose bodies enrich a write event.
const ENRICHING_TYPES: [&str; 3] = ["Patient", "Coverage", "Encounter"];
/// Patients' facts kept in memory at most (then the cache starts over).
const FACTS_CAP: usize = 200_000;

/// Errors of detection.
#[derive(Debug, thiserror::Error)]
pub enum DetectError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error("detection store: {0}")]
    Store(String),
    #[error("detection source: {0}")]
    Source(String),
}

/// A change to a case by a security officer.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaseUpdate {
    pub status: Option<String>,
    pub assignee: Option<String>,
    pub note: Option<String>,
    pub outcome: Option<String>,
}

/// Figures of the pipeline.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Stats {
    /// Events judged since the start.
    pub processed: u64,
    /// The next audit index to judge.
    pub cursor: u64,
    pub findings: u64,
    pub cases: usize,
    /// Commit-to-alert latency of recent findings (µs), p50 and p99.
    pub alert_latency_p50_us: u64,
    pub alert_latency_p99_us: u64,
    /// Commit-to-judged latency of recent events (µs), p99.
    pub event_latency_p99_us: u64,
    /// Time spent judging (reading the log, opening, enriching, the
    /// detectors, the sinks), in µs: `processed / busy` is the pipeline's rate.
    pub busy_us: u64,
    /// Written versions that enriched events: handed over by this
    /// process's write path, and read back from the store.
    pub versions_handed_over: u64,
    pub versions_read_back: u64,
}

/// Cases changed by a batch's findings, not yet saved (each once, as last changed).
#[derive(Default)]
struct Unsaved {
    cases: Vec<Case>,
    /// Case id → its place in `cases`.
    at: HashMap<String, usize>,
}

impl Unsaved {
    fn add(&mut self, case: Case) {
        match self.at.get(&case.id) {
            Some(&i) => self.cases[i] = case,
            None => {
                self.at.insert(case.id.clone(), self.cases.len());
                self.cases.push(case);
            }
        }
    }

    fn is_empty(&self) -> bool {
        self.cases.is_empty()
    }
}

#[derive(Default)]
struct Cases {
    by_id: HashMap<String, Case>,
    /// Case key → id of the active case with that key.
    active: HashMap<String, String>,
}

impl Cases {
    fn from_stored(stored: Vec<Case>) -> Cases {
        let mut cases = Cases::default();
        for case in stored {
            if case.status.is_active() {
                cases.active.insert(case.key.clone(), case.id.clone());
            }
            cases.by_id.insert(case.id.clone(), case);
        }
        cases
    }
}

/// Cases of `status` (all when `None`), most recently updated first, at most `limit`.
fn listed(
    cases: impl Iterator<Item = Case>,
    status: Option<CaseStatus>,
    limit: usize,
) -> Vec<Case> {
    let mut out: Vec<Case> = cases
        .filter(|k| status.is_none_or(|s| k.status == s))
        .collect();
    out.sort_by(|a, b| b.updated.cmp(&a.updated).then(b.id.cmp(&a.id)));
    out.truncate(limit);
    out
}

/// Every case the store holds.
async fn stored_cases(auth: &AuthService) -> Result<Vec<Case>, DetectError> {
    Ok(auth
        .vault()
        .list::<Case>(CASE_KIND)
        .await
        .map_err(store_err)?
        .into_iter()
        .map(|(_, _, case)| case)
        .collect())
}

struct Inner {
    records: Records,
    trail: AuditTrail,
    auth: Arc<AuthService>,
    config: DetectConfig,
    tokenizer: Tokenizer,
    facts: MemoryFacts,
    engine: Mutex<Engine>,
    cases: Mutex<Cases>,
    alerts: tokio::sync::broadcast::Sender<Case>,
    webhook: Option<Webhook>,
    processed: Mutex<(u64, u64)>,
    busy_us: Mutex<u64>,
    /// Written versions handed over and read back (see [`Stats`]).
    versions: Mutex<(u64, u64)>,
    /// The next audit index whose findings have all reached the sinks.
    sunk: std::sync::atomic::AtomicU64,
    alert_latency: Mutex<VecDeque<u64>>,
    event_latency: Mutex<VecDeque<u64>>,
    /// When the staff list was last read, and the subjects looked for since.
    staff_loaded: Mutex<(Instant, std::collections::HashSet<String>)>,
    /// Set to stop the pipeline's task.
    stop: tokio::sync::watch::Sender<bool>,
    /// The pipeline's task, while it runs.
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// The detection service of one process.
#[derive(Clone)]
pub struct Detection {
    inner: Arc<Inner>,
}

fn store_err(e: impl std::fmt::Display) -> DetectError {
    DetectError::Store(e.to_string())
}

fn bare(reference: &str) -> &str {
    reference.rsplit('/').next().unwrap_or(reference)
}

fn percentile(v: &VecDeque<u64>, p: f64) -> u64 {
    if v.is_empty() {
        return 0;
    }
    let mut s: Vec<u64> = v.iter().copied().collect();
    s.sort_unstable();
    s[((s.len() - 1) as f64 * p).round() as usize]
}

fn push_sample(v: &Mutex<VecDeque<u64>>, x: u64) {
    let mut v = v.lock();
    if v.len() >= 10_000 {
        v.pop_front();
    }
    v.push_back(x);
}

impl Detection {
    /// Load the saved state and cases and start the pipeline over the
    /// audit log of this process's store. `records` must be the
    /// unrestricted handle (detection reads facts).
    pub async fn start(
        records: Records,
        auth: Arc<AuthService>,
        config: DetectConfig,
    ) -> Result<Detection, DetectError> {
        Self::start_with(records, auth, config, Source::Log).await
    }

    /// Load the saved state and cases and start the pipeline reading from
    /// `source`. Stop it with [`Detection::stop`]; to run it again (a node
    /// that leads again), start a new one: it resumes from the saved state.
    pub async fn start_with(
        records: Records,
        auth: Arc<AuthService>,
        config: DetectConfig,
        source: Source,
    ) -> Result<Detection, DetectError> {
        let d = Self::open(records, auth, config, true).await?;
        d.spawn(source);
        Ok(d)
    }

    /// Load the cases without running the pipeline: a node that does not
    /// lead serves the alert API from the cases stored by the one that does
    /// (see [`Detection::cases_fresh`]).
    pub async fn passive(
        records: Records,
        auth: Arc<AuthService>,
        config: DetectConfig,
    ) -> Result<Detection, DetectError> {
        Self::open(records, auth, config, true).await
    }

    /// Run the pipeline of a stopped or passive instance (a node that leads
    /// again, or for the first time): the detectors' state and the cases
    /// are read again from the store, where the previous leader saved them,
    /// and judging resumes at the saved cursor.
    pub async fn resume(&self, source: Source) -> Result<(), DetectError> {
        if self.is_running() {
            return Ok(());
        }
        self.stop().await?;
        let inner = &self.inner;
        let engine = Self::load_engine(&inner.auth, &inner.records, &inner.config, true).await?;
        inner
            .sunk
            .store(engine.state().cursor, std::sync::atomic::Ordering::Release);
        *inner.engine.lock() = engine;
        // What the previous leader's pipeline and any node's officers stored.
        *inner.cases.lock() = Cases::from_stored(stored_cases(&inner.auth).await?);
        inner.stop.send_replace(false);
        self.spawn(source);
        Ok(())
    }

    /// Whether this instance's pipeline is running.
    pub fn is_running(&self) -> bool {
        self.inner.task.lock().is_some() && !*self.inner.stop.borrow()
    }

    /// Cases as [`Detection::cases`], each the newer of this process's copy
    /// and the stored one: on a cluster, another node may have raised a case
    /// or an officer may have worked one through another node.
    pub async fn cases_fresh(
        &self,
        status: Option<CaseStatus>,
        limit: usize,
    ) -> Result<Vec<Case>, DetectError> {
        let stored = stored_cases(&self.inner.auth).await?;
        let mut all: HashMap<String, Case> = self.inner.cases.lock().by_id.clone();
        for case in stored {
            match all.get(&case.id) {
                Some(mine) if mine.updated >= case.updated => {}
                _ => {
                    all.insert(case.id.clone(), case);
                }
            }
        }
        Ok(listed(all.into_values(), status, limit))
    }

    /// One case, the newer of this process's copy and the stored one.
    pub async fn case_fresh(&self, id: &str) -> Result<Option<Case>, DetectError> {
        let stored = self
            .inner
            .auth
            .vault()
            .get::<Case>(CASE_KIND, id)
            .await
            .map_err(store_err)?
            .map(|(_, c)| c);
        let mine = self.case(id);
        Ok(match (mine, stored) {
            (Some(m), Some(s)) => Some(if m.updated >= s.updated { m } else { s }),
            (m, s) => m.or(s),
        })
    }

    /// Replace the in-memory copy of case `id` by the stored one (an officer
    /// may have worked it through another node).
    async fn refresh_case(&self, id: &str) {
        let stored = self.inner.auth.vault().get::<Case>(CASE_KIND, id).await;
        let Ok(Some((_, case))) = stored else { return };
        let mut c = self.inner.cases.lock();
        if case.status.is_active() {
            c.active.insert(case.key.clone(), case.id.clone());
        } else if c.active.get(&case.key) == Some(&case.id) {
            c.active.remove(&case.key);
        }
        c.by_id.insert(case.id.clone(), case);
    }

    /// Stop the pipeline: it finishes the batch at hand, saves its whole
    /// state and, with an external source, acknowledges what the save
    /// covers. The cases stay readable; nothing more is judged. Stopping a
    /// stopped pipeline does nothing.
    pub async fn stop(&self) -> Result<(), DetectError> {
        self.inner.stop.send_replace(true);
        self.inner.trail.hand_over_commits(0);
        self.inner.records.hand_over_writes(0, &[]);
        let task = self.inner.task.lock().take();
        match task {
            Some(t) => t
                .await
                .map_err(|_| DetectError::Store("the detection pipeline ended abnormally".into())),
            None => Ok(()),
        }
    }

    /// Judge the whole log once, from index 0, with a fresh state, and
    /// return the figures (the benchmark's measure of the whole pipeline:
    /// log read, open, enrich, detectors, sinks). Its cases are stored like
    /// any: run it on a throwaway data dir, with responses off.
    pub async fn replay(
        records: Records,
        auth: Arc<AuthService>,
        config: DetectConfig,
    ) -> Result<Stats, DetectError> {
        let d = Self::open(records, auth, config, false).await?;
        d.run_once().await?;
        Ok(d.stats())
    }

    /// The detectors' state as last saved (fresh when `restore` is false).
    async fn load_engine(
        auth: &AuthService,
        records: &Records,
        config: &DetectConfig,
        restore: bool,
    ) -> Result<Engine, DetectError> {
        let vault = auth.vault().clone();
        let store = records.store().clone();
        let global = {
            let v = vault.clone();
            store
                .read(|tx| tx.sys_get(STATE_KIND, "global"))
                .await
                .map_err(store_err)?
                .map(|r| v.open_bytes(&r))
                .transpose()
                .map_err(store_err)?
        };
        let users: Vec<(String, Vec<u8>)> = {
            let rows = store
                .read(|tx| tx.sys_list(USER_STATE_KIND))
                .await
                .map_err(store_err)?;
            rows.iter()
                .map(|r| {
                    let bytes = vault.open_bytes(r).map_err(store_err)?;
                    // The key is a blind token of the subject; the subject
                    // itself is inside the sealed value.
                    let (subject, state): (String, Box<serde_json::value::RawValue>) =
                        serde_json::from_slice(&bytes).map_err(store_err)?;
                    Ok((subject, state.get().as_bytes().to_vec()))
                })
                .collect::<Result<_, DetectError>>()?
        };
        // The registry grows with the patients: read only when it is used.
        let mut registry: Vec<RegistryEntry> = Vec::new();
        let kinds: &[&'static str] = if restore && global.is_some() {
            &[IDENTIFIER_KIND, ENCOUNTER_KIND]
        } else {
            &[]
        };
        for &kind in kinds {
            let rows = store
                .read(move |tx| tx.sys_list(kind))
                .await
                .map_err(store_err)?;
            registry.reserve(rows.len());
            for r in &rows {
                let bytes = vault.open_bytes(r).map_err(store_err)?;
                registry.push(serde_json::from_slice(&bytes).map_err(store_err)?);
            }
        }
        let engine = match global.filter(|_| restore) {
            Some(g) => Engine::restore(config.clone(), &g, users, registry).map_err(|e| {
                DetectError::Store(format!("the saved detection state does not decode: {e}"))
            })?,
            None => Engine::new(config.clone()),
        };
        Ok(engine)
    }

    async fn open(
        records: Records,
        auth: Arc<AuthService>,
        config: DetectConfig,
        restore: bool,
    ) -> Result<Detection, DetectError> {
        let engine = Self::load_engine(&auth, &records, &config, restore).await?;
        let restored_cursor = engine.state().cursor;
        let cases = Cases::from_stored(if restore {
            stored_cases(&auth).await?
        } else {
            Vec::new()
        });
        let secret = std::env::var("CUSTOS_DETECT_WEBHOOK_SECRET")
            .ok()
            .or_else(|| config.webhook_secret.clone());
        let webhook = match (&config.webhook_url, secret) {
            (Some(url), Some(secret)) => Some(Webhook::new(url.clone(), secret.as_bytes())),
            (Some(_), None) => {
                return Err(DetectError::Invalid(
                    "detect.webhook_url needs a webhook secret (detect.webhook_secret or CUSTOS_DETECT_WEBHOOK_SECRET)".into(),
                ));
            }
            _ => None,
        };
        let tokenizer = Tokenizer::new(Arc::new(records.keys().blind().clone()));
        let trail = auth.audit().clone();
        let inner = Arc::new(Inner {
            records,
            trail,
            auth,
            config,
            tokenizer,
            facts: MemoryFacts::default(),
            engine: Mutex::new(engine),
            cases: Mutex::new(cases),
            alerts: tokio::sync::broadcast::channel(1024).0,
            webhook,
            processed: Mutex::new((0, 0)),
            busy_us: Mutex::new(0),
            versions: Mutex::new((0, 0)),
            sunk: std::sync::atomic::AtomicU64::new(restored_cursor),
            alert_latency: Mutex::new(VecDeque::new()),
            event_latency: Mutex::new(VecDeque::new()),
            staff_loaded: Mutex::new((
                Instant::now() - Duration::from_secs(3600),
                Default::default(),
            )),
            stop: tokio::sync::watch::channel(false).0,
            task: Mutex::new(None),
        });
        let d = Detection { inner };
        d.load_staff(None).await;
        Ok(d)
    }

    /// New and updated cases, as they happen.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Case> {
        self.inner.alerts.subscribe()
    }

    /// The pipeline's figures.
    pub fn stats(&self) -> Stats {
        // One lock at a time, each released before the next is taken.
        let (processed, findings) = *self.inner.processed.lock();
        let (alert_latency_p50_us, alert_latency_p99_us) = {
            let a = self.inner.alert_latency.lock();
            (percentile(&a, 0.5), percentile(&a, 0.99))
        };
        let event_latency_p99_us = percentile(&self.inner.event_latency.lock(), 0.99);
        let cursor = self.inner.engine.lock().state().cursor;
        let cases = self.inner.cases.lock().by_id.len();
        let busy_us = *self.inner.busy_us.lock();
        let (versions_handed_over, versions_read_back) = *self.inner.versions.lock();
        Stats {
            processed,
            cursor,
            findings,
            cases,
            alert_latency_p50_us,
            alert_latency_p99_us,
            event_latency_p99_us,
            busy_us,
            versions_handed_over,
            versions_read_back,
        }
    }

    /// Cases, most recently updated first, optionally of one status.
    pub fn cases(&self, status: Option<CaseStatus>, limit: usize) -> Vec<Case> {
        let all: Vec<Case> = self.inner.cases.lock().by_id.values().cloned().collect();
        listed(all.into_iter(), status, limit)
    }

    pub fn case(&self, id: &str) -> Option<Case> {
        self.inner.cases.lock().by_id.get(id).cloned()
    }

    /// Work a case: status, assignee, a note, the outcome. Dismissing it as
    /// a false positive teaches the baselines. Audited.
    pub async fn update_case(
        &self,
        id: &str,
        update: CaseUpdate,
        by: &str,
    ) -> Result<Case, DetectError> {
        let status = update
            .status
            .as_deref()
            .map(|s| {
                CaseStatus::parse(s).ok_or_else(|| {
                    DetectError::Invalid(format!(
                        "unknown status '{s}' (open, investigating, confirmed, dismissed)"
                    ))
                })
            })
            .transpose()?;
        let outcome = update
            .outcome
            .as_deref()
            .map(|s| {
                Outcome::parse(s).ok_or_else(|| {
                    DetectError::Invalid(format!(
                        "unknown outcome '{s}' (educated, sanctioned, reported, no-action)"
                    ))
                })
            })
            .transpose()?;
        if update.note.as_deref().is_some_and(|n| n.len() > 10_000) {
            return Err(DetectError::Invalid(
                "a note is at most 10,000 characters".into(),
            ));
        }
        // Work on the stored case: another node may have changed it.
        self.refresh_case(id).await;
        let (case, dismissed) = {
            let mut c = self.inner.cases.lock();
            let case = c
                .by_id
                .get_mut(id)
                .ok_or_else(|| DetectError::NotFound(format!("no case {id}")))?;
            let was = case.status;
            if let Some(s) = status {
                case.status = s;
            }
            if let Some(a) = update.assignee {
                case.assignee = Some(a).filter(|a| !a.is_empty());
            }
            if let Some(n) = update.note {
                case.notes.push(Note {
                    at: now_micros(),
                    by: by.to_string(),
                    text: n,
                });
            }
            if outcome.is_some() {
                case.outcome = outcome;
            }
            case.updated = now_micros();
            let case = case.clone();
            if !case.status.is_active() {
                c.active.remove(&case.key);
            } else {
                c.active.insert(case.key.clone(), case.id.clone());
            }
            let dismissed = was != CaseStatus::Dismissed && case.status == CaseStatus::Dismissed;
            (case, dismissed)
        };
        if dismissed {
            let mut e = self.inner.engine.lock();
            for f in &case.findings {
                e.dismissed(f);
            }
        }
        self.save_case(&case).await?;
        self.audit(
            "detect-case-update",
            by,
            &format!(
                "case {} → {:?}{}",
                case.id,
                case.status,
                case.outcome
                    .map(|o| format!(", outcome {o:?}"))
                    .unwrap_or_default()
            ),
            true,
        )
        .await;
        let _ = self.inner.alerts.send(case.clone());
        Ok(case)
    }

    /// Wait until every event committed so far has been judged (for tests
    /// and the simulator's scorecard).
    pub async fn caught_up(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let Ok(size) = self.inner.trail.size().await else {
            return false;
        };
        self.inner.trail.signal_commit();
        while Instant::now() < deadline {
            if self.inner.sunk.load(std::sync::atomic::Ordering::Acquire) >= size {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    // ------------------------------------------------------------ pipeline

    fn spawn(&self, mut source: Source) {
        let weak = Arc::downgrade(&self.inner);
        let signal = self.inner.trail.commit_signal();
        let changed = self.inner.trail.change_signal();
        let mut stop = self.inner.stop.subscribe();
        if matches!(source, Source::Log) {
            self.inner.trail.hand_over_commits(HANDED_OVER);
        }
        self.inner
            .records
            .hand_over_writes(WRITTEN_HANDED_OVER, &ENRICHING_TYPES);
        let task = tokio::spawn(async move {
            let mut last_save = Instant::now();
            let mut last_global = Instant::now();
            // An external source's outage is logged once, not every second.
            let mut failing = false;
            loop {
                if matches!(source, Source::Log) {
                    tokio::select! {
                        _ = tokio::time::timeout(Duration::from_millis(250), signal.notified()) => {}
                        _ = stop.changed() => {}
                    }
                }
                if *stop.borrow() {
                    break;
                }
                let Some(inner) = weak.upgrade() else { return };
                let d = Detection { inner };
                match &mut source {
                    Source::Log => {
                        let pause = match d.run_once().await {
                            Ok(()) => LOG_PASS_EVERY,
                            Err(e) => {
                                tracing::error!(error = %e, "detection could not read the audit log");
                                Duration::from_secs(1)
                            }
                        };
                        tokio::select! {
                            _ = tokio::time::sleep(pause) => {}
                            _ = changed.notified() => {}
                            _ = stop.changed() => {}
                        }
                    }
                    Source::External(s) => match d.run_from(s.as_mut()).await {
                        Ok(()) if failing => {
                            failing = false;
                            tracing::info!("detection reads its event source again");
                        }
                        Ok(()) => {}
                        Err(e) => {
                            if failing {
                                tracing::debug!(error = %e, "detection still cannot read its event source");
                            } else {
                                failing = true;
                                tracing::error!(error = %e, "detection cannot read its event source; it retries, and resumes from its cursor");
                            }
                            tokio::select! {
                                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                                _ = stop.changed() => {}
                            }
                        }
                    },
                }
                let save_every = Duration::from_secs(d.inner.config.save_secs.max(1));
                if last_save.elapsed() >= save_every {
                    let global = last_global.elapsed() >= save_every * 6;
                    d.save_and_acknowledge(&mut source, global).await;
                    last_save = Instant::now();
                    if global {
                        last_global = Instant::now();
                    }
                }
            }
            // Stopped: save everything; the source forgets what that covers.
            if let Some(inner) = weak.upgrade() {
                Detection { inner }
                    .save_and_acknowledge(&mut source, true)
                    .await;
            }
        });
        *self.inner.task.lock() = Some(task);
    }

    /// Save the state (the global part, with the cursor, when `global`) and
    /// then, if that save carried the cursor, tell an external source.
    async fn save_and_acknowledge(&self, source: &mut Source, global: bool) {
        match self.save_state(global).await {
            Ok(Some(cursor)) => {
                if let Source::External(s) = source
                    && let Err(e) = s.saved(cursor).await
                {
                    // Harmless: unacknowledged events come again and are
                    // skipped, being below the saved cursor.
                    tracing::debug!(error = %e, "the event source did not take an acknowledgement");
                }
            }
            Ok(None) => {}
            Err(e) => tracing::error!(error = %e, "detection state could not be saved"),
        }
    }

    /// Judge what an external source delivers from the cursor on (waiting
    /// a little for it), then run the timers.
    async fn run_from(&self, source: &mut dyn EventSource) -> Result<(), DetectError> {
        let cursor = self.inner.engine.lock().state().cursor;
        let batch = source
            .next(cursor, BATCH, EXTERNAL_WAIT)
            .await
            .map_err(|e| DetectError::Source(e.to_string()))?;
        let started = Instant::now();
        let mut indexes = Vec::with_capacity(batch.len());
        let mut leaves = Vec::with_capacity(batch.len());
        let mut expect = cursor;
        for SealedEvent { index, leaf } in batch {
            // At-least-once delivery: what was judged already is skipped.
            if index < expect {
                continue;
            }
            if index > expect {
                return Err(DetectError::Source(format!(
                    "the event source skipped from index {expect} to {index}"
                )));
            }
            indexes.push(index);
            leaves.push(leaf);
            expect += 1;
        }
        if !leaves.is_empty() {
            let records = self
                .inner
                .trail
                .open_leaves(leaves)
                .await
                .map_err(store_err)?;
            self.judge(indexes.into_iter().zip(records).collect()).await;
            *self.inner.busy_us.lock() += started.elapsed().as_micros() as u64;
        }
        self.tick().await;
        Ok(())
    }

    /// Judge every committed event after the cursor.
    async fn run_once(&self) -> Result<(), DetectError> {
        let size = self.inner.trail.size().await.map_err(store_err)?;
        loop {
            let cursor = self.inner.engine.lock().state().cursor;
            if cursor >= size {
                break;
            }
            let started = Instant::now();
            let events = self
                .inner
                .trail
                .events(cursor, size, BATCH)
                .await
                .map_err(store_err)?;

            if events.is_empty() {
                break;
            }
            self.judge(events).await;
            *self.inner.busy_us.lock() += started.elapsed().as_micros() as u64;
        }
        self.tick().await;
        Ok(())
    }

    /// Judge events, in index order: enrich, detect, sink. The cases the
    /// findings opened or joined are saved together after the batch (see
    /// [`Detection::save_cases`]); responses are taken at once.
    async fn judge(&self, events: Vec<(u64, AuditRecord)>) {
        let mut unsaved = Unsaved::default();
        // The index after the last event judged whose cases wait to be saved.
        let mut judged = None;
        for (n, (index, rec)) in events.into_iter().enumerate() {
            if n > 0 && n % YIELD_EVERY == 0 {
                tokio::task::yield_now().await;
            }
            let mut ev = Observed::from_record(index, &rec);
            self.enrich(&mut ev, &rec).await;
            let mut found = Vec::new();
            self.inner
                .engine
                .lock()
                .process(&ev, &self.inner.facts, &mut found);
            let now = now_micros();
            push_sample(&self.inner.event_latency, (now - ev.at).max(0) as u64);
            {
                let mut p = self.inner.processed.lock();
                p.0 += 1;
                p.1 += found.len() as u64;
            }
            for f in found {
                push_sample(&self.inner.alert_latency, (now - f.at).max(0) as u64);
                if let Some(case) = self.sink(f).await {
                    unsaved.add(case);
                }
            }
            if unsaved.is_empty() {
                self.inner
                    .sunk
                    .store(index + 1, std::sync::atomic::Ordering::Release);
            } else {
                judged = Some(index + 1);
            }
        }
        self.save_cases(unsaved).await;
        if let Some(next) = judged {
            self.inner
                .sunk
                .store(next, std::sync::atomic::Ordering::Release);
        }
    }

    /// The detectors' timers (windows that close without a new event).
    async fn tick(&self) {
        let mut found = Vec::new();
        self.inner.engine.lock().tick(now_micros(), &mut found);
        let mut unsaved = Unsaved::default();
        for f in found {
            if let Some(case) = self.sink(f).await {
                unsaved.add(case);
            }
        }
        self.save_cases(unsaved).await;
    }

    /// Save the principals' changed state and, when `global`, the rest
    /// with the cursor. Returns the cursor that the save made durable, if it
    /// saved one.
    async fn save_state(&self, global: bool) -> Result<Option<u64>, DetectError> {
        // Prepared on the blocking pool, not on a runtime worker: during a
        // bulk load a save holds tens of thousands of new registry entries
        // (each keyed) and the loader's state (every patient it opened in
        // 90 days), megabytes of JSON; prepared in the pipeline's task it
        // held one of the request workers for 50-200 ms at every save.
        let inner = self.inner.clone();
        let prepared = tokio::task::spawn_blocking(move || {
            let (dirty, registry, g, cursor) = {
                let mut e = inner.engine.lock();
                let dirty = e.take_dirty();
                let registry = e.take_dirty_registry();
                let cursor = e.state().cursor;
                (dirty, registry, global.then(|| e.global_state()), cursor)
            };
            if dirty.is_empty() && registry.is_empty() && g.is_none() {
                return None;
            }
            let vault = inner.auth.vault();
            let rows: Vec<(&str, String, Vec<u8>)> = dirty
                .into_iter()
                .map(|(subject, state)| {
                    let key = vault.blind_key("detect-user", &subject);
                    let raw = serde_json::value::RawValue::from_string(
                        String::from_utf8(state).expect("JSON is UTF-8"),
                    )
                    .expect("valid JSON");
                    let value = serde_json::to_vec(&(subject, raw)).expect("serializes");
                    (USER_STATE_KIND, key, value)
                })
                .chain(registry.into_iter().map(|entry| {
                    let (kind, key) = match &entry {
                        RegistryEntry::Identifier { identifier, .. } => {
                            (IDENTIFIER_KIND, format!("{identifier:016x}"))
                        }
                        RegistryEntry::Encounter { patient, .. } => {
                            (ENCOUNTER_KIND, vault.blind_key(ENCOUNTER_KIND, patient))
                        }
                    };
                    (kind, key, serde_json::to_vec(&entry).expect("serializes"))
                }))
                .collect();
            Some((rows, g, cursor))
        })
        .await
        .map_err(|e| DetectError::Store(format!("preparing the detection state failed: {e}")))?;
        let Some((rows, g, cursor)) = prepared else {
            return Ok(None);
        };
        let saved = g.is_some().then_some(cursor);
        let vault = self.inner.auth.vault().clone();
        vault
            .write(move |tx, v| {
                for (kind, key, value) in &rows {
                    tx.sys_put(kind, key, &v.seal_bytes(kind, key, value), None)
                        .map_err(|e| custos_auth::AuthError::Internal(e.to_string()))?;
                }
                if let Some(g) = &g {
                    tx.sys_put(
                        STATE_KIND,
                        "global",
                        &v.seal_bytes(STATE_KIND, "global", g),
                        None,
                    )
                    .map_err(|e| custos_auth::AuthError::Internal(e.to_string()))?;
                }
                Ok(())
            })
            .await
            .map_err(store_err)?;
        Ok(saved)
    }

    /// Save everything now (on shutdown; [`Detection::stop`] does it too).
    pub async fn flush(&self) -> Result<(), DetectError> {
        self.save_state(true).await.map(|_| ())
    }

    // ------------------------------------------------------------- enrich

    /// Read the staff list (again): at start, and when an unknown subject
    /// appears (each unknown subject once; otherwise at most every 5 s).
    async fn load_staff(&self, missing: Option<&str>) {
        {
            let mut l = self.inner.staff_loaded.lock();
            let new_subject = missing.is_some_and(|s| l.1.insert(s.to_string()));
            if !new_subject && l.0.elapsed() < Duration::from_secs(5) {
                return;
            }
            l.0 = Instant::now();
        }
        let Ok(snap) = self.inner.auth.snapshot().await else {
            return;
        };
        for (id, user) in snap.users.iter() {
            let subject = format!("user:{id}");
            if self.inner.facts.has_staff(&subject) {
                continue;
            }
            let person = match &user.practitioner {
                Some(p) => match self.inner.records.read("Practitioner", p).await {
                    Ok(o) => self.inner.tokenizer.person(&o.resource),
                    Err(_) => Default::default(),
                },
                None => Default::default(),
            };
            self.inner.facts.set_staff(
                &subject,
                StaffFacts {
                    person,
                    department: user.organization.as_deref().map(|o| bare(o).to_string()),
                    patient: user.patient.clone(),
                },
            );
        }
    }

    async fn enrich(&self, ev: &mut Observed, _rec: &AuditRecord) {
        if let Some(s) = &ev.subject
            && s.starts_with("user:")
            && !self.inner.facts.has_staff(s)
        {
            self.load_staff(Some(s)).await;
        }
        let records = &self.inner.records;
        // Patients this event created: their facts come from the bodies read
        // here, not from reading them again (after a bulk load that second
        // read and an Encounter search per patient were most of detection's
        // catch-up, competing with the requests for the CPUs). A Patient at
        // version 1 has no Encounter older than this event when references
        // must resolve (its id was new, and an Encounter of another event
        // naming it would have been refused), so this event's Encounters are
        // all of its departments.
        let complete = records.config().check_references;
        let mut created: Vec<(String, crate::facts::PatientFacts)> = Vec::new();
        // The versions to read, all in one store read (a Bundle's event
        // writes hundreds): each write's new version and, for an update,
        // the one before. `slots`: (write, where its version is in
        // `wanted`, where the previous one is).
        let mut wanted: Vec<(String, String, i64)> = Vec::new();
        let mut slots: Vec<(usize, usize, Option<usize>)> = Vec::new();
        for (k, w) in ev.writes.iter().enumerate() {
            match w.rtype.as_str() {
                "Patient" => self.inner.facts.forget_patient(&w.id),
                "Encounter" | "CareTeam" => {
                    if let Some(p) = &w.patient {
                        self.inner.facts.forget_patient(p);
                    }
                }
                _ => {}
            }
            if w.interaction == "delete" {
                continue;
            }
            let updated = w.interaction == "update" && w.version > 1;
            if !(updated || ENRICHING_TYPES.contains(&w.rtype.as_str())) {
                continue;
            }
            let at = wanted.len();
            wanted.push((w.rtype.clone(), w.id.clone(), w.version));
            if updated {
                wanted.push((w.rtype.clone(), w.id.clone(), w.version - 1));
            }
            slots.push((k, at, updated.then_some(at + 1)));
        }
        // Versions written by this process come from the record service's
        // hand-over (opened once, by the write); the rest are read.
        let held = records.take_written(&wanted).await;
        let missing: Vec<(String, String, i64)> = wanted
            .iter()
            .zip(&held)
            .filter(|(_, h)| h.is_none())
            .map(|(w, _)| w.clone())
            .collect();
        {
            let mut v = self.inner.versions.lock();
            v.0 += (wanted.len() - missing.len()) as u64;
            v.1 += missing.len() as u64;
        }
        let mut read = records.vread_many(&missing).await.into_iter();
        let opened: Vec<Result<custos_records::Opened, custos_fhir::FhirError>> = held
            .into_iter()
            .map(|h| match h {
                Some(o) => Ok(o),
                None => read.next().expect("every missing version was read"),
            })
            .collect();
        for (k, at, previous) in slots {
            let Ok(new) = &opened[at] else {
                continue;
            };
            let w = &mut ev.writes[k];
            let r = &new.resource;
            match w.rtype.as_str() {
                "Patient" => {
                    let facts = self.inner.tokenizer.patient(r);
                    w.identity = facts.person.identity;
                    w.identifiers = facts.identifiers.clone();
                    if complete && w.version == 1 {
                        created.push((w.id.clone(), facts));
                    }
                }
                "Coverage" => w.identifiers = self.inner.tokenizer.identifiers(r),
                "Encounter" => {
                    w.site = r["serviceProvider"]["reference"]
                        .as_str()
                        .map(|s| bare(s).to_string());
                    w.site_at = r["period"]["start"].as_str().and_then(parse_instant);
                }
                _ => {}
            }
            if let Some(p) = previous
                && let Ok(old) = &opened[p]
            {
                w.high_entropy = rewritten_to_high_entropy(&old.resource, r);
            }
        }
        let mut sites: HashMap<&str, Vec<&String>> = HashMap::new();
        for w in &ev.writes {
            if w.rtype == "Encounter"
                && let (Some(p), Some(site)) = (&w.patient, &w.site)
            {
                sites.entry(p.as_str()).or_default().push(site);
            }
        }
        for (id, mut facts) in created {
            for site in sites.get(id.as_str()).into_iter().flatten() {
                if !facts.departments.contains(site) {
                    facts.departments.push((*site).clone());
                }
            }
            self.remember_patient(&id, facts);
        }
        let patients: Vec<String> = ev.accesses.iter().map(|a| a.patient.clone()).collect();
        for p in patients {
            if !self.inner.facts.has_patient(&p) {
                self.load_patient(&p).await;
            }
        }
    }

    fn remember_patient(&self, id: &str, facts: crate::facts::PatientFacts) {
        if self.inner.facts.patients_len() > FACTS_CAP {
            // Forget everything rather than grow without bound.
            self.inner.facts.clear_patients();
        }
        self.inner.facts.set_patient(id, facts);
    }

    async fn load_patient(&self, id: &str) {
        let records = &self.inner.records;
        let Ok(p) = records.read("Patient", id).await else {
            self.remember_patient(id, crate::facts::PatientFacts::default());
            return;
        };
        let mut facts = self.inner.tokenizer.patient(&p.resource);
        let params = vec![
            ("patient".to_string(), format!("Patient/{id}")),
            ("_count".to_string(), "100".to_string()),
            ("_total".to_string(), "none".to_string()),
        ];
        if let Ok(b) = records
            .search("Encounter", params, Handling::Lenient, "urn:custos")
            .await
        {
            for e in b["entry"].as_array().into_iter().flatten() {
                if let Some(org) = e["resource"]["serviceProvider"]["reference"].as_str() {
                    let org = bare(org).to_string();
                    if !facts.departments.contains(&org) {
                        facts.departments.push(org);
                    }
                }
            }
        }
        self.remember_patient(id, facts);
    }

    // -------------------------------------------------------------- sinks

    /// Join a finding to its case (or open one), take the responses, call
    /// the webhook, announce the case; returns the case to save, if it changed.
    async fn sink(&self, f: Finding) -> Option<Case> {
        // A case worked by an officer through another node is read again
        // before a finding joins it (a dismissed case does not take more).
        let active = self.inner.cases.lock().active.get(&f.case_key()).cloned();
        if let Some(id) = active {
            self.refresh_case(&id).await;
        }
        let (case, opened, escalated) = {
            let mut c = self.inner.cases.lock();
            let key = f.case_key();
            match c.active.get(&key).cloned() {
                Some(id) => {
                    let case = c.by_id.get_mut(&id).expect("active cases exist");
                    // At-least-once delivery: a finding judged again after a
                    // restart is the same finding.
                    if case
                        .findings
                        .iter()
                        .any(|g| g.kind == f.kind && g.evidence.first() == f.evidence.first())
                    {
                        return None;
                    }
                    let before = case.severity;
                    case.join(f.clone());
                    (case.clone(), false, case.severity > before)
                }
                None => {
                    let id = uuid::Uuid::new_v4().to_string();
                    let case = Case::open(id.clone(), f.clone());
                    c.active.insert(key, id.clone());
                    c.by_id.insert(id, case.clone());
                    (case, true, false)
                }
            }
        };
        tracing::warn!(
            detector = %case.detector,
            severity = case.severity.name(),
            case = %case.id,
            "detection raised an alert"
        );
        let mut case = case;
        if opened || escalated {
            let mut actions = self
                .inner
                .config
                .actions_for(f.detector, &f.kind, case.severity);
            let system = case
                .subject
                .as_deref()
                .is_some_and(|s| !s.starts_with("user:"));
            if system && !self.inner.config.respond_to_systems {
                actions.retain(|a| *a == Action::ServerReadOnly);
            }
            for a in actions {
                if case.responses.iter().any(|t| t.action == a.name() && t.ok) {
                    continue;
                }
                let taken = self.respond(a, &case, &f).await;
                case.responses.push(taken);
            }
            if let Some(stored) = self.inner.cases.lock().by_id.get_mut(&case.id) {
                stored.responses = case.responses.clone();
            }
            if let Some(w) = &self.inner.webhook {
                w.send(
                    if opened {
                        "case-opened"
                    } else {
                        "case-escalated"
                    },
                    json!({
                        "event": if opened { "case-opened" } else { "case-escalated" },
                        "sent": now_micros(),
                        "case": case,
                        "finding": f,
                    }),
                );
            }
        }
        let _ = self.inner.alerts.send(case.clone());
        Some(case)
    }

    /// Save the cases of a batch in one write. One save per finding, each
    /// waiting its turn at the store's single writer, had held the pipeline
    /// behind a bulk load: a Bundle of 1,000 patients with a few duplicate
    /// identities waited behind the next Bundle's commit for every finding.
    async fn save_cases(&self, unsaved: Unsaved) {
        if unsaved.cases.is_empty() {
            return;
        }
        let vault = self.inner.auth.vault().clone();
        let rows: Vec<(String, Vec<u8>)> = unsaved
            .cases
            .iter()
            .map(|c| (c.id.clone(), vault.seal(CASE_KIND, &c.id, c)))
            .collect();
        let saved = vault
            .write(move |tx, _| {
                for (id, sealed) in &rows {
                    tx.sys_put(CASE_KIND, id, sealed, None)
                        .map_err(|e| custos_auth::AuthError::Internal(e.to_string()))?;
                }
                Ok(())
            })
            .await;
        if let Err(e) = saved {
            tracing::error!(error = %e, cases = unsaved.cases.len(), "detection cases could not be saved");
        }
    }

    async fn save_case(&self, case: &Case) -> Result<(), DetectError> {
        self.inner
            .auth
            .vault()
            .put(CASE_KIND, &case.id, case, None)
            .await
            .map(|_| ())
            .map_err(store_err)
    }

    /// Take one response; the account controls audit themselves, and the
    /// response is recorded with its case.
    async fn respond(&self, action: Action, case: &Case, f: &Finding) -> Taken {
        let auth = &self.inner.auth;
        let reason = format!("detection case {} ({})", case.id, case.detector);
        let subject = case.subject.clone();
        let username = match (&case.username, &subject) {
            (Some(u), _) => Some(u.clone()),
            (None, Some(s)) if s.starts_with("user:") => auth
                .snapshot()
                .await
                .ok()
                .and_then(|snap| snap.users.get(&s[5..]).map(|u| u.username.clone())),
            _ => None,
        };
        let result: Result<(), String> = match (action, &username, &subject) {
            (Action::Notify, _, _) => Ok(()),
            (Action::ServerReadOnly, _, _) => auth
                .set_server_read_only(true, Some(reason.clone()))
                .await
                .map_err(|e| e.to_string()),
            (Action::Lock, Some(u), _) => {
                auth.lock_user(u, &reason).await.map_err(|e| e.to_string())
            }
            (Action::ReadOnly, Some(u), _) => auth
                .set_user_read_only(u, true)
                .await
                .map_err(|e| e.to_string()),
            (Action::RequireBreakGlass, Some(u), _) => auth
                .set_user_require_break_glass(u, true)
                .await
                .map_err(|e| e.to_string()),
            (a, None, Some(s)) if !s.starts_with("user:") => {
                let now = custos_auth::now_secs() + 1;
                auth.control_principal(s, move |c| match a {
                    Action::Lock => {
                        c.locked = true;
                        c.tokens_valid_after = now;
                    }
                    Action::ReadOnly => c.read_only = true,
                    Action::RequireBreakGlass => c.require_break_glass = true,
                    _ => {}
                })
                .await
                .map_err(|e| e.to_string())
            }
            _ => Err("the finding names no principal to act on".into()),
        };
        let ok = result.is_ok();
        if let Err(e) = &result {
            tracing::error!(action = action.name(), error = %e, "a detection response failed");
        }
        self.audit(
            "detect-response",
            "system:detect",
            &format!(
                "case {}: {} {} ({}: {})",
                case.id,
                action.name(),
                subject.as_deref().unwrap_or("server"),
                f.detector,
                f.kind
            ),
            ok,
        )
        .await;
        Taken {
            at: now_micros(),
            action: action.name().to_string(),
            ok,
            error: result.err(),
        }
    }

    async fn audit(&self, what: &str, by: &str, detail: &str, ok: bool) {
        let rec = AuditRecord {
            kind: EventKind::Admin,
            action: format!("detect:{what}"),
            interaction: Some(what.to_string()),
            status: if ok { 200 } else { 500 },
            agent: Agent {
                subject: Some(by.to_string()),
                ..Agent::default()
            },
            detail: Some(detail.to_string()),
            decisions: vec![Decision {
                interaction: "admin".into(),
                rtype: None,
                id: None,
                patient: None,
                allowed: ok,
                rule: what.to_string().into(),
            }],
            ..AuditRecord::default()
        };
        if let Err(e) = self.inner.auth.record(rec).await {
            tracing::error!(error = %e, "a detection action could not be audited");
        }
    }
}

/// An ISO 8601 instant or date as UTC microseconds.
fn parse_instant(s: &str) -> Option<i64> {
    use time::format_description::well_known::Rfc3339;
    if let Ok(t) = time::OffsetDateTime::parse(s, &Rfc3339) {
        return Some((t.unix_timestamp_nanos() / 1000) as i64);
    }
    let d = time::Date::parse(
        s.get(..10)?,
        &time::macros::format_description!("[year]-[month]-[day]"),
    )
    .ok()?;
    Some(d.midnight().assume_utc().unix_timestamp() * 1_000_000)
}

#[cfg(test)]
mod tests {
    #[test]
    fn instants() {
        assert_eq!(
            super::parse_instant("1970-01-01T00:00:01Z"),
            Some(1_000_000)
        );
        assert_eq!(super::parse_instant("1970-01-02"), Some(86_400_000_000));
        assert_eq!(super::parse_instant("soon"), None);
    }
}
