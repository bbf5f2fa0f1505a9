//! Arbitrary bytes as a FHIR JSON resource: validation, then extraction of
//! every supported search parameter of its type and the patient compartment,
//! must never panic.
#![no_main]

use custos_fhir::{compartment, registry, validate::validate_resource};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    let validated = validate_resource(&value).map(str::to_string);
    // Extraction runs on validated resources in production, but must be
    // robust on anything that names a type.
    let resource_type = match &validated {
        Ok(t) => t.clone(),
        Err(_) => match value.get("resourceType").and_then(|t| t.as_str()) {
            Some(t) => t.to_string(),
            None => return,
        },
    };
    for param in registry().for_type(&resource_type) {
        if param.supported() {
            let _ = param.extract(&value);
        }
    }
    let _ = compartment::patient_of(&value);
});
