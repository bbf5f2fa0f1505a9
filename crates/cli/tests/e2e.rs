//! End-to-end: the real `custos` binary over HTTP.
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

mod support;
use support::{Server, custos, is_outcome};

/// A server on a fresh data dir, with a `system/*.cruds` token for `send`.
async fn start() -> Server {
    signed_in(Server::start()).await
}

/// A server on a fresh data dir started with `extra` arguments.
async fn start_in(dir: tempfile::TempDir, extra: &[&str]) -> Server {
    signed_in(Server::start_in(dir, extra, &[])).await
}

/// Serve an existing data dir.
async fn serve_dir(dir: &Path, extra: &[&str]) -> Server {
    signed_in(Server::serve(dir, extra, &[])).await
}

/// The tests here are about FHIR semantics: they act as a SMART Backend
/// Services client with `system/*.cruds`, registered through the CLI.
async fn signed_in(mut s: Server) -> Server {
    s.sign_in_system().await;
    s
}

/// An HTTP client that sends the server's token with every request.
fn client(s: &Server) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    let token = s.token.as_deref().expect("signed in");
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {token}").parse().unwrap(),
    );
    reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .unwrap()
}

/// A request with the server's token.
async fn send(
    s: &Server,
    method: &str,
    path: &str,
    body: Option<Value>,
    headers: &[(&str, &str)],
) -> (u16, Value, reqwest::header::HeaderMap) {
    let r = s
        .call(s.token.as_deref(), method, path, body, headers)
        .await;
    (r.status, r.body, r.headers)
}

fn patient(family: &str, mrn: &str) -> Value {
    json!({
        "resourceType": "Patient",
        "identifier": [{ "system": "http://hospital.example/mrn", "value": mrn }],
        "name": [{ "family": family, "given": ["Zoë"] }],
        "gender": "female",
        "birthDate": "1984-07-15",
        "telecom": [{ "system": "phone", "value": "555-867-5309" }]
    })
}

#[tokio::test]
async fn crud_versions_and_history() {
    let s = start().await;
    let (st, created, h) = send(
        &s,
        "POST",
        "Patient",
        Some(patient("Okonkwo", "MRN-1")),
        &[],
    )
    .await;
    assert_eq!(st, 201);
    let id = created["id"].as_str().unwrap().to_string();
    assert_eq!(created["meta"]["versionId"], "1");
    assert!(
        h["location"]
            .to_str()
            .unwrap()
            .ends_with(&format!("/Patient/{id}/_history/1"))
    );
    assert_eq!(h["etag"], "W/\"1\"");
    assert!(uuid_like(&id), "ids are unguessable UUIDs");

    let (st, read, _) = send(&s, "GET", &format!("Patient/{id}"), None, &[]).await;
    assert_eq!(
        (st, read["name"][0]["family"].as_str()),
        (200, Some("Okonkwo"))
    );

    let mut upd = read.clone();
    upd["gender"] = json!("other");
    let (st, updated, _) = send(
        &s,
        "PUT",
        &format!("Patient/{id}"),
        Some(upd.clone()),
        &[("if-match", "W/\"1\"")],
    )
    .await;
    assert_eq!(
        (st, updated["meta"]["versionId"].as_str()),
        (200, Some("2"))
    );
    // A stale If-Match is refused.
    let (st, oo, _) = send(
        &s,
        "PUT",
        &format!("Patient/{id}"),
        Some(upd),
        &[("if-match", "W/\"1\"")],
    )
    .await;
    assert_eq!(st, 412);
    assert!(is_outcome(&oo));

    let (st, v1, _) = send(&s, "GET", &format!("Patient/{id}/_history/1"), None, &[]).await;
    assert_eq!((st, v1["gender"].as_str()), (200, Some("female")));
    let (st, hist, _) = send(&s, "GET", &format!("Patient/{id}/_history"), None, &[]).await;
    assert_eq!(
        (st, hist["type"].as_str(), hist["total"].as_u64()),
        (200, Some("history"), Some(2))
    );
    assert_eq!(
        hist["entry"][0]["resource"]["meta"]["versionId"], "2",
        "newest first"
    );

    let (st, _, _) = send(&s, "DELETE", &format!("Patient/{id}"), None, &[]).await;
    assert_eq!(st, 204);
    let (st, oo, _) = send(&s, "GET", &format!("Patient/{id}"), None, &[]).await;
    assert_eq!(st, 410);
    assert!(is_outcome(&oo));
    let (st, hist, _) = send(&s, "GET", "Patient/_history", None, &[]).await;
    assert_eq!((st, hist["total"].as_u64()), (200, Some(3)));
    assert_eq!(hist["entry"][0]["request"]["method"], "DELETE");
    let (st, _, _) = send(&s, "GET", "_history", None, &[]).await;
    assert_eq!(st, 200);
}

