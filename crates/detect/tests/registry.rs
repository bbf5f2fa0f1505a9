//! Detection's registry of patients (each identifier as first registered,
//! each patient's latest encounter) is saved entry by entry, outside the
//! global state, and outlives the process: an MRN registered before a
//! restart and reused on another person after it is raised.
use std::time::Duration;

use custos_audit::{AuditRecord, Entity};
use custos_detect::{DetectConfig, Detection, Detector};
use custos_store::StoreExt;
use serde_json::json;

mod common;
use common::{World, world};

const MRN_SYSTEM: &str = "http://hospital.example/mrn";

/// Register a Patient with `mrn` in a transaction and append its audit
/// event (as the server does for a transaction); returns its id.
async fn register(w: &World, family: &str, birth: &str, mrn: &str) -> String {
    let bundle = json!({
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [{
            "resource": {"resourceType": "Patient",
                         "identifier": [{"system": MRN_SYSTEM, "value": mrn}],
                         "name": [{"family": family, "given": ["Ann"]}],
                         "birthDate": birth},
            "request": {"method": "POST", "url": "Patient"}
        }]
    });
    let out = w
        .records
        .process_bundle(bundle, "http://custos.test", false)
        .await
        .unwrap();
    let loc = out["entry"][0]["response"]["location"].as_str().unwrap();
    let id = loc.split('/').nth(1).unwrap().to_string();
    w.trail
        .append(AuditRecord {
            at: custos_auth::now_micros(),
            action: "POST /".into(),
            interaction: Some("transaction".into()),
            status: 200,
            entities: vec![Entity {
                rtype: "Patient".into(),
                id: id.clone(),
                version: Some(1),
                patient: Some(id.clone()),
            }],
            ..AuditRecord::default()
        })
        .await
        .unwrap();
    id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identifier_registered_before_a_restart_is_still_known_after_it() {
    let w = world().await;
    let d = Detection::start(w.records.clone(), w.auth.clone(), DetectConfig::default())
        .await
        .unwrap();
    let first = register(&w, "Lindqvist", "1970-01-01", "MRN-0042").await;
    assert!(d.caught_up(Duration::from_secs(20)).await);
    d.stop().await.unwrap();

    // Saved as entries of their own, under keyed tokens; the global state
    // (saved whole) does not hold the registry.
    let store = w.records.store().clone();
    let entries = store
        .read(|tx| tx.sys_list("detect-identifier"))
        .await
        .unwrap();
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert!(!entries[0].key.contains("MRN"));
    let vault = w.auth.vault().clone();
    let opened = vault.open_bytes(&entries[0]).unwrap();
    assert!(String::from_utf8_lossy(&opened).contains(&first));
    let global = store
        .read(|tx| tx.sys_get("detect-state", "global"))
        .await
        .unwrap()
        .expect("the global state is saved on stop");
    let global = vault.open_bytes(&global).unwrap();
    assert!(!String::from_utf8_lossy(&global).contains(&first));

    // A new process: the same MRN on another person is raised.
    let d = Detection::start(w.records.clone(), w.auth.clone(), DetectConfig::default())
        .await
        .unwrap();
    let second = register(&w, "Okonkwo", "1988-07-14", "MRN-0042").await;
    assert!(d.caught_up(Duration::from_secs(20)).await);
    let cases = d.cases_fresh(None, 100).await.unwrap();
    let theft: Vec<_> = cases
        .iter()
        .filter(|c| c.detector == Detector::IdentityTheft)
        .collect();
    assert_eq!(theft.len(), 1, "{cases:?}");
    assert_eq!(theft[0].patient.as_deref(), Some(second.as_str()));
    assert_eq!(theft[0].findings[0].kind, "identifier-reused");
    d.stop().await.unwrap();
}
