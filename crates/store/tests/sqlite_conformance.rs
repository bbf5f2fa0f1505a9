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
/// Under a steady stream of small commits (as every audited read makes),
/// the WAL starts over from its beginning after background checkpoints,
/// far below the size limit, instead of growing until the limit forces a
/// truncation. The WAL header's checkpoint sequence number counts the
/// restarts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wal_starts_over_under_a_steady_stream_of_commits() {
    use custos_store::{Expect, IndexEntries, NewVersion, StoreExt};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db.sqlite");
    let store = Arc::new(SqliteStore::open(SqliteConfig::new(&path)).unwrap());
    let wal = dir.path().join("db.sqlite-wal");
    let restarts = || {
        let header = std::fs::read(&wal).unwrap_or_default();
        header
            .get(12..16)
            .map(|b| u32::from_be_bytes(b.try_into().unwrap()))
            .unwrap_or(0)
    };
    let mut first = None;
    let started = std::time::Instant::now();
    let mut n = 0;
    // Back to back for 1.5 s: about six background passes.
    while started.elapsed() < std::time::Duration::from_millis(1500) {
        store
            .write(move |tx| {
                let v = NewVersion {
                    rtype: "Binary".into(),
                    id: format!("b{n}"),
                    version: 1,
                    last_updated: 1,
                    deleted: false,
                    key_name: "shared".into(),
                    compartment: None,
                    body: vec![7u8; 2048],
                };
                tx.put(&v, &IndexEntries::default(), Expect::Absent)
            })
            .await
            .unwrap();
        first.get_or_insert_with(restarts);
        n += 1;
    }
    let (first, last) = (first.unwrap(), restarts());
    assert!(
        last >= first + 2,
        "the WAL started over {} times in {n} commits over 1.5 s",
        last - first
    );
    let count = store.read(|tx| tx.type_counts()).await.unwrap();
    assert_eq!(count, vec![("Binary".to_string(), n)]);
}

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
             DELETE FROM audit.audit_key_tail WHERE idx = 1; \
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

/// Events are found by patient and by agent across sealed blocks of the
/// keyed index and its tail, in order, with paging.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_lookups_span_sealed_blocks_and_the_tail() {
    use custos_store::{AuditAppend, AuditQuery, StoreExt};
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(SqliteConfig::new(dir.path().join("db.sqlite"))).unwrap();
    // Two and a half blocks of 8,192 events; event i concerns patient
    // p{i % 7} and, when i is even, agent a{i % 3}.
    const N: u64 = 20_500;
    for chunk in 0..(N / 500) {
        store
            .write(move |tx| {
                for i in chunk * 500..(chunk + 1) * 500 {
                    let patients = vec![format!("p{}", i % 7)];
                    let agent = (i % 2 == 0).then(|| format!("a{}", i % 3));
                    tx.audit_append(&AuditAppend {
                        at: i as i64,
                        action: "R",
                        outcome: 0,
                        agent: agent.as_deref(),
                        patients: &patients,
                        data: format!("e{i}").as_bytes(),
                    })?;
                }
                Ok(())
            })
            .await
            .unwrap();
    }
    let search = |q: AuditQuery| conformance::audit_indexes(&store, q);
    let all_p3 = search(AuditQuery {
        patient: Some("p3".into()),
        ascending: true,
        limit: usize::MAX >> 1,
        ..AuditQuery::default()
    })
    .await;
    assert_eq!(all_p3, (0..N).filter(|i| i % 7 == 3).collect::<Vec<_>>());
    let newest = search(AuditQuery {
        patient: Some("p3".into()),
        agent: Some("a1".into()),
        limit: 5,
        ..AuditQuery::default()
    })
    .await;
    let expected: Vec<u64> = (0..N)
        .rev()
        .filter(|i| i % 7 == 3 && i % 2 == 0 && i % 3 == 1)
        .take(5)
        .collect();
    assert_eq!(newest, expected);
    let page = search(AuditQuery {
        agent: Some("a2".into()),
        before: Some(9_000),
        after: Some(8_000),
        ascending: true,
        limit: usize::MAX >> 1,
        ..AuditQuery::default()
    })
    .await;
    assert_eq!(
        page,
        (8_001..9_000)
            .filter(|i| i % 2 == 0 && i % 3 == 2)
            .collect::<Vec<_>>()
    );
    // An agent's events in the sealed blocks (runs) and in the unsealed one
    // (read from the log's own rows), each once.
    let all_a0 = search(AuditQuery {
        agent: Some("a0".into()),
        ascending: true,
        limit: usize::MAX >> 1,
        ..AuditQuery::default()
    })
    .await;
    assert_eq!(
        all_a0,
        (0..N)
            .filter(|i| i % 2 == 0 && i % 3 == 0)
            .collect::<Vec<_>>()
    );
    assert!(
        search(AuditQuery {
            patient: Some("nobody".into()),
            limit: 10,
            ..AuditQuery::default()
        })
        .await
        .is_empty()
    );
    store.close();
}

