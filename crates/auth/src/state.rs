//! The security state every request checks: accounts (locked, read-only,
//! tokens revoked), revoked refresh-token families, server read-only mode.
//!
//! It lives in the store, so a change made by any process (another node,
//! the `custos user lock` command) counts. Each change also bumps one
//! epoch record; a request reads that one row and reloads the state only
//! when it moved — a lock or a revocation takes effect on the very next
//! request everywhere, at the price of one point read.
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use custos_store::WriteTx;
use parking_lot::RwLock;
use serde::{Deserialize, Serialize};

use crate::AuthError;
use crate::users::{USER_KIND, User};
use crate::vault::{Vault, backend};

pub const EPOCH_KIND: &str = "security";
pub const EPOCH_KEY: &str = "epoch";
pub const SETTING_KIND: &str = "setting";
pub const READ_ONLY_KEY: &str = "read-only";
pub const FAMILY_KIND: &str = "revoked-family";
pub const CONTROL_KIND: &str = "principal-control";

/// Server-wide read-only mode.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ReadOnlyMode {
    pub on: bool,
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub since: i64,
}

/// Response controls of a principal that is not a local user (a client, an
/// external OIDC subject).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct PrincipalControl {
    #[serde(default)]
    pub locked: bool,
    #[serde(default)]
    pub read_only: bool,
    #[serde(default)]
    pub require_break_glass: bool,
    #[serde(default)]
    pub tokens_valid_after: i64,
}

/// One consistent view of the security state.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub epoch: i64,
    pub users: HashMap<String, Arc<User>>,
    pub revoked_families: HashSet<String>,
    pub read_only: ReadOnlyMode,
    /// Controls by principal subject (`client:…`, `oidc:…`).
    pub controls: HashMap<String, PrincipalControl>,
}

/// The cached security state.
pub struct SecurityState {
    vault: Vault,
    snapshot: RwLock<Arc<Snapshot>>,
    /// One reload at a time: requests that find the epoch moved wait for it.
    reloading: tokio::sync::Mutex<()>,
}

/// Bump the epoch inside a write job, so that every node reloads.
pub fn bump_epoch(tx: &mut dyn WriteTx) -> Result<(), AuthError> {
    tx.sys_put(EPOCH_KIND, EPOCH_KEY, b"", None)
        .map(|_| ())
        .map_err(backend)
}

impl SecurityState {
    pub async fn open(vault: Vault) -> Result<SecurityState, AuthError> {
        let s = SecurityState {
            vault,
            snapshot: RwLock::new(Arc::new(Snapshot {
                epoch: -1,
                ..Snapshot::default()
            })),
            reloading: tokio::sync::Mutex::new(()),
        };
        s.current().await?;
        Ok(s)
    }

    /// The state as of now: one point read of the epoch; a reload when it moved.
    pub async fn current(&self) -> Result<Arc<Snapshot>, AuthError> {
        let epoch = self
            .vault
            .store()
            .sys_version(EPOCH_KIND, EPOCH_KEY)
            .await
            .map_err(backend)?;
        let cached = self.snapshot.read().clone();
        if cached.epoch == epoch {
            return Ok(cached);
        }
        let _one = self.reloading.lock().await;
        let cached = self.snapshot.read().clone();
        if cached.epoch >= epoch {
            return Ok(cached);
        }
        self.reload(epoch).await
    }

    async fn reload(&self, epoch: i64) -> Result<Arc<Snapshot>, AuthError> {
        let users: Vec<(String, i64, User)> = self.vault.list(USER_KIND).await?;
        let families: Vec<(String, i64, bool)> = self.vault.list(FAMILY_KIND).await?;
        let controls: Vec<(String, i64, PrincipalControl)> = self.vault.list(CONTROL_KIND).await?;
        let read_only = self
            .vault
            .get::<ReadOnlyMode>(SETTING_KIND, READ_ONLY_KEY)
            .await?
            .map(|(_, m)| m)
            .unwrap_or_default();
        let snap = Arc::new(Snapshot {
            epoch,
            users: users
                .into_iter()
                .map(|(k, _, u)| (k, Arc::new(u)))
                .collect(),
            revoked_families: families.into_iter().map(|(k, _, _)| k).collect(),
            read_only,
            controls: controls.into_iter().map(|(k, _, c)| (k, c)).collect(),
        });
        let mut slot = self.snapshot.write();
        if slot.epoch < snap.epoch || slot.epoch == -1 {
            *slot = snap.clone();
        }
        Ok(snap)
    }
}
