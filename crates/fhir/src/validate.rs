//! Structural validation of incoming resources.
use std::fmt::Write;

use serde_json::{Map, Value};

use crate::error::{FhirError, Result};
use crate::types::{is_resource_type, is_valid_id};

/// Check that `v` is a FHIR R4 JSON resource that Custos can store and return
/// its resource type: an object, a known `resourceType`, a valid `id` if any,
/// no JSON `null` values and no empty objects, arrays or strings anywhere
/// (FHIR JSON forbids them), a `meta` that is an object if present, and
/// references (`reference` fields) that are strings. Errors are 400
/// (structure) or 422 (content), and say which path is wrong.
///
/// Details:
/// * `null` is accepted only where FHIR JSON needs it: as padding in an
///   array of primitives whose sibling `_name` array (or `name` array, for
///   the `_name` side) has a value at the same index.
/// * Nested resources (`contained`, `Bundle.entry.resource`,
///   `Parameters.parameter.resource` …) must also have a known
///   `resourceType` and a valid `id`.
/// * A `reference` element is a string, except where R4 defines an element
///   of that name with a complex type (`Claim.related.reference` is an
///   Identifier, `ImplementationGuide.definition.resource.reference` a
///   Reference): an object is accepted there and checked like any other.
///
/// Every error is a 400 whose message names the JSON path
/// (`Patient.name[0].given[1]`) and never the offending value.
pub fn validate_resource(v: &Value) -> Result<&str> {
    let Value::Object(map) = v else {
        return Err(FhirError::bad_request(
            "a FHIR resource must be a JSON object",
        ));
    };
    let resource_type = match map.get("resourceType") {
        Some(Value::String(s)) => s.as_str(),
        Some(_) => return Err(FhirError::bad_request("resourceType must be a string")),
        None => return Err(FhirError::bad_request("resourceType is missing")),
    };
    if !is_resource_type(resource_type) {
        return Err(FhirError::bad_request(format!(
            "unknown resource type {}",
            printable(resource_type)
        )));
    }
    if let Some(meta) = map.get("meta")
        && !meta.is_object()
    {
        return Err(FhirError::bad_request(format!(
            "{resource_type}.meta must be an object"
        )));
    }
    let mut path = Path {
        segs: vec![Seg::Key(resource_type)],
    };
    check_resource_header(map, &path)?;
    check_object(map, &mut path)?;
    Ok(resource_type)
}

/// A resource type name for an error message: the name itself when it is
/// short and plain, otherwise a neutral placeholder.
fn printable(s: &str) -> String {
    if s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        s.to_string()
    } else {
        "(not a valid type name)".to_string()
    }
}

#[derive(Clone, Copy)]
enum Seg<'a> {
    Key(&'a str),
    Index(usize),
}

/// The JSON path being checked, formatted only when an error is reported.
struct Path<'a> {
    segs: Vec<Seg<'a>>,
}

impl Path<'_> {
    fn render(&self) -> String {
        let mut s = String::new();
        for (i, seg) in self.segs.iter().enumerate() {
            match seg {
                Seg::Key(k) => {
                    if i > 0 {
                        s.push('.');
                    }
                    s.push_str(k);
                }
                Seg::Index(n) => {
                    let _ = write!(s, "[{n}]");
                }
            }
        }
        s
    }

    fn error(&self, what: &str) -> FhirError {
        FhirError::bad_request(format!("{what} at {}", self.render()))
    }
}

/// `resourceType` and `id` of a (possibly nested) resource.
fn check_resource_header(map: &Map<String, Value>, path: &Path<'_>) -> Result<()> {
    match map.get("id") {
        None => Ok(()),
        Some(Value::String(id)) if is_valid_id(id) => Ok(()),
        Some(_) => Err(FhirError::bad_request(format!(
            "invalid id at {}.id (expected 1-64 characters from A-Z, a-z, 0-9, '-', '.')",
            path.render()
        ))),
    }
}

