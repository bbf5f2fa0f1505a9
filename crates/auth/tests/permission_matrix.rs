//! The permission matrix: every role × resource type × interaction ×
//! patient (with and without a relationship), against an expected table
//! written out by hand below — never derived from `roles.rs`.
//!
//! Patient A has an active CareTeam with the physician and the nurse as
//! participants and is the patient user's own record; patient B has no
//! relationship with anyone. Practitioner and Organization lie in no
//! patient's compartment: their "A" and "B" columns are two shared
//! resources and must agree. Creating a Patient opens a new compartment,
//! so its create cell is the same for A and B.
mod common;

use std::collections::BTreeMap;

use common::*;
use custos_auth::{AuthConfig, Role};
use custos_fhir::{ErrorKind, FhirError};
use custos_records::Records;
use serde_json::Value;

const TYPES: [&str; 11] = [
    "Patient",
    "Observation",
    "Condition",
    "Encounter",
    "MedicationRequest",
    "CareTeam",
    "Consent",
    "Practitioner",
    "Organization",
    "Claim",
    "AuditEvent",
];

/// The columns of the table, in this order.
const INTERACTIONS: [&str; 7] = [
    "create",
    "read",
    "update",
    "delete",
    "search",
    "history-instance",
    "history-type",
];

/// `Y` allowed (a search or type history returns the target);
/// `F` refused as forbidden (403);
/// `N` refused as not found (404: the patient must not learn it exists);
/// `E` a search or type history is allowed (200) but the target is not in it.
///
/// Columns: create read update delete search history-instance history-type.
/// Each row: role, type, for patient A, for patient B.
const EXPECTED: &[(&str, &str, &str, &str)] = &[
    // ---- admin: administration only, no FHIR data.
    ("admin", "Patient", "FFFFFFF", "FFFFFFF"),
    ("admin", "Observation", "FFFFFFF", "FFFFFFF"),
    ("admin", "Condition", "FFFFFFF", "FFFFFFF"),
    ("admin", "Encounter", "FFFFFFF", "FFFFFFF"),
    ("admin", "MedicationRequest", "FFFFFFF", "FFFFFFF"),
    ("admin", "CareTeam", "FFFFFFF", "FFFFFFF"),
    ("admin", "Consent", "FFFFFFF", "FFFFFFF"),
    ("admin", "Practitioner", "FFFFFFF", "FFFFFFF"),
    ("admin", "Organization", "FFFFFFF", "FFFFFFF"),
    ("admin", "Claim", "FFFFFFF", "FFFFFFF"),
    ("admin", "AuditEvent", "FFFFFFF", "FFFFFFF"),
    // ---- security officer: incident response only, no FHIR data.
    ("security-officer", "Patient", "FFFFFFF", "FFFFFFF"),
    ("security-officer", "Observation", "FFFFFFF", "FFFFFFF"),
    ("security-officer", "Condition", "FFFFFFF", "FFFFFFF"),
    ("security-officer", "Encounter", "FFFFFFF", "FFFFFFF"),
    (
        "security-officer",
        "MedicationRequest",
        "FFFFFFF",
        "FFFFFFF",
    ),
    ("security-officer", "CareTeam", "FFFFFFF", "FFFFFFF"),
    ("security-officer", "Consent", "FFFFFFF", "FFFFFFF"),
    ("security-officer", "Practitioner", "FFFFFFF", "FFFFFFF"),
    ("security-officer", "Organization", "FFFFFFF", "FFFFFFF"),
    ("security-officer", "Claim", "FFFFFFF", "FFFFFFF"),
    ("security-officer", "AuditEvent", "FFFFFFF", "FFFFFFF"),
    // ---- physician: everything, but only for patients in their care.
    ("physician", "Patient", "YYYYYYY", "YFFFEFE"),
    ("physician", "Observation", "YYYYYYY", "FFFFEFE"),
    ("physician", "Condition", "YYYYYYY", "FFFFEFE"),
    ("physician", "Encounter", "YYYYYYY", "FFFFEFE"),
    ("physician", "MedicationRequest", "YYYYYYY", "FFFFEFE"),
    ("physician", "CareTeam", "YYYYYYY", "FFFFEFE"),
    ("physician", "Consent", "YYYYYYY", "FFFFEFE"),
    ("physician", "Practitioner", "YYYYYYY", "YYYYYYY"),
    ("physician", "Organization", "YYYYYYY", "YYYYYYY"),
    ("physician", "Claim", "YYYYYYY", "FFFFEFE"),
    ("physician", "AuditEvent", "YYYYYYY", "FFFFEFE"),
    // ---- nurse: patient data without delete, in their care; shared data read-only.
    ("nurse", "Patient", "YYYFYYY", "YFFFEFE"),
    ("nurse", "Observation", "YYYFYYY", "FFFFEFE"),
    ("nurse", "Condition", "YYYFYYY", "FFFFEFE"),
    ("nurse", "Encounter", "YYYFYYY", "FFFFEFE"),
    ("nurse", "MedicationRequest", "YYYFYYY", "FFFFEFE"),
    ("nurse", "CareTeam", "YYYFYYY", "FFFFEFE"),
    ("nurse", "Consent", "YYYFYYY", "FFFFEFE"),
    ("nurse", "Practitioner", "FYFFYYY", "FYFFYYY"),
    ("nurse", "Organization", "FYFFYYY", "FYFFYYY"),
    ("nurse", "Claim", "YYYFYYY", "FFFFEFE"),
    ("nurse", "AuditEvent", "YYYFYYY", "FFFFEFE"),
    // ---- registration clerk: demographics, encounters, care teams of anyone; no clinical data.
    ("registration-clerk", "Patient", "YYYFYYY", "YYYFYYY"),
    ("registration-clerk", "Observation", "FFFFFFF", "FFFFFFF"),
    ("registration-clerk", "Condition", "FFFFFFF", "FFFFFFF"),
    ("registration-clerk", "Encounter", "YYYFYYY", "YYYFYYY"),
    (
        "registration-clerk",
        "MedicationRequest",
        "FFFFFFF",
        "FFFFFFF",
    ),
    ("registration-clerk", "CareTeam", "YYYFYYY", "YYYFYYY"),
    ("registration-clerk", "Consent", "FFFFFFF", "FFFFFFF"),
    ("registration-clerk", "Practitioner", "FYFFYYY", "FYFFYYY"),
    ("registration-clerk", "Organization", "FYFFYYY", "FYFFYYY"),
    ("registration-clerk", "Claim", "FFFFFFF", "FFFFFFF"),
    ("registration-clerk", "AuditEvent", "FFFFFFF", "FFFFFFF"),
    // ---- billing: reads what a claim needs, writes claims.
    ("billing", "Patient", "FYFFYYY", "FYFFYYY"),
    ("billing", "Observation", "FFFFFFF", "FFFFFFF"),
    ("billing", "Condition", "FYFFYYY", "FYFFYYY"),
    ("billing", "Encounter", "FYFFYYY", "FYFFYYY"),
    ("billing", "MedicationRequest", "FFFFFFF", "FFFFFFF"),
    ("billing", "CareTeam", "FFFFFFF", "FFFFFFF"),
    ("billing", "Consent", "FFFFFFF", "FFFFFFF"),
    ("billing", "Practitioner", "FYFFYYY", "FYFFYYY"),
    ("billing", "Organization", "FYFFYYY", "FYFFYYY"),
    ("billing", "Claim", "YYYFYYY", "YYYFYYY"),
    ("billing", "AuditEvent", "FFFFFFF", "FFFFFFF"),
    // ---- researcher: de-identified exports only (not through FHIR reads).
    ("researcher", "Patient", "FFFFFFF", "FFFFFFF"),
    ("researcher", "Observation", "FFFFFFF", "FFFFFFF"),
    ("researcher", "Condition", "FFFFFFF", "FFFFFFF"),
    ("researcher", "Encounter", "FFFFFFF", "FFFFFFF"),
    ("researcher", "MedicationRequest", "FFFFFFF", "FFFFFFF"),
    ("researcher", "CareTeam", "FFFFFFF", "FFFFFFF"),
    ("researcher", "Consent", "FFFFFFF", "FFFFFFF"),
    ("researcher", "Practitioner", "FFFFFFF", "FFFFFFF"),
    ("researcher", "Organization", "FFFFFFF", "FFFFFFF"),
    ("researcher", "Claim", "FFFFFFF", "FFFFFFF"),
    ("researcher", "AuditEvent", "FFFFFFF", "FFFFFFF"),
    // ---- auditor: audit events only, of anyone, read-only.
    ("auditor", "Patient", "FFFFFFF", "FFFFFFF"),
    ("auditor", "Observation", "FFFFFFF", "FFFFFFF"),
    ("auditor", "Condition", "FFFFFFF", "FFFFFFF"),
    ("auditor", "Encounter", "FFFFFFF", "FFFFFFF"),
    ("auditor", "MedicationRequest", "FFFFFFF", "FFFFFFF"),
    ("auditor", "CareTeam", "FFFFFFF", "FFFFFFF"),
    ("auditor", "Consent", "FFFFFFF", "FFFFFFF"),
    ("auditor", "Practitioner", "FFFFFFF", "FFFFFFF"),
    ("auditor", "Organization", "FFFFFFF", "FFFFFFF"),
    ("auditor", "Claim", "FFFFFFF", "FFFFFFF"),
    ("auditor", "AuditEvent", "FYFFYYY", "FYFFYYY"),
    // ---- patient (user of patient A): reads their own record; others' do not exist for them.
    ("patient", "Patient", "FYFFYYY", "FNFFENE"),
    ("patient", "Observation", "FYFFYYY", "FNFFENE"),
    ("patient", "Condition", "FYFFYYY", "FNFFENE"),
    ("patient", "Encounter", "FYFFYYY", "FNFFENE"),
    ("patient", "MedicationRequest", "FYFFYYY", "FNFFENE"),
    ("patient", "CareTeam", "FYFFYYY", "FNFFENE"),
    ("patient", "Consent", "FYFFYYY", "FNFFENE"),
    ("patient", "Practitioner", "FYFFYYY", "FYFFYYY"),
    ("patient", "Organization", "FYFFYYY", "FYFFYYY"),
    ("patient", "Claim", "FYFFYYY", "FNFFENE"),
    ("patient", "AuditEvent", "FYFFYYY", "FNFFENE"),
    // ---- backend service client (system/*.cruds, role service): everything.
    ("service", "Patient", "YYYYYYY", "YYYYYYY"),
    ("service", "Observation", "YYYYYYY", "YYYYYYY"),
    ("service", "Condition", "YYYYYYY", "YYYYYYY"),
    ("service", "Encounter", "YYYYYYY", "YYYYYYY"),
    ("service", "MedicationRequest", "YYYYYYY", "YYYYYYY"),
    ("service", "CareTeam", "YYYYYYY", "YYYYYYY"),
    ("service", "Consent", "YYYYYYY", "YYYYYYY"),
    ("service", "Practitioner", "YYYYYYY", "YYYYYYY"),
    ("service", "Organization", "YYYYYYY", "YYYYYYY"),
    ("service", "Claim", "YYYYYYY", "YYYYYYY"),
    ("service", "AuditEvent", "YYYYYYY", "YYYYYYY"),
];

