//! The R4 Patient compartment (from the official CompartmentDefinition),
//! which decides which data key seals a resource.
use serde_json::Value;

/// The search-parameter codes through which `resource_type` belongs to a
/// patient's compartment (`Observation` → `["subject", "performer"]`);
/// `None` when the type is not in the Patient compartment. `Patient` itself
/// is in its own compartment (returns `Some(&["link"])` per the definition,
/// but see [`patient_of`]).
pub fn patient_params(resource_type: &str) -> Option<&'static [String]> {
    let _ = resource_type;
    todo!("HELPER")
}

/// The id of the patient whose compartment `resource` falls in: its own id
/// for a Patient, otherwise the first `Patient/{id}` reference reached through
/// the compartment's parameters (in definition order); `None` if it is in no
/// patient's compartment.
pub fn patient_of(resource: &Value) -> Option<String> {
    let _ = resource;
    todo!("HELPER")
}