fn uuid_like(id: &str) -> bool {
    id.len() == 36 && id.chars().filter(|c| *c == '-').count() == 4
}

#[tokio::test]
async fn conditional_create_and_search_semantics() {
    let s = start().await;
    let cond = [(
        "if-none-exist",
        "identifier=http://hospital.example/mrn|MRN-7",
    )];
    let (st, a, _) = send(
        &s,
        "POST",
        "Patient",
        Some(patient("Müller", "MRN-7")),
        &cond,
    )
    .await;
    assert_eq!(st, 201);
    let (st, b, _) = send(
        &s,
        "POST",
        "Patient",
        Some(patient("Müller", "MRN-7")),
        &cond,
    )
    .await;
    assert_eq!(st, 200, "If-None-Exist with one match returns it");
    assert_eq!(a["id"], b["id"]);
    send(
        &s,
        "POST",
        "Patient",
        Some(patient("Mueller", "MRN-8")),
        &[],
    )
    .await;
    send(
        &s,
        "POST",
        "Patient",
        Some(patient("Smithson", "MRN-9")),
        &[],
    )
    .await;

    let total = |q: &'static str| {
        let s = &s;
        async move {
            let (st, b, _) = send(s, "GET", q, None, &[]).await;
            assert_eq!(st, 200, "{q}: {b}");
            assert_eq!(b["type"], "searchset");
            b["total"].as_u64().unwrap()
        }
    };
    assert_eq!(
        total("Patient?family=muller").await,
        1,
        "accent- and case-insensitive"
    );
    assert_eq!(total("Patient?family=mu").await, 2, "prefix match");
    assert_eq!(total("Patient?family:exact=Müller").await, 1);
    assert_eq!(total("Patient?family:exact=müller").await, 0);
    assert_eq!(
        total("Patient?family=smithsonian").await,
        0,
        "longer than the value"
    );
    assert_eq!(total("Patient?family:contains=hso").await, 1);
    assert_eq!(
        total("Patient?identifier=http://hospital.example/mrn|MRN-8").await,
        1
    );
    assert_eq!(total("Patient?identifier=MRN-9").await, 1);
    assert_eq!(total("Patient?identifier=http://other|MRN-9").await, 0);
    assert_eq!(total("Patient?birthdate=1984").await, 3);
    assert_eq!(total("Patient?birthdate=1984-07-15").await, 3);
    assert_eq!(total("Patient?birthdate=lt1984-07-15").await, 0);
    assert_eq!(total("Patient?birthdate=ge1984-07-15").await, 3);
    assert_eq!(total("Patient?gender=female&family=smi").await, 1);
    assert_eq!(total("Patient?telecom=555-867-5309").await, 3);
    assert_eq!(
        total("Patient?family=muller,smithson").await,
        2,
        "comma is OR"
    );
    assert_eq!(total("Patient?_id=nope").await, 0);

    // Strict handling refuses unknown parameters; lenient reports them.
    let (st, oo, _) = send(
        &s,
        "GET",
        "Patient?bogus=1",
        None,
        &[("prefer", "handling=strict")],
    )
    .await;
    assert_eq!(st, 400);
    assert!(is_outcome(&oo));
    let (st, b, _) = send(&s, "GET", "Patient?bogus=1", None, &[]).await;
    assert_eq!(st, 200);
    assert!(
        b["entry"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["search"]["mode"] == "outcome")
    );
    let self_link = b["link"][0]["url"].as_str().unwrap();
    assert!(
        !self_link.contains("bogus"),
        "the self link lists only parameters used: {self_link}"
    );
    let (st, _, _) = send(&s, "GET", "Patient?birthdate=1984-13-45", None, &[]).await;
    assert_eq!(st, 400, "invalid date");
    let (st, b, _) = send(&s, "POST", "Patient/_search", None, &[]).await;
    assert_eq!(st, 415, "_search needs a form body: {b}");
}