fn check_object<'a>(map: &'a Map<String, Value>, path: &mut Path<'a>) -> Result<()> {
    if map.is_empty() {
        return Err(path.error("empty object"));
    }
    for (key, value) in map {
        if key.is_empty() {
            return Err(path.error("empty property name"));
        }
        path.segs.push(Seg::Key(key));
        match value {
            Value::Null => return Err(path.error("null value")),
            Value::String(s) if s.is_empty() => return Err(path.error("empty string")),
            Value::Array(items) => check_array(map, key, items, path)?,
            Value::Object(inner) => {
                if inner.contains_key("resourceType") {
                    check_nested_resource(inner, path)?;
                }
                check_object(inner, path)?;
            }
            _ => {}
        }
        if key == "reference" && !(value.is_string() || value.is_object()) {
            return Err(path.error("a reference must be a string"));
        }
        path.segs.pop();
    }
    Ok(())
}

fn check_nested_resource<'a>(map: &'a Map<String, Value>, path: &mut Path<'a>) -> Result<()> {
    match map.get("resourceType") {
        Some(Value::String(t)) if is_resource_type(t) => check_resource_header(map, path),
        Some(Value::String(t)) => {
            Err(path.error(&format!("unknown resource type {}", printable(t))))
        }
        _ => Err(path.error("resourceType must be a string")),
    }
}

