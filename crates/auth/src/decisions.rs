//! Every access decision is a recorded fact: who, what, which rule allowed
//! or refused it, and any break-the-glass reason. Records are sealed (a
//! reason or a query may hold PHI) and appended to the `access` system log
//! in batches, off the request path; the audit trail picks them up there.
use std::sync::Arc;

use custos_store::{LogEntry, StoreExt};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

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

enum Msg {
    Record(Box<AccessRecord>),
    /// Answered once everything queued before it is appended.
    Flush(tokio::sync::oneshot::Sender<()>),
}

/// Appends access records in batches.
#[derive(Clone)]
pub struct AccessLog {
    tx: mpsc::Sender<Msg>,
    vault: Vault,
}

const BATCH: usize = 1024;

impl AccessLog {
    /// Start the background appender.
    pub fn start(vault: Vault) -> AccessLog {
        let (tx, mut rx) = mpsc::channel::<Msg>(65_536);
        let v = vault.clone();
        tokio::spawn(async move {
            let mut batch = Vec::with_capacity(BATCH);
            while rx.recv_many(&mut batch, BATCH).await > 0 {
                let mut flushes = Vec::new();
                let sealed: Vec<(i64, Vec<u8>)> = batch
                    .drain(..)
                    .filter_map(|m| match m {
                        Msg::Record(r) => {
                            let key = format!("{}", r.at);
                            Some((r.at, v.seal(ACCESS_LOG, &key, &*r)))
                        }
                        Msg::Flush(done) => {
                            flushes.push(done);
                            None
                        }
                    })
                    .collect();
                let n = sealed.len();
                let result = v
                    .store()
                    .write(move |tx| {
                        for (at, value) in &sealed {
                            tx.log_append(ACCESS_LOG, *at, value)?;
                        }
                        Ok(())
                    })
                    .await;
                if let Err(e) = result {
                    tracing::error!(records = n, error = %e, "access records could not be appended");
                }
                for done in flushes {
                    let _ = done.send(());
                }
            }
        });
        AccessLog { tx, vault }
    }

    /// Queue a record (waits only if the appender is far behind).
    pub async fn record(&self, r: AccessRecord) {
        if self.tx.send(Msg::Record(Box::new(r))).await.is_err() {
            tracing::error!("access log appender stopped; a record was lost");
        }
    }

    /// Read back records after `after` (by log sequence), opened.
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
        entries
            .into_iter()
            .map(|e| {
                let rec = custos_store::SysRecord {
                    kind: ACCESS_LOG.into(),
                    key: format!("{}", e.at),
                    version: 0,
                    value: e.value,
                };
                Ok((e.seq, self.vault.open_record(&rec)?))
            })
            .collect()
    }

    /// Wait until every queued record is appended (tests, shutdown).
    pub async fn flush(&self) {
        let (done, wait) = tokio::sync::oneshot::channel();
        if self.tx.send(Msg::Flush(done)).await.is_ok() {
            let _ = wait.await;
        }
    }
}

/// Shared handle.
pub type SharedAccessLog = Arc<AccessLog>;
