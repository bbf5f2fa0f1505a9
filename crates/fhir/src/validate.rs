//! Structural validation of incoming resources.
use serde_json::Value;

use crate::error::Result;

/// Check that `v` is a FHIR R4 JSON resource that Custos can store and return
/// its resource type: an object, a known `resourceType`, a valid `id` if any,
/// no JSON `null` values and no empty objects, arrays or strings anywhere
/// (FHIR JSON forbids them), a `meta` that is an object if present, and
/// references (`reference` fields) that are strings. Errors are 400
/// (structure) or 422 (content), and say which path is wrong.
pub fn validate_resource(v: &Value) -> Result<&str> {
    let _ = v;
    todo!("HELPER")
}
