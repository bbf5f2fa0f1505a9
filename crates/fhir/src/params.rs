//! The registry of R4 search parameters, compiled from the official
//! SearchParameter definitions shipped in `data/`.
use std::collections::HashMap;
use std::sync::OnceLock;

use serde_json::Value;

use crate::extract::{IndexValue, nodes_to_values};
use crate::fhirpath::{Expr, Node};
use crate::types::RESOURCE_TYPES;

/// The official R4 SearchParameter Bundle (FHIR 4.0.1, CC0).
const SEARCH_PARAMETERS_JSON: &str = include_str!("../data/search-parameters-r4.json");

/// The type of a search parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ParamKind {
    /// A number.
    Number,
    /// A date, dateTime, instant or Period.
    Date,
    /// A string, HumanName or Address.
    String,
    /// A code, Coding, CodeableConcept, Identifier, ContactPoint or boolean.
    Token,
    /// A reference to another resource.
    Reference,
    /// A combination of parameters (not supported by Custos).
    Composite,
    /// A quantity.
    Quantity,
    /// A uri, url or canonical.
    Uri,
    /// Special search logic (not supported by Custos).
    Special,
}

impl ParamKind {
    /// The kind named by a SearchParameter `type` code (`"token"`).
    pub fn from_code(code: &str) -> Option<ParamKind> {
        Some(match code {
            "number" => ParamKind::Number,
            "date" => ParamKind::Date,
            "string" => ParamKind::String,
            "token" => ParamKind::Token,
            "reference" => ParamKind::Reference,
            "composite" => ParamKind::Composite,
            "quantity" => ParamKind::Quantity,
            "uri" => ParamKind::Uri,
            "special" => ParamKind::Special,
            _ => return None,
        })
    }

    /// The SearchParameter `type` code of this kind (`"token"`), as used in a
    /// CapabilityStatement.
    pub fn code(self) -> &'static str {
        match self {
            ParamKind::Number => "number",
            ParamKind::Date => "date",
            ParamKind::String => "string",
            ParamKind::Token => "token",
            ParamKind::Reference => "reference",
            ParamKind::Composite => "composite",
            ParamKind::Quantity => "quantity",
            ParamKind::Uri => "uri",
            ParamKind::Special => "special",
        }
    }
}

/// One search parameter as it applies to one resource type.
#[derive(Debug, Clone)]
pub struct SearchParam {
    /// The code used in queries (`family`, `birthdate`, `patient`).
    pub code: String,
    /// The canonical URL of the definition.
    pub url: String,
    /// The parameter type.
    pub kind: ParamKind,
    /// The FHIRPath expression from the definition.
    pub expression: String,
    /// Allowed target types for reference parameters.
    pub targets: Vec<String>,
    /// The compiled expression; `None` when the expression uses FHIRPath that
    /// Custos does not evaluate (such parameters are not indexed and are not
    /// advertised in the CapabilityStatement).
    pub program: Option<Expr>,
}

impl SearchParam {
    /// Whether Custos can index and search this parameter.
    pub fn supported(&self) -> bool {
        self.program.is_some() && !matches!(self.kind, ParamKind::Composite | ParamKind::Special)
    }

    /// The values `resource` carries for this parameter (empty if unsupported).
    pub fn extract(&self, resource: &Value) -> Vec<IndexValue> {
        let mut out = Vec::new();
        if self.supported() {
            let nodes = self.nodes(resource);
            nodes_to_values(self.kind, &nodes, &mut out);
        }
        out
    }

    /// The FHIRPath nodes the parameter's expression reaches in `resource`
    /// (empty when the parameter has no compiled program).
    pub fn nodes<'a>(&self, resource: &'a Value) -> Vec<Node<'a>> {
        match &self.program {
            Some(p) => p.evaluate(resource),
            None => Vec::new(),
        }
    }
}

/// All R4 search parameters, per resource type.
pub struct Registry {
    /// Per resource type, its parameters sorted by code.
    by_type: HashMap<&'static str, Vec<SearchParam>>,
}

impl Registry {
    /// The parameter `code` on `resource_type` (including parameters defined
    /// on Resource / DomainResource, such as `_id`'s siblings `_profile`,
    /// `_tag`, `_security`, `_source`). `None` if R4 defines no such parameter.
    pub fn lookup(&self, resource_type: &str, code: &str) -> Option<&SearchParam> {
        let params = self.for_type(resource_type);
        params
            .binary_search_by(|p| p.code.as_str().cmp(code))
            .ok()
            .map(|i| &params[i])
    }

