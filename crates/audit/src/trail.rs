//! The audit trail service: seals events, appends them to the store's
//! Merkle log (group-committed, or inside a write's own transaction), signs
//! checkpoints, serves proofs, and reads events back.
use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use custos_crypto::{DataKey, GcmSealer, Sealer};
use custos_records::{Change, Records, WriteAudit};
use custos_store::{
    AuditAppend, AuditEntry, AuditQuery, AuditTreeHashes, ReadTx, Store, StoreError, StoreExt,
    WriteTx,
};
use parking_lot::Mutex;
use serde::Deserialize;
use zeroize::Zeroizing;

use crate::checkpoint::LogSigner;
use crate::event::{AuditRecord, Entity, Leaf, key_name_for};
use crate::tiles::TileRequest;

/// The system log holding signed checkpoints, oldest first.
pub const CHECKPOINT_LOG: &str = "audit-checkpoint";
/// System records of the checkpoint signing key.
const SIGNING_KIND: &str = "audit-signing";
/// The data key sealing the checkpoint signing key.
const SIGNING_DATA_KEY: &str = "system/audit-signing";

/// Settings of the audit trail (`[audit]` in the TOML file).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuditConfig {
    /// Seconds between checkpoints (when the log grew); 0 turns the timer off.
    pub checkpoint_secs: u64,
    /// A file outside the data dir that every checkpoint is appended to.
    pub witness_file: Option<PathBuf>,
    /// A URL every checkpoint is POSTed to (`text/plain`, the signed note).
    pub witness_url: Option<String>,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            checkpoint_secs: 10,
            witness_file: None,
            witness_url: None,
        }
    }
}

/// Errors of the audit trail.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit store: {0}")]
    Store(String),
    #[error("audit integrity: {0}")]
    Integrity(String),
    #[error("{0}")]
    Invalid(String),
}

fn store_err(e: StoreError) -> AuditError {
    AuditError::Store(e.to_string())
}

/// A signed checkpoint as issued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issued {
    pub size: u64,
    pub root: [u8; 32],
    /// The C2SP signed note.
    pub note: Vec<u8>,
}

/// Events waiting for their group commit.
#[derive(Default)]
struct Queue {
    events: Vec<Pending>,
    /// A commit job is queued at the store's writer and has not yet taken
    /// the events: the next event rides on it instead of queueing another.
    armed: bool,
}

struct Pending {
    leaf: Vec<u8>,
    at: i64,
    action: &'static str,
    outcome: u8,
    agent: Option<String>,
    patients: Vec<String>,
    /// The event itself, kept for the in-process consumer once committed
    /// (only while one asked for it: see [`AuditTrail::hand_over_commits`]).
    rec: Option<AuditRecord>,
    done: tokio::sync::oneshot::Sender<Result<u64, String>>,
}

/// Events the group commits committed, in index order, for the in-process
/// consumer of the log (the detection pipeline): it takes them from here
/// instead of reading the leaves back and opening them again, which cost
/// more CPU than anything else detection does. Bounded: what the consumer
/// does not take in time falls out and is read from the store, as are
/// events committed inside writes or by other nodes.
struct Recent {
    events: VecDeque<(u64, AuditRecord)>,
}

struct Inner {
    records: Records,
    signer: LogSigner,
    config: AuditConfig,
    /// The data key of the current hour.
    key: Mutex<Option<(String, Arc<DataKey>)>>,
    pending: Mutex<Queue>,
    /// How many committed events [`Recent`] holds at most (0: none, no consumer asked).
    recent_capacity: AtomicUsize,
    recent: Mutex<Recent>,
    /// Serializes checkpoint issuance; holds the last one issued.
    last: tokio::sync::Mutex<Option<Issued>>,
    /// When this process last signed one.
    signed_at: Mutex<Option<std::time::Instant>>,
    /// Signalled after events commit (what the detection pipeline waits on).
    committed: Arc<tokio::sync::Notify>,
    /// Signalled after a write's events commit (changes to records: what
    /// a consumer should not wait to see).
    changed: Arc<tokio::sync::Notify>,
    /// The `audit-leader` role, while this process holds it (see [`AuditTrail::lead`]).
    lease: tokio::sync::Mutex<Option<Arc<dyn custos_store::Lease>>>,
    leader: tokio::sync::watch::Sender<bool>,
    /// Set by [`AuditTrail::close`]: the timers stop and leadership is given up.
    closed: std::sync::atomic::AtomicBool,
    /// Blind tokens already computed, by value: every event needs its
    /// agent's and its patients' (an HMAC and its hex each), and the same
    /// few recur from request to request. Looked up by `&str`, so a hit
    /// allocates nothing.
    agent_tokens: Mutex<lru::LruCache<String, String>>,
    patient_tokens: Mutex<lru::LruCache<String, String>>,
}

