//! The audit trail's figures: ingest with the trail on as a ratio to off,
//! read cost, offline verification speed, and inclusion proofs in a large log.
use std::sync::Arc;
use std::time::Instant;

use custos_audit::{Agent, AuditConfig, AuditRecord, AuditTrail, Entity};
use custos_crypto::GcmSealer;
use custos_store::{AuditAppend, StoreExt};

use super::{
    BenchServer, IngestData, Lat, Plan, ReadResult, Row, ingest, read_bench, read_paths, row,
    thousands,
};

const INGEST_RATIO_TARGET: f64 = 0.85;
const VERIFY_TARGET: f64 = 1_000_000.0;
const PROOF_P99_TARGET_US: u32 = 1_000;

/// Ingest on servers without authentication, the trail on and off (order
/// on, off, off, on; best of each), then reads on the last pair.
pub(super) async fn audit_bench(
    plan: &Plan,
    data: &Arc<IngestData>,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    let mut best: [Option<f64>; 2] = [None, None];
    let mut reads: [Option<ReadResult>; 2] = [None, None];
    for (round, on) in [true, false, false, true].into_iter().enumerate() {
        let label = if on { "audit-on" } else { "audit-off" };
        let server = BenchServer::start_with(label, Arc::new(GcmSealer), false, on).await?;
        let ing = ingest(&server, data).await?;
        println!(
            ".. ingest {label} (round {}): {} resources in {:.2} s = {} resources/s",
            round + 1,
            thousands(data.resources as f64),
            ing.secs,
            thousands(data.resources as f64 / ing.secs)
        );
        let k = usize::from(!on);
        best[k] = Some(best[k].map_or(ing.secs, |b: f64| b.min(ing.secs)));
        if round >= 2 {
            let paths = Arc::new(read_paths(&ing, plan.seed));
            let r = read_bench(&server.client, paths, plan.connections, plan.read_seconds).await?;
            println!(
                ".. read {label}: {} req/s, p50 / p99 / max {}, {} failed",
                thousands(r.rate),
                r.lat.text(),
                r.failures.count
            );
            reads[k] = Some(r);
        }
        server.stop().await?;
    }
    if let (Some(on), Some(off)) = (best[0], best[1]) {
        let ratio = off / on;
        rows.push(row(
            "audit",
            "ingest, no authentication: audit on / off, resources/s (best of 2)",
            format!(
                "{} / {}",
                thousands(data.resources as f64 / on),
                thousands(data.resources as f64 / off)
            ),
        ));
        rows.push(
            row(
                "audit",
                "ingest throughput: audit on / off",
                format!("{ratio:.3}"),
            )
            .want(
                format!(">= {INGEST_RATIO_TARGET:.2}"),
                ratio >= INGEST_RATIO_TARGET,
            ),
        );
    }
    if let (Some(on), Some(off)) = (&reads[0], &reads[1]) {
        rows.push(row(
            "audit",
            format!(
                "reads, no authentication: audit on / off, {} conns",
                plan.connections
            ),
            format!(
                "{} / {} req/s = {:.3}; p99 {} / {} ms",
                thousands(on.rate),
                thousands(off.rate),
                on.rate / off.rate.max(1.0),
                super::ms(on.lat.p99),
                super::ms(off.lat.p99)
            ),
        ));
    }
    large_log(plan, rows).await?;
    keyed_appends(plan, rows).await?;
    concurrent_appends(plan, rows).await
}

