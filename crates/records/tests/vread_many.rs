//! `Records::vread_many` answers each version as `Records::vread` would:
//! the same resource, or the same error, in the order asked; and the
//! versions handed over from the write path (`Records::take_written`) are
//! those `vread` opens, each given once.
use std::sync::Arc;

use custos_crypto::{FileKekProvider, GcmSealer};
use custos_records::{Records, RecordsConfig};
use custos_store::{SqliteConfig, SqliteStore, Store};
use serde_json::json;

async fn records(dir: &tempfile::TempDir) -> Records {
    let kf = dir.path().join("keys.json");
    FileKekProvider::create(&kf).unwrap();
    let store: Arc<dyn Store> =
        Arc::new(SqliteStore::open(SqliteConfig::new(dir.path().join("custos.db"))).unwrap());
    Records::open(
        store,
        Arc::new(FileKekProvider::open(&kf).unwrap()),
        Arc::new(GcmSealer),
        RecordsConfig::default(),
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_versions_read_at_once_answer_as_one_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let r = records(&dir).await;
    let (p, _) = r
        .create(
            "Patient",
            json!({"resourceType": "Patient", "name": [{"family": "Abara"}]}),
            None,
        )
        .await
        .unwrap();
    let mut changed = p.resource.clone();
    changed["name"][0]["family"] = json!("Abara-Lind");
    r.update("Patient", &p.id, changed, None).await.unwrap();
    let (o, _) = r
        .create(
            "Observation",
            json!({"resourceType": "Observation", "status": "final",
                   "code": {"text": "pulse"}, "subject": {"reference": format!("Patient/{}", p.id)}}),
            None,
        )
        .await
        .unwrap();

    let asked: Vec<(String, String, i64)> = vec![
        ("Patient".into(), p.id.clone(), 2),
        ("Observation".into(), o.id.clone(), 1),
        ("Patient".into(), p.id.clone(), 1),
        ("Patient".into(), p.id.clone(), 3),
        ("Patient".into(), "not an id!".into(), 1),
        ("NoSuchType".into(), p.id.clone(), 1),
        ("Patient".into(), "a-patient-that-never-was".into(), 1),
    ];
    let many = r.vread_many(&asked).await;
    assert_eq!(many.len(), asked.len());
    for ((t, id, v), got) in asked.iter().zip(&many) {
        let one = r.vread(t, id, &v.to_string()).await;
        match (got, &one) {
            (Ok(a), Ok(b)) => {
                assert_eq!(a.resource, b.resource, "{t}/{id}/{v}");
                assert_eq!(a.version, b.version);
            }
            (Err(a), Err(b)) => assert_eq!(a, b, "{t}/{id}/{v}"),
            _ => panic!("{t}/{id}/{v}: {got:?} against {one:?}"),
        }
    }
    assert_eq!(
        many[0].as_ref().unwrap().resource["name"][0]["family"],
        "Abara-Lind"
    );
    assert_eq!(
        many[2].as_ref().unwrap().resource["name"][0]["family"],
        "Abara"
    );
    assert!(many[3..].iter().all(Result::is_err));
    assert!(r.vread_many(&[]).await.is_empty());
}

fn key(t: &str, id: &str, v: i64) -> (String, String, i64) {
    (t.to_string(), id.to_string(), v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn written_versions_are_handed_over_once_as_vread_opens_them() {
    let dir = tempfile::tempdir().unwrap();
    let r = records(&dir).await;
    let patient = |family: &str| json!({"resourceType": "Patient", "name": [{"family": family}]});
    let (before, _) = r.create("Patient", patient("Before"), None).await.unwrap();
    r.hand_over_writes(100, &["Patient", "Encounter"]);
    assert!(
        r.take_written(&[key("Patient", &before.id, 1)]).await[0].is_none(),
        "what was written before anyone asked is not held"
    );

    // A single create returns its body and hands over a copy.
    let (single, _) = r.create("Patient", patient("Single"), None).await.unwrap();
    assert_eq!(single.resource["name"][0]["family"], "Single");

    // A transaction returning no bodies hands its versions over.
    let bundle = |representation: &str| {
        json!({"resourceType": "Bundle", "type": "transaction", "entry": [
            {"fullUrl": "urn:uuid:5b0c8e0e-6d0f-4a43-9d1e-000000000001",
             "resource": patient(representation),
             "request": {"method": "POST", "url": "Patient"}},
            {"fullUrl": "urn:uuid:5b0c8e0e-6d0f-4a43-9d1e-000000000002",
             "resource": {"resourceType": "Observation", "status": "final", "code": {"text": "pulse"},
                          "subject": {"reference": "urn:uuid:5b0c8e0e-6d0f-4a43-9d1e-000000000001"}},
             "request": {"method": "POST", "url": "Observation"}}
        ]})
    };
    let id_of = |resp: &serde_json::Value, i: usize| {
        resp["entry"][i]["response"]["location"]
            .as_str()
            .unwrap()
            .split('/')
            .nth(1)
            .unwrap()
            .to_string()
    };
    let minimal = r
        .process_bundle(bundle("Minimal"), "http://x", false)
        .await
        .unwrap();
    let full = r
        .process_bundle(bundle("Full"), "http://x", true)
        .await
        .unwrap();
    assert_eq!(full["entry"][0]["resource"]["name"][0]["family"], "Full");
    let (m, mo, f) = (id_of(&minimal, 0), id_of(&minimal, 1), id_of(&full, 0));

    let wanted = vec![
        key("Patient", &single.id, 1),
        key("Patient", &m, 1),
        key("Observation", &mo, 1),
        key("Patient", &f, 1),
        key("Patient", &m, 2),
    ];
    let taken = r.take_written(&wanted).await;
    for (k, (t, id, v)) in [0, 1, 3].into_iter().map(|k| (k, &wanted[k])) {
        let held = taken[k].as_ref().unwrap_or_else(|| panic!("{t}/{id} held"));
        let read = r.vread(t, id, &v.to_string()).await.unwrap();
        assert_eq!(held.resource, read.resource, "{t}/{id}");
        assert_eq!(
            (held.version, &held.key_name),
            (read.version, &read.key_name)
        );
    }
    assert!(taken[2].is_none(), "a type not asked for is not held");
    assert!(taken[4].is_none(), "a version never written is not held");
    assert!(
        r.take_written(&wanted).await.iter().all(Option::is_none),
        "each version is given once"
    );

    // A shredded patient's versions are dropped with the key.
    let (shredded, _) = r
        .create("Patient", patient("Shredded"), None)
        .await
        .unwrap();
    r.shred_patient(&shredded.id).await.unwrap();
    assert!(r.take_written(&[key("Patient", &shredded.id, 1)]).await[0].is_none());

    // Stopping forgets what is held and keeps nothing more.
    let (kept, _) = r.create("Patient", patient("Kept"), None).await.unwrap();
    r.hand_over_writes(0, &[]);
    let (after, _) = r.create("Patient", patient("After"), None).await.unwrap();
    let taken = r
        .take_written(&[key("Patient", &kept.id, 1), key("Patient", &after.id, 1)])
        .await;
    assert!(taken.iter().all(Option::is_none));
}