#[tokio::test]
async fn paging_is_stable_under_concurrent_writes() {
    let s = start().await;
    let (_, p, _) = send(&s, "POST", "Patient", Some(patient("Page", "P-1")), &[]).await;
    let pid = p["id"].as_str().unwrap().to_string();
    for i in 0..25 {
        let obs = json!({
            "resourceType": "Observation", "status": "final",
            "code": { "coding": [{ "system": "http://loinc.org", "code": "8867-4" }] },
            "subject": { "reference": format!("Patient/{pid}") },
            "effectiveDateTime": format!("2020-01-{:02}T10:00:00Z", i + 1),
            "valueQuantity": { "value": 60 + i, "unit": "/min", "system": "http://unitsofmeasure.org", "code": "/min" }
        });
        let (st, _, _) = send(&s, "POST", "Observation", Some(obs), &[]).await;
        assert_eq!(st, 201);
    }
    let mut url = format!("Observation?patient=Patient/{pid}&_sort=date&_count=10");
    let mut seen = Vec::new();
    let mut pages = 0;
    loop {
        let (st, b, _) = send(&s, "GET", &url, None, &[]).await;
        assert_eq!(st, 200);
        pages += 1;
        for e in b["entry"].as_array().cloned().unwrap_or_default() {
            seen.push(
                e["resource"]["effectiveDateTime"]
                    .as_str()
                    .unwrap()
                    .to_string(),
            );
        }
        if pages == 1 {
            // A write between pages, sorting before everything seen, must not shift pages.
            let early = json!({
                "resourceType": "Observation", "status": "final",
                "code": { "coding": [{ "system": "http://loinc.org", "code": "8867-4" }] },
                "subject": { "reference": format!("Patient/{pid}") },
                "effectiveDateTime": "2019-01-01T00:00:00Z"
            });
            send(&s, "POST", "Observation", Some(early), &[]).await;
        }
        match b["link"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["relation"] == "next")
        {
            Some(l) => url = l["url"].as_str().unwrap().to_string(),
            None => break,
        }
    }
    let expected: Vec<String> = (1..=25)
        .map(|d| format!("2020-01-{d:02}T10:00:00Z"))
        .collect();
    assert_eq!(seen, expected, "no skipped or repeated entries");
    assert_eq!(pages, 3);
    // Previous from the second page gives the first.
    let (_, p1, _) = send(
        &s,
        "GET",
        &format!("Observation?patient=Patient/{pid}&_sort=date&_count=10"),
        None,
        &[],
    )
    .await;
    let next = p1["link"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["relation"] == "next")
        .unwrap()["url"]
        .as_str()
        .unwrap()
        .to_string();
    let (_, p2, _) = send(&s, "GET", &next, None, &[]).await;
    let prev = p2["link"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["relation"] == "previous")
        .unwrap()["url"]
        .as_str()
        .unwrap()
        .to_string();
    let (_, back, _) = send(&s, "GET", &prev, None, &[]).await;
    assert_eq!(back["entry"], p1["entry"]);
    // Sorting descending and _include.
    let (_, d, _) = send(
        &s,
        "GET",
        &format!(
            "Observation?subject=Patient/{pid}&_sort=-date&_count=1&_include=Observation:subject"
        ),
        None,
        &[],
    )
    .await;
    assert_eq!(
        d["entry"][0]["resource"]["effectiveDateTime"],
        "2020-01-25T10:00:00Z"
    );
    assert_eq!(d["entry"][1]["search"]["mode"], "include");
    assert_eq!(d["entry"][1]["resource"]["id"], pid.as_str());
    let (_, q, _) = send(&s, "GET", "Observation?value-quantity=gt80", None, &[]).await;
    assert_eq!(q["total"], 4);
}

