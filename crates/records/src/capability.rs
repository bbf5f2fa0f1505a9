//! The CapabilityStatement: generated from what the code supports, so it
//! cannot drift from the truth.
use custos_fhir::types::RESOURCE_TYPES;
use custos_fhir::{ParamKind, registry};
use serde_json::{Value, json};

/// The server's CapabilityStatement. `base` is its base URL; `version` the software version.
pub fn capability_statement(base: &str, version: &str, now: &str) -> Value {
    let resources: Vec<Value> = RESOURCE_TYPES
        .iter()
        .map(|t| {
            let mut params: Vec<Value> = vec![
                json!({ "name": "_id", "type": "token", "definition": "http://hl7.org/fhir/SearchParameter/Resource-id" }),
                json!({ "name": "_lastUpdated", "type": "date", "definition": "http://hl7.org/fhir/SearchParameter/Resource-lastUpdated" }),
            ];
            for p in registry().for_type(t) {
                if p.supported() && p.code != "_id" && p.code != "_lastUpdated" {
                    params.push(json!({ "name": p.code, "type": p.kind.code(), "definition": p.url }));
                }
            }
            let reference_params: Vec<String> = registry()
                .for_type(t)
                .iter()
                .filter(|p| p.supported() && p.kind == ParamKind::Reference)
                .map(|p| format!("{t}:{}", p.code))
                .collect();
            let mut r = json!({
                "type": t,
                "interaction": [
                    {"code": "read"}, {"code": "vread"}, {"code": "update"}, {"code": "delete"},
                    {"code": "history-instance"}, {"code": "history-type"}, {"code": "create"}, {"code": "search-type"}
                ],
                "versioning": "versioned-update",
                "readHistory": true,
                "updateCreate": true,
                "conditionalCreate": true,
                "conditionalUpdate": false,
                "conditionalDelete": "not-supported",
                "searchParam": params,
            });
            if !reference_params.is_empty() {
                r["searchInclude"] = json!(reference_params);
                r["searchRevInclude"] = json!(reference_params);
            }
            r
        })
        .collect();
    json!({
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": now,
        "publisher": "Custos",
        "kind": "instance",
        "software": { "name": "Custos", "version": version },
        "implementation": { "description": "Custos: an encrypted, self-guarding FHIR R4 server", "url": base },
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json", "json"],
        "rest": [{
            "mode": "server",
            "documentation": "Every resource body is sealed with AES-256-GCM under a per-patient data key; search uses keyed blind indexes. Sorting is supported on _lastUpdated and clinical date parameters. Totals are exact up to a configured cap and omitted beyond it.",
            "resource": resources,
            "interaction": [{"code": "transaction"}, {"code": "batch"}, {"code": "history-system"}],
        }],
    })
}