    /// Every parameter of `resource_type`, supported or not, sorted by code.
    pub fn for_type(&self, resource_type: &str) -> &[SearchParam] {
        self.by_type
            .get(resource_type)
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    /// Build the registry from a SearchParameter Bundle (or a JSON array of
    /// SearchParameter resources). Definitions whose expression does not
    /// compile are kept with `program: None`.
    pub fn from_json(json: &str) -> Result<Registry, String> {
        let doc: Value =
            serde_json::from_str(json).map_err(|e| format!("search parameters: {e}"))?;
        let resources: Vec<&Value> = match &doc {
            Value::Array(items) => items.iter().collect(),
            Value::Object(map) => match map.get("entry") {
                Some(Value::Array(entries)) => {
                    entries.iter().filter_map(|e| e.get("resource")).collect()
                }
                _ => vec![&doc],
            },
            _ => return Err("search parameters: expected a Bundle".into()),
        };
        let mut by_type: HashMap<&'static str, Vec<SearchParam>> =
            RESOURCE_TYPES.iter().map(|t| (*t, Vec::new())).collect();
        for r in resources {
            if r.get("resourceType").and_then(Value::as_str) != Some("SearchParameter") {
                continue;
            }
            let text = |k: &str| r.get(k).and_then(Value::as_str).unwrap_or("").to_string();
            let list = |k: &str| -> Vec<String> {
                r.get(k)
                    .and_then(Value::as_array)
                    .map(|a| {
                        a.iter()
                            .filter_map(Value::as_str)
                            .map(str::to_string)
                            .collect()
                    })
                    .unwrap_or_default()
            };
            let code = text("code");
            let Some(kind) = r
                .get("type")
                .and_then(Value::as_str)
                .and_then(ParamKind::from_code)
            else {
                continue;
            };
            if code.is_empty() {
                continue;
            }
            let expression = text("expression");
            let program = if expression.is_empty() {
                None
            } else {
                Expr::compile(&expression).ok()
            };
            let param = SearchParam {
                code,
                url: text("url"),
                kind,
                expression,
                targets: list("target"),
                program,
            };
            for base in list("base") {
                let applies_to: Vec<&'static str> = match base.as_str() {
                    "Resource" => RESOURCE_TYPES.to_vec(),
                    "DomainResource" => RESOURCE_TYPES
                        .iter()
                        .copied()
                        .filter(|t| !matches!(*t, "Bundle" | "Binary" | "Parameters"))
                        .collect(),
                    other => RESOURCE_TYPES
                        .iter()
                        .copied()
                        .filter(|t| *t == other)
                        .collect(),
                };
                for t in applies_to {
                    let params = by_type
                        .get_mut(t)
                        .expect("every resource type has an entry");
                    // One definition per code and type: the first one wins.
                    if !params.iter().any(|p| p.code == param.code) {
                        params.push(param.clone());
                    }
                }
            }
        }
        for params in by_type.values_mut() {
            params.sort_by(|a, b| a.code.cmp(&b.code));
        }
        Ok(Registry { by_type })
    }
}

