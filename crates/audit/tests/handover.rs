//! The hand-over of committed events to the in-process consumer of the log
//! (the detection pipeline): what it takes from memory is exactly what the
//! store holds, each event once, in index order, and whatever is not held
//! (committed before it asked, inside a write, or fallen out of the bound)
//! is read from the store instead.
use std::borrow::Cow;
use std::sync::Arc;

use custos_audit::{Agent, AuditConfig, AuditRecord, AuditTrail, Decision, Entity};
use custos_crypto::{FileKekProvider, GcmSealer};
use custos_records::{Records, RecordsConfig};
use custos_store::{SqliteConfig, SqliteStore, Store, StoreExt, Synchronous};

async fn open(dir: &std::path::Path) -> (Records, AuditTrail) {
    let kf = dir.join("keys.json");
    FileKekProvider::create(&kf).unwrap();
    let mut sc = SqliteConfig::new(dir.join("custos.db"));
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
    (records, trail)
}

/// An event with every part filled in, different for each `n`.
fn event(n: u64) -> AuditRecord {
    AuditRecord {
        at: 1_760_000_000_000_000 + n as i64,
        action: "GET /{rtype}/{id}".into(),
        interaction: Some("read".into()),
        status: if n.is_multiple_of(3) { 403 } else { 200 },
        agent: Agent {
            subject: Some(format!("user:{}", n % 4)),
            username: Some(format!("nurse{}", n % 4)),
            role: Some("nurse".into()),
            client_id: Some("custos-cli".into()),
            fhir_user: Some(format!("Practitioner/p{}", n % 4)),
            source: Some("127.0.0.1".into()),
            user_agent: Some("test \u{e9}\u{1f600} \"quoted\"".into()),
        },
        purpose: Some("TREAT".into()),
        break_glass_reason: (n.is_multiple_of(5)).then(|| "unconscious patient".into()),
        query: (n.is_multiple_of(2)).then(|| "family=M%C3%BCller&_count=5".into()),
        entities: vec![Entity {
            rtype: "Patient".into(),
            id: format!("pat-{n}"),
            version: Some(n as i64),
            patient: Some(format!("pat-{n}")),
        }],
        decisions: vec![Decision {
            interaction: Cow::Borrowed("read"),
            rtype: Some("Patient".into()),
            id: Some(format!("pat-{n}")),
            patient: Some(format!("pat-{n}")),
            allowed: !n.is_multiple_of(3),
            rule: Cow::Owned(
                if n.is_multiple_of(3) {
                    "no-relationship"
                } else {
                    "care-team"
                }
                .into(),
            ),
        }],
        results: Some(n as u32),
        detail: None,
        ..AuditRecord::default()
    }
}

/// What the store holds for `start..end`, opened from the sealed leaves.
async fn stored(trail: &AuditTrail, start: u64, end: u64) -> Vec<(u64, AuditRecord)> {
    let rows = trail.entries(start, end, 10_000).await.unwrap();
    let indexes: Vec<u64> = rows.iter().map(|r| r.index).collect();
    let recs = trail
        .open_leaves(rows.into_iter().map(|r| r.data).collect())
        .await
        .unwrap();
    indexes.into_iter().zip(recs).collect()
}

/// Read `start..end` as the consumer does: in calls that may return fewer.
async fn consume(
    trail: &AuditTrail,
    start: u64,
    end: u64,
    limit: usize,
) -> Vec<(u64, AuditRecord)> {
    let mut out = Vec::new();
    let mut at = start;
    while at < end {
        let got = trail.events(at, end, limit).await.unwrap();
        assert!(!got.is_empty(), "no progress at {at}");
        assert!(got.len() <= limit);
        at = got.last().unwrap().0 + 1;
        out.extend(got);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handed_over_events_are_what_the_store_holds_each_once() {
    let dir = tempfile::tempdir().unwrap();
    let (records, trail) = open(dir.path()).await;
    // Before anyone asked: nothing is held.
    for n in 0..3 {
        trail.append(event(n)).await.unwrap();
    }
    assert_eq!(trail.held_commits(), 0);
    trail.hand_over_commits(1000);
    // Concurrent appends (several group commits), and one event committed
    // inside a write's own transaction in the middle (not held).
    let mut tasks = Vec::new();
    for n in 3..40 {
        let t = trail.clone();
        tasks.push(tokio::spawn(
            async move { t.append(event(n)).await.unwrap() },
        ));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let (t, rec) = (trail.clone(), event(40));
    let in_write = records
        .store()
        .write(move |tx| t.append_in(tx, &rec))
        .await
        .unwrap();
    assert_eq!(in_write, 40);
    for n in 41..50 {
        trail.append(event(n)).await.unwrap();
    }
    assert_eq!(trail.held_commits(), 46, "the group commits since the ask");
    let expected = stored(&trail, 0, 50).await;
    assert_eq!(expected.len(), 50);
    let got = consume(&trail, 0, 50, 7).await;
    assert_eq!(got, expected, "the consumer sees exactly the stored log");
    assert_eq!(trail.held_commits(), 0, "each held event is taken once");
    // Taken events are still in the log: read again, they come from the store.
    assert_eq!(consume(&trail, 10, 50, 1024).await, expected[10..].to_vec());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_falls_out_of_the_bound_or_lies_behind_the_consumer_comes_from_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let (_records, trail) = open(dir.path()).await;
    trail.hand_over_commits(4);
    for n in 0..10 {
        trail.append(event(n)).await.unwrap();
    }
    assert_eq!(trail.held_commits(), 4, "only the newest are kept");
    let expected = stored(&trail, 0, 10).await;
    assert_eq!(consume(&trail, 0, 10, 1024).await, expected);
    // A consumer resuming past what is held forgets what lies behind it.
    for n in 10..14 {
        trail.append(event(n)).await.unwrap();
    }
    let expected = stored(&trail, 12, 14).await;
    assert_eq!(consume(&trail, 12, 14, 1024).await, expected);
    assert_eq!(trail.held_commits(), 0);
    // Switched off, nothing more is held.
    trail.append(event(14)).await.unwrap();
    trail.hand_over_commits(0);
    assert_eq!(trail.held_commits(), 0);
    trail.append(event(15)).await.unwrap();
    assert_eq!(trail.held_commits(), 0);
    assert_eq!(
        consume(&trail, 14, 16, 1024).await,
        stored(&trail, 14, 16).await
    );
}
