//! Several Custos nodes on one PostgreSQL database, driven as real
//! processes over HTTP: writes and reads spread over three nodes, the
//! leader killed with SIGKILL mid-load, every acknowledged write readable
//! afterwards, one audit log that verifies across the change of leader, a
//! snooping attack spread across the nodes raising one alert, a lock made
//! through one node holding on all at the next request, and no clear PHI in
//! any table.
//!
//! Needs `CUSTOS_TEST_POSTGRES_URL` (CI sets it); without it the test prints
//! why it skips. Each run uses a schema of its own, dropped at the end.
mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::*;

fn database() -> Option<String> {
    match std::env::var("CUSTOS_TEST_POSTGRES_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            eprintln!("skipped: CUSTOS_TEST_POSTGRES_URL is not set");
            None
        }
    }
}

/// The address every node names as issuer (what a load balancer would be).
const CLUSTER_URL: &str = "http://custos-cluster.test";

struct Cluster {
    url: String,
    schema: String,
    /// The JetStream stream of this run, when NATS is available.
    stream: Option<(String, String)>,
    dir: tempfile::TempDir,
    config: PathBuf,
}

impl Cluster {
    fn new(url: &str, tag: &str) -> Cluster {
        let schema = format!(
            "custos_it_{tag}_{}_{}",
            std::process::id(),
            now_secs() % 100_000
        );
        let dir = fresh_data_dir();
        let config = dir.path().join("cluster.toml");
        let nats = std::env::var("CUSTOS_TEST_NATS_URL")
            .ok()
            .filter(|u| !u.is_empty());
        let stream = nats.map(|n| (n, format!("CUSTOS_IT_{}", schema.to_uppercase())));
        let stream_toml = match &stream {
            Some((n, name)) => format!(
                "[stream]\nnats_url = \"{n}\"\nstream = \"{name}\"\nsubject = \"{}\"\nconsumer = \"detect\"\n",
                name.to_lowercase()
            ),
            None => {
                eprintln!(
                    "CUSTOS_TEST_NATS_URL is not set: the cluster runs without the audit stream"
                );
                String::new()
            }
        };
        std::fs::write(
            &config,
            format!(
                "base_url = \"{CLUSTER_URL}\"\n\
                 [storage]\nurl = \"{url}\"\nschema = \"{schema}\"\npool_size = 4\n\
                 [audit]\ncheckpoint_secs = 1\n\
                 [detect]\nsave_secs = 1\n{stream_toml}"
            ),
        )
        .unwrap();
        Cluster {
            url: url.to_string(),
            schema,
            stream,
            dir,
            config,
        }
    }

    fn cfg(&self) -> &str {
        self.config.to_str().unwrap()
    }

    fn data(&self) -> &Path {
        self.dir.path()
    }

    /// `custos ARGS --config CLUSTER` (the database comes from the config).
    fn custos_ok(&self, args: &[&str]) -> String {
        let out = custos_cmd()
            .args(args)
            .args(["--config", self.cfg()])
            .output()
            .expect("run custos");
        assert!(
            out.status.success(),
            "custos {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn node(&self) -> Server {
        Server::serve(self.data(), &["--config", self.cfg()], &[])
    }

    fn register(&self, client: &BackendClient, scope: &str) {
        client.register_with(self.data(), scope, &["--config", self.cfg()]);
    }

    fn add_user(&self, username: &str, role: &str, link: &[(&str, &str)]) -> User {
        add_user_with(self.data(), username, role, link, &["--config", self.cfg()])
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let (url, schema) = (self.url.clone(), self.schema.clone());
        let stream = self.stream.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if let Ok((c, conn)) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
                    tokio::spawn(conn);
                    let _ = c
                        .batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
                        .await;
                }
                if let Some((nats, name)) = stream
                    && let Ok(client) = async_nats::connect(&nats).await
                {
                    let _ = async_nats::jetstream::new(client)
                        .delete_stream(&name)
                        .await;
                }
            })
        })
        .join();
    }
}

/// A `system/*.cruds` token from the cluster's issuer, asked of `node`.
async fn system_token(client: &BackendClient, node: &Server) -> String {
    let assertion = client.sign(&client.claims(CLUSTER_URL));
    let r = client
        .exchange(&http(), &node.base, &assertion, SYSTEM_SCOPE)
        .await;
    assert_eq!(r.status, 200, "client_credentials refused: {}", r.text);
    r.body["access_token"].as_str().unwrap().to_string()
}

/// The snooping cases on `patient` in an `/admin/alerts` answer.
fn snooping_on(alerts: &Value, patient: &str) -> Vec<Value> {
    alerts["cases"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["detector"] == "snooping" && c["patient"] == patient)
        .cloned()
        .collect()
}

async fn ready(node: &Server) -> Option<Value> {
    let r = http()
        .get(node.url("readyz"))
        .timeout(Duration::from_secs(3))
        .send()
        .await
        .ok()?;
    let ok = r.status() == 200;
    let v: Value = r.json().await.ok()?;
    ok.then_some(v)
}

