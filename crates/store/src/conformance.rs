//! The storage contract, as executable checks.
//!
//! Every backend runs [`run_all`] from its tests (SQLite always; PostgreSQL
//! when a database is configured). Each check starts from an empty store and
//! panics with a description when the backend breaks the contract.
use std::sync::Arc;

use crate::model::*;
use crate::{Store, StoreExt};

fn tok(s: &str) -> Token {
    let mut t = [0u8; 16];
    for (i, b) in s.bytes().enumerate().take(16) {
        t[i] = b;
    }
    t
}

fn version(rtype: &str, id: &str, v: i64, at: i64) -> NewVersion {
    NewVersion {
        rtype: rtype.into(),
        id: id.into(),
        version: v,
        last_updated: at,
        deleted: false,
        key_name: format!("patient/{id}"),
        compartment: Some(id.into()),
        body: format!("sealed:{rtype}/{id}/{v}").into_bytes(),
    }
}

fn index(tokens: &[&str], ranges: &[(i64, f64, f64)]) -> IndexEntries {
    IndexEntries {
        tokens: tokens.iter().map(|t| tok(t)).collect(),
        ranges: ranges
            .iter()
            .map(|&(pkey, lo, hi)| RangeEntry {
                pkey,
                lo,
                hi,
                sortable: true,
            })
            .collect(),
    }
}

async fn put(
    store: &Arc<dyn Store>,
    v: NewVersion,
    ix: IndexEntries,
    expect: Expect,
) -> StoreResult<()> {
    store.write(move |tx| tx.put(&v, &ix, expect)).await
}

