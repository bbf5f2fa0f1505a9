//! The scale-out phase of `custos bench`: ingest and read throughput on
//! PostgreSQL with one node and with three, beside the embedded SQLite
//! store measured in the same run, plus the audit lag (entries not yet
//! covered by a signed checkpoint) and the detection lag (commit → judged)
//! under that load.
//!
//! Each node is a full Custos server (its own store connection pool and
//! writer, record service, audit trail, identity service) on its own
//! loopback port; all share one database schema, as separate processes
//! would. Here they share this process's CPUs with the load generator.
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use custos_crypto::GcmSealer;

use super::{
    INGEST_SENDERS, IngestData, Plan, Row, read_bench, read_paths, row, snippet, thousands,
};
use crate::client::FhirClient;
use crate::config::{FileConfig, StorageConfig};
use crate::embedded::EmbeddedServer;

/// The issuer every node names (a load balancer's address in production).
const ISSUER: &str = "http://custos-bench-cluster.invalid";

struct Node {
    server: EmbeddedServer,
    store: Arc<dyn custos_store::Store>,
}

struct Cluster {
    label: String,
    nodes: Vec<Node>,
    clients: Vec<FhirClient>,
    schema: Option<(String, String)>,
    _dir: super::TempDir,
}

struct Figures {
    ingest_rate: f64,
    read_rate: f64,
    read_p99_us: u32,
    /// Largest number of entries seen not yet under a signed checkpoint.
    audit_lag_max: u64,
    /// Commit → judged, p99 (µs), and the largest backlog seen.
    detect_p99_us: u64,
    detect_backlog_max: u64,
}

impl Cluster {
    async fn start(label: &str, url: Option<&str>, nodes: usize) -> anyhow::Result<Cluster> {
        let dir = super::TempDir::new(label)?;
        crate::init_dir(dir.path(), false)?;
        let schema = url.map(|u| {
            (
                u.to_string(),
                format!("custos_bench_{}_{}", std::process::id(), rand_suffix()),
            )
        });
        let file = FileConfig {
            storage: schema.as_ref().map(|(u, s)| StorageConfig {
                url: Some(u.clone()),
                schema: Some(s.clone()),
                pool_size: Some(8),
                ..Default::default()
            }),
            base_url: Some(ISSUER.into()),
            ..Default::default()
        };
        let mut started = Vec::new();
        for n in 0..nodes {
            let opened =
                crate::open_data(file.clone(), dir.path().to_path_buf(), Arc::new(GcmSealer))
                    .await?;
            let auth = custos_auth::AuthConfig {
                access_token_secs: 4 * 3600,
                ..custos_auth::AuthConfig::default()
            };
            // Checkpoints every second (the audit lag is measured against
            // them); detection as in production but without responses.
            let audit = custos_audit::AuditConfig {
                checkpoint_secs: 1,
                ..custos_audit::AuditConfig::default()
            };
            let detect = custos_detect::DetectConfig {
                responses: Vec::new(),
                ..custos_detect::DetectConfig::default()
            };
            // Detection runs on one node (the leader's duty in `custos serve`).
            let server = EmbeddedServer::start_node(
                opened.records.clone(),
                Some(auth),
                Some(audit),
                (n == 0).then_some(detect),
                Some(ISSUER.to_string()),
            )
            .await?;
            started.push(Node {
                server,
                store: opened.store,
            });
        }
        let auth = started[0]
            .server
            .auth
            .clone()
            .context("authentication is on")?;
        // Tokens name the cluster's issuer, so every node accepts them.
        let (_, token) = crate::backend::sign_in_as_system(
            &auth,
            &FhirClient::new(&started[0].server.url()),
            "bench-cluster",
            "benchmark load generator",
        )
        .await?;
        let clients = started
            .iter()
            .map(|n| FhirClient::new(&n.server.url()).with_token(&token))
            .collect();
        println!(
            ".. {label}: {nodes} node(s){}",
            schema
                .as_ref()
                .map(|(_, s)| format!(", PostgreSQL schema {s}"))
                .unwrap_or_else(|| ", embedded SQLite".into())
        );
        Ok(Cluster {
            label: label.to_string(),
            nodes: started,
            clients,
            schema,
            _dir: dir,
        })
    }