/// How many value → token pairs the trail remembers, of each kind.
const TOKEN_MEMO: usize = 16_384;

impl Inner {
    /// Take every waiting event and disarm (the next event queues a new
    /// commit job).
    fn take_queue(&self) -> Vec<Pending> {
        let mut queue = self.pending.lock();
        queue.armed = false;
        std::mem::take(&mut queue.events)
    }

    /// Hold committed events for the consumer (those it asked for), dropping
    /// the oldest beyond the capacity.
    fn keep_committed(&self, committed: impl Iterator<Item = (u64, Option<AuditRecord>)>) {
        let capacity = self.recent_capacity.load(Ordering::Relaxed);
        if capacity == 0 {
            return;
        }
        let mut recent = self.recent.lock();
        for (index, rec) in committed {
            if let Some(rec) = rec {
                recent.events.push_back((index, rec));
            }
        }
        while recent.events.len() > capacity {
            recent.events.pop_front();
        }
    }

    /// Take the held events `start, start + 1, …` (below `end`, at most
    /// `limit`) and forget any before `start`. Also returns the index of
    /// the first event still held, if any.
    fn take_committed(
        &self,
        start: u64,
        end: u64,
        limit: usize,
    ) -> (Vec<(u64, AuditRecord)>, Option<u64>) {
        let mut recent = self.recent.lock();
        while recent.events.front().is_some_and(|(i, _)| *i < start) {
            recent.events.pop_front();
        }
        let mut out = Vec::new();
        while out.len() < limit {
            let next = start + out.len() as u64;
            match recent.events.front() {
                Some((i, _)) if *i == next && next < end => {
                    out.extend(recent.events.pop_front());
                }
                _ => break,
            }
        }
        (out, recent.events.front().map(|(i, _)| *i))
    }
}

/// The role whose holder signs checkpoints (and, in `custos serve`, publishes
/// the audit stream and runs detection): one process at a time among all
/// that share the store.
pub const LEADER_ROLE: &str = "audit-leader";

/// The audit trail of one Custos deployment.
#[derive(Clone)]
pub struct AuditTrail {
    inner: Arc<Inner>,
}

fn now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

impl AuditTrail {
    /// Open the trail: load (or create) the checkpoint signing key, sealed
    /// in the store, and start the checkpoint timer.
    pub async fn open(records: &Records, config: AuditConfig) -> Result<AuditTrail, AuditError> {
        let signer = load_signer(records).await?;
        let inner = Arc::new(Inner {
            records: records.clone(),
            signer,
            config,
            key: Mutex::new(None),
            pending: Mutex::new(Queue::default()),
            recent_capacity: AtomicUsize::new(0),
            recent: Mutex::new(Recent {
                events: VecDeque::new(),
            }),
            last: tokio::sync::Mutex::new(None),
            signed_at: Mutex::new(None),
            committed: Arc::new(tokio::sync::Notify::new()),
            changed: Arc::new(tokio::sync::Notify::new()),
            lease: tokio::sync::Mutex::new(None),
            leader: tokio::sync::watch::channel(false).0,
            closed: std::sync::atomic::AtomicBool::new(false),
            agent_tokens: Mutex::new(lru::LruCache::new(
                std::num::NonZeroUsize::new(TOKEN_MEMO).expect("non-zero"),
            )),
            patient_tokens: Mutex::new(lru::LruCache::new(
                std::num::NonZeroUsize::new(TOKEN_MEMO).expect("non-zero"),
            )),
        });
        let trail = AuditTrail { inner };
        trail.spawn_checkpointer();
        Ok(trail)
    }