/// Assert which of the Patients `(id, present)` exist.
async fn assert_patients(store: &Arc<dyn Store>, expected: &[(&'static str, bool)]) {
    for &(id, present) in expected {
        let found = store
            .read(move |tx| tx.current("Patient", id))
            .await
            .unwrap()
            .is_some();
        assert_eq!(found, present, "Patient/{id}");
    }
}

/// Run every check against stores made by `fresh` (each check gets a new, empty store).
pub async fn run_all<F, Fut>(fresh: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Arc<dyn Store>>,
{
    versions_and_locking(fresh().await).await;
    token_and_range_search(fresh().await).await;
    ordering_and_keyset_paging(fresh().await).await;
    history_scopes(fresh().await).await;
    deletion_drops_index(fresh().await).await;
    failed_job_rolls_back(fresh().await).await;
    failing_jobs_in_one_group(fresh().await).await;
    submitted_writes_call_back_after_commit(fresh().await).await;
    data_keys_and_erasure(fresh().await).await;
    concurrent_writers_conflict(fresh().await).await;
    system_records_and_logs(fresh().await).await;
    audit_log_appends_and_hashes(fresh().await).await;
}

/// RFC 6962 root of leaves `data[..n]`, computed independently of the store
/// (the recursive definition of RFC 9162 §2.1.1).
fn reference_root(leaves: &[[u8; 32]]) -> [u8; 32] {
    fn sha(parts: &[&[u8]]) -> [u8; 32] {
        use tlog_tiles::Hash;
        // tlog_tiles' node hash is SHA-256(0x01 ‖ l ‖ r).
        let (l, r) = (parts[0], parts[1]);
        tlog_tiles::node_hash(
            Hash(l.try_into().expect("32 bytes")),
            Hash(r.try_into().expect("32 bytes")),
        )
        .0
    }
    match leaves.len() {
        0 => tlog_tiles::EMPTY_HASH.0,
        1 => leaves[0],
        n => {
            let k = n.next_power_of_two() / 2;
            let (l, r) = (reference_root(&leaves[..k]), reference_root(&leaves[k..]));
            sha(&[&l, &r])
        }
    }
}

/// The audit log: indexes from 0 in append order, its stored hashes give the
/// RFC 6962 root of every prefix, a failed job leaves no entry or hash
/// behind, and searches filter by patient, agent, action, outcome and time.
/// The leaf indexes an audit search finds, in its order (panics on a store error).
pub async fn audit_indexes<S: Store + ?Sized>(store: &S, q: AuditQuery) -> Vec<u64> {
    store
        .read(move |tx| tx.audit_search(&q))
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.index)
        .collect()
}

pub async fn audit_log_appends_and_hashes(store: Arc<dyn Store>) {
    assert_eq!(store.read(|tx| tx.audit_size()).await.unwrap(), 0);
    let mut leaves = Vec::new();
    for i in 0..37u64 {
        let data = format!("entry {i}").into_bytes();
        leaves.push(tlog_tiles::record_hash(&data).0);
        let patients = if i % 3 == 0 {
            vec!["p-a".to_string()]
        } else {
            vec!["p-b".to_string(), "p-c".to_string()]
        };
        let idx = store
            .write(move |tx| {
                tx.audit_append(&AuditAppend {
                    at: 1_000 + i as i64,
                    action: if i % 2 == 0 { "R" } else { "C" },
                    outcome: if i == 5 { 4 } else { 0 },
                    agent: Some(if i < 10 { "agent-1" } else { "agent-2" }),
                    patients: &patients,
                    data: &data,
                })
            })
            .await
            .unwrap();
        assert_eq!(idx, i, "entries take consecutive indexes from 0");
        // A failed job appends nothing.
        let failed = store
            .write(|tx| {
                tx.audit_append(&AuditAppend {
                    at: 0,
                    action: "R",
                    outcome: 0,
                    agent: None,
                    patients: &[],
                    data: b"rolled back",
                })?;
                Err::<(), _>(StoreError::Backend("fail on purpose".into()))
            })
            .await;
        assert!(failed.is_err());
    }
    for size in [0u64, 1, 2, 3, 7, 8, 16, 31, 37] {
        let root = store.read(move |tx| audit_root(tx, size)).await.unwrap();
        assert_eq!(
            root,
            reference_root(&leaves[..size as usize]),
            "the stored hashes give the RFC 6962 root of the first {size} entries"
        );
    }
    let size = store.read(|tx| tx.audit_size()).await.unwrap();
    assert_eq!(size, 37);
    let entries = store.read(|tx| tx.audit_entries(10, 20, 5)).await.unwrap();
    assert_eq!(
        entries.iter().map(|e| e.index).collect::<Vec<_>>(),
        vec![10, 11, 12, 13, 14]
    );
    assert_eq!(entries[0].data, b"entry 10");
    assert!(
        store
            .read(|tx| tx.audit_hashes(&[1_000_000]))
            .await
            .is_err(),
        "a missing hash is an error"
    );
    let range = store.read(|tx| tx.audit_hash_range(3, 9)).await.unwrap();
    let pointwise = store
        .read(|tx| tx.audit_hashes(&[3, 4, 5, 6, 7, 8]))
        .await
        .unwrap();
    assert_eq!(
        range,
        (3..9).zip(pointwise).collect::<Vec<_>>(),
        "a range of stored hashes equals the hashes read one by one"
    );
    let search = |q: AuditQuery| {
        let store = store.clone();
        async move { audit_indexes(&*store, q).await }
    };
    let by_patient = search(AuditQuery {
        patient: Some("p-a".into()),
        limit: 100,
        ..Default::default()
    })
    .await;
    assert_eq!(
        by_patient,
        (0..37).filter(|i| i % 3 == 0).rev().collect::<Vec<_>>()
    );
    let first_page = search(AuditQuery {
        patient: Some("p-a".into()),
        ascending: true,
        limit: 3,
        ..Default::default()
    })
    .await;
    assert_eq!(first_page, vec![0, 3, 6]);
    let next_page = search(AuditQuery {
        patient: Some("p-a".into()),
        ascending: true,
        after: Some(6),
        limit: 3,
        ..Default::default()
    })
    .await;
    assert_eq!(next_page, vec![9, 12, 15]);
    let combined = search(AuditQuery {
        agent: Some("agent-1".into()),
        action: Some("C".into()),
        from: Some(1_003),
        until: Some(1_009),
        limit: 100,
        ..Default::default()
    })
    .await;
    assert_eq!(combined, vec![7, 5, 3]);
    let failures = search(AuditQuery {
        outcome: Some(4),
        limit: 100,
        ..Default::default()
    })
    .await;
    assert_eq!(failures, vec![5]);
    let before = search(AuditQuery {
        before: Some(3),
        limit: 100,
        ..Default::default()
    })
    .await;
    assert_eq!(before, vec![2, 1, 0]);
}

/// System records lock optimistically; logs append in order.
pub async fn system_records_and_logs(store: Arc<dyn Store>) {
    let v = store
        .write(|tx| tx.sys_put("user", "u1", b"one", Some(0)))
        .await
        .unwrap();
    assert_eq!(v, 1);
    let again = store
        .write(|tx| tx.sys_put("user", "u1", b"dup", Some(0)))
        .await;
    assert!(
        matches!(again, Err(StoreError::Conflict { .. })),
        "create twice"
    );
    let stale = store
        .write(|tx| tx.sys_put("user", "u1", b"x", Some(5)))
        .await;
    assert!(
        matches!(stale, Err(StoreError::Conflict { .. })),
        "stale version"
    );
    assert_eq!(
        store
            .write(|tx| tx.sys_put("user", "u1", b"two", Some(1)))
            .await
            .unwrap(),
        2
    );
    store
        .write(|tx| tx.sys_put("user", "u0", b"zero", None))
        .await
        .unwrap();
    store
        .write(|tx| tx.sys_put("client", "c", b"c", None))
        .await
        .unwrap();
    assert_eq!(store.sys_version("user", "u1").await.unwrap(), 2);
    assert_eq!(store.sys_version("user", "nobody").await.unwrap(), 0);
    store
        .write(|tx| tx.sys_put("user", "u1", b"three", None))
        .await
        .unwrap();
    assert_eq!(
        store.sys_version("user", "u1").await.unwrap(),
        3,
        "a change is seen by the very next version probe"
    );
    let got = store
        .read(|tx| tx.sys_get("user", "u1"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((got.version, got.value.as_slice()), (3, &b"three"[..]));
    let all = store.read(|tx| tx.sys_list("user")).await.unwrap();
    assert_eq!(
        all.iter().map(|r| r.key.as_str()).collect::<Vec<_>>(),
        vec!["u0", "u1"]
    );
    assert!(store.write(|tx| tx.sys_delete("user", "u0")).await.unwrap());
    assert!(!store.write(|tx| tx.sys_delete("user", "u0")).await.unwrap());
    assert!(
        store
            .read(|tx| tx.sys_get("user", "u0"))
            .await
            .unwrap()
            .is_none()
    );
    // Logs.
    let mut seqs = Vec::new();
    for i in 0..5 {
        let log = if i % 2 == 0 { "access" } else { "other" };
        seqs.push(
            store
                .write(move |tx| tx.log_append(log, 100 + i, format!("e{i}").as_bytes()))
                .await
                .unwrap(),
        );
    }
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "sequence grows");
    let access = store.read(|tx| tx.log_read("access", 0, 10)).await.unwrap();
    assert_eq!(
        access
            .iter()
            .map(|e| e.value.as_slice())
            .collect::<Vec<_>>(),
        vec![&b"e0"[..], b"e2", b"e4"]
    );
    let after = access[0].seq;
    let rest = store
        .read(move |tx| tx.log_read("access", after, 1))
        .await
        .unwrap();
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0].at, 102);
}

/// Versions are kept; `Expect` enforces optimistic locking.
pub async fn versions_and_locking(store: Arc<dyn Store>) {
    put(
        &store,
        version("Patient", "a", 1, 100),
        index(&["x"], &[]),
        Expect::Absent,
    )
    .await
    .unwrap();
    let dup = put(
        &store,
        version("Patient", "a", 1, 100),
        index(&[], &[]),
        Expect::Absent,
    )
    .await;
    assert!(
        matches!(dup, Err(StoreError::Conflict { .. })),
        "create over a live resource must conflict"
    );
    put(
        &store,
        version("Patient", "a", 2, 200),
        index(&["y"], &[]),
        Expect::Version(1),
    )
    .await
    .unwrap();
    let stale = put(
        &store,
        version("Patient", "a", 3, 300),
        index(&[], &[]),
        Expect::Version(1),
    )
    .await;
    assert!(
        matches!(stale, Err(StoreError::Conflict { .. })),
        "stale version must conflict"
    );
    let cur = store
        .read(|tx| tx.current("Patient", "a"))
        .await
        .unwrap()
        .expect("current exists");
    assert_eq!(
        (cur.version, cur.last_updated, cur.state),
        (2, 200, RecordState::Live)
    );
    assert_eq!(cur.body, b"sealed:Patient/a/2");
    let v1 = store
        .read(|tx| tx.version("Patient", "a", 1))
        .await
        .unwrap()
        .expect("v1 kept");
    assert_eq!(v1.body, b"sealed:Patient/a/1");
    assert!(
        store
            .read(|tx| tx.version("Patient", "a", 9))
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        store
            .read(|tx| tx.current("Patient", "zz"))
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        store
            .read(|tx| tx.current("Observation", "a"))
            .await
            .unwrap()
            .is_none(),
        "ids are per type"
    );
    // The index follows the current version only.
    let q = |t: &str| IndexQuery {
        filters: vec![Filter::AnyToken(vec![tok(t)])],
        ..IndexQuery::all("Patient", 10)
    };
    let (qx, qy) = (q("x"), q("y"));
    assert_eq!(store.read(move |tx| tx.search(&qx)).await.unwrap().len(), 0);
    assert_eq!(store.read(move |tx| tx.search(&qy)).await.unwrap().len(), 1);
}

/// Token, range, id, last-updated and compartment filters, AND-ed; counts with a cap.
pub async fn token_and_range_search(store: Arc<dyn Store>) {
    for i in 0..20i64 {
        let id = format!("r{i:02}");
        let tokens: Vec<String> = vec![
            if i % 2 == 0 {
                "even".into()
            } else {
                "odd".into()
            },
            format!("n{i}"),
        ];
        let trefs: Vec<&str> = tokens.iter().map(|s| s.as_str()).collect();
        put(
            &store,
            version("Observation", &id, 1, 1000 + i),
            index(&trefs, &[(7, i as f64 * 10.0, i as f64 * 10.0 + 5.0)]),
            Expect::Absent,
        )
        .await
        .unwrap();
    }
    let run = |filters: Vec<Filter>| {
        let store = store.clone();
        async move {
            let q = IndexQuery {
                filters,
                ..IndexQuery::all("Observation", 100)
            };
            let q2 = q.clone();
            let rows = store.read(move |tx| tx.search(&q)).await.unwrap();
            let n = store.read(move |tx| tx.count(&q2, 1000)).await.unwrap();
            assert_eq!(rows.len() as u64, n, "count agrees with search");
            rows.into_iter().map(|r| r.id).collect::<Vec<_>>()
        }
    };
    // One token, paged forwards and backwards (the index-only fast path).
    let even = |after: Option<Keyset>, backwards: bool, limit: usize| {
        let store = store.clone();
        async move {
            let q = IndexQuery {
                filters: vec![Filter::AnyToken(vec![tok("even")])],
                after,
                backwards,
                limit,
                ..IndexQuery::all("Observation", limit)
            };
            store.read(move |tx| tx.search(&q)).await.unwrap()
        }
    };
    let first = even(None, false, 3).await;
    assert_eq!(
        first.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
        vec!["r00", "r02", "r04"]
    );
    let k = Keyset {
        sort_key: first[2].sort_key.unwrap(),
        rid: first[2].rid,
    };
    let second = even(Some(k), false, 3).await;
    assert_eq!(
        second.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
        vec!["r06", "r08", "r10"]
    );
    let k = Keyset {
        sort_key: second[0].sort_key.unwrap(),
        rid: second[0].rid,
    };
    let back = even(Some(k), true, 2).await;
    assert_eq!(
        back.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
        vec!["r02", "r04"]
    );
    assert_eq!(
        run(vec![Filter::AnyToken(vec![tok("even")])]).await.len(),
        10
    );
    assert_eq!(
        run(vec![Filter::AnyToken(vec![tok("n3"), tok("n4")])]).await,
        vec!["r03", "r04"]
    );
    assert_eq!(
        run(vec![
            Filter::AnyToken(vec![tok("even")]),
            Filter::AnyToken(vec![tok("n3")])
        ])
        .await
        .len(),
        0
    );
    assert_eq!(
        run(vec![Filter::NoToken(vec![tok("even")])]).await.len(),
        10
    );
    let ge_100 = RangeCond {
        lo_ge: Some(100.0),
        ..Default::default()
    };
    assert_eq!(
        run(vec![Filter::AnyRange {
            pkey: 7,
            any: vec![ge_100]
        }])
        .await
        .len(),
        10
    );
    assert_eq!(
        run(vec![Filter::AnyRange {
            pkey: 8,
            any: vec![ge_100]
        }])
        .await
        .len(),
        0,
        "pkeys are separate"
    );
    let lt_20_or_gt_180 = vec![
        RangeCond {
            lo_lt: Some(20.0),
            ..Default::default()
        },
        RangeCond {
            hi_gt: Some(190.0),
            ..Default::default()
        },
    ];
    assert_eq!(
        run(vec![Filter::AnyRange {
            pkey: 7,
            any: lt_20_or_gt_180
        }])
        .await,
        vec!["r00", "r01", "r19"]
    );
    let q = IndexQuery {
        filters: vec![Filter::AnyToken(vec![tok("n3"), tok("n4")])],
        ..IndexQuery::all("Observation", 100)
    };
    assert_eq!(
        store.read(move |tx| tx.search_ids(&q)).await.unwrap(),
        vec!["r03", "r04"],
        "ids-only search agrees"
    );
    assert_eq!(
        run(vec![Filter::Ids(vec!["r05".into(), "nope".into()])]).await,
        vec!["r05"]
    );
    let lu = RangeCond {
        lo_ge: Some(1010.0),
        hi_le: Some(1011.0),
        ..Default::default()
    };
    assert_eq!(
        run(vec![Filter::LastUpdated(vec![lu])]).await,
        vec!["r10", "r11"]
    );
    assert_eq!(
        run(vec![Filter::Compartment("r07".into())]).await,
        vec!["r07"]
    );
    assert_eq!(
        run(vec![Filter::Visible {
            patients: vec!["r03".into(), "r08".into(), "zz".into()],
            shared: false
        }])
        .await,
        vec!["r03", "r08"]
    );
    assert_eq!(
        run(vec![
            Filter::AnyToken(vec![tok("even")]),
            Filter::Visible {
                patients: vec!["r03".into(), "r08".into()],
                shared: true
            }
        ])
        .await,
        vec!["r08"]
    );
    assert!(
        run(vec![Filter::Visible {
            patients: vec![],
            shared: false
        }])
        .await
        .is_empty()
    );
    assert_eq!(
        run(vec![Filter::Hidden(
            (1..20).map(|i| format!("r{i:02}")).collect()
        )])
        .await,
        vec!["r00"]
    );
    assert_eq!(run(vec![Filter::Hidden(vec![])]).await.len(), 20);
    let odd: Vec<String> = (0..20)
        .filter(|i| i % 2 == 1)
        .map(|i| format!("r{i:02}"))
        .collect();
    for (filters, want) in [
        (vec![Filter::AnyToken(vec![tok("odd")])], odd),
        (
            vec![
                Filter::AnyToken(vec![tok("odd")]),
                Filter::Ids(vec!["r01".into(), "r03".into(), "r04".into()]),
            ],
            vec!["r01".to_string(), "r03".to_string()],
        ),
    ] {
        let q = IndexQuery {
            filters,
            ..IndexQuery::all("Observation", 100)
        };
        let mut got = store
            .read(move |tx| tx.compartments(&q, 100))
            .await
            .unwrap();
        got.sort();
        assert_eq!(got, want, "compartments of the matches");
    }
    let head = store
        .read(|tx| tx.head("Observation", "r05"))
        .await
        .unwrap()
        .expect("head");
    assert_eq!(
        (head.version, head.compartment.as_deref()),
        (1, Some("r05"))
    );
    let q = IndexQuery::all("Observation", 100);
    assert_eq!(
        store.read(move |tx| tx.count(&q, 5)).await.unwrap(),
        5,
        "count stops at the cap"
    );
    let counts = store.read(|tx| tx.type_counts()).await.unwrap();
    assert_eq!(counts, vec![("Observation".to_string(), 20)]);
}

/// Ordering by insertion, last update and range; keyset pages neither skip
/// nor repeat, even when rows are inserted between pages.
pub async fn ordering_and_keyset_paging(store: Arc<dyn Store>) {
    for i in 0..10i64 {
        let at = 5000 - i * 10;
        let ranges = if i == 4 {
            vec![]
        } else {
            vec![(3, (i % 5) as f64, (i % 5) as f64 + 0.5)]
        };
        let r: Vec<(i64, f64, f64)> = ranges;
        put(
            &store,
            version("Encounter", &format!("e{i}"), 1, at),
            index(&[], &r),
            Expect::Absent,
        )
        .await
        .unwrap();
    }
    let page =
        |order: Order, descending: bool, after: Option<Keyset>, backwards: bool, limit: usize| {
            let store = store.clone();
            async move {
                let q = IndexQuery {
                    order,
                    descending,
                    after,
                    backwards,
                    limit,
                    ..IndexQuery::all("Encounter", limit)
                };
                store.read(move |tx| tx.search(&q)).await.unwrap()
            }
        };
    let ids = |rows: &[StoredVersion]| rows.iter().map(|r| r.id.clone()).collect::<Vec<_>>();
    let by_rid = page(Order::Rid, false, None, false, 100).await;
    assert_eq!(
        ids(&by_rid),
        (0..10).map(|i| format!("e{i}")).collect::<Vec<_>>()
    );
    let by_updated = page(Order::LastUpdated, false, None, false, 3).await;
    assert_eq!(ids(&by_updated), vec!["e9", "e8", "e7"]);
    let by_range = page(Order::Range(3), false, None, false, 100).await;
    assert_eq!(
        ids(&by_range),
        vec!["e0", "e5", "e1", "e6", "e2", "e7", "e3", "e8", "e9", "e4"],
        "missing sorts last"
    );
    let by_range_desc = page(Order::Range(3), true, None, false, 100).await;
    assert_eq!(
        ids(&by_range_desc),
        vec!["e9", "e8", "e3", "e7", "e2", "e6", "e1", "e5", "e0", "e4"]
    );
    // Page through by range, inserting between pages.
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let rows = page(Order::Range(3), false, after, false, 3).await;
        if rows.is_empty() {
            break;
        }
        let last = rows.last().unwrap();
        after = Some(Keyset {
            sort_key: last.sort_key.expect("sort key returned"),
            rid: last.rid,
        });
        seen.extend(ids(&rows));
        if seen.len() == 3 {
            put(
                &store,
                version("Encounter", "late", 1, 1),
                index(&[], &[(3, 0.0, 0.1)]),
                Expect::Absent,
            )
            .await
            .unwrap();
        }
    }
    assert_eq!(
        seen,
        vec!["e0", "e5", "e1", "e6", "e2", "e7", "e3", "e8", "e9", "e4"],
        "no skip, no repeat"
    );
    // Backwards from the 4th item gives the first three, in forward order.
    let all = page(Order::Rid, false, None, false, 100).await;
    let k = Keyset {
        sort_key: all[3].sort_key.unwrap(),
        rid: all[3].rid,
    };
    assert_eq!(
        ids(&page(Order::Rid, false, Some(k), true, 2).await),
        vec!["e1", "e2"]
    );
}