    async fn stop(self) -> anyhow::Result<()> {
        drop(self.clients);
        for n in self.nodes {
            n.server.stop().await?;
            let store = n.store.clone();
            tokio::task::spawn_blocking(move || store.close()).await?;
        }
        if let Some((url, schema)) = &self.schema
            && let Err(e) = custos_store::PostgresStore::drop_schema(url, schema).await
        {
            tracing::warn!(error = %e, "the benchmark schema could not be dropped");
        }
        let _ = &self.label;
        Ok(())
    }

    /// Sample the audit lag and the detection backlog every 100 ms until stopped.
    fn sample(&self, stop: Arc<AtomicUsize>) -> tokio::task::JoinHandle<(u64, u64)> {
        let trail = self.nodes[0].server.audit.clone();
        let detection = self.nodes[0].server.detection.clone();
        tokio::spawn(async move {
            let (mut audit_max, mut detect_max) = (0u64, 0u64);
            while stop.load(Ordering::Relaxed) == 0 {
                if let Some(t) = &trail
                    && let Ok(size) = t.size().await
                {
                    if let Some(signed) = t.last_signed_size().await {
                        audit_max = audit_max.max(size.saturating_sub(signed));
                    }
                    if let Some(d) = &detection {
                        detect_max = detect_max.max(size.saturating_sub(d.stats().cursor));
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            (audit_max, detect_max)
        })
    }

    async fn measure(&self, plan: &Plan, data: &Arc<IngestData>) -> anyhow::Result<Figures> {
        let (s, body) = self.clients[0]
            .send("POST", "/", Some(data.directory.clone()))
            .await?;
        if s != 200 {
            bail!("the directory bundle was refused ({s}): {}", snippet(&body));
        }
        let stop = Arc::new(AtomicUsize::new(0));
        let sampler = self.sample(stop.clone());
        let next = Arc::new(AtomicUsize::new(0));
        let failures = Arc::new(AtomicU64::new(0));
        let t = Instant::now();
        let mut tasks = Vec::new();
        for k in 0..INGEST_SENDERS {
            let c = self.clients[k % self.clients.len()].clone();
            let (data, next, failures) = (data.clone(), next.clone(), failures.clone());
            tasks.push(tokio::spawn(async move {
                let mut locations = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some((bytes, _)) = data.bundles.get(i) else {
                        break;
                    };
                    match c.send("POST", "/", Some(bytes.clone())).await {
                        Ok((200, body)) => locations.push(body),
                        _ => {
                            failures.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                locations
            }));
        }
        let mut answers = Vec::new();
        for task in tasks {
            answers.extend(task.await.context("an ingest sender failed")?);
        }
        let ingest_secs = t.elapsed().as_secs_f64();
        if failures.load(Ordering::Relaxed) > 0 {
            bail!(
                "{}: {} patient bundles were refused",
                self.label,
                failures.load(Ordering::Relaxed)
            );
        }
        let (mut patients, mut observations) = (Vec::new(), Vec::new());
        for body in answers {
            let v: serde_json::Value = serde_json::from_slice(&body)?;
            for e in v["entry"].as_array().map(Vec::as_slice).unwrap_or_default() {
                if let Some(loc) = e["response"]["location"].as_str() {
                    let mut parts = loc.split('/');
                    match (parts.next(), parts.next()) {
                        (Some("Patient"), Some(id)) => patients.push(format!("Patient/{id}")),
                        (Some("Observation"), Some(id)) => {
                            observations.push(format!("Observation/{id}"))
                        }
                        _ => {}
                    }
                }
            }
        }
        let ing = super::Ingested {
            secs: ingest_secs,
            cpu: None,
            patients,
            observations,
        };
        let paths = Arc::new(read_paths(&ing, plan.seed));
        // The connections spread evenly over the nodes, read at once.
        let per = (plan.connections / self.clients.len()).max(1);
        let mut runs = Vec::new();
        for c in &self.clients {
            let (c, paths) = (c.clone(), paths.clone());
            let secs = plan.read_seconds;
            runs.push(tokio::spawn(async move {
                read_bench(&c, paths, per, secs).await
            }));
        }
        let (mut rate, mut p99, mut failed) = (0.0, 0u32, 0usize);
        for r in runs {
            let r = r.await.context("a read run failed")??;
            rate += r.rate;
            p99 = p99.max(r.lat.p99);
            failed += r.failures.count;
        }
        if failed > 0 {
            bail!("{}: {failed} reads failed", self.label);
        }
        // Let detection finish what the load committed, then stop sampling.
        if let Some(d) = &self.nodes[0].server.detection {
            d.caught_up(Duration::from_secs(30)).await;
        }
        stop.store(1, Ordering::Relaxed);
        let (audit_lag_max, detect_backlog_max) = sampler.await?;
        let detect_p99_us = self.nodes[0]
            .server
            .detection
            .as_ref()
            .map(|d| d.stats().event_latency_p99_us)
            .unwrap_or(0);
        Ok(Figures {
            ingest_rate: data.resources as f64 / ingest_secs,
            read_rate: rate,
            read_p99_us: p99,
            audit_lag_max,
            detect_p99_us,
            detect_backlog_max,
        })
    }
}

fn rand_suffix() -> u32 {
    let mut b = [0u8; 4];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
        .expect("the OS random generator failed");
    u32::from_le_bytes(b)
}

/// Run the phase: SQLite one node, PostgreSQL one node, PostgreSQL three nodes.
pub(super) async fn run(
    plan: &Plan,
    data: &Arc<IngestData>,
    postgres: &str,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    let mut results = Vec::new();
    for (label, url, nodes) in [
        ("SQLite, 1 node", None, 1usize),
        ("PostgreSQL, 1 node", Some(postgres), 1),
        ("PostgreSQL, 3 nodes", Some(postgres), 3),
    ] {
        let cluster = Cluster::start(label, url, nodes).await?;
        let figures = cluster.measure(plan, data).await;
        cluster.stop().await?;
        let f = figures?;
        println!(
            ".. {label}: ingest {} resources/s, reads {} req/s (p99 {:.1} ms), audit lag max {} entries, detection p99 {:.1} ms, backlog max {}",
            thousands(f.ingest_rate),
            thousands(f.read_rate),
            f.read_p99_us as f64 / 1000.0,
            f.audit_lag_max,
            f.detect_p99_us as f64 / 1000.0,
            f.detect_backlog_max
        );
        results.push((label, f));
    }
    for (label, f) in &results {
        rows.push(row(
            "scale-out",
            format!("{label}: ingest (transaction Bundles)"),
            format!("{} resources/s", thousands(f.ingest_rate)),
        ));
        rows.push(row(
            "scale-out",
            format!("{label}: audited reads, {} connections", plan.connections),
            format!(
                "{} req/s, p99 {:.1} ms",
                thousands(f.read_rate),
                f.read_p99_us as f64 / 1000.0
            ),
        ));
        rows.push(row(
            "scale-out",
            format!("{label}: audit lag (entries not yet under a signed checkpoint, max; checkpoint every 1 s)"),
            f.audit_lag_max.to_string(),
        ));
        rows.push(
            row(
                "scale-out",
                format!(
                    "{label}: detection lag, commit -> judged p99 (backlog max {})",
                    f.detect_backlog_max
                ),
                format!("{:.1} ms", f.detect_p99_us as f64 / 1000.0),
            )
            .want("<= 1000 ms", f.detect_p99_us <= 1_000_000),
        );
    }
    Ok(())
}
