//! What detection knows about people: patients (demographics, labels,
//! identifiers, the departments that treat them) and staff (their own
//! demographics and department). Demographics are kept only as keyed
//! tokens ([`Tok`]), never in clear: detection compares, it never needs to read.
use std::collections::HashSet;
use std::sync::Arc;

use custos_crypto::BlindIndexer;
use parking_lot::RwLock;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A keyed token of a normalized value (the first 8 bytes of its blind
/// index HMAC): equal values give equal tokens; tokens reveal nothing.
pub type Tok = u64;

/// Makes [`Tok`]s under the deployment's blind-index key.
pub struct Tokenizer {
    indexer: Arc<BlindIndexer>,
}

/// Normalize text for comparison: lowercase letters and digits only.
fn norm(s: &str) -> String {
    s.chars()
        .filter(|c| c.is_alphanumeric())
        .flat_map(char::to_lowercase)
        .collect()
}

impl Tokenizer {
    pub fn new(indexer: Arc<BlindIndexer>) -> Tokenizer {
        Tokenizer { indexer }
    }

    /// A tokenizer under a fixed key, for tests, benchmarks and the simulator's direct feed.
    pub fn for_tests() -> Tokenizer {
        Tokenizer::new(Arc::new(BlindIndexer::new(&[0x5a; 32])))
    }

    /// The token of `value` in `domain` (normalized first).
    pub fn tok(&self, domain: &str, value: &str) -> Tok {
        let t = self
            .indexer
            .token(&[b"custos-detect", domain.as_bytes(), norm(value).as_bytes()]);
        u64::from_be_bytes(t[..8].try_into().expect("16-byte token"))
    }

    /// The demographics of a Patient or Practitioner resource.
    pub fn person(&self, r: &Value) -> PersonFacts {
        let name = r["name"].as_array().and_then(|a| a.first());
        let family = name
            .and_then(|n| n["family"].as_str())
            .filter(|f| !norm(f).is_empty());
        let given = name
            .and_then(|n| n["given"].as_array())
            .and_then(|g| g.first())
            .and_then(Value::as_str)
            .unwrap_or("");
        let birth = r["birthDate"].as_str().unwrap_or("");
        let identity = family.map(|f| self.tok("identity", &format!("{f}|{given}|{birth}")));
        let addresses = r["address"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|ad| {
                        let line = ad["line"]
                            .as_array()
                            .and_then(|l| l.first())
                            .and_then(Value::as_str)?;
                        let postal = ad["postalCode"].as_str().unwrap_or("");
                        Some(self.tok("address", &format!("{line}|{postal}")))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let phones = r["telecom"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|t| t["system"].as_str().is_none_or(|s| s == "phone"))
                    .filter_map(|t| t["value"].as_str())
                    .map(|v| {
                        let digits: String = v.chars().filter(char::is_ascii_digit).collect();
                        let tail = &digits[digits.len().saturating_sub(10)..];
                        self.tok("phone", tail)
                    })
                    .collect()
            })
            .unwrap_or_default();
        PersonFacts {
            family: family.map(|f| self.tok("family", f)),
            identity,
            addresses,
            phones,
        }
    }

    /// The identifiers of a resource (`system|value`), as tokens.
    pub fn identifiers(&self, r: &Value) -> Vec<Tok> {
        let mut out: Vec<Tok> = r["identifier"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|i| {
                        let v = i["value"].as_str()?;
                        Some(self.tok(
                            "identifier",
                            &format!("{}|{v}", i["system"].as_str().unwrap_or("")),
                        ))
                    })
                    .collect()
            })
            .unwrap_or_default();
        if let Some(member) = r["subscriberId"].as_str() {
            out.push(self.tok("identifier", &format!("subscriber|{member}")));
        }
        out
    }

    /// A Patient's facts (departments are added from its encounters).
    pub fn patient(&self, r: &Value) -> PatientFacts {
        let labels = r["meta"]["security"]
            .as_array()
            .into_iter()
            .flatten()
            .chain(r["meta"]["tag"].as_array().into_iter().flatten())
            .filter_map(|c| c["code"].as_str())
            .fold(Labels::default(), |mut l, code| {
                match code.to_ascii_uppercase().as_str() {
                    "R" | "V" | "RESTRICTED" => l.restricted = true,
                    "VIP" | "CELEB" => l.vip = true,
                    _ => {}
                }
                l
            });
        PatientFacts {
            person: self.person(r),
            labels,
            identifiers: self.identifiers(r),
            departments: Vec::new(),
        }
    }
}

/// Demographics of a person, as tokens.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PersonFacts {
    pub family: Option<Tok>,
    /// Family, first given name and birth date together.
    pub identity: Option<Tok>,
    pub addresses: Vec<Tok>,
    pub phones: Vec<Tok>,
}

/// Confidentiality labels of a record (`meta.security`, `meta.tag`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Labels {
    /// HL7 v3 Confidentiality R or V.
    pub restricted: bool,
    /// A VIP (celebrity, executive) label.
    pub vip: bool,
}

/// What detection knows of a patient.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PatientFacts {
    pub person: PersonFacts,
    pub labels: Labels,
    pub identifiers: Vec<Tok>,
    /// The Organizations (departments, sites) of the patient's encounters.
    pub departments: Vec<String>,
}

/// What detection knows of a member of staff.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StaffFacts {
    pub person: PersonFacts,
    /// The Organization (department) they work for.
    pub department: Option<String>,
    /// The Patient record that is this person, if any.
    pub patient: Option<String>,
}

