//! The audit stream against the real binary and a real NATS JetStream
//! (`CUSTOS_TEST_NATS_URL`, e.g. nats://127.0.0.1:4222; skipped when
//! unset): `custos serve` with `[stream]` publishes its audit events and
//! detection reads them back from the stream. NATS is cut off (through a
//! proxy) while a nurse breaks the glass: requests are served, no alert can
//! be raised meanwhile (detection reads only the stream); once NATS returns
//! the stream catches up from the log and the alert is raised.
mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use support::*;
use tokio::net::{TcpListener, TcpStream};

fn nats_url() -> Option<String> {
    match std::env::var("CUSTOS_TEST_NATS_URL") {
        Ok(u) if !u.trim().is_empty() => Some(u),
        _ => {
            println!("skipped: CUSTOS_TEST_NATS_URL is not set");
            None
        }
    }
}

/// A TCP proxy in front of NATS that can drop every connection and refuse
/// new ones (accepted, then closed) until restored.
struct Proxy {
    url: String,
    cut: Arc<AtomicBool>,
    generation: tokio::sync::watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start(nats_url: &str) -> Proxy {
        let upstream = nats_url
            .trim()
            .trim_start_matches("nats://")
            .trim_end_matches('/')
            .to_string();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("nats://{}", listener.local_addr().unwrap());
        let cut = Arc::new(AtomicBool::new(false));
        let (generation, _) = tokio::sync::watch::channel(0u64);
        let (c, g) = (cut.clone(), generation.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    continue;
                };
                if c.load(Ordering::SeqCst) {
                    continue;
                }
                let upstream = upstream.clone();
                let mut killed = g.subscribe();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(&upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = killed.changed() => {}
                    }
                });
            }
        });
        Proxy {
            url,
            cut,
            generation,
            task,
        }
    }

    fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        self.generation.send_modify(|g| *g += 1);
    }

    fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        self.generation.send_modify(|g| *g += 1);
    }
}

async fn stream_len(url: &str, stream: &str) -> u64 {
    let Ok(client) = async_nats::connect(url).await else {
        return 0;
    };
    let js = async_nats::jetstream::new(client);
    match js.get_stream(stream).await {
        Ok(mut s) => s.info().await.map(|i| i.state.messages).unwrap_or(0),
        Err(_) => 0,
    }
}

async fn break_glass_cases(s: &Server, token: &str) -> usize {
    let list = s.call(Some(token), "GET", "admin/alerts", None, &[]).await;
    assert_eq!(list.status, 200, "{}", list.text);
    list.body["cases"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["detector"] == "break-glass")
        .count()
}

#[tokio::test(flavor = "multi_thread")]
async fn detection_over_the_audit_stream_catches_up_after_a_nats_cut() {
    let Some(url) = nats_url() else { return };
    let tag = format!("e2e_{}", std::process::id());
    let (stream, subject, consumer) = (
        format!("CUSTOS_TEST_{}", tag.to_uppercase()),
        format!("custos.test.{tag}"),
        format!("detect-{tag}"),
    );
    let proxy = Proxy::start(&url).await;
    let mut s = Server::start_with_config(&format!(
        "[stream]\nnats_url = \"{}\"\nstream = \"{stream}\"\nsubject = \"{subject}\"\nconsumer = \"{consumer}\"\n",
        proxy.url
    ));
    let system = s.sign_in_system().await;
    let pr = s
        .call(
            Some(&system),
            "POST",
            "Practitioner",
            Some(json!({"resourceType": "Practitioner", "name": [{"family": "Okafor"}]})),
            &[],
        )
        .await;
    assert_eq!(pr.status, 201, "{}", pr.text);
    let pr = pr.body["id"].as_str().unwrap().to_string();
    let pt = s
        .call(
            Some(&system),
            "POST",
            "Patient",
            Some(json!({"resourceType": "Patient", "name": [{"family": "Lindqvist"}]})),
            &[],
        )
        .await;
    assert_eq!(pt.status, 201, "{}", pt.text);
    let pt = pt.body["id"].as_str().unwrap().to_string();
    let nurse = s.add_user("nurse.s", "nurse", &[("--practitioner", &pr)]);
    let officer = s.add_user("officer.s", "security-officer", &[]);
    let nurse_token = nurse.token(&s.base, "user/*.rs").await;
    let officer_token = officer.token(&s.base, "user/*.rs").await;
    // The server publishes its events.
    let deadline = Instant::now() + Duration::from_secs(30);
    while stream_len(&url, &stream).await == 0 {
        assert!(
            Instant::now() < deadline,
            "nothing reached the stream; log:\n{}",
            s.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // NATS cut off: the break of the glass is served and audited.
    proxy.cut();
    let path = format!("Patient/{pt}");
    let started = Instant::now();
    let r = s
        .call(
            Some(&nurse_token),
            "GET",
            &path,
            None,
            &[("x-break-glass-reason", "unconscious in the ED")],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    for _ in 0..20 {
        let r = s.call(Some(&system), "GET", &path, None, &[]).await;
        assert_eq!(r.status, 200, "{}", r.text);
    }
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "requests slowed down without NATS: {:?}",
        started.elapsed()
    );
    // The cut lasts until the publisher has noticed it (its publish waits
    // for an acknowledgement, up to 5 s) and at least 4 s: a shorter cut
    // can end before the publisher sees anything amiss, its publish then
    // simply acknowledged after the reconnect.
    let served_at = Instant::now();
    while served_at.elapsed() < Duration::from_secs(4)
        || !s.log_text().contains("audit stream is unavailable")
    {
        assert!(
            served_at.elapsed() < Duration::from_secs(30),
            "the publisher never noticed the cut; log:\n{}",
            s.log_text()
        );
        // Detection reads only the stream: nothing can be raised yet.
        assert_eq!(break_glass_cases(&s, &officer_token).await, 0);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    s.assert_alive();

    // NATS back: the stream catches up from the log; the alert is raised.
    proxy.restore();
    let deadline = Instant::now() + Duration::from_secs(60);
    while break_glass_cases(&s, &officer_token).await == 0 {
        assert!(
            Instant::now() < deadline,
            "no alert after NATS returned; log:\n{}",
            s.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(break_glass_cases(&s, &officer_token).await, 1);
    let log = s.log_text();
    assert!(
        log.contains("audit stream is unavailable"),
        "the outage is logged: {log}"
    );
    assert!(!log.contains("Lindqvist"), "no PHI in the log");
    s.stop();
    if let Ok(client) = async_nats::connect(&url).await {
        let _ = async_nats::jetstream::new(client)
            .delete_stream(&stream)
            .await;
    }
}
