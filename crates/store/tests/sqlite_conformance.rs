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

/// Under a sustained write load the WAL stays near its limit instead of
/// growing without bound (PASSIVE checkpoints alone never let it restart).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_stays_bounded_under_sustained_writes() {
    use custos_store::{Expect, IndexEntries, NewVersion, StoreExt};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db.sqlite");
    let mut config = SqliteConfig::new(&path);
    config.wal_limit_bytes = 1024 * 1024;
    let store = Arc::new(SqliteStore::open(config).unwrap());
    let wal = dir.path().join("db.sqlite-wal");
    let mut peak = 0;
    // About 48 MiB of versions, written back to back.
    for batch in 0..192 {
        store
            .write(move |tx| {
                for i in 0..64 {
                    let v = NewVersion {
                        rtype: "Binary".into(),
                        id: format!("b{batch}-{i}"),
                        version: 1,
                        last_updated: 1,
                        deleted: false,
                        key_name: "shared".into(),
                        compartment: None,
                        body: vec![7u8; 4096],
                    };
                    tx.put(&v, &IndexEntries::default(), Expect::Absent)?;
                }
                Ok(())
            })
            .await
            .unwrap();
        peak = peak.max(std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0));
    }
    assert!(
        peak < 12 * 1024 * 1024,
        "the WAL peaked at {peak} bytes with a 1 MiB limit"
    );
    let n = store.read(|tx| tx.type_counts()).await.unwrap();
    assert_eq!(n, vec![("Binary".to_string(), 192 * 64)]);
}

/// Two stores on one database (two processes, as `custos serve` and
/// `custos user lock` are): a system-record change made through one is seen
/// by the other's very next version probe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn system_record_changes_are_seen_across_processes() {
    use custos_store::StoreExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db.sqlite");
    let a = Arc::new(SqliteStore::open(SqliteConfig::new(&path)).unwrap());
    let b = Arc::new(SqliteStore::open(SqliteConfig::new(&path)).unwrap());
    assert_eq!(a.sys_version("security", "epoch").await.unwrap(), 0);
    for want in 1..=3 {
        b.write(|tx| tx.sys_put("security", "epoch", b"", None))
            .await
            .unwrap();
        assert_eq!(a.sys_version("security", "epoch").await.unwrap(), want);
    }
    // A failed job changes nothing and need not be seen.
    let _ = b
        .write(|tx| {
            tx.sys_put("security", "epoch", b"", None)?;
            Err::<(), _>(custos_store::StoreError::Backend("abandoned".into()))
        })
        .await;
    assert_eq!(a.sys_version("security", "epoch").await.unwrap(), 3);
    a.close();
    b.close();
}

/// A write's audit event reaches the audit file even when a crash came
/// between the two files' commits: the outbox copy, committed with the
/// change, is appended again at the next open — once, never twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_events_of_committed_writes_survive_a_crash_between_the_files() {
    use custos_store::{AuditAppend, StoreExt};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db.sqlite");
    let append = |data: &'static [u8], with_change: bool| {
        move |tx: &mut dyn custos_store::WriteTx| {
            if with_change {
                tx.sys_put("test", std::str::from_utf8(data).unwrap(), b"v", None)?;
            }
            tx.audit_append(&AuditAppend {
                at: 1,
                action: "C",
                outcome: 0,
                agent: Some("agent"),
                patients: &["p1".to_string()],
                data,
            })
        }
    };
    {
        let store = SqliteStore::open(SqliteConfig::new(&path)).unwrap();
        // A read's event: the main file is not touched at all.
        assert_eq!(store.write(append(b"read", false)).await.unwrap(), 0);
        // A write's event: its outbox copy commits with the change.
        assert_eq!(store.write(append(b"write", true)).await.unwrap(), 1);
        store.close();
    }
    // Simulate the crash: the main file committed (change + outbox row), the
    // audit file did not. Put the outbox row back and drop the event from
    // the audit file, as a crash between the two commits leaves them.
    {
        let c = rusqlite::Connection::open(&path).unwrap();
        c.execute(
            "ATTACH DATABASE ?1 AS audit",
            [custos_store::audit_path(&path).to_string_lossy().as_ref()],
        )
        .unwrap();
        c.execute_batch(
            "INSERT INTO audit_outbox (idx, at, action, outcome, agent, patients, data) \
                 VALUES (1, 1, 'C', 0, 'agent', 'p1', X'7772697465'); \
             DELETE FROM audit.audit_log WHERE idx = 1; \
             DELETE FROM audit.audit_patient WHERE idx = 1; \
             DELETE FROM audit.audit_hash WHERE n >= 1;",
        )
        .unwrap();
    }
    let store = SqliteStore::open(SqliteConfig::new(&path)).unwrap();
    let entries = store.read(|tx| tx.audit_entries(0, 10, 10)).await.unwrap();
    assert_eq!(
        entries.iter().map(|e| e.data.clone()).collect::<Vec<_>>(),
        vec![b"read".to_vec(), b"write".to_vec()],
        "the write's event is back, in order"
    );
    store.close();
    // Reopening again appends nothing more (the outbox is empty, and an
    // outbox row whose event is present is not appended twice).
    {
        let c = rusqlite::Connection::open(&path).unwrap();
        c.execute_batch(
            "INSERT INTO audit_outbox (idx, at, action, outcome, agent, patients, data) \
                 VALUES (1, 1, 'C', 0, 'agent', 'p1', X'7772697465');",
        )
        .unwrap();
    }
    let store = SqliteStore::open(SqliteConfig::new(&path)).unwrap();
    let size = store.read(|tx| tx.audit_size()).await.unwrap();
    assert_eq!(size, 2, "no duplicate");
    let outbox: i64 = rusqlite::Connection::open(&path)
        .unwrap()
        .query_row("SELECT COUNT(*) FROM audit_outbox", [], |r| r.get(0))
        .unwrap();
    assert_eq!(outbox, 0, "the outbox is emptied once its events are in");
    store.close();
}