/// Where detectors look facts up. Lookups are synchronous and cheap: the
/// live pipeline loads what an event needs before it reaches the detectors.
pub trait Facts: Send + Sync {
    fn patient(&self, id: &str) -> Option<Arc<PatientFacts>>;
    /// Staff by principal subject (`user:…`).
    fn staff(&self, subject: &str) -> Option<Arc<StaffFacts>>;
    /// Whether an identity (family, given, birth date) is a member of staff.
    fn is_employee(&self, identity: Tok) -> bool;
}

/// Facts held in memory: what the live pipeline caches into, and what
/// tests and the simulator's direct feed fill in themselves.
#[derive(Default)]
pub struct MemoryFacts {
    patients: RwLock<std::collections::HashMap<String, Arc<PatientFacts>>>,
    staff: RwLock<std::collections::HashMap<String, Arc<StaffFacts>>>,
    employees: RwLock<HashSet<Tok>>,
}

impl MemoryFacts {
    pub fn set_patient(&self, id: &str, f: PatientFacts) {
        self.patients.write().insert(id.to_string(), Arc::new(f));
    }

    pub fn set_staff(&self, subject: &str, f: StaffFacts) {
        if let Some(i) = f.person.identity {
            self.employees.write().insert(i);
        }
        self.staff.write().insert(subject.to_string(), Arc::new(f));
    }

    pub fn forget_patient(&self, id: &str) {
        self.patients.write().remove(id);
    }

    pub fn clear_patients(&self) {
        self.patients.write().clear();
    }

    pub fn has_patient(&self, id: &str) -> bool {
        self.patients.read().contains_key(id)
    }

    pub fn has_staff(&self, subject: &str) -> bool {
        self.staff.read().contains_key(subject)
    }

    pub fn patients_len(&self) -> usize {
        self.patients.read().len()
    }
}

impl Facts for MemoryFacts {
    fn patient(&self, id: &str) -> Option<Arc<PatientFacts>> {
        self.patients.read().get(id).cloned()
    }
    fn staff(&self, subject: &str) -> Option<Arc<StaffFacts>> {
        self.staff.read().get(subject).cloned()
    }
    fn is_employee(&self, identity: Tok) -> bool {
        self.employees.read().contains(&identity)
    }
}

/// Shannon entropy of a string, in bits per character.
pub fn entropy(s: &str) -> f64 {
    let mut counts = [0u32; 256];
    let mut n = 0u32;
    for b in s.bytes() {
        counts[b as usize] += 1;
        n += 1;
    }
    if n == 0 {
        return 0.0;
    }
    let n = n as f64;
    counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / n;
            -p * p.log2()
        })
        .sum()
}

/// Whether `new` rewrote text of `old` into high-entropy strings: some
/// string value of at least 24 characters that was not in the old version
/// has more than 4.5 bits per character (base64 or hex ciphertext; English
/// text stays near 4). Codes and ids are short and do not count.
pub fn rewritten_to_high_entropy(old: &Value, new: &Value) -> bool {
    let mut before = HashSet::new();
    strings(old, &mut |s| {
        before.insert(s.to_string());
    });
    let mut hit = false;
    strings(new, &mut |s| {
        if !hit && s.len() >= 24 && !before.contains(s) && entropy(s) > 4.5 {
            hit = true;
        }
    });
    hit
}

fn strings(v: &Value, f: &mut dyn FnMut(&str)) {
    match v {
        Value::String(s) => f(s),
        Value::Array(a) => a.iter().for_each(|x| strings(x, f)),
        Value::Object(o) => {
            for (k, x) in o {
                if k != "id" && k != "meta" && k != "reference" && k != "system" {
                    strings(x, f);
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn people_compare_by_tokens() {
        let t = Tokenizer::for_tests();
        let a = t.person(
            &json!({"name":[{"family":"O'Brien","given":["Ann"]}],"birthDate":"1980-01-02",
            "telecom":[{"system":"phone","value":"+1 (555) 123-4567"}],
            "address":[{"line":["1 Main St"],"postalCode":"02139"}]}),
        );
        let b = t.person(&json!({"name":[{"family":"obrien","given":["Bob"]}],
            "telecom":[{"value":"555-123-4567"}],
            "address":[{"line":["1 main st."],"postalCode":"02139"}]}));
        assert_eq!(a.family, b.family);
        assert_ne!(a.identity, b.identity);
        assert_eq!(a.phones, b.phones);
        assert_eq!(a.addresses, b.addresses);
    }

    #[test]
    fn labels_and_identifiers() {
        let t = Tokenizer::for_tests();
        let p = t.patient(&json!({"meta":{"security":[{"system":"http://terminology.hl7.org/CodeSystem/v3-Confidentiality","code":"R"}],
            "tag":[{"code":"VIP"}]},
            "identifier":[{"system":"urn:mrn","value":"123"}]}));
        assert!(p.labels.restricted && p.labels.vip);
        assert_eq!(p.identifiers, vec![t.tok("identifier", "urn:mrn|123")]);
    }

    #[test]
    fn entropy_rewrites() {
        let old = json!({"note":[{"text":"Patient reports mild headache since Tuesday."}]});
        let enc = json!({"note":[{"text":"U2FsdGVkX1+8kQv3Zr0yP9mN4xW7tL2aB6cD1eF5gH8jK0lM"}]});
        let edit =
            json!({"note":[{"text":"Patient reports mild headache since Tuesday, improving."}]});
        assert!(rewritten_to_high_entropy(&old, &enc));
        assert!(!rewritten_to_high_entropy(&old, &edit));
    }
}
