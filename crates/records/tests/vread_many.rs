//! `Records::vread_many` answers each version as `Records::vread` would:
//! the same resource, or the same error, in the order asked.
use std::sync::Arc;

use custos_crypto::{FileKekProvider, GcmSealer};
use custos_records::{Records, RecordsConfig};
use custos_store::{SqliteConfig, SqliteStore, Store};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_versions_read_at_once_answer_as_one_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let kf = dir.path().join("keys.json");
    FileKekProvider::create(&kf).unwrap();
    let store: Arc<dyn Store> =
        Arc::new(SqliteStore::open(SqliteConfig::new(dir.path().join("custos.db"))).unwrap());
    let r = Records::open(
        store,
        Arc::new(FileKekProvider::open(&kf).unwrap()),
        Arc::new(GcmSealer),
        RecordsConfig::default(),
    )
    .await
    .unwrap();
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
