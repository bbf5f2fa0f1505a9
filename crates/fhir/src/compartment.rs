//! The R4 Patient compartment (from the official CompartmentDefinition),
//! which decides which data key seals a resource.
use std::collections::HashMap;
use std::sync::OnceLock;

use serde_json::Value;

use crate::extract::IndexValue;
use crate::params::registry;

/// The official R4 CompartmentDefinition Bundle (FHIR 4.0.1, CC0).
const COMPARTMENT_DEFINITIONS_JSON: &str = include_str!("../data/compartment-definitions-r4.json");

/// Per resource type, the parameter codes linking it to the Patient compartment.
fn patient_compartment() -> &'static HashMap<String, Vec<String>> {
    static MAP: OnceLock<HashMap<String, Vec<String>>> = OnceLock::new();
    MAP.get_or_init(|| {
        let doc: Value = serde_json::from_str(COMPARTMENT_DEFINITIONS_JSON)
            .expect("the embedded compartment definitions are valid");
        parse_compartment(&doc, "Patient")
    })
}

/// The `resource` entries of the CompartmentDefinition with `code`, as
/// type → search-parameter codes (types without parameters are left out;
/// entries that are not parameter codes, such as `{def}`, are skipped).
fn parse_compartment(doc: &Value, code: &str) -> HashMap<String, Vec<String>> {
    let definitions: Vec<&Value> = match doc.get("entry").and_then(Value::as_array) {
        Some(entries) => entries.iter().filter_map(|e| e.get("resource")).collect(),
        None => vec![doc],
    };
    let mut map = HashMap::new();
    let Some(def) = definitions.into_iter().find(|d| {
        d.get("resourceType").and_then(Value::as_str) == Some("CompartmentDefinition")
            && d.get("code").and_then(Value::as_str) == Some(code)
    }) else {
        return map;
    };
    for entry in def
        .get("resource")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let Some(ty) = entry.get("code").and_then(Value::as_str) else {
            continue;
        };
        let params: Vec<String> = entry
            .get("param")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .filter(|p| {
                !p.is_empty()
                    && p.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            })
            .map(str::to_string)
            .collect();
        if !params.is_empty() {
            map.insert(ty.to_string(), params);
        }
    }
    map
}

/// The search-parameter codes through which `resource_type` belongs to a
/// patient's compartment (`Observation` → `["subject", "performer"]`);
/// `None` when the type is not in the Patient compartment. `Patient` itself
/// is in its own compartment (returns `Some(&["link"])` per the definition,
/// but see [`patient_of`]).
pub fn patient_params(resource_type: &str) -> Option<&'static [String]> {
    patient_compartment().get(resource_type).map(Vec::as_slice)
}