    /// Whether this process holds the leader role, campaigning for it if
    /// not. On a backend shared by several nodes only one wins; when its
    /// holder dies the role is free for the next campaign. Winning it
    /// reloads the last stored checkpoint (another node may have signed
    /// since), so a new leader signs only an extension of it.
    pub async fn lead(&self) -> bool {
        if self.is_closed() {
            return false;
        }
        let mut lease = self.inner.lease.lock().await;
        if lease.as_ref().is_some_and(|l| l.held()) {
            return true;
        }
        let was = lease.take().is_some();
        let won = match self.store().campaign(LEADER_ROLE).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "campaign for audit leadership failed");
                None
            }
        };
        let now = won.is_some();
        *lease = won;
        if now {
            *self.inner.last.lock().await = None;
        }
        if now != was || now != *self.inner.leader.borrow() {
            if now {
                tracing::info!("this node now leads: it signs audit checkpoints");
            } else if was {
                tracing::warn!("this node lost audit leadership");
            }
            self.inner.leader.send_replace(now);
        }
        now
    }

    /// Stop the checkpoint timer and the campaign, and give up leadership
    /// (at shutdown, after the final checkpoint).
    pub async fn close(&self) {
        self.inner
            .closed
            .store(true, std::sync::atomic::Ordering::Release);
        self.inner.lease.lock().await.take();
        self.inner.leader.send_replace(false);
    }

    fn is_closed(&self) -> bool {
        self.inner.closed.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Events queued on this node and not yet committed (its audit lag).
    pub fn pending_appends(&self) -> usize {
        self.inner.pending.lock().events.len()
    }

    /// The size of the last checkpoint this node signed or loaded, if any.
    pub async fn last_signed_size(&self) -> Option<u64> {
        self.inner.last.lock().await.as_ref().map(|l| l.size)
    }

    /// Whether this process led at the last campaign.
    pub fn is_leader(&self) -> bool {
        *self.inner.leader.borrow()
    }

    /// Leadership as it changes (`true` while this process leads).
    pub fn leadership(&self) -> tokio::sync::watch::Receiver<bool> {
        self.inner.leader.subscribe()
    }

    /// Campaign every second (servers: a dead leader's role is taken over
    /// within about a second of its database session ending).
    pub fn spawn_campaign(&self) {
        let weak = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { break };
                let trail = AuditTrail { inner };
                if trail.is_closed() {
                    break;
                }
                trail.lead().await;
            }
        });
    }

    /// What is signalled after events commit: a consumer of the log (the
    /// detection pipeline) waits on it, then reads from where it stopped.
    pub fn commit_signal(&self) -> Arc<tokio::sync::Notify> {
        self.inner.committed.clone()
    }

    /// What is signalled after a write's events commit (a subset of
    /// [`AuditTrail::commit_signal`]).
    pub fn change_signal(&self) -> Arc<tokio::sync::Notify> {
        self.inner.changed.clone()
    }

    /// Signal that a write's events committed (they commit with the write,
    /// outside the trail's own group commits).
    pub fn signal_commit(&self) {
        self.inner.committed.notify_one();
        self.inner.changed.notify_one();
    }

    /// The public key that verifies checkpoints (a signed-note verifier key).
    pub fn verifier_key(&self) -> String {
        self.inner.signer.verifier_key()
    }

    /// The log's origin line.
    pub fn origin(&self) -> &str {
        self.inner.signer.origin()
    }

    fn store(&self) -> &Arc<dyn Store> {
        self.inner.records.store()
    }

    /// A blind token for a patient id (what the log is searched by).
    pub fn patient_token(&self, patient: &str) -> String {
        self.token(&self.inner.patient_tokens, b"custos-audit-patient", patient)
    }

    /// A blind token for an agent's subject.
    pub fn agent_token(&self, subject: &str) -> String {
        self.token(&self.inner.agent_tokens, b"custos-audit-agent", subject)
    }

    fn token(
        &self,
        memo: &Mutex<lru::LruCache<String, String>>,
        domain: &[u8],
        value: &str,
    ) -> String {
        if let Some(t) = memo.lock().get(value) {
            return t.clone();
        }
        let t = self
            .inner
            .records
            .keys()
            .blind()
            .token(&[domain, value.as_bytes()]);
        let t = custos_crypto::to_hex(&t);
        memo.lock().put(value.to_string(), t.clone());
        t
    }

    async fn key_for(&self, at: i64) -> Result<(String, Arc<DataKey>), AuditError> {
        let name = key_name_for(at);
        if let Some((n, k)) = &*self.inner.key.lock()
            && *n == name
        {
            return Ok((n.clone(), k.clone()));
        }
        let (r, kn) = (self.inner.records.clone(), name.clone());
        let key = self
            .store()
            .write(move |tx| r.keys().key_for_write(tx, &kn).map_err(StoreError::abort))
            .await
            .map_err(store_err)?;
        *self.inner.key.lock() = Some((name.clone(), key.clone()));
        Ok((name, key))
    }

    fn seal(rec: &AuditRecord, name: &str, key: &DataKey) -> Vec<u8> {
        let json = serde_json::to_vec(rec).expect("audit records serialize");
        let sealed = GcmSealer.seal(key, &Leaf::aad(rec.at, name), &json);
        Leaf {
            at: rec.at,
            key_name: name,
            sealed: &sealed,
        }
        .encode()
    }

    /// Append one event and wait until it is committed (group-committed with
    /// whatever else is queued). Returns its leaf index. An error means the
    /// event is not in the log: the caller must fail its request.
    pub async fn append(&self, rec: AuditRecord) -> Result<u64, AuditError> {
        let (name, key) = self.key_for(rec.at).await?;
        let leaf = Self::seal(&rec, &name, &key);
        let patients = rec
            .patients()
            .iter()
            .map(|p| self.patient_token(p))
            .collect();
        let agent = rec.agent.subject.as_deref().map(|s| self.agent_token(s));
        let (done, wait) = tokio::sync::oneshot::channel();
        let arm = {
            let mut queue = self.inner.pending.lock();
            queue.events.push(Pending {
                leaf,
                at: rec.at,
                action: rec.action_code(),
                outcome: rec.outcome_code(),
                agent,
                patients,
                rec: (self.inner.recent_capacity.load(Ordering::Relaxed) > 0).then_some(rec),
                done,
            });
            !std::mem::replace(&mut queue.armed, true)
        };
        if arm {
            Self::arm_commit(&self.inner);
        }
        match wait.await {
            Ok(Ok(index)) => Ok(index),
            Ok(Err(e)) => Err(AuditError::Store(e)),
            Err(_) => Err(AuditError::Store("the audit commit was abandoned".into())),
        }
    }

    /// Append one event inside a write transaction (the write and its event
    /// commit together or not at all).
    pub fn append_in(&self, tx: &mut dyn WriteTx, rec: &AuditRecord) -> Result<u64, StoreError> {
        let name = key_name_for(rec.at);
        let key = self
            .inner
            .records
            .keys()
            .key_for_write(tx, &name)
            .map_err(StoreError::abort)?;
        let leaf = Self::seal(rec, &name, &key);
        let patients: Vec<String> = rec
            .patients()
            .iter()
            .map(|p| self.patient_token(p))
            .collect();
        let agent = rec.agent.subject.as_deref().map(|s| self.agent_token(s));
        tx.audit_append(&AuditAppend {
            at: rec.at,
            action: rec.action_code(),
            outcome: rec.outcome_code(),
            agent: agent.as_deref(),
            patients: &patients,
            data: &leaf,
        })
    }

    /// A [`WriteAudit`] for one request: every committed write appends
    /// `template` completed with what it changed and, from `decisions`,
    /// the policy's decisions so far.
    pub fn for_writes(
        &self,
        template: AuditRecord,
        decisions: Option<DecisionSource>,
    ) -> Arc<RequestWrites> {
        Arc::new(RequestWrites {
            trail: self.clone(),
            template: Mutex::new(template),
            decisions,
            appended: Mutex::new(Vec::new()),
        })
    }

    /// Queue the job that group-commits the waiting events. It takes them
    /// when the writer runs it, not when it is queued: the events that
    /// arrive while the writer is busy (the previous commit, other
    /// writes) ride on it, so batches grow with the load; the trail adds no
    /// delay of its own (the store may hold a commit briefly under load,
    /// `storage.commit_delay_us`). The store answers each event's task
    /// directly once the commit is durable. (An appender thread of our own between the request tasks and
    /// the writer cost two more thread wake-ups per commit, on the path of
    /// every audited request.)
    fn arm_commit(inner: &Arc<Inner>) {
        // The events the job took (`None` until it runs).
        let taken: Arc<Mutex<Option<Vec<Pending>>>> = Arc::default();
        let job_weak = Arc::downgrade(inner);
        let job_taken = taken.clone();
        let job: custos_store::WriteJob = Box::new(move |tx| {
            let Some(inner) = job_weak.upgrade() else {
                return Ok(Box::new(Vec::<u64>::new()));
            };
            // Kept in the slot before anything can fail, so that the callback
            // answers exactly these events even if an append panics.
            let mut slot = job_taken.lock();
            let batch = slot.insert(inner.take_queue());
            let mut indexes = Vec::with_capacity(batch.len());
            for p in batch.iter() {
                indexes.push(tx.audit_append(&AuditAppend {
                    at: p.at,
                    action: p.action,
                    outcome: p.outcome,
                    agent: p.agent.as_deref(),
                    patients: &p.patients,
                    data: &p.leaf,
                })?);
            }
            Ok(Box::new(indexes) as Box<dyn std::any::Any + Send>)
        });
        let done_weak = Arc::downgrade(inner);
        let done: custos_store::WriteDone = Box::new(move |result| {
            let inner = done_weak.upgrade();
            // A job that never ran (its writer stopped) took nothing and
            // is the only one armed: the events still wait in the queue,
            // which nothing will take now.
            let batch = match (taken.lock().take(), &inner) {
                (Some(batch), _) => batch,
                (None, Some(inner)) => inner.take_queue(),
                (None, None) => Vec::new(),
            };
            match result.map(|any| *any.downcast::<Vec<u64>>().expect("indexes")) {
                Ok(indexes) => {
                    let (recs, replies): (Vec<_>, Vec<_>) =
                        batch.into_iter().map(|p| (p.rec, p.done)).unzip();
                    // Held before anyone hears of the commit: once an append
                    // returns, its event is there for the consumer.
                    if let Some(inner) = &inner {
                        inner.keep_committed(indexes.iter().copied().zip(recs));
                    }
                    for (done, i) in replies.into_iter().zip(&indexes) {
                        let _ = done.send(Ok(*i));
                    }
                    if let Some(inner) = inner {
                        inner.committed.notify_one();
                    }
                }
                Err(e) => {
                    tracing::error!(events = batch.len(), error = %e, "audit events could not be appended");
                    for p in batch {
                        let _ = p.done.send(Err(e.to_string()));
                    }
                }
            }
        });
        if let Err(e) = inner.records.store().submit_write(job, done) {
            // The store is closed: nothing will take these events.
            for p in inner.take_queue() {
                let _ = p.done.send(Err(e.to_string()));
            }
        }
    }

    fn spawn_checkpointer(&self) {
        let secs = self.inner.config.checkpoint_secs;
        if secs == 0 {
            return;
        }
        let weak = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(secs));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { break };
                let trail = AuditTrail { inner };
                if trail.is_closed() {
                    break;
                }
                // Only the leader signs; the others have nothing to do here.
                if !trail.lead().await {
                    continue;
                }
                if let Err(e) = trail.checkpoint().await {
                    tracing::error!(error = %e, "audit checkpoint failed");
                }
            }
        });
    }

    /// The size and root of the log now.
    pub async fn tree_head(&self) -> Result<(u64, [u8; 32]), AuditError> {
        self.store()
            .read(|tx| {
                let size = tx.audit_size()?;
                Ok((size, custos_store::audit_root(tx, size)?))
            })
            .await
            .map_err(store_err)
    }

    /// Sign a checkpoint of the log as it is now (unless the last one
    /// already covers it), store it, and send it to the witnesses.
    ///
    /// Only the leader signs (see [`AuditTrail::lead`]); elsewhere this is the
    /// latest checkpoint stored.
    pub async fn checkpoint(&self) -> Result<Issued, AuditError> {
        if !self.lead().await {
            return self.latest_stored().await?.ok_or_else(|| {
                AuditError::Invalid(
                    "no checkpoint has been signed yet; the leader node signs one within seconds"
                        .into(),
                )
            });
        }
        let mut last = self.inner.last.lock().await;
        if last.is_none() {
            *last = self.latest_stored().await?;
        }
        let prefix = last.as_ref().map(|l| l.size);
        let (size, root, prefix_root) = self
            .store()
            .read(move |tx| {
                let size = tx.audit_size()?;
                let prefix_root = match prefix {
                    Some(p) if p <= size => Some(custos_store::audit_root(tx, p)?),
                    _ => None,
                };
                Ok((size, custos_store::audit_root(tx, size)?, prefix_root))
            })
            .await
            .map_err(store_err)?;
        if let Some(l) = &*last {
            // Never sign a history that does not extend the last one signed:
            // a shortened or rewritten log is tampering, not a new state.
            if size < l.size || prefix_root != Some(l.root) {
                tracing::error!(
                    signed = l.size,
                    now = size,
                    "the audit log does not extend its last signed checkpoint; refusing to sign"
                );
                return Err(AuditError::Integrity(format!(
                    "the audit log ({size} entries) does not extend its last signed checkpoint ({} entries): it was truncated or rewritten",
                    l.size
                )));
            }
            if l.size == size {
                return Ok(l.clone());
            }
        }
        let note = self
            .inner
            .signer
            .sign(size, root)
            .map_err(|e| AuditError::Integrity(e.to_string()))?;
        let n = note.clone();
        self.store()
            .write(move |tx| tx.log_append(CHECKPOINT_LOG, now_micros(), &n))
            .await
            .map_err(store_err)?;
        let issued = Issued { size, root, note };
        self.witness(&issued).await;
        *last = Some(issued.clone());
        *self.inner.signed_at.lock() = Some(std::time::Instant::now());
        Ok(issued)
    }

    async fn witness(&self, c: &Issued) {
        if let Some(path) = &self.inner.config.witness_file {
            let mut line = c.note.clone();
            line.push(b'\n');
            let path = path.clone();
            let written = tokio::task::spawn_blocking(move || {
                use std::io::Write;
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .and_then(|mut f| f.write_all(&line).and_then(|_| f.sync_data()))
            })
            .await;
            if !matches!(written, Ok(Ok(()))) {
                tracing::error!("the checkpoint could not be written to the witness file");
            }
        }
        if let Some(url) = &self.inner.config.witness_url {
            let client = reqwest::Client::new();
            let sent = client
                .post(url)
                .header("content-type", "text/plain; charset=utf-8")
                .body(c.note.clone())
                .timeout(Duration::from_secs(5))
                .send()
                .await;
            match sent {
                Ok(r) if r.status().is_success() => {}
                Ok(r) => tracing::error!(status = %r.status(), "the witness refused a checkpoint"),
                Err(e) => tracing::error!(error = %e, "the witness could not be reached"),
            }
        }
    }

    async fn latest_stored(&self) -> Result<Option<Issued>, AuditError> {
        let all = self.checkpoints().await?;
        Ok(all.into_iter().last())
    }

    /// Every stored checkpoint, oldest first.
    pub async fn checkpoints(&self) -> Result<Vec<Issued>, AuditError> {
        let notes = self
            .store()
            .read(|tx| {
                let mut out = Vec::new();
                let mut after = 0;
                loop {
                    let page = tx.log_read(CHECKPOINT_LOG, after, 10_000)?;
                    let Some(last) = page.last() else { break };
                    after = last.seq;
                    out.extend(page.into_iter().map(|e| e.value));
                }
                Ok(out)
            })
            .await
            .map_err(store_err)?;
        let key = self.verifier_key();
        notes
            .into_iter()
            .map(|note| {
                let c = crate::checkpoint::open_checkpoint(&note, &key)
                    .map_err(|e| AuditError::Integrity(format!("stored checkpoint: {e}")))?;
                Ok(Issued {
                    size: c.size,
                    root: c.root,
                    note,
                })
            })
            .collect()
    }

    /// The latest checkpoint for a reader: a new one if the log grew and the
    /// last was signed over a second ago, else the last (asking cannot make
    /// the server sign, store and send checkpoints without limit).
    pub async fn latest(&self) -> Result<Issued, AuditError> {
        let recent = self
            .inner
            .signed_at
            .lock()
            .is_some_and(|t| t.elapsed() < Duration::from_secs(1));
        if recent && let Some(l) = self.inner.last.lock().await.clone() {
            return Ok(l);
        }
        self.checkpoint().await
    }

    /// A C2SP `tlog-tiles` resource at `path` (`tile/…`, see
    /// [`crate::tiles`]): its bytes and whether it is a full tile (the same
    /// at every later size). `None` if the path names no tile of the tree as
    /// it is now.
    pub async fn tile(&self, path: &str) -> Result<Option<(Vec<u8>, bool)>, AuditError> {
        let Some(req) = TileRequest::parse(path) else {
            return Ok(None);
        };
        let data = self
            .store()
            .read(move |tx| req.read(tx))
            .await
            .map_err(store_err)?;
        Ok(data.map(|d| (d, req.is_full())))
    }

    /// An inclusion proof of leaf `index` in the tree of `size` leaves.
    pub async fn inclusion_proof(
        &self,
        index: u64,
        size: u64,
    ) -> Result<Vec<[u8; 32]>, AuditError> {
        self.prove(
            move |r| tlog_tiles::prove_record(size, index, r),
            index < size,
            "index must be below the tree size",
        )
        .await
    }

    /// A consistency proof between the trees of `old` and `new` leaves.
    pub async fn consistency_proof(&self, old: u64, new: u64) -> Result<Vec<[u8; 32]>, AuditError> {
        self.prove(
            move |r| tlog_tiles::prove_tree(new, old, r),
            old <= new,
            "the old size must not exceed the new size",
        )
        .await
    }

    async fn prove<F>(&self, f: F, valid: bool, why: &str) -> Result<Vec<[u8; 32]>, AuditError>
    where
        F: FnOnce(&AuditTreeHashes<'_>) -> Result<Vec<tlog_tiles::Hash>, tlog_tiles::tlog::Error>
            + Send
            + 'static,
    {
        if !valid {
            return Err(AuditError::Invalid(why.into()));
        }
        let size = self
            .store()
            .read(|tx| tx.audit_size())
            .await
            .map_err(store_err)?;
        let proof = self
            .store()
            .read_point(move |tx| {
                f(&AuditTreeHashes::new(tx))
                    .map(|p| p.into_iter().map(|h| h.0).collect::<Vec<_>>())
                    .map_err(|e| StoreError::Backend(e.to_string()))
            })
            .await;
        match proof {
            Ok(p) => Ok(p),
            Err(_) => Err(AuditError::Invalid(format!(
                "no such proof in a log of {size} entries"
            ))),
        }
    }

    /// Raw log entries `start..end` (at most `limit`).
    pub async fn entries(
        &self,
        start: u64,
        end: u64,
        limit: usize,
    ) -> Result<Vec<AuditEntry>, AuditError> {
        self.store()
            .read(move |tx| tx.audit_entries(start, end, limit))
            .await
            .map_err(store_err)
    }

    /// Events `start..end` (at most `limit`, possibly fewer), opened, in
    /// log order: what the consumer of the log (the detection pipeline)
    /// reads. Events this process committed since the consumer called
    /// [`AuditTrail::hand_over_commits`] come straight from memory, each
    /// once; the rest are read from the store and opened.
    pub async fn events(
        &self,
        start: u64,
        end: u64,
        limit: usize,
    ) -> Result<Vec<(u64, AuditRecord)>, AuditError> {
        let (held, next_held) = self.inner.take_committed(start, end, limit);
        if !held.is_empty() {
            return Ok(held);
        }
        // Read up to the first event held in memory (it comes from there next).
        let end = next_held.map_or(end, |n| n.min(end));
        let r = self.inner.records.clone();
        self.store()
            .read(move |tx| {
                let rows = tx.audit_entries(start, end, limit)?;
                let mut out = Vec::with_capacity(rows.len());
                for row in rows {
                    let rec = open_in(&r, tx, &row.data).map_err(StoreError::abort)?;
                    out.push((row.index, rec));
                }
                Ok(out)
            })
            .await
            .map_err(|e| match e.into_aborted::<AuditError>() {
                Ok(a) => a,
                Err(e) => store_err(e),
            })
    }

    /// How many committed events are held for the consumer, not yet taken.
    pub fn held_commits(&self) -> usize {
        self.inner.recent.lock().events.len()
    }

    /// Keep up to `capacity` of the events this process commits from now
    /// on for [`AuditTrail::events`] (the in-process consumer calls this
    /// when it starts; 0 stops it and forgets what is held).
    pub fn hand_over_commits(&self, capacity: usize) {
        self.inner
            .recent_capacity
            .store(capacity, Ordering::Relaxed);
        if capacity == 0 {
            self.inner.recent.lock().events.clear();
        }
    }

    /// The number of entries in the log.
    pub async fn size(&self) -> Result<u64, AuditError> {
        self.store()
            .read(|tx| tx.audit_size())
            .await
            .map_err(store_err)
    }

    /// Search events, opened.
    pub async fn search(
        &self,
        q: AuditQuery,
    ) -> Result<Vec<(AuditEntry, AuditRecord)>, AuditError> {
        let r = self.inner.records.clone();
        let rows = self
            .store()
            .read(move |tx| {
                let rows = tx.audit_search(&q)?;
                let mut out = Vec::with_capacity(rows.len());
                for row in rows {
                    let rec = open_in(&r, tx, &row.data).map_err(StoreError::abort)?;
                    out.push((row, rec));
                }
                Ok(out)
            })
            .await;
        rows.map_err(|e| match e.into_aborted::<AuditError>() {
            Ok(a) => a,
            Err(e) => store_err(e),
        })
    }

    /// Open one leaf with the data keys.
    pub async fn open_leaf(&self, leaf: Vec<u8>) -> Result<AuditRecord, AuditError> {
        let r = self.inner.records.clone();
        self.store()
            .read(move |tx| open_in(&r, tx, &leaf).map_err(StoreError::abort))
            .await
            .map_err(|e| match e.into_aborted::<AuditError>() {
                Ok(a) => a,
                Err(e) => store_err(e),
            })
    }
}