/// The process-wide registry, built on first use.
pub fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(|| {
        Registry::from_json(SEARCH_PARAMETERS_JSON)
            .expect("the embedded R4 search parameters are valid")
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::date::parse_range;

    fn tok(system: Option<&str>, code: &str) -> IndexValue {
        IndexValue::Token {
            system: system.map(str::to_string),
            code: code.to_string(),
        }
    }

    fn strs(values: Vec<IndexValue>) -> Vec<String> {
        values
            .into_iter()
            .map(|v| match v {
                IndexValue::String(s) => s,
                other => panic!("not a string: {other:?}"),
            })
            .collect()
    }

    fn extract(ty: &str, code: &str, resource: &Value) -> Vec<IndexValue> {
        registry()
            .lookup(ty, code)
            .unwrap_or_else(|| panic!("{ty}.{code}"))
            .extract(resource)
    }

    fn patient() -> Value {
        json!({
            "resourceType": "Patient",
            "id": "pat1",
            "meta": {"lastUpdated": "2024-01-01T00:00:00Z", "tag": [{"system": "urn:t", "code": "vip"}], "profile": ["http://example.org/p"]},
            "identifier": [{"use": "usual", "system": "urn:oid:1.2.36.146.595.217.0.1", "value": "12345"}],
            "active": true,
            "name": [
                {"use": "official", "family": "Chalmers", "given": ["Peter", "James"]},
                {"use": "maiden", "family": "Windsor", "given": ["Peter"]}
            ],
            "telecom": [
                {"system": "phone", "value": "(03) 5555 6473", "use": "work"},
                {"system": "email", "value": "peter@example.org"}
            ],
            "gender": "male",
            "birthDate": "1974-12-25",
            "address": [{"use": "home", "line": ["534 Erewhon St"], "city": "PleasantVille", "state": "Vic", "postalCode": "3999", "country": "AU"}],
            "generalPractitioner": [{"reference": "Practitioner/dr1"}],
            "managingOrganization": {"reference": "Organization/1"},
            "link": [{"other": {"reference": "Patient/pat2"}, "type": "seealso"}]
        })
    }

    fn observation() -> Value {
        json!({
            "resourceType": "Observation",
            "id": "obs1",
            "status": "final",
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "vital-signs"}]}],
            "code": {"coding": [{"system": "http://loinc.org", "code": "29463-7", "display": "Body Weight"}, {"system": "http://snomed.info/sct", "code": "27113001"}]},
            "subject": {"reference": "Patient/pat1"},
            "encounter": {"reference": "Encounter/enc1"},
            "effectiveDateTime": "2016-03-28T10:00:00+02:00",
            "performer": [{"reference": "Practitioner/dr1"}, {"reference": "Organization/org1"}],
            "valueQuantity": {"value": 67.5, "unit": "kg", "system": "http://unitsofmeasure.org", "code": "kg"},
            "component": [{"code": {"coding": [{"system": "http://loinc.org", "code": "8480-6"}]}, "valueQuantity": {"value": 107, "system": "http://unitsofmeasure.org", "code": "mm[Hg]"}}]
        })
    }

    fn encounter() -> Value {
        json!({
            "resourceType": "Encounter",
            "id": "enc1",
            "status": "finished",
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
            "type": [{"coding": [{"system": "http://snomed.info/sct", "code": "185349003"}]}],
            "subject": {"reference": "Patient/pat1"},
            "participant": [{"individual": {"reference": "Practitioner/dr1"}}, {"individual": {"reference": "RelatedPerson/rp1"}}],
            "period": {"start": "2020-01-01T10:00:00Z", "end": "2020-01-01T11:30:00Z"},
            "length": {"value": 90, "unit": "min", "system": "http://unitsofmeasure.org", "code": "min"},
            "serviceProvider": {"reference": "Organization/org1"}
        })
    }

    #[test]
    fn registry_covers_all_types() {
        let reg = registry();
        for t in RESOURCE_TYPES {
            let params = reg.for_type(t);
            assert!(params.iter().any(|p| p.code == "_id"), "{t} lacks _id");
            assert!(
                params.windows(2).all(|w| w[0].code < w[1].code),
                "{t} not sorted"
            );
        }
        assert!(reg.for_type("NotAType").is_empty());
        assert!(reg.lookup("NotAType", "_id").is_none());
        // DomainResource parameters skip Bundle, Binary, Parameters.
        assert!(reg.lookup("Patient", "_text").is_some());
        assert!(reg.lookup("Bundle", "_text").is_none());
        assert!(reg.lookup("Binary", "_text").is_none());
        assert!(reg.lookup("Parameters", "_lastUpdated").is_some());
        assert!(reg.lookup("Patient", "nope").is_none());
    }

    #[test]
    fn parameter_metadata() {
        let reg = registry();
        let family = reg.lookup("Patient", "family").unwrap();
        assert_eq!(family.kind, ParamKind::String);
        assert_eq!(
            family.url,
            "http://hl7.org/fhir/SearchParameter/individual-family"
        );
        assert!(family.supported());
        let subject = reg.lookup("Observation", "subject").unwrap();
        assert_eq!(subject.kind, ParamKind::Reference);
        assert!(subject.targets.iter().any(|t| t == "Patient"));
        let patient = reg.lookup("Account", "patient").unwrap();
        assert_eq!(patient.targets, vec!["Patient".to_string()]);
        // Composite and special parameters are known but not supported.
        let composite = reg.lookup("Observation", "code-value-quantity").unwrap();
        assert_eq!(composite.kind, ParamKind::Composite);
        assert!(!composite.supported());
        assert!(composite.extract(&observation()).is_empty());
        assert!(!reg.lookup("Patient", "_text").unwrap().supported());
        assert_eq!(ParamKind::from_code("token"), Some(ParamKind::Token));
        assert_eq!(ParamKind::Quantity.code(), "quantity");
        assert_eq!(ParamKind::from_code("x"), None);
    }

    #[test]
    fn all_parameters_of_core_types_are_compiled() {
        for t in [
            "Patient",
            "Observation",
            "Encounter",
            "Condition",
            "MedicationRequest",
            "Practitioner",
        ] {
            for p in registry().for_type(t) {
                if p.expression.is_empty() {
                    continue;
                }
                assert!(p.program.is_some(), "{t}.{}", p.code);
            }
        }
    }

    #[test]
    fn patient_extraction() {
        let p = patient();
        assert_eq!(
            strs(extract("Patient", "family", &p)),
            ["Chalmers", "Windsor"]
        );
        assert_eq!(
            strs(extract("Patient", "given", &p)),
            ["Peter", "James", "Peter"]
        );
        assert_eq!(
            strs(extract("Patient", "name", &p)),
            ["Chalmers", "Peter", "James", "Windsor", "Peter"]
        );
        assert_eq!(
            strs(extract("Patient", "address-city", &p)),
            ["PleasantVille"]
        );
        assert_eq!(
            strs(extract("Patient", "address", &p)),
            ["534 Erewhon St", "PleasantVille", "Vic", "3999", "AU"]
        );
        assert_eq!(extract("Patient", "gender", &p), vec![tok(None, "male")]);
        assert_eq!(extract("Patient", "active", &p), vec![tok(None, "true")]);
        assert_eq!(extract("Patient", "deceased", &p), vec![tok(None, "false")]);
        assert_eq!(
            extract("Patient", "identifier", &p),
            vec![tok(Some("urn:oid:1.2.36.146.595.217.0.1"), "12345")]
        );
        assert_eq!(
            extract("Patient", "phone", &p),
            vec![tok(None, "(03) 5555 6473")]
        );
        assert_eq!(
            extract("Patient", "email", &p),
            vec![tok(None, "peter@example.org")]
        );
        assert_eq!(extract("Patient", "telecom", &p).len(), 2);
        assert_eq!(
            extract("Patient", "birthdate", &p),
            vec![IndexValue::Date(parse_range("1974-12-25").unwrap())]
        );
        assert_eq!(
            extract("Patient", "general-practitioner", &p),
            vec![IndexValue::Reference {
                target_type: Some("Practitioner".into()),
                target_id: Some("dr1".into()),
                raw: "Practitioner/dr1".into()
            }]
        );
        assert_eq!(
            extract("Patient", "link", &p),
            vec![IndexValue::Reference {
                target_type: Some("Patient".into()),
                target_id: Some("pat2".into()),
                raw: "Patient/pat2".into()
            }]
        );
        assert_eq!(extract("Patient", "_id", &p), vec![tok(None, "pat1")]);
        assert_eq!(
            extract("Patient", "_tag", &p),
            vec![tok(Some("urn:t"), "vip")]
        );
        assert_eq!(
            extract("Patient", "_profile", &p),
            vec![IndexValue::Uri("http://example.org/p".into())]
        );
        assert_eq!(
            extract("Patient", "_lastUpdated", &p),
            vec![IndexValue::Date(
                parse_range("2024-01-01T00:00:00Z").unwrap()
            )]
        );
        let dead = json!({"resourceType": "Patient", "deceasedDateTime": "2020-02-02"});
        assert_eq!(
            extract("Patient", "deceased", &dead),
            vec![tok(None, "true")]
        );
        assert_eq!(
            extract("Patient", "death-date", &dead),
            vec![IndexValue::Date(parse_range("2020-02-02").unwrap())]
        );
        // A wrong resource type yields nothing.
        assert!(extract("Patient", "family", &observation()).is_empty());
    }

    #[test]
    fn observation_extraction() {
        let o = observation();
        assert_eq!(
            extract("Observation", "code", &o),
            vec![
                tok(Some("http://loinc.org"), "29463-7"),
                tok(Some("http://snomed.info/sct"), "27113001")
            ]
        );
        assert_eq!(
            extract("Observation", "status", &o),
            vec![tok(None, "final")]
        );
        assert_eq!(extract("Observation", "category", &o).len(), 1);
        assert_eq!(
            extract("Observation", "date", &o),
            vec![IndexValue::Date(
                parse_range("2016-03-28T10:00:00+02:00").unwrap()
            )]
        );
        assert_eq!(
            extract("Observation", "value-quantity", &o),
            vec![IndexValue::Quantity {
                value: 67.5,
                system: Some("http://unitsofmeasure.org".into()),
                code: Some("kg".into())
            }]
        );
        assert_eq!(
            extract("Observation", "component-value-quantity", &o).len(),
            1
        );
        assert_eq!(extract("Observation", "combo-code", &o).len(), 3);
        let patient_ref = IndexValue::Reference {
            target_type: Some("Patient".into()),
            target_id: Some("pat1".into()),
            raw: "Patient/pat1".into(),
        };
        assert_eq!(
            extract("Observation", "subject", &o),
            vec![patient_ref.clone()]
        );
        assert_eq!(extract("Observation", "patient", &o), vec![patient_ref]);
        assert_eq!(extract("Observation", "performer", &o).len(), 2);
        assert!(extract("Observation", "value-concept", &o).is_empty());
        assert!(extract("Observation", "value-date", &o).is_empty());
        let group_subject =
            json!({"resourceType": "Observation", "subject": {"reference": "Group/g1"}});
        assert!(extract("Observation", "patient", &group_subject).is_empty());
        assert_eq!(extract("Observation", "subject", &group_subject).len(), 1);
        let coded = json!({"resourceType": "Observation", "valueCodeableConcept": {"coding": [{"system": "s", "code": "pos"}], "text": "Positive"}});
        assert_eq!(
            extract("Observation", "value-concept", &coded),
            vec![tok(Some("s"), "pos")]
        );
        assert_eq!(
            strs(extract("Observation", "value-string", &coded)),
            ["Positive"]
        );
    }

    #[test]
    fn encounter_extraction() {
        let e = encounter();
        assert_eq!(
            extract("Encounter", "date", &e),
            vec![IndexValue::Date(crate::date::DateRange {
                start: parse_range("2020-01-01T10:00:00Z").unwrap().start,
                end: parse_range("2020-01-01T11:30:00Z").unwrap().end,
            })]
        );
        assert_eq!(
            extract("Encounter", "class", &e),
            vec![tok(
                Some("http://terminology.hl7.org/CodeSystem/v3-ActCode"),
                "AMB"
            )]
        );
        assert_eq!(extract("Encounter", "participant", &e).len(), 2);
        assert_eq!(extract("Encounter", "practitioner", &e).len(), 1);
        assert_eq!(
            extract("Encounter", "length", &e),
            vec![IndexValue::Quantity {
                value: 90.0,
                system: Some("http://unitsofmeasure.org".into()),
                code: Some("min".into())
            }]
        );
        assert_eq!(extract("Encounter", "patient", &e).len(), 1);
        assert_eq!(extract("Encounter", "service-provider", &e).len(), 1);
    }

    #[test]
    fn other_kinds() {
        let risk =
            json!({"resourceType": "RiskAssessment", "prediction": [{"probabilityDecimal": 0.25}]});
        assert_eq!(
            extract("RiskAssessment", "probability", &risk),
            vec![IndexValue::Number(0.25)]
        );
        let q = json!({"resourceType": "Questionnaire", "url": "http://example.org/q1"});
        assert_eq!(
            extract("Questionnaire", "url", &q),
            vec![IndexValue::Uri("http://example.org/q1".into())]
        );
        let mr = json!({"resourceType": "MedicationRequest", "medicationCodeableConcept": {"coding": [{"system": "rx", "code": "123"}]}, "subject": {"reference": "Patient/p"}, "authoredOn": "2020-05-05"});
        assert_eq!(
            extract("MedicationRequest", "code", &mr),
            vec![tok(Some("rx"), "123")]
        );
        assert!(extract("MedicationRequest", "medication", &mr).is_empty());
        assert_eq!(extract("MedicationRequest", "authoredon", &mr).len(), 1);
    }

    #[test]
    fn from_json_accepts_arrays_and_rejects_garbage() {
        let reg = Registry::from_json(
            r#"[{"resourceType":"SearchParameter","code":"x","base":["Patient"],"type":"string","expression":"Patient.x"}]"#,
        )
        .unwrap();
        assert_eq!(reg.for_type("Patient").len(), 1);
        assert!(Registry::from_json("5").is_err());
        assert!(Registry::from_json("{").is_err());
    }
}
