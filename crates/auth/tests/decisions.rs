//! Every decision is recorded: the audit trail holds who asked, with which
//! role, which rule decided, whether it was allowed and any break-the-glass
//! reason — and it holds them sealed: neither a log leaf nor the raw
//! database files contain the reason, the username or a patient id in clear.
mod common;

use common::*;
use custos_audit::{Agent, AuditRecord, EventKind, Leaf};
use custos_auth::{AuthConfig, AuthService, Role};
use custos_records::Records;
use custos_store::{AuditEntry, AuditQuery};

/// One request as the server's middleware records it: authenticate, build
/// the guard, run `f` through the guarded record service, append the event
/// with the guard's decisions.
async fn request<F, Fut>(
    auth: &AuthService,
    records: &Records,
    token: &str,
    break_glass: Option<&str>,
    action: &str,
    interaction: &str,
    f: F,
) -> bool
where
    F: FnOnce(Records) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let (principal, snapshot) = auth.authenticate(token).await.expect("token");
    let guard = auth.guard(
        principal.clone(),
        snapshot,
        None,
        break_glass.map(str::to_string),
    );
    let ok = f(records.guarded(guard.clone())).await;
    auth.record(AuditRecord {
        kind: EventKind::Rest,
        action: action.to_string(),
        interaction: Some(interaction.to_string()),
        status: if ok { 200 } else { 403 },
        agent: Agent {
            subject: Some(principal.subject()),
            username: principal.username().map(str::to_string),
            role: Some(principal.role.name().to_string()),
            client_id: Some(principal.client_id.clone()),
            fhir_user: principal
                .practitioner
                .as_ref()
                .map(|p| format!("Practitioner/{p}")),
            source: Some("192.0.2.7".into()),
            user_agent: Some("decisions-test".into()),
        },
        purpose: Some(guard.purpose().to_string()),
        break_glass_reason: guard.break_glass_reason().map(str::to_string),
        decisions: guard.take_decisions(),
        ..AuditRecord::default()
    })
    .await
    .expect("the trail takes the event");
    ok
}

fn all() -> AuditQuery {
    AuditQuery {
        ascending: true,
        limit: 100_000,
        ..Default::default()
    }
}