/// The trail's own group commit under many waiting appenders, as every
/// audited request waits for its event: events/s and the latency of one
/// append (queued, committed, on disk). No HTTP and little CPU per event,
/// so the figure is the writer's and the disk's: the bound on audited reads
/// wherever the CPUs are not the tighter one.
async fn concurrent_appends(plan: &Plan, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    const TASKS: usize = 64;
    let secs = if plan.quick { 1.0 } else { 3.0 };
    let (_dir, opened) = super::scratch_data("audit-concurrent", Arc::new(GcmSealer)).await?;
    let trail = unsigned_trail(&opened).await?;
    let deadline = Instant::now() + std::time::Duration::from_secs_f64(secs);
    let t = Instant::now();
    let mut tasks = Vec::with_capacity(TASKS);
    for task in 0..TASKS {
        let trail = trail.clone();
        tasks.push(tokio::spawn(async move {
            let mut micros = Vec::new();
            let mut i = 0u64;
            while Instant::now() < deadline {
                let rec = AuditRecord {
                    at: 1_800_000_000_000_000 + i as i64,
                    action: "GET /Observation/{id}".into(),
                    interaction: Some("read".into()),
                    status: 200,
                    agent: Agent {
                        subject: Some(format!("user:bench-{task}")),
                        ..Agent::default()
                    },
                    entities: vec![Entity {
                        rtype: "Observation".into(),
                        id: format!("obs-{task}-{i}"),
                        version: Some(1),
                        patient: Some(format!("Patient/bench-{}", i % 500)),
                    }],
                    ..AuditRecord::default()
                };
                let started = Instant::now();
                trail
                    .append(rec)
                    .await
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                micros.push(started.elapsed().as_micros().min(u32::MAX as u128) as u32);
                i += 1;
            }
            anyhow::Ok(micros)
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await??);
    }
    let elapsed = t.elapsed().as_secs_f64();
    let lat = Lat::of(all);
    let rate = lat.n as f64 / elapsed;
    println!(
        ".. concurrent appends: {TASKS} tasks, {} events in {elapsed:.2} s = {} events/s, p50 / p99 / max {}",
        thousands(lat.n as f64),
        thousands(rate),
        lat.text()
    );
    rows.push(row(
        "audit",
        format!("appending through the trail's group commit, {TASKS} waiting appenders: events/s, p50 / p99 / max"),
        format!("{} events/s, {}", thousands(rate), lat.text()),
    ));
    trail.close().await;
    let store = opened.store.clone();
    tokio::task::spawn_blocking(move || store.close()).await?;
    Ok(())
}

/// Appending events that carry a patient's and an agent's token (every
/// authenticated request's do), in group commits of the size the trail
/// makes under load, so that the keyed index (tail, seals, postings) is
/// part of the cost: events/s on one writer.
async fn keyed_appends(plan: &Plan, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    // Eight blocks of the keyed index (each seals once), or two for a quick run.
    let n: u64 = if plan.quick { 16_384 } else { 65_536 };
    const GROUP: u64 = 32;
    let (_dir, opened) = super::scratch_data("audit-keyed", Arc::new(GcmSealer)).await?;
    let hex = |x: u64| format!("{:016x}{:016x}", x, x.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    // 2,000 patients and 50 agents, as blind tokens look (32 hex digits).
    let patients: Arc<Vec<String>> = Arc::new((0..2_000u64).map(|p| hex(p + 1)).collect());
    let agents: Arc<Vec<String>> = Arc::new((0..50u64).map(|a| hex(a + 1_000_000)).collect());
    let mut rng = super::SplitMix(plan.seed ^ 0x4b45_5944);
    let picks: Arc<Vec<(usize, usize)>> = Arc::new(
        (0..n)
            .map(|_| (rng.below(patients.len()), rng.below(agents.len())))
            .collect(),
    );
    let cpu0 = super::process_cpu_secs();
    let t = Instant::now();
    let mut start = 0u64;
    while start < n {
        let end = (start + GROUP).min(n);
        let (patients, agents, picks) = (patients.clone(), agents.clone(), picks.clone());
        opened
            .store
            .as_ref()
            .write(move |tx| {
                let mut leaf = vec![0u8; 550];
                for i in start..end {
                    leaf[..8].copy_from_slice(&i.to_be_bytes());
                    let (p, a) = picks[i as usize];
                    tx.audit_append(&AuditAppend {
                        at: i as i64,
                        action: "R",
                        outcome: 0,
                        agent: Some(&agents[a]),
                        patients: std::slice::from_ref(&patients[p]),
                        data: &leaf,
                    })?;
                }
                Ok(())
            })
            .await?;
        start = end;
    }
    let secs = t.elapsed().as_secs_f64();
    let cpu = super::cpu_delta(cpu0, super::process_cpu_secs());
    let rate = n as f64 / secs;
    // Commits wait for the disk: the CPU per event is the steadier figure.
    let cpu_us = cpu.map_or("CPU unknown".to_string(), |c| {
        format!("{:.1} us CPU/event", c * 1e6 / n as f64)
    });
    println!(
        ".. keyed appends: {} events with a patient and an agent token, {GROUP} a commit, in {secs:.2} s = {} events/s, {cpu_us}",
        thousands(n as f64),
        thousands(rate)
    );
    rows.push(row(
        "audit",
        format!(
            "appending events with a patient and an agent token (keyed index), {GROUP} a commit, one writer"
        ),
        format!("{} events/s, {cpu_us}", thousands(rate)),
    ));
    let store = opened.store.clone();
    tokio::task::spawn_blocking(move || store.close()).await?;
    Ok(())
}

/// A trail on a scratch data dir that signs no checkpoints of its own.
async fn unsigned_trail(opened: &crate::Opened) -> anyhow::Result<AuditTrail> {
    AuditTrail::open(
        &opened.records,
        AuditConfig {
            checkpoint_secs: 0,
            ..AuditConfig::default()
        },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}"))
}

/// A log of many entries: fill it, prove inclusion at random, verify it all.
async fn large_log(plan: &Plan, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    let n: u64 = plan.audit_entries;
    let (dir, opened) = super::scratch_data("audit-log", Arc::new(GcmSealer)).await?;
    let trail = unsigned_trail(&opened).await?;
    // Entries as large as real ones (~250 bytes sealed), written directly.
    let t = Instant::now();
    let chunk = 100_000u64;
    let mut start = 0u64;
    while start < n {
        let end = (start + chunk).min(n);
        opened
            .store
            .as_ref()
            .write(move |tx| {
                let mut leaf = vec![0u8; 250];
                for i in start..end {
                    leaf[..8].copy_from_slice(&i.to_be_bytes());
                    leaf[8..16]
                        .copy_from_slice(&(i.wrapping_mul(0x9E37_79B9_7F4A_7C15)).to_be_bytes());
                    tx.audit_append(&AuditAppend {
                        at: i as i64,
                        action: "R",
                        outcome: 0,
                        agent: None,
                        patients: &[],
                        data: &leaf,
                    })?;
                }
                Ok(())
            })
            .await?;
        start = end;
    }
    let fill = t.elapsed().as_secs_f64();
    println!(
        ".. audit log: {} entries appended in {fill:.1} s = {} entries/s",
        thousands(n as f64),
        thousands(n as f64 / fill)
    );
    let cp = trail
        .checkpoint()
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    // Inclusion proofs at random indexes, one at a time (latency).
    let mut rng = super::SplitMix(plan.seed ^ 0x4155_4449);
    let proofs = if plan.quick { 2_000 } else { 10_000 };
    let mut micros = Vec::with_capacity(proofs);
    for _ in 0..proofs {
        let i = rng.next() % n.max(1);
        let t = Instant::now();
        let p = trail
            .inclusion_proof(i, cp.size)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        micros.push(t.elapsed().as_micros() as u32);
        if micros.len() == 1 {
            // Check one against the signed root.
            let e = trail
                .entries(i, i + 1, 1)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let leaf = custos_audit::merkle::leaf_hash(&e[0].data);
            custos_audit::merkle::verify_inclusion(leaf, i, cp.size, &p, cp.root)
                .map_err(|e| anyhow::anyhow!("a generated inclusion proof does not verify: {e}"))?;
        }
    }
    let lat = Lat::of(micros);
    println!(
        ".. inclusion proofs at {} entries: p50 / p99 / max {}",
        thousands(n as f64),
        lat.text()
    );
    rows.push(
        row(
            "audit",
            format!(
                "inclusion proof at {} entries: p50 / p99 / max ({proofs})",
                thousands(n as f64)
            ),
            lat.text(),
        )
        .want(
            format!(
                "p99 <= {} ms{}",
                super::ms(PROOF_P99_TARGET_US),
                if n < 10_000_000 { " (at 10 M)" } else { "" }
            ),
            lat.p99 <= PROOF_P99_TARGET_US,
        ),
    );
    // Offline verification of the whole log, as `custos audit verify` does it.
    let key = trail.verifier_key();
    let t = Instant::now();
    let outcome = crate::audit_cmd::verify_dir(dir.path(), &key, Vec::new(), false).await?;
    let secs = t.elapsed().as_secs_f64();
    let report = outcome.map_err(|f| anyhow::anyhow!("the benchmark log did not verify: {f}"))?;
    let rate = report.entries as f64 / secs;
    println!(
        ".. custos audit verify: {} entries in {secs:.2} s = {} entries/s",
        thousands(report.entries as f64),
        thousands(rate)
    );
    // The hashing alone, on one core: what the verifier's own work costs.
    let leaves = if plan.quick { 200_000u64 } else { 2_000_000 };
    let hash_rate = tokio::task::spawn_blocking(move || {
        let mut f = custos_audit::Frontier::new();
        let mut leaf = vec![0u8; 250];
        let t = Instant::now();
        for i in 0..leaves {
            leaf[..8].copy_from_slice(&i.to_be_bytes());
            f.push_data(&leaf);
        }
        std::hint::black_box(f.root());
        leaves as f64 / t.elapsed().as_secs_f64()
    })
    .await?;
    rows.push(
        row(
            "audit",
            "verify: leaves/s hashed into the tree on one core (250-byte leaves)",
            format!("{} leaves/s", thousands(hash_rate)),
        )
        .want(
            format!(">= {} leaves/s", thousands(VERIFY_TARGET)),
            hash_rate >= VERIFY_TARGET,
        ),
    );
    rows.push(row(
        "audit",
        format!(
            "custos audit verify --data-dir: {} entries read from SQLite, checked",
            thousands(report.entries as f64)
        ),
        format!("{} entries/s", thousands(rate)),
    ));
    rows.push(row(
        "audit",
        "appending to the log directly (store + Merkle hashes), one writer",
        format!("{} entries/s", thousands(n as f64 / fill)),
    ));
    drop(trail);
    let store = opened.store.clone();
    tokio::task::spawn_blocking(move || store.close()).await?;
    Ok(())
}