/// The id of the patient whose compartment `resource` falls in: its own id
/// for a Patient, otherwise the first `Patient/{id}` reference reached through
/// the compartment's parameters (in definition order); `None` if it is in no
/// patient's compartment.
pub fn patient_of(resource: &Value) -> Option<String> {
    let resource_type = resource.get("resourceType")?.as_str()?;
    if resource_type == "Patient" {
        return resource
            .get("id")
            .and_then(Value::as_str)
            .filter(|id| !id.is_empty())
            .map(str::to_string);
    }
    let reg = registry();
    for code in patient_params(resource_type)? {
        let Some(param) = reg.lookup(resource_type, code) else {
            continue;
        };
        for value in param.extract(resource) {
            if let IndexValue::Reference {
                target_type: Some(t),
                target_id: Some(id),
                ..
            } = value
                && t == "Patient"
            {
                return Some(id);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn compartment_parameters() {
        assert_eq!(
            patient_params("Observation").unwrap(),
            ["subject", "performer"]
        );
        assert_eq!(patient_params("Patient").unwrap(), ["link"]);
        assert_eq!(patient_params("Encounter").unwrap(), ["patient"]);
        assert_eq!(
            patient_params("AllergyIntolerance").unwrap(),
            ["patient", "recorder", "asserter"]
        );
        assert_eq!(
            patient_params("Coverage").unwrap(),
            ["policy-holder", "subscriber", "beneficiary", "payor"]
        );
        assert!(patient_params("Practitioner").is_none());
        assert!(patient_params("Organization").is_none());
        assert!(patient_params("Binary").is_none());
        assert!(patient_params("NotAType").is_none());
    }

    #[test]
    fn every_compartment_parameter_exists_in_the_registry() {
        for (ty, params) in patient_compartment() {
            for code in params {
                let p = registry()
                    .lookup(ty, code)
                    .unwrap_or_else(|| panic!("{ty}.{code}"));
                assert!(p.supported(), "{ty}.{code}");
            }
        }
    }

    #[test]
    fn patient_of_patient_is_its_id() {
        assert_eq!(
            patient_of(&json!({"resourceType": "Patient", "id": "p1"})),
            Some("p1".into())
        );
        assert_eq!(patient_of(&json!({"resourceType": "Patient"})), None);
        assert_eq!(
            patient_of(
                &json!({"resourceType": "Patient", "id": "p1", "link": [{"other": {"reference": "Patient/p2"}}]})
            ),
            Some("p1".into())
        );
    }

    #[test]
    fn patient_of_observation_follows_subject_then_performer() {
        let obs = json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"},
            "subject": {"reference": "Patient/p1"}, "performer": [{"reference": "Patient/p2"}]});
        assert_eq!(patient_of(&obs), Some("p1".into()));
        let obs = json!({"resourceType": "Observation", "subject": {"reference": "Group/g"},
            "performer": [{"reference": "Practitioner/d"}, {"reference": "Patient/p2"}]});
        assert_eq!(patient_of(&obs), Some("p2".into()));
        let obs = json!({"resourceType": "Observation", "subject": {"reference": "http://example.org/fhir/Patient/p3/_history/1"}});
        assert_eq!(patient_of(&obs), Some("p3".into()));
        let obs = json!({"resourceType": "Observation", "subject": {"reference": "urn:uuid:1234"}});
        assert_eq!(patient_of(&obs), None);
        let obs = json!({"resourceType": "Observation", "subject": {"identifier": {"value": "x"}}});
        assert_eq!(patient_of(&obs), None);
    }

    #[test]
    fn patient_of_encounter_and_others() {
        let enc = json!({"resourceType": "Encounter", "status": "finished", "subject": {"reference": "Patient/p9"}});
        assert_eq!(patient_of(&enc), Some("p9".into()));
        let enc = json!({"resourceType": "Encounter", "subject": {"reference": "Group/g"}});
        assert_eq!(patient_of(&enc), None);
        let mr =
            json!({"resourceType": "MedicationRequest", "subject": {"reference": "Patient/m1"}});
        assert_eq!(patient_of(&mr), Some("m1".into()));
        let allergy = json!({"resourceType": "AllergyIntolerance", "recorder": {"reference": "Patient/a2"}, "patient": {"reference": "Patient/a1"}});
        assert_eq!(patient_of(&allergy), Some("a1".into()));
    }

    #[test]
    fn resources_outside_the_compartment() {
        let prac = json!({"resourceType": "Practitioner", "id": "d1", "name": [{"family": "Who"}]});
        assert_eq!(patient_of(&prac), None);
        assert_eq!(
            patient_of(&json!({"resourceType": "Organization", "id": "o"})),
            None
        );
        assert_eq!(patient_of(&json!({"id": "x"})), None);
        assert_eq!(patient_of(&json!("Patient")), None);
    }

    #[test]
    fn non_parameter_entries_are_skipped() {
        let doc = json!({"resourceType": "CompartmentDefinition", "code": "Patient", "resource": [
            {"code": "Observation", "param": ["subject", "{def}"]},
            {"code": "Binary"}
        ]});
        let map = parse_compartment(&doc, "Patient");
        assert_eq!(map["Observation"], ["subject"]);
        assert!(!map.contains_key("Binary"));
        assert!(parse_compartment(&doc, "Device").is_empty());
    }
}
