//! Every decision is recorded: the access log holds who asked, with which
//! role, which rule decided, whether it was allowed and any break-the-glass
//! reason — and it holds them sealed: the raw database files never contain
//! the reason in clear.
mod common;

use common::*;
use custos_auth::{AccessRecord, AuthConfig, AuthService, Role};
use custos_records::Records;

/// One request as the server's middleware records it: authenticate, build
/// the guard, run `f` through the guarded record service, append the record.
async fn request<F, Fut>(
    auth: &AuthService,
    records: &Records,
    token: &str,
    purpose: Option<&str>,
    break_glass: Option<&str>,
    action: &str,
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
        purpose.map(str::to_string),
        break_glass.map(str::to_string),
    );
    let ok = f(records.guarded(guard.clone())).await;
    auth.access_log()
        .record(AccessRecord {
            at: now_secs() * 1_000_000,
            subject: Some(principal.subject()),
            username: principal.username().map(str::to_string),
            role: Some(principal.role.name().to_string()),
            client_id: Some(principal.client_id.clone()),
            source: Some("192.0.2.7".into()),
            user_agent: Some("decisions-test".into()),
            action: action.to_string(),
            status: if ok { 200 } else { 403 },
            purpose: Some(guard.purpose().to_string()),
            break_glass_reason: guard.break_glass_reason().map(str::to_string),
            decisions: guard.take_decisions(),
        })
        .await;
    ok
}

const REASON: &str = "Cardiac-arrest-in-bay-7 patient-unresponsive QZX-4471";
const DOCTOR: &str = "dr-quinzel-7731";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_records_every_decision_sealed() {
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
    // A failed sign-in, then good ones.
    assert!(
        doc.login_with(auth, "not the password!", None, "user/*.rs", None, None)
            .await
            .is_err()
    );
    let t_doc = doc.token(auth).await;
    let t_pat = pat.token(auth).await;
    let client = register_client(auth, "backend", "system/*.rs").await;
    client.token(auth, "system/*.rs").await.unwrap();

    // Allowed through the care team.
    let (oa, of) = (obs_a.clone(), obs_f.clone());
    assert!(
        request(
            auth,
            records,
            &t_doc,
            None,
            None,
            "GET /Observation/{id}",
            |g| async move { g.read("Observation", &oa).await.is_ok() }
        )
        .await
    );
    // Refused: no relationship.
    assert!(
        !request(
            auth,
            records,
            &t_doc,
            None,
            None,
            "GET /Observation/{id}",
            |g| {
                let of = of.clone();
                async move { g.read("Observation", &of).await.is_ok() }
            }
        )
        .await
    );
    // Break the glass.
    assert!(
        request(
            auth,
            records,
            &t_doc,
            None,
            Some(REASON),
            "GET /Observation/{id}",
            |g| {
                let of = of.clone();
                async move { g.read("Observation", &of).await.is_ok() }
            }
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
            None,
            "GET /Observation",
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
            None,
            "POST /Observation",
            |g| async move {
                g.create("Observation", observation_body(&pa2), None)
                    .await
                    .is_ok()
            }
        )
        .await
    );

    auth.access_log().flush().await;
    let log: Vec<AccessRecord> = auth
        .access_log()
        .read(0, 1000)
        .await
        .expect("the log opens")
        .into_iter()
        .map(|(_, r)| r)
        .collect();
    let dump = || {
        log.iter()
            .map(|r| format!("{r:?}"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let subject = format!("user:{doc_id}");

    // Sign-in events, recorded by the service itself.
    assert!(
        log.iter().any(|r| r.action.starts_with("login")
            && r.subject.as_deref() == Some(&subject)
            && r.decisions
                .iter()
                .any(|d| !d.allowed && d.rule == "password-failed")),
        "failed sign-in not recorded:\n{}",
        dump()
    );
    assert!(
        log.iter().any(|r| r.action == "login:login"
            && r.subject.as_deref() == Some(&subject)
            && r.role.as_deref() == Some("physician")
            && r.decisions
                .iter()
                .any(|d| d.allowed && d.rule == "credentials")),
        "sign-in not recorded:\n{}",
        dump()
    );
    assert!(
        log.iter()
            .any(|r| r.subject.as_deref() == Some("client:backend")
                && r.decisions
                    .iter()
                    .any(|d| d.allowed && d.rule == "client-credentials")),
        "client token not recorded:\n{}",
        dump()
    );

    // The requests, with their decisions.
    let doc_requests: Vec<&AccessRecord> = log
        .iter()
        .filter(|r| r.subject.as_deref() == Some(&subject) && r.action.starts_with("GET"))
        .collect();
    assert_eq!(doc_requests.len(), 3, "{}", dump());
    for r in &doc_requests {
        assert_eq!(r.role.as_deref(), Some("physician"));
        assert_eq!(r.username.as_deref(), Some(DOCTOR));
        assert_eq!(r.client_id.as_deref(), Some("custos-cli"));
    }
    let decided = |r: &AccessRecord, id: &str| {
        r.decisions
            .iter()
            .find(|d| d.id.as_deref() == Some(id))
            .map(|d| {
                (
                    d.interaction.clone(),
                    d.allowed,
                    d.rule.clone(),
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
    assert_eq!(
        decided(doc_requests[2], &obs_f),
        Some(("read".into(), true, "break-glass".into(), Some(pf.clone())))
    );
    assert_eq!(doc_requests[2].break_glass_reason.as_deref(), Some(REASON));
    assert_eq!(doc_requests[2].purpose.as_deref(), Some("ETREAT"));

    let pat_subject = format!("user:{}", pat.created.user.id);
    let pat_requests: Vec<&AccessRecord> = log
        .iter()
        .filter(|r| r.subject.as_deref() == Some(&pat_subject) && !r.action.starts_with("login"))
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
    assert_eq!(pat_requests[0].role.as_deref(), Some("patient"));
    assert!(
        pat_requests[1]
            .decisions
            .iter()
            .any(|d| d.interaction == "create" && !d.allowed && d.rule == "role"),
        "{:?}",
        pat_requests[1]
    );

    // Sealed at rest: neither the reason nor the username is in any file
    // of the database (main file, WAL, shared memory).
    drop(log);
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
