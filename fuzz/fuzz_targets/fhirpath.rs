//! Arbitrary text as a FHIRPath expression: compiling, and evaluating what
//! compiles on a fixed resource, must never panic.
#![no_main]

use std::sync::OnceLock;

use custos_fhir::fhirpath::Expr;
use libfuzzer_sys::fuzz_target;
use serde_json::{Value, json};

fn resource() -> &'static Value {
    static R: OnceLock<Value> = OnceLock::new();
    R.get_or_init(|| {
        json!({
            "resourceType": "Patient", "id": "p1", "active": true,
            "extension": [{"url": "http://x", "valueString": "y"}],
            "name": [{"family": "Doe", "given": ["A", "B"]}, {"text": "T"}],
            "telecom": [{"system": "phone", "value": "1"}],
            "deceasedBoolean": false,
            "contained": [{"resourceType": "Observation", "id": "o", "valueQuantity": {"value": 1}}],
            "link": [{"other": {"reference": "Patient/p2"}}]
        })
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(expr) = Expr::compile(text) {
        let _ = expr.evaluate(resource());
    }
});
