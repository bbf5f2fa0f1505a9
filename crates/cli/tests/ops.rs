//! Operations against the real binary: liveness, readiness and Prometheus
//! metrics (without identifiers, without audit noise), and a graceful
//! shutdown on SIGTERM that finishes the requests in flight, their audit
//! events included.
mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::*;

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

async fn metrics(s: &Server) -> String {
    let r = http().get(s.url("metrics")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let ct = r.headers()["content-type"].to_str().unwrap().to_string();
    assert!(ct.starts_with("application/openmetrics-text"), "{ct}");
    r.text().await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn health_readiness_and_metrics() {
    let mut s = Server::start();
    let token = s.sign_in_system().await;

    let h = s.call(None, "GET", "healthz", None, &[]).await;
    assert_eq!(h.status, 200, "{}", h.text);
    assert_eq!(h.body["status"], "ok");
    let r = s.call(None, "GET", "readyz", None, &[]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["status"], "ready");
    assert_eq!(r.body["store"], "sqlite");
    assert_eq!(r.body["leader"], true, "the only node leads");

    let p = s
        .call(
            Some(&token),
            "POST",
            "Patient",
            Some(json!({"resourceType": "Patient", "name": [{"family": "Metricsdottir"}]})),
            &[],
        )
        .await;
    assert_eq!(p.status, 201, "{}", p.text);
    let id = p.body["id"].as_str().unwrap().to_string();
    let got = s
        .call(Some(&token), "GET", &format!("Patient/{id}"), None, &[])
        .await;
    assert_eq!(got.status, 200);

    let text = metrics(&s).await;
    assert!(
        text.contains(
            r#"custos_http_requests_total{method="GET",route="/{rtype}/{id}",status="200"} 1"#
        ),
        "{text}"
    );
    assert!(
        text.contains("custos_http_request_duration_seconds_bucket"),
        "{text}"
    );
    assert_eq!(metric(&text, "custos_leader"), Some(1.0), "{text}");
    assert_eq!(metric(&text, "custos_ready"), Some(1.0), "{text}");
    assert!(
        metric(&text, "custos_audit_entries").unwrap() >= 3.0,
        "{text}"
    );
    assert!(
        metric(&text, "custos_detection_lag_events").is_some(),
        "{text}"
    );
    // Route templates only: no resource id, no name.
    assert!(!text.contains(&id), "an id leaked into the metrics");
    assert!(!text.contains("Metricsdottir"));

    // Probes are not audited: the log does not grow with them.
    let before = metric(&metrics(&s).await, "custos_audit_entries").unwrap();
    for _ in 0..5 {
        assert_eq!(s.call(None, "GET", "healthz", None, &[]).await.status, 200);
        assert_eq!(s.call(None, "GET", "readyz", None, &[]).await.status, 200);
    }
    let after = metric(&metrics(&s).await, "custos_audit_entries").unwrap();
    assert_eq!(before, after, "health probes were audited");
}

/// A transaction of `n` new patients.
fn bundle(tag: usize, n: usize) -> Value {
    let entries: Vec<Value> = (0..n)
        .map(|i| {
            json!({
                "fullUrl": format!("urn:uuid:00000000-0000-4000-8000-{tag:06}{i:06}"),
                "resource": {"resourceType": "Patient", "name": [{"family": format!("Inflight{tag}x{i}")}]},
                "request": {"method": "POST", "url": "Patient"}
            })
        })
        .collect();
    json!({"resourceType": "Bundle", "type": "transaction", "entry": entries})
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_finishes_requests_in_flight_and_their_audit() {
    let mut s = Server::start();
    let token = s.sign_in_system().await;
    let url = s.base.clone();
    let mut sent = Vec::new();
    for k in 0..12 {
        let (url, token) = (url.clone(), token.clone());
        sent.push(tokio::spawn(async move {
            http()
                .post(format!("{url}/"))
                .bearer_auth(&token)
                .header("content-type", "application/fhir+json")
                .body(bundle(k, 150).to_string())
                .timeout(Duration::from_secs(60))
                .send()
                .await
        }));
    }
    // Let them arrive, then stop the server the way an operator does.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let mut s = tokio::task::spawn_blocking(move || {
        s.terminate();
        s
    })
    .await
    .unwrap();
    let mut done = Vec::new();
    for t in sent {
        match t.await.unwrap() {
            Ok(r) => {
                assert_eq!(r.status(), 200, "an in-flight transaction failed");
                let v: Value = r.json().await.expect("a complete answer");
                done.push(v);
            }
            // Sent after the listener closed: refused, never half-answered.
            Err(e) => assert!(e.is_connect(), "a request was cut off: {e}"),
        }
    }
    assert!(!done.is_empty(), "no transaction was in flight");

    // After a restart every answered write is there, and the log verifies.
    let dir = s.tmp.take().unwrap();
    drop(s);
    let mut again = Server::start_in(dir, &[], &[]);
    let token = again.sign_in_system().await;
    for v in &done {
        for e in v["entry"].as_array().unwrap() {
            let loc = e["response"]["location"].as_str().unwrap();
            let path = loc.split("/_history").next().unwrap();
            let r = again.call(Some(&token), "GET", path, None, &[]).await;
            assert_eq!(r.status, 200, "{path} answered before the stop is gone");
        }
    }
    let key = custos_ok(&["audit", "public-key", "--data-dir", &again.data()])
        .trim()
        .to_string();
    again.terminate();
    let out = custos_ok(&[
        "audit",
        "verify",
        "--data-dir",
        &again.data(),
        "--public-key",
        &key,
    ]);
    assert!(out.contains("verified"), "{out}");
}
