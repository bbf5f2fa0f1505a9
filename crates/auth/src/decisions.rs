//! Every access decision is a recorded fact: who, what, which rule allowed
//! or refused it, and any break-the-glass reason. Records are sealed (a
//! reason or a query may hold PHI) and appended to the `access` system log
//! in batches, off the request path; the audit trail picks them up there.
use std::sync::Arc;

use custos_store::{LogEntry, StoreExt};
use serde::{Deserialize, Serialize};

use crate::AuthError;
use crate::vault::{Vault, backend};

/// The name of the system log holding access records.
pub const ACCESS_LOG: &str = "access";

/// One decision of the policy.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Decision {
    /// `read`, `search`, `create`, … or `login`, `token`, `admin`.
    pub interaction: String,
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
    pub rule: String,
}

/// Everything recorded about one request or one authentication event.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct AccessRecord {
    /// UTC microseconds.
    pub at: i64,
    /// The principal's stable subject (`user:…`, `client:…`, `oidc:…`), if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_agent: Option<String>,
    /// HTTP method and route template (never the concrete URL).
    pub action: String,
    pub status: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub purpose: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub break_glass_reason: Option<String>,
    pub decisions: Vec<Decision>,
}

/// Records waiting to be appended, and flush requests waiting for them.
#[derive(Default)]
struct Pending {
    records: parking_lot::Mutex<Vec<AccessRecord>>,
    flushes: parking_lot::Mutex<Vec<tokio::sync::oneshot::Sender<()>>>,
    wake: tokio::sync::Notify,
}

/// Appends access records in batches. A request only pushes its record
/// into a buffer (no task wake-up per request); a background task appends
/// the buffer every [`GATHER`], or sooner when it holds [`BATCH`] records.
#[derive(Clone)]
pub struct AccessLog {
    pending: Arc<Pending>,
    vault: Vault,
}

const BATCH: usize = 4096;
/// How long records gather before they are appended (fewer, larger
/// commits: the writer and the WAL see one append per period, not per request).
const GATHER: std::time::Duration = std::time::Duration::from_millis(100);

impl AccessLog {
    /// Start the background appender.
    pub fn start(vault: Vault) -> AccessLog {
        let pending = Arc::new(Pending::default());
        let (p, v) = (Arc::downgrade(&pending), vault.clone());
        tokio::spawn(async move {
            loop {
                let Some(p) = p.upgrade() else {
                    break;
                };
                let _ = tokio::time::timeout(GATHER, p.wake.notified()).await;
                // Flush requests first: every record pushed before a flush
                // request is then in the buffer taken next.
                let flushes = std::mem::take(&mut *p.flushes.lock());
                let records = std::mem::take(&mut *p.records.lock());
                drop(p);
                if !records.is_empty() {
                    // One sealed entry per batch: one AES-GCM seal and one
                    // row for many records, not one of each per request.
                    let at = records[0].at;
                    let n = records.len();
                    // Serializing and sealing thousands of records takes a
                    // millisecond or two: off the request workers.
                    let sv = v.clone();
                    let Ok(sealed) = tokio::task::spawn_blocking(move || {
                        sv.seal(ACCESS_LOG, &at.to_string(), &records)
                    })
                    .await
                    else {
                        tracing::error!(records = n, "access records could not be sealed");
                        continue;
                    };
                    let result = v
                        .store()
                        .write(move |tx| tx.log_append(ACCESS_LOG, at, &sealed).map(|_| ()))
                        .await;
                    if let Err(e) = result {
                        tracing::error!(records = n, error = %e, "access records could not be appended");
                    }
                }
                for done in flushes {
                    let _ = done.send(());
                }
            }
        });
        AccessLog { pending, vault }
    }

    /// Queue a record; it is appended within [`GATHER`].
    pub async fn record(&self, r: AccessRecord) {
        let full = {
            let mut b = self.pending.records.lock();
            b.push(r);
            b.len() >= BATCH
        };
        if full {
            self.pending.wake.notify_one();
        }
    }

    /// Read back the records of log entries after `after` (each entry holds
    /// a batch; every record is returned with its entry's sequence number),
    /// at most `limit` entries, opened.
    pub async fn read(
        &self,
        after: i64,
        limit: usize,
    ) -> Result<Vec<(i64, AccessRecord)>, AuthError> {
        let entries: Vec<LogEntry> = self
            .vault
            .store()
            .read(move |tx| tx.log_read(ACCESS_LOG, after, limit))
            .await
            .map_err(backend)?;
        let mut out = Vec::new();
        for e in entries {
            let rec = custos_store::SysRecord {
                kind: ACCESS_LOG.into(),
                key: e.at.to_string(),
                version: 0,
                value: e.value,
            };
            let batch: Vec<AccessRecord> = self.vault.open_record(&rec)?;
            out.extend(batch.into_iter().map(|r| (e.seq, r)));
        }
        Ok(out)
    }

    /// Wait until every queued record is appended (tests, shutdown).
    pub async fn flush(&self) {
        let (done, wait) = tokio::sync::oneshot::channel();
        self.pending.flushes.lock().push(done);
        self.pending.wake.notify_one();
        let _ = wait.await;
    }
}

/// Shared handle.
pub type SharedAccessLog = Arc<AccessLog>;