/// Append audit events `lo..hi` through the store, event `i` with the agent
/// and patient tokens `tokens(i)`.
async fn append_keyed(
    store: &SqliteStore,
    lo: u64,
    hi: u64,
    tokens: fn(u64) -> (Option<&'static str>, Option<&'static str>),
) {
    use custos_store::{AuditAppend, StoreExt};
    store
        .write(move |tx| {
            for i in lo..hi {
                let (agent, patient) = tokens(i);
                let patients: Vec<String> = patient.into_iter().map(str::to_string).collect();
                tx.audit_append(&AuditAppend {
                    at: i as i64,
                    action: "R",
                    outcome: 0,
                    agent,
                    patients: &patients,
                    data: format!("e{i}").as_bytes(),
                })?;
            }
            Ok(())
        })
        .await
        .unwrap()
}

/// The indexes of every event with these tokens, ascending.
async fn keyed(store: &SqliteStore, patient: Option<&str>, agent: Option<&str>) -> Vec<u64> {
    let q = custos_store::AuditQuery {
        patient: patient.map(str::to_string),
        agent: agent.map(str::to_string),
        ascending: true,
        limit: usize::MAX >> 1,
        ..Default::default()
    };
    conformance::audit_indexes(store, q).await
}

/// Earlier versions also put an event's agent in the key tail. A data dir
/// left with such rows in its unsealed block: lookups find those events
/// once, and sealing the block moves them with the rest, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_rows_left_in_the_tail_by_an_earlier_version_are_found_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db.sqlite");
    let parity = |i: u64| (Some(if i.is_multiple_of(2) { "even" } else { "odd" }), None);
    let store = SqliteStore::open(SqliteConfig::new(&path)).unwrap();
    append_keyed(&store, 0, 8_000, parity).await;
    store.close();
    {
        // What the earlier version wrote besides: a tail row per agent.
        let c = rusqlite::Connection::open(custos_store::audit_path(&path)).unwrap();
        c.execute_batch(
            "INSERT INTO audit_key_tail (idx, kind, key) \
             SELECT idx, 1, agent FROM audit_log WHERE agent IS NOT NULL ORDER BY idx",
        )
        .unwrap();
    }
    let store = SqliteStore::open(SqliteConfig::new(&path)).unwrap();
    let evens = |n: u64| (0..n).filter(|i| i % 2 == 0).collect::<Vec<_>>();
    assert_eq!(keyed(&store, None, Some("even")).await, evens(8_000));
    // Across the block's end: the block seals with both kinds of rows.
    append_keyed(&store, 8_000, 8_300, parity).await;
    assert_eq!(keyed(&store, None, Some("even")).await, evens(8_300));
    store.close();
    let c = rusqlite::Connection::open(custos_store::audit_path(&path)).unwrap();
    let tail: i64 = c
        .query_row("SELECT COUNT(*) FROM audit_key_tail", [], |r| r.get(0))
        .unwrap();
    assert_eq!(tail, 0, "the sealed block's tail rows are gone");
    let posted: String = c
        .query_row(
            "SELECT offsets FROM audit_key_post WHERE kind = 1 AND key = 'even' AND block = 0",
            [],
            |r| r.get(0),
        )
        .unwrap();
    let listed: Vec<u64> = serde_json::from_str(&posted).unwrap();
    assert_eq!(
        listed,
        evens(8_192),
        "one posting, each event once, in order"
    );
}