const REASON: &str = "Cardiac-arrest-in-bay-7 patient-unresponsive QZX-4471";
const DOCTOR: &str = "dr-quinzel-7731";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_trail_records_every_decision_sealed() {
    let env = env(AuthConfig::default()).await;
    let (records, auth) = (&env.records, &env.auth);
    let z = create(records, practitioner_body("Zed")).await;
    let pa = create(records, patient_body("Alpha")).await;
    let pf = create(records, patient_body("Foxtrot")).await;
    create(records, care_team_body(&pa, "active", &[&z])).await;
    let obs_a = create(records, observation_body(&pa)).await;
    let obs_f = create(records, observation_body(&pf)).await;
    let doc = add_user(auth, DOCTOR, Role::Physician, Some(&z), None).await;
    let doc_id = doc.created.user.id.clone();
    let pat = add_user(auth, "alpha-patient", Role::Patient, None, Some(&pa)).await;
    // A failed sign-in, then good ones (password + TOTP).
    assert!(
        doc.login_with(auth, "not the password!", None, "user/*.rs", None, None)
            .await
            .is_err()
    );
    let t_doc = doc.token(auth).await;
    let t_pat = pat.token(auth).await;
    // A client token, then the same assertion replayed (refused).
    let client = register_client(auth, "backend", "system/*.rs").await;
    let assertion = client.assertion("decisions-jti-1");
    client
        .token_with(auth, assertion.clone(), "system/*.rs")
        .await
        .unwrap();
    assert!(
        client
            .token_with(auth, assertion, "system/*.rs")
            .await
            .is_err()
    );

    // Allowed through the care team.
    let (oa, of) = (obs_a.clone(), obs_f.clone());
    let read = "GET /Observation/{id}";
    assert!(
        request(auth, records, &t_doc, None, read, "read", |g| async move {
            g.read("Observation", &oa).await.is_ok()
        })
        .await
    );
    // Refused: no relationship.
    let of2 = of.clone();
    assert!(
        !request(auth, records, &t_doc, None, read, "read", |g| async move {
            g.read("Observation", &of2).await.is_ok()
        })
        .await
    );
    // Break the glass.
    assert!(
        request(
            auth,
            records,
            &t_doc,
            Some(REASON),
            read,
            "read",
            |g| async move { g.read("Observation", &of).await.is_ok() }
        )
        .await
    );
    // A patient's search (a visibility decision) and a refused write.
    assert!(
        request(
            auth,
            records,
            &t_pat,
            None,
            "GET /Observation",
            "search-type",
            |g| async move { search(&g, "Observation", &[]).await.is_ok() }
        )
        .await
    );
    let pa2 = pa.clone();
    assert!(
        !request(
            auth,
            records,
            &t_pat,
            None,
            "POST /Observation",
            "create",
            |g| async move {
                g.create("Observation", observation_body(&pa2), None)
                    .await
                    .is_ok()
            }
        )
        .await
    );

    // Appends are committed when `record` returns: read everything back.
    let trail = auth.audit();
    let rows: Vec<(AuditEntry, AuditRecord)> = trail.search(all()).await.expect("the trail opens");
    assert!(
        rows.windows(2).all(|w| w[0].0.index < w[1].0.index),
        "ascending"
    );
    assert!(rows.iter().all(|(e, r)| e.at == r.at && r.at > 0));
    let log: Vec<&AuditRecord> = rows.iter().map(|(_, r)| r).collect();
    let dump = || {
        log.iter()
            .map(|r| format!("{r:?}"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let subject = format!("user:{doc_id}");
    let has = |r: &AuditRecord, allowed: bool, rule: &str| {
        r.decisions
            .iter()
            .any(|d| d.allowed == allowed && d.rule == rule)
    };

    // Sign-in and token events, recorded by the service itself.
    assert!(
        log.iter().any(|r| r.kind == EventKind::Login
            && r.action.starts_with("login")
            && r.agent.subject.as_deref() == Some(&subject)
            && r.outcome_code() == 4
            && has(r, false, "password-failed")),
        "failed sign-in not recorded:\n{}",
        dump()
    );
    assert!(
        log.iter().any(|r| r.kind == EventKind::Login
            && r.action == "login:login"
            && r.agent.subject.as_deref() == Some(&subject)
            && r.agent.username.as_deref() == Some(DOCTOR)
            && r.agent.role.as_deref() == Some("physician")
            && r.outcome_code() == 0
            && has(r, true, "credentials")),
        "sign-in not recorded:\n{}",
        dump()
    );
    assert!(
        log.iter().any(|r| r.kind == EventKind::Token
            && r.agent.subject.as_deref() == Some("client:backend")
            && r.outcome_code() == 0
            && has(r, true, "client-credentials")),
        "client token not recorded:\n{}",
        dump()
    );
    assert!(
        log.iter().any(|r| r.kind == EventKind::Token
            && r.outcome_code() == 4
            && r.decisions
                .iter()
                .any(|d| !d.allowed && d.rule.contains("replayed"))),
        "token refusal not recorded:\n{}",
        dump()
    );

    // The requests, with their decisions.
    let doc_requests: Vec<&AuditRecord> = log
        .iter()
        .copied()
        .filter(|r| r.agent.subject.as_deref() == Some(&subject) && r.kind == EventKind::Rest)
        .collect();
    assert_eq!(doc_requests.len(), 3, "{}", dump());
    for r in &doc_requests {
        assert_eq!(r.agent.role.as_deref(), Some("physician"));
        assert_eq!(r.agent.username.as_deref(), Some(DOCTOR));
        assert_eq!(r.agent.client_id.as_deref(), Some("custos-cli"));
        assert_eq!(r.agent.user_agent.as_deref(), Some("decisions-test"));
        assert_eq!(r.action, read);
    }
    let decided = |r: &AuditRecord, id: &str| {
        r.decisions
            .iter()
            .find(|d| d.id.as_deref() == Some(id))
            .map(|d| {
                (
                    d.interaction.to_string(),
                    d.allowed,
                    d.rule.to_string(),
                    d.patient.clone(),
                )
            })
    };
    assert_eq!(
        decided(doc_requests[0], &obs_a),
        Some(("read".into(), true, "care-team".into(), Some(pa.clone())))
    );
    assert_eq!(doc_requests[0].purpose.as_deref(), Some("TREAT"));
    assert_eq!(doc_requests[0].break_glass_reason, None);
    assert!(!doc_requests[0].break_glass());
    assert_eq!(
        decided(doc_requests[1], &obs_f),
        Some((
            "read".into(),
            false,
            "no-relationship".into(),
            Some(pf.clone())
        ))
    );
    assert_eq!(doc_requests[1].status, 403);
    assert_eq!(doc_requests[1].outcome_code(), 4);
    assert_eq!(
        decided(doc_requests[2], &obs_f),
        Some(("read".into(), true, "break-glass".into(), Some(pf.clone())))
    );
    assert_eq!(doc_requests[2].break_glass_reason.as_deref(), Some(REASON));
    assert_eq!(doc_requests[2].purpose.as_deref(), Some("ETREAT"));
    assert!(doc_requests[2].break_glass());

    let pat_subject = format!("user:{}", pat.created.user.id);
    let pat_requests: Vec<&AuditRecord> = log
        .iter()
        .copied()
        .filter(|r| r.agent.subject.as_deref() == Some(&pat_subject) && r.kind == EventKind::Rest)
        .collect();
    assert_eq!(pat_requests.len(), 2, "{}", dump());
    assert!(
        pat_requests[0]
            .decisions
            .iter()
            .any(|d| d.interaction == "search" && d.allowed && d.rule == "visibility"),
        "{:?}",
        pat_requests[0]
    );
    assert_eq!(pat_requests[0].agent.role.as_deref(), Some("patient"));
    assert!(
        pat_requests[1]
            .decisions
            .iter()
            .any(|d| d.interaction == "create" && !d.allowed && d.rule == "role"),
        "{:?}",
        pat_requests[1]
    );

    // The blind indexes find the same events as the opened records.
    let indexes = |pred: &dyn Fn(&AuditRecord) -> bool| -> Vec<u64> {
        rows.iter()
            .filter(|(_, r)| pred(r))
            .map(|(e, _)| e.index)
            .collect()
    };
    let by_agent: Vec<u64> = trail
        .search(AuditQuery {
            agent: Some(trail.agent_token(&subject)),
            ..all()
        })
        .await
        .unwrap()
        .iter()
        .map(|(e, _)| e.index)
        .collect();
    assert_eq!(
        by_agent,
        indexes(&|r| r.agent.subject.as_deref() == Some(&subject))
    );
    let by_patient: Vec<u64> = trail
        .search(AuditQuery {
            patient: Some(trail.patient_token(&pf)),
            ..all()
        })
        .await
        .unwrap()
        .iter()
        .map(|(e, _)| e.index)
        .collect();
    assert_eq!(by_patient.len(), 2, "the refused and the break-glass read");
    assert_eq!(
        by_patient,
        indexes(&|r| r.patients().contains(&pf.as_str()))
    );

    // Sealed at rest: no leaf holds the reason, the username, a patient or
    // resource id or the request itself in clear…
    let needles: [&str; 12] = [
        REASON,
        "QZX-4471",
        DOCTOR,
        "decisions-test",
        "192.0.2.7",
        &pa,
        &pf,
        &obs_a,
        &obs_f,
        &z,
        "/Observation",
        "break-glass",
    ];
    // (Control: the same needles are in the opened break-glass event.)
    let plain = serde_json::to_vec(doc_requests[2]).unwrap();
    for needle in [REASON, DOCTOR, "decisions-test", &pf, &obs_f, "break-glass"] {
        assert!(contains(&plain, needle.as_bytes()), "control: {needle}");
    }
    for (entry, _) in &rows {
        let leaf = Leaf::decode(&entry.data).expect("a well-formed leaf");
        assert_eq!(leaf.at, entry.at);
        assert!(leaf.key_name.starts_with("system/audit/"));
        for needle in needles {
            assert!(
                !contains(&entry.data, needle.as_bytes()),
                "leaf {} holds '{needle}' in clear",
                entry.index
            );
        }
    }
    // …and neither the reason nor the username is in any file of the
    // database (main file, WAL, shared memory).
    drop(log);
    drop(rows);
    let mut scanned = 0;
    for entry in std::fs::read_dir(env.dir.path()).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if !name.starts_with("custos.db") {
            continue;
        }
        let bytes = std::fs::read(&path).unwrap();
        scanned += bytes.len();
        for needle in [REASON, "QZX-4471", DOCTOR, "decisions-test"] {
            assert!(
                !contains(&bytes, needle.as_bytes()),
                "{name} holds '{needle}' in clear"
            );
        }
    }
    assert!(scanned > 0, "no database file found");
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}
