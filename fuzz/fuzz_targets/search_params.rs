//! Arbitrary bytes as a search query string: parsing for a few resource
//! types under both handlings, then matching every clause against a fixed
//! resource, must never panic.
#![no_main]

use std::sync::OnceLock;

use custos_fhir::query::{Handling, parse_search};
use libfuzzer_sys::fuzz_target;
use serde_json::{Value, json};

fn resources() -> &'static [(&'static str, Value)] {
    static R: OnceLock<Vec<(&'static str, Value)>> = OnceLock::new();
    R.get_or_init(|| {
        vec![
            (
                "Patient",
                json!({
                    "resourceType": "Patient", "id": "p1", "active": true, "gender": "female",
                    "identifier": [{"system": "urn:oid:1.2.3", "value": "MRN-1"}],
                    "name": [{"family": "Dvořák", "given": ["Zoë", "Anne"]}],
                    "telecom": [{"system": "phone", "value": "555-1234"}],
                    "birthDate": "1980-05-17",
                    "address": [{"line": ["1 Main St"], "city": "Paris", "postalCode": "75002"}],
                    "generalPractitioner": [{"reference": "Practitioner/d1"}, {"identifier": {"value": "x"}}]
                }),
            ),
            (
                "Observation",
                json!({
                    "resourceType": "Observation", "id": "o1", "status": "final",
                    "code": {"coding": [{"system": "http://loinc.org", "code": "29463-7", "display": "Weight"}]},
                    "subject": {"reference": "Patient/p1"},
                    "effectivePeriod": {"start": "2020-03-10T08:00:00Z"},
                    "valueQuantity": {"value": 67.5, "system": "http://unitsofmeasure.org", "code": "kg"}
                }),
            ),
            (
                "Encounter",
                json!({
                    "resourceType": "Encounter", "id": "e1", "status": "finished",
                    "subject": {"reference": "Patient/p1"},
                    "period": {"start": "2020-01-01", "end": "2020-01-02"},
                    "length": {"value": 90, "code": "min"}
                }),
            ),
            ("RiskAssessment", json!({"resourceType": "RiskAssessment", "id": "r1", "prediction": [{"probabilityDecimal": 0.3}]})),
        ]
    })
}

fuzz_target!(|data: &[u8]| {
    let pairs: Vec<(String, String)> = form_pairs(data);
    for (resource_type, resource) in resources() {
        for handling in [Handling::Strict, Handling::Lenient] {
            if let Ok(req) = parse_search(resource_type, &pairs, handling) {
                for clause in &req.clauses {
                    let _ = clause.matches(resource, 1_700_000_000_000_000);
                    let _ = clause.matches(resource, i64::MIN);
                    let _ = clause.matches(resource, i64::MAX);
                }
            }
        }
    }
});

/// Split `a=b&c=d` into decoded pairs (percent-decoding, `+` as space).
fn form_pairs(data: &[u8]) -> Vec<(String, String)> {
    data.split(|&b| b == b'&')
        .filter(|part| !part.is_empty())
        .map(|part| {
            let mut it = part.splitn(2, |&b| b == b'=');
            let name = decode(it.next().unwrap_or_default());
            let value = decode(it.next().unwrap_or_default());
            (name, value)
        })
        .collect()
}

fn decode(bytes: &[u8]) -> String {
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