impl AuditTrail {
    /// Open sealed leaves (as [`AuditTrail::entries`] returns them, or as a
    /// stream of the log delivers them) in one read, in the order given.
    /// Any leaf that does not open fails the whole call.
    pub async fn open_leaves(&self, leaves: Vec<Vec<u8>>) -> Result<Vec<AuditRecord>, AuditError> {
        if leaves.is_empty() {
            return Ok(Vec::new());
        }
        let r = self.inner.records.clone();
        self.store()
            .read(move |tx| {
                leaves
                    .iter()
                    .map(|leaf| open_in(&r, tx, leaf).map_err(StoreError::abort))
                    .collect::<Result<Vec<_>, _>>()
            })
            .await
            .map_err(|e| match e.into_aborted::<AuditError>() {
                Ok(a) => a,
                Err(e) => store_err(e),
            })
    }
}

/// Open a leaf inside a read transaction.
pub fn open_in(
    records: &Records,
    tx: &mut dyn ReadTx,
    data: &[u8],
) -> Result<AuditRecord, AuditError> {
    let leaf = Leaf::decode(data)
        .ok_or_else(|| AuditError::Integrity("an audit entry is malformed".into()))?;
    let key = records
        .keys()
        .key_for_read(tx, leaf.key_name)
        .map_err(|e| AuditError::Store(e.message))?
        .ok_or_else(|| AuditError::Integrity(format!("the data key {} is gone", leaf.key_name)))?;
    let plain = GcmSealer
        .open(&key, &Leaf::aad(leaf.at, leaf.key_name), leaf.sealed)
        .map_err(|_| AuditError::Integrity("an audit entry failed its integrity check".into()))?;
    let rec: AuditRecord = serde_json::from_slice(&plain)
        .map_err(|_| AuditError::Integrity("an audit entry does not decode".into()))?;
    if rec.at != leaf.at {
        return Err(AuditError::Integrity(
            "an audit entry's time does not match its leaf".into(),
        ));
    }
    Ok(rec)
}

