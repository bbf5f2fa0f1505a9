//! The R4 resource types and id rules.

/// Every R4 (4.0.1) resource type name. HELPER: fill in the full list (145 types).
pub const RESOURCE_TYPES: &[&str] = &["Patient"];

/// Whether `name` is an R4 resource type.
pub fn is_resource_type(name: &str) -> bool {
    RESOURCE_TYPES.binary_search(&name).is_ok()
}

/// Whether `id` is a valid FHIR logical id: `[A-Za-z0-9\-\.]{1,64}`.
pub fn is_valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}
