//! The relationship rules (CareTeam, Encounter, general practitioner),
//! Consent overrides (actor, purpose, nested exceptions), break-the-glass,
//! patient users against other patients' data, and relationship changes
//! taking effect on the next request.
mod common;

use common::*;
use custos_auth::{AuthConfig, AuthService, Decision, Role};
use custos_fhir::ErrorKind;
use custos_records::Records;
use serde_json::{Value, json};

/// Read `rtype/id` as the bearer of `token`; the result and the decisions.
async fn read_as(
    auth: &AuthService,
    records: &Records,
    token: &str,
    purpose: Option<&str>,
    break_glass: Option<&str>,
    rtype: &str,
    id: &str,
) -> (Result<(), custos_fhir::FhirError>, Vec<Decision>) {
    let (guarded, guard) = caller(auth, records, token, purpose, break_glass).await;
    let r = guarded.read(rtype, id).await.map(|_| ());
    (r, guard.take_decisions())
}

/// The rule of the decision about `rtype/id`.
fn rule_for(decisions: &[Decision], rtype: &str, id: &str) -> Option<(bool, String)> {
    decisions
        .iter()
        .rev()
        .find(|d| d.rtype.as_deref() == Some(rtype) && d.id.as_deref() == Some(id))
        .map(|d| (d.allowed, d.rule.to_string()))
}

fn assert_allowed(
    what: &str,
    r: &(Result<(), custos_fhir::FhirError>, Vec<Decision>),
    rtype: &str,
    id: &str,
    rule: &str,
) {
    assert!(r.0.is_ok(), "{what}: refused: {:?}", r.0);
    assert_eq!(
        rule_for(&r.1, rtype, id),
        Some((true, rule.to_string())),
        "{what}: decisions {:?}",
        r.1
    );
}

fn assert_refused(
    what: &str,
    r: &(Result<(), custos_fhir::FhirError>, Vec<Decision>),
    kind: ErrorKind,
    rule: &str,
) {
    match &r.0 {
        Err(e) => assert_eq!(e.kind, kind, "{what}: {e:?}"),
        Ok(()) => panic!("{what}: allowed, decisions {:?}", r.1),
    }
    assert!(
        r.1.iter().any(|d| !d.allowed && d.rule == rule),
        "{what}: no refusal with rule {rule} in {:?}",
        r.1
    );
}

