//! Scaffolding of the audit stream tests: a store with an audit trail in a
//! temporary directory, the NATS server of `CUSTOS_TEST_NATS_URL`, unique
//! stream names, and a TCP proxy that can cut NATS off.
#![allow(dead_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use custos_audit::{AuditConfig, AuditRecord, AuditTrail};
use custos_crypto::{FileKekProvider, GcmSealer};
use custos_records::{Records, RecordsConfig};
use custos_store::{SqliteConfig, SqliteStore, Store, Synchronous};
use custos_stream::StreamConfig;
use tokio::net::{TcpListener, TcpStream};

/// The NATS server to test against, or `None` (the test is skipped).
pub fn nats_url() -> Option<String> {
    match std::env::var("CUSTOS_TEST_NATS_URL") {
        Ok(u) if !u.trim().is_empty() => Some(u),
        _ => {
            println!("skipped: CUSTOS_TEST_NATS_URL is not set");
            None
        }
    }
}

/// A stream, subject and consumer of this test alone.
pub fn unique_config(url: &str, test: &str) -> StreamConfig {
    static N: AtomicU64 = AtomicU64::new(0);
    let tag = format!(
        "{}_{}_{}",
        test,
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    );
    StreamConfig {
        nats_url: url.to_string(),
        stream: format!("CUSTOS_TEST_{}", tag.to_uppercase()),
        subject: format!("custos.test.{tag}"),
        consumer: format!("detect-{tag}"),
        ..StreamConfig::default()
    }
}

/// A data directory with a store and its audit trail.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub records: Records,
    pub trail: AuditTrail,
}

pub async fn env() -> Env {
    let dir = tempfile::tempdir().expect("temp dir");
    let kf = dir.path().join("keys.json");
    FileKekProvider::create(&kf).expect("key file");
    let mut sc = SqliteConfig::new(dir.path().join("custos.db"));
    sc.synchronous = Synchronous::Normal;
    sc.cache_mib = 16;
    let store = Arc::new(SqliteStore::open(sc).expect("store"));
    let records = Records::open(
        store as Arc<dyn Store>,
        Arc::new(FileKekProvider::open(&kf).expect("key file opens")),
        Arc::new(GcmSealer),
        RecordsConfig::default(),
    )
    .await
    .expect("records");
    let trail = AuditTrail::open(&records, AuditConfig::default())
        .await
        .expect("audit trail");
    Env {
        dir,
        records,
        trail,
    }
}

/// Append one event; returns its index and how long the append took.
pub async fn append(trail: &AuditTrail, n: u64) -> (u64, Duration) {
    let rec = AuditRecord {
        at: custos_auth::now_micros(),
        action: format!("GET /Patient/{{id}} #{n}"),
        interaction: Some("read".into()),
        status: 200,
        detail: Some(format!("test event {n}")),
        ..AuditRecord::default()
    };
    let started = Instant::now();
    let index = trail.append(rec).await.expect("the append succeeds");
    (index, started.elapsed())
}

/// Every message of the test's stream, in stream order: (audit index
/// header, payload).
pub async fn stream_contents(config: &StreamConfig) -> Vec<(u64, Vec<u8>)> {
    let client = async_nats::connect(&config.nats_url).await.expect("NATS");
    let js = async_nats::jetstream::new(client);
    let mut stream = js.get_stream(&config.stream).await.expect("the stream");
    let info = stream.info().await.expect("stream info").clone();
    let mut out = Vec::new();
    for seq in info.state.first_sequence..=info.state.last_sequence {
        if info.state.messages == 0 {
            break;
        }
        let m = stream.get_raw_message(seq).await.expect("a stored message");
        let index = m
            .headers
            .get(custos_stream::INDEX_HEADER)
            .expect("the index header")
            .as_str()
            .parse()
            .expect("a numeric index");
        let id: u64 = m
            .headers
            .get("Nats-Msg-Id")
            .expect("a message id")
            .as_str()
            .parse()
            .expect("a numeric message id");
        assert_eq!(id, index, "Nats-Msg-Id is the audit index");
        out.push((index, m.payload.to_vec()));
    }
    out
}

/// The stream's message count (0 when it does not exist yet).
pub async fn stream_len(config: &StreamConfig) -> u64 {
    let Ok(client) = async_nats::connect(&config.nats_url).await else {
        return 0;
    };
    let js = async_nats::jetstream::new(client);
    match js.get_stream(&config.stream).await {
        Ok(mut s) => s.info().await.map(|i| i.state.messages).unwrap_or(0),
        Err(_) => 0,
    }
}

/// Delete the test's stream (its consumer goes with it).
pub async fn delete_stream(config: &StreamConfig) {
    if let Ok(client) = async_nats::connect(&config.nats_url).await {
        let js = async_nats::jetstream::new(client);
        let _ = js.delete_stream(&config.stream).await;
    }
}

/// Assert the stream holds exactly the log's leaves `0..n`, in order, once.
pub async fn assert_stream_is_the_log(config: &StreamConfig, trail: &AuditTrail, n: u64) {
    let got = stream_contents(config).await;
    let indexes: Vec<u64> = got.iter().map(|(i, _)| *i).collect();
    assert_eq!(
        indexes,
        (0..n).collect::<Vec<_>>(),
        "the stream holds every index once, in order"
    );
    let log = trail.entries(0, n, n as usize).await.expect("log entries");
    for ((i, payload), row) in got.iter().zip(&log) {
        assert_eq!(*i, row.index);
        assert_eq!(
            payload, &row.data,
            "index {i}: the payload is the sealed leaf"
        );
    }
}

/// Wait for `cond`, up to `timeout`.
pub async fn eventually<F, Fut>(timeout: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if cond().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// A TCP proxy in front of NATS that can cut every connection and refuse
/// new ones (accepted, then closed at once) until restored.
pub struct Proxy {
    pub url: String,
    cut: Arc<AtomicBool>,
    generation: tokio::sync::watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start(nats_url: &str) -> Proxy {
        let upstream = nats_url
            .trim()
            .trim_start_matches("nats://")
            .trim_end_matches('/')
            .to_string();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("proxy port");
        let url = format!("nats://{}", listener.local_addr().expect("address"));
        let cut = Arc::new(AtomicBool::new(false));
        let (generation, _) = tokio::sync::watch::channel(0u64);
        let (c, g) = (cut.clone(), generation.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                if c.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let upstream = upstream.clone();
                let mut killed = g.subscribe();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(&upstream).await else {
                        return;
                    };
                    let (mut client, mut server) = (client, server);
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

    /// Drop every proxied connection and refuse new ones.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        self.generation.send_modify(|g| *g += 1);
    }

    /// Let connections through again.
    pub fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        self.generation.send_modify(|g| *g += 1);
    }
}
