//! The detection phase of `custos bench`: the engine alone on one core, the
//! whole live pipeline as it ran behind the read benchmark of this run, and
//! the simulated month's scorecard (recall per attack kind, alerts on
//! normal work, ransomware containment).
use std::time::Instant;

use custos_detect::{DetectConfig, Engine};

use super::{Row, row, thousands};
use crate::simulate::{AttackKind, SimulateArgs, direct};

/// Events per second through the detectors on one core.
const ENGINE_TARGET: f64 = 100_000.0;
/// Commit to alert, p99.
const LATENCY_TARGET_US: u64 = 1_000_000;
const RECALL_TARGET: f64 = 0.95;
const FALSE_ALERTS_TARGET: f64 = 1.0;
const CONTAINMENT_TARGET: usize = 10;

/// Run the phase; `read_rate` is this run's audited read throughput
/// (events committed per second: the rate the pipeline must keep up with),
/// `live` the pipeline's figures behind that read run.
pub async fn run(
    quick: bool,
    seed: u64,
    read_rate: f64,
    live: Option<custos_detect::Stats>,
    replay: Option<custos_detect::Stats>,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    // 1. The engine alone, one thread.
    let (staff, patients, days) = if quick {
        (200, 2_000, 2)
    } else {
        (1_000, 20_000, 3)
    };
    let (secs, n) = tokio::task::spawn_blocking(move || {
        let (facts, events) = direct::normal_events(seed, staff, patients, days);
        let mut engine = Engine::new(DetectConfig::default());
        let mut out = Vec::new();
        let t = Instant::now();
        for e in &events {
            engine.process(e, &facts, &mut out);
        }
        (t.elapsed().as_secs_f64(), events.len())
    })
    .await?;
    let eps = n as f64 / secs;
    println!(
        ".. detection engine: {} events of {days} days of a {staff}-staff hospital in {secs:.2} s on one thread",
        thousands(n as f64)
    );
    rows.push(
        row(
            "detect",
            format!(
                "engine, one core: {} events (baseline: this run's audited reads, {} events/s)",
                thousands(n as f64),
                thousands(read_rate)
            ),
            format!("{} events/s", thousands(eps)),
        )
        .want(
            format!(">= {} events/s", thousands(ENGINE_TARGET)),
            eps >= ENGINE_TARGET,
        ),
    );
    // 2. The whole pipeline over the read run's log, alone on one task.
    if let Some(s) = replay {
        let rate = s.processed as f64 / (s.busy_us.max(1) as f64 / 1e6);
        rows.push(
            row(
                "detect",
                format!(
                    "whole pipeline (log read, open, enrich, detectors, sinks), one task, the read run's log: {} events",
                    thousands(s.processed as f64)
                ),
                format!("{} events/s", thousands(rate)),
            )
            .want(format!(">= {} events/s", thousands(ENGINE_TARGET)), rate >= ENGINE_TARGET),
        );
    }
    // 3. The live pipeline behind the read benchmark.
    if let Some(s) = live {
        let rate = if s.busy_us > 0 {
            s.processed as f64 / (s.busy_us as f64 / 1e6)
        } else {
            0.0
        };
        rows.push(row(
            "detect",
            format!(
                "live pipeline behind the reads (sharing the CPUs with them): {} events",
                thousands(s.processed as f64)
            ),
            format!("{} events/s", thousands(rate)),
        ));
        rows.push(
            row(
                "detect",
                "commit to judged (alert), p99, under the read load",
                format!("{:.1} ms", s.event_latency_p99_us as f64 / 1000.0),
            )
            .want("p99 <= 1 s", s.event_latency_p99_us <= LATENCY_TARGET_US),
        );
    }
    // 4. The simulated month.
    let args = SimulateArgs {
        // (Two weeks at least: the slow attacks need learned baselines.)
        days: if quick { 14 } else { 30 },
        staff: if quick { 200 } else { 1_000 },
        patients: if quick { 2_000 } else { 20_000 },
        seed,
        attacks: if quick { 2 } else { 5 },
        direct: true,
        json: false,
        config: None,
        show_false: 0,
    };
    let a2 = args.clone();
    let card =
        tokio::task::spawn_blocking(move || direct::run(&a2, DetectConfig::default())).await??;
    let (worst_kind, worst) = card
        .kinds
        .iter()
        .map(|(k, s)| (k.clone(), s.recall))
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .unwrap_or_default();
    let label = format!(
        "{}-day simulation, {} staff, {} attacks of each of {} kinds",
        args.days,
        thousands(args.staff as f64),
        args.attacks,
        AttackKind::ALL.len()
    );
    rows.push(
        row(
            "detect",
            format!("{label}: lowest recall ({worst_kind})"),
            format!("{worst:.2}"),
        )
        .want(format!(">= {RECALL_TARGET} each"), worst >= RECALL_TARGET),
    );
    rows.push(
        row(
            "detect",
            "alerts on normal work per 100 users per day",
            format!("{:.2}", card.false_alerts_per_100_users_per_day),
        )
        .want(
            format!("<= {FALSE_ALERTS_TARGET}"),
            card.false_alerts_per_100_users_per_day <= FALSE_ALERTS_TARGET,
        ),
    );
    let most = card.ransomware_changed.iter().copied().max().unwrap_or(0);
    let restorable = card.ransomware_changed == card.ransomware_restorable;
    rows.push(
        row(
            "detect",
            "ransomware: most records changed before read-only",
            format!("{most}"),
        )
        .want(
            format!("<= {CONTAINMENT_TARGET}"),
            most <= CONTAINMENT_TARGET,
        ),
    );
    rows.push(
        row(
            "detect",
            "ransomware: changed records restorable",
            if restorable { "100%" } else { "not all" },
        )
        .want("100%", restorable),
    );
    Ok(())
}