#[tokio::test]
async fn transactions_are_all_or_nothing() {
    let s = start().await;
    let synth = custos_synth::Synth::new(custos_synth::SynthConfig {
        patients: 2,
        seed: 7,
        detail: custos_synth::Detail::Full,
    });
    let (st, dir, _) = send(&s, "POST", "", Some(synth.directory_bundle()), &[]).await;
    assert_eq!(st, 200, "{dir}");
    // Synthea-style bundles load as they are, twice the directory is idempotent (ifNoneExist).
    let (st, again, _) = send(&s, "POST", "", Some(synth.directory_bundle()), &[]).await;
    assert_eq!(st, 200);
    assert!(
        again["entry"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["response"]["status"] == "200 OK")
    );
    let (bundle, facts) = synth.patient(0);
    let n = bundle["entry"].as_array().unwrap().len();
    let (st, resp, _) = send(&s, "POST", "", Some(bundle), &[]).await;
    assert_eq!(st, 200, "{resp}");
    assert_eq!(resp["type"], "transaction-response");
    assert_eq!(resp["entry"].as_array().unwrap().len(), n);
    let loc = resp["entry"][0]["response"]["location"].as_str().unwrap();
    let pid = loc.split('/').nth(1).unwrap();
    let (_, found, _) = send(
        &s,
        "GET",
        &format!("Patient?identifier={}", facts.mrn),
        None,
        &[],
    )
    .await;
    assert_eq!(found["entry"][0]["resource"]["id"], pid);
    let (_, enc, _) = send(
        &s,
        "GET",
        &format!("Encounter?patient=Patient/{pid}"),
        None,
        &[],
    )
    .await;
    let enc_ref = enc["entry"][0]["resource"]["participant"][0]["individual"]["reference"]
        .as_str()
        .unwrap();
    assert!(
        enc_ref.starts_with("Practitioner/"),
        "conditional references resolved: {enc_ref}"
    );
    let before = count_all(&s).await;

    // One bad entry (a reference to nothing) fails the whole transaction.
    let bad = json!({
        "resourceType": "Bundle", "type": "transaction",
        "entry": [
            { "fullUrl": "urn:uuid:11111111-1111-4111-8111-111111111111",
              "resource": patient("Atomic", "A-1"), "request": { "method": "POST", "url": "Patient" } },
            { "resource": { "resourceType": "Observation", "status": "final", "code": { "text": "x" },
                            "subject": { "reference": "Patient/does-not-exist" } },
              "request": { "method": "POST", "url": "Observation" } }
        ]
    });
    let (st, oo, _) = send(&s, "POST", "", Some(bad), &[]).await;
    assert_eq!(st, 422, "{oo}");
    assert!(is_outcome(&oo));
    assert_eq!(
        count_all(&s).await,
        before,
        "nothing of a failed transaction survives"
    );
    let (_, none, _) = send(&s, "GET", "Patient?identifier=A-1", None, &[]).await;
    assert_eq!(none["total"], 0);

    // A batch processes entries independently.
    let batch = json!({
        "resourceType": "Bundle", "type": "batch",
        "entry": [
            { "resource": patient("Batch", "B-1"), "request": { "method": "POST", "url": "Patient" } },
            { "request": { "method": "GET", "url": "Patient/nope" } }
        ]
    });
    let (st, r, _) = send(&s, "POST", "", Some(batch), &[]).await;
    assert_eq!(st, 200);
    assert_eq!(r["type"], "batch-response");
    assert_eq!(r["entry"][0]["response"]["status"], "201 Created");
    assert_eq!(r["entry"][1]["response"]["status"], "404");
}

async fn count_all(s: &Server) -> u64 {
    let mut n = 0;
    for t in [
        "Patient",
        "Observation",
        "Encounter",
        "Condition",
        "Practitioner",
        "Organization",
    ] {
        let (_, b, _) = send(s, "GET", &format!("{t}?_summary=count"), None, &[]).await;
        n += b["total"].as_u64().unwrap();
    }
    n
}