/// A data dir from before the keyed index (patients in `audit_patient`,
/// agents by an index on the log) is moved over at open; lookups still work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_audit_file_with_the_old_patient_index_is_migrated() {
    use custos_store::AuditQuery;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db.sqlite");
    SqliteStore::open(SqliteConfig::new(&path)).unwrap().close();
    {
        let c = rusqlite::Connection::open(custos_store::audit_path(&path)).unwrap();
        c.execute_batch(
            "DROP TABLE audit_key_tail; DROP TABLE audit_key_run;
             CREATE TABLE audit_patient (patient TEXT NOT NULL, idx INTEGER NOT NULL,
                 PRIMARY KEY (patient, idx)) WITHOUT ROWID;
             CREATE INDEX audit_log_agent ON audit_log (agent, idx) WHERE agent IS NOT NULL;
             INSERT INTO audit_log (idx, at, action, outcome, agent, data) VALUES
                 (0, 1, 'R', 0, 'alice', X'00'), (1, 2, 'R', 0, 'bob', X'01'), (2, 3, 'R', 0, 'alice', X'02');
             INSERT INTO audit_patient VALUES ('p1', 0), ('p2', 1), ('p1', 2);",
        )
        .unwrap();
    }
    let store = SqliteStore::open(SqliteConfig::new(&path)).unwrap();
    let found = |patient: Option<&str>, agent: Option<&str>| {
        let q = AuditQuery {
            patient: patient.map(str::to_string),
            agent: agent.map(str::to_string),
            ascending: true,
            limit: 10,
            ..AuditQuery::default()
        };
        conformance::audit_indexes(&store, q)
    };
    assert_eq!(found(Some("p1"), None).await, vec![0, 2]);
    assert_eq!(found(None, Some("bob")).await, vec![1]);
    assert_eq!(found(Some("p1"), Some("alice")).await, vec![0, 2]);
    store.close();
    let c = rusqlite::Connection::open(custos_store::audit_path(&path)).unwrap();
    let old: i64 = c
        .query_row(
            "SELECT COUNT(*) FROM sqlite_master WHERE name IN ('audit_patient', 'audit_log_agent')",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(old, 0, "the old index is gone");
}

/// Earlier versions kept a row per event and token (`audit_key_run`), for
/// the unsealed block too after their own migration. Such rows become
/// postings at open; sealing that block later merges into them, each event
/// once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_event_key_rows_become_postings_and_merge_when_their_block_seals() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db.sqlite");
    let people = |i: u64| {
        if i == 1 {
            (Some("bob"), Some("p2"))
        } else {
            (Some("alice"), Some("p1"))
        }
    };
    let store = SqliteStore::open(SqliteConfig::new(&path)).unwrap();
    append_keyed(&store, 0, 3, people).await;
    store.close();
    {
        // As an earlier version left them: the tokens in per-event rows.
        let c = rusqlite::Connection::open(custos_store::audit_path(&path)).unwrap();
        c.execute_batch(
            "DELETE FROM audit_key_tail;
             INSERT INTO audit_key_run (kind, block, key, idx) VALUES
                 (0, 0, 'p1', 0), (0, 0, 'p2', 1), (0, 0, 'p1', 2),
                 (1, 0, 'alice', 0), (1, 0, 'bob', 1), (1, 0, 'alice', 2);",
        )
        .unwrap();
    }
    let store = SqliteStore::open(SqliteConfig::new(&path)).unwrap();
    assert_eq!(keyed(&store, Some("p1"), None).await, vec![0, 2]);
    assert_eq!(keyed(&store, None, Some("bob")).await, vec![1]);
    assert_eq!(keyed(&store, Some("p1"), Some("alice")).await, vec![0, 2]);
    append_keyed(&store, 3, 8_200, people).await;
    let p1: Vec<u64> = [0].into_iter().chain(2..8_200).collect();
    assert_eq!(keyed(&store, Some("p1"), None).await, p1);
    assert_eq!(keyed(&store, Some("p1"), Some("alice")).await, p1);
    assert_eq!(keyed(&store, Some("p2"), Some("bob")).await, vec![1]);
    store.close();
    let c = rusqlite::Connection::open(custos_store::audit_path(&path)).unwrap();
    let (run, posted): (i64, String) = c
        .query_row(
            "SELECT (SELECT COUNT(*) FROM audit_key_run), \
                    (SELECT offsets FROM audit_key_post WHERE kind = 0 AND key = 'p1' AND block = 0)",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(run, 0, "the per-event rows are gone");
    let listed: Vec<u64> = serde_json::from_str(&posted).unwrap();
    let expected: Vec<u64> = [0].into_iter().chain(2..8_192).collect();
    assert_eq!(
        listed, expected,
        "merged: each event of the block once, in order"
    );
}

/// The runtime (one worker, as instruction counts need a fixed shape), the
/// directory and the fresh store of a fixed workload.
fn workload_setup() -> (tokio::runtime::Runtime, tempfile::TempDir, SqliteStore) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(SqliteConfig::new(dir.path().join("db.sqlite"))).unwrap();
    (rt, dir, store)
}