/// Instance, type and system history, newest first, with since and paging.
pub async fn history_scopes(store: Arc<dyn Store>) {
    put(
        &store,
        version("Patient", "p", 1, 10),
        index(&[], &[]),
        Expect::Absent,
    )
    .await
    .unwrap();
    put(
        &store,
        version("Observation", "o", 1, 20),
        index(&[], &[]),
        Expect::Absent,
    )
    .await
    .unwrap();
    put(
        &store,
        version("Patient", "p", 2, 30),
        index(&[], &[]),
        Expect::Version(1),
    )
    .await
    .unwrap();
    let h = |scope: HistoryScope, since: Option<i64>, seq_below: Option<i64>| {
        let store = store.clone();
        async move {
            let q = HistoryQuery {
                scope,
                since,
                before: None,
                seq_below,
                key_names: None,
                exclude_keys: Vec::new(),
                limit: 10,
            };
            let q2 = q.clone();
            let rows = store.read(move |tx| tx.history(&q)).await.unwrap();
            assert_eq!(
                store
                    .read(move |tx| tx.history_count(&q2, 100))
                    .await
                    .unwrap(),
                rows.len() as u64
            );
            rows
        }
    };
    let inst = h(
        HistoryScope::Instance {
            rtype: "Patient".into(),
            id: "p".into(),
        },
        None,
        None,
    )
    .await;
    assert_eq!(
        inst.iter().map(|r| r.version).collect::<Vec<_>>(),
        vec![2, 1]
    );
    assert_eq!(
        h(HistoryScope::Type("Patient".into()), None, None)
            .await
            .len(),
        2
    );
    let sys = h(HistoryScope::System, None, None).await;
    assert_eq!(
        sys.iter()
            .map(|r| (r.rtype.as_str(), r.version))
            .collect::<Vec<_>>(),
        vec![("Patient", 2), ("Observation", 1), ("Patient", 1)]
    );
    assert_eq!(h(HistoryScope::System, Some(20), None).await.len(), 2);
    assert_eq!(
        h(HistoryScope::System, None, Some(sys[0].seq)).await.len(),
        2
    );
    // Access control narrows history to versions sealed under given keys.
    let q = HistoryQuery {
        scope: HistoryScope::System,
        since: None,
        before: None,
        seq_below: None,
        key_names: Some(vec!["patient/p".into()]),
        exclude_keys: Vec::new(),
        limit: 10,
    };
    let q2 = q.clone();
    let rows = store.read(move |tx| tx.history(&q)).await.unwrap();
    assert!(rows.iter().all(|r| r.key_name == "patient/p") && rows.len() == 2);
    let q = HistoryQuery {
        scope: HistoryScope::System,
        since: None,
        before: None,
        seq_below: None,
        key_names: None,
        exclude_keys: vec!["patient/p".into()],
        limit: 10,
    };
    let rows = store.read(move |tx| tx.history(&q)).await.unwrap();
    assert!(rows.len() == 1 && rows[0].key_name != "patient/p");
    assert_eq!(
        store
            .read(move |tx| tx.history_count(&q2, 10))
            .await
            .unwrap(),
        2
    );
}