fn check_array<'a>(
    parent: &'a Map<String, Value>,
    key: &str,
    items: &'a [Value],
    path: &mut Path<'a>,
) -> Result<()> {
    if items.is_empty() {
        return Err(path.error("empty array"));
    }
    // The array carrying the other half of a primitive array: `given` ↔ `_given`.
    let sibling = match key.strip_prefix('_') {
        Some(base) => parent.get(base),
        None => parent.get(format!("_{key}").as_str()),
    }
    .and_then(Value::as_array);
    if items.iter().all(Value::is_null) {
        return Err(path.error("array of nulls"));
    }
    for (i, item) in items.iter().enumerate() {
        path.segs.push(Seg::Index(i));
        match item {
            Value::Null => {
                let padded = sibling.and_then(|s| s.get(i)).is_some_and(|v| !v.is_null());
                if !padded {
                    return Err(path.error("null value"));
                }
            }
            Value::String(s) if s.is_empty() => return Err(path.error("empty string")),
            Value::Array(_) => return Err(path.error("nested array")),
            Value::Object(inner) => {
                if inner.contains_key("resourceType") {
                    check_nested_resource(inner, path)?;
                }
                check_object(inner, path)?;
            }
            _ => {}
        }
        path.segs.pop();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::error::ErrorKind;

    fn err(v: Value) -> FhirError {
        validate_resource(&v).expect_err("should be invalid")
    }

    #[test]
    fn valid_resources_pass() {
        let p = json!({
            "resourceType": "Patient",
            "id": "example-1.2",
            "meta": {"versionId": "1", "lastUpdated": "2024-01-01T00:00:00Z"},
            "active": true,
            "name": [{"family": "Chalmers", "given": ["Peter", "James"]}],
            "birthDate": "1974-12-25",
            "_birthDate": {"extension": [{"url": "http://hl7.org/fhir/StructureDefinition/patient-birthTime", "valueDateTime": "1974-12-25T14:35:45-05:00"}]},
            "managingOrganization": {"reference": "Organization/1"},
            "multipleBirthInteger": 0
        });
        assert_eq!(validate_resource(&p).unwrap(), "Patient");
        assert_eq!(
            validate_resource(&json!({"resourceType": "Binary"})).unwrap(),
            "Binary"
        );
    }

    #[test]
    fn resource_type_and_id() {
        let e = err(json!([1]));
        assert_eq!(e.kind, ErrorKind::BadRequest);
        assert!(err(json!({"id": "x"})).message.contains("resourceType"));
        assert!(
            err(json!({"resourceType": 5}))
                .message
                .contains("resourceType must be a string")
        );
        let e = err(json!({"resourceType": "Patientt"}));
        assert_eq!(e.message, "unknown resource type Patientt");
        assert_eq!(e.kind.status(), 400);
        assert!(
            err(json!({"resourceType": "DomainResource"}))
                .message
                .contains("unknown resource type")
        );
        assert!(
            err(json!({"resourceType": "Patient", "id": "a b"}))
                .message
                .contains("invalid id at Patient.id")
        );
        assert!(
            err(json!({"resourceType": "Patient", "id": 5}))
                .message
                .contains("invalid id")
        );
        assert!(
            err(json!({"resourceType": "Patient", "id": "x".repeat(65)}))
                .message
                .contains("invalid id")
        );
        assert!(
            err(json!({"resourceType": "Patient", "meta": "x"}))
                .message
                .contains("meta must be an object")
        );
        // No PHI-ish echo of weird values.
        assert!(
            !err(json!({"resourceType": "Patient Smith 1970"}))
                .message
                .contains("Smith")
        );
    }

    #[test]
    fn nulls_and_empties_name_the_path() {
        assert_eq!(
            err(json!({"resourceType": "Patient", "name": [{"given": ["a", null]}]})).message,
            "null value at Patient.name[0].given[1]"
        );
        assert_eq!(
            err(json!({"resourceType": "Patient", "name": [{"given": ["a", ""]}]})).message,
            "empty string at Patient.name[0].given[1]"
        );
        assert_eq!(
            err(json!({"resourceType": "Patient", "gender": null})).message,
            "null value at Patient.gender"
        );
        assert_eq!(
            err(json!({"resourceType": "Patient", "gender": ""})).message,
            "empty string at Patient.gender"
        );
        assert_eq!(
            err(json!({"resourceType": "Patient", "name": []})).message,
            "empty array at Patient.name"
        );
        assert_eq!(
            err(json!({"resourceType": "Patient", "name": [{}]})).message,
            "empty object at Patient.name[0]"
        );
        assert_eq!(
            err(json!({"resourceType": "Patient", "meta": {}})).message,
            "empty object at Patient.meta"
        );
        assert_eq!(
            err(json!({"resourceType": "Patient", "name": [[1]]})).message,
            "nested array at Patient.name[0]"
        );
        assert_eq!(
            err(json!({"resourceType": "Patient", "": 1})).message,
            "empty property name at Patient"
        );
        assert_eq!(
            err(json!({"resourceType": "Patient", "name": [null]})).message,
            "array of nulls at Patient.name"
        );
    }

    #[test]
    fn primitive_array_padding_is_allowed() {
        let ok = json!({"resourceType": "Patient", "name": [{
            "given": ["Peter", null],
            "_given": [null, {"extension": [{"url": "http://x", "valueString": "y"}]}]
        }]});
        assert!(validate_resource(&ok).is_ok());
        let bad = json!({"resourceType": "Patient", "name": [{
            "given": ["Peter", null],
            "_given": [{"id": "a"}, null]
        }]});
        assert_eq!(err(bad).message, "null value at Patient.name[0].given[1]");
    }

    #[test]
    fn references_must_be_strings() {
        assert_eq!(
            err(json!({"resourceType": "Observation", "subject": {"reference": 5}})).message,
            "a reference must be a string at Observation.subject.reference"
        );
        assert!(
            err(json!({"resourceType": "Observation", "subject": {"reference": true}}))
                .message
                .contains("reference")
        );
        // Claim.related.reference is an Identifier.
        let claim = json!({"resourceType": "Claim", "related": [{"reference": {"system": "urn:x", "value": "1"}}]});
        assert!(validate_resource(&claim).is_ok());
    }

    #[test]
    fn nested_resources_are_checked() {
        let ok = json!({"resourceType": "Bundle", "type": "collection", "entry": [
            {"resource": {"resourceType": "Patient", "id": "p"}},
            {"resource": {"resourceType": "Observation", "contained": [{"resourceType": "Device", "id": "d"}]}}
        ]});
        assert!(validate_resource(&ok).is_ok());
        let bad =
            json!({"resourceType": "Bundle", "entry": [{"resource": {"resourceType": "Nope"}}]});
        assert_eq!(
            err(bad).message,
            "unknown resource type Nope at Bundle.entry[0].resource"
        );
        let bad = json!({"resourceType": "Observation", "contained": [{"resourceType": "Device", "id": "bad id"}]});
        assert_eq!(
            err(bad).message,
            "invalid id at Observation.contained[0].id (expected 1-64 characters from A-Z, a-z, 0-9, '-', '.')"
        );
        let bad = json!({"resourceType": "Observation", "contained": [{"resourceType": 1}]});
        assert!(
            err(bad)
                .message
                .contains("resourceType must be a string at Observation.contained[0]")
        );
    }

    #[test]
    fn deep_documents_are_fine() {
        let mut v = json!({"url": "x", "valueString": "y"});
        for _ in 0..100 {
            v = json!({"url": "x", "extension": [v]});
        }
        let p = json!({"resourceType": "Patient", "extension": [v]});
        assert!(validate_resource(&p).is_ok());
    }
}