/// The index of the node that leads, waiting up to `within`.
async fn leader(nodes: &[Option<Server>], within: Duration) -> usize {
    let deadline = Instant::now() + within;
    loop {
        for (i, n) in nodes.iter().enumerate() {
            if let Some(n) = n
                && let Some(v) = ready(n).await
                && v["leader"] == true
            {
                return i;
            }
        }
        assert!(Instant::now() < deadline, "no node took the lead");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_one_database_survive_the_leader_dying() {
    let Some(url) = database() else { return };
    let cluster = Cluster::new(&url, "three");
    let system = BackendClient::generate(SYSTEM_CLIENT);
    // The first command creates the schema (migrations) and the keys.
    cluster.register(&system, SYSTEM_SCOPE);
    let migrated = cluster.custos_ok(&["migrate", "--data-dir", cluster.data().to_str().unwrap()]);
    assert!(migrated.contains("migration 1:"), "{migrated}");

    let mut nodes: Vec<Option<Server>> = (0..3).map(|_| Some(cluster.node())).collect();
    let token = system_token(&system, nodes[0].as_ref().unwrap()).await;
    let first_leader = leader(&nodes, Duration::from_secs(15)).await;

    // Health and metrics on every node.
    for n in nodes.iter().flatten() {
        let h = n.call(None, "GET", "healthz", None, &[]).await;
        assert_eq!(h.status, 200, "{}", h.text);
        let m = http().get(n.url("metrics")).send().await.unwrap();
        assert_eq!(m.status(), 200);
        let text = m.text().await.unwrap();
        assert!(text.contains("custos_db_pool_max_connections 4"), "{text}");
        assert!(text.contains("custos_audit_entries"), "{text}");
    }

    // --- A snooping attack spread across the nodes: one alert.
    let pr = nodes[0]
        .as_ref()
        .unwrap()
        .call(
            Some(&token),
            "POST",
            "Practitioner",
            Some(json!({"resourceType": "Practitioner", "name": [{"family": "Halvorsen"}]})),
            &[],
        )
        .await;
    assert_eq!(pr.status, 201, "{}", pr.text);
    let pr = pr.body["id"].as_str().unwrap().to_string();
    let relative = nodes[1]
        .as_ref()
        .unwrap()
        .call(
            Some(&token),
            "POST",
            "Patient",
            Some(json!({"resourceType": "Patient", "name": [{"family": "Halvorsen", "given": ["Ingrid"]}]})),
            &[],
        )
        .await;
    assert_eq!(relative.status, 201, "{}", relative.text);
    let relative = relative.body["id"].as_str().unwrap().to_string();
    let nurse = cluster.add_user("nurse.halvorsen", "nurse", &[("--practitioner", &pr)]);
    let officer = cluster.add_user("officer.c", "security-officer", &[]);
    let nurse_token = nurse
        .token(&nodes[2].as_ref().unwrap().base, "user/*.rs")
        .await;
    for n in nodes.iter().flatten() {
        let r = n
            .call(
                Some(&nurse_token),
                "GET",
                &format!("Patient/{relative}"),
                None,
                &[("x-break-glass-reason", "checking on a patient in the ED")],
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
    }

    // --- Load over all three nodes; the leader dies in the middle of it.
    let acked: Arc<std::sync::Mutex<Vec<(String, String)>>> = Default::default();
    let bases: Vec<String> = nodes.iter().flatten().map(|n| n.base.clone()).collect();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for w in 0..6 {
        let (bases, token, acked, stop) =
            (bases.clone(), token.clone(), acked.clone(), stop.clone());
        load.push(tokio::spawn(async move {
            let client = http();
            let mut i = 0usize;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let base = &bases[(w + i) % bases.len()];
                i += 1;
                let body = json!({
                    "resourceType": "Patient",
                    "name": [{"family": format!("Load{w}x{i}")}],
                    "gender": "unknown"
                });
                let r = client
                    .post(format!("{base}/Patient"))
                    .bearer_auth(&token)
                    .header("content-type", "application/fhir+json")
                    .body(body.to_string())
                    .timeout(Duration::from_secs(10))
                    .send()
                    .await;
                // Only a 201 that arrived is an acknowledged write.
                if let Ok(r) = r
                    && r.status() == 201
                    && let Ok(v) = r.json::<Value>().await
                {
                    acked.lock().unwrap().push((
                        v["id"].as_str().unwrap_or_default().to_string(),
                        base.clone(),
                    ));
                }
                // And a read of something already written, on another node.
                let seen = acked.lock().unwrap().last().cloned();
                if let Some((id, _)) = seen {
                    let other = &bases[(w + i + 1) % bases.len()];
                    let _ = client
                        .get(format!("{other}/Patient/{id}"))
                        .bearer_auth(&token)
                        .timeout(Duration::from_secs(10))
                        .send()
                        .await;
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before_kill = acked.lock().unwrap().len();
    assert!(before_kill > 0, "the load made no progress");
    let victim = nodes[first_leader].as_mut().unwrap();
    victim.stop(); // SIGKILL
    nodes[first_leader] = None;
    let new_leader = leader(&nodes, Duration::from_secs(15)).await;
    assert_ne!(new_leader, first_leader);
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in load {
        t.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() > before_kill,
        "writes continued after the leader died ({} before, {} after)",
        before_kill,
        acked.len()
    );

    // Every acknowledged write is readable on every surviving node.
    for n in nodes.iter().flatten() {
        for (id, _) in &acked {
            let r = n
                .call(Some(&token), "GET", &format!("Patient/{id}"), None, &[])
                .await;
            assert_eq!(
                r.status, 200,
                "acknowledged Patient/{id} is gone: {}",
                r.text
            );
        }
    }

    // One alert for the snooping, raised by the (new) leader's detection.
    let lead = nodes[new_leader].as_ref().unwrap();
    let officer_token = officer.token(&lead.base, "user/*.rs").await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let snooping = loop {
        let r = lead
            .call(Some(&officer_token), "GET", "admin/alerts", None, &[])
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        let found = snooping_on(&r.body, &relative);
        if !found.is_empty() || Instant::now() > deadline {
            break found;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert_eq!(snooping.len(), 1, "one snooping case: {snooping:?}");
    assert_eq!(snooping[0]["subject"], format!("user:{}", nurse.id));
    // Every node answers the alert API with the same cases: one, not one
    // per node (only the leader judges).
    for n in nodes.iter().flatten() {
        let r = n
            .call(Some(&officer_token), "GET", "admin/alerts", None, &[])
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        let here = snooping_on(&r.body, &relative);
        assert_eq!(here.len(), 1, "node {}: {here:?}", n.base);
    }
    // A case worked through one node is seen so on another.
    let id = snooping[0]["id"].as_str().unwrap();
    let other = nodes
        .iter()
        .flatten()
        .find(|n| n.base != lead.base)
        .unwrap();
    let r = other
        .call(
            Some(&officer_token),
            "POST",
            &format!("admin/alerts/{id}"),
            Some(json!({"status": "investigating", "note": "asked the nurse"})),
            &[],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = lead
        .call(
            Some(&officer_token),
            "GET",
            &format!("admin/alerts/{id}"),
            None,
            &[],
        )
        .await;
    assert_eq!(r.body["status"], "investigating", "{}", r.text);

    // A lock made through one node holds on every node at the next request.
    let before = nodes
        .iter()
        .flatten()
        .next()
        .unwrap()
        .call(
            Some(&nurse_token),
            "GET",
            &format!("Patient/{relative}"),
            None,
            &[("x-break-glass-reason", "checking on a patient in the ED")],
        )
        .await;
    assert_eq!(before.status, 200, "{}", before.text);
    let r = lead
        .call(
            Some(&officer_token),
            "POST",
            &format!("admin/users/{}/lock", nurse.username),
            Some(json!({"reason": "under investigation"})),
            &[],
        )
        .await;
    assert!(r.status < 300, "lock refused: {}", r.text);
    for n in nodes.iter().flatten() {
        let r = n
            .call(
                Some(&nurse_token),
                "GET",
                &format!("Patient/{relative}"),
                None,
                &[("x-break-glass-reason", "checking on a patient in the ED")],
            )
            .await;
        assert_eq!(
            r.status, 401,
            "node {} still served a locked account: {}",
            n.base, r.text
        );
    }

    // The database holds no clear PHI: no name, in text or as bytes.
    let (db, conn) = tokio_postgres::connect(&cluster.url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let tables = db
        .query(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = $1",
            &[&cluster.schema],
        )
        .await
        .unwrap();
    assert!(tables.len() >= 10, "{} tables", tables.len());
    let needles = ["Halvorsen", "Ingrid", "Load0x1"];
    for t in tables {
        let name: String = t.get(0);
        let rows = db
            .query(
                &format!("SELECT t::text FROM {}.{} t", cluster.schema, name),
                &[],
            )
            .await
            .unwrap();
        for row in rows {
            let text: String = row.get(0);
            for n in needles {
                let hex: String = n.bytes().map(|b| format!("{b:02x}")).collect();
                assert!(
                    !text.contains(n) && !text.contains(&hex),
                    "{n} in clear in table {name}"
                );
            }
        }
    }

    // The log verifies: one history, checkpoints of both leaders consistent.
    let key = cluster
        .custos_ok(&[
            "audit",
            "public-key",
            "--data-dir",
            cluster.data().to_str().unwrap(),
        ])
        .trim()
        .to_string();
    let out = custos_cmd()
        .args([
            "audit",
            "verify",
            "--database-url",
            &cluster.url,
            "--database-schema",
            &cluster.schema,
            "--public-key",
            &key,
        ])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "audit verify failed: {text}");
    assert!(text.contains("verified"), "{text}");
}
