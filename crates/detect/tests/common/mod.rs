//! What the pipeline's integration tests stand on: a record service on a
//! fresh SQLite store, its audit trail and the account service.
use std::sync::Arc;

use custos_audit::{AuditConfig, AuditTrail};
use custos_auth::{AuthConfig, AuthService};
use custos_crypto::{FileKekProvider, GcmSealer};
use custos_records::{Records, RecordsConfig};
use custos_store::{SqliteConfig, SqliteStore, Store, Synchronous};

pub struct World {
    pub records: Records,
    pub trail: AuditTrail,
    pub auth: Arc<AuthService>,
    // Declared last: removed after the store closes.
    _dir: tempfile::TempDir,
}

pub async fn world() -> World {
    let dir = tempfile::tempdir().unwrap();
    let kf = dir.path().join("keys.json");
    FileKekProvider::create(&kf).unwrap();
    let mut sc = SqliteConfig::new(dir.path().join("custos.db"));
    sc.synchronous = Synchronous::Normal;
    let store = Arc::new(SqliteStore::open(sc).unwrap());
    let records = Records::open(
        store as Arc<dyn Store>,
        Arc::new(FileKekProvider::open(&kf).unwrap()),
        Arc::new(GcmSealer),
        RecordsConfig::default(),
    )
    .await
    .unwrap();
    let trail = AuditTrail::open(&records, AuditConfig::default())
        .await
        .unwrap();
    let auth = Arc::new(
        AuthService::open(
            &records,
            AuthConfig::default(),
            "http://custos.test",
            trail.clone(),
        )
        .await
        .unwrap(),
    );
    World {
        records,
        trail,
        auth,
        _dir: dir,
    }
}
