//! Resources in no patient's compartment that may still hold patient data
//! (a Task, a Binary, an Observation about a Group) are not "shared":
//! only roles that reach every patient see them. Systems are clients, never
//! users.
mod common;

use common::*;
use custos_auth::{AuthConfig, NewUser, Role};
use custos_fhir::ErrorKind;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resources_outside_every_compartment_are_not_shared() {
    let env = env(AuthConfig::default()).await;
    let (auth, records) = (&env.auth, &env.records);
    let gp = create(records, practitioner_body("Unassigned")).await;
    let pa = create(
        records,
        json!({
            "resourceType": "Patient",
            "name": [{ "family": "Alpha" }],
            "generalPractitioner": [{ "reference": format!("Practitioner/{gp}") }],
        }),
    )
    .await;
    // A Task about A (Task is outside the Patient CompartmentDefinition) and an
    // Observation whose subject is not a Patient: both in no compartment.
    let task = create(
        records,
        json!({ "resourceType": "Task", "status": "requested", "intent": "order",
                "for": { "reference": format!("Patient/{pa}") },
                "description": "call the patient about an HIV result" }),
    )
    .await;
    let group_obs = create(
        records,
        json!({ "resourceType": "Observation", "status": "final",
                "code": { "text": "ward census" },
                "subject": { "display": "somebody, no reference" } }),
    )
    .await;
    let directory = create(records, organization_body("Directory Org")).await;

    let patient = add_user(auth, "pat.unassigned", Role::Patient, None, Some(&pa)).await;
    let pt = patient
        .login(auth, "patient/*.rs launch/patient", None)
        .await
        .expect("patient signs in")
        .access_token;
    let doctor = add_user(auth, "dr.unassigned", Role::Physician, Some(&gp), None).await;
    let dt = doctor.token(auth).await;
    let system = register_client(auth, "unassigned-sys", "system/*.cruds").await;
    let st = system
        .token(auth, "system/*.cruds")
        .await
        .expect("system token")
        .access_token;

    for (who, token) in [("patient", &pt), ("physician", &dt)] {
        let g = as_user(auth, records, token).await;
        let r = g.read("Task", &task).await;
        assert!(
            is_kind(&r, ErrorKind::NotFound) || is_kind(&r, ErrorKind::Forbidden),
            "{who} reads the unassigned Task: {r:?}"
        );
        let r = g.read("Observation", &group_obs).await;
        assert!(r.is_err(), "{who} reads the unassigned Observation: {r:?}");
        if who == "patient" {
            let b = search(&g, "Observation", &[]).await.expect("search");
            assert!(!bundle_has(&b, "Observation", &group_obs), "{who}: {b}");
        }
        // Directory resources stay readable.
        assert!(g.read("Organization", &directory).await.is_ok(), "{who}");
    }
    // A role that reaches every patient sees them.
    let g = as_user(auth, records, &st).await;
    assert!(g.read("Task", &task).await.is_ok());
    let b = search(&g, "Task", &[]).await.expect("search");
    assert!(bundle_has(&b, "Task", &task));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systems_are_never_users() {
    let env = env(AuthConfig::default()).await;
    let r = env
        .auth
        .add_user(NewUser {
            username: "batch.loader".into(),
            password: "a long enough password".into(),
            role: Role::Service,
            practitioner: None,
            patient: None,
            organization: None,
        })
        .await;
    assert!(r.is_err(), "a password-only user with the service role");
    let admin = add_user(&env.auth, "admin.x", Role::Admin, None, None).await;
    let r = env.auth.set_role(&admin.username, Role::Service).await;
    assert!(r.is_err(), "promoting a user to the service role");
}
