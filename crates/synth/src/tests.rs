use std::collections::{HashMap, HashSet};

use serde_json::Value;

use super::*;

fn synth(seed: u64, detail: Detail) -> Synth {
    Synth::new(SynthConfig {
        patients: 10,
        seed,
        detail,
    })
}

/// No nulls, no empty arrays, objects or strings, no leading/trailing
/// whitespace in strings, anywhere.
fn check_valid_json(v: &Value, path: &str) {
    match v {
        Value::Null => panic!("null at {path}"),
        Value::String(s) => {
            assert!(!s.is_empty(), "empty string at {path}");
            assert_eq!(s.trim(), s, "untrimmed string at {path}");
        }
        Value::Array(a) => {
            assert!(!a.is_empty(), "empty array at {path}");
            for (i, x) in a.iter().enumerate() {
                assert!(!x.is_array(), "nested array at {path}[{i}]");
                check_valid_json(x, &format!("{path}[{i}]"));
            }
        }
        Value::Object(o) => {
            assert!(!o.is_empty(), "empty object at {path}");
            for (k, x) in o {
                check_valid_json(x, &format!("{path}.{k}"));
            }
        }
        Value::Number(n) => assert!(n.as_f64().is_some_and(f64::is_finite), "{path}"),
        Value::Bool(_) => {}
    }
}

/// The R4 elements of the resource types the generator writes.
fn allowed_elements(resource_type: &str) -> &'static [&'static str] {
    match resource_type {
        "Patient" => &[
            "identifier",
            "active",
            "name",
            "telecom",
            "gender",
            "birthDate",
            "deceasedBoolean",
            "deceasedDateTime",
            "address",
            "maritalStatus",
            "multipleBirthBoolean",
            "multipleBirthInteger",
            "photo",
            "contact",
            "communication",
            "generalPractitioner",
            "managingOrganization",
            "link",
        ],
        "Organization" => &[
            "identifier",
            "active",
            "type",
            "name",
            "alias",
            "telecom",
            "address",
            "partOf",
            "contact",
            "endpoint",
        ],
        "Practitioner" => &[
            "identifier",
            "active",
            "name",
            "telecom",
            "address",
            "gender",
            "birthDate",
            "photo",
            "qualification",
            "communication",
        ],
        "Encounter" => &[
            "identifier",
            "status",
            "statusHistory",
            "class",
            "classHistory",
            "type",
            "serviceType",
            "priority",
            "subject",
            "episodeOfCare",
            "basedOn",
            "participant",
            "appointment",
            "period",
            "length",
            "reasonCode",
            "reasonReference",
            "diagnosis",
            "account",
            "hospitalization",
            "location",
            "serviceProvider",
            "partOf",
        ],
        "Observation" => &[
            "identifier",
            "basedOn",
            "partOf",
            "status",
            "category",
            "code",
            "subject",
            "focus",
            "encounter",
            "effectiveDateTime",
            "effectivePeriod",
            "issued",
            "performer",
            "valueQuantity",
            "valueCodeableConcept",
            "valueString",
            "dataAbsentReason",
            "interpretation",
            "note",
            "bodySite",
            "method",
            "specimen",
            "device",
            "referenceRange",
            "hasMember",
            "derivedFrom",
            "component",
        ],
        "Condition" => &[
            "identifier",
            "clinicalStatus",
            "verificationStatus",
            "category",
            "severity",
            "code",
            "bodySite",
            "subject",
            "encounter",
            "onsetDateTime",
            "abatementDateTime",
            "recordedDate",
            "recorder",
            "asserter",
            "stage",
            "evidence",
            "note",
        ],
        "MedicationRequest" => &[
            "identifier",
            "status",
            "statusReason",
            "intent",
            "category",
            "priority",
            "doNotPerform",
            "reportedBoolean",
            "medicationCodeableConcept",
            "medicationReference",
            "subject",
            "encounter",
            "supportingInformation",
            "authoredOn",
            "requester",
            "performer",
            "performerType",
            "recorder",
            "reasonCode",
            "reasonReference",
            "instantiatesCanonical",
            "instantiatesUri",
            "basedOn",
            "groupIdentifier",
            "courseOfTherapyType",
            "insurance",
            "note",
            "dosageInstruction",
            "dispenseRequest",
            "substitution",
            "priorPrescription",
            "detectedIssue",
            "eventHistory",
        ],
        "AllergyIntolerance" => &[
            "identifier",
            "clinicalStatus",
            "verificationStatus",
            "type",
            "category",
            "criticality",
            "code",
            "patient",
            "encounter",
            "onsetDateTime",
            "recordedDate",
            "recorder",
            "asserter",
            "lastOccurrence",
            "note",
            "reaction",
        ],
        "Procedure" => &[
            "identifier",
            "basedOn",
            "partOf",
            "status",
            "statusReason",
            "category",
            "code",
            "subject",
            "encounter",
            "performedDateTime",
            "performedPeriod",
            "recorder",
            "asserter",
            "performer",
            "location",
            "reasonCode",
            "reasonReference",
            "bodySite",
            "outcome",
            "report",
            "complication",
            "followUp",
            "note",
            "usedCode",
        ],
        "CareTeam" => &[
            "identifier",
            "status",
            "category",
            "name",
            "subject",
            "encounter",
            "period",
            "participant",
            "reasonCode",
            "reasonReference",
            "managingOrganization",
            "telecom",
            "note",
        ],
        "Coverage" => &[
            "identifier",
            "status",
            "type",
            "policyHolder",
            "subscriber",
            "subscriberId",
            "beneficiary",
            "dependent",
            "relationship",
            "period",
            "payor",
            "class",
            "order",
            "network",
            "costToBeneficiary",
            "subrogation",
            "contract",
        ],
        "Device" => &[
            "identifier",
            "definition",
            "udiCarrier",
            "status",
            "statusReason",
            "distinctIdentifier",
            "manufacturer",
            "manufactureDate",
            "expirationDate",
            "lotNumber",
            "serialNumber",
            "deviceName",
            "modelNumber",
            "partNumber",
            "type",
            "specialization",
            "version",
            "property",
            "patient",
            "owner",
            "contact",
            "location",
            "url",
            "note",
            "safety",
            "parent",
        ],
        other => panic!("unexpected resource type {other}"),
    }
}