const ROLES: [&str; 10] = [
    "admin",
    "security-officer",
    "physician",
    "nurse",
    "registration-clerk",
    "billing",
    "researcher",
    "auditor",
    "patient",
    "service",
];

/// A new resource of `rtype` in `patient`'s compartment (or shared).
fn new_body(rtype: &str, patient: &str, tag: &str) -> Value {
    match rtype {
        "Patient" => patient_body(&format!("New{tag}")),
        "Observation" => observation_body(patient),
        "Condition" => condition_body(patient),
        "Encounter" => encounter_body(patient),
        "MedicationRequest" => medication_request_body(patient),
        // A team nobody is on: it must not create a relationship.
        "CareTeam" => care_team_body(patient, "proposed", &[]),
        // A permit: no deny rule comes out of it.
        "Consent" => consent_body(patient, serde_json::json!({ "type": "permit" })),
        "Practitioner" => practitioner_body(&format!("Shared{tag}")),
        "Organization" => organization_body(&format!("Shared {tag}")),
        "Claim" => claim_body(patient),
        "AuditEvent" => audit_event_body(patient),
        other => panic!("no fixture for {other}"),
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Got {
    Allowed,
    Hidden,
    Forbidden(String),
    NotFound(String),
    Other(String),
}

impl Got {
    fn code(&self) -> char {
        match self {
            Got::Allowed => 'Y',
            Got::Hidden => 'E',
            Got::Forbidden(_) => 'F',
            Got::NotFound(_) => 'N',
            Got::Other(_) => '?',
        }
    }
    fn message(&self) -> &str {
        match self {
            Got::Forbidden(m) | Got::NotFound(m) | Got::Other(m) => m,
            _ => "",
        }
    }
    fn from_err(e: FhirError) -> Got {
        match e.kind {
            ErrorKind::Forbidden => Got::Forbidden(e.message),
            ErrorKind::NotFound => Got::NotFound(e.message),
            k => Got::Other(format!("{k:?}: {}", e.message)),
        }
    }
}

fn history_has(bundle: &Value, rtype: &str, id: &str) -> bool {
    let suffix = format!("/{rtype}/{id}");
    bundle
        .get("entry")
        .and_then(Value::as_array)
        .is_some_and(|a| {
            a.iter().any(|e| {
                e.get("fullUrl")
                    .and_then(Value::as_str)
                    .is_some_and(|u| u.ends_with(&suffix))
            })
        })
}

struct Fixture {
    id: String,
    body: Value,
}

#[allow(clippy::too_many_arguments)]
async fn run_cell(
    unrestricted: &Records,
    guarded: &Records,
    rtype: &str,
    interaction: &str,
    patient_id: &str,
    fixture: &Fixture,
    tag: &str,
) -> Got {
    let result: Result<Got, FhirError> = match interaction {
        "create" => guarded
            .create(rtype, new_body(rtype, patient_id, tag), None)
            .await
            .map(|_| Got::Allowed),
        "read" => guarded.read(rtype, &fixture.id).await.map(|_| Got::Allowed),
        "update" => guarded
            .update(rtype, &fixture.id, fixture.body.clone(), None)
            .await
            .map(|_| Got::Allowed),
        "delete" => match guarded.delete(rtype, &fixture.id).await {
            Ok(()) => {
                // Put the fixture back for the cells that follow.
                unrestricted
                    .update(rtype, &fixture.id, fixture.body.clone(), None)
                    .await
                    .unwrap_or_else(|e| panic!("restore {rtype}/{}: {e:?}", fixture.id));
                Ok(Got::Allowed)
            }
            Err(e) => Err(e),
        },
        "search" => search(guarded, rtype, &[("_id", &fixture.id)])
            .await
            .map(|b| {
                if bundle_has(&b, rtype, &fixture.id) {
                    Got::Allowed
                } else {
                    Got::Hidden
                }
            }),
        "history-instance" => guarded
            .history(Some(rtype), Some(&fixture.id), Vec::new(), BASE)
            .await
            .map(|b| {
                if history_has(&b, rtype, &fixture.id) {
                    Got::Allowed
                } else {
                    Got::Hidden
                }
            }),
        "history-type" => guarded
            .history(
                Some(rtype),
                None,
                vec![("_count".into(), "1000".into())],
                BASE,
            )
            .await
            .map(|b| {
                if history_has(&b, rtype, &fixture.id) {
                    Got::Allowed
                } else {
                    Got::Hidden
                }
            }),
        other => panic!("unknown interaction {other}"),
    };
    result.unwrap_or_else(Got::from_err)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_role_type_interaction_and_relationship() {
    let env = env(AuthConfig::default()).await;
    let records = &env.records;
    let auth = &env.auth;

    // People and the relationship.
    let phys_prac = create(records, practitioner_body("Physician")).await;
    let nurse_prac = create(records, practitioner_body("Nurse")).await;
    let pa = create(records, patient_body("Alpha")).await;
    let pb = create(records, patient_body("Beta")).await;
    create(
        records,
        care_team_body(&pa, "active", &[&phys_prac, &nurse_prac]),
    )
    .await;

    // One target resource per type and patient.
    let mut fixtures: BTreeMap<(&str, char), Fixture> = BTreeMap::new();
    for rtype in TYPES {
        for (col, pid) in [('A', &pa), ('B', &pb)] {
            let (id, body) = if rtype == "Patient" {
                let (o, _) = (records.read("Patient", pid).await.unwrap(), ());
                (pid.clone(), o.resource)
            } else {
                let body = new_body(rtype, pid, &format!("Fixture{col}"));
                let (o, _) = records.create(rtype, body, None).await.unwrap();
                (o.id.clone(), o.resource)
            };
            // The fixture lies where the table assumes it does.
            let o = records.read(rtype, &id).await.unwrap();
            let expected_key = if matches!(rtype, "Practitioner" | "Organization") {
                "shared".to_string()
            } else {
                format!("patient/{pid}")
            };
            assert_eq!(
                o.key_name, expected_key,
                "fixture {rtype} for patient {col} is in the wrong compartment"
            );
            fixtures.insert((rtype, col), Fixture { id, body });
        }
    }

    // Callers: one user per role (each signs in once), and a backend client.
    let mut tokens: BTreeMap<&str, String> = BTreeMap::new();
    for name in ROLES {
        if name == "service" {
            let client = register_client(auth, "backend-service", "system/*.cruds").await;
            let t = client
                .token(auth, "system/*.cruds")
                .await
                .expect("client token");
            assert_eq!(t.scope, "system/*.cruds");
            tokens.insert(name, t.access_token);
            continue;
        }
        let role = Role::parse(name).unwrap();
        let (prac, pat) = match role {
            Role::Physician => (Some(phys_prac.as_str()), None),
            Role::Nurse => (Some(nurse_prac.as_str()), None),
            Role::Patient => (None, Some(pa.as_str())),
            _ => (None, None),
        };
        let user = add_user(auth, &format!("user-{name}"), role, prac, pat).await;
        tokens.insert(name, user.token(auth).await);
    }

    let expected: BTreeMap<(&str, &str), (&str, &str)> = EXPECTED
        .iter()
        .map(|(r, t, a, b)| ((*r, *t), (*a, *b)))
        .collect();
    assert_eq!(expected.len(), ROLES.len() * TYPES.len(), "table complete");

    let mut failures: Vec<String> = Vec::new();
    let mut grid: Vec<String> = Vec::new();
    let mut n = 0usize;
    for role in ROLES {
        for rtype in TYPES {
            let (ea, eb) = expected[&(role, rtype)];
            let mut line = format!("{role:<19}{rtype:<18}");
            for (col, pid, want_row) in [('A', &pa, ea), ('B', &pb, eb)] {
                let want_row: Vec<char> = want_row.chars().collect();
                assert_eq!(want_row.len(), INTERACTIONS.len(), "row {role} {rtype}");
                let mut got_row = String::new();
                for (i, interaction) in INTERACTIONS.iter().enumerate() {
                    n += 1;
                    // A fresh guard per request, as the server builds one.
                    let (guarded, _) = caller(auth, records, &tokens[role], None, None).await;
                    let fixture = &fixtures[&(rtype, col)];
                    let got = run_cell(
                        records,
                        &guarded,
                        rtype,
                        interaction,
                        pid,
                        fixture,
                        &format!("{role}{col}{i}"),
                    )
                    .await;
                    got_row.push(got.code());
                    if got.code() != want_row[i] {
                        failures.push(format!(
                            "{role:<19} {rtype:<18} {interaction:<17} {col}  expected {}  got {}  {}",
                            want_row[i],
                            got.code(),
                            got.message()
                        ));
                    }
                }
                line.push_str(&format!(
                    " {col}: {got_row} (want {})",
                    want_row.iter().collect::<String>()
                ));
            }
            grid.push(line);
        }
    }
    assert_eq!(n, 10 * 11 * 7 * 2);
    if !failures.is_empty() {
        panic!(
            "{} of {n} cells differ from the expected table\n\
             role               type               interaction       patient expected got message\n{}\n\n\
             full matrix (columns: {}):\n{}",
            failures.len(),
            failures.join("\n"),
            INTERACTIONS.join(" "),
            grid.join("\n")
        );
    }
}

/// Searches without `_id`: a clinician's search of a type returns the
/// patients in their care and never patient B's resources.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfiltered_searches_never_show_unrelated_patients() {
    let env = env(AuthConfig::default()).await;
    let records = &env.records;
    let auth = &env.auth;
    let prac = create(records, practitioner_body("Physician")).await;
    let pa = create(records, patient_body("Alpha")).await;
    let pb = create(records, patient_body("Beta")).await;
    create(records, care_team_body(&pa, "active", &[&prac])).await;
    let oa = create(records, observation_body(&pa)).await;
    let ob = create(records, observation_body(&pb)).await;
    let phys = add_user(auth, "doc", Role::Physician, Some(&prac), None).await;
    let pat = add_user(auth, "pat", Role::Patient, None, Some(&pa)).await;
    let clerk = add_user(auth, "clerk", Role::RegistrationClerk, None, None).await;
    for (who, token) in [
        ("physician", phys.token(auth).await),
        ("patient", pat.token(auth).await),
    ] {
        let guarded = as_user(auth, records, &token).await;
        let b_ref = format!("Patient/{pb}");
        for (params, sees_a, want_total) in [
            (vec![], true, None),
            (vec![("_total", "accurate")], true, Some(1)),
            (
                vec![("subject", b_ref.as_str()), ("_total", "accurate")],
                false,
                Some(0),
            ),
            (vec![("_summary", "count")], false, Some(1)),
        ] {
            let b = search(&guarded, "Observation", &params).await.unwrap();
            assert!(
                !bundle_has(&b, "Observation", &ob),
                "{who} sees B's observation with {params:?}"
            );
            assert_eq!(
                bundle_has(&b, "Observation", &oa),
                sees_a,
                "{who}: A's observation with {params:?}"
            );
            if want_total.is_some() {
                assert_eq!(total(&b), want_total, "{who}: total with {params:?}");
            }
        }
        let b = search(&guarded, "Patient", &[]).await.unwrap();
        assert!(bundle_has(&b, "Patient", &pa), "{who} misses patient A");
        assert!(!bundle_has(&b, "Patient", &pb), "{who} sees patient B");
    }
    // A role with any-patient reach sees both patients.
    let guarded = as_user(auth, records, &clerk.token(auth).await).await;
    let b = search(&guarded, "Patient", &[]).await.unwrap();
    assert!(bundle_has(&b, "Patient", &pa) && bundle_has(&b, "Patient", &pb));
}
