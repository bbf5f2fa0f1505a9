//! Index/query consistency: for every supported search parameter of every
//! loaded resource, and every value the resource carries for it, searching
//! by that value finds the resource. This catches any query form the lean
//! blind index cannot answer or answers wrongly.
use std::sync::Arc;

use custos_crypto::{FileKekProvider, GcmSealer};
use custos_fhir::date::format_instant;
use custos_fhir::query::Handling;
use custos_fhir::{IndexValue, registry};
use custos_records::{Records, RecordsConfig};
use custos_store::{SqliteConfig, SqliteStore, Store};
use serde_json::Value;

/// Escape a search value (R4: `\`, `,`, `|`, `$`).
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '\\' | ',' | '|' | '$') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Query forms (modifier suffix, value) that must all match `v`.
fn queries_for(v: &IndexValue) -> Vec<(&'static str, String)> {
    match v {
        IndexValue::Token {
            system: Some(s),
            code,
        } => {
            vec![("", format!("{}|{}", esc(s), esc(code))), ("", esc(code))]
        }
        IndexValue::Token { system: None, code } => {
            vec![("", esc(code)), ("", format!("|{}", esc(code)))]
        }
        IndexValue::String(raw) if raw.chars().count() <= 64 => {
            let lower: String = raw.to_lowercase().chars().take(3).collect();
            vec![("", esc(raw)), ("", esc(&lower)), (":exact", esc(raw))]
        }
        IndexValue::String(_) => vec![],
        IndexValue::Date(r) if r.start > i64::MIN / 2 => {
            vec![("", format!("ge{}", format_instant(r.start)))]
        }
        IndexValue::Date(_) => vec![],
        IndexValue::Reference {
            target_type: Some(t),
            target_id: Some(id),
            ..
        } => vec![("", format!("{t}/{id}"))],
        IndexValue::Reference { raw, .. } if raw.contains("://") => vec![("", esc(raw))],
        IndexValue::Reference { .. } => vec![],
        IndexValue::Quantity { value, .. } => {
            vec![("", format!("{value}")), ("", format!("ge{value}"))]
        }
        IndexValue::Number(x) => vec![("", format!("{x}"))],
        IndexValue::Uri(u) => vec![("", esc(u))],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_indexed_value_finds_its_resource() {
    let dir = tempfile::tempdir().unwrap();
    let kf = dir.path().join("keys.json");
    FileKekProvider::create(&kf).unwrap();
    let store =
        Arc::new(SqliteStore::open(SqliteConfig::new(dir.path().join("db.sqlite"))).unwrap());
    let records = Records::open(
        store as Arc<dyn Store>,
        Arc::new(FileKekProvider::open(&kf).unwrap()),
        Arc::new(GcmSealer),
        RecordsConfig::default(),
    )
    .await
    .unwrap();
    let synth = custos_synth::Synth::new(custos_synth::SynthConfig {
        patients: 3,
        seed: 11,
        detail: custos_synth::Detail::Full,
    });
    records
        .process_bundle(synth.directory_bundle(), "http://test", false)
        .await
        .unwrap();
    for i in 0..3 {
        records
            .process_bundle(synth.patient(i).0, "http://test", false)
            .await
            .unwrap();
    }
    let mut checked = 0usize;
    let mut failures = Vec::new();
    let types = records.type_counts().await.unwrap();
    for (rtype, _) in &types {
        let all = records
            .search(
                rtype,
                vec![("_count".into(), "1000".into())],
                Handling::Strict,
                "http://test",
            )
            .await
            .unwrap();
        let resources: Vec<Value> = all["entry"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["resource"].clone())
            .collect();
        // A handful of each type is enough to cover every parameter's shapes.
        for res in resources.iter().take(12) {
            let id = res["id"].as_str().unwrap().to_string();
            for p in registry().for_type(rtype).iter().filter(|p| p.supported()) {
                for v in p.extract(res).iter().take(3) {
                    for (modifier, q) in queries_for(v) {
                        let name = format!("{}{modifier}", p.code);
                        let params = vec![(name, q.clone()), ("_id".into(), id.clone())];
                        checked += 1;
                        match records
                            .search(rtype, params, Handling::Strict, "http://test")
                            .await
                        {
                            Ok(b) if b["total"] == 1 => {}
                            Ok(b) => failures.push(format!(
                                "{rtype}?{}={q} (id {id}): total {}",
                                p.code, b["total"]
                            )),
                            Err(e) => failures
                                .push(format!("{rtype}?{}={q}: error {}", p.code, e.message)),
                        }
                    }
                }
            }
        }
    }
    println!(
        "checked {checked} parameter values over {} resource types",
        types.len()
    );
    assert!(checked > 500, "the test covered too little: {checked}");
    assert!(
        failures.is_empty(),
        "{} of {checked} searches missed their resource:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// A search the index answers only coarsely never returns a silently short
/// page: past the scan limit it fails with an explanation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scan_limit_is_an_error_not_a_short_page() {
    let dir = tempfile::tempdir().unwrap();
    let kf = dir.path().join("keys.json");
    FileKekProvider::create(&kf).unwrap();
    let store =
        Arc::new(SqliteStore::open(SqliteConfig::new(dir.path().join("db.sqlite"))).unwrap());
    let config = RecordsConfig {
        scan_limit: 40,
        ..RecordsConfig::default()
    };
    let records = Records::open(
        store as Arc<dyn Store>,
        Arc::new(FileKekProvider::open(&kf).unwrap()),
        Arc::new(GcmSealer),
        config,
    )
    .await
    .unwrap();
    let synth = custos_synth::Synth::new(custos_synth::SynthConfig {
        patients: 100,
        seed: 3,
        detail: custos_synth::Detail::DemographicsOnly,
    });
    records
        .process_bundle(synth.directory_bundle(), "http://test", false)
        .await
        .unwrap();
    for i in 0..100 {
        records
            .process_bundle(synth.patient(i).0, "http://test", false)
            .await
            .unwrap();
    }
    let search = |q: &str| {
        let params = q.split('&').map(|kv| {
            let (k, v) = kv.split_once('=').unwrap();
            (k.to_string(), v.to_string())
        });
        records.search("Patient", params.collect(), Handling::Strict, "http://test")
    };
    // A page filled within the limit: fine (every family name has a vowel).
    let b = search("family:contains=a,e,i,o,u,y&_count=3")
        .await
        .unwrap();
    assert_eq!(b["entry"].as_array().map(|e| e.len()), Some(3));
    // No match among 100 patients means 100 candidates checked: past the limit of 40.
    let err = search("family:contains=qqqzzz").await.unwrap_err();
    assert_eq!(
        err.kind,
        custos_fhir::ErrorKind::BadRequest,
        "{}",
        err.message
    );
    assert!(err.message.contains("candidates"), "{}", err.message);
}