fn is_date(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 10
        && b[4] == b'-'
        && b[7] == b'-'
        && b.iter()
            .enumerate()
            .all(|(i, c)| i == 4 || i == 7 || c.is_ascii_digit())
        && (1..=12).contains(&s[5..7].parse::<u32>().unwrap())
        && (1..=31).contains(&s[8..10].parse::<u32>().unwrap())
}

fn is_date_time(s: &str) -> bool {
    // YYYY-MM-DDThh:mm:ss[.sss](+|-)hh:mm
    if s.len() < 25 || !is_date(&s[..10]) || &s[10..11] != "T" {
        return false;
    }
    let rest = &s[11..];
    let (time, zone) = rest.split_at(rest.len() - 6);
    let time_ok = time.len() >= 8
        && time.as_bytes()[2] == b':'
        && time.as_bytes()[5] == b':'
        && time[..2].parse::<u32>().is_ok_and(|h| h < 24)
        && time[3..5].parse::<u32>().is_ok_and(|m| m < 60)
        && time[6..8].parse::<u32>().is_ok_and(|x| x < 60)
        && (time.len() == 8 || (time.as_bytes()[8] == b'.' && time.len() == 12));
    let zone_ok = (zone.starts_with('-') || zone.starts_with('+')) && zone.as_bytes()[3] == b':';
    time_ok && zone_ok
}