/// The write audit of one request: the event template (who, how) completed
/// with each committed change. Remembers what it appended, so the request's
/// own event is not written twice.
pub struct RequestWrites {
    trail: AuditTrail,
    template: Mutex<AuditRecord>,
    decisions: Option<DecisionSource>,
    appended: Mutex<Vec<u64>>,
}

/// Where a write's event finds the decisions made for it.
pub type DecisionSource = Box<dyn Fn() -> Vec<crate::event::Decision> + Send + Sync>;

impl RequestWrites {
    /// Indexes appended by committed (or rolled-back) attempts.
    pub fn appended(&self) -> Vec<u64> {
        self.appended.lock().clone()
    }

    /// Update the template (decisions made so far, for instance).
    pub fn update(&self, f: impl FnOnce(&mut AuditRecord)) {
        f(&mut self.template.lock());
    }
}

impl WriteAudit for RequestWrites {
    fn record(&self, tx: &mut dyn WriteTx, changes: &[Change]) -> Result<(), StoreError> {
        let mut rec = self.template.lock().clone();
        rec.at = now_micros();
        rec.status = if changes.iter().all(|c| c.interaction == "create") {
            201
        } else {
            200
        };
        if let Some(d) = &self.decisions {
            rec.decisions = d();
        }
        if changes.len() == 1 {
            rec.interaction = Some(changes[0].interaction.to_string());
        }
        rec.entities = changes
            .iter()
            .map(|c| Entity {
                rtype: c.rtype.clone(),
                id: c.id.clone(),
                version: Some(c.version),
                patient: c.patient.clone(),
            })
            .collect();
        let i = self.trail.append_in(tx, &rec)?;
        self.appended.lock().push(i);
        Ok(())
    }
}

