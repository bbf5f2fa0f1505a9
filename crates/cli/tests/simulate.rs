//! The hospital simulator end to end: the real binary runs a short seeded
//! scenario — staff signing in with password and TOTP, ordinary work, then
//! every attack kind the HTTP drive knows, as real requests against a
//! Custos server — and its scorecard is asserted.
use std::process::Command;

use serde_json::Value;

fn simulate(extra: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_custos"))
        .args(["simulate", "--json", "--seed", "5"])
        .args(extra)
        .env("CUSTOS_LOG", "error")
        .output()
        .expect("the custos binary runs");
    assert!(
        out.status.success(),
        "custos simulate failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("the scorecard is JSON")
}

#[test]
fn a_short_hospital_day_over_http_catches_every_attack() {
    let card = simulate(&[
        "--days",
        "1",
        "--staff",
        "30",
        "--patients",
        "60",
        "--attacks",
        "1",
    ]);
    assert_eq!(card["mode"], "http");
    let kinds = card["kinds"].as_object().expect("kinds");
    // Every attack the HTTP drive injects, each detected.
    for kind in [
        "snooping-family",
        "snooping-coworker",
        "snooping-self",
        "vip-record",
        "break-glass-misuse",
        "bulk-fast",
        "password-guessing",
        "totp-guessing",
        "password-spraying",
        "revoked-token",
        "ransomware-fast",
        "ransomware-partial",
        "ransomware-deletes",
        "identity-reuse",
        "impossible-travel",
    ] {
        let k = &kinds
            .get(kind)
            .unwrap_or_else(|| panic!("{kind} was not injected: {card}"));
        assert!(k["injected"].as_u64().unwrap() >= 1, "{kind}: {k}");
        assert_eq!(k["recall"], 1.0, "{kind} was missed: {card}");
    }
    // Ordinary work raises (almost) nothing.
    assert!(
        card["false_alerts"].as_u64().unwrap() <= 1,
        "alerts on normal work: {card}"
    );
    // Ransomware is contained within a handful of writes, all restorable.
    let changed: Vec<u64> = card["ransomware_changed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    let restorable: Vec<u64> = card["ransomware_restorable"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(changed.len(), 3);
    assert!(changed.iter().all(|&c| c <= 10), "{changed:?}");
    assert_eq!(changed, restorable);
    // Commit to alert well inside a second.
    assert!(card["alert_latency_p99_ms"].as_f64().unwrap() < 1000.0);
}

#[test]
fn a_simulated_fortnight_fed_straight_into_the_pipeline() {
    let card = simulate(&[
        "--direct",
        "--days",
        "14",
        "--staff",
        "120",
        "--patients",
        "1200",
        "--attacks",
        "2",
    ]);
    assert_eq!(card["mode"], "direct");
    for (kind, k) in card["kinds"].as_object().unwrap() {
        assert_eq!(k["injected"], 2, "{kind}");
        assert!(k["recall"].as_f64().unwrap() >= 0.5, "{kind} missed: {k}");
    }
    assert!(
        card["false_alerts_per_100_users_per_day"].as_f64().unwrap() <= 1.0,
        "{card}"
    );
}

#[test]
fn bad_arguments_are_one_line_errors() {
    let out = Command::new(env!("CARGO_BIN_EXE_custos"))
        .args(["simulate", "--staff", "3"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("at least 12 staff"), "{err}");
}
