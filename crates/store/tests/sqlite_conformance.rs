//! The SQLite backend against the storage conformance suite.
use std::sync::Arc;

use custos_store::{SqliteConfig, SqliteStore, Store, conformance};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_passes_the_conformance_suite() {
    let dir = tempfile::tempdir().unwrap();
    let counter = std::sync::atomic::AtomicUsize::new(0);
    conformance::run_all(|| {
        let n = counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let path = dir.path().join(format!("db{n}.sqlite"));
        async move { Arc::new(SqliteStore::open(SqliteConfig::new(path)).unwrap()) as Arc<dyn Store> }
    })
    .await;
}
