//! The PostgreSQL backend against the storage conformance suite, on the
//! database named by `CUSTOS_TEST_POSTGRES_URL` (CI sets it; without it the
//! tests print why they skip). Each store gets a schema of its own, dropped
//! at the end.
use std::sync::Arc;

use custos_store::{PostgresConfig, PostgresStore, Store, StoreExt, conformance};

fn database() -> Option<String> {
    match std::env::var("CUSTOS_TEST_POSTGRES_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            eprintln!("skipped: CUSTOS_TEST_POSTGRES_URL is not set");
            None
        }
    }
}

fn schema(tag: &str) -> String {
    format!(
        "custos_test_{tag}_{}_{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos()
    )
}

async fn open(url: &str, schema: &str) -> Arc<PostgresStore> {
    let mut c = PostgresConfig::new(url);
    c.schema = Some(schema.to_string());
    c.pool_size = 4;
    Arc::new(
        tokio::task::spawn_blocking(move || PostgresStore::open(c))
            .await
            .unwrap()
            .expect("the test database opens"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_passes_the_conformance_suite() {
    let Some(url) = database() else { return };
    let prefix = schema("conf");
    let counter = std::sync::atomic::AtomicUsize::new(0);
    let made = parking_lot::Mutex::new(Vec::new());
    conformance::run_all(|| {
        let n = counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let name = format!("{prefix}_{n}");
        made.lock().push(name.clone());
        let url = url.clone();
        async move { open(&url, &name).await as Arc<dyn Store> }
    })
    .await;
    let made = made.lock().clone();
    for s in made {
        PostgresStore::drop_schema(&url, &s).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_are_versioned_and_reapplying_is_a_no_op() {
    let Some(url) = database() else { return };
    let name = schema("migr");
    let first = open(&url, &name).await;
    let applied = first.migrations().await.unwrap();
    assert_eq!(
        applied.iter().map(|m| m.0).collect::<Vec<_>>(),
        custos_store::MIGRATIONS
            .iter()
            .map(|m| m.version)
            .collect::<Vec<_>>()
    );
    first
        .write(|tx| tx.sys_put("k", "a", b"1", Some(0)))
        .await
        .unwrap();
    // A second node opening the same schema applies nothing and sees the data.
    let second = open(&url, &name).await;
    assert_eq!(second.migrations().await.unwrap(), applied);
    let got = second.read(|tx| tx.sys_get("k", "a")).await.unwrap();
    assert_eq!(got.map(|r| r.value), Some(b"1".to_vec()));
    first.close();
    second.close();
    PostgresStore::drop_schema(&url, &name).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_from_a_newer_custos_is_refused() {
    let Some(url) = database() else { return };
    let name = schema("newer");
    let store = open(&url, &name).await;
    store.close();
    drop(store);
    let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    c.batch_execute(&format!(
        "INSERT INTO {name}.custos_migrations (version, name) VALUES (9999, 'from the future')"
    ))
    .await
    .unwrap();
    let mut config = PostgresConfig::new(&url);
    config.schema = Some(name.clone());
    let err = tokio::task::spawn_blocking(move || PostgresStore::open(config).err())
        .await
        .unwrap()
        .expect("refused");
    assert!(err.to_string().contains("newer than this Custos"), "{err}");
    PostgresStore::drop_schema(&url, &name).await.unwrap();
}

/// Two nodes on one database: writes interleave into one audit log with
/// dense indexes, and optimistic locking holds across them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_share_one_gapless_audit_log_and_locking() {
    use custos_store::{AuditAppend, Expect, IndexEntries, NewVersion, StoreError};
    let Some(url) = database() else { return };
    let name = schema("nodes");
    let a = open(&url, &name).await;
    let b = open(&url, &name).await;
    let mut tasks = Vec::new();
    for (n, node) in [a.clone(), b.clone()].into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            for i in 0..100 {
                node.write(move |tx| {
                    let data = format!("node{n}-{i}").into_bytes();
                    tx.audit_append(&AuditAppend {
                        at: i,
                        action: "R",
                        outcome: 0,
                        agent: None,
                        patients: &[],
                        data: &data,
                    })
                })
                .await
                .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let (size, entries) = a
        .read(|tx| Ok((tx.audit_size()?, tx.audit_entries(0, 1000, 1000)?)))
        .await
        .unwrap();
    assert_eq!(size, 200);
    assert_eq!(
        entries.iter().map(|e| e.index).collect::<Vec<_>>(),
        (0..200).collect::<Vec<_>>()
    );
    // The root both nodes compute is the root of those leaves in that order.
    let leaves: Vec<Vec<u8>> = entries.iter().map(|e| e.data.clone()).collect();
    let root_a = a
        .read(|tx| custos_store::audit_root(tx, 200))
        .await
        .unwrap();
    let root_b = b
        .read(|tx| custos_store::audit_root(tx, 200))
        .await
        .unwrap();
    assert_eq!(root_a, root_b);
    assert_eq!(root_a, reference_root(&leaves));

    let v = |version: i64| NewVersion {
        rtype: "Patient".into(),
        id: "p1".into(),
        version,
        last_updated: version,
        deleted: false,
        key_name: "patient/p1".into(),
        compartment: Some("p1".into()),
        body: vec![version as u8],
    };
    let v1 = v(1);
    a.write(move |tx| tx.put(&v1, &IndexEntries::default(), Expect::Absent))
        .await
        .unwrap();
    let v2 = v(2);
    b.write(move |tx| tx.put(&v2, &IndexEntries::default(), Expect::Version(1)))
        .await
        .unwrap();
    let stale = v(2);
    let err = a
        .write(move |tx| tx.put(&stale, &IndexEntries::default(), Expect::Version(1)))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict { .. }), "{err}");
    a.close();
    b.close();
    PostgresStore::drop_schema(&url, &name).await.unwrap();
}

/// Only one node holds a role; when its lease is dropped another wins it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leadership_is_exclusive_and_passes_on() {
    let Some(url) = database() else { return };
    let name = schema("lead");
    let a = open(&url, &name).await;
    let b = open(&url, &name).await;
    let lease = a.campaign("audit-leader").await.unwrap().expect("a wins");
    assert!(lease.held());
    assert!(b.campaign("audit-leader").await.unwrap().is_none());
    // Another role is independent.
    assert!(b.campaign("other").await.unwrap().is_some());
    drop(lease);
    let mut won = None;
    for _ in 0..50 {
        if let Some(l) = b.campaign("audit-leader").await.unwrap() {
            won = Some(l);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(won.expect("b takes over").held());
    assert!(a.stats().pool_max.is_some());
    a.close();
    b.close();
    PostgresStore::drop_schema(&url, &name).await.unwrap();
}

/// RFC 6962 root, computed directly (independent of the store's hashes).
fn reference_root(leaves: &[Vec<u8>]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    fn mth(leaves: &[Vec<u8>]) -> [u8; 32] {
        match leaves.len() {
            0 => Sha256::digest([]).into(),
            1 => {
                let mut h = Sha256::new();
                h.update([0u8]);
                h.update(&leaves[0]);
                h.finalize().into()
            }
            n => {
                let k = n.next_power_of_two() / 2;
                let (l, r) = (mth(&leaves[..k]), mth(&leaves[k..]));
                let mut h = Sha256::new();
                h.update([1u8]);
                h.update(l);
                h.update(r);
                h.finalize().into()
            }
        }
    }
    mth(leaves)
}