/// Checks date formats, codings and quantities everywhere below `v`.
fn check_datatypes(v: &Value, path: &str) {
    match v {
        Value::Object(o) => {
            for (k, x) in o {
                let p = format!("{path}.{k}");
                match k.as_str() {
                    "birthDate" | "manufactureDate" | "expirationDate" => {
                        assert!(is_date(x.as_str().unwrap()), "{p}: {x}")
                    }
                    "effectiveDateTime" | "onsetDateTime" | "abatementDateTime"
                    | "recordedDate" | "authoredOn" | "issued" => {
                        assert!(is_date_time(x.as_str().unwrap()), "{p}: {x}")
                    }
                    "start" | "end" => {
                        let s = x.as_str().unwrap();
                        assert!(is_date(s) || is_date_time(s), "{p}: {x}");
                    }
                    "coding" => {
                        for c in x.as_array().unwrap() {
                            let system = c["system"].as_str().unwrap();
                            assert!(system.contains(':'), "{p}: {system}");
                            assert!(c["code"].is_string(), "{p}");
                        }
                    }
                    "valueQuantity" => {
                        assert!(x["value"].is_number(), "{p}");
                        assert_eq!(x["system"], "http://unitsofmeasure.org", "{p}");
                        assert!(x["code"].is_string() && x["unit"].is_string(), "{p}");
                    }
                    "reference" => assert!(x.is_string(), "{p}"),
                    _ => {}
                }
                check_datatypes(x, &p);
            }
        }
        Value::Array(a) => a.iter().for_each(|x| check_datatypes(x, path)),
        _ => {}
    }
}