async fn observations_seen(
    auth: &AuthService,
    records: &Records,
    token: &str,
    purpose: Option<&str>,
) -> Vec<String> {
    let (guarded, _) = caller(auth, records, token, purpose, None).await;
    let b = search(&guarded, "Observation", &[("_count", "1000")])
        .await
        .expect("search allowed");
    bundle_refs(&b).into_iter().map(|(_, id)| id).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn care_team_relationship_needs_an_active_team() {
    let env = env(AuthConfig::default()).await;
    let (records, auth) = (&env.records, &env.auth);
    let p_active = create(records, practitioner_body("Active")).await;
    let p_inactive = create(records, practitioner_body("Inactive")).await;
    let p_proposed = create(records, practitioner_body("Proposed")).await;
    let pa = create(records, patient_body("Alpha")).await;
    create(records, care_team_body(&pa, "active", &[&p_active])).await;
    create(records, care_team_body(&pa, "inactive", &[&p_inactive])).await;
    create(records, care_team_body(&pa, "proposed", &[&p_proposed])).await;
    let obs = create(records, observation_body(&pa)).await;
    let t_active = add_user(auth, "active", Role::Physician, Some(&p_active), None)
        .await
        .token(auth)
        .await;
    let t_inactive = add_user(auth, "inactive", Role::Nurse, Some(&p_inactive), None)
        .await
        .token(auth)
        .await;
    let t_proposed = add_user(auth, "proposed", Role::Physician, Some(&p_proposed), None)
        .await
        .token(auth)
        .await;

    let r = read_as(auth, records, &t_active, None, None, "Observation", &obs).await;
    assert_allowed("active team", &r, "Observation", &obs, "care-team");
    let r = read_as(auth, records, &t_inactive, None, None, "Observation", &obs).await;
    assert_refused("inactive team", &r, ErrorKind::Forbidden, "no-relationship");
    let r = read_as(auth, records, &t_proposed, None, None, "Observation", &obs).await;
    assert_refused("proposed team", &r, ErrorKind::Forbidden, "no-relationship");
    assert!(
        observations_seen(auth, records, &t_active, None)
            .await
            .contains(&obs)
    );
    assert!(
        !observations_seen(auth, records, &t_inactive, None)
            .await
            .contains(&obs)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encounter_relationship_lasts_the_configured_window() {
    let env = env(AuthConfig::default()).await;
    let (records, auth) = (&env.records, &env.auth);
    let p_recent = create(records, practitioner_body("Recent")).await;
    let p_old = create(records, practitioner_body("Old")).await;
    let p_ongoing = create(records, practitioner_body("Ongoing")).await;
    let pc = create(records, patient_body("Gamma")).await;
    create(records, encounter_with(&pc, &p_recent, 3, 2)).await;
    create(records, encounter_with(&pc, &p_old, 61, 60)).await;
    // An encounter that began long ago and has not ended yet.
    let mut ongoing = encounter_with(&pc, &p_ongoing, 90, 0);
    ongoing["status"] = json!("in-progress");
    ongoing["period"].as_object_mut().unwrap().remove("end");
    create(records, ongoing).await;
    let obs = create(records, observation_body(&pc)).await;
    let u_recent = add_user(auth, "recent", Role::Physician, Some(&p_recent), None).await;
    let u_old = add_user(auth, "old", Role::Physician, Some(&p_old), None).await;
    let u_ongoing = add_user(auth, "ongoing", Role::Nurse, Some(&p_ongoing), None).await;
    let t_recent = u_recent.token(auth).await;
    let t_old = u_old.token(auth).await;
    let t_ongoing = u_ongoing.token(auth).await;

    let r = read_as(auth, records, &t_recent, None, None, "Observation", &obs).await;
    assert_allowed(
        "encounter ended 2 days ago",
        &r,
        "Observation",
        &obs,
        "encounter",
    );
    let r = read_as(auth, records, &t_ongoing, None, None, "Observation", &obs).await;
    assert_allowed(
        "encounter still in progress",
        &r,
        "Observation",
        &obs,
        "encounter",
    );
    let r = read_as(auth, records, &t_old, None, None, "Observation", &obs).await;
    assert_refused(
        "encounter ended 60 days ago (30-day window)",
        &r,
        ErrorKind::Forbidden,
        "no-relationship",
    );
    assert!(
        !observations_seen(auth, records, &t_old, None)
            .await
            .contains(&obs)
    );
    // (That the recent encounter also opens searches is checked in
    // `encounter_relationship_opens_searches_too`.)

    // The same data under a 90-day window: the old encounter counts.
    let wide = open_auth(
        records,
        AuthConfig {
            encounter_window_days: 90,
            ..AuthConfig::default()
        },
        ISSUER,
    )
    .await;
    let r = read_as(&wide, records, &t_old, None, None, "Observation", &obs).await;
    assert_allowed(
        "encounter ended 60 days ago (90-day window)",
        &r,
        "Observation",
        &obs,
        "encounter",
    );
}

/// A clinician whose only relationship is a recent encounter can read the
/// patient's resources one by one; their searches must show them too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encounter_relationship_opens_searches_too() {
    let env = env(AuthConfig::default()).await;
    let (records, auth) = (&env.records, &env.auth);
    let p = create(records, practitioner_body("Recent")).await;
    let pc = create(records, patient_body("Gamma")).await;
    let enc = create(records, encounter_with(&pc, &p, 3, 2)).await;
    let obs = create(records, observation_body(&pc)).await;
    let since = (now_secs() - 30 * 86_400) * 1_000_000;
    // The record service's own answer: the patient, not the encounter.
    let related = records.related_patients(&p, since, 100).await.unwrap();
    assert_eq!(
        related,
        vec![pc.clone()],
        "related patients (encounter {enc})"
    );
    let t = add_user(auth, "recent", Role::Physician, Some(&p), None)
        .await
        .token(auth)
        .await;
    let r = read_as(auth, records, &t, None, None, "Observation", &obs).await;
    assert_allowed("read", &r, "Observation", &obs, "encounter");
    assert!(
        observations_seen(auth, records, &t, None)
            .await
            .contains(&obs),
        "the search leaves out a patient the clinician may read"
    );
    let (g, _) = caller(auth, records, &t, None, None).await;
    let h = g
        .history(Some("Observation"), None, Vec::new(), BASE)
        .await
        .unwrap();
    assert!(bundle_has(&h, "Observation", &obs), "type history: {h}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn general_practitioner_relationship() {
    let env = env(AuthConfig::default()).await;
    let (records, auth) = (&env.records, &env.auth);
    let gp = create(records, practitioner_body("Gp")).await;
    let other = create(records, practitioner_body("Other")).await;
    let mut body = patient_body("Delta");
    body["generalPractitioner"] = json!([{ "reference": format!("Practitioner/{gp}") }]);
    let pd = create(records, body).await;
    let obs = create(records, observation_body(&pd)).await;
    let t_gp = add_user(auth, "gp", Role::Physician, Some(&gp), None)
        .await
        .token(auth)
        .await;
    let t_other = add_user(auth, "other", Role::Physician, Some(&other), None)
        .await
        .token(auth)
        .await;
    let r = read_as(auth, records, &t_gp, None, None, "Observation", &obs).await;
    assert_allowed(
        "general practitioner",
        &r,
        "Observation",
        &obs,
        "general-practitioner",
    );
    let r = read_as(auth, records, &t_gp, None, None, "Patient", &pd).await;
    assert_allowed(
        "general practitioner, the Patient",
        &r,
        "Patient",
        &pd,
        "general-practitioner",
    );
    let r = read_as(auth, records, &t_other, None, None, "Observation", &obs).await;
    assert_refused(
        "other physician",
        &r,
        ErrorKind::Forbidden,
        "no-relationship",
    );
}

/// Patient A with a CareTeam of X and Y; the patient's consent denies X.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consent_deny_names_one_practitioner() {
    let env = env(AuthConfig::default()).await;
    let (records, auth) = (&env.records, &env.auth);
    let x = create(records, practitioner_body("Xavier")).await;
    let y = create(records, practitioner_body("Yvonne")).await;
    let pa = create(records, patient_body("Alpha")).await;
    create(records, care_team_body(&pa, "active", &[&x, &y])).await;
    let obs = create(records, observation_body(&pa)).await;
    let tx = add_user(auth, "x", Role::Physician, Some(&x), None)
        .await
        .token(auth)
        .await;
    let ty = add_user(auth, "y", Role::Nurse, Some(&y), None)
        .await
        .token(auth)
        .await;
    let tp = add_user(auth, "alpha", Role::Patient, None, Some(&pa))
        .await
        .token(auth)
        .await;

    // Before any consent: both allowed.
    let r = read_as(auth, records, &tx, None, None, "Observation", &obs).await;
    assert_allowed("X before the consent", &r, "Observation", &obs, "care-team");

    // An inactive deny changes nothing.
    let mut inactive = consent_body(
        &pa,
        json!({ "type": "deny", "actor": [actor(&format!("Practitioner/{x}"))] }),
    );
    inactive["status"] = json!("inactive");
    create(records, inactive).await;
    let r = read_as(auth, records, &tx, None, None, "Observation", &obs).await;
    assert_allowed("X, inactive consent", &r, "Observation", &obs, "care-team");

    // The active deny takes effect on the next request.
    create(
        records,
        consent_body(
            &pa,
            json!({ "type": "deny", "actor": [actor(&format!("Practitioner/{x}"))] }),
        ),
    )
    .await;
    let r = read_as(auth, records, &tx, None, None, "Observation", &obs).await;
    assert_refused("X, denied", &r, ErrorKind::Forbidden, "consent-deny");
    let r = read_as(auth, records, &tx, None, None, "Patient", &pa).await;
    assert_refused("X, the Patient", &r, ErrorKind::Forbidden, "consent-deny");
    // Breaking the glass does not override a consent (default configuration).
    let r = read_as(
        auth,
        records,
        &tx,
        None,
        Some("emergency"),
        "Observation",
        &obs,
    )
    .await;
    assert_refused(
        "X, denied, breaking the glass",
        &r,
        ErrorKind::Forbidden,
        "consent-deny",
    );
    // Nor can X write into A's compartment.
    let (gx, _) = caller(auth, records, &tx, None, None).await;
    let w = gx.create("Observation", observation_body(&pa), None).await;
    assert!(is_kind(&w, ErrorKind::Forbidden), "X writes: {w:?}");
    // X's searches and histories leave A out; Y's include A.
    assert!(
        !observations_seen(auth, records, &tx, None)
            .await
            .contains(&obs)
    );
    let h = gx
        .history(Some("Observation"), None, Vec::new(), BASE)
        .await
        .unwrap();
    assert!(bundle_refs(&h).is_empty(), "X's history: {h}");
    let r = read_as(auth, records, &ty, None, None, "Observation", &obs).await;
    assert_allowed("Y, not named", &r, "Observation", &obs, "care-team");
    assert!(
        observations_seen(auth, records, &ty, None)
            .await
            .contains(&obs)
    );
    // The patient's own consent never locks the patient out.
    let r = read_as(auth, records, &tp, None, None, "Observation", &obs).await;
    assert_allowed("the patient", &r, "Observation", &obs, "own-record");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consent_deny_for_a_purpose_applies_to_that_purpose_only() {
    let env = env(AuthConfig::default()).await;
    let (records, auth) = (&env.records, &env.auth);
    let y = create(records, practitioner_body("Yvonne")).await;
    let pa = create(records, patient_body("Alpha")).await;
    let pb = create(records, patient_body("Beta")).await;
    create(records, care_team_body(&pa, "active", &[&y])).await;
    let enc_a = create(records, encounter_body(&pa)).await;
    let enc_b = create(records, encounter_body(&pb)).await;
    let obs = create(records, observation_body(&pa)).await;
    // No payment use of A's data, by anyone.
    create(
        records,
        consent_body(
            &pa,
            json!({ "type": "deny", "purpose": [purpose("HPAYMT")] }),
        ),
    )
    .await;
    let ty = add_user(auth, "y", Role::Physician, Some(&y), None)
        .await
        .token(auth)
        .await;
    let tb = add_user(auth, "billing", Role::Billing, None, None)
        .await
        .token(auth)
        .await;

    // The physician treats (the default purpose): allowed.
    let r = read_as(auth, records, &ty, None, None, "Observation", &obs).await;
    assert_allowed("treatment", &r, "Observation", &obs, "care-team");
    // The same physician stating payment as the purpose: refused.
    let r = read_as(
        auth,
        records,
        &ty,
        Some("HPAYMT"),
        None,
        "Observation",
        &obs,
    )
    .await;
    assert_refused("payment purpose", &r, ErrorKind::Forbidden, "consent-deny");
    assert!(
        !observations_seen(auth, records, &ty, Some("HPAYMT"))
            .await
            .contains(&obs)
    );
    // Billing's own purpose is payment: A is refused and hidden, B is not.
    let r = read_as(auth, records, &tb, None, None, "Encounter", &enc_a).await;
    assert_refused("billing on A", &r, ErrorKind::Forbidden, "consent-deny");
    let r = read_as(auth, records, &tb, None, None, "Encounter", &enc_b).await;
    assert_allowed("billing on B", &r, "Encounter", &enc_b, "role:billing");
    let (gb, _) = caller(auth, records, &tb, None, None).await;
    let b = search(&gb, "Encounter", &[("_total", "accurate")])
        .await
        .unwrap();
    assert!(!bundle_has(&b, "Encounter", &enc_a), "billing sees A: {b}");
    assert!(bundle_has(&b, "Encounter", &enc_b));
    assert_eq!(total(&b), Some(1), "the total leaves A out");
    let h = gb
        .history(Some("Encounter"), None, Vec::new(), BASE)
        .await
        .unwrap();
    assert!(!bundle_refs(&h).iter().any(|(_, id)| id == &enc_a));
    // A purpose the consent does not name is not denied.
    let r = read_as(
        auth,
        records,
        &tb,
        Some("HOPERAT"),
        None,
        "Encounter",
        &enc_a,
    )
    .await;
    assert_allowed(
        "billing, operations",
        &r,
        "Encounter",
        &enc_a,
        "role:billing",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nested_provisions_carve_exceptions() {
    let env = env(AuthConfig::default()).await;
    let (records, auth) = (&env.records, &env.auth);
    let x = create(records, practitioner_body("Xavier")).await;
    let y = create(records, practitioner_body("Yvonne")).await;
    let pa = create(records, patient_body("Alpha")).await;
    let pb = create(records, patient_body("Beta")).await;
    create(records, care_team_body(&pa, "active", &[&x, &y])).await;
    create(records, care_team_body(&pb, "active", &[&x, &y])).await;
    let obs_a = create(records, observation_body(&pa)).await;
    let obs_b = create(records, observation_body(&pb)).await;
    // A: deny everyone, except Y.
    create(
        records,
        consent_body(
            &pa,
            json!({
                "type": "deny",
                "provision": [{ "type": "permit", "actor": [actor(&format!("Practitioner/{y}"))] }],
            }),
        ),
    )
    .await;
    // B: permit, with a nested deny of X.
    create(
        records,
        consent_body(
            &pb,
            json!({
                "type": "permit",
                "provision": [{ "type": "deny", "actor": [actor(&format!("Practitioner/{x}"))] }],
            }),
        ),
    )
    .await;
    let tx = add_user(auth, "x", Role::Physician, Some(&x), None)
        .await
        .token(auth)
        .await;
    let ty = add_user(auth, "y", Role::Physician, Some(&y), None)
        .await
        .token(auth)
        .await;
    let r = read_as(auth, records, &tx, None, None, "Observation", &obs_a).await;
    assert_refused(
        "A: X under the deny",
        &r,
        ErrorKind::Forbidden,
        "consent-deny",
    );
    let r = read_as(auth, records, &ty, None, None, "Observation", &obs_a).await;
    assert_allowed("A: Y excepted", &r, "Observation", &obs_a, "care-team");
    let r = read_as(auth, records, &tx, None, None, "Observation", &obs_b).await;
    assert_refused("B: X denied", &r, ErrorKind::Forbidden, "consent-deny");
    let r = read_as(auth, records, &ty, None, None, "Observation", &obs_b).await;
    assert_allowed("B: Y permitted", &r, "Observation", &obs_b, "care-team");
    let seen_x = observations_seen(auth, records, &tx, None).await;
    assert!(!seen_x.contains(&obs_a) && !seen_x.contains(&obs_b));
    let seen_y = observations_seen(auth, records, &ty, None).await;
    assert!(seen_y.contains(&obs_a) && seen_y.contains(&obs_b));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn break_the_glass_grants_one_patient_for_a_while() {
    let env = env(AuthConfig::default()).await;
    let (records, auth) = (&env.records, &env.auth);
    let z = create(records, practitioner_body("Zed")).await;
    let pf = create(records, patient_body("Foxtrot")).await;
    let pg = create(records, patient_body("Golf")).await;
    let obs_f = create(records, observation_body(&pf)).await;
    let obs_g = create(records, observation_body(&pg)).await;
    let tz = add_user(auth, "zed", Role::Physician, Some(&z), None)
        .await
        .token(auth)
        .await;
    let tp = add_user(auth, "golf", Role::Patient, None, Some(&pg))
        .await
        .token(auth)
        .await;
    let reason = "unconscious patient in the emergency room";

    let r = read_as(auth, records, &tz, None, None, "Observation", &obs_f).await;
    assert_refused("no reason", &r, ErrorKind::Forbidden, "no-relationship");

    let (g, guard) = caller(auth, records, &tz, None, Some(reason)).await;
    assert_eq!(guard.break_glass_reason(), Some(reason));
    assert_eq!(
        guard.purpose(),
        "ETREAT",
        "breaking the glass is emergency treatment"
    );
    g.read("Observation", &obs_f)
        .await
        .expect("break the glass");
    assert_eq!(
        rule_for(&guard.take_decisions(), "Observation", &obs_f),
        Some((true, "break-glass".to_string()))
    );

    // The grant lasts: no reason needed for F now, for any of F's data…
    let r = read_as(auth, records, &tz, None, None, "Observation", &obs_f).await;
    assert_allowed("F later", &r, "Observation", &obs_f, "break-glass");
    let r = read_as(auth, records, &tz, None, None, "Patient", &pf).await;
    assert_allowed("F's Patient later", &r, "Patient", &pf, "break-glass");
    let seen = observations_seen(auth, records, &tz, None).await;
    assert!(seen.contains(&obs_f), "F in searches after the grant");
    assert!(!seen.contains(&obs_g), "G is not granted");
    // …but not for another patient.
    let r = read_as(auth, records, &tz, None, None, "Observation", &obs_g).await;
    assert_refused("G", &r, ErrorKind::Forbidden, "no-relationship");

    // The grant is kept in the store: a restarted service honours it.
    let restarted = open_auth(records, AuthConfig::default(), ISSUER).await;
    let r = read_as(&restarted, records, &tz, None, None, "Observation", &obs_f).await;
    assert_allowed(
        "F after a restart",
        &r,
        "Observation",
        &obs_f,
        "break-glass",
    );

    // Roles that may not break the glass gain nothing by stating a reason.
    let r = read_as(
        auth,
        records,
        &tp,
        None,
        Some(reason),
        "Observation",
        &obs_f,
    )
    .await;
    assert!(
        is_kind(&r.0, ErrorKind::NotFound),
        "patient user breaking the glass: {:?}",
        r.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn break_the_glass_grant_expires() {
    let env = env(AuthConfig {
        break_glass_minutes: 0,
        ..AuthConfig::default()
    })
    .await;
    let (records, auth) = (&env.records, &env.auth);
    let z = create(records, practitioner_body("Zed")).await;
    let pf = create(records, patient_body("Foxtrot")).await;
    let obs_f = create(records, observation_body(&pf)).await;
    let tz = add_user(auth, "zed", Role::Physician, Some(&z), None)
        .await
        .token(auth)
        .await;
    let r = read_as(
        auth,
        records,
        &tz,
        None,
        Some("emergency"),
        "Observation",
        &obs_f,
    )
    .await;
    assert_allowed("with a reason", &r, "Observation", &obs_f, "break-glass");
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let r = read_as(auth, records, &tz, None, None, "Observation", &obs_f).await;
    assert_refused("expired grant", &r, ErrorKind::Forbidden, "no-relationship");
}

/// A patient user (of A) against B's data through every path that returns
/// resources: search with _include/_revinclude, totals, histories, batch
/// and transaction Bundles.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patient_user_never_sees_other_patients() {
    let env = env(AuthConfig::default()).await;
    let (records, auth) = (&env.records, &env.auth);
    let pa = create(records, patient_body("Alpha")).await;
    let pb = create(records, patient_body("Beta")).await;
    let org = create(records, organization_body("Clinic")).await;
    let ref_a = format!("Patient/{pa}");
    let ref_b = format!("Patient/{pb}");
    // In A's compartment, naming B as performer.
    let mut a1 = observation_body(&pa);
    a1["performer"] =
        json!([{ "reference": ref_b }, { "reference": format!("Organization/{org}") }]);
    let a1 = create(records, a1).await;
    let a2 = create(records, observation_body(&pa)).await;
    // In B's compartment, one naming A as performer.
    let b1 = create(records, observation_body(&pb)).await;
    let mut b2 = observation_body(&pb);
    b2["performer"] = json!([{ "reference": ref_a }]);
    let b2 = create(records, b2).await;
    let cond_b = create(records, condition_body(&pb)).await;
    // B's data gets a second version (history).
    let mut b1_body = records.read("Observation", &b1).await.unwrap().resource;
    b1_body["status"] = json!("amended");
    records
        .update("Observation", &b1, b1_body, None)
        .await
        .unwrap();

    let b_ids = [pb.clone(), b1.clone(), b2.clone(), cond_b.clone()];
    let leaks = |v: &Value| -> Vec<String> {
        let mut found = Vec::new();
        collect_resources(v, &mut found);
        found
            .into_iter()
            .filter(|(_, id)| b_ids.contains(id))
            .map(|(t, id)| format!("{t}/{id}"))
            .collect()
    };

    let tp = add_user(auth, "alpha", Role::Patient, None, Some(&pa))
        .await
        .token(auth)
        .await;
    let g = as_user(auth, records, &tp).await;

    // Search with totals.
    let b = search(&g, "Observation", &[("_total", "accurate")])
        .await
        .unwrap();
    assert_eq!(leaks(&b), Vec::<String>::new());
    assert_eq!(total(&b), Some(2), "only A's two observations count");
    let b = search(
        &g,
        "Observation",
        &[("subject", &ref_b), ("_total", "accurate")],
    )
    .await
    .unwrap();
    assert!(bundle_refs(&b).is_empty());
    assert_eq!(total(&b), Some(0));
    let b = search(&g, "Observation", &[("_summary", "count")])
        .await
        .unwrap();
    assert_eq!(total(&b), Some(2));
    let b = search(&g, "Patient", &[("_id", &pb), ("_total", "accurate")])
        .await
        .unwrap();
    assert!(bundle_refs(&b).is_empty());
    assert_eq!(total(&b), Some(0));

    // _include: A's observation names B as performer; B is not included.
    let b = search(
        &g,
        "Observation",
        &[("_id", &a1), ("_include", "Observation:performer")],
    )
    .await
    .unwrap();
    assert!(bundle_has(&b, "Observation", &a1));
    assert!(bundle_has(&b, "Organization", &org), "shared includes stay");
    assert_eq!(leaks(&b), Vec::<String>::new(), "{b}");
    let b = search(&g, "Observation", &[("_include", "Observation:*")])
        .await
        .unwrap();
    assert_eq!(leaks(&b), Vec::<String>::new(), "{b}");
    assert!(bundle_has(&b, "Patient", &pa));

    // _revinclude: B's observation names A as performer; it is not included.
    let b = search(
        &g,
        "Patient",
        &[("_id", &pa), ("_revinclude", "Observation:performer")],
    )
    .await
    .unwrap();
    assert_eq!(leaks(&b), Vec::<String>::new(), "{b}");
    let b = search(
        &g,
        "Patient",
        &[
            ("_revinclude", "Observation:subject"),
            ("_revinclude", "Observation:performer"),
        ],
    )
    .await
    .unwrap();
    assert_eq!(leaks(&b), Vec::<String>::new(), "{b}");
    assert!(bundle_has(&b, "Observation", &a2));

    // Histories: type, system, instance.
    let h = g
        .history(Some("Observation"), None, Vec::new(), BASE)
        .await
        .unwrap();
    assert_eq!(leaks(&h), Vec::<String>::new());
    assert!(
        !history_urls(&h)
            .iter()
            .any(|u| b_ids.iter().any(|id| u.contains(id.as_str())))
    );
    assert_eq!(total(&h), Some(2), "type history total: A's two versions");
    let h = g.history(None, None, Vec::new(), BASE).await;
    match h {
        Ok(h) => {
            assert_eq!(leaks(&h), Vec::<String>::new());
            let urls = history_urls(&h);
            assert!(
                !urls
                    .iter()
                    .any(|u| b_ids.iter().any(|id| u.contains(id.as_str())))
            );
            assert_eq!(total(&h), Some(urls.len() as u64), "system history total");
        }
        Err(e) => assert_eq!(e.kind, ErrorKind::Forbidden, "{e:?}"),
    }
    let h = g
        .history(Some("Observation"), Some(&b1), Vec::new(), BASE)
        .await;
    assert!(is_kind(&h, ErrorKind::NotFound), "{h:?}");
    let v = g.vread("Observation", &b1, "1").await;
    assert!(is_kind(&v, ErrorKind::NotFound), "{v:?}");

    // Batch: a read of B's resource fails alone; searches return nothing of B.
    let batch = json!({
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            { "request": { "method": "GET", "url": format!("Observation/{b1}") } },
            { "request": { "method": "GET", "url": format!("Observation/{b1}/_history/1") } },
            { "request": { "method": "GET", "url": format!("Observation?subject={ref_b}") } },
            { "request": { "method": "GET", "url": "Observation" } },
            { "request": { "method": "GET", "url": format!("Condition?_id={cond_b}") } },
            { "request": { "method": "GET", "url": format!("Observation/{a2}") } },
        ],
    });
    let resp = g.process_bundle(batch, BASE, true).await.unwrap();
    assert_eq!(leaks(&resp), Vec::<String>::new(), "{resp}");
    let statuses: Vec<String> = resp["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["response"]["status"].as_str().unwrap_or("").to_string())
        .collect();
    assert!(statuses[0].starts_with("404"), "{statuses:?}");
    assert!(statuses[1].starts_with("404"), "{statuses:?}");
    assert!(statuses[5].starts_with("200"), "{statuses:?}");

    // Transaction: reading B's resource fails the whole Bundle, revealing nothing.
    let txn = json!({
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            { "request": { "method": "GET", "url": format!("Observation/{a2}") } },
            { "request": { "method": "GET", "url": format!("Observation/{b1}") } },
        ],
    });
    let r = g.process_bundle(txn, BASE, true).await;
    match &r {
        Err(e) => assert_eq!(e.kind, ErrorKind::NotFound, "{e:?}"),
        Ok(v) => panic!("transaction reading B's data succeeded: {v}"),
    }
    let txn = json!({
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            { "request": { "method": "GET", "url": format!("Observation?subject={ref_b}") } },
            { "request": { "method": "GET", "url": "Observation?_count=100" } },
        ],
    });
    let resp = g.process_bundle(txn, BASE, true).await.unwrap();
    assert_eq!(leaks(&resp), Vec::<String>::new(), "{resp}");
    // A write into B's compartment is refused (a patient writes nothing).
    let txn = json!({
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [{
            "resource": observation_body(&pb),
            "request": { "method": "POST", "url": "Observation" },
        }],
    });
    let r = g.process_bundle(txn, BASE, true).await;
    assert!(r.is_err(), "{r:?}");
}

/// Every resource object inside a JSON tree (nested Bundles included).
fn collect_resources(v: &Value, out: &mut Vec<(String, String)>) {
    match v {
        Value::Object(m) => {
            if let (Some(Value::String(t)), Some(Value::String(id))) =
                (m.get("resourceType"), m.get("id"))
            {
                out.push((t.clone(), id.clone()));
            }
            m.values().for_each(|x| collect_resources(x, out));
        }
        Value::Array(a) => a.iter().for_each(|x| collect_resources(x, out)),
        _ => {}
    }
}

fn history_urls(b: &Value) -> Vec<String> {
    b.get("entry")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|e| e["fullUrl"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_relationship_counts_on_the_next_request() {
    let env = env(AuthConfig::default()).await;
    let (records, auth) = (&env.records, &env.auth);
    let p = create(records, practitioner_body("Physician")).await;
    let pa = create(records, patient_body("Alpha")).await;
    let team = create(records, care_team_body(&pa, "active", &[&p])).await;
    let obs = create(records, observation_body(&pa)).await;
    let t = add_user(auth, "doc", Role::Physician, Some(&p), None)
        .await
        .token(auth)
        .await;
    let set_status = |status: &'static str| {
        let records = records.clone();
        let team = team.clone();
        async move {
            let mut body = records.read("CareTeam", &team).await.unwrap().resource;
            body["status"] = json!(status);
            records.update("CareTeam", &team, body, None).await.unwrap();
        }
    };
    // Warm every cache.
    for _ in 0..2 {
        let r = read_as(auth, records, &t, None, None, "Observation", &obs).await;
        assert_allowed("active", &r, "Observation", &obs, "care-team");
        assert!(
            observations_seen(auth, records, &t, None)
                .await
                .contains(&obs)
        );
    }
    set_status("inactive").await;
    let r = read_as(auth, records, &t, None, None, "Observation", &obs).await;
    assert_refused("inactive", &r, ErrorKind::Forbidden, "no-relationship");
    assert!(
        !observations_seen(auth, records, &t, None)
            .await
            .contains(&obs)
    );
    set_status("active").await;
    let r = read_as(auth, records, &t, None, None, "Observation", &obs).await;
    assert_allowed("active again", &r, "Observation", &obs, "care-team");
    // Deleting the team ends the relationship too.
    records.delete("CareTeam", &team).await.unwrap();
    let r = read_as(auth, records, &t, None, None, "Observation", &obs).await;
    assert_refused("team deleted", &r, ErrorKind::Forbidden, "no-relationship");
    assert!(
        !observations_seen(auth, records, &t, None)
            .await
            .contains(&obs)
    );
}

/// A clinician caring for A only cannot write into B's compartment by any
/// route: moving a resource, a conditional create that matches B's data, a
/// transaction that mixes an allowed and a refused write, a conditional delete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_cannot_cross_patients() {
    let env = env(AuthConfig::default()).await;
    let (records, auth) = (&env.records, &env.auth);
    let p = create(records, practitioner_body("Physician")).await;
    let pa = create(records, patient_body("Alpha")).await;
    let pb = create(records, patient_body("Beta")).await;
    create(records, care_team_body(&pa, "active", &[&p])).await;
    let obs_a = create(records, observation_body(&pa)).await;
    let mut marked = observation_body(&pb);
    marked["identifier"] = json!([{ "system": "urn:test", "value": "b-only" }]);
    let obs_b = create(records, marked).await;
    let t = add_user(auth, "doc", Role::Physician, Some(&p), None)
        .await
        .token(auth)
        .await;
    let g = as_user(auth, records, &t).await;

    // Moving A's observation to B.
    let mut body = records.read("Observation", &obs_a).await.unwrap().resource;
    body["subject"] = json!({ "reference": format!("Patient/{pb}") });
    let r = g.update("Observation", &obs_a, body, None).await;
    assert!(is_kind(&r, ErrorKind::Forbidden), "move A→B: {r:?}");
    // Moving B's observation to A.
    let mut body = records.read("Observation", &obs_b).await.unwrap().resource;
    body["subject"] = json!({ "reference": format!("Patient/{pa}") });
    let r = g.update("Observation", &obs_b, body, None).await;
    assert!(is_kind(&r, ErrorKind::Forbidden), "move B→A: {r:?}");
    // Neither moved.
    let a = records.read("Observation", &obs_a).await.unwrap();
    assert_eq!(a.key_name, format!("patient/{pa}"));
    let b = records.read("Observation", &obs_b).await.unwrap();
    assert_eq!(b.key_name, format!("patient/{pb}"));
    assert_eq!(b.version, 1);

    // A conditional create whose condition matches B's observation does not
    // see it (conditional criteria search only what the caller may see): it
    // creates A's observation and neither returns nor reveals B's.
    let (created, was_created) = g
        .create(
            "Observation",
            observation_body(&pa),
            Some("identifier=urn:test|b-only".into()),
        )
        .await
        .expect("conditional create");
    assert!(was_created, "a new resource, not B's");
    assert_ne!(created.id, obs_b);
    assert_eq!(created.key_name, format!("patient/{pa}"));

    // A transaction with an allowed write and a refused one writes nothing.
    let before = search(
        records,
        "Observation",
        &[
            ("subject", &format!("Patient/{pa}")),
            ("_total", "accurate"),
        ],
    )
    .await
    .unwrap();
    let txn = json!({
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            { "resource": observation_body(&pa), "request": { "method": "POST", "url": "Observation" } },
            { "resource": observation_body(&pb), "request": { "method": "POST", "url": "Observation" } },
        ],
    });
    let r = g.process_bundle(txn, BASE, true).await;
    assert!(
        matches!(&r, Err(e) if e.kind == ErrorKind::Forbidden),
        "{r:?}"
    );
    let after = search(
        records,
        "Observation",
        &[
            ("subject", &format!("Patient/{pa}")),
            ("_total", "accurate"),
        ],
    )
    .await
    .unwrap();
    assert_eq!(
        total(&before),
        total(&after),
        "the allowed half was not written"
    );

    // Conditional delete matching B's observation: the criteria see only
    // what the caller may see, so nothing matches and nothing is deleted.
    let txn = json!({
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [{ "request": { "method": "DELETE", "url": "Observation?identifier=urn:test|b-only" } }],
    });
    let r = g.process_bundle(txn, BASE, true).await;
    assert!(r.is_ok(), "{r:?}");
    assert!(
        records.read("Observation", &obs_b).await.is_ok(),
        "B's observation survives"
    );
    // Conditional update onto B's observation.
    let mut body = observation_body(&pb);
    body["identifier"] = json!([{ "system": "urn:test", "value": "b-only" }]);
    body["status"] = json!("cancelled");
    let txn = json!({
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [{ "resource": body, "request": { "method": "PUT", "url": "Observation?identifier=urn:test|b-only" } }],
    });
    let r = g.process_bundle(txn, BASE, true).await;
    assert!(
        matches!(&r, Err(e) if e.kind == ErrorKind::Forbidden),
        "{r:?}"
    );
    assert_eq!(
        records.read("Observation", &obs_b).await.unwrap().version,
        1
    );
}

/// Breaking the glass opens the patient a request names. A search with a
/// reason whose `_include` happens to reach another patient must not open
/// that patient for the next hour as a side effect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn break_glass_is_not_granted_through_includes() {
    let env = env(AuthConfig::default()).await;
    let (records, auth) = (&env.records, &env.auth);
    let p = create(records, practitioner_body("Physician")).await;
    let pa = create(records, patient_body("Alpha")).await;
    let pb = create(records, patient_body("Beta")).await;
    create(records, care_team_body(&pa, "active", &[&p])).await;
    // A's observation names B as performer.
    let mut a1 = observation_body(&pa);
    a1["performer"] = json!([{ "reference": format!("Patient/{pb}") }]);
    let a1 = create(records, a1).await;
    let obs_b = create(records, observation_body(&pb)).await;
    let t = add_user(auth, "doc", Role::Physician, Some(&p), None)
        .await
        .token(auth)
        .await;
    let (g, guard) = caller(auth, records, &t, None, Some("emergency for patient A")).await;
    search(
        &g,
        "Observation",
        &[("_id", &a1), ("_include", "Observation:performer")],
    )
    .await
    .unwrap();
    let granted: Vec<Decision> = guard
        .take_decisions()
        .into_iter()
        .filter(|d| d.rule == "break-glass")
        .collect();
    assert!(
        granted.is_empty(),
        "break-glass through an include: {granted:?}"
    );
    let r = read_as(auth, records, &t, None, None, "Observation", &obs_b).await;
    assert_refused(
        "B later, never named",
        &r,
        ErrorKind::Forbidden,
        "no-relationship",
    );
}