/// A deletion is a tombstone version; it leaves search but keeps history.
pub async fn deletion_drops_index(store: Arc<dyn Store>) {
    put(
        &store,
        version("Patient", "d", 1, 1),
        index(&["t"], &[(1, 1.0, 2.0)]),
        Expect::Absent,
    )
    .await
    .unwrap();
    let mut del = version("Patient", "d", 2, 2);
    del.deleted = true;
    del.body.clear();
    put(&store, del, IndexEntries::default(), Expect::Version(1))
        .await
        .unwrap();
    let cur = store
        .read(|tx| tx.current("Patient", "d"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(cur.state, RecordState::Deleted);
    let q = IndexQuery {
        filters: vec![Filter::AnyToken(vec![tok("t")])],
        ..IndexQuery::all("Patient", 10)
    };
    assert!(
        store
            .read(move |tx| tx.search(&q))
            .await
            .unwrap()
            .is_empty()
    );
    let q = IndexQuery::all("Patient", 10);
    assert!(
        store
            .read(move |tx| tx.search(&q))
            .await
            .unwrap()
            .is_empty(),
        "deleted resources are not live"
    );
    // Re-creating after deletion continues the version sequence.
    put(
        &store,
        version("Patient", "d", 3, 3),
        index(&["t"], &[]),
        Expect::Absent,
    )
    .await
    .unwrap();
    assert_eq!(
        store
            .read(|tx| tx.current("Patient", "d"))
            .await
            .unwrap()
            .unwrap()
            .state,
        RecordState::Live
    );
}

/// A job that fails after writing leaves nothing behind; other jobs commit.
pub async fn failed_job_rolls_back(store: Arc<dyn Store>) {
    #[derive(Debug, thiserror::Error)]
    #[error("deliberate")]
    struct Deliberate;
    let failing = store.write(|tx| {
        tx.put(
            &version("Patient", "x1", 1, 1),
            &index(&["a"], &[]),
            Expect::Absent,
        )?;
        tx.put(
            &version("Patient", "x2", 1, 1),
            &index(&["a"], &[]),
            Expect::Absent,
        )?;
        Err::<(), _>(StoreError::abort(Deliberate))
    });
    let ok = put(
        &store,
        version("Patient", "y", 1, 1),
        index(&["a"], &[]),
        Expect::Absent,
    );
    let (failing, ok) = tokio::join!(failing, ok);
    let err = failing.unwrap_err();
    assert!(
        err.into_aborted::<Deliberate>().is_ok(),
        "the job's own error comes back"
    );
    ok.unwrap();
    assert!(
        store
            .read(|tx| tx.current("Patient", "x1"))
            .await
            .unwrap()
            .is_none()
    );
    let q = IndexQuery {
        filters: vec![Filter::AnyToken(vec![tok("a")])],
        ..IndexQuery::all("Patient", 10)
    };
    assert_eq!(store.read(move |tx| tx.search(&q)).await.unwrap().len(), 1);
}

/// Jobs queued together (one group commit) that fail first, in the middle
/// and last each roll back alone; the jobs between them commit, however
/// the writer runs them (the first bare, the rest in savepoints).
pub async fn failing_jobs_in_one_group(store: Arc<dyn Store>) {
    #[derive(Debug, thiserror::Error)]
    #[error("deliberate")]
    struct Deliberate;
    // Hold the writer in a job until the others are queued behind it.
    let (started_tx, started_rx) = std::sync::mpsc::channel::<()>();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let holder = {
        let store = store.clone();
        tokio::spawn(async move {
            store
                .write(move |_tx| {
                    let _ = started_tx.send(());
                    let _ = release_rx.recv_timeout(std::time::Duration::from_secs(30));
                    Ok(())
                })
                .await
        })
    };
    tokio::task::spawn_blocking(move || started_rx.recv())
        .await
        .unwrap()
        .unwrap();
    let job = |id: &'static str, fail: bool| {
        let store = store.clone();
        async move {
            store
                .write(move |tx| {
                    tx.put(
                        &version("Patient", id, 1, 1),
                        &index(&["g"], &[]),
                        Expect::Absent,
                    )?;
                    if fail {
                        Err(StoreError::abort(Deliberate))
                    } else {
                        Ok(())
                    }
                })
                .await
        }
    };
    // `join!` polls in order, so the jobs queue in this order before the
    // holder lets the writer go.
    let (f1, f2, ok1, f3, ok2, f4, ()) = tokio::join!(
        job("f1", true),
        job("f2", true),
        job("ok1", false),
        job("f3", true),
        job("ok2", false),
        job("f4", true),
        async {
            release_tx.send(()).unwrap();
        }
    );
    holder.await.unwrap().unwrap();
    for failed in [f1, f2, f3, f4] {
        assert!(failed.unwrap_err().into_aborted::<Deliberate>().is_ok());
    }
    ok1.unwrap();
    ok2.unwrap();
    assert_patients(
        &store,
        &[
            ("f1", false),
            ("f2", false),
            ("ok1", true),
            ("f3", false),
            ("ok2", true),
            ("f4", false),
        ],
    )
    .await;
    let q = IndexQuery {
        filters: vec![Filter::AnyToken(vec![tok("g")])],
        ..IndexQuery::all("Patient", 10)
    };
    assert_eq!(store.read(move |tx| tx.search(&q)).await.unwrap().len(), 2);
}

/// [`Store::submit_write`]: the callback gets the job's result, and when it
/// runs the job's changes are committed (a read on another connection sees
/// them); a failing job's callback gets its error and nothing of it stays.
pub async fn submitted_writes_call_back_after_commit(store: Arc<dyn Store>) {
    #[derive(Debug, thiserror::Error)]
    #[error("deliberate")]
    struct Deliberate;
    let submit = |id: &'static str, fail: bool| {
        let (tx, rx) = tokio::sync::oneshot::channel();
        store
            .submit_write(
                Box::new(move |wtx| {
                    wtx.put(
                        &version("Patient", id, 1, 1),
                        &index(&["s"], &[]),
                        Expect::Absent,
                    )?;
                    if fail {
                        return Err(StoreError::abort(Deliberate));
                    }
                    Ok(Box::new(id.len()) as Box<dyn std::any::Any + Send>)
                }),
                Box::new(move |result| {
                    let _ = tx.send(result.map(|any| *any.downcast::<usize>().expect("usize")));
                }),
            )
            .expect("the store is open");
        rx
    };
    let (ok, failed) = (submit("sub-ok", false), submit("sub-failed", true));
    assert_eq!(ok.await.expect("the callback ran").unwrap(), "sub-ok".len());
    let err = failed.await.expect("the callback ran").unwrap_err();
    assert!(
        err.into_aborted::<Deliberate>().is_ok(),
        "the job's own error comes back"
    );
    assert_patients(&store, &[("sub-ok", true), ("sub-failed", false)]).await;
    store.close();
    assert!(
        store
            .submit_write(Box::new(|_| Ok(Box::new(()))), Box::new(|_| {}))
            .is_err(),
        "a closed store refuses the job"
    );
}

