//! OperationOutcome construction.
use serde_json::{Value, json};

/// An OperationOutcome with a single issue.
pub fn operation_outcome(severity: &str, code: &str, diagnostics: &str) -> Value {
    json!({
        "resourceType": "OperationOutcome",
        "issue": [{ "severity": severity, "code": code, "diagnostics": diagnostics }]
    })
}

/// An informational OperationOutcome (for example the body of a successful delete).
pub fn information(diagnostics: &str) -> Value {
    operation_outcome("information", "informational", diagnostics)
}