async fn load_signer(records: &Records) -> Result<LogSigner, AuditError> {
    let r = records.clone();
    let secret: Zeroizing<String> = records
        .store()
        .write(move |tx| {
            let key = r
                .keys()
                .key_for_write(tx, SIGNING_DATA_KEY)
                .map_err(StoreError::abort)?;
            let aad = b"custos-audit-signing-v1|current";
            if let Some(rec) = tx.sys_get(SIGNING_KIND, "current")? {
                let plain =
                    Zeroizing::new(GcmSealer.open(&key, aad, &rec.value).map_err(|_| {
                        StoreError::Backend(
                            "the audit signing key failed its integrity check".into(),
                        )
                    })?);
                let s = String::from_utf8(plain.to_vec()).map_err(|_| {
                    StoreError::Backend("the audit signing key is malformed".into())
                })?;
                return Ok(Zeroizing::new(s));
            }
            let origin = format!("custos.audit/{}", &uuid_hex()[..16]);
            let (_, secret) =
                LogSigner::generate(&origin).map_err(|e| StoreError::Backend(e.to_string()))?;
            let sealed = GcmSealer.seal(&key, aad, secret.as_bytes());
            tx.sys_put(SIGNING_KIND, "current", &sealed, Some(0))?;
            Ok(secret)
        })
        .await
        .map_err(store_err)?;
    LogSigner::from_secret(&secret).map_err(|e| AuditError::Integrity(e.to_string()))
}

fn uuid_hex() -> String {
    let mut b = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
        .expect("the OS random generator failed");
    custos_crypto::to_hex(&b)
}
