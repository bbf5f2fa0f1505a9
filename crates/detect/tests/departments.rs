//! The departments that treat a patient, as the live pipeline learns them:
//! from the Encounters written with a new Patient (no second read), and by
//! reading the record for a patient it meets first in a read. A nurse of
//! one of those departments reading the patient has a reason; a nurse of
//! another department does not, and is raised.
use std::time::Duration;

use custos_audit::{Agent, AuditRecord, Decision, Entity};
use custos_auth::{NewUser, Role};
use custos_detect::{DetectConfig, Detection, Detector};
use serde_json::json;

mod common;
use common::{World, world};

/// A nurse of `org`; returns the audit agent of their requests.
async fn nurse(w: &World, name: &str, org: &str) -> Agent {
    let (practitioner, _) = w
        .records
        .create(
            "Practitioner",
            json!({"resourceType": "Practitioner", "name": [{"family": name}]}),
            None,
        )
        .await
        .unwrap();
    let created = w
        .auth
        .add_user(NewUser {
            username: name.into(),
            password: "correct horse battery staple 42".into(),
            role: Role::Nurse,
            practitioner: Some(practitioner.id),
            patient: None,
            organization: Some(org.to_string()),
        })
        .await
        .unwrap();
    Agent {
        subject: Some(format!("user:{}", created.user.id)),
        username: Some(name.into()),
        role: Some("nurse".into()),
        ..Agent::default()
    }
}

async fn organization(w: &World, name: &str) -> String {
    let (o, _) = w
        .records
        .create(
            "Organization",
            json!({"resourceType": "Organization", "name": name}),
            None,
        )
        .await
        .unwrap();
    o.id
}

/// Load a transaction of a new Patient with an Encounter at `org`, and
/// append its audit event (as the server does for a transaction).
async fn admit(w: &World, family: &str, org: &str) -> String {
    let bundle = json!({
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": "urn:uuid:6f0e3c1a-1d2b-4c5d-8e9f-0a1b2c3d4e5f",
                "resource": {"resourceType": "Patient", "name": [{"family": family, "given": ["Ann"]}],
                             "birthDate": "1970-01-01"},
                "request": {"method": "POST", "url": "Patient"}
            },
            {
                "resource": {"resourceType": "Encounter", "status": "finished",
                             "class": {"code": "AMB"},
                             "subject": {"reference": "urn:uuid:6f0e3c1a-1d2b-4c5d-8e9f-0a1b2c3d4e5f"},
                             "serviceProvider": {"reference": format!("Organization/{org}")},
                             "period": {"start": "2026-01-01T10:00:00Z"}},
                "request": {"method": "POST", "url": "Encounter"}
            }
        ]
    });
    let out = w
        .records
        .process_bundle(bundle, "http://custos.test", false)
        .await
        .unwrap();
    let mut entities = Vec::new();
    let mut patient = String::new();
    for e in out["entry"].as_array().unwrap() {
        let loc = e["response"]["location"].as_str().unwrap();
        let parts: Vec<&str> = loc.split('/').collect();
        let (t, id) = (parts[0], parts[1]);
        if t == "Patient" {
            patient = id.to_string();
        }
        entities.push(Entity {
            rtype: t.into(),
            id: id.into(),
            version: Some(1),
            patient: None,
        });
    }
    for e in &mut entities {
        e.patient = Some(patient.clone());
    }
    append(
        w,
        AuditRecord {
            action: "POST /".into(),
            interaction: Some("transaction".into()),
            status: 200,
            entities,
            ..AuditRecord::default()
        },
    )
    .await;
    patient
}

async fn append(w: &World, mut rec: AuditRecord) {
    rec.at = custos_auth::now_micros();
    w.trail.append(rec).await.unwrap();
}

/// `agent` reads the Patient, allowed by a rule that is not a care
/// relationship.
async fn read(w: &World, agent: &Agent, patient: &str) {
    append(
        w,
        AuditRecord {
            action: "GET /Patient/{id}".into(),
            interaction: Some("read".into()),
            status: 200,
            agent: agent.clone(),
            entities: vec![Entity {
                rtype: "Patient".into(),
                id: patient.into(),
                version: Some(1),
                patient: Some(patient.into()),
            }],
            decisions: vec![Decision {
                interaction: "read".into(),
                rtype: Some("Patient".into()),
                id: Some(patient.into()),
                patient: Some(patient.into()),
                allowed: true,
                rule: "role".into(),
            }],
            ..AuditRecord::default()
        },
    )
    .await;
}

fn unexplained(cases: &[custos_detect::Case], username: &str) -> Vec<Option<String>> {
    cases
        .iter()
        .filter(|c| {
            c.detector == Detector::UnexplainedAccess && c.username.as_deref() == Some(username)
        })
        .map(|c| c.patient.clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_department_that_treats_the_patient_explains_a_read() {
    let w = world().await;
    let (cardio, ortho) = (
        organization(&w, "Cardiology").await,
        organization(&w, "Orthopedics").await,
    );
    let inside = nurse(&w, "nurse.cardio", &cardio).await;
    let outside = nurse(&w, "nurse.ortho", &ortho).await;

    // Detection judges the admission while it is live: the facts come
    // from the written Patient and Encounter.
    let d = Detection::start(w.records.clone(), w.auth.clone(), DetectConfig::default())
        .await
        .unwrap();
    let live = admit(&w, "Lindqvist", &cardio).await;
    read(&w, &inside, &live).await;
    read(&w, &outside, &live).await;
    assert!(d.caught_up(Duration::from_secs(20)).await);
    let cases = d.cases_fresh(None, 100).await.unwrap();
    assert!(unexplained(&cases, "nurse.cardio").is_empty(), "{cases:?}");
    assert_eq!(
        unexplained(&cases, "nurse.ortho"),
        vec![Some(live.clone())],
        "{cases:?}"
    );
    // The written Patient and Encounter came from the write path, not read back.
    let stats = d.stats();
    assert_eq!(
        (stats.versions_handed_over, stats.versions_read_back),
        (2, 0),
        "{stats:?}"
    );
    d.stop().await.unwrap();

    // A patient first met in a read (its admission judged by an earlier
    // process, whose facts are gone) is read from the records: the same
    // departments.
    let earlier = admit(&w, "Okonkwo", &cardio).await;
    let d = Detection::start(w.records.clone(), w.auth.clone(), DetectConfig::default())
        .await
        .unwrap();
    assert!(d.caught_up(Duration::from_secs(20)).await);
    // Written before the pipeline asked for them: read back.
    let stats = d.stats();
    assert_eq!(
        (stats.versions_handed_over, stats.versions_read_back),
        (0, 2),
        "{stats:?}"
    );
    d.stop().await.unwrap();
    let d = Detection::start(w.records.clone(), w.auth.clone(), DetectConfig::default())
        .await
        .unwrap();
    read(&w, &inside, &earlier).await;
    read(&w, &outside, &earlier).await;
    assert!(d.caught_up(Duration::from_secs(20)).await);
    let cases = d.cases_fresh(None, 100).await.unwrap();
    assert!(unexplained(&cases, "nurse.cardio").is_empty(), "{cases:?}");
    let mut raised = unexplained(&cases, "nurse.ortho");
    raised.sort();
    let mut want = vec![Some(live), Some(earlier)];
    want.sort();
    assert_eq!(raised, want, "{cases:?}");
    d.stop().await.unwrap();
}