/// Wrapped keys are stored once; erasing a compartment drops its key and index.
pub async fn data_keys_and_erasure(store: Arc<dyn Store>) {
    let key = KeyRecord {
        name: "patient/p1".into(),
        kek_id: "k1".into(),
        blob: vec![1, 2, 3],
    };
    let k2 = key.clone();
    store
        .write(move |tx| tx.put_data_key(&k2, false))
        .await
        .unwrap();
    let k3 = key.clone();
    assert!(matches!(
        store.write(move |tx| tx.put_data_key(&k3, false)).await,
        Err(StoreError::Conflict { .. })
    ));
    let rewrapped = KeyRecord {
        kek_id: "k2".into(),
        ..key.clone()
    };
    let r2 = rewrapped.clone();
    store
        .write(move |tx| tx.put_data_key(&r2, true))
        .await
        .unwrap();
    assert_eq!(
        store.read(|tx| tx.data_key("patient/p1")).await.unwrap(),
        Some(rewrapped)
    );
    assert_eq!(
        store
            .read(|tx| tx.data_keys_not_under("k2", 10))
            .await
            .unwrap()
            .len(),
        0
    );
    assert_eq!(
        store.read(|tx| tx.data_key_counts()).await.unwrap(),
        vec![("k2".to_string(), 1)]
    );
    put(
        &store,
        version("Patient", "p1", 1, 1),
        index(&["n"], &[]),
        Expect::Absent,
    )
    .await
    .unwrap();
    let mut obs = version("Observation", "o1", 1, 1);
    obs.compartment = Some("p1".into());
    obs.key_name = "patient/p1".into();
    put(&store, obs, index(&["n"], &[(1, 0.0, 1.0)]), Expect::Absent)
        .await
        .unwrap();
    put(
        &store,
        version("Patient", "p2", 1, 1),
        index(&["n"], &[]),
        Expect::Absent,
    )
    .await
    .unwrap();
    let erased = store
        .write(|tx| tx.erase_compartment("p1", "patient/p1"))
        .await
        .unwrap();
    assert_eq!(erased, 2);
    assert!(
        store
            .read(|tx| tx.data_key("patient/p1"))
            .await
            .unwrap()
            .is_none()
    );
    let o = store
        .read(|tx| tx.current("Observation", "o1"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(o.state, RecordState::Erased);
    let v = store
        .read(|tx| tx.version("Observation", "o1", 1))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        v.state,
        RecordState::Erased,
        "old versions read as erased too"
    );
    let q = IndexQuery {
        filters: vec![Filter::AnyToken(vec![tok("n")])],
        ..IndexQuery::all("Patient", 10)
    };
    let ids: Vec<String> = store
        .read(move |tx| tx.search(&q))
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(ids, vec!["p2"]);
    let again = put(
        &store,
        version("Observation", "o1", 2, 2),
        index(&[], &[]),
        Expect::Version(1),
    )
    .await;
    assert!(
        matches!(again, Err(StoreError::Conflict { .. })),
        "erased resources cannot be written"
    );
}

/// Many concurrent writers on one resource: exactly one wins each version.
pub async fn concurrent_writers_conflict(store: Arc<dyn Store>) {
    put(
        &store,
        version("Patient", "c", 1, 1),
        index(&[], &[]),
        Expect::Absent,
    )
    .await
    .unwrap();
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            put(
                &store,
                version("Patient", "c", 2, 2),
                index(&[], &[]),
                Expect::Version(1),
            )
            .await
            .is_ok()
        }));
    }
    let mut wins = 0;
    for t in tasks {
        if t.await.unwrap() {
            wins += 1;
        }
    }
    assert_eq!(
        wins, 1,
        "exactly one concurrent update of version 1 succeeds"
    );
}