/// A fixed workload of keyed appends (a patient's and an agent's token on
/// every event, 32 events a commit, two sealed blocks), ignored by default:
/// it is there to compare builds by instruction count, which a shared
/// machine's noise does not move (it checks one agent's lookup at the end):
/// `valgrind --tool=callgrind <test binary> --ignored --exact keyed_append_workload`.
#[test]
#[ignore]
fn keyed_append_workload() {
    use custos_store::{AuditAppend, StoreExt};
    let (rt, _dir, store) = workload_setup();
    let hex = |x: u64| format!("{:016x}{:016x}", x, x.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let patients: std::sync::Arc<Vec<String>> =
        std::sync::Arc::new((0..2_000u64).map(|p| hex(p + 1)).collect());
    let agents: std::sync::Arc<Vec<String>> =
        std::sync::Arc::new((0..50u64).map(|a| hex(a + 1_000_000)).collect());
    rt.block_on(async {
        for start in (0..16_384u64).step_by(32) {
            let (patients, agents) = (patients.clone(), agents.clone());
            store
                .write(move |tx| {
                    let leaf = vec![7u8; 550];
                    for i in start..start + 32 {
                        let p = (i.wrapping_mul(7919) % 2_000) as usize;
                        tx.audit_append(&AuditAppend {
                            at: i as i64,
                            action: "R",
                            outcome: 0,
                            agent: Some(&agents[(i % 50) as usize]),
                            patients: std::slice::from_ref(&patients[p]),
                            data: &leaf,
                        })?;
                    }
                    Ok(())
                })
                .await
                .unwrap();
        }
        // It also checks: an agent's events across both sealed blocks, once each.
        let first_agent: Vec<u64> = (0..16_384).filter(|i| i % 50 == 0).collect();
        assert_eq!(keyed(&store, None, Some(&agents[0])).await, first_agent);
    });
    store.close();
}

/// A fixed ingest-shaped workload (jobs of 64 resources, each with 14
/// random 16-byte tokens, 4 ranges, a 1 KB body), ignored by default: it is
/// there to compare builds by instruction count, as `keyed_append_workload`
/// does for audit appends (it checks one token's lookup at the end):
/// `valgrind --tool=callgrind <test binary> --ignored --exact ingest_write_workload`.
#[test]
#[ignore]
fn ingest_write_workload() {
    use custos_store::{
        Expect, Filter, IndexEntries, IndexQuery, NewVersion, RangeEntry, StoreExt,
    };
    let (rt, _dir, store) = workload_setup();
    // A fixed pseudo-random sequence (splitmix64), so every run is the same.
    let mix = |x: u64| {
        let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let token = move |x: u64| {
        let mut t = [0u8; 16];
        t[..8].copy_from_slice(&mix(x).to_le_bytes());
        t[8..].copy_from_slice(&mix(!x).to_le_bytes());
        t
    };
    rt.block_on(async {
        for job in 0..200u64 {
            store
                .write(move |tx| {
                    for r in job * 64..job * 64 + 64 {
                        let v = NewVersion {
                            rtype: "Observation".into(),
                            id: format!("{:032x}", mix(r) as u128 * 3),
                            version: 1,
                            last_updated: r as i64,
                            deleted: false,
                            key_name: format!("patient/{job}"),
                            compartment: Some(format!("{job}")),
                            body: vec![(r % 251) as u8; 1024],
                        };
                        let ix = IndexEntries {
                            tokens: (0..14).map(|k| token(r * 16 + k)).collect(),
                            ranges: (0..4)
                                .map(|k| RangeEntry {
                                    pkey: k,
                                    lo: (mix(r * 4 + k as u64) % 1_000_000) as f64,
                                    hi: (mix(r * 4 + k as u64) % 1_000_000) as f64 + 1.0,
                                    sortable: k == 0,
                                })
                                .collect(),
                        };
                        tx.put(&v, &ix, Expect::Absent)?;
                    }
                    Ok(())
                })
                .await
                .unwrap();
        }
        let q = IndexQuery {
            filters: vec![Filter::AnyToken(vec![token(100 * 16 + 3)])],
            ..IndexQuery::all("Observation", 10)
        };
        assert_eq!(store.read(move |tx| tx.search(&q)).await.unwrap().len(), 1);
    });
    store.close();
}