#[tokio::test]
async fn bad_input_gets_operation_outcomes() {
    let dir = tempfile::tempdir().unwrap();
    assert!(
        custos(&["init", "--data-dir", dir.path().to_str().unwrap()])
            .status
            .success()
    );
    let s = start_in(dir, &["--max-body", "2048"]).await;
    let c = client(&s);
    let raw = |method: &str, path: &str, ct: &str, body: Vec<u8>| {
        c.request(method.parse().unwrap(), format!("{}/{path}", s.base))
            .header("content-type", ct.to_string())
            .body(body)
            .send()
    };
    let cases: Vec<(u16, reqwest::Response)> = vec![
        (400, raw("POST", "Patient", "application/fhir+json", b"{not json".to_vec()).await.unwrap()),
        (400, raw("POST", "Patient", "application/fhir+json", br#"{"resourceType":"Patient","name":null}"#.to_vec()).await.unwrap()),
        (400, raw("POST", "Patient", "application/fhir+json", br#"{"resourceType":"Observation"}"#.to_vec()).await.unwrap()),
        (404, raw("POST", "Spaceship", "application/fhir+json", br#"{"resourceType":"Spaceship"}"#.to_vec()).await.unwrap()),
        (413, raw("POST", "Patient", "application/fhir+json", vec![b' '; 4096]).await.unwrap()),
        (415, raw("POST", "Patient", "text/plain", b"hello".to_vec()).await.unwrap()),
        (422, raw("POST", "Observation", "application/fhir+json", br#"{"resourceType":"Observation","status":"final","code":{"text":"x"},"subject":{"reference":"Patient/ghost"}}"#.to_vec()).await.unwrap()),
        (405, c.patch(format!("{}/Patient/x", s.base)).send().await.unwrap()),
        (406, c.get(format!("{}/metadata", s.base)).header("accept", "application/fhir+xml").send().await.unwrap()),
        (404, c.get(format!("{}/Patient/unknown-id", s.base)).send().await.unwrap()),
        (400, c.get(format!("{}/Patient/bad$id", s.base)).send().await.unwrap()),
        (404, c.get(format!("{}/Spaceship/1", s.base)).send().await.unwrap()),
        (404, c.get(format!("{}/Spaceship/_history", s.base)).send().await.unwrap()),
        (400, c.get(format!("{}/Patient?_count=abc", s.base)).send().await.unwrap()),
        (400, c.get(format!("{}/Patient?_sort=family", s.base)).send().await.unwrap()),
        (400, c.get(format!("{}/Patient?_cursor=@@@", s.base)).send().await.unwrap()),
    ];
    for (i, (want, resp)) in cases.into_iter().enumerate() {
        let got = resp.status().as_u16();
        let ct = resp
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        assert_eq!(got, want, "case {i}: {body}");
        assert!(is_outcome(&body), "case {i} is an OperationOutcome: {body}");
        assert!(
            ct.starts_with("application/fhir+json"),
            "case {i} content type {ct}"
        );
    }
    // Conflict: two creates racing on If-None-Exist never both create.
    let (st, _, _) = send(&s, "GET", "metadata", None, &[]).await;
    assert_eq!(st, 200, "the server survived all of it");
}

#[tokio::test]
async fn capability_statement_tells_the_truth() {
    let s = start().await;
    let (st, cs, _) = send(&s, "GET", "metadata", None, &[]).await;
    assert_eq!(st, 200);
    assert_eq!(cs["resourceType"], "CapabilityStatement");
    assert_eq!(cs["fhirVersion"], "4.0.1");
    let patient = cs["rest"][0]["resource"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["type"] == "Patient")
        .unwrap();
    let names: Vec<&str> = patient["searchParam"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    for p in [
        "identifier",
        "family",
        "given",
        "name",
        "birthdate",
        "gender",
        "address-postalcode",
        "telecom",
        "general-practitioner",
        "_id",
        "_lastUpdated",
    ] {
        assert!(names.contains(&p), "Patient.{p} advertised");
    }
    // Every advertised parameter is accepted under strict handling.
    for p in names.iter().filter(|p| !p.starts_with('_')).take(40) {
        let (st, b, _) = send(
            &s,
            "GET",
            &format!("Patient?{p}:missing=true"),
            None,
            &[("prefer", "handling=strict")],
        )
        .await;
        assert_eq!(st, 200, "advertised Patient.{p} is searchable: {b}");
    }
}

/// The database files hold no clear PHI; a ciphertext moved to another
/// row fails its integrity check; erasure and key rotation work.
#[tokio::test]
async fn at_rest_encryption_tamper_shred_and_rotate() {
    let mut s = start().await;
    let synth = custos_synth::Synth::new(custos_synth::SynthConfig {
        patients: 8,
        seed: 99,
        detail: custos_synth::Detail::Full,
    });
    send(&s, "POST", "", Some(synth.directory_bundle()), &[]).await;
    let mut facts = Vec::new();
    let mut pids = Vec::new();
    for i in 0..8 {
        let (b, f) = synth.patient(i);
        let (st, r, _) = send(&s, "POST", "", Some(b), &[]).await;
        assert_eq!(st, 200);
        pids.push(
            r["entry"][0]["response"]["location"]
                .as_str()
                .unwrap()
                .split('/')
                .nth(1)
                .unwrap()
                .to_string(),
        );
        facts.push(f);
    }
    let dir = s.dir.clone();
    for f in &facts {
        for needle in [&f.family, &f.given, &f.mrn, &f.ssn, &f.birth_date, &f.phone] {
            // Needles under 5 bytes match random ciphertext by chance: look
            // for them as JSON strings, quotes included (as `custos demo`
            // does), which clear text in a body would be.
            let quoted = format!("\"{needle}\"");
            let needle = if needle.len() < 5 { &quoted } else { needle };
            for file in db_files(&dir) {
                let bytes = std::fs::read(&file).unwrap_or_default();
                assert!(
                    !bytes.windows(needle.len()).any(|w| w == needle.as_bytes()),
                    "found {needle:?} in clear in {}",
                    file.display()
                );
            }
        }
    }
    let keep = s.tmp.take();
    drop(s);

    // Move patient 1's sealed body into patient 0's row: it must not open.
    {
        let conn = rusqlite::Connection::open(dir.join("custos.db")).unwrap();
        let body: Vec<u8> = conn
            .query_row("SELECT v.body FROM versions v JOIN current c ON c.rid = v.rid WHERE c.rtype='Patient' AND c.id=?1", [&pids[1]], |r| r.get(0))
            .unwrap();
        conn.execute(
            "UPDATE versions SET body = ?1 WHERE rid = (SELECT rid FROM current WHERE rtype='Patient' AND id=?2)",
            rusqlite::params![body, pids[0]],
        )
        .unwrap();
    }
    let tmp = tempfile::TempDir::new().unwrap();
    let dir2 = tmp.path().join("d");
    copy_dir(&dir, &dir2);
    drop(keep);
    let s = serve_dir(&dir2, &[]).await;
    let (st, oo, _) = send(&s, "GET", &format!("Patient/{}", pids[0]), None, &[]).await;
    assert_eq!(st, 500);
    assert!(
        oo["issue"][0]["diagnostics"]
            .as_str()
            .unwrap()
            .contains("integrity check failed"),
        "{oo}"
    );
    let (st, _, _) = send(&s, "GET", &format!("Patient/{}", pids[2]), None, &[]).await;
    assert_eq!(st, 200, "other records are unaffected");
    drop(s);

    // Shred patient 2 with the CLI; rotate keys; everything else still reads.
    let d = dir2.to_str().unwrap();
    let out = custos(&["patient", "shred", "--data-dir", d, &pids[2]]);
    assert!(!out.status.success(), "shred needs --yes");
    let out = custos(&["patient", "shred", "--data-dir", d, &pids[2], "--yes"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = custos(&["keys", "rotate", "--data-dir", d]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let keys: Value =
        serde_json::from_slice(&std::fs::read(dir2.join("keys.json")).unwrap()).unwrap();
    assert_eq!(
        keys["keks"].as_array().unwrap().len(),
        1,
        "the retired KEK is gone"
    );
    let s = serve_dir(&dir2, &[]).await;
    let (st, _, _) = send(&s, "GET", &format!("Patient/{}", pids[2]), None, &[]).await;
    assert_eq!(st, 410, "shredded");
    let (st, h, _) = send(
        &s,
        "GET",
        &format!("Patient/{}/_history/1", pids[2]),
        None,
        &[],
    )
    .await;
    assert_eq!(st, 410, "every version is unreadable: {h}");
    let (st, b, _) = send(
        &s,
        "GET",
        &format!("Observation?patient=Patient/{}", pids[2]),
        None,
        &[],
    )
    .await;
    assert_eq!((st, b["total"].as_u64()), (200, Some(0)));
    let (st, p, _) = send(&s, "GET", &format!("Patient/{}", pids[3]), None, &[]).await;
    assert_eq!(
        (st, p["id"].as_str()),
        (200, Some(pids[3].as_str())),
        "readable after rotation"
    );
    let (st, b, _) = send(
        &s,
        "GET",
        &format!("Patient?identifier={}", facts[3].mrn),
        None,
        &[],
    )
    .await;
    assert_eq!(
        (st, b["total"].as_u64()),
        (200, Some(1)),
        "blind index survives rotation"
    );
}

fn db_files(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for f in db_files(from) {
        std::fs::copy(&f, to.join(f.file_name().unwrap())).unwrap();
    }
}

#[test]
fn cli_errors_are_one_line_and_non_zero() {
    let out = custos(&["serve", "--data-dir", "/nonexistent/custos"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("custos: error:") && err.trim().lines().count() == 1,
        "{err}"
    );
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    assert!(custos(&["init", "--data-dir", d]).status.success());
    let again = custos(&["init", "--data-dir", d]);
    assert!(
        !again.status.success(),
        "init refuses to overwrite key material"
    );
    let mode = std::fs::metadata(dir.path().join("keys.json")).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(mode.permissions().mode() & 0o777, 0o600);
    }
    let cfg = dir.path().join("bad.toml");
    std::fs::write(&cfg, "listen = 12").unwrap();
    let out = custos(&["serve", "--config", cfg.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid config file"));
}

/// Racing conditional creates: the commit re-checks the condition, so
/// exactly one resource is created and every racer gets it back.
#[tokio::test]
async fn racing_conditional_creates_create_one_resource() {
    let s = start().await;
    let mut tasks = Vec::new();
    for _ in 0..12 {
        let base = s.base.clone();
        let c = client(&s);
        tasks.push(tokio::spawn(async move {
            let resp = c
                .post(format!("{base}/Patient"))
                .header("content-type", "application/fhir+json")
                .header(
                    "if-none-exist",
                    "identifier=http://hospital.example/mrn|RACE-1",
                )
                .body(serde_json::to_vec(&patient("Race", "RACE-1")).unwrap())
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            let body: Value = resp.json().await.unwrap();
            (status, body["id"].as_str().unwrap_or_default().to_string())
        }));
    }
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap());
    }
    assert_eq!(
        results.iter().filter(|(st, _)| *st == 201).count(),
        1,
        "{results:?}"
    );
    assert!(
        results.iter().all(|(st, _)| *st == 201 || *st == 200),
        "{results:?}"
    );
    let first = &results[0].1;
    assert!(
        results.iter().all(|(_, id)| id == first),
        "everyone sees the same resource"
    );
    let (_, b, _) = send(&s, "GET", "Patient?identifier=RACE-1", None, &[]).await;
    assert_eq!(b["total"], 1);
}

/// TLS with rustls: `init --dev-tls` makes a self-signed pair for localhost;
/// a client that trusts exactly that certificate talks FHIR over HTTPS, and
/// plain HTTP to the TLS port gets no answer.
#[tokio::test]
async fn serves_fhir_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap().to_string();
    let out = custos(&["init", "--data-dir", &d, "--dev-tls"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cert = dir.path().join("tls/cert.pem");
    let key = dir.path().join("tls/key.pem");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "the private key is owner-only");
    }
    let s = Server::serve(
        dir.path(),
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
        &[],
    );
    assert!(s.base.starts_with("https://"), "{}", s.base);
    let port = s.base.rsplit(':').next().unwrap().to_string();
    let pem = std::fs::read(&cert).unwrap();
    let tls = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
        .build()
        .unwrap();
    let url = format!("https://localhost:{port}");
    // The token endpoint over TLS too; the assertion's audience is the issuer's.
    let backend = support::BackendClient::generate(support::SYSTEM_CLIENT);
    backend.register(&s.dir, support::SYSTEM_SCOPE);
    let assertion = backend.sign(&backend.claims(&s.base));
    let answer = backend
        .exchange(&tls, &url, &assertion, support::SYSTEM_SCOPE)
        .await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    let token = answer.body["access_token"].as_str().unwrap();
    let created: Value = tls
        .post(format!("{url}/Patient"))
        .bearer_auth(token)
        .header("content-type", "application/fhir+json")
        .body(serde_json::to_vec(&patient("Tls", "TLS-1")).unwrap())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = created["id"].as_str().unwrap();
    let resp = tls
        .get(format!("{url}/Patient/{id}"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    // A client that does not trust the certificate is refused.
    let untrusting = reqwest::Client::new()
        .get(format!("{url}/metadata"))
        .send()
        .await;
    assert!(
        untrusting.is_err(),
        "an untrusted certificate must fail the handshake"
    );
    // Plain HTTP to the TLS port is not served.
    let plain = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}/metadata"))
        .send()
        .await;
    assert!(plain.map(|r| !r.status().is_success()).unwrap_or(true));
}

/// The README's first command: the demo runs end to end and proves its points.
#[test]
fn demo_runs_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("demo");
    let out = custos(&["demo", "--data-dir", d.to_str().unwrap(), "--patients", "2"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains(": 0 found in clear"), "{stdout}");
    assert!(stdout.contains("read now answers 410"), "{stdout}");
    // Access control as the demo shows it: no token, a physician without
    // and with a care relationship, breaking the glass, a patient user.
    let lines: Vec<&str> = stdout.lines().collect();
    let answer = |prefix: &str, nth: usize| -> String {
        let line = lines
            .iter()
            .filter(|l| l.starts_with(prefix))
            .nth(nth)
            .unwrap_or_else(|| panic!("no line {nth} starting {prefix:?}:\n{stdout}"));
        line.split("-> ")
            .nth(1)
            .unwrap_or_else(|| panic!("{line}"))
            .chars()
            .take(3)
            .collect()
    };
    assert_eq!(answer("no token", 0), "401", "{stdout}");
    assert_eq!(answer("  own ", 0), "200", "the physician's own patient");
    assert_eq!(answer("  other ", 0), "403", "no care relationship");
    assert_eq!(answer("  glass ", 0), "200", "break the glass");
    assert_eq!(answer("  own ", 1), "200", "the patient's own record");
    assert_eq!(answer("  other ", 1), "404", "another patient's record");
    let again = custos(&["demo", "--data-dir", d.to_str().unwrap()]);
    assert!(
        !again.status.success(),
        "the demo refuses a data dir that is not fresh"
    );
}

/// `custos keys rotate` runs while the server keeps serving: reads and
/// writes before, during and after succeed, and afterwards every data key —
/// including those the server creates later — is under the new KEK alone.
#[tokio::test]
async fn keys_rotate_without_downtime() {
    let s = start().await;
    let mut ids = Vec::new();
    for i in 0..20 {
        let (st, p, _) = send(
            &s,
            "POST",
            "Patient",
            Some(patient("Rotate", &format!("ROT-{i}"))),
            &[],
        )
        .await;
        assert_eq!(st, 201);
        ids.push(p["id"].as_str().unwrap().to_string());
    }
    let d = s.dir.to_str().unwrap().to_string();
    let rotation =
        tokio::task::spawn_blocking(move || custos(&["keys", "rotate", "--data-dir", &d]));
    // Keep reading and writing while the rotation runs.
    let mut served = 0;
    while !rotation.is_finished() {
        let (st, _, _) = send(
            &s,
            "GET",
            &format!("Patient/{}", ids[served % ids.len()]),
            None,
            &[],
        )
        .await;
        assert_eq!(st, 200, "reads never stop during rotation");
        served += 1;
    }
    let out = rotation.await.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(served > 0, "the server answered while the rotation ran");
    for id in &ids {
        let (st, _, _) = send(&s, "GET", &format!("Patient/{id}"), None, &[]).await;
        assert_eq!(st, 200);
    }
    // A new patient after rotation gets a data key wrapped under the new KEK.
    let (st, _, _) = send(
        &s,
        "POST",
        "Patient",
        Some(patient("After", "ROT-NEW")),
        &[],
    )
    .await;
    assert_eq!(st, 201, "the running server picked up the new primary KEK");
    let keys: Value =
        serde_json::from_slice(&std::fs::read(s.dir.join("keys.json")).unwrap()).unwrap();
    let kek_ids: Vec<&str> = keys["keks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["id"].as_str().unwrap())
        .collect();
    assert_eq!(kek_ids.len(), 1, "the retired KEK was removed");
    let conn = rusqlite::Connection::open(s.dir.join("custos.db")).unwrap();
    let under_other: i64 = conn
        .query_row(
            "SELECT count(*) FROM data_keys WHERE kek_id <> ?1",
            [kek_ids[0]],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(
        under_other, 0,
        "every data key is wrapped under the new KEK"
    );
}

/// The request log (info level, JSON) never carries PHI: not from query
/// strings, bodies, or resource ids in paths.
#[tokio::test]
async fn logs_carry_no_phi() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap().to_string();
    assert!(custos(&["init", "--data-dir", &d]).status.success());
    let mut s = signed_in(Server::serve(
        dir.path(),
        &[],
        &[("CUSTOS_LOG", "info"), ("CUSTOS_LOG_FORMAT", "json")],
    ))
    .await;
    let (_, p, _) = send(
        &s,
        "POST",
        "Patient",
        Some(patient("Zyxwvutsrq", "MRN-SECRET-77")),
        &[],
    )
    .await;
    let id = p["id"].as_str().unwrap().to_string();
    send(&s, "GET", &format!("Patient/{id}"), None, &[]).await;
    send(
        &s,
        "GET",
        "Patient?family=Zyxwvutsrq&identifier=MRN-SECRET-77",
        None,
        &[],
    )
    .await;
    send(&s, "GET", "Patient?birthdate=1984-07-15", None, &[]).await;
    s.stop();
    let text = s.log_text();
    assert!(
        text.contains("\"request\""),
        "the request log is there: {text}"
    );
    for secret in [
        "Zyxwvutsrq",
        "MRN-SECRET-77",
        "1984-07-15",
        "555-867-5309",
        id.as_str(),
    ] {
        assert!(
            !text.contains(secret),
            "{secret:?} appears in the log:\n{text}"
        );
    }
}