fn collect_references<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
    match v {
        Value::Object(o) => {
            for (k, x) in o {
                if k == "reference" {
                    out.push(x.as_str().expect("reference is a string"));
                } else {
                    collect_references(x, out);
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| collect_references(x, out)),
        _ => {}
    }
}

fn entries(bundle: &Value) -> &Vec<Value> {
    assert_eq!(bundle["resourceType"], "Bundle");
    assert_eq!(bundle["type"], "transaction");
    bundle["entry"].as_array().expect("entries")
}

/// Structural checks shared by every bundle; returns the full URLs.
fn check_bundle(bundle: &Value) -> HashSet<String> {
    check_valid_json(bundle, "Bundle");
    check_datatypes(bundle, "Bundle");
    let mut full_urls = HashSet::new();
    for e in entries(bundle) {
        let full_url = e["fullUrl"].as_str().unwrap();
        let uuid = full_url
            .strip_prefix("urn:uuid:")
            .expect("urn:uuid full URL");
        assert_eq!(uuid::Uuid::parse_str(uuid).unwrap().get_version_num(), 4);
        assert!(
            full_urls.insert(full_url.to_string()),
            "duplicate {full_url}"
        );
        let resource = &e["resource"];
        let rt = resource["resourceType"].as_str().unwrap();
        assert_eq!(e["request"]["method"], "POST");
        assert_eq!(e["request"]["url"], rt);
        let allowed = allowed_elements(rt);
        for key in resource.as_object().unwrap().keys() {
            assert!(
                key == "resourceType" || key == "extension" || allowed.contains(&key.as_str()),
                "{rt}.{key} is not an R4 element"
            );
        }
    }
    full_urls
}

/// `Type?identifier=system|value` for every directory entry.
fn directory_targets(synth: &Synth) -> HashSet<String> {
    let dir = synth.directory_bundle();
    let mut targets = HashSet::new();
    for e in entries(&dir) {
        let r = &e["resource"];
        let rt = r["resourceType"].as_str().unwrap();
        let id = &r["identifier"][0];
        let token = format!(
            "{}|{}",
            id["system"].as_str().unwrap(),
            id["value"].as_str().unwrap()
        );
        assert_eq!(e["request"]["ifNoneExist"], format!("identifier={token}"));
        assert!(
            targets.insert(format!("{rt}?identifier={token}")),
            "duplicate {token}"
        );
    }
    targets
}

fn patient_resource(bundle: &Value) -> &Value {
    let first = &entries(bundle)[0]["resource"];
    assert_eq!(first["resourceType"], "Patient");
    first
}

#[test]
fn directory_is_valid_and_fixed() {
    let a = synth(1, Detail::Full);
    let b = synth(2, Detail::DemographicsOnly);
    let dir = a.directory_bundle();
    assert_eq!(dir, b.directory_bundle(), "directory independent of seed");
    check_bundle(&dir);
    let count = |rt: &str| {
        entries(&dir)
            .iter()
            .filter(|e| e["resource"]["resourceType"] == rt)
            .count()
    };
    assert_eq!(count("Organization"), 23);
    assert_eq!(count("Practitioner"), 100);
    assert_eq!(directory_targets(&a).len(), 123);
    for e in entries(&dir) {
        let r = &e["resource"];
        if r["resourceType"] == "Practitioner" {
            assert_eq!(
                r["identifier"][0]["system"],
                "http://hl7.org/fhir/sid/us-npi"
            );
            let npi = r["identifier"][0]["value"].as_str().unwrap();
            assert_eq!(npi.len(), 10);
            assert!(r["telecom"][0]["value"].as_str().unwrap().contains('@'));
            assert!(r["gender"].is_string() && r["active"] == true);
        } else {
            assert_eq!(
                r["identifier"][0]["system"],
                "https://github.com/synthetichealth/synthea"
            );
            assert!(r["address"][0]["postalCode"].as_str().unwrap().len() == 5);
        }
    }
}

#[test]
fn deterministic() {
    for detail in [Detail::Full, Detail::DemographicsOnly] {
        let a = synth(42, detail);
        let b = synth(42, detail);
        for i in [0, 1, 7, 12_345, 99_999] {
            let (ba, fa) = a.patient(i);
            let (bb, fb) = b.patient(i);
            assert_eq!(
                serde_json::to_string(&ba).unwrap(),
                serde_json::to_string(&bb).unwrap()
            );
            assert_eq!(fa, fb);
        }
    }
    // Another seed gives other data.
    let (x, _) = synth(42, Detail::Full).patient(3);
    let (y, _) = synth(43, Detail::Full).patient(3);
    assert_ne!(x, y);
}

#[test]
fn demographics_only_is_the_full_patient() {
    let full = synth(7, Detail::Full);
    let demo = synth(7, Detail::DemographicsOnly);
    for i in 0..50 {
        let (bf, ff) = full.patient(i);
        let (bd, fd) = demo.patient(i);
        assert_eq!(ff, fd);
        assert_eq!(entries(&bd).len(), 1);
        assert_eq!(entries(&bf)[0], entries(&bd)[0]);
        check_bundle(&bd);
    }
}

#[test]
fn different_indexes_give_different_patients() {
    let s = synth(5, Detail::DemographicsOnly);
    let facts: Vec<PatientFacts> = (0..200).map(|i| s.patient(i).1).collect();
    for w in facts.windows(2) {
        assert_ne!(w[0], w[1]);
    }
    let names: HashSet<(String, String)> = facts
        .iter()
        .map(|f| (f.family.clone(), f.given.clone()))
        .collect();
    assert!(names.len() > 180, "{}", names.len());
}

#[test]
fn full_bundles_are_valid_and_references_resolve() {
    let s = synth(2024, Detail::Full);
    let targets = directory_targets(&s);
    let mut types: HashMap<String, usize> = HashMap::new();
    for i in 0..150 {
        let (bundle, _) = s.patient(i);
        let full_urls = check_bundle(&bundle);
        let mut refs = Vec::new();
        collect_references(&bundle, &mut refs);
        assert!(refs.len() > 20);
        for r in refs {
            if r.starts_with("urn:uuid:") {
                assert!(full_urls.contains(r), "dangling {r}");
            } else {
                assert!(targets.contains(r), "unknown conditional reference {r}");
            }
        }
        let patient_urn = entries(&bundle)[0]["fullUrl"].as_str().unwrap();
        for e in entries(&bundle).iter().skip(1) {
            let r = &e["resource"];
            let rt = r["resourceType"].as_str().unwrap();
            *types.entry(rt.to_string()).or_default() += 1;
            let subject = match rt {
                "AllergyIntolerance" | "Device" => &r["patient"],
                "Coverage" => &r["beneficiary"],
                _ => &r["subject"],
            };
            assert_eq!(subject["reference"], patient_urn, "{rt}");
            if rt == "Observation" {
                assert_eq!(r["status"], "final");
                assert!(r["valueQuantity"].is_object() ^ r["component"].is_array());
                let cat = r["category"][0]["coding"][0]["code"].as_str().unwrap();
                assert!(cat == "vital-signs" || cat == "laboratory");
                assert!(
                    r["encounter"]["reference"]
                        .as_str()
                        .unwrap()
                        .starts_with("urn:uuid:")
                );
            }
            if rt == "Encounter" {
                let class = r["class"]["code"].as_str().unwrap();
                assert!(["AMB", "EMER", "IMP"].contains(&class));
                assert!(
                    r["period"]["start"].as_str().unwrap() < r["period"]["end"].as_str().unwrap()
                );
            }
        }
    }
    for rt in [
        "Encounter",
        "Observation",
        "Condition",
        "MedicationRequest",
        "AllergyIntolerance",
        "Procedure",
        "CareTeam",
        "Coverage",
        "Device",
    ] {
        assert!(
            types.get(rt).copied().unwrap_or(0) > 0,
            "no {rt} in 150 patients"
        );
    }
    assert_eq!(types["CareTeam"], 150);
    assert_eq!(types["Coverage"], 150);
    let enc = types["Encounter"];
    assert!((150 * 3..=150 * 8).contains(&enc));
}

#[test]
fn facts_match_the_patient() {
    let s = synth(99, Detail::Full);
    for i in 0..100 {
        let (bundle, f) = s.patient(i);
        let p = patient_resource(&bundle);
        assert_eq!(p["name"][0]["use"], "official");
        assert_eq!(p["name"][0]["family"], f.family.as_str());
        assert_eq!(p["name"][0]["given"][0], f.given.as_str());
        assert_eq!(p["birthDate"], f.birth_date.as_str());
        assert_eq!(p["telecom"][0]["value"], f.phone.as_str());
        assert_eq!(p["telecom"][0]["use"], "home");
        assert_eq!(p["address"][0]["postalCode"], f.postal_code.as_str());
        let ids = p["identifier"].as_array().unwrap();
        let mrn = ids
            .iter()
            .find(|id| id["type"]["coding"][0]["code"] == "MR")
            .unwrap();
        assert_eq!(mrn["system"], "http://hospital.smarthealthit.org");
        assert_eq!(
            mrn["type"]["coding"][0]["system"],
            "http://terminology.hl7.org/CodeSystem/v2-0203"
        );
        assert_eq!(mrn["value"], f.mrn.as_str());
        let ssn = ids
            .iter()
            .find(|id| id["system"] == "http://hl7.org/fhir/sid/us-ssn")
            .unwrap();
        assert_eq!(ssn["value"], f.ssn.as_str());
        // Formats.
        assert!(f.ssn.starts_with("999-") && f.ssn.len() == 11);
        assert!(f.phone.starts_with("555-") && f.phone.len() == 12);
        assert!(f.postal_code.len() == 5 && f.postal_code.bytes().all(|b| b.is_ascii_digit()));
        assert!(f.mrn.len() == 8 && f.mrn.bytes().all(|b| b.is_ascii_digit()));
        let year: i32 = f.birth_date[..4].parse().unwrap();
        assert!((1930..=2022).contains(&year));
        assert_eq!(p["address"][0]["country"], "US");
        assert!(
            p["generalPractitioner"][0]["reference"]
                .as_str()
                .unwrap()
                .starts_with("Practitioner?identifier=http://hl7.org/fhir/sid/us-npi|")
        );
    }
}

#[test]
fn mrn_and_ssn_are_unique() {
    let s = synth(123, Detail::DemographicsOnly);
    let mut mrns = HashSet::new();
    let mut ssns = HashSet::new();
    for i in 0..10_000 {
        let f = s.patient(i).1;
        assert!(mrns.insert(f.mrn), "duplicate MRN at {i}");
        assert!(ssns.insert(f.ssn), "duplicate SSN at {i}");
    }
    // Also for the cheap derivation directly, at a larger scale.
    let mut mrns = HashSet::new();
    let mut ssns = HashSet::new();
    for i in 0..200_000 {
        assert!(mrns.insert(patient::mrn(123, i)));
        assert!(ssns.insert(patient::ssn(123, i)));
    }
}

#[test]
fn names_are_diverse() {
    let family: HashSet<&str> = names::ORIGINS
        .iter()
        .flat_map(|o| o.family.iter().copied())
        .collect();
    let given: HashSet<&str> = names::ORIGINS
        .iter()
        .flat_map(|o| o.male.iter().chain(o.female.iter()).copied())
        .collect();
    assert!(family.len() >= 500, "{}", family.len());
    assert!(given.len() >= 500, "{}", given.len());
    for n in family.iter().chain(given.iter()) {
        assert_eq!(n.trim(), *n);
        assert!(!n.is_empty());
    }
    let s = synth(8, Detail::DemographicsOnly);
    let mut families = HashSet::new();
    let mut givens = HashSet::new();
    let mut accented = 0;
    for i in 0..20_000 {
        let f = s.patient(i).1;
        if !f.family.is_ascii() || !f.given.is_ascii() {
            accented += 1;
        }
        families.insert(f.family);
        givens.insert(f.given);
    }
    assert!(families.len() >= 500, "{}", families.len());
    assert!(givens.len() >= 500, "{}", givens.len());
    assert!(accented > 500, "{accented}");
}

#[test]
fn bundle_sizes_are_reasonable() {
    let s = synth(77, Detail::Full);
    let n = 300;
    let sizes: Vec<usize> = (0..n).map(|i| entries(&s.patient(i).0).len()).collect();
    let avg = sizes.iter().sum::<usize>() as f64 / n as f64;
    let min = *sizes.iter().min().unwrap();
    let max = *sizes.iter().max().unwrap();
    assert!((45.0..=80.0).contains(&avg), "average {avg}");
    assert!(min >= 15, "min {min}");
    assert!(max <= 150, "max {max}");
}

#[test]
fn iteration_yields_directory_then_patients() {
    let s = Synth::new(SynthConfig {
        patients: 3,
        seed: 11,
        detail: Detail::DemographicsOnly,
    });
    let dir = s.directory_bundle();
    let p1 = s.patient(1).0;
    assert_eq!(s.len(), 4);
    let all: Vec<Value> = s.collect();
    assert_eq!(all.len(), 4);
    assert_eq!(all[0], dir);
    assert_eq!(all[2], p1);
    let s = synth(11, Detail::DemographicsOnly);
    assert_eq!(s.patients().count(), 10);
}

#[test]
fn synth_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Synth>();
}

/// The validity checks over many more patients (slow in debug builds:
/// `cargo test -p custos-synth --release -- --ignored`).
#[test]
#[ignore]
fn many_patients_are_valid() {
    let s = synth(31_337, Detail::Full);
    let targets = directory_targets(&s);
    for i in 0..5_000 {
        let (bundle, facts) = s.patient(i);
        let full_urls = check_bundle(&bundle);
        let mut refs = Vec::new();
        collect_references(&bundle, &mut refs);
        for r in refs {
            assert!(full_urls.contains(r) || targets.contains(r), "{i}: {r}");
        }
        assert_eq!(
            patient_resource(&bundle)["birthDate"],
            facts.birth_date.as_str()
        );
    }
    let demo = synth(31_337, Detail::DemographicsOnly);
    let mut families = HashSet::new();
    let mut givens = HashSet::new();
    for i in 0..100_000 {
        let f = demo.patient(i).1;
        families.insert(f.family);
        givens.insert(f.given);
    }
    assert!(families.len() >= 750, "{}", families.len());
    assert!(givens.len() >= 750, "{}", givens.len());
}
