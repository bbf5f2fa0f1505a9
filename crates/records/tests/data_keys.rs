//! A data key created by a write that rolled back must not be used by a
//! later write: the database never held it, so whatever it sealed would be
//! lost at the next restart (and unreadable on any other node).
use std::sync::Arc;

use custos_crypto::{FileKekProvider, GcmSealer, Sealer};
use custos_records::{Records, RecordsConfig};
use custos_store::{SqliteConfig, SqliteStore, Store, StoreError, StoreExt};

async fn records(dir: &std::path::Path, store: Arc<dyn Store>) -> Records {
    let provider = Arc::new(FileKekProvider::open(&dir.join("keys.json")).unwrap());
    Records::open(
        store,
        provider,
        Arc::new(GcmSealer),
        RecordsConfig::default(),
    )
    .await
    .map_err(|e| e.message)
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolled_back_key_is_never_reused() {
    let dir = tempfile::tempdir().unwrap();
    FileKekProvider::create(&dir.path().join("keys.json")).unwrap();
    let store: Arc<dyn Store> =
        Arc::new(SqliteStore::open(SqliteConfig::new(dir.path().join("custos.db"))).unwrap());
    let r = records(dir.path(), store.clone()).await;
    const NAME: &str = "patient/rolled-back";

    // A write creates the key, then fails: the transaction rolls back.
    let r1 = r.clone();
    let failed = store
        .write(move |tx| {
            r1.keys()
                .key_for_write(tx, NAME)
                .map_err(|e| StoreError::Backend(e.message))?;
            Err::<(), _>(StoreError::Backend("the write failed after its key".into()))
        })
        .await;
    assert!(failed.is_err());
    assert!(store.read(|tx| tx.data_key(NAME)).await.unwrap().is_none());

    // The next write must store the key it seals with.
    let r2 = r.clone();
    let sealed = store
        .write(move |tx| {
            let key = r2
                .keys()
                .key_for_write(tx, NAME)
                .map_err(|e| StoreError::Backend(e.message))?;
            Ok(GcmSealer.seal(&key, b"aad", b"a record"))
        })
        .await
        .unwrap();
    assert!(
        store.read(|tx| tx.data_key(NAME)).await.unwrap().is_some(),
        "the key that sealed a committed record is not in the database"
    );

    // A fresh process (empty cache) opens what was sealed.
    let fresh = records(dir.path(), store.clone()).await;
    let key = store
        .read(move |tx| {
            fresh
                .keys()
                .key_for_read(tx, NAME)
                .map_err(|e| StoreError::Backend(e.message))
        })
        .await
        .unwrap()
        .expect("the key exists");
    assert_eq!(GcmSealer.open(&key, b"aad", &sealed).unwrap(), b"a record");
}
