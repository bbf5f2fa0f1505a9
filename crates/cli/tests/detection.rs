//! Threat detection against the real binary: a break of the glass raises a
//! case that arrives at a webhook signed with HMAC-SHA256, is worked through
//! the admin API and `custos alerts`; the alert API refuses those who may not
//! use it; and a server killed with SIGKILL resumes detection where it was.
mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A one-shot HTTP receiver: the first POST's headers and body.
async fn receive_one(listener: tokio::net::TcpListener) -> (String, Vec<u8>) {
    let (mut sock, _) = listener.accept().await.unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = sock.read(&mut chunk).await.unwrap();
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let len: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .unwrap_or(0);
            while buf.len() < end + 4 + len {
                let n = sock.read(&mut chunk).await.unwrap();
                if n == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            sock.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                .await
                .unwrap();
            return (head, buf[end + 4..end + 4 + len].to_vec());
        }
        if n == 0 {
            panic!("the webhook connection closed early");
        }
    }
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then_some(v.trim())
    })
}

async fn practitioner_and_patient(s: &Server, token: &str) -> (String, String) {
    let pr = s
        .call(
            Some(token),
            "POST",
            "Practitioner",
            Some(json!({"resourceType": "Practitioner", "name": [{"family": "Okafor"}]})),
            &[],
        )
        .await;
    assert_eq!(pr.status, 201, "{}", pr.text);
    let pt = s
        .call(
            Some(token),
            "POST",
            "Patient",
            Some(json!({"resourceType": "Patient", "name": [{"family": "Lindqvist"}]})),
            &[],
        )
        .await;
    assert_eq!(pt.status, 201, "{}", pt.text);
    (
        pr.body["id"].as_str().unwrap().to_string(),
        pt.body["id"].as_str().unwrap().to_string(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_break_of_the_glass_is_raised_signed_and_worked() {
    let hook = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook_url = format!("http://{}/hook", hook.local_addr().unwrap());
    let secret = "webhook-secret-for-the-test";
    let mut s = Server::start_with_config(&format!(
        "[detect]\nwebhook_url = \"{hook_url}\"\nwebhook_secret = \"{secret}\"\n"
    ));
    let system = s.sign_in_system().await;
    let (pr, pt) = practitioner_and_patient(&s, &system).await;
    let nurse = s.add_user("nurse.k", "nurse", &[("--practitioner", &pr)]);
    let officer = s.add_user("officer.k", "security-officer", &[]);
    let nurse_token = nurse.token(&s.base, "user/*.rs").await;
    let received = tokio::spawn(receive_one(hook));

    // No relationship: refused; with a stated reason: granted, and raised.
    let r = s
        .call(
            Some(&nurse_token),
            "GET",
            &format!("Patient/{pt}"),
            None,
            &[],
        )
        .await;
    assert_eq!(r.status, 403);
    let r = s
        .call(
            Some(&nurse_token),
            "GET",
            &format!("Patient/{pt}"),
            None,
            &[("x-break-glass-reason", "unconscious in the ED")],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);

    // The webhook: signed over the exact body.
    let (head, body) = tokio::time::timeout(Duration::from_secs(15), received)
        .await
        .expect("the webhook was called")
        .unwrap();
    let sig = header(&head, "x-custos-signature").expect("a signature header");
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let tag = hex_decode(sig.strip_prefix("sha256=").expect("sha256="));
    assert!(
        ring::hmac::verify(&key, &body, &tag).is_ok(),
        "bad signature"
    );
    let mut tampered = body.clone();
    tampered[10] ^= 1;
    assert!(ring::hmac::verify(&key, &tampered, &tag).is_err());
    let event: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(header(&head, "x-custos-event"), Some("case-opened"));
    let case = &event["case"];
    assert_eq!(case["detector"], "break-glass", "{event}");
    assert_eq!(case["subject"], format!("user:{}", nurse.id));
    let index = case["findings"][0]["evidence"][0].as_u64().unwrap();
    // Its evidence is a provable audit entry.
    let proof = s
        .call(
            None,
            "GET",
            &format!("audit/proof/inclusion?index={index}&size={}", index + 1),
            None,
            &[],
        )
        .await;
    assert_eq!(proof.status, 200, "{}", proof.text);

    // The alert API: only a security officer's (or admin's) CLI token.
    let r = s
        .call(Some(&nurse_token), "GET", "admin/alerts", None, &[])
        .await;
    assert_eq!(r.status, 403);
    let r = s.call(None, "GET", "admin/alerts", None, &[]).await;
    assert_eq!(r.status, 401);
    let token = officer.token(&s.base, "user/*.rs").await;
    let list = s
        .call(Some(&token), "GET", "admin/alerts?status=open", None, &[])
        .await;
    assert_eq!(list.status, 200, "{}", list.text);
    let id = list.body["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["detector"] == "break-glass")
        .expect("the break-glass case is listed")["id"]
        .as_str()
        .unwrap()
        .to_string();
    let bad = s
        .call(
            Some(&token),
            "POST",
            &format!("admin/alerts/{id}"),
            Some(json!({"status": "closed-ish"})),
            &[],
        )
        .await;
    assert_eq!(bad.status, 400);
    assert!(is_outcome(&bad.body), "{}", bad.text);
    let missing = s
        .call(Some(&token), "GET", "admin/alerts/no-such-case", None, &[])
        .await;
    assert_eq!(missing.status, 404);

    // The command line works the case.
    let out = custos_cmd()
        .args(["alerts", "update", "--url", &s.base, &id])
        .args(["--status", "dismissed", "--outcome", "no-action"])
        .args(["--note", "genuine emergency, reviewed"])
        .env("CUSTOS_TOKEN", &token)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = custos_cmd()
        .args(["alerts", "list", "--url", &s.base, "--status", "dismissed"])
        .env("CUSTOS_TOKEN", &token)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains(&id), "{text}");
    let shown = s
        .call(
            Some(&token),
            "GET",
            &format!("admin/alerts/{id}"),
            None,
            &[],
        )
        .await;
    assert_eq!(shown.body["status"], "dismissed");
    assert_eq!(shown.body["outcome"], "no-action");
    assert_eq!(
        shown.body["notes"][0]["text"],
        "genuine emergency, reviewed"
    );
    // A bad token on the command line is a one-line error.
    let out = custos_cmd()
        .args(["alerts", "list", "--url", &s.base])
        .env("CUSTOS_TOKEN", "not-a-token")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("HTTP 401"));
}

fn hex_decode(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn detection_resumes_after_sigkill_without_losing_what_it_saw() {
    let dir = fresh_data_dir();
    let mut s = Server::serve(dir.path(), &[], &[]);
    let victim = s.add_user("victim.k", "billing", &[]);
    let officer = s.add_user("officer.r", "security-officer", &[]);
    // Four wrong passwords: below the guessing threshold of five.
    for i in 0..4 {
        let r = victim
            .password_grant(
                &s.base,
                &format!("wrong-{i}-password"),
                None,
                "user/*.rs",
                &[],
            )
            .await;
        assert_eq!(r.status, 400);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    s.stop(); // SIGKILL: whatever was not saved is read again from the log
    let s = Server::serve(dir.path(), &[], &[]);
    let r = victim
        .password_grant(&s.base, "wrong-4-password", None, "user/*.rs", &[])
        .await;
    assert_eq!(r.status, 400);
    let token = officer.token(&s.base, "user/*.rs").await;
    let mut cases = Vec::new();
    for _ in 0..100 {
        let list = s.call(Some(&token), "GET", "admin/alerts", None, &[]).await;
        assert_eq!(list.status, 200, "{}", list.text);
        cases = list.body["cases"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["detector"] == "credential-attack")
            .cloned()
            .collect();
        if !cases.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(cases.len(), 1, "{cases:?}");
    assert_eq!(cases[0]["findings"][0]["kind"], "password-guessing");
    assert_eq!(cases[0]["count"], 1, "the finding was raised once");
}

#[tokio::test(flavor = "multi_thread")]
async fn require_break_glass_holds_a_clinician_until_lifted() {
    let mut s = Server::start();
    let system = s.sign_in_system().await;
    let (pr, _) = practitioner_and_patient(&s, &system).await;
    let own = s
        .call(
            Some(&system),
            "POST",
            "Patient",
            Some(json!({"resourceType": "Patient",
                "generalPractitioner": [{"reference": format!("Practitioner/{pr}")}]})),
            &[],
        )
        .await;
    let own = own.body["id"].as_str().unwrap().to_string();
    let doc = s.add_user("dr.k", "physician", &[("--practitioner", &pr)]);
    let token = doc.token(&s.base, "user/*.rs").await;
    let path = format!("Patient/{own}");
    assert_eq!(
        s.call(Some(&token), "GET", &path, None, &[]).await.status,
        200
    );
    // The response a snooping or VIP alert takes, here set by hand.
    custos_ok(&[
        "user",
        "require-break-glass",
        "--data-dir",
        &s.data(),
        "dr.k",
        "on",
    ]);
    let r = s.call(Some(&token), "GET", &path, None, &[]).await;
    assert_eq!(r.status, 403, "{}", r.text);
    let found = s
        .call(Some(&token), "GET", "Patient?_summary=count", None, &[])
        .await;
    assert_eq!(found.body["total"], 0, "{}", found.text);
    let glass = [("x-break-glass-reason", "patient deteriorating")];
    assert_eq!(
        s.call(Some(&token), "GET", &path, None, &glass)
            .await
            .status,
        200
    );
    // Lifted after review: the care relationship counts again.
    custos_ok(&[
        "user",
        "require-break-glass",
        "--data-dir",
        &s.data(),
        "dr.k",
        "off",
    ]);
    let other = s
        .call(Some(&token), "GET", "Patient?_summary=count", None, &[])
        .await;
    assert!(other.body["total"].as_u64().unwrap() >= 1, "{}", other.text);
    // Bad input: a one-line error.
    let out = custos(&[
        "user",
        "require-break-glass",
        "--data-dir",
        &s.data(),
        "dr.k",
        "maybe",
    ]);
    assert!(!out.status.success());
}
